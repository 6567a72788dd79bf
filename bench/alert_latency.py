"""Alert -> flow run Running: our receiver against Prefect's plain automation path.

One real Prefect server (started here, SQLite, temp home) and one `runbook serve` (the served
deployments with their triggers, and the receiver with dispatch = "direct") on a throwaway
PostgreSQL, in two phases, back to back:
  ours     POST /alerts/generic to the receiver, one alert per fingerprint; it starts the run
           of postgres-connections (a dry run) itself;
  prefect  emit_event("runbook.alert.dispatch") -> the deployment's DeploymentEventTrigger ->
           a flow run picked up by the served runner (PREFECT_RUNNER_POLL_FREQUENCY as given,
           Prefect's default 10 s unless --runner-poll) in a subprocess.
Latency is from just before the POST or the emit to the flow run's start_time (its Running
state) read back from the Prefect API; "created" is to the run's creation. Alerts arrive at
random intervals (seeded, 0.5-1.5x --interval) so they do not line up with the runner's polls;
nothing polls the API while alerts are being sent. The default 5 s keeps both paths below
saturation: at --interval 2 the served runner (a fresh subprocess per run, a few at once)
falls behind and its latency is queueing, growing with the number of alerts. The server runs
without its scheduler so scheduled runs do not land in the middle. Prints p50, p99 and max per
path and the ratios.

    .venv/bin/python bench/alert_latency.py [--alerts 50] [--interval 5] [--runner-poll 10]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="runbook-bench-alerts-")
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL"] = "CRITICAL"
os.environ.pop("PREFECT_API_URL", None)
# No scheduler in the server started here: scheduled runs landing in the middle would be noise.
os.environ["PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED"] = "false"

import httpx

from deployments.localpg import LocalPostgres, free_port, stop_process
from deployments.serve import start_server
from tasks.wait import poll

HOME = Path(os.environ["PREFECT_HOME"])  # the server's home, the inventory, serve's log
RUNBOOK, TARGET, ALERT = "postgres-connections", "main", "BenchAlert"
WARMUP = 3
FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}

CONFIG = """\
[postgres.main]
dsn = "{dsn}"

[receiver]
listen = "127.0.0.1:{port}"
token = "{token}"
dispatch = "direct"
max_runs_per_hour = 100000
state_file = "{state}"

[[routes]]
alert = "{alert}"
runbook = "{runbook}"
target = "{target}"
apply = false
"""


@dataclass
class Sent:
    at: datetime
    flow_run_id: str | None = None


def api_json(method: str, url: str, **kwargs: Any) -> Any:
    for _ in range(5):  # SQLite busy under a burst of runs: 503, try again
        response = httpx.request(method, url, timeout=30, **kwargs)
        if response.status_code != 503:
            break
        time.sleep(1)
    response.raise_for_status()
    return response.json() if response.content else None


def pace(rng: random.Random, interval: float) -> None:
    time.sleep(rng.uniform(0.5 * interval, 1.5 * interval))


def send_ours(
    receiver: str, token: str, n: int, tag: str, rng: random.Random, interval: float
) -> list[Sent]:
    sent = []
    headers = {"Authorization": f"Bearer {token}"}
    with httpx.Client(timeout=30, headers=headers) as client:
        for i in range(n):
            body = {
                "alerts": [
                    {
                        "name": ALERT,
                        "status": "firing",
                        "labels": {"severity": "critical"},
                        "annotations": {},
                        "fingerprint": f"bench-{tag}-{i}",
                    }
                ]
            }
            at = datetime.now(UTC)
            response = client.post(f"{receiver}/alerts/generic", json=body)
            assert response.status_code == 202, response.text
            (outcome,) = response.json()["alerts"]
            assert outcome["outcome"] == "started", outcome
            sent.append(Sent(at, outcome["flow_run_id"]))
            pace(rng, interval)
    return sent


def send_prefect(n: int, tag: int, rng: random.Random, interval: float) -> list[Sent]:
    """Each event's params.max_backends_ended (harmless in a dry run) says which run it made."""
    from prefect.events import emit_event

    sent = []
    for i in range(n):
        at = datetime.now(UTC)
        emit_event(
            "runbook.alert.dispatch",
            resource={
                "prefect.resource.id": f"runbook.alert.bench-prefect-{tag}-{i}",
                "prefect.resource.name": ALERT,
                "runbook.alert": ALERT,
                "runbook.runbook": RUNBOOK,
                "runbook.target": TARGET,
            },
            payload={
                "parameters": {
                    "target": TARGET,
                    "dry_run": True,
                    "approval": "never",
                    "params": {"max_backends_ended": tag + i},
                }
            },
        )
        sent.append(Sent(at))
        pace(rng, interval)
    return sent


def runs_of(api: str) -> list[dict[str, Any]]:
    runs: list[dict[str, Any]] = api_json(
        "POST",
        f"{api}/flow_runs/filter",
        json={"flows": {"name": {"any_": [RUNBOOK]}}, "limit": 200},
    )
    return runs


def settle(api: str, expected: int, timeout: float = 180) -> list[dict[str, Any]]:
    """All runs once `expected` of them exist and every one has ended."""
    found: list[dict[str, Any]] = []

    def done() -> bool:
        try:
            found[:] = runs_of(api)
        except httpx.HTTPError:  # a server busy recording a burst of runs answers late
            return False
        return len(found) >= expected and all(r["state_type"] in FINAL for r in found)

    if not poll(done, what="the runs to settle", timeout_seconds=timeout, max_delay_seconds=2).done:
        states = statistics.multimode(r["state_type"] for r in found)
        raise SystemExit(f"runs did not settle: {len(found)}/{expected}, mostly {states}")
    return found


def when(run: dict[str, Any], field: str) -> datetime:
    value = run[field]
    assert value, f"flow run {run['id']} has no {field} (state {run['state_type']})"
    return datetime.fromisoformat(value)


def latencies(sent: list[Sent], runs: list[dict[str, Any]], field: str) -> list[float]:
    return [(when(run, field) - s.at).total_seconds() for s, run in zip(sent, runs, strict=True)]


def stats(values: list[float]) -> tuple[float, float, float]:
    p99 = statistics.quantiles(values, n=100, method="inclusive")[98]
    return statistics.median(values), p99, max(values)


def measure(
    alerts: int, interval: float = 5.0, runner_poll: int | None = None, seed: int = 7
) -> dict[str, Any]:
    """Both paths measured (module docstring): per path, seconds to the run's creation and to
    Running as [p50, p99, max], and the runs that did not complete."""
    rng = random.Random(seed)
    token = secrets.token_urlsafe(24)
    with ExitStack() as stack:
        stack.callback(shutil.rmtree, HOME, True)
        pg = LocalPostgres().start()
        stack.callback(pg.stop)
        api = start_server("127.0.0.1", free_port(), stack)
        os.environ["PREFECT_API_URL"] = api
        receiver_port = free_port()
        config = HOME / "runbook.toml"
        config.write_text(
            CONFIG.format(
                dsn=pg.create_database("bench"),
                port=receiver_port,
                token=token,
                state=HOME / "alerts.sqlite",
                alert=ALERT,
                runbook=RUNBOOK,
                target=TARGET,
            )
        )
        env = {**os.environ, "RUNBOOK_CONFIG": str(config)}
        if runner_poll is not None:
            env["PREFECT_RUNNER_POLL_FREQUENCY"] = str(runner_poll)
        log = HOME / "serve.log"
        with log.open("wb") as sink:
            serve = subprocess.Popen(
                [str(Path(sys.executable).parent / "runbook"), "serve"],
                cwd=HOME,
                env=env,
                stdout=sink,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        stack.callback(stop_process, serve, 60)  # SIGTERM: serve ignores SIGINT when detached

        def ready() -> bool:
            if serve.poll() is not None:
                raise SystemExit(f"runbook serve exited: {log.read_text()[-3000:]}")
            automations = api_json("POST", f"{api}/automations/filter", json={})
            return "Alert receiver at" in log.read_text() and any(
                a["name"] == f"{RUNBOOK}/{TARGET}: alert" for a in automations
            )

        if not poll(ready, what="runbook serve to be ready", timeout_seconds=120).done:
            raise SystemExit(f"runbook serve not ready: {log.read_text()[-3000:]}")
        receiver = f"http://127.0.0.1:{receiver_port}"
        n = alerts

        # Warm-up runs on both paths (first imports, first subprocess), then the measured ones.
        send_ours(receiver, token, WARMUP, "warmup", rng, interval)
        send_prefect(WARMUP, 900, rng, interval)
        settle(api, 2 * WARMUP)
        before = {r["id"] for r in runs_of(api)}

        ours_sent = send_ours(receiver, token, n, "ours", rng, interval)
        runs = {r["id"]: r for r in settle(api, len(before) + n)}
        ours_runs = [runs[s.flow_run_id] for s in ours_sent if s.flow_run_id]
        before |= set(runs)

        prefect_sent = send_prefect(n, 0, rng, interval)
        fresh = [r for r in settle(api, len(before) + n) if r["id"] not in before]
        by_tag = {r["parameters"]["params"]["max_backends_ended"]: r for r in fresh}
        prefect_runs = [by_tag[i] for i in range(n)]

    failed = [r["id"] for r in ours_runs + prefect_runs if r["state_type"] != "COMPLETED"]
    figures: dict[str, Any] = {"alerts": n, "interval": interval, "runner_poll": runner_poll or 10}
    for name, (sent, path_runs) in {
        "ours": (ours_sent, ours_runs),
        "prefect": (prefect_sent, prefect_runs),
    }.items():
        figures[name] = {
            label: stats(latencies(sent, path_runs, field))
            for field, label in (("created", "created"), ("start_time", "running"))
        }
    figures["failed"] = failed
    return figures


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--alerts", type=int, default=50)
    parser.add_argument("--interval", type=float, default=5.0, help="mean seconds between alerts")
    parser.add_argument(
        "--runner-poll", type=int, default=None, help="seconds; Prefect's default 10"
    )
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--json", action="store_true", help="one JSON line of figures")
    args = parser.parse_args()
    figures = measure(args.alerts, args.interval, args.runner_poll, args.seed)
    if args.json:
        print(json.dumps(figures))
        return
    names = {
        "ours": "ours (receiver, direct)",
        "prefect": f"prefect (event -> trigger -> runner, poll {figures['runner_poll']} s)",
    }
    print(
        f"alert -> flow run, {figures['alerts']} alerts per path, mean interval "
        f"{figures['interval']} s (seconds)"
    )
    print(f"{'path':<48} {'to':<8} {'p50':>6} {'p99':>6} {'max':>6}")
    for key, name in names.items():
        for label, shown in (("created", "created"), ("running", "Running")):
            p50, p99, top = figures[key][label]
            print(f"{name:<48} {shown:<8} {p50:6.2f} {p99:6.2f} {top:6.2f}")
    o50, o99, _ = figures["ours"]["running"]
    p50, p99, _ = figures["prefect"]["running"]
    print(f"prefect / ours to Running: p50 {p50 / o50:.1f}x, p99 {p99 / o99:.1f}x")
    print(
        f"targets for ours: p50 <= 1 s {'met' if o50 <= 1 else 'MISSED'}, "
        f"p99 <= 3 s {'met' if o99 <= 3 else 'MISSED'}"
    )
    if figures["failed"]:
        print(f"runs that did not complete: {figures['failed']}")


if __name__ == "__main__":
    main()
