"""What Prefect costs a diagnose-only postgres-connections run.

Against a local PostgreSQL with 30 client sessions, alternately times (after warm-up):
  baseline   a plain psycopg script: connect, the same two queries, the same findings;
  flow       postgres_connections(dry_run=True): flow run, one task, report artifacts;
and the per-task overhead from flows of 0 and 20 empty tasks. Prints medians and ratios
against the baseline measured in the same run. Interpreter start and the Prefect server's start
are excluded (the server is one already running, as under `runbook serve`).

    .venv/bin/python bench/connections_overhead.py [--rounds 30]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable

os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="runbook-bench-"))
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL"] = "CRITICAL"

import psycopg
from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings
from prefect.testing.utilities import prefect_test_harness

from deployments.localpg import LocalPostgres
from flows.postgres_connections import postgres_connections
from tasks.postgres import _ACTIVITY, Activity, Backend
from tasks.postgres_rules import ConnectionsParams, connection_findings
from tasks.settings import load_settings

TASKS = 20


def plain(dsn: str, name: str = "main") -> None:
    """The hand-written check of target `name` of the inventory: connect, the same two
    queries, the same findings (bench/fleet_paths.py runs it per database too)."""
    target = load_settings().postgres[name]
    with psycopg.connect(
        dsn, connect_timeout=5, autocommit=True, row_factory=psycopg.rows.dict_row
    ) as conn:
        head = conn.execute(
            "SELECT now() AS now, current_setting('max_connections')::int AS max_connections, "
            "current_user AS role"
        ).fetchone()
        assert head is not None
        rows = conn.execute(_ACTIVITY).fetchall()
    activity = Activity(
        now=head["now"],
        max_connections=head["max_connections"],
        role=head["role"],
        backends=[Backend(**r) for r in rows],
    )
    connection_findings(name, activity, target, ConnectionsParams())


@task(cache_policy=NO_CACHE, persist_result=False)
def noop() -> None:
    return None


@flow
def empty(n: int) -> None:
    for _ in range(n):
        noop()


def median_ms(fn: Callable[[], object], rounds: int) -> list[float]:
    out = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        out.append((time.perf_counter() - start) * 1000)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=30)
    rounds = parser.parse_args().rounds
    with LocalPostgres() as pg, tempfile.TemporaryDirectory() as tmp:
        dsn = pg.create_database("bench")
        config = os.path.join(tmp, "runbook.toml")
        with open(config, "w") as fh:
            fh.write(f'[postgres.main]\ndsn = "{dsn}"\n')
        os.environ["RUNBOOK_CONFIG"] = config
        sessions = [psycopg.connect(dsn, autocommit=True) for _ in range(30)]
        with (
            prefect_test_harness(server_startup_timeout=120),
            temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}),
        ):
            runs: dict[str, list[float]] = {}
            # Separate phases: a flow of many tasks leaves the server busy recording task-run
            # events (SQLite), which stalls the next flow run by up to ~2 s.
            phases: list[dict[str, Callable[[], object]]] = [
                {"baseline": lambda: plain(dsn), "flow": lambda: postgres_connections("main")},
                {"empty0": lambda: empty(0)},
                {"empty20": lambda: empty(TASKS)},
            ]
            for steps in phases:
                for fn in steps.values():  # warm-up
                    fn()
                for _ in range(rounds):  # interleaved: drift on a noisy machine hits all alike
                    for name, fn in steps.items():
                        runs.setdefault(name, []).extend(median_ms(fn, 1))
        for s in sessions:
            s.close()
    med = {k: statistics.median(v) for k, v in runs.items()}
    base = med["baseline"]
    print(f"rounds: {rounds} (medians, ms)")
    print(f"baseline psycopg script   {base:8.1f}   1.00x")
    print(f"postgres-connections flow {med['flow']:8.1f}   {med['flow'] / base:5.2f}x")
    print(f"empty flow                {med['empty0']:8.1f}   {med['empty0'] / base:5.2f}x")
    per_task = (med["empty20"] - med["empty0"]) / TASKS
    print(
        f"per-task overhead         {per_task:8.1f}   ({TASKS} empty tasks: "
        f"{med['empty20']:.1f} ms)"
    )


if __name__ == "__main__":
    main()
