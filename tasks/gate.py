"""The gate between plan and act: dry run, the approval policy, and who may approve.

A dry run stops every action here. Otherwise non-destructive actions pass, and each
destructive one passes as its policy says (action_policy): the strictest of

- the run's `approval` parameter (what a schedule, a route or the person starting it asks);
- the inventory's `[approval] <runbook>.<action_kind>`;
- the `approval` of the targets it touches (the run's target, the target of the same
  inventory section the action names, e.g. the service a restart acts on, and the target its
  `touches` names in another section, e.g. "services.api" for the maintenance pair);

where auto < ask < never, and `production = true` on such a target turns auto into ask.

- auto: approved;
- never: skipped;
- ask: a human decides. The CLI installs an approver (a terminal prompt, or --yes). A run of
  a deployment (served, worker, alert) with none pauses for an answer on its form in the
  Prefect UI (tasks.approval), up to its approval_timeout_seconds; no answer is a rejection.
  Anything else skips them and says how to approve.

Every decision lands on the actions (skipped, with the reason), on the run's journal (the
timeline, and the human answer for the report), and in the run's logs.
"""

from __future__ import annotations

import getpass
import logging
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from difflib import SequenceMatcher
from functools import cache
from typing import Annotated, Any, get_args, get_origin

from pydantic import Field

from tasks.errors import ConfigError
from tasks.journal import journal, run_logger
from tasks.models import (
    Action,
    ActionStatus,
    AnyAction,
    Approval,
    ApprovalRecord,
    Decision,
    Finding,
    problems,
    touched_ref,
    utcnow,
)

# One hour, as Prefect's own pause_flow_run default: long enough to wake someone (seed 002's
# escalation levels run 15 min to 1 h), short enough that a stale plan is not carried out.
APPROVAL_TIMEOUT_SECONDS = 3600
ApprovalTimeout = Annotated[int, Field(ge=10, le=7 * 86400, description="seconds")]
STRICTNESS: dict[Approval, int] = {"auto": 0, "ask": 1, "never": 2}

Approver = Callable[[list[Action]], bool]


@dataclass(frozen=True)
class _TerminalApprover:
    decide: Approver
    who: str


_approver: ContextVar[_TerminalApprover | None] = ContextVar("runbook_approver", default=None)


@contextmanager
def approver(decide: Approver | None, who: str | None = None) -> Iterator[None]:
    """Within: `ask` is answered by decide(actions) (the CLI's prompt or --yes), on behalf of
    `who` (default: the login name)."""
    token = _approver.set(
        None if decide is None else _TerminalApprover(decide, who or login_name())
    )
    try:
        yield
    finally:
        _approver.reset(token)


def login_name() -> str:
    try:
        return getpass.getuser()
    except (OSError, KeyError):
        return "the terminal's user"


@dataclass(frozen=True)
class Policy:
    """The policy in force for one action, and where it comes from (for the report)."""

    approval: Approval
    source: str


def action_policy(
    requested: Approval,
    action: Action,
    *,
    runbook: str | None,
    kind_policies: dict[str, dict[str, Approval]],
    targets: dict[str, Any],
) -> Policy:
    """The policy for one destructive action (module docstring). targets: the inventory
    targets it touches, by name (each with .approval and .production). Pure."""
    candidates = [Policy(requested, "the run's approval")]
    if runbook is not None and (kind := kind_policies.get(runbook, {}).get(action.kind)):
        candidates.append(Policy(kind, f"[approval] {runbook}.{action.kind}"))
    candidates += [Policy(t.approval, f"target {name!r}") for name, t in targets.items()]
    policy = max(candidates, key=lambda p: STRICTNESS[p.approval])
    production = [name for name, t in targets.items() if t.production]
    if policy.approval == "auto" and production:
        return Policy("ask", f"target {production[0]!r} is production")
    return policy


def gate(
    actions: list[AnyAction],
    before: list[Finding],
    *,
    dry_run: bool,
    approval: Approval,
    timeout_seconds: int = APPROVAL_TIMEOUT_SECONDS,
) -> list[AnyAction]:
    """Mark what may not run as skipped and return the actions that may, in order.

    before: the diagnosis the plan came from (the evidence on an approval form).
    timeout_seconds: how long a paused run waits for an answer."""
    pending = [a for a in actions if a.status is ActionStatus.planned]
    log = journal()
    log.note("diagnosed", f"{len(problems(before))} problem(s); {len(pending)} action(s) planned")
    if dry_run:
        for action in pending:
            action.detail = action.detail or "dry run: pass --apply (or dry_run=false) to act"
        return []
    runbook, target = _run_identity()
    policy_of = _policies(approval, runbook, target)
    asked: list[Action] = []
    sources: list[str] = []
    for action in (a for a in pending if a.destructive):
        policy = policy_of(action)
        if policy.approval == "never":
            _skip(action, f"approval policy is 'never' ({policy.source})")
        elif policy.approval == "ask":
            asked.append(action)
            sources += [policy.source] if policy.source not in sources else []
    if asked:
        why = f"the policy in force is 'ask' ({'; '.join(sources)})"
        _ask(asked, before, runbook or "this runbook", target or "?", why, timeout_seconds)
    if runbook is not None and target is not None:
        _within_limits([a for a in pending if a.status is ActionStatus.planned], runbook, target)
    passed = [a for a in pending if a.status is ActionStatus.planned]
    log.passed.update(id(a) for a in passed)
    return passed


def _within_limits(actions: list[Action], runbook: str, target: str) -> None:
    """Blast-radius limits over time (tasks.limits), after approval so that a run waiting for
    an answer holds nothing: one mutating run at a time per target (held until the run ends,
    by its journal; a run changing it already is waited for, up to a minute), for the run's
    own target and each other target the actions touch (Action.touches), all taken in one
    pass in name order so that two runs never wait on each other; then the rate of each
    action kind on what it acts on (tasks.limits.acted_on). What is over a limit is skipped,
    saying which limit and when it frees: everything when the run's own target is held by
    another run, else only the actions whose touched target is. The journal's before_admit
    checks run between the two, so that what a lock skip leaves pointless takes no rate."""
    if not actions:
        return
    from tasks.limits import admit, mutating_run
    from tasks.settings import load_settings

    log = journal()
    resource = f"{log.inventory}.{target}" if log.inventory is not None else target
    with ExitStack() as taken:
        for name in sorted({resource} | {a.touches for a in actions if a.touches}):
            busy = taken.enter_context(mutating_run(name))
            if busy is None:
                continue
            if name == resource:
                # Release what this pass took before it: the run changes nothing.
                for action in actions:
                    _skip(action, busy)
                return
            for action in (a for a in actions if a.touches == name):
                _skip(action, busy)
        log.held.enter_context(taken.pop_all())
    for check in log.before_admit:
        check()
    admit(
        [a for a in actions if a.status is ActionStatus.planned],
        rates=load_settings().limits,
    )


def _run_identity() -> tuple[str | None, str | None]:
    """The runbook and target of the flow run we are in, if any."""
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    if ctx is None or ctx.flow is None:
        return None, None
    target = (ctx.parameters or {}).get("target")
    return ctx.flow.name, target if isinstance(target, str) else None


def _policies(
    requested: Approval, runbook: str | None, target: str | None
) -> Callable[[Action], Policy]:
    """action -> the policy in force for it in this run (action_policy, with the inventory
    read once)."""
    if runbook is None:
        return lambda action: Policy(requested, "the run's approval")
    from tasks.settings import load_settings

    settings = load_settings()
    log = journal()
    _known_kinds(runbook, settings.approval.get(runbook, {}), log.actions)
    _no_misspelt_runbook(runbook, settings.approval)
    section = settings.targets(log.inventory) if log.inventory is not None else {}

    def policy(action: Action) -> Policy:
        # action.target names a target of the run's section unless touches names another
        # section (disk-space's delete_backup: its target is a backup set's NAME, and a
        # [disk.NAME] of that name is not what it changes).
        own = action.touches is None or action.touches.startswith(f"{log.inventory}.")
        names = {target, action.target} if own else {target}
        touched = {n: section[n] for n in names if n is not None and n in section}
        if action.touches is not None:
            touched[action.touches] = touched_target(settings, action.touches)
        return action_policy(
            requested, action, runbook=runbook, kind_policies=settings.approval, targets=touched
        )

    return policy


def touched_target(settings: Any, touches: str) -> Any:
    """The inventory entry an Action.touches names ("section.NAME", e.g. "services.api"),
    with its .approval and .production. Only inventory sections (the Settings fields that map
    names to targets) count: "limits.restart_service" is none.

    Raises ValueError when the inventory has no such section or target: a runbook sets
    touches only to a target it read from the inventory, so this is a bug in the runbook."""
    ref = touched_ref(touches)
    entries = getattr(settings, ref[0]) if ref and ref[0] in inventory_sections() else None
    if ref is None or not isinstance(entries, dict) or ref[1] not in entries:
        raise ValueError(
            f"an action touches {touches!r}, which is no inventory target (want "
            "'section.NAME' of a target the inventory has): a bug in the runbook that planned it"
        )
    return entries[ref[1]]


@cache
def inventory_sections() -> frozenset[str]:
    """The inventory's sections of targets: the Settings fields of dict[str, <a target>],
    a target being a model with approval and production (postgres, services, backups ...)."""
    from tasks.settings import Settings

    found = set()
    for name, info in Settings.model_fields.items():
        args = get_args(info.annotation)
        if get_origin(info.annotation) is dict and len(args) == 2:
            fields = getattr(args[1], "model_fields", {})
            if "approval" in fields and "production" in fields:
                found.add(name)
    return frozenset(found)


def _known_kinds(
    runbook: str, configured: dict[str, Approval], declared: tuple[str, ...] | None
) -> None:
    """Refuse to act when `[approval] <runbook>.<kind>` names a kind the runbook does not
    declare (tasks.engine.runbook_flow): a misspelt `never` must not let the action through.
    The entry points check every runbook's keys when they load the inventory
    (deployments.config); a worker loads it here, so the run checks its own.

    Raises ConfigError naming the key and the kinds there are."""
    if declared is None:
        return
    from tasks.settings import ENV_PREFIX, config_path

    for kind in configured:
        if kind not in declared:
            raise ConfigError(
                f"{config_path()}: approval.{runbook}.{kind}: {runbook} plans no action of that "
                f"kind; its kinds: {', '.join(declared) or 'none (it changes nothing)'}; correct "
                f"it there or in {ENV_PREFIX}APPROVAL__{runbook.upper()}__{kind.upper()}"
            )


# Two runbook names this alike are one misspelt (difflib's ratio; the registry's own names
# stay below it: tests/test_gate_walk.py).
MISSPELT_RATIO = 0.85


def _no_misspelt_runbook(runbook: str, configured: dict[str, dict[str, Approval]]) -> None:
    """Refuse to act when an `[approval]` section names a runbook that is not this one but is
    spelt almost like it (`postgres-conections`): its policies, a `never` perhaps, were meant
    for this run. A worker-started run loads no registry to know every runbook's name; each
    runbook catches the misspellings of its own.

    Raises ConfigError naming the section and the runbook it was likely meant for."""
    from tasks.settings import config_path

    for name in configured:
        if name != runbook and SequenceMatcher(None, name, runbook).ratio() >= MISSPELT_RATIO:
            raise ConfigError(
                f"{config_path()}: approval.{name}: no runbook is called {name!r}; did you mean "
                f"{runbook!r}? Correct the section's name: its policies would not apply"
            )


def _ask(
    actions: list[Action],
    before: list[Finding],
    runbook: str,
    target: str,
    why: str,
    timeout_seconds: int,
) -> None:
    from tasks.approval import approval_form

    log = journal()
    terminal = _approver.get()
    if terminal is None and not log.deployed:
        for action in actions:
            _skip(
                action,
                "needs approval and no approver is present: run with --yes, or "
                "approval=auto, or start it from its deployment to approve in the Prefect UI",
            )
        return
    log.note("approval_requested", f"{len(actions)} action(s)")
    if terminal is not None:
        requested = utcnow()
        approved = terminal.decide(actions)
        record = ApprovalRecord(
            decision=Decision.approved if approved else Decision.rejected,
            approver=terminal.who,
            requested_at=requested,
            answered_at=utcnow(),
        )
    else:
        form = approval_form(runbook, target, actions, before, timeout_seconds, why=why)
        record = _wait_telling_people(form, actions, before, runbook, target, timeout_seconds)
    log.approval = record
    log.note("approval_answered", _answer_text(record, timeout_seconds))
    run_logger(__name__).log(
        logging.INFO if record.decision is Decision.approved else logging.WARNING,
        "approval of %d action(s): %s",
        len(actions),
        _answer_text(record, timeout_seconds),
    )
    if record.decision is not Decision.approved:
        for action in actions:
            _skip(action, _answer_text(record, timeout_seconds))


def _wait_telling_people(
    form: str,
    actions: list[Action],
    before: list[Finding],
    runbook: str,
    target: str,
    timeout_seconds: int,
) -> ApprovalRecord:
    """wait_for_approval, with the approval request sent to the [notify] routes that take it
    (the form's text and the link to the paused run), and escalated to the later levels while
    it stays unanswered (tasks.notify.Escalation)."""
    from tasks.approval import wait_for_approval
    from tasks.notify import Escalation, run_severity, send
    from tasks.settings import load_settings

    settings = load_settings().notify
    run_id = journal().flow_run_id
    message: dict[str, Any] = {
        "runbook": runbook,
        "target": target,
        "severity": run_severity(before),
        "title": f"{runbook} on {target}: {len(actions)} action(s) wait for approval",
        "body": form,
        "flow_run_id": str(run_id) if run_id else None,
    }
    for failure in send("approval_needed", settings=settings, **message):
        run_logger(__name__).warning("%s", failure)
    escalation = Escalation(settings, **message)
    escalation.start()
    try:
        return wait_for_approval(form, timeout_seconds)
    finally:
        escalation.cancel()


def _answer_text(record: ApprovalRecord, timeout_seconds: int) -> str:
    if record.decision is Decision.timed_out:
        return (
            f"no answer to the approval request within {timeout_seconds} s: "
            "timed out, not carried out"
        )
    said = f": {record.comment}" if record.comment else ""
    return f"{record.decision.value} by {record.approver}{said}"


def _skip(action: Action, reason: str) -> None:
    action.status = ActionStatus.skipped
    action.detail = reason
