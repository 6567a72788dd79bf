"""What the gate's safety layers cost a run that acts, in Prefect task runs: inside a flow run on
a real Prefect server (a `prefect server start` on SQLite, as under `runbook serve`), each
round times, interleaved so a busy machine slows all alike,

  task      one trivial Prefect task run (the baseline: what every step of a runbook costs)
  mutating  taking and releasing the run's mutating-run slot (tasks.limits.mutating_run), its
            limit already there (every run after a target's first)
  rate      one action through its rate limit (tasks.limits.admit), the limit already there
  first-*   the same on a target seen for the first time (the limit is created)
  audit     the audit trail of a report with one action done (tasks.audit.record: one event)

and prints the medians and their ratios to `task`.

    .venv/bin/python bench/gate_overhead.py [--rounds 30]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    home = Path(tempfile.mkdtemp(prefix="bench-gate-"))
    os.environ.update(
        PREFECT_HOME=str(home),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL="ERROR",
    )
    from tests.alertmanager_helpers import PrefectServer

    server = PrefectServer(home / "server").start()
    os.environ["PREFECT_API_URL"] = server.api
    try:
        print(measure(args.rounds))
    finally:
        from prefect.logging.handlers import APILogWorker

        APILogWorker.drain_all(timeout=10)  # the runs' logs reach the server before it stops
        server.stop()


def measure(rounds: int) -> str:
    from prefect import flow, task
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    from tasks.audit import record
    from tasks.limits import RateLimit, admit, mutating_run
    from tasks.models import Action, ActionStatus, Report, RunStatus, utcnow

    @task
    def trivial() -> int:
        return 1

    def action() -> Action:
        return Action(kind="restart_service", target="bench", description="d", destructive=True)

    def rate(target: str) -> None:
        done = action().model_copy(update={"target": target})
        assert admit([done], rates={"restart_service": RateLimit(max=10**6, per_seconds=60)})

    def mutating(resource: str) -> None:
        with mutating_run(resource) as reason:
            assert reason is None

    def one_audit() -> None:
        done = action().model_copy(update={"status": ActionStatus.done})
        now = utcnow()
        report = Report(
            runbook="bench",
            target="bench",
            dry_run=False,
            status=RunStatus.fixed,
            findings=[],
            actions=[done],
            started_at=now,
            finished_at=now,
        )
        assert record(report, inventory="services", settings=None) == []

    cases: dict[str, Callable[[], object]] = {
        "task": trivial,
        "mutating": lambda: mutating("bench.steady"),
        "rate": lambda: rate("steady"),
        "audit": one_audit,
        "first-mutating": lambda: mutating(f"bench.{uuid.uuid4().hex[:8]}"),
        "first-rate": lambda: rate(uuid.uuid4().hex[:8]),
    }
    times: dict[str, list[float]] = {name: [] for name in cases}

    @flow
    def bench() -> None:
        for fn in cases.values():  # warm-up: imports, clients, first limit creation
            fn()
        for _ in range(rounds):
            for name, fn in cases.items():
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)

    with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        bench()
    base = statistics.median(times["task"])
    lines = [f"{rounds} rounds, medians (ratio to one trivial task run):"]
    for name, values in times.items():
        median = statistics.median(values)
        lines.append(f"  {name:15} {median * 1000:7.1f} ms  x{median / base:5.2f}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
