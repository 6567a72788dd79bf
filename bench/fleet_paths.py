"""Fleet runs against hand-written concurrent scripts doing the same checks (issue 18, item 6).

On one real Prefect server (`prefect server start`, SQLite, a temp home):
  postgres  the `fleet` flow running postgres-connections (a dry run) over N databases of ONE
            local PostgreSQL, at --concurrency at once, against a ThreadPoolExecutor of the same
            size running connections_overhead.plain (connect, now()/max_connections and the
            pg_stat_activity query, the same findings) per database;
  tls       the `fleet` flow running tls-certificates (a dry run, one target per endpoint) over
            N local TLS endpoints, some dead (half never answer, half closed ports), against a
            ThreadPoolExecutor of the same size doing a plain ssl connect + handshake +
            getpeercert per endpoint, both with the same handshake timeout.
Each side is warmed up once (a fleet of two targets, the script on two) and then timed once.
What bounds the fleet is measured while it runs: the Prefect server's CPU seconds (its process
tree, from /proc) per flow or task run it recorded, this process's CPU seconds, and each
target's run (its report's started_at -> finished_at) against one check of the script.

    .venv/bin/python bench/fleet_paths.py [--databases 200] [--endpoints 500] [--dead 25]
        [--concurrency 10] [--timeout 1] [--only postgres|tls] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import ssl
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="runbook-bench-"))
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL"] = "CRITICAL"

import httpx
from fleet_trace import Trace, server_log_summary

from deployments.localpg import LocalPostgres, free_port
from deployments.localtls import CA, Servers
from tests.alertmanager_helpers import PrefectServer

TICKS = os.sysconf("SC_CLK_TCK")


def tree_cpu(pid: int) -> float:
    """CPU seconds (user + system) of process `pid` and its live descendants, from /proc."""
    parents: dict[int, int] = {}
    cpu: dict[int, float] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(entry.name)] = int(fields[1])
        cpu[int(entry.name)] = (int(fields[11]) + int(fields[12])) / TICKS
    wanted, total = {pid}, 0.0
    changed = True
    while changed:
        changed = False
        for child, parent in parents.items():
            if parent in wanted and child not in wanted:
                wanted.add(child)
                changed = True
    for p in wanted:
        total += cpu.get(p, 0.0)
    return total


def run_count(api: str) -> int:
    """Flow runs plus task runs the server has recorded."""
    return sum(
        int(httpx.post(f"{api}/{kind}/count", json={}, timeout=60).json())
        for kind in ("flow_runs", "task_runs")
    )


def target_task_seconds(api: str, names: list[str], since: datetime) -> list[float]:
    """Start-to-end seconds of the task runs named `names` (a fleet names its `fleet-target`
    task runs after their targets) started since `since`: what one target costs the fleet,
    its subflow included."""
    out: list[float] = []
    offset = 0
    while True:
        page = httpx.post(
            f"{api}/task_runs/filter",
            json={"task_runs": {"name": {"any_": names}}, "limit": 200, "offset": offset},
            timeout=60,
        ).json()
        out += [
            (
                datetime.fromisoformat(r["end_time"]) - datetime.fromisoformat(r["start_time"])
            ).total_seconds()
            for r in page
            if r["start_time"]
            and r["end_time"]
            and datetime.fromisoformat(r["start_time"]) >= since
        ]
        if len(page) < 200:
            return out
        offset += 200


def run_fleet_timed(
    bench_server: BenchServer, runbook: str, concurrency: int, params: dict[str, Any] | None
) -> dict[str, Any]:
    """One `fleet` flow run (dry run, every target, no error threshold) in this process, timed,
    with what bounds it: the server's and this process's CPU seconds while it ran, the runs
    the server recorded, and the targets' own run times."""
    from prefect.events.worker import EventsWorker
    from prefect.settings import (
        PREFECT_API_URL,
        PREFECT_FLOWS_HEARTBEAT_FREQUENCY,
        temporary_settings,
    )

    from deployments.fleet import FLEETS
    from tasks.fleet import FleetReport
    from tasks.outcome import state_report

    server = bench_server.prefect

    def call(selector: str) -> tuple[FleetReport, float]:
        start = time.perf_counter()
        state = FLEETS[runbook](
            selector=selector,
            max_concurrency=str(concurrency),
            max_errors="100%",
            dry_run=True,
            approval="never",
            params=params,
            return_state=True,
        )
        seconds = time.perf_counter() - start
        report = state_report(state)
        assert isinstance(report, FleetReport), report
        return report, seconds

    with temporary_settings(
        updates={PREFECT_API_URL: server.api, PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}
    ):
        call("t0000,t0001")  # warm-up: imports, the flows registered
        runs_before, server_before = run_count(server.api), bench_server.cpu()
        log_before = server.log.stat().st_size if server.log.exists() else 0
        client_before = time.process_time()
        with Trace().install() as trace:
            report, seconds = call("all")
        client_cpu = time.process_time() - client_before
        server_cpu = bench_server.cpu() - server_before
        time.sleep(2)  # the server records the last events after the run ends
        server_after = bench_server.cpu() - server_before
        runs = run_count(server.api) - runs_before
        tasks = target_task_seconds(
            server.api, [r.target for r in report.targets], report.started_at
        )
        server_log = server_log_summary(server.log, log_before)
        # Send what the client still holds while the server is there: events left for a
        # stopped server are retried for minutes at exit.
        EventsWorker.drain_all(timeout=120)
    per_target = [(r.finished_at - r.started_at).total_seconds() for r in report.targets]
    # How many of the runbook's runs were ever in flight at once (their reports' spans).
    edges = sorted(
        [(r.started_at, 1) for r in report.targets] + [(r.finished_at, -1) for r in report.targets]
    )
    overlap = peak = 0
    for _, step in edges:
        overlap += step
        peak = max(peak, overlap)
    return {
        "seconds": seconds,
        "targets": len(report.targets),
        "not_started": len(report.not_started),
        "totals": report.totals.model_dump(),
        "server_cpu": server_cpu,
        "server_cpu_after_2s": server_after,
        "client_cpu": client_cpu,
        "runs": runs,
        "target_run_p50": statistics.median(per_target) if per_target else 0.0,
        "target_task_p50": statistics.median(tasks) if tasks else 0.0,
        "target_task_mean": statistics.fmean(tasks) if tasks else 0.0,
        "target_task_max": max(tasks, default=0.0),
        # the fleet's tasks' seconds over the wall: the targets in flight on average
        "in_flight_mean": sum(tasks) / seconds,
        "runs_overlap_peak": peak,
        "trace": trace.summary(),
        "server_log": server_log,
        # why the failed targets failed: their reports' messages
        "failed": {
            r.target: "; ".join(f.message for f in r.findings if f.severity.value != "ok")[:300]
            for r in report.targets
            if r.status.value == "failed"
        },
    }


def run_script_timed(
    items: list[Any], check: Callable[[Any], object], concurrency: int
) -> dict[str, Any]:
    """The hand-written side: `check` on every item through a ThreadPoolExecutor of
    `concurrency` threads, after a warm-up on two; wall seconds and per-check p50."""
    durations: list[float] = []

    def one(item: Any) -> object:
        start = time.perf_counter()
        try:
            return check(item)
        finally:
            durations.append(time.perf_counter() - start)

    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, items[:2]))
        durations.clear()
        start = time.perf_counter()
        results = list(pool.map(one, items))
        seconds = time.perf_counter() - start
    return {"seconds": seconds, "check_p50": statistics.median(durations), "results": results}


# The bench's own Prefect server, by --server (a bench-only setting; the harness's rows say
# which): "sqlite" is Prefect's default (what `runbook serve` starts), "postgres" keeps
# Prefect's database in a PostgreSQL of its own (PREFECT_API_DATABASE_CONNECTION_URL). Both
# log the exception behind each 503 they answer (PREFECT_API_LOG_RETRYABLE_ERRORS).
# Batching the task run recorder's and the event persister's writes (their BATCH_SIZE 100 and
# 200) left the SQLite server's 503s as they were: 92 retries against 84 over 100 endpoints.
SERVER_ENV: dict[str, dict[str, str]] = {"sqlite": {}, "postgres": {}}


@dataclass
class BenchServer:
    prefect: PrefectServer
    pids: list[int]  # the processes whose CPU is the server's: Prefect's, its PostgreSQL's

    def cpu(self) -> float:
        return sum(tree_cpu(pid) for pid in self.pids)


@contextmanager
def prefect_server(kind: str = "sqlite") -> Iterator[BenchServer]:
    home = Path(tempfile.mkdtemp(prefix="runbook-bench-fleet-"))
    env = {"PREFECT_API_LOG_RETRYABLE_ERRORS": "true", **SERVER_ENV[kind]}
    with ExitStack() as stack:
        pg_pid: list[int] = []
        if kind == "postgres":
            pg = stack.enter_context(LocalPostgres(max_connections=200))
            dsn = pg.create_database("prefect")
            env["PREFECT_API_DATABASE_CONNECTION_URL"] = dsn.replace(
                "postgresql://", "postgresql+asyncpg://"
            )
            pg_pid = [int((pg.data / "postmaster.pid").read_text().split()[0])]
        server = PrefectServer(home / "server", env=env)
        server.start()
        assert server.proc is not None
        try:
            yield BenchServer(server, [server.proc.pid, *pg_pid])
        finally:
            server.stop()
            shutil.rmtree(home, ignore_errors=True)


def with_bounds(
    fleet: dict[str, Any], script: dict[str, Any], concurrency: int, kind: str
) -> dict[str, Any]:
    """The row's figures: fleet seconds against the script's, and what bounds the fleet."""
    runs = max(fleet["runs"], 1)
    return {
        "ours": fleet["seconds"],
        "baseline": script["seconds"],
        "ratio": fleet["seconds"] / script["seconds"],
        "fleet": {k: v for k, v in fleet.items() if k != "results"},
        "script_check_p50": script["check_p50"],
        "concurrency": concurrency,
        "bound": (
            f"{waiting(fleet)}; server CPU"
            + (" (Prefect's and its PostgreSQL's)" if kind == "postgres" else "")
            + f" {fleet['server_cpu']:.1f} s in {fleet['seconds']:.1f} s wall "
            f"({fleet['server_cpu'] / fleet['seconds']:.0%} of a core), "
            f"{1000 * fleet['server_cpu'] / runs:.0f} ms per flow/task run ({fleet['runs']} runs); "
            f"client CPU {fleet['client_cpu']:.1f} s "
            f"({fleet['client_cpu'] / fleet['seconds']:.0%} of a core); "
            f"per target: the fleet's task p50 {fleet['target_task_p50']:.2f} s, mean "
            f"{fleet['target_task_mean']:.2f} s, max {fleet['target_task_max']:.1f} s, "
            f"the runbook's own run (its report) p50 {fleet['target_run_p50']:.3f} s, a script "
            f"check "
            f"{script['check_p50']:.3f} s; targets in flight: {fleet['in_flight_mean']:.1f} on "
            f"average (cap {concurrency}), the runbook's runs at most "
            f"{fleet['runs_overlap_peak']} at once"
        ),
    }


def waiting(fleet: dict[str, Any]) -> str:
    """Where the targets' time went (bench/fleet_trace.py): the Prefect client's retries and
    their backoff, the server's errors behind them, the sampled threads."""
    t, log = fleet["trace"], fleet["server_log"]["kinds"]
    total = max(t["sampled_seconds"], 1e-9)
    where = ", ".join(f"{k} {v:.0f} s ({v / total:.0%})" for k, v in list(t["where"].items())[:3])
    paths = ", ".join(
        f"{path} {p['retries']}x, {p['backoff']:.0f} s" for path, p in t["retried_paths"].items()
    )
    retryable = sum(n for k, n in log.items() if "Encountered retryable exception" in k)
    causes = sorted({k.split(": ", 1)[1] for k in log if k.startswith("sqlalchemy.exc.")})
    slow = t["slowest"][0] if t["slowest"] else None
    return (
        f"the targets' time: {t['target_wall_sum']:.0f} s summed (submit to end), sampled on "
        f"their threads: {where}; the Prefect client retried {t['retries']} requests' attempts "
        f"({dict(t['retry_causes'])}), sleeping {t['backoff_seconds']:.0f} s of backoff "
        f"(2^n s, no Retry-After): {paths or 'none'}"
        + (
            f"; a 503 came back in {1000 * t['503_seconds_p50']:.0f} ms p50 (SQLite refusing "
            f"the write at once, not after its busy timeout); the server logged {retryable} "
            f"retryable errors: {'; '.join(causes) or '-'}"
            if t["retries"]
            else ""
        )
        + (
            f"; slowest target {slow['target']} {slow['wall']:.1f} s: {slow['where']}"
            if slow
            else ""
        )
    )


def measure_postgres(databases: int, concurrency: int, kind: str) -> dict[str, Any]:
    """Row 1: postgres-connections fleet over `databases` databases of one PostgreSQL."""
    from connections_overhead import plain

    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        pg = stack.enter_context(LocalPostgres(max_connections=max(100, 3 * concurrency)))
        dsns = {f"t{i:04d}": pg.create_database(f"t{i:04d}") for i in range(databases)}
        config = tmp / "runbook.toml"
        config.write_text(
            "".join(f'[postgres.{name}]\ndsn = "{dsn}"\n' for name, dsn in dsns.items())
        )
        os.environ["RUNBOOK_CONFIG"] = str(config)
        server = stack.enter_context(prefect_server(kind))
        script = run_script_timed(
            list(dsns.items()), lambda item: plain(item[1], item[0]), concurrency
        )
        fleet = run_fleet_timed(server, "postgres-connections", concurrency, None)
    assert fleet["targets"] == databases, fleet
    return {"databases": databases, "server": kind, **with_bounds(fleet, script, concurrency, kind)}


def ssl_check(endpoint: tuple[int, Path], timeout: float) -> bool:
    """The hand-written check: connect, handshake against the CA, read the certificate."""
    port, ca = endpoint
    context = ssl.create_default_context(cafile=str(ca))
    try:
        with (
            socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock,
            context.wrap_socket(sock, server_hostname="app.test") as tls,
        ):
            return tls.getpeercert() is not None
    except OSError:
        return False


def measure_tls(
    endpoints: int, dead: int, concurrency: int, timeout: float, kind: str
) -> dict[str, Any]:
    """Row 2: tls-certificates fleet over `endpoints` local TLS endpoints, `dead` of them dead
    (half never answer, half closed ports)."""
    servers = Servers()
    with ExitStack() as stack:
        stack.callback(servers.close)
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        ca = CA(tmp)
        cert, key = ca.issue("bench", ["app.test"], days=60)
        ports = {}
        for i in range(endpoints):
            name = f"t{i:04d}"
            # the dead ones last: the warm-up runs on t0000 and t0001
            if i >= endpoints - dead // 2:
                ports[name] = servers.never_answers()
            elif i >= endpoints - dead:
                ports[name] = free_port()  # nothing listens
            else:
                ports[name] = servers.tls(cert, key)
        config = tmp / "runbook.toml"
        config.write_text(
            "".join(
                f'[tls.{name}]\nhost = "127.0.0.1"\nport = {port}\nserver_name = "app.test"\n'
                f'ca_file = "{ca.pem}"\n'
                for name, port in ports.items()
            )
        )
        os.environ["RUNBOOK_CONFIG"] = str(config)
        server = stack.enter_context(prefect_server(kind))
        script = run_script_timed(
            [(port, ca.pem) for port in ports.values()],
            lambda item: ssl_check(item, timeout),
            concurrency,
        )
        fleet = run_fleet_timed(
            server, "tls-certificates", concurrency, {"timeout_seconds": timeout}
        )
    assert sum(script["results"]) == endpoints - dead, script["results"]
    assert fleet["targets"] == endpoints, fleet
    return {
        "endpoints": endpoints,
        "dead": dead,
        "timeout": timeout,
        "server": kind,
        **with_bounds(fleet, script, concurrency, kind),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--databases", type=int, default=200)
    parser.add_argument("--endpoints", type=int, default=500)
    parser.add_argument("--dead", type=int, default=25)
    parser.add_argument("--concurrency", type=int, default=10)
    parser.add_argument("--timeout", type=float, default=1.0)
    parser.add_argument("--only", choices=["postgres", "tls"])
    parser.add_argument(
        "--server",
        choices=list(SERVER_ENV),
        default="sqlite",
        help="the bench's Prefect server: its database and settings (SERVER_ENV)",
    )
    parser.add_argument("--json", action="store_true", help="one JSON line of figures")
    args = parser.parse_args()
    figures: dict[str, Any] = {}
    if args.only in (None, "postgres"):
        figures["postgres"] = measure_postgres(args.databases, args.concurrency, args.server)
    if args.only in (None, "tls"):
        figures["tls"] = measure_tls(
            args.endpoints, args.dead, args.concurrency, args.timeout, args.server
        )
    if args.json:
        print(json.dumps(figures))
        return
    for name, row in figures.items():
        print(
            f"{name}: fleet {row['ours']:.2f} s, script {row['baseline']:.2f} s, "
            f"{row['ratio']:.2f}x (concurrency {row['concurrency']})"
        )
        print(f"  {row['bound']}")
        print(f"  totals {row['fleet']['totals']}")


if __name__ == "__main__":
    main()
