"""The alert path's real parts for the tests: an Alertmanager on loopback whose webhook points
at our receiver, a Prefect server, `runbook serve` as a subprocess, and readers of the Prefect
API (flow runs, the event feed) that say what an alert did."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

from deployments.localpg import free_port, stop_process
from deployments.serve import api_healthy
from tasks.models import utcnow
from tasks.wait import poll

ALERTMANAGER = "/usr/bin/prometheus-alertmanager"
TIMEOUT = httpx.Timeout(30)  # a ceiling: a busy SQLite Prefect server can stall a read

# One route to one webhook. Short waits: a test should not sit out Alertmanager's 30 s
# production default before the first delivery or the resolved one.
CONFIG = """\
route:
  receiver: runbook
  group_by: [alertname, target]
  group_wait: 500ms
  group_interval: 1s
  repeat_interval: 1h
receivers:
  - name: runbook
    webhook_configs:
      - url: {url}
        send_resolved: true
        http_config:
          authorization:
            type: Bearer
            credentials_file: {credentials}
"""


class Alertmanager:
    """prometheus-alertmanager with no cluster gossip, its state in a temp dir, delivering every
    alert to webhook_url with the bearer token."""

    def __init__(self, webhook_url: str, token: str) -> None:
        self.webhook_url = webhook_url
        self.token = token
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="runbook-alertmanager-"))
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log(self) -> str:
        path = self.dir / "alertmanager.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def start(self) -> Alertmanager:
        credentials = self.dir / "token"
        credentials.write_text(self.token)
        credentials.chmod(0o600)
        config = self.dir / "alertmanager.yml"
        config.write_text(CONFIG.format(url=self.webhook_url, credentials=credentials))
        with (self.dir / "alertmanager.log").open("wb") as sink:
            self.proc = subprocess.Popen(
                [
                    ALERTMANAGER,
                    f"--config.file={config}",
                    f"--storage.path={self.dir / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--cluster.listen-address=",
                ],
                stdout=sink,
                stderr=subprocess.STDOUT,
            )
        if not poll(
            self._ready,
            what="Alertmanager to be ready",
            timeout_seconds=30,
            first_delay_seconds=0.1,
            max_delay_seconds=0.5,
        ).done:
            self.stop()
            raise RuntimeError(f"Alertmanager did not become ready: {self.log[-2000:]}")
        return self

    def _ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"Alertmanager exited {self.proc.returncode}: {self.log[-2000:]}")
        try:
            return httpx.get(f"{self.url}/-/ready", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def post(
        self,
        labels: dict[str, str],
        *,
        starts_at: datetime,
        ends_at: datetime | None = None,
        annotations: dict[str, str] | None = None,
    ) -> None:
        """Send an alert as Prometheus does, through Alertmanager's own API."""
        alert: dict[str, Any] = {
            "labels": labels,
            "annotations": annotations or {},
            "startsAt": starts_at.isoformat(),
            "generatorURL": "http://prometheus.invalid/graph",
        }
        if ends_at is not None:
            alert["endsAt"] = ends_at.isoformat()
        response = httpx.post(f"{self.url}/api/v2/alerts", json=[alert], timeout=TIMEOUT)
        assert response.status_code == 200, response.text

    def resolve(self, labels: dict[str, str], *, starts_at: datetime) -> None:
        """What Prometheus sends once the condition clears: the same alert, ended (now, which
        is the past when it arrives; Alertmanager refuses an end before the start)."""
        self.post(labels, starts_at=starts_at, ends_at=utcnow())

    def fingerprint(self, labels: dict[str, str]) -> str:
        """Alertmanager's fingerprint of the alert with exactly these labels."""
        found: list[str] = []

        def listed() -> bool:
            alerts = httpx.get(f"{self.url}/api/v2/alerts", timeout=TIMEOUT).json()
            found.extend(a["fingerprint"] for a in alerts if a["labels"] == labels)
            return bool(found)

        if not poll(
            listed,
            what="Alertmanager to list the alert",
            timeout_seconds=10,
            first_delay_seconds=0.1,
            max_delay_seconds=0.5,
        ).done:
            raise AssertionError(f"Alertmanager does not list an alert with labels {labels}")
        return found[0]

    def stop(self) -> None:
        stop_process(self.proc)
        shutil.rmtree(self.dir, ignore_errors=True)


def prefect_env(home: Path) -> dict[str, str]:
    """This environment without Prefect or runbook settings, Prefect's home in `home`."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "RUNBOOK_"))}
    return {
        **base,
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL": "WARNING",
    }


class PrefectServer:
    """`prefect server start` on a free port, its home in `home`, its database SQLite there
    unless `env` says otherwise (PREFECT_API_DATABASE_CONNECTION_URL); stopped by the test
    itself, so nothing outlives a serve that had to be killed."""

    def __init__(self, home: Path, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.home = home
        self.env = env or {}
        self.log = home / "server.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def start(self, timeout: float = 120) -> PrefectServer:
        self.home.mkdir(parents=True, exist_ok=True)
        prefect = str(Path(sys.executable).parent / "prefect")
        with self.log.open("wb") as sink:
            self.proc = subprocess.Popen(
                [prefect, "server", "start", "--host", "127.0.0.1", "--port", str(self.port)],
                env={**prefect_env(self.home), **self.env},
                stdout=sink,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

        def healthy() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"prefect server exited: {self.log.read_text()[-2000:]}")
            return api_healthy(self.api)

        if not poll(
            healthy,
            what="the prefect server to be healthy",
            timeout_seconds=timeout,
            max_delay_seconds=1,
        ).done:
            self.stop()
            raise RuntimeError(f"prefect server not healthy in {timeout} s: {self.log}")
        return self

    def stop(self) -> None:
        stop_process(self.proc)


class Serve:
    """`runbook serve` against the Prefect server at `api`, in its own session, its output in a
    file (an unread pipe would stall it)."""

    def __init__(self, config: Path, api: str, home: Path, env: dict[str, str]) -> None:
        self.api = api
        self.log = home / "serve.log"
        home.mkdir(parents=True, exist_ok=True)
        self.env = {
            **prefect_env(home),
            "PREFECT_API_URL": api,
            "RUNBOOK_CONFIG": str(config),
            **env,
        }
        self.cwd = home
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def start(self, ready: str, timeout: float = 120) -> Serve:
        """Start it and wait until its output has the line starting with `ready`."""
        runbook = str(Path(sys.executable).parent / "runbook")
        with self.log.open("wb") as sink:
            self.proc = subprocess.Popen(
                [runbook, "serve"],
                cwd=self.cwd,
                env=self.env,
                stdout=sink,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

        def started() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"runbook serve exited {self.proc.returncode}: {self.output}")
            return any(line.startswith(ready) for line in self.output.splitlines())

        if not poll(
            started,
            what="runbook serve to be ready",
            timeout_seconds=timeout,
            first_delay_seconds=0.2,
            max_delay_seconds=1,
        ).done:
            raise AssertionError(f"runbook serve did not print {ready!r}: {self.output}")
        return self

    def line(self, prefix: str) -> str:
        return next(line for line in self.output.splitlines() if line.startswith(prefix))

    def stop(self) -> str:
        """SIGTERM (serve ignores SIGINT in the background) and its output."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(90)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        return self.output

    def session_processes(self) -> list[str]:
        """Processes still in serve's session (the flow runs it spawned, a server it started)."""
        if self.proc is None:
            return []
        found = subprocess.run(
            ["pgrep", "-a", "-s", str(self.proc.pid)], capture_output=True, text=True
        )
        return found.stdout.splitlines()


def flow_runs(api: str, flow_name: str) -> list[dict[str, Any]]:
    response = httpx.post(
        f"{api}/flow_runs/filter",
        json={"flows": {"name": {"any_": [flow_name]}}, "limit": 200},
        timeout=TIMEOUT,
    )
    response.raise_for_status()
    runs: list[dict[str, Any]] = response.json()
    return runs


def events(api: str, name: str, resource_id: str) -> list[dict[str, Any]]:
    """The event feed (what the Prefect UI shows) for one event name and one resource."""
    response = httpx.post(
        f"{api}/events/filter",
        json={
            "filter": {"event": {"name": [name]}, "resource": {"id": [resource_id]}},
            "limit": 50,
        },
        timeout=TIMEOUT,
    )
    response.raise_for_status()
    found: list[dict[str, Any]] = response.json()["events"]
    return found


def automations(api: str) -> list[dict[str, Any]]:
    response = httpx.post(f"{api}/automations/filter", json={}, timeout=TIMEOUT)
    response.raise_for_status()
    found: list[dict[str, Any]] = response.json()
    return found


def port_open(port: int) -> bool:
    try:
        httpx.get(f"http://127.0.0.1:{port}/", timeout=1)
    except httpx.TransportError:
        return False
    return True
