"""`runbook serve`: one process that serves every runbook as a Prefect deployment.

Uses the Prefect API in PREFECT_API_URL, or one already answering on host:port, or starts an
embedded one (SQLite, UI at http://host:port). With no inventory configured it brings up the
sandbox. Ctrl-C or SIGTERM stops everything it started."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack, suppress
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from deployments import sandbox
from deployments.localpg import stop_process
from flows.catalog import RUNBOOKS
from tasks.errors import ConfigError, TargetError
from tasks.settings import ENV_PREFIX, Settings, load_settings

if TYPE_CHECKING:
    from prefect.deployments.runner import RunnerDeployment

SERVER_START_TIMEOUT = 120


def api_healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def start_server(host: str, port: int, stack: ExitStack) -> str:
    url = f"http://{host}:{port}/api"
    if api_healthy(url):
        print(f"Using the Prefect server already at {url}", flush=True)
        return url
    prefect = shutil.which("prefect", path=str(Path(sys.executable).parent)) or "prefect"
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    # A file, not a pipe: an unread pipe fills up and stalls the server's scheduler.
    log = Path(tempfile.mkdtemp(prefix="runbook-prefect-server-")) / "server.log"
    with log.open("wb") as sink:
        proc = subprocess.Popen(
            [prefect, "server", "start", "--host", host, "--port", str(port)],
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    stack.callback(stop_process, proc)
    deadline = time.monotonic() + SERVER_START_TIMEOUT
    while not api_healthy(url):
        if proc.poll() is not None:
            detail = log.read_text(errors="replace")[-2000:].strip()
            raise TargetError(
                f"the Prefect server did not start (exit {proc.returncode}): "
                f"{detail}; is port {port} free? (--port)"
            )
        if time.monotonic() > deadline:
            raise TargetError(
                f"the Prefect server did not answer at {url} within "
                f"{SERVER_START_TIMEOUT} s; its log: {log}"
            )
        time.sleep(0.5)
    print(f"Prefect server and UI at http://{host}:{port}", flush=True)
    return url


# What the receiver emits, in trigger mode, for an alert routed to a runbook and target.
ALERT_DISPATCH_EVENT = "runbook.alert.dispatch"


def _from_event(field: str) -> dict[str, Any]:
    """A parameter taken from the dispatch event's payload with its JSON type: a bare
    template renders to a string, and a plain {"__prefect_kind": "json", "value": "{{ ... }}"}
    is parsed before it is rendered (InvalidJSON), so the JSON kind wraps a Jinja kind."""
    template = "{{ event.payload.parameters." + field + " | tojson }}"
    return {"__prefect_kind": "json", "value": {"__prefect_kind": "jinja", "template": template}}


def alert_trigger_spec(runbook: str, target: str) -> dict[str, Any]:
    """The deployment trigger of one runbook on one target, as prefect.yaml spells it.

    The target is the deployment's own, not a template: the match already requires the
    event's runbook.target to be it, and nothing from an alert's labels is rendered into it."""
    return {
        "name": f"{runbook}/{target}: alert",
        "expect": [ALERT_DISPATCH_EVENT],
        "match": {"runbook.runbook": runbook, "runbook.target": target},
        "parameters": {
            "target": target,
            "dry_run": _from_event("dry_run"),
            "approval": _from_event("approval"),
            "params": _from_event("params"),
        },
    }


def build_deployments(settings: Settings, *, in_sandbox: bool) -> list[RunnerDeployment]:
    from prefect.events import DeploymentEventTrigger
    from prefect.schedules import Cron

    deployments: list[RunnerDeployment] = []
    for rb in RUNBOOKS.values():
        flow = rb.load()
        for target in rb.targets(settings):
            deployments.append(
                flow.to_deployment(  # type: ignore[arg-type]  # sync outside an event loop
                    name=target,
                    schedule=None
                    if rb.cron is None
                    else Cron(sandbox.CRON if in_sandbox else rb.cron, timezone="UTC"),
                    parameters={
                        "target": target,
                        **(sandbox.PARAMETERS if in_sandbox else rb.scheduled),
                    },
                    description=rb.purpose,
                    tags=["runbook", rb.inventory] + (["sandbox"] if in_sandbox else []),
                    # Always served: only the receiver's trigger mode emits the event.
                    triggers=[
                        DeploymentEventTrigger.model_validate(alert_trigger_spec(rb.name, target))
                    ],
                )
            )
    return deployments


def has_inventory(settings: Settings) -> bool:
    return bool(settings.postgres or settings.redis)


def serve_all(host: str, port: int) -> None:
    with ExitStack() as stack:
        settings = load_settings()
        in_sandbox = not has_inventory(settings)
        if in_sandbox:
            print(
                "No inventory configured: starting the sandbox (a local PostgreSQL with "
                "planted incidents)",
                flush=True,
            )
            box = sandbox.Sandbox().start()
            stack.callback(box.stop)
            os.environ[f"{ENV_PREFIX}CONFIG"] = str(box.config)
            settings = load_settings(box.config)
            print(f"Sandbox inventory: {box.config}", flush=True)
        if not os.environ.get("PREFECT_API_URL"):
            os.environ["PREFECT_API_URL"] = start_server(host, port, stack)
        os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
        deployments = build_deployments(settings, in_sandbox=in_sandbox)
        if not deployments:
            raise ConfigError("no runbook has a target in the inventory: see README, Configuration")
        from prefect import serve

        from deployments.receiver import start_receiver

        start_receiver(settings, stack)
        with suppress(KeyboardInterrupt):
            serve(*deployments)
        print("Stopping: everything started here is being shut down", flush=True)
