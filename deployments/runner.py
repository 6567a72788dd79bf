"""Serving deployments from this process: scheduled and manual runs on a bounded pool of threads.

Prefect's `serve` starts a new Python process for every flow run (about 2 s of CPU and 100 MB
each): on a busy 2-core machine its runs pile up and fall behind. Here Prefect's server still
owns the schedules (its scheduler creates the Scheduled runs), and each run is still a tracked
flow run with its logs, artifacts and states; only the execution differs: this process, which
has the flows imported, claims a due run (Pending) and runs it on one of `max_runs` threads.

Each poll (every `poll_seconds`):
1. runs of ours that someone set Cancelling (the UI's Cancel) are asked to stop at their next
   task call (tasks.cancel), and end Cancelled;
2. the due runs of every served deployment are read, oldest first. A scheduled check is
   skipped, ending Cancelled with the state name "Skipped", when a newer scheduled run of the
   same deployment is also due (it supersedes it) or when it is late by more than its
   schedule's interval by the time a thread is free for it: a monitoring check never piles up.
   Manual runs (from the UI or `run_deployment`) are never skipped. A deployment runs one run
   at a time: two remediations of one target never overlap.

Alert runs that the receiver creates Pending come in through submit() and share the threads.

On stop, due runs not claimed are left Scheduled for the next start (or skipped by it as late),
runs in flight are asked to stop at their next task and awaited for `grace_seconds`, runs
queued for a thread end Cancelled, and the served
deployments are paused, which makes Prefect's server delete their future scheduled runs (as
Prefect's own `serve` does); the next start resumes them. Runs a previous serve left Pending or
Running (killed, or the machine rebooted) are marked Crashed at start, with the reason.
"""

from __future__ import annotations

import contextvars
import logging
import sys
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, cast
from uuid import UUID

from croniter import croniter
from dateutil.rrule import rrulestr

from tasks.cancel import forget_cancel, request_cancel
from tasks.errors import ConfigError
from tasks.wait import poll

if TYPE_CHECKING:
    from prefect import Flow
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.schemas.objects import FlowRun
    from prefect.client.schemas.responses import FlowRunResponse
    from prefect.deployments.runner import RunnerDeployment

SKIPPED = "Skipped"
THREAD_TIMEOUT_WARNING = "running in a worker thread. Timeouts in worker threads"


class _ThreadTimeoutNotice(logging.Filter):
    """Drops Prefect's warning, logged for every task run off the main thread, that a task
    timeout cannot interrupt blocking I/O there: every task here bounds its own I/O with a
    timeout of its own (DESIGN.md, code style 6), and the warning would be most of the log."""

    def filter(self, record: logging.LogRecord) -> bool:
        return THREAD_TIMEOUT_WARNING not in str(record.msg)


def quiet_thread_timeout_notice() -> None:
    task_runs = logging.getLogger("prefect.task_runs")
    if not any(isinstance(f, _ThreadTimeoutNotice) for f in task_runs.filters):
        task_runs.addFilter(_ThreadTimeoutNotice())


Interval = Callable[[datetime], "timedelta | None"]


@dataclass
class Served:
    """A deployment this process runs: its id, "flow/deployment" name, flow, and the interval
    of its schedules at a given time (None: run by hand only)."""

    id: UUID
    name: str
    flow: Flow[..., Any]
    interval: Interval


def schedule_interval(deployment: RunnerDeployment) -> Interval:
    """The interval of a deployment's schedules at a time t: from t to the next time any of
    its active schedules (cron, interval or RRule) fires after t; None without a schedule."""
    nexts: list[Callable[[datetime], datetime | None]] = []
    for entry in deployment.schedules or []:
        if not getattr(entry, "active", True):
            continue
        schedule: Any = entry.schedule
        if getattr(schedule, "interval", None) is not None:
            nexts.append(_every(timedelta(seconds=float(schedule.interval.total_seconds()))))
        elif getattr(schedule, "cron", None) is not None:
            nexts.append(_cron(schedule.cron))
        elif getattr(schedule, "rrule", None) is not None:
            nexts.append(rrulestr(schedule.rrule, forceset=True).after)

    def interval(t: datetime) -> timedelta | None:
        times = [n for n in (f(t) for f in nexts) if n is not None]
        return min(times) - t if times else None

    return interval


def _every(step: timedelta) -> Callable[[datetime], datetime | None]:
    def after(t: datetime) -> datetime:
        return t + step

    return after


def _cron(cron: str) -> Callable[[datetime], datetime | None]:
    def after(t: datetime) -> datetime:
        found: datetime = croniter(cron, t).get_next(datetime)
        return found

    return after


@dataclass(frozen=True)
class Due:
    """A run whose time has come: its id, deployment, expected start (UTC), and whether
    Prefect's scheduler made it (a scheduled check) or someone asked for it (a manual run)."""

    id: UUID
    deployment_id: UUID
    expected_start: datetime
    auto_scheduled: bool


def triage(
    due: list[Due],
    *,
    now: datetime,
    interval: Callable[[Due], timedelta | None],
    busy: set[UUID],
    free_slots: int,
) -> tuple[list[tuple[Due, str]], list[Due]]:
    """Which due runs to skip, each with the reason, and which to start now (oldest first).

    A scheduled run is skipped when a newer scheduled run of its deployment is due (superseded),
    or when it is late by more than its schedule's interval (interval(run): from its expected
    start to the schedule's next time) at the moment it could start.
    Manual runs are never skipped. A deployment in `busy` (a run in flight) starts nothing,
    and at most free_slots runs start, the oldest first."""
    newest: dict[UUID, Due] = {}
    for run in sorted(due, key=lambda r: r.expected_start):
        if run.auto_scheduled:
            newest[run.deployment_id] = run
    skip: list[tuple[Due, str]] = []
    start: list[Due] = []
    taken = set(busy)
    for run in sorted(due, key=lambda r: r.expected_start):
        latest = newest.get(run.deployment_id)
        if run.auto_scheduled and latest is not None and latest.id != run.id:
            skip.append((run, f"superseded by the run due at {latest.expected_start:%H:%M:%S} UTC"))
            continue
        if run.deployment_id in taken or len(start) >= free_slots:
            continue
        late = now - run.expected_start
        gap = interval(run) if run.auto_scheduled else None
        if gap is not None and late > gap:
            skip.append(
                (
                    run,
                    f"{late.total_seconds():.0f} s late, more than its schedule's interval "
                    f"({gap.total_seconds():.0f} s): the next run supersedes it",
                )
            )
            continue
        start.append(run)
        taken.add(run.deployment_id)
    return skip, start


class InProcessRunner:
    """Runs the scheduled and manual runs of `deployments` (each with the flow it was made
    from) on threads of this process."""

    def __init__(
        self,
        deployments: list[tuple[RunnerDeployment, Flow[..., Any]]],
        *,
        max_runs: int,
        poll_seconds: float = 2.0,
    ) -> None:
        if max_runs < 1:
            raise ConfigError(f"max_runs must be at least 1, got {max_runs}")
        self._deployments = deployments
        self.max_runs = max_runs
        self.poll_seconds = poll_seconds
        self.served: dict[UUID, Served] = {}
        self._pool = ThreadPoolExecutor(max_runs, thread_name_prefix="runbook-run")
        self._lock = threading.Lock()
        # run id -> deployment id, for every run claimed and not yet ended
        self._active: dict[UUID, UUID] = {}
        self._futures: dict[UUID, Future[None]] = {}
        self._stop = threading.Event()
        # Set when a run ends (a thread is free) or on stop: the next poll comes at once.
        self._wake = threading.Event()
        quiet_thread_timeout_notice()

    # -- set-up ----------------------------------------------------------------------------

    def register(self, client: SyncPrefectClient) -> None:
        """Create or update every deployment (schedules on, not paused) and mark the runs a
        previous serve left unfinished as Crashed."""
        for deployment, flow in self._deployments:
            deployment_id = cast(UUID, deployment.apply())
            client.resume_deployment(deployment_id)
            self.served[deployment_id] = Served(
                id=deployment_id,
                name=f"{flow.name}/{deployment.name}",
                flow=flow,
                interval=schedule_interval(deployment),
            )
        self._crash_left_over(client)

    def _crash_left_over(self, client: SyncPrefectClient) -> None:
        from prefect.client.schemas.filters import (
            DeploymentFilter,
            DeploymentFilterId,
            FlowRunFilter,
            FlowRunFilterState,
            FlowRunFilterStateType,
        )
        from prefect.client.schemas.objects import StateType
        from prefect.states import Crashed

        stale = client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=list(self.served))),
            flow_run_filter=FlowRunFilter(
                state=FlowRunFilterState(
                    type=FlowRunFilterStateType(
                        any_=[
                            StateType.PENDING,
                            StateType.RUNNING,
                            StateType.CANCELLING,
                            # waiting for approval in a serve that is gone: nothing would
                            # carry out an answer given now
                            StateType.PAUSED,
                        ]
                    )
                )
            ),
        )
        for run in stale:
            client.set_flow_run_state(
                run.id,
                Crashed(message="runbook serve stopped while this run was in flight"),
                force=True,
            )
        if stale:
            _say(f"Marked {len(stale)} runs left in flight by an earlier serve Crashed")

    # -- the loop ---------------------------------------------------------------------------

    def serve(self, client: SyncPrefectClient) -> None:
        """Poll until stop() is called. A failed poll (the API briefly unreachable) is logged
        and retried at the next one."""
        failures = 0
        while not self._stop.is_set():
            try:
                self.poll(client)
                failures = 0
            except Exception as exc:
                failures += 1
                if failures in (1, 10) or failures % 100 == 0:
                    _say(f"runner poll failed ({failures}x): {type(exc).__name__}: {exc}")
            self._wake.wait(self.poll_seconds)
            self._wake.clear()

    def poll(self, client: SyncPrefectClient) -> None:
        self._watch_cancelling(client)
        self._dispatch(client, datetime.now(UTC))

    def _watch_cancelling(self, client: SyncPrefectClient) -> None:
        from prefect.client.schemas.filters import (
            FlowRunFilter,
            FlowRunFilterId,
            FlowRunFilterState,
            FlowRunFilterStateType,
        )
        from prefect.client.schemas.objects import StateType

        with self._lock:
            active = list(self._active)
        if not active:
            return
        cancelling = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(
                id=FlowRunFilterId(any_=active),
                state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.CANCELLING])),
            )
        )
        for run in cancelling:
            request_cancel(run.id)

    def _dispatch(self, client: SyncPrefectClient, now: datetime) -> None:
        found = client.get_scheduled_flow_runs_for_deployments(
            deployment_ids=list(self.served), scheduled_before=now
        )
        runs = {run.id: run for run in found if run.deployment_id in self.served}
        with self._lock:
            busy = set(self._active.values())
            free = self.max_runs - len(self._active)
        skip, start = triage(
            [
                Due(run.id, run.deployment_id, run.expected_start_time or now, run.auto_scheduled)
                for run in runs.values()
                if run.deployment_id is not None
            ],
            now=now,
            interval=lambda due: self.served[due.deployment_id].interval(due.expected_start),
            busy=busy,
            free_slots=free,
        )
        for due, why in skip:
            self._skip(client, runs[due.id], why)
        for due in start:
            self._claim(client, self.served[due.deployment_id], runs[due.id])

    def _skip(self, client: SyncPrefectClient, run: FlowRunResponse, why: str) -> None:
        from prefect.states import Cancelled

        _say(f"{_now()} {self.served[run.deployment_id].name}: Skipped: {why}")  # type: ignore[index]
        client.set_flow_run_state(run.id, Cancelled(name=SKIPPED, message=f"skipped: {why}"))

    def _claim(self, client: SyncPrefectClient, served: Served, run: FlowRunResponse) -> None:
        from prefect.client.schemas.objects import FlowRun
        from prefect.states import Pending

        result: Any = client.set_flow_run_state(
            run.id, Pending(message="claimed by runbook serve, runs in-process")
        )
        if result.state is None or not result.state.is_pending():
            return  # someone else claimed or cancelled it
        self.submit(served.flow, FlowRun.model_validate(run.model_dump()), served.name)

    def submit(self, flow: Flow[..., Any], run: FlowRun, name: str) -> None:
        """Run a flow run that is already Pending (claimed here, or created by the alert
        receiver) on a thread of the pool, tracked like every run of this runner."""
        with self._lock:
            self._active[run.id] = run.deployment_id or run.id
        # The run's thread sees this thread's Prefect settings (API URL, heartbeats off).
        context = contextvars.copy_context()
        future = self._pool.submit(context.run, self._execute, flow, run, name)
        with self._lock:
            if run.id in self._active:  # not already ended
                self._futures[run.id] = future

    def _execute(self, flow: Flow[..., Any], run: FlowRun, name: str) -> None:
        from prefect.exceptions import Abort
        from prefect.flow_engine import run_flow

        cancelled, failure = False, ""
        try:
            state: Any = run_flow(flow, flow_run=run, return_type="state")
            _say(f"{_now()} {name}: {state.name}: {state.message or ''}")
        except Abort:
            cancelled = True
            _say(f"{_now()} {name}: Cancelled")
        except BaseException as exc:  # keep the thread; the run must not stay Pending
            failure = f"{type(exc).__name__}: {exc}"
            _say(f"{_now()} {name}: ended with {failure}")
        finally:
            forget_cancel(run.id)
            try:
                final = self._final_state(run.id, cancelled, failure)
                if final is not None:
                    from prefect import get_client

                    with get_client(sync_client=True) as client:
                        client.set_flow_run_state(run.id, final, force=True)
            finally:
                with self._lock:
                    self._active.pop(run.id, None)
                    self._futures.pop(run.id, None)
                self._wake.set()

    @staticmethod
    def _final_state(run_id: UUID, cancelled: bool, failure: str) -> Any:
        """The state to end a run in that the flow engine did not end: Cancelled after a
        cancellation, Failed after an error raised before the run began (parameters the flow
        does not take, say), None when the run ended in a final state of its own."""
        from prefect import get_client
        from prefect.states import Cancelled, Failed

        if cancelled:
            return Cancelled(message="cancelled; stopped at its next task or wait")
        if not failure:
            return None
        with get_client(sync_client=True) as client:
            state = client.read_flow_run(run_id).state
        if state is not None and state.is_final():
            return None
        return Failed(message=f"the run could not start: {failure}"[:500])

    # -- stop -------------------------------------------------------------------------------

    def request_stop(self) -> None:
        """End serve()'s loop at its next wait (safe from a signal handler)."""
        self._stop.set()
        self._wake.set()

    def stop(self, client: SyncPrefectClient, grace_seconds: float = 15) -> None:
        """Stop polling, ask the runs in flight to stop at their next task, wait for them up
        to grace_seconds, and pause the deployments (their future scheduled runs are deleted
        by the server). Runs queued and not begun end Cancelled."""
        from prefect.states import Cancelled

        self.request_stop()
        with self._lock:
            active = list(self._active)
        for run_id in active:
            request_cancel(run_id)
        if active:
            _say(f"Stopping {len(active)} runs in flight at their next task")

        def ended() -> bool:
            with self._lock:
                return not self._active

        poll(
            ended,
            what="the runs in flight to stop",
            timeout_seconds=grace_seconds,
            first_delay_seconds=0.2,
            max_delay_seconds=0.2,
        )
        with self._lock:
            queued = [(run_id, f) for run_id, f in self._futures.items() if f.cancel()]
        for run_id, _ in queued:
            client.set_flow_run_state(
                run_id, Cancelled(message="runbook serve stopped before it began"), force=True
            )
        self._pool.shutdown(wait=False, cancel_futures=True)
        for deployment_id in self.served:
            try:
                client.pause_deployment(deployment_id)
            except Exception as exc:
                _say(f"could not pause {self.served[deployment_id].name}: {exc}")
        self._delete_left_scheduled(client)

    def _delete_left_scheduled(self, client: SyncPrefectClient) -> None:
        """Pausing deletes future scheduled runs; this deletes those already due and not
        claimed too, so none is left to start late (or to load the server) next time. Runs
        asked for by hand stay."""
        from prefect.client.schemas.filters import (
            DeploymentFilter,
            DeploymentFilterId,
            FlowRunFilter,
            FlowRunFilterState,
            FlowRunFilterStateType,
        )
        from prefect.client.schemas.objects import StateType

        try:
            left = client.read_flow_runs(
                deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=list(self.served))),
                flow_run_filter=FlowRunFilter(
                    state=FlowRunFilterState(
                        type=FlowRunFilterStateType(any_=[StateType.SCHEDULED])
                    )
                ),
                limit=200,
            )
            for run in left:
                if run.auto_scheduled:
                    client.delete_flow_run(run.id)
        except Exception as exc:
            _say(f"could not delete the scheduled runs left: {exc}")

    @property
    def active(self) -> int:
        with self._lock:
            return len(self._active)


_OUTPUT = threading.Lock()


def _say(line: str) -> None:
    """One line to standard output, whole: runs end in several threads at once."""
    with _OUTPUT:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


def _now() -> str:
    return f"{datetime.now(UTC):%H:%M:%S}"
