"""The alert receiver under a burst: 10,000 alerts of 2,000 fingerprints (repeats and resolves
interleaved, Alertmanager v4 notifications of 10 alerts, one group's after another's answer,
from 8 senders at once: tests/burst.py) with storm control on, against a trivial endpoint.

ours      `runbook receiver` as a process (its peak RSS is its own), dispatch "direct" alone:
          each started run is created through its deployment on a real Prefect server
          (`prefect server start`, SQLite, temp home, no scheduler); no worker, so the runs stay
          Scheduled and nothing else loads the server. Storm control on SQLite (the default,
          state_file) or, with --store postgres, on a throwaway PostgreSQL (state_dsn). Window
          3600 s, no cap: every firing episode must start exactly one run.
baseline  the same notifications, the same senders, POSTed to a FastAPI app under uvicorn in a
          process of its own that only parses each body with the receiver's payload model
          (AlertmanagerPayload) and answers 202: HTTP and parsing, without credentials, storm
          control, runs, events or log lines.

Checked, or the script exits 1: every answer a 202 with each alert's expected outcome, every
delivery recorded in the store (its rows read back), one flow run per firing episode in the
Prefect API (and the same ids answered and recorded), no run from a resolve. Measured: alerts/s
(all alerts over the senders' wall time), p50/p99 of a notification's response time, the
process's peak RSS (VmHWM), and for ours what bounds it: the receiver's and the Prefect
server's CPU seconds.

    .venv/bin/python bench/receiver_burst.py [--alerts 10000] [--fingerprints 2000]
        [--senders 8] [--store sqlite|postgres] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import uuid
from contextlib import ExitStack
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="runbook-bench-burst-")
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL"] = "CRITICAL"
os.environ.pop("PREFECT_API_URL", None)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/

import httpx
import psycopg
from fastapi import FastAPI, Request  # module level: the baseline's annotations resolve here
from fastapi.responses import JSONResponse

from deployments.localpg import LocalPostgres, free_port, stop_process
from tasks.wait import poll
from tests.alertmanager_helpers import PrefectServer, prefect_env
from tests.burst import Burst, Delivery, deployment_run_ids, make_burst, problems, send

HOME = Path(os.environ["PREFECT_HOME"])
BENCH = Path(__file__).resolve()
RUNBOOK_CLI = str(Path(sys.executable).parent / "runbook")
RUNBOOK = "postgres-connections"
TOKEN = "bench-burst-token"
PATH = "/alerts/alertmanager"

CONFIG = """\
[postgres.main]
dsn = "postgresql://bench@127.0.0.1:1/bench"

[receiver]
listen = "127.0.0.1:{port}"
token = "{token}"
{store}
dedup_window_seconds = 3600
max_runs_per_hour = 100000
dispatch = "direct"

[[routes]]
alert = "IdleInTransaction"
matchers = {{ severity = "critical" }}
runbook = "postgres-connections"
target_label = "target"
apply = false
"""


def baseline_app() -> Any:
    """The baseline: parse the notification with the receiver's model, answer 202."""
    from deployments.alert_routes import AlertmanagerPayload

    app = FastAPI()

    @app.post(PATH)
    async def receive(request: Request) -> JSONResponse:
        payload = AlertmanagerPayload.model_validate_json(await request.body())
        return JSONResponse({"alerts": len(payload.alerts)}, status_code=202)

    return app


def serve_baseline(port: int) -> None:
    import uvicorn

    HOME.rmdir()  # this process's own, made at import: nothing goes there
    uvicorn.run(baseline_app(), host="127.0.0.1", port=port, log_level="warning", access_log=False)


def proc_figures(pid: int) -> tuple[float, float]:
    """A process's peak RSS (MiB) and CPU seconds (user + system), from /proc."""
    status = Path(f"/proc/{pid}/status").read_text()
    hwm = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM"))
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return hwm / 1024, (int(fields[11]) + int(fields[12])) / ticks


def tree_cpu(pid: int) -> float:
    """CPU seconds of a process and its live descendants (the Prefect server's uvicorn)."""
    total = 0.0
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            total += proc_figures(p)[1]
        except (OSError, StopIteration):
            continue
        todo.extend(children.get(p, []))
    return total


def wait_healthy(proc: subprocess.Popen[bytes], url: str, log: Path) -> None:
    def up() -> bool:
        if proc.poll() is not None:
            raise SystemExit(f"{url} exited: {log.read_text()[-2000:]}")
        try:
            return httpx.get(url, timeout=1).status_code < 500
        except httpx.HTTPError:
            return False

    if not poll(
        up, what=url, timeout_seconds=120, first_delay_seconds=0.1, max_delay_seconds=0.2
    ).done:
        raise SystemExit(f"{url} did not answer in 120 s")


def figures(burst: Burst, delivery: Delivery, rss: float) -> dict[str, Any]:
    p50, p99 = delivery.latency()
    return {
        "seconds": delivery.seconds,
        "alerts_per_second": burst.alerts / delivery.seconds,
        "p50": p50,
        "p99": p99,
        "peak_rss_mib": rss,
        # notifications sent again after a 503 (the receiver's: a run the API could not take)
        "resent": len(delivery.sent) - burst.payloads,
    }


def run_baseline(burst: Burst, senders: int) -> dict[str, Any]:
    port = free_port()
    log = HOME / "baseline.log"
    with log.open("wb") as sink:
        proc = subprocess.Popen(
            [sys.executable, str(BENCH), "--baseline-server", str(port)],
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=BENCH.parent.parent,
        )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(proc, f"{url}/docs", log)
        delivery = send(url + PATH, burst, senders, {})
        bad = [s for s in delivery.sent if s.status != 202]
        if bad:
            raise SystemExit(f"baseline answered {bad[0].status}: {str(bad[0].body)[:300]}")
        rss, _ = proc_figures(proc.pid)
        return figures(burst, delivery, rss)
    finally:
        stop_process(proc)


def register_deployment(api: str) -> str:
    from prefect.deployments.runner import RunnerDeployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from deployments.catalog import RUNBOOKS

    with temporary_settings(updates={PREFECT_API_URL: api}):
        made = RUNBOOKS[RUNBOOK].load().to_deployment(name="main", parameters={"target": "main"})
        assert isinstance(made, RunnerDeployment), type(made)
        return str(made.apply())


def store_rows(where: Path | str) -> list[tuple[str, str, str, str | None]]:
    query = "SELECT fingerprint, status, outcome, flow_run_id FROM deliveries ORDER BY id"
    if isinstance(where, Path):
        with sqlite3.connect(where) as db:
            return db.execute(query).fetchall()
    with psycopg.connect(where, options="-c search_path=runbook_receiver") as conn:
        return conn.execute(query).fetchall()


def run_ours(burst: Burst, senders: int, store: str, stack: ExitStack) -> dict[str, Any]:
    server = PrefectServer(
        HOME / "prefect", env={"PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED": "false"}
    ).start()
    stack.callback(server.stop)
    deployment = register_deployment(server.api)
    where: Path | str
    if store == "postgres":
        pg = LocalPostgres().start()
        stack.callback(pg.stop)
        where = pg.create_database("burst")
        state = f'state_dsn = "{where}"'
    else:
        where = HOME / "alerts.sqlite"
        state = f'state_file = "{where}"'
    port = free_port()
    config = HOME / "runbook.toml"
    config.write_text(CONFIG.format(port=port, token=TOKEN, store=state))
    log = HOME / "receiver.log"
    env = prefect_env(HOME / "receiver") | {
        "PREFECT_API_URL": server.api,
        "RUNBOOK_CONFIG": str(config),
    }
    with log.open("wb") as sink:
        proc = subprocess.Popen(
            [RUNBOOK_CLI, "receiver"],
            stdout=sink,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    stack.callback(stop_process, proc)
    url = f"http://127.0.0.1:{port}"
    wait_healthy(proc, f"{url}/healthz", log)
    assert server.proc is not None
    _, receiver_cpu = proc_figures(proc.pid)
    server_cpu = tree_cpu(server.proc.pid)
    since = datetime.now(UTC)
    delivery = send(url + PATH, burst, senders, {"Authorization": f"Bearer {TOKEN}"})
    rss, receiver_cpu_after = proc_figures(proc.pid)
    server_cpu_after = tree_cpu(server.proc.pid)
    found = problems(
        burst, delivery, store_rows(where), deployment_run_ids(server.api, deployment, since)
    )
    result = figures(burst, delivery, rss) | {
        "receiver_cpu": receiver_cpu_after - receiver_cpu,
        "prefect_server_cpu": server_cpu_after - server_cpu,
        "runs": burst.outcomes["started"],
        "outcomes": dict(burst.outcomes),
        "store": store,
        "problems": found,
        "log": str(log),
    }
    return result


def measure(alerts: int, fingerprints: int, senders: int, store: str) -> dict[str, Any]:
    burst = make_burst(alerts, fingerprints, tag=uuid.uuid4().hex[:8])
    baseline = run_baseline(burst, senders)
    with ExitStack() as stack:
        ours = run_ours(burst, senders, store, stack)
    return {
        "alerts": alerts,
        "fingerprints": fingerprints,
        "payloads": burst.payloads,
        "senders": senders,
        "ours": ours,
        "baseline": baseline,
    }


def table(f: dict[str, Any]) -> str:
    ours, base = f["ours"], f["baseline"]
    rows = [
        ("alerts/s", "alerts_per_second", "{:.0f}"),
        ("response p50 (s)", "p50", "{:.3f}"),
        ("response p99 (s)", "p99", "{:.3f}"),
        ("peak RSS (MiB)", "peak_rss_mib", "{:.0f}"),
        ("wall (s)", "seconds", "{:.1f}"),
    ]
    out = [
        f"{f['alerts']} alerts, {f['fingerprints']} fingerprints, {f['payloads']} notifications "
        f"from {f['senders']} senders; storm control on {ours['store']}; "
        f"{ours['runs']} runs due, outcomes {ours['outcomes']}",
        f"{'':<18}{'receiver':>10}{'baseline':>10}{'ratio':>10}",
    ]
    for label, key, form in rows:
        out.append(
            f"{label:<18}{form.format(ours[key]):>10}{form.format(base[key]):>10}"
            f"{ours[key] / base[key]:>9.2f}x"
        )
    out.append(f"notifications sent again after a 503: {ours['resent']}")
    out.append(
        f"bounded by: receiver CPU {ours['receiver_cpu']:.1f} s, Prefect server CPU "
        f"{ours['prefect_server_cpu']:.1f} s in {ours['seconds']:.1f} s wall"
    )
    out.append("checks: " + ("all passed" if not ours["problems"] else "; ".join(ours["problems"])))
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--alerts", type=int, default=10_000)
    parser.add_argument("--fingerprints", type=int, default=2_000)
    parser.add_argument("--senders", type=int, default=8)
    parser.add_argument("--store", choices=["sqlite", "postgres"], default="sqlite")
    parser.add_argument("--json", action="store_true", help="the figures as JSON, last line")
    parser.add_argument("--baseline-server", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.baseline_server:
        serve_baseline(args.baseline_server)
        return
    result = measure(args.alerts, args.fingerprints, args.senders, args.store)
    print(table(result), flush=True)
    if args.json:
        print(json.dumps(result), flush=True)
    if result["ours"]["problems"]:
        sys.exit(f"checks failed; the receiver's log: {result['ours']['log']}")
    shutil.rmtree(HOME, ignore_errors=True)


if __name__ == "__main__":
    main()
