"""The in-process runner of `runbook serve` against a real Prefect API: runs claimed and run on
its threads, cancelled from the API at the next task, late scheduled checks skipped; and the
pure triage of due runs."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from prefect import get_client
from prefect.client.schemas.objects import StateType
from prefect.states import Cancelling, Scheduled

from deployments.runner import Due, InProcessRunner, triage
from flows.stuck_jobs import stuck_jobs
from tasks.cancel import pause
from tasks.engine import io_task, runbook_flow
from tasks.models import utcnow
from tests.conftest import Db, runner_deployment
from tests.test_stuck_jobs import JOBS, make_jobs

pytestmark = pytest.mark.usefixtures("prefect_api")

NOW = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
MINUTE = timedelta(minutes=1)


def due(dep: uuid.UUID, minutes_ago: float, *, auto: bool = True) -> Due:
    return Due(uuid.uuid4(), dep, NOW - timedelta(minutes=minutes_ago), auto)


def test_triage_supersedes_older_checks_and_skips_ones_later_than_their_interval() -> None:
    a, b, c = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    old_a, new_a = due(a, 3), due(a, 0.5)
    late_b = due(b, 1.5)  # one run, later than b's one-minute interval
    manual_c = due(c, 90, auto=False)  # asked for by hand: never skipped
    skip, start = triage(
        [new_a, late_b, old_a, manual_c],
        now=NOW,
        interval=lambda run: MINUTE,
        busy=set(),
        free_slots=4,
    )
    assert [(r, why.split(" ")[0]) for r, why in skip] == [(old_a, "superseded"), (late_b, "90")]
    assert "more than its schedule's interval (60 s)" in skip[1][1]
    assert start == [manual_c, new_a]  # oldest first


def test_triage_starts_one_run_per_deployment_within_the_free_slots() -> None:
    a, b, c = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    manual_a1, manual_a2 = due(a, 5, auto=False), due(a, 4, auto=False)
    run_b, run_c = due(b, 0.2), due(c, 0.1)
    skip, start = triage(
        [manual_a1, manual_a2, run_b, run_c],
        now=NOW,
        interval=lambda run: None if run.deployment_id == a else MINUTE,
        busy=set(),
        free_slots=2,
    )
    assert skip == [] and start == [manual_a1, run_b]
    # A deployment with a run in flight starts nothing; a late check waits without a slot,
    # and is judged late only once it could start.
    skip, start = triage(
        [run_b, run_c], now=NOW, interval=lambda run: MINUTE, busy={b}, free_slots=0
    )
    assert skip == [] and start == []


def test_the_sandbox_schedule_runs_every_minute_then_settles_to_five() -> None:
    from prefect.schedules import RRule

    from deployments.runner import schedule_interval
    from deployments.sandbox import schedule_rrule

    deployment = runner_deployment(
        slow.to_deployment(name="s", schedules=[RRule(schedule_rrule(NOW), timezone="UTC")])
    )
    interval = schedule_interval(deployment)
    first = NOW + timedelta(seconds=10)
    assert [interval(first + MINUTE * n) for n in range(3)] == [MINUTE, MINUTE, 3 * MINUTE]
    assert interval(first + 2 * MINUTE + 3 * MINUTE) == 5 * MINUTE
    assert interval(first + 60 * MINUTE) == 5 * MINUTE


iterations: dict[str, int] = {}


@io_task("tick", retries=0)
def tick(key: str) -> None:
    iterations[key] = iterations.get(key, 0) + 1
    time.sleep(0.2)


@runbook_flow("runner-test-wait")
def waits(target: str, seconds: float = 600) -> Any:
    tick(target)
    pause(seconds)  # as queue-backlog waits between its samples
    tick(target)
    return None


@runbook_flow("runner-test-slow")
def slow(target: str, ticks: int = 300) -> Any:
    for _ in range(ticks):
        tick(target)
    return None


@pytest.fixture
def runner() -> Iterator[tuple[InProcessRunner, Any]]:
    """The runner serving the slow test flow and stuck-jobs, polling on a thread."""
    name = f"t-{uuid.uuid4().hex[:8]}"
    deployments = [
        (
            slow.to_deployment(
                name=name, parameters={"target": name}, interval=timedelta(minutes=30)
            ),
            slow,
        ),
        (
            stuck_jobs.to_deployment(
                name=name, parameters={"target": "main", "dry_run": False, "approval": "auto"}
            ),
            stuck_jobs,
        ),
        (waits.to_deployment(name=name, parameters={"target": name}), waits),
    ]
    runner = InProcessRunner(deployments, max_runs=2, poll_seconds=0.5)  # type: ignore[arg-type]
    with get_client(sync_client=True) as client:
        runner.register(client)
        thread = threading.Thread(target=runner.serve, args=(client,), daemon=True)
        thread.start()
        try:
            yield runner, client
        finally:
            runner.request_stop()
            thread.join(30)
            runner.stop(client, grace_seconds=30)


def wait_for_state(client: Any, run_id: uuid.UUID, *types: StateType, timeout: float = 120) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = client.read_flow_run(run_id)
        if run.state is not None and run.state.type in types:
            return run
        time.sleep(0.3)
    raise AssertionError(f"run {run_id} still {run.state} after {timeout} s")


def deployment_id(runner: InProcessRunner, flow_name: str) -> uuid.UUID:
    return next(s.id for s in runner.served.values() if s.name.startswith(flow_name + "/"))


def test_a_manual_run_is_run_in_process_and_fixes_the_incident(
    runner: tuple[InProcessRunner, Any], db: Db
) -> None:
    served, client = runner
    make_jobs(db)
    db.write_config(JOBS)
    run = client.create_flow_run_from_deployment(deployment_id(served, "stuck-jobs"))
    done = wait_for_state(client, run.id, StateType.COMPLETED, StateType.FAILED)
    assert (done.state.type, done.state.name) == (StateType.COMPLETED, "Fixed")
    with db.admin() as conn:
        assert conn.execute(
            "SELECT count(*) FROM crawler.job WHERE status = 'running'"
        ).fetchone() == (1,)  # the one started 5 minutes ago is still working


def test_a_run_cancelled_from_the_api_stops_at_its_next_task(
    runner: tuple[InProcessRunner, Any],
) -> None:
    served, client = runner
    dep = deployment_id(served, "runner-test-slow")
    run = client.create_flow_run_from_deployment(dep)
    key = client.read_flow_run(run.id).parameters["target"]
    wait_for_state(client, run.id, StateType.RUNNING)
    deadline = time.monotonic() + 60
    while iterations.get(key, 0) < 3 and time.monotonic() < deadline:
        time.sleep(0.2)
    client.set_flow_run_state(run.id, Cancelling(message="from the UI"))  # the UI's Cancel
    ended = wait_for_state(client, run.id, StateType.CANCELLED, StateType.COMPLETED)
    assert ended.state.type is StateType.CANCELLED
    stopped_at = iterations[key]
    time.sleep(1)
    assert iterations[key] == stopped_at < 300  # no task ran after the cancellation
    assert served.active == 0


def test_late_scheduled_checks_are_skipped_and_a_manual_run_is_not(
    runner: tuple[InProcessRunner, Any],
) -> None:
    """Scheduled runs made late for real: Prefect's scheduler backfills the slow flow's
    30-minute schedule over a window 3 h to 1.5 h ago (as if serve had stalled). The older ones
    are superseded, the newest is later than its interval; a manual run as late still runs."""
    from prefect.client.base import PrefectHttpxSyncClient
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.settings import PREFECT_API_URL

    served, client = runner
    dep = deployment_id(served, "runner-test-slow")
    manual = client.create_flow_run_from_deployment(
        dep,
        parameters={"ticks": 1},
        state=Scheduled(scheduled_time=utcnow() - timedelta(hours=4)),
    )
    now = utcnow()
    # Prefect's own HTTP client: it retries the 503 a busy SQLite server answers.
    with PrefectHttpxSyncClient(base_url=str(PREFECT_API_URL.value()), timeout=60) as http:
        http.post(
            f"/deployments/{dep}/schedule",
            json={
                "start_time": (now - timedelta(hours=3)).isoformat(),
                "end_time": (now - timedelta(minutes=90)).isoformat(),
            },
        ).raise_for_status()
    backfilled = [
        r
        for r in client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[dep])), limit=200
        )
        if r.auto_scheduled and r.expected_start_time < now
    ]
    assert len(backfilled) >= 3
    ended = [wait_for_state(client, r.id, StateType.CANCELLED) for r in backfilled]
    assert {r.state.name for r in ended} == {"Skipped"}
    reasons = sorted(r.state.message.split(":")[1].split()[0] for r in ended)
    assert reasons.count("superseded") == len(backfilled) - 1
    newest = max(ended, key=lambda r: r.expected_start_time)
    assert "more than its schedule's interval (1800 s)" in newest.state.message
    done = wait_for_state(client, manual.id, StateType.COMPLETED, StateType.FAILED)
    assert done.state.type is StateType.COMPLETED


def test_a_run_with_parameters_the_flow_does_not_take_ends_failed(
    runner: tuple[InProcessRunner, Any],
) -> None:
    """Accepted by the API, refused by the flow before it begins: Failed, saying why, not
    left Pending."""
    served, client = runner
    run = client.create_flow_run_from_deployment(
        deployment_id(served, "runner-test-slow"), parameters={"sample_seconds": 60}
    )
    ended = wait_for_state(client, run.id, StateType.FAILED, StateType.COMPLETED)
    assert ended.state.type is StateType.FAILED
    assert "could not start" in ended.state.message and "sample_seconds" in ended.state.message
    assert served.active == 0


def test_a_run_cancelled_during_a_wait_stops_without_waiting_it_out(
    runner: tuple[InProcessRunner, Any],
) -> None:
    served, client = runner
    run = client.create_flow_run_from_deployment(deployment_id(served, "runner-test-wait"))
    key = client.read_flow_run(run.id).parameters["target"]
    wait_for_state(client, run.id, StateType.RUNNING)
    deadline = time.monotonic() + 60
    while iterations.get(key, 0) < 1 and time.monotonic() < deadline:
        time.sleep(0.2)
    client.set_flow_run_state(run.id, Cancelling(message="from the UI"))
    ended = wait_for_state(client, run.id, StateType.CANCELLED, StateType.COMPLETED, timeout=300)
    assert ended.state.type is StateType.CANCELLED
    assert iterations[key] == 1  # the task after the ten-minute wait never ran
