"""The `fleet` flow: one runbook on many targets of its inventory section, chosen by a selector
(`all`, `a,b,c`, `env=prod,tier=db`), with AWS Systems Manager's rate control: a concurrency
cap and an error threshold, each a count or a percentage (tasks.fleet_rules).

It lives here, not in flows/: like a routine (deployments.routines) it is a way of running
runbooks, and it looks them up in the registry, which flows/ may not import.

Each target's run is the runbook's own flow as a tracked subflow of the fleet's run, called
from one task per target (`fleet-target`) on a ThreadPoolTaskRunner: Prefect 3.9 gives a
subflow called inside a task a unique key (Task.create_run, `_is_subflow_tracking_task`), so
concurrent subflows of one parent never share a tracking task run, as subflows called from
plain threads could (their keys are a per-flow counter; PrefectHQ/prefect#22259, fixed for
task-called subflows by #22286, which 3.9.1 has). The fleet starts one target (the
canary), then doubles the number in flight each time that many have finished without error, up
to the cap; once more targets than --max-errors allows have erred, it starts no more, lets the
ones in flight finish, and reports the rest `not_started` with the reason.

Every target's run goes through its own gate as any run of the runbook: the inventory's
[approval] policies, production targets and limits apply to each. The fleet publishes one
markdown artifact (key `fleet-<runbook>`: its targets worst first, then those not started) and
a progress artifact (targets ended of those selected, updated as they end: tasks.progress),
and ends with the worst of their statuses, in a runbook's final states (tasks.engine)."""

from __future__ import annotations

import queue
from collections import deque
from typing import Any, cast

from prefect import State, flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.futures import PrefectFuture
from prefect.logging import get_run_logger
from prefect.runtime import flow_run
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from deployments.catalog import RUNBOOKS
from deployments.config import load_config
from deployments.runner import quiet_thread_timeout_notice
from tasks.cancel import raise_if_cancel_requested
from tasks.engine import final_state
from tasks.errors import ConfigError
from tasks.fleet import FleetReport, NotStarted, fleet_status, render_fleet, totals_of
from tasks.fleet_rules import (
    DEFAULT_MAX_CONCURRENCY,
    DEFAULT_MAX_ERRORS,
    MAX_CONCURRENCY,
    Ramp,
    concurrency_of,
    is_error,
    parse_rate,
)
from tasks.gate import APPROVAL_TIMEOUT_SECONDS, ApprovalTimeout
from tasks.journal import journal_scope
from tasks.models import Approval, Finding, Report, RunStatus, Severity, utcnow
from tasks.outcome import state_report
from tasks.progress import progress


def failed_report(runbook: str, target: str, dry_run: bool, message: str) -> Report:
    """The report of a target whose run ended without one (it raised, crashed or could not
    start): failed, with the reason as its one critical finding."""
    now = utcnow()
    return Report(
        runbook=runbook,
        target=target,
        dry_run=dry_run,
        status=RunStatus.failed,
        findings=[
            Finding(check="runbook", target=target, severity=Severity.critical, message=message)
        ],
        actions=[],
        started_at=now,
        finished_at=now,
    )


@task(name="fleet-target", task_run_name="{target}", cache_policy=NO_CACHE, persist_result=False)
def run_target(runbook: str, target: str, options: dict[str, Any]) -> Report:
    """The runbook's flow on one target, as a subflow of the fleet's run; its report, or a
    failed one saying why there is none. Never raises: one target's end is not the fleet's."""
    sub = RUNBOOKS[runbook].load()
    dry_run = bool(options.get("dry_run", True))
    try:
        state = cast("State[Any]", sub(target=target, **options, return_state=True))
    except Exception as exc:  # it could not even start
        return failed_report(runbook, target, dry_run, f"could not start: {exc}"[:500])
    result = state_report(state)
    if isinstance(result, Report):
        return result
    report = failed_report(runbook, target, dry_run, (state.message or state.name or "")[:500])
    run_id = state.state_details.flow_run_id
    report.flow_run_id = None if run_id is None else str(run_id)
    return report


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
    # approval_timeout_seconds).
    options = {
        k: v
        for k, v in (
            ("dry_run", dry_run),
            ("approval", approval),
            ("approval_timeout_seconds", approval_timeout_seconds),
            ("params", params),
        )
        if k in sub.parameters.properties and v is not None
    }
    logger = get_run_logger()
    logger.info(
        "%s on %d target(s) (%s): at most %d at once, stops after more than %d error(s)",
        rb.name,
        len(selected),
        selector,
        ramp.cap,
        ramp.max_errors,
    )
    pending = deque(selected)
    finished: queue.SimpleQueue[PrefectFuture[Report]] = queue.SimpleQueue()
    running: dict[PrefectFuture[Report], str] = {}
    reports: dict[str, Report] = {}
    first_error: str | None = None
    # The subflows' journals inherit from this one whether the run is a deployment's. The
    # fleet's progress: targets ended of those selected (the UI's Artifacts tab, the CLI bar).
    with (
        journal_scope(runbook="fleet"),
        progress("targets", f"{rb.name} on {selector}", len(selected), "targets") as done,
    ):
        while True:
            while pending and ramp.may_start():
                # A cancelled fleet stops between targets (tasks.cancel).
                raise_if_cancel_requested("before the next target")
                target = pending.popleft()
                ramp.start()
                future = run_target.submit(rb.name, target, options)
                running[future] = target
                future.add_done_callback(finished.put)
            if not running:
                break
            future = finished.get()
            target = running.pop(future)
            try:
                report = future.result()
            except Exception as exc:  # the task itself failed: count it as the target's
                report = failed_report(rb.name, target, dry_run, f"{type(exc).__name__}: {exc}")
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
        flow_run_id=flow_run.get_id(),
    )
    create_markdown_artifact(
        markdown=render_fleet(fleet_report),
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


@flow(
    name="fleet",
    flow_run_name="{runbook} on {selector}",
    task_runner=THREADS,
)
def fleet(
    runbook: str,
    selector: str = "all",
    max_concurrency: str = DEFAULT_MAX_CONCURRENCY,
    max_errors: str = DEFAULT_MAX_ERRORS,
    dry_run: bool = True,
    approval: Approval = "ask",
    approval_timeout_seconds: ApprovalTimeout = APPROVAL_TIMEOUT_SECONDS,
    params: dict[str, Any] | None = None,
) -> State[FleetReport]:
    """One runbook on many targets, with rate control: a canary first, then doubling up to
    max_concurrency; no new target once the errors exceed max_errors.

    Args:
        runbook: the runbook to run (see `runbook list`).
        selector: "all", target names "a,b,c", or labels "env=prod,tier=db" (all must match).
        max_concurrency: targets at once: a count (1 to 50) or a percentage of the selected
            targets ("20%"), at least 1.
        max_errors: errors allowed before no new target starts: a count or a percentage of the
            selected targets (rounded down); "0" stops after the first. An error: a target
            whose run failed, or stayed unhealthy after acting.
        dry_run: True (the default): every target's run diagnoses and plans only.
        approval: passed to every target's run: "auto", "ask" (the default) or "never"; the
            inventory's [approval] and its targets may be stricter.
        approval_timeout_seconds: how long a target's run paused for approval waits, seconds.
        params: the runbook's parameters, the same for every target (its thresholds in the
            inventory still apply per target).
    """
    return run_fleet(
        runbook,
        selector,
        max_concurrency=max_concurrency,
        max_errors=max_errors,
        dry_run=dry_run,
        approval=approval,
        approval_timeout_seconds=approval_timeout_seconds,
        params=params,
    )
