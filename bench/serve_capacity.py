"""Scheduled diagnose runs a minute that one machine sustains: `runbook serve`'s in-process runner
against Prefect's own served path (a new process per run), on the same embedded SQLite server.

For each path, on a quiet machine and then beside a CPU-bound load on every core: a fresh
`prefect server start` (SQLite, temp home), a throwaway PostgreSQL, and --deployments
deployments of postgres-connections (a dry run, the real diagnosis) each on a one-minute
interval schedule, so --deployments runs are due every minute. The path under test serves them
from a subprocess for --minutes after a one-minute warm-up. Measured from the Prefect API and
/proc afterwards, over the runs due in the window:
  runs/min    runs that started, per minute of the window
  late p50/p99  start_time - expected_start_time (a run still not started at the end counts as
              late by the time it waited)
  crashed     runs Crashed (or "could not start"); skipped: runs our runner superseded
  api p99     POST /api/flow_runs/filter (limit 5), once a second through the window
  cpu s/run   CPU seconds of the server, the serving process and its children, per run
  peak MiB    highest sum of RSS of the server, the serving process and its children

    .venv/bin/python bench/serve_capacity.py [--deployments 60] [--minutes 10] [--max-runs 8]
        [--paths ours,prefect] [--loads quiet,cpu] [--stagger]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def worker(mode: str, count: int, max_runs: int, stagger: bool) -> None:
    """Serve `count` deployments of postgres-connections until SIGTERM: all due at the same
    second each minute (a burst, as crons on the same minute are), or spread evenly over the
    minute (stagger)."""
    from datetime import UTC, datetime

    from prefect import get_client
    from prefect.schedules import Interval

    from deployments.runner import InProcessRunner
    from flows.postgres_connections import postgres_connections

    deployments = [
        postgres_connections.to_deployment(
            name=f"bench-{n:03d}",
            schedule=Interval(
                timedelta(minutes=1),
                anchor_date=datetime(2026, 1, 1, tzinfo=UTC)
                + timedelta(seconds=60 * n / count if stagger else 0),
            ),
            parameters={"target": "main", "dry_run": True},
        )
        for n in range(count)
    ]
    if mode == "prefect":
        from prefect import serve

        serve(*deployments, print_starting_message=False)  # type: ignore[arg-type]
        return
    import signal

    runner = InProcessRunner(
        [(d, postgres_connections) for d in deployments],  # type: ignore[misc]
        max_runs=max_runs,
    )
    signal.signal(signal.SIGTERM, lambda *_: runner.request_stop())
    with get_client(sync_client=True) as client:
        runner.register(client)
        runner.serve(client)
        runner.stop(client)


def cpu_seconds(pid: int) -> float:
    """utime + stime of pid and of its children it has waited for."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = sum(int(fields[i]) for i in (11, 12, 13, 14))
    return ticks / os.sysconf("SC_CLK_TCK")


def tree_rss_mib(pids: list[int]) -> float:
    """The RSS of these processes and all their descendants, MiB."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            stat = (proc / "stat").read_text().rsplit(")", 1)[1].split()
            status = (proc / "status").read_text()
        except OSError:
            continue
        children.setdefault(int(stat[1]), []).append(int(proc.name))
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                rss[int(proc.name)] = int(line.split()[1])
    total, todo = 0, list(pids)
    while todo:
        pid = todo.pop()
        total += rss.get(pid, 0)
        todo += children.get(pid, [])
    return total / 1024


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def measure(mode: str, load: bool, args: argparse.Namespace, config: Path) -> dict[str, Any]:
    import httpx

    from deployments.localpg import free_port, stop_process
    from deployments.serve import start_server

    home = Path(tempfile.mkdtemp(prefix=f"runbook-bench-serve-{mode}-"))
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "RUNBOOK_"))},
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL": "CRITICAL",
        "RUNBOOK_CONFIG": str(config),
    }
    with ExitStack() as stack:
        os.environ["PREFECT_HOME"] = str(home)
        api = start_server("127.0.0.1", free_port(), stack)
        server_pid = int(
            subprocess.run(
                ["pgrep", "-n", "-f", f"prefect server start.*{api.split(':')[2].split('/')[0]}"],
                capture_output=True,
                text=True,
            ).stdout.split()[0]
        )
        env["PREFECT_API_URL"] = api
        log = (home / "worker.log").open("wb")
        proc = subprocess.Popen(
            [
                sys.executable,
                __file__,
                "--worker",
                mode,
                "--deployments",
                str(args.deployments),
                "--max-runs",
                str(args.max_runs),
                *(["--stagger"] if args.stagger else []),
            ],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        stack.callback(stop_process, proc, 60)
        hogs: list[subprocess.Popen[bytes]] = []
        if load:
            for _ in range(os.cpu_count() or 2):
                hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
                hogs.append(hog)
                stack.callback(hog.kill)
        time.sleep(60)  # warm-up: deployments registered, first runs scheduled
        start = datetime.now(UTC)
        cpu0 = cpu_seconds(server_pid) + cpu_seconds(proc.pid)
        latencies: list[float] = []
        peak = 0.0
        stop = threading.Event()

        def probe() -> None:
            with httpx.Client(base_url=api, timeout=120) as http:
                while not stop.is_set():
                    t = time.monotonic()
                    try:
                        http.post("/flow_runs/filter", json={"limit": 5})
                        latencies.append(time.monotonic() - t)
                    except httpx.HTTPError:
                        latencies.append(120.0)
                    stop.wait(1)

        prober = threading.Thread(target=probe, daemon=True)
        prober.start()
        end_at = time.monotonic() + args.minutes * 60
        while time.monotonic() < end_at:
            peak = max(peak, tree_rss_mib([server_pid, proc.pid]))
            time.sleep(2)
        end = datetime.now(UTC)
        cpu = cpu_seconds(server_pid) + cpu_seconds(proc.pid) - cpu0
        stop.set()
        for hog in hogs:
            hog.kill()
        prober.join()
        runs = read_runs(api, start, end)
        stop_process(proc, 60)
        log.close()
    # The runs read are those due in [start, end - 30 s] (read_runs): rates are over that span.
    window_min = (end - start - timedelta(seconds=30)).total_seconds() / 60
    started = [r for r in runs if r["start_time"]]
    late = [
        (
            datetime.fromisoformat(r["start_time"] or end.isoformat())
            - datetime.fromisoformat(r["expected_start_time"])
        ).total_seconds()
        for r in runs
        if r["state_name"] != "Skipped"
    ]
    return {
        "path": mode,
        "load": "cpu load" if load else "quiet",
        "due": len(runs),
        "runs/min": len(started) / window_min,
        "late p50": pct(late, 0.5),
        "late p99": pct(late, 0.99),
        "crashed": sum(r["state_type"] == "CRASHED" for r in runs),
        "skipped": sum(r["state_name"] == "Skipped" for r in runs),
        "api p99": pct(latencies, 0.99),
        "cpu s/run": cpu / max(1, len(started)),
        "peak MiB": peak,
    }


def read_runs(api: str, start: datetime, end: datetime) -> list[dict[str, Any]]:
    """Runs expected to start in [start, end - 30 s]: each had time to start."""
    import httpx

    runs: list[dict[str, Any]] = []
    body: dict[str, Any] = {
        "flow_runs": {
            "expected_start_time": {
                "after_": start.isoformat(),
                "before_": (end - timedelta(seconds=30)).isoformat(),
            }
        },
        "limit": 200,
    }
    with httpx.Client(base_url=api, timeout=300) as http:
        while True:
            page = http.post("/flow_runs/filter", json={**body, "offset": len(runs)}).json()
            runs += page
            if len(page) < 200:
                return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--deployments", type=int, default=60)
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--max-runs", type=int, default=8, help="runbook serve's --max-runs")
    parser.add_argument(
        "--paths", default="ours,prefect", help="which paths to measure (ours, prefect)"
    )
    parser.add_argument("--loads", default="quiet,cpu", help="quiet, cpu (a CPU-bound load)")
    parser.add_argument(
        "--stagger", action="store_true", help="spread the runs over the minute, not a burst"
    )
    parser.add_argument("--worker", choices=["ours", "prefect"])
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.deployments, args.max_runs, args.stagger)
        return
    from deployments.localpg import LocalPostgres

    pg = LocalPostgres().start()
    config = pg.dir / "runbook.toml"
    config.write_text(f'[postgres.main]\ndsn = "{pg.dsn}"\n')
    try:
        rows = [
            measure(mode, load == "cpu", args, config)
            for load in args.loads.split(",")
            for mode in args.paths.split(",")
        ]
    finally:
        pg.stop()
    keys = list(rows[0])
    print(" | ".join(f"{k:>10}" for k in keys))
    for row in rows:
        print(
            " | ".join(
                f"{v:>10.2f}" if isinstance(v, float) else f"{v!s:>10}" for v in row.values()
            )
        )
    for load in ("quiet", "cpu load"):
        if not {("ours", load), ("prefect", load)} <= {(r["path"], r["load"]) for r in rows}:
            continue
        ours, theirs = (
            next(r for r in rows if r["path"] == path and r["load"] == load)
            for path in ("ours", "prefect")
        )
        print(
            f"{load}: runs/min {ours['runs/min'] / max(theirs['runs/min'], 1e-9):.2f}x, "
            f"cpu s/run {ours['cpu s/run'] / max(theirs['cpu s/run'], 1e-9):.2f}x, "
            f"late p99 {ours['late p99']:.1f} s vs {theirs['late p99']:.1f} s, "
            f"peak MiB {ours['peak MiB'] / max(theirs['peak MiB'], 1e-9):.2f}x of Prefect's"
        )


if __name__ == "__main__":
    main()
