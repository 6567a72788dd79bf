"""A runbook's fleet flow: the runbook on many targets of its inventory section, chosen by a
selector (`all`, `a,b,c`, `env=prod,tier=db`), with AWS Systems Manager's rate control: a
concurrency cap and an error threshold, each a count or a percentage (tasks.fleet_rules).

Every runbook has one (fleet_of), named after the runbook, so that its deployment is
`NAME/fleet` and its runs sit beside the runbook's own in the UI; this module exposes each as an
attribute (the runbook's name with underscores) for prefect.yaml's entrypoints. It lives here,
not in flows/: like a routine (deployments.routines) it is a way of running runbooks, and it
looks them up in the registry, which flows/ may not import.

Each target's run is a tracked child run of the fleet's run, started from one task per target
(`fleet-target`) on a ThreadPoolTaskRunner, in one of two places:
- in this process, as a subflow: from the CLI, `runbook serve`, or a worker when the runbook
  has no deployment on the fleet's work pool. Prefect 3.9 gives a subflow called inside a task
  a unique key (Task.create_run, `_is_subflow_tracking_task`), so concurrent subflows of one
  parent never share a tracking task run, as subflows called from plain threads could
  (PrefectHQ/prefect#22259, fixed for task-called subflows by #22286, which 3.9.1 has);
- on the work pool, when the fleet itself runs there: a run of the runbook's deployment
  `NAME/TARGET`, else of another of its deployments on that pool with `target` set (the
  run is named after its target either way), linked to its `fleet-target` task, so that the
  pool's workers share the targets' runs. Its report comes back as its `runbook.report` event
  (tasks.render), since its result stays in its worker's process.

The fleet starts one target (the canary), then doubles the number in flight each time that
many have finished without error, up to the cap; once more targets than --max-errors allows
have erred, it starts no more, lets the ones in flight finish, and reports the rest
`not_started` with the reason. Cancelled (tasks.cancel), it starts no more either; its
subflows in flight stop at their next task, and on a pool Prefect's cancellation clean-up
cancels the child runs of a cancelled run. A bad selector or rate ends the run Failed with the
reason as its message.

Every target's run goes through its own gate as any run of the runbook: the inventory's
[approval] policies, production targets and limits apply to each. The fleet publishes one
markdown artifact (key `fleet-<runbook>`: its targets worst first, then those not started) and
a progress artifact (targets ended of those selected, updated as they end: tasks.progress),
and ends with the worst of their statuses, in a runbook's final states (tasks.engine)."""

from __future__ import annotations

import queue
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, cast
from uuid import UUID

import httpx
from prefect import Flow, State, get_client, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.context import FlowRunContext, TaskRunContext
from prefect.futures import PrefectFuture
from prefect.logging import get_run_logger
from prefect.states import Failed
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from deployments.catalog import RUNBOOKS, Runbook
from deployments.config import load_config
from deployments.runner import quiet_thread_timeout_notice
from tasks.cancel import cancel_requested, cancel_scope, raise_if_cancel_requested
from tasks.engine import final_state
from tasks.errors import ConfigError
from tasks.fleet import FleetReport, NotStarted, fleet_status, render_fleet, totals_of
from tasks.fleet_rules import (
    DEFAULT_MAX_CONCURRENCY,
    DEFAULT_MAX_ERRORS,
    FLEET,
    MAX_CONCURRENCY,
    Ramp,
    concurrency_of,
    is_error,
    parse_rate,
)
from tasks.gate import APPROVAL_TIMEOUT_SECONDS, ApprovalTimeout
from tasks.journal import journal_scope
from tasks.models import (
    AlertInfo,
    Approval,
    Finding,
    Report,
    RunStatus,
    Severity,
    utcnow,
)
from tasks.notify import run_link
from tasks.outcome import state_report
from tasks.progress import progress
from tasks.redact import prefect_secrets, redact_urls
from tasks.render import REPORT_EVENT
from tasks.wait import poll

# A target's run on the pool that no worker has taken after this long is cancelled and counted
# failed (no worker online, or all busy: the fleet's own run holds a slot of its worker).
START_TIMEOUT_SECONDS = 600
# A target's run taken by a worker that then died stays Running in Prefect: the fleet gives up
# on it after this long (beyond any approval wait), longer than any runbook's own bounds.
RUN_TIMEOUT_SECONDS = 6 * 3600
# The run's report event: sent when its process ends, stored by the server's event persister,
# which writes every few seconds (PREFECT_SERVER_SERVICES_EVENT_PERSISTER_FLUSH_INTERVAL, 5).
REPORT_WAIT_SECONDS = 60
POLL_SECONDS = 2
TASK_RUN_WAIT_SECONDS = 30


def report_without_run(
    runbook: str,
    target: str,
    dry_run: bool,
    message: str,
    status: RunStatus = RunStatus.failed,
    flow_run_id: UUID | None = None,
) -> Report:
    """The report of a target whose run ended without one the fleet could read (it raised,
    crashed, could not start, or its report never arrived): `status` (failed by default), with
    `message` (cut to 500 characters) as its one finding, critical unless the status is
    healthy or fixed."""
    now = utcnow()
    ok = status in (RunStatus.healthy, RunStatus.fixed)
    severity = Severity.ok if ok else Severity.critical
    finding = Finding(check="runbook", target=target, severity=severity, message=message[:500])
    return Report(
        runbook=runbook,
        target=target,
        dry_run=dry_run,
        status=status,
        findings=[finding],
        actions=[],
        started_at=now,
        finished_at=now,
        flow_run_id=None if flow_run_id is None else str(flow_run_id),
    )


@dataclass(frozen=True)
class TargetDeployments:
    """Where the targets' runs go: `by_target` maps a target to the deployment its run is
    created from on work pool `pool`; a target not in it runs in this process."""

    pool: str | None = None
    by_target: dict[str, UUID] = field(default_factory=dict)


def target_deployments(rb: Runbook, targets: list[str]) -> TargetDeployments:
    """On a work pool (the fleet's own run came from one): each target's own deployment
    `NAME/TARGET` of the runbook's flow on that pool, else the first (by name) of its others
    there; off a pool, or with none there, every target runs here."""
    context = FlowRunContext.get()
    pool = context.flow_run.work_pool_name if context and context.flow_run else None
    if pool is None:
        return TargetDeployments()
    from prefect.client.schemas.filters import (
        FlowFilter,
        FlowFilterName,
        WorkPoolFilter,
        WorkPoolFilterName,
    )

    with get_client(sync_client=True) as client:
        found = client.read_deployments(
            flow_filter=FlowFilter(name=FlowFilterName(any_=[rb.name])),
            work_pool_filter=WorkPoolFilter(name=WorkPoolFilterName(any_=[pool])),
        )
    module = rb.entrypoint.split(":")[0]
    own = {
        d.name: d.id
        for d in found
        if (d.entrypoint or "").split(":")[0].removesuffix(".py").replace("/", ".") == module
    }
    if not own:
        return TargetDeployments(pool)
    shared = own[min(own)]
    return TargetDeployments(pool, {t: own.get(t, shared) for t in targets})


# A subflow the Prefect API refused to create (503) is started again, up to START_ATTEMPTS
# times in all. On Prefect's SQLite server the two requests that create a subflow (its
# tracking task run, its flow run) read before they write, and SQLite refuses the write at once
# ("database is locked": a 503) when another write landed in between; Prefect's client gives
# up after 6 attempts (2 to 32 s apart), and 1-4 of 200 databases and 6-9 of 500 endpoints
# ended `failed` without their runbook having run (bench/fleet_paths.py). Only those creating
# requests: a 503 once the run exists could come after it acted, and it must not act twice.
START_ATTEMPTS = 3


def refused_to_create(exc: Exception) -> bool:
    """Whether exc is the API's 503 to a request creating a flow run or task run."""
    if not isinstance(exc, httpx.HTTPStatusError) or exc.response.status_code != 503:
        return False
    request = exc.request
    return request.method == "POST" and request.url.path.endswith(("/flow_runs/", "/task_runs/"))


def run_as_subflow(runbook: str, target: str, options: dict[str, Any], dry_run: bool) -> Report:
    """The runbook's flow on one target as a subflow of the fleet's run (started again when
    the API refused to create it: START_ATTEMPTS)."""
    sub = RUNBOOKS[runbook].load()
    for attempt in range(1, START_ATTEMPTS + 1):
        try:
            state = cast("State[Any]", sub(target=target, **options, return_state=True))
            break
        except Exception as exc:  # it could not even start
            if refused_to_create(exc) and attempt < START_ATTEMPTS:
                continue
            return report_without_run(runbook, target, dry_run, f"could not start: {exc}")
    result = state_report(state)
    if isinstance(result, Report):
        return result
    message = state.message or state.name or ""
    return report_without_run(
        runbook, target, dry_run, message, flow_run_id=state.state_details.flow_run_id
    )


ENDED = ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")


def run_as_deployment_run(
    deployment: UUID, pool: str, runbook: str, target: str, options: dict[str, Any], dry_run: bool
) -> Report:
    """A run of `deployment` on `target`, a child of the calling task, for a worker of `pool`;
    its report (its runbook.report event), once it ends. A run still waiting for a worker
    after START_TIMEOUT_SECONDS while the pool has no worker online (or is paused), or not
    ended within RUN_TIMEOUT_SECONDS (plus any approval wait), is cancelled, and the report
    says why it has none. Whatever ends this early (an API error too), the run is not left
    behind: it is asked to cancel (Cancelling: a worker that has it stops it)."""
    with get_client(sync_client=True) as client:
        parent = recorded_task_run(client)
        if parent is None:
            get_run_logger().warning(
                "%s: the fleet-target task run was not recorded within %d s; the run is "
                "created without a link to the fleet's run",
                target,
                TASK_RUN_WAIT_SECONDS,
            )
        child = client.create_flow_run_from_deployment(
            deployment,
            parameters={"target": target, **options},
            name=target,
            tags=["fleet"],
            parent_task_run_id=parent,
        )
        try:
            return follow(client, child.id, pool, runbook, target, options, dry_run)
        finally:
            cancel_unless_ended(client, child.id)


def follow(
    client: Any,
    run_id: UUID,
    pool: str,
    runbook: str,
    target: str,
    options: dict[str, Any],
    dry_run: bool,
) -> Report:
    """run_as_deployment_run's wait for `run_id` and its report."""
    from prefect.client.schemas.objects import WorkPoolStatus

    limit = RUN_TIMEOUT_SECONDS + float(options.get("approval_timeout_seconds") or 0)
    begun = time.monotonic()

    def state_type() -> str:
        state = client.read_flow_run(run_id).state
        return "" if state is None else state.type.value

    def wait(until: Callable[[], bool], what: str, seconds: float) -> bool:
        return poll(
            until,
            what=what,
            timeout_seconds=max(0.0, seconds),
            first_delay_seconds=POLL_SECONDS,
            max_delay_seconds=POLL_SECONDS,
        ).done

    def taken() -> bool:
        return state_type() not in ("SCHEDULED", "")

    what = f"a worker to take the run of {target}"
    while not wait(taken, what, START_TIMEOUT_SECONDS):
        # Waiting behind other runs on a pool with workers is not a fault; no worker is.
        if client.read_work_pool(pool).status != WorkPoolStatus.READY:
            message = f"no worker of pool {pool} took its run within {START_TIMEOUT_SECONDS} s"
            return report_without_run(runbook, target, dry_run, message, flow_run_id=run_id)
        if time.monotonic() - begun > limit:
            break
    left = limit - (time.monotonic() - begun)
    if not wait(lambda: state_type() in ENDED, f"the run of {target} to end", left):
        message = f"its run did not end within {limit:.0f} s"
        return report_without_run(runbook, target, dry_run, message, flow_run_id=run_id)
    ended = client.read_flow_run(run_id).state
    name = (ended.name or "").lower()
    message = ended.message or ended.name or ""
    if ended.type.value in ("CRASHED", "CANCELLED") or name not in RunStatus.__members__:
        # Ended before it made a report: none will come.
        return report_without_run(runbook, target, dry_run, message, flow_run_id=run_id)
    seen, report = poll(
        lambda: report_event(client, run_id),
        what=f"the report of {target}",
        timeout_seconds=REPORT_WAIT_SECONDS,
        done=lambda sent: sent[0],
        first_delay_seconds=1,
        max_delay_seconds=5,
    ).value
    if report is not None:
        return report
    status = RunStatus(name)
    message += (
        " (its report was too large for an event"
        if seen
        else f" (its report did not reach the fleet within {REPORT_WAIT_SECONDS} s"
    )
    if not dry_run and status not in (RunStatus.healthy, RunStatus.fixed):
        # It may have acted and failed to mend: rate control counts it as an error.
        status, message = RunStatus.failed, message + f"; {name} after it could act"
    return report_without_run(
        runbook, target, dry_run, message + ")", status=status, flow_run_id=run_id
    )


def cancel_unless_ended(client: Any, run_id: UUID) -> None:
    """Ask a run that has not ended to cancel (Cancelling: Prefect cancels one no worker has
    yet; a worker that has it stops it); a failure to ask is logged, not raised."""
    from prefect.states import Cancelling

    try:
        state = client.read_flow_run(run_id).state
        if state is None or state.type.value not in ENDED:
            client.set_flow_run_state(run_id, Cancelling(message="the fleet stopped waiting"))
    except Exception as exc:
        get_run_logger().warning("could not cancel run %s: %s", run_id, type(exc).__name__)


def recorded_task_run(client: Any) -> UUID | None:
    """The calling task's run id once the server has it, to link a child run to it; None when
    it does not within TASK_RUN_WAIT_SECONDS. Prefect records task runs from their events, a
    moment after they start; a child created earlier fails on the server's foreign key."""
    from prefect.exceptions import ObjectNotFound

    context = TaskRunContext.get()
    if context is None:
        return None
    run_id = context.task_run.id

    def recorded() -> bool:
        try:
            client.read_task_run(run_id)
        except ObjectNotFound:
            return False
        return True

    found = poll(
        recorded,
        what="the server to record the fleet-target task run",
        timeout_seconds=TASK_RUN_WAIT_SECONDS,
        first_delay_seconds=0.2,
        max_delay_seconds=2,
    )
    return run_id if found.done else None


def report_event(client: Any, run_id: UUID) -> tuple[bool, Report | None]:
    """Whether the server has the runbook.report event of flow run `run_id` (of the last
    day), and the report in it (None when it was too large to send)."""
    from prefect.events.filters import (
        EventFilter,
        EventNameFilter,
        EventOccurredFilter,
        EventResourceFilter,
    )

    page = client.read_events(
        filter=EventFilter(
            event=EventNameFilter(name=[REPORT_EVENT]),
            resource=EventResourceFilter(id=[f"prefect.flow-run.{run_id}"]),
            occurred=EventOccurredFilter(
                since=utcnow() - timedelta(days=1), until=utcnow() + timedelta(minutes=5)
            ),
        ),
        limit=1,
    )
    for event in page.events:
        sent = event.payload.get("report")
        return True, None if sent is None else Report.model_validate(sent)
    return False, None


@task(name="fleet-target", task_run_name="{target}", cache_policy=NO_CACHE, persist_result=False)
def run_target(
    runbook: str,
    target: str,
    options: dict[str, Any],
    dry_run: bool,
    where: TargetDeployments,
) -> Report:
    """The runbook's run on one target (the module docstring says where); its report, or one
    saying why there is none. Never raises: one target's end is not the fleet's."""
    deployment = where.by_target.get(target)
    if deployment is None or where.pool is None:
        return run_as_subflow(runbook, target, options, dry_run)
    try:
        return run_as_deployment_run(deployment, where.pool, runbook, target, options, dry_run)
    except Exception as exc:
        # The error's text may quote the API's URL and its credentials: the log gets it
        # redacted, the report only its kind.
        get_run_logger().error(
            "%s: its run on the pool failed: %s",
            target,
            redact_urls(f"{type(exc).__name__}: {exc}", prefect_secrets()),
        )
        message = f"its run on the pool failed ({type(exc).__name__}); see the fleet's log"
        return report_without_run(runbook, target, dry_run, message)


def run_fleet(
    runbook: str,
    selector: str,
    *,
    max_concurrency: str,
    max_errors: str,
    dry_run: bool,
    approval: Approval,
    approval_timeout_seconds: int,
    params: dict[str, Any] | None,
    alert: AlertInfo | None = None,
) -> State[FleetReport]:
    """The fleet in the current flow run (module docstring); its final state, with the
    FleetReport as its data. Raises ConfigError (before any target runs) for an unknown
    runbook, a bad selector or rate, or an invalid inventory."""
    started = utcnow()
    # The targets' tasks run on worker threads: Prefect's notice that a task timeout cannot
    # interrupt them there would be most of the log (each bounds its own I/O).
    quiet_thread_timeout_notice()
    if runbook not in RUNBOOKS:
        raise ConfigError(f"unknown runbook {runbook!r}; known: {', '.join(RUNBOOKS)}")
    rb = RUNBOOKS[runbook]
    settings = load_config()
    concurrency_rate = parse_rate(max_concurrency, "--max-concurrency", minimum=1)
    errors_rate = parse_rate(max_errors, "--max-errors", minimum=0)
    selected = rb.select(settings, selector)
    ramp = Ramp(
        cap=concurrency_of(concurrency_rate, len(selected)),
        max_errors=errors_rate.of(len(selected)),
    )
    sub = rb.load()
    # What the fleet passes down, as far as the runbook takes it (a read-only one has no
    # approval_timeout_seconds), in JSON's types: a run on the pool gets them as parameters.
    options = {
        k: v
        for k, v in (
            ("dry_run", dry_run),
            ("approval", approval),
            ("approval_timeout_seconds", approval_timeout_seconds),
            ("params", params),
            ("alert", None if alert is None else alert.model_dump(mode="json")),
        )
        if k in sub.parameters.properties and v is not None
    }
    logger = get_run_logger()
    context = FlowRunContext.get()
    assert context is not None and context.flow_run is not None, "run_fleet runs in a flow run"
    fleet_run_id = context.flow_run.id
    logger.info(
        "%s on %d target(s) (%s): at most %d at once, stops after more than %d error(s)",
        rb.name,
        len(selected),
        selector,
        ramp.cap,
        ramp.max_errors,
    )
    where = target_deployments(rb, selected)
    if where.pool is not None:
        here = [t for t in selected if t not in where.by_target]
        logger.info(
            "on work pool %s: %d target run(s) go to its workers; %d run in this process%s",
            where.pool,
            len(selected) - len(here),
            len(here),
            f" ({rb.name} has no deployment on the pool)" if here else "",
        )
    pending = deque(selected)
    finished: queue.SimpleQueue[PrefectFuture[Report]] = queue.SimpleQueue()
    running: dict[PrefectFuture[Report], str] = {}
    reports: dict[str, Report] = {}
    first_error: str | None = None
    # The subflows' journals inherit from this one whether the run is a deployment's. The
    # fleet's progress: targets ended of those selected (the UI's Artifacts tab, the CLI bar).
    # A cancelled fleet (tasks.cancel: the UI's Cancel, serve stopping) starts no new target;
    # its subflows in flight here stop at their next task, within its cancel_scope.
    with (
        journal_scope(runbook="fleet"),
        cancel_scope(fleet_run_id),
        progress("targets", f"{rb.name} on {selector}", len(selected), "targets") as done,
    ):
        while True:
            while pending and ramp.may_start() and not cancel_requested():
                target = pending.popleft()
                ramp.start()
                future = run_target.submit(rb.name, target, options, dry_run, where)
                running[future] = target
                future.add_done_callback(finished.put)
            if not running:
                break
            future = finished.get()
            target = running.pop(future)
            try:
                report = future.result()
            except Exception as exc:  # the task itself failed: count it as the target's
                message = f"{type(exc).__name__}: {exc}"
                report = report_without_run(rb.name, target, dry_run, message)
            reports[target] = report
            done.advance(1)
            error = is_error(report)
            if error and first_error is None:
                first_error = f"{target} {report.status.value}"
            ramp.finish(error)
            logger.info(
                "%s on %s: %s%s (in flight %d, limit %d, errors %d)",
                rb.name,
                target,
                report.status.value,
                " (an error)" if error else "",
                ramp.in_flight,
                ramp.limit,
                ramp.errors,
            )
        if pending:
            done.fall_short()
        raise_if_cancel_requested(f"with {len(pending)} target(s) not started")
    reason = ramp.stop_reason(errors_rate, first_error)
    not_started = [NotStarted(target=t, reason=reason) for t in pending]
    if not_started:
        logger.warning("%d target(s) %s", len(not_started), reason)
    ran = [reports[t] for t in selected if t in reports]
    status = fleet_status(ran, not_started)
    fleet_report = FleetReport(
        runbook=rb.name,
        selector=selector,
        status=status,
        targets=ran,
        not_started=not_started,
        totals=totals_of(ran, not_started),
        dry_run=dry_run,
        max_concurrency=ramp.cap,
        max_errors=ramp.max_errors,
        started_at=started,
        finished_at=utcnow(),
        flow_run_id=str(fleet_run_id),
    )
    create_markdown_artifact(
        markdown=render_fleet(fleet_report, lambda run_id: run_link(run_id, settings.notify)),
        key=f"fleet-{rb.name}",
        description=f"{rb.name} on {selector}: {status.value}",
    )
    t = fleet_report.totals
    message = (
        f"{rb.name} on {selector}: {status.value}; {t.healthy} healthy, {t.fixed} fixed, "
        f"{t.unhealthy} unhealthy, {t.failed} failed, {t.not_started} not started"
    )
    return final_state(status, fleet_report, message)


# The flow decorator's type wants a TaskRunner[PrefectFuture]; TaskRunner is invariant in it.
THREADS = cast(
    "TaskRunner[PrefectFuture[Any]]", ThreadPoolTaskRunner[Any](max_workers=MAX_CONCURRENCY)
)

FLEET_DOC = """{runbook} on many targets, with rate control: a canary first, then doubling up
to max_concurrency; no new target once the errors exceed max_errors.

Args:
    selector: "all", target names "a,b,c", or labels "env=prod,tier=db" (all must match).
    max_concurrency: targets at once: a count (1 to 50) or a percentage of the selected
        targets ("20%"), at least 1.
    max_errors: errors allowed before no new target starts: a count or a percentage of the
        selected targets (rounded down); "0" stops after the first. An error: a target whose
        run failed, or stayed unhealthy after acting.
    dry_run: True (the default): every target's run diagnoses and plans only.
    approval: passed to every target's run: "auto", "ask" (the default) or "never"; the
        inventory's [approval] and its targets may be stricter.
    approval_timeout_seconds: how long a target's run paused for approval waits, seconds.
    params: the runbook's parameters, the same for every target (its thresholds in the
        inventory still apply per target).
    alert: the alert that started the fleet, set by the alert receiver; every target's run
        begins with it.
"""


def fleet_of(runbook: str) -> Flow[..., State[FleetReport]]:
    """The fleet flow of one runbook: named after it (its deployment is `NAME/fleet`), each run
    named `fleet on SELECTOR`. Raises KeyError for an unknown runbook."""
    RUNBOOKS[runbook]

    def fleet(
        selector: str = "all",
        max_concurrency: str = DEFAULT_MAX_CONCURRENCY,
        max_errors: str = DEFAULT_MAX_ERRORS,
        dry_run: bool = True,
        approval: Approval = "ask",
        approval_timeout_seconds: ApprovalTimeout = APPROVAL_TIMEOUT_SECONDS,
        params: dict[str, Any] | None = None,
        alert: AlertInfo | None = None,
    ) -> State[FleetReport]:
        try:
            return run_fleet(
                runbook,
                selector,
                max_concurrency=max_concurrency,
                max_errors=max_errors,
                dry_run=dry_run,
                approval=approval,
                approval_timeout_seconds=approval_timeout_seconds,
                params=params,
                alert=alert,
            )
        except ConfigError as exc:  # a bad selector or rate, an invalid inventory: one line
            get_run_logger().error("%s", exc)
            return Failed(name="Failed", message=f"{runbook} on {selector}: {exc}"[:500])

    fleet.__doc__ = FLEET_DOC.format(runbook=runbook)
    # Its attribute here (prefect.yaml's entrypoint), which Prefect also reads from __name__.
    fleet.__qualname__ = fleet.__name__ = runbook.replace("-", "_")
    return Flow(
        fn=fleet, name=runbook, flow_run_name=f"{FLEET} on {{selector}}", task_runner=THREADS
    )


FLEETS: dict[str, Flow[..., State[FleetReport]]] = {name: fleet_of(name) for name in RUNBOOKS}
# prefect.yaml's entrypoints: deployments/fleet.py:<runbook name with underscores>.
globals().update({found.fn.__name__: found for found in FLEETS.values()})
