"""What every runbook flow shares: the flow and task shapes, running approved actions, and
finishing a run (status, report, its artifacts (tasks.render), and the final Prefect state that
shows the outcome).

Outcome -> final state of the flow run (type, name), so the UI's run list shows it and a Prefect
automation can match it (event `prefect.flow-run.<name>`):

    healthy   -> COMPLETED "Healthy"      unhealthy -> FAILED "Unhealthy"
    fixed     -> COMPLETED "Fixed"        failed    -> FAILED "Failed"

Cancellation of runs served in-process (deployments.runner): see tasks.cancel; every task call
checks it first."""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable
from datetime import datetime
from typing import Any, ParamSpec, TypeVar, get_args

from prefect import Flow, Task
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.objects import State, TaskRun
from prefect.logging import get_run_logger
from prefect.runtime import flow_run
from prefect.states import Completed, Failed

from tasks.cancel import raise_if_cancel_requested
from tasks.errors import RunbookError, TargetUnreachable
from tasks.journal import RunOptions, begin, journal, journal_scope
from tasks.models import (
    Action,
    ActionStatus,
    AnyAction,
    Finding,
    Report,
    RunStatus,
    Severity,
    final_status,
    problems,
)
from tasks.outcome import Outcome, state_report
from tasks.render import publish

P = ParamSpec("P")
R = TypeVar("R")


def _transient(task: Task[..., Any], task_run: TaskRun, state: State[Any]) -> bool:
    """Retry connection trouble only: never auth errors, bad config or a refused action."""
    try:
        state.result()
    except TargetUnreachable as exc:
        return exc.transient
    except Exception:
        return False
    return False


class RunbookTask(Task[P, R]):
    """A Prefect task that first checks whether its flow run was cancelled."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise_if_cancel_requested("before the next task")
        return super().__call__(*args, **kwargs)


def io_task(
    name: str, *, timeout_seconds: float = 60, retries: int = 2
) -> Callable[[Callable[P, R]], Task[P, R]]:
    """One verb on one target: retried on transient connection errors, bounded in time.

    No caching: inputs carry secrets and every run must look at the live system."""

    def decorate(fn: Callable[P, R]) -> Task[P, R]:
        return RunbookTask(
            fn=fn,
            name=name,
            retries=retries,
            retry_delay_seconds=[1, 3],
            retry_condition_fn=_transient,
            timeout_seconds=timeout_seconds,
            cache_policy=NO_CACHE,
            persist_result=False,
        )

    return decorate


class RunbookFlow(Flow[P, State[Report]]):
    """A runbook's flow. Its function returns the final state (outcome_state); called directly,
    the flow returns the Report whatever the outcome, and raises what the run raised when it
    ended without one (a RunbookError: a target unreachable, bad configuration).

    inventory and actions: what runbook_flow declared for it."""

    inventory: str | None = None
    actions: tuple[str, ...] | None = None

    def __call__(  # type: ignore[override]
        self, *args: Any, return_state: bool = False, **kwargs: Any
    ) -> Any:
        state = super().__call__(*args, return_state=True, **kwargs)
        if return_state:
            return state
        result = state_report(state)
        if isinstance(result, Report):
            return result
        return state.result()


def runbook_flow(
    name: str, *, inventory: str | None = None, actions: tuple[str, ...] | None = None
) -> Callable[[Callable[P, State[Report]]], RunbookFlow[P]]:
    """The @flow of a runbook: named after it, each run named after its target, with its own
    journal (tasks.journal) from start to end, which begins with the alert that started it (its
    `alert` parameter) and the start, and holds the run's options (its `dry_run`, `approval`
    and `approval_timeout_seconds` parameters) for tasks.run.

    inventory: the inventory section its targets come from (postgres, redis, services, tls,
    s3, backups): the gate's mutating-run resource and policies, the audit's inventory.
    actions: every kind of action it may plan (Action.kind), as `get_args` of the Literal of
    kinds next to its rules (tasks/*_rules.py): the gate refuses to act when
    `[approval] <name>.<kind>` names another. Both must agree with its entry in
    deployments/catalog.py (tests/test_layers.py checks it); None: undeclared (a test's flow).
    """

    def decorate(fn: Callable[P, State[Report]]) -> RunbookFlow[P]:
        # Prefect reads the parameters from the signature and resolves string annotations in
        # the globals of the function it runs (this module's): give it them resolved already.
        signature = inspect.signature(fn, eval_str=True)

        @functools.wraps(fn)
        def run(*args: P.args, **kwargs: P.kwargs) -> State[Report]:
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            given = bound.arguments
            options = (
                RunOptions(
                    dry_run=given["dry_run"],
                    approval=given.get("approval", "ask"),
                    approval_timeout_seconds=given.get("approval_timeout_seconds"),
                )
                if "dry_run" in given
                else None
            )
            with journal_scope(inventory, actions, runbook=name, options=options):
                begin(given.get("alert"))
                return fn(*args, **kwargs)

        run.__signature__ = signature  # type: ignore[attr-defined]
        run.__doc__ = with_args(fn.__doc__ or "", signature)
        found = RunbookFlow(fn=run, name=name, flow_run_name="{target}")
        found.inventory, found.actions = inventory, actions
        return found

    return decorate


# What the parameters every runbook shares mean: the Args lines runbook_flow adds to a flow's
# docstring, which Prefect shows beside each field of the run form in the UI.
SHARED_ARGS = {
    "target": "the inventory target to run on (a NAME of its section).",
    "dry_run": "True (the default): diagnose and plan only; False: act on what the gate lets "
    "through.",
    "approval": 'who decides on destructive actions: "auto", "ask" (a human, the default) or '
    '"never"; [approval] and the target in the inventory may be stricter.',
    "approval_timeout_seconds": "how long a run paused for approval waits for an answer, in "
    "seconds (10 to 604800); no answer in time is a rejection.",
    "alert": "the alert that started the run, set by the alert receiver.",
}


def with_args(doc: str, signature: inspect.Signature) -> str:
    """A runbook's docstring with an Args section (Google style) for its parameters:
    SHARED_ARGS, `target` "all" when that is its default, and `params` naming its class."""
    lines = []
    for name, parameter in signature.parameters.items():
        text = SHARED_ARGS.get(name)
        if name == "target" and parameter.default == "all":
            text = 'one inventory target, or "all" (the default) for every one of its section.'
        elif name == "params":
            (cls,) = (a for a in get_args(parameter.annotation) if a is not type(None))
            text = f"the runbook's parameters ({cls.__name__}); unset ones come from the "
            text += "target's thresholds, then the defaults."
            if not cls.threshold_names():
                text = f"the runbook's parameters ({cls.__name__}): the run's own choices."
        if text:
            lines.append(f"    {name}: {text}")
    return inspect.cleandoc(doc) + "\n\nArgs:\n" + "\n".join(lines) if lines else doc


def final_state(status: RunStatus, report: Any, message: str) -> State[Any]:
    """The final state of a run that made `report`: COMPLETED Healthy or Fixed with the report
    as its data, FAILED Unhealthy or Failed with it inside an Outcome; named after the status,
    `message` (cut to 500 characters) its message."""
    name, message = status.value.capitalize(), message[:500]
    if status in (RunStatus.healthy, RunStatus.fixed):
        return Completed(data=report, name=name, message=message)
    return Failed(data=Outcome(report, message), name=name, message=message)


def outcome_state(report: Report) -> State[Report]:
    """The run's final state: COMPLETED Healthy or Fixed, FAILED Unhealthy or Failed (see the
    module docstring), the report as its data and the problems in its message, the first
    critical one named (a routine's summary row shows this message)."""
    found = sorted(problems(report.findings), key=lambda f: f.severity is not Severity.critical)
    failed = [a for a in report.actions if a.status is ActionStatus.failed]
    message = f"{report.runbook} on {report.target}: {report.status.value}"
    if failed:
        message += f"; {len(failed)} action(s) failed: {failed[0].detail}"
    elif found:
        message += f"; {len(found)} problem(s): {found[0].message}"
    return final_state(report.status, report, message)


def gated(actions: list[AnyAction]) -> list[AnyAction]:
    """The actions the gate let through in this run; any other is marked failed and logged,
    never carried out (a dry run lets none through)."""
    passed = journal().passed
    for action in (a for a in actions if id(a) not in passed):
        action.status = ActionStatus.failed
        action.detail = "refused: it did not pass the gate (dry run, approval, limits)"
        get_run_logger().error("%s on %s %s", action.kind, action.target, action.detail)
    return [a for a in actions if id(a) in passed]


def run_action(action: Action, do: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R | None:
    """Carry out one action the gate let through (gated: any other is refused). Its outcome
    lands on the action (a str result becomes its detail); a failure is logged, marks the run
    failed, and the report says which and why. Its start and end go on the run's timeline."""
    log = journal()
    if not gated([action]):
        return None
    log.note("action_started", f"{action.kind} on {action.target}: {action.description}")
    try:
        result = do(*args, **kwargs)
    except RunbookError as exc:
        action.status = ActionStatus.failed
        action.detail = str(exc)
        get_run_logger().error("%s on %s failed: %s", action.kind, action.target, exc)
    else:
        action.status = ActionStatus.done
        if isinstance(result, str):
            action.detail = result
    log.note("action_ended", f"{action.kind} on {action.target}: {action.status.value}")
    return result if action.status is ActionStatus.done else None


def finish(
    runbook: str,
    target: str,
    *,
    dry_run: bool,
    started_at: datetime,
    before: list[Finding],
    after: list[Finding],
    actions: list[Action],
) -> State[Report]:
    """The report of a run, published as artifacts and logged; returned as the run's final
    state (outcome_state)."""
    log = journal()
    status = final_status(before, after, actions)
    if any(a.status in (ActionStatus.done, ActionStatus.failed) for a in actions):
        log.note("verified", f"{len(problems(after))} problem(s) remain")
    log.note("finished", status.value)
    report = Report(
        runbook=runbook,
        target=target,
        dry_run=dry_run,
        status=status,
        findings=after,
        actions=actions,
        started_at=started_at,
        finished_at=log.timeline[-1].at,
        flow_run_id=flow_run.get_id(),
        approval=log.approval,
        timeline=log.timeline,
    )
    publish(report, before)
    for problem in tell(report, before):
        get_run_logger().warning("%s", problem)
    get_run_logger().log(
        logging.INFO if report.exit_code == 0 else logging.WARNING,
        "%s on %s: %s",
        runbook,
        target,
        report.status.value,
    )
    return outcome_state(report)


def tell(report: Report, before: list[Finding]) -> list[str]:
    """A finished run's audit trail (tasks.audit: events, and rows with [audit]) and its
    notifications (tasks.notify, [notify]). Returns what could not be recorded or sent, for
    the run's log; neither changes the run's outcome."""
    from tasks.audit import record
    from tasks.notify import notify_report
    from tasks.settings import load_settings

    try:
        settings = load_settings()
    except RunbookError as exc:
        return [f"audit and notifications skipped: {exc}"]
    inventory = journal().inventory or "other"
    return record(report, inventory=inventory, settings=settings.audit) + notify_report(
        report, before, settings.notify
    )
