"""Human approval of a deployed run from the Prefect UI: the form, and the wait for its answer.

A run that needs a human (approval "ask", no terminal approver) and was started from a
deployment (served, by a worker, by an alert) pauses: its state becomes Paused, with
ApprovalInput's JSON schema and the plan (approval_form) as the form's text, so the Prefect UI
shows the run Paused with a form. Other tools answer through Prefect's API:
`POST /api/flow_runs/{id}/resume` with `{"run_input": {"approve": true, "approver": "NAME",
"comment": "..."}}`; the server checks the input against the schema and keeps the run paused
when it does not fit.

Prefect's pause_flow_run does the same with two differences this module cannot live with: its
wait cannot be cancelled (it sleeps and only looks for Running), and its timeout fails the run.
Here the wait checks the run's cancellation every second, and no answer within the timeout is
an outcome (ApprovalRecord decision timed_out): the run resumes itself and reports its actions
skipped. The pause's own deadline is set PAUSE_MARGIN_SECONDS later, so Prefect's server
never fails the run first (its FailExpiredPauses service)."""

from __future__ import annotations

from collections import Counter
from datetime import timedelta
from typing import TYPE_CHECKING, Any
from uuid import UUID

from prefect.input import RunInput
from pydantic import Field

from tasks.errors import TargetError
from tasks.models import Action, ApprovalRecord, Decision, Finding, problems, utcnow
from tasks.wait import poll

if TYPE_CHECKING:
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.schemas.objects import State

PAUSE_MARGIN_SECONDS = 300
POLL_SECONDS = 1.0


class ApprovalInput(RunInput):
    """The approval form: the contract other tools drive through Prefect's resume API."""

    approve: bool = Field(False, description="carry out the actions listed above")
    approver: str = Field(
        min_length=1,
        max_length=200,
        pattern=r"\S",
        description="who decides: your name, for the report and the audit trail",
    )
    comment: str = Field("", max_length=2000, description="why, for the post-mortem")


def approval_form(
    runbook: str,
    target: str,
    actions: list[Action],
    before: list[Finding],
    deadline_seconds: int,
    *,
    why: str = "",
) -> str:
    """The form's text, in markdown: the evidence (what the diagnosis found), each action with
    its target, why (the problems found on that target) and what it changes, the blast radius
    (how many actions of each kind on which targets), how to answer, and why a human is asked
    (`why`: the policy in force and where it comes from). Pure."""
    found = problems(before)
    lines = [
        f"## Approval needed: {runbook} on `{target}`",
        "",
        f"{len(actions)} action(s) change the system. Approve to carry them out; leave "
        "*approve* off to reject (nothing runs). No answer within "
        f"{_duration(deadline_seconds)} counts as a rejection.",
        "",
        *([f"A human is asked because {why}.", ""] if why else []),
        "### What the diagnosis found",
        "",
    ]
    lines += [f"- **{f.severity.value}** {f.check} on `{f.target}`: {f.message}" for f in found]
    if not found:
        lines.append("- no problem above its threshold")
    lines += ["", "### What will change", ""]
    for i, action in enumerate(actions, 1):
        on_target = [f for f in found if f.target == action.target]
        why = (
            on_target[0].message
            if len(on_target) == 1
            else f"the {len(on_target)} problems above on `{action.target}`"
            if on_target
            else "the problems above"
        )
        lines.append(f"{i}. {action.description} on `{action.target}`; why: {why}")
    kinds = Counter((a.kind, a.target) for a in actions)
    lines += ["", "### Blast radius", ""]
    lines += [f"- {n} x {kind} on `{t}`" for (kind, t), n in sorted(kinds.items())]
    return "\n".join(lines) + "\n"


def _duration(seconds: int) -> str:
    if seconds % 3600 == 0:
        return f"{seconds // 3600} h"
    if seconds % 60 == 0:
        return f"{seconds // 60} min"
    return f"{seconds} s"


def wait_for_approval(form: str, timeout_seconds: int) -> ApprovalRecord:
    """Pause this flow run for a human's answer on the Prefect UI's form (module docstring).

    Returns the answer (approved or rejected, by whom, their comment) or, after
    timeout_seconds without one, a timed_out record with the run Running again.
    Raises prefect.exceptions.Abort when the run is cancelled meanwhile (the UI's Cancel, or
    `runbook serve` stopping), TargetError when Prefect's server refuses the pause or the
    resumption, RuntimeError outside a flow run (a bug in the caller)."""
    from prefect import get_client
    from prefect.context import FlowRunContext
    from prefect.input.run_input import keyset_from_paused_state
    from prefect.logging import get_run_logger
    from prefect.states import Paused
    from prefect.utilities.engine import propose_state_sync

    ctx = FlowRunContext.get()
    if ctx is None or ctx.flow_run is None:
        raise RuntimeError("wait_for_approval needs a flow run")
    run_id = ctx.flow_run.id
    requested = utcnow()
    until = requested + timedelta(seconds=timeout_seconds)
    paused: State[Any] = Paused(
        timeout_seconds=timeout_seconds + PAUSE_MARGIN_SECONDS,
        pause_key=f"approval-{requested:%Y%m%d%H%M%S%f}",
        message=f"waiting for approval until {until:%Y-%m-%d %H:%M} UTC",
    )
    keyset = keyset_from_paused_state(paused)
    paused.state_details.run_input_keyset = {str(k): v for k, v in keyset.items()}
    form_input = ApprovalInput.with_initial_data(description=form)
    log = get_run_logger()
    with get_client(sync_client=True) as client:
        state = propose_state_sync(client=client, state=paused, flow_run_id=run_id)
        if not state.is_paused():
            raise TargetError(f"Prefect did not pause the run for approval: {state.type.value}")
        # After the pause: Prefect's server deletes what a pause's keyset holds when it pauses.
        form_input.save(keyset, flow_run_id=run_id)
        log.warning("Paused for approval: answer on the run's page in the Prefect UI")
        answered = poll(
            lambda: _answer(client, run_id, form_input, keyset),
            what="an answer to the approval request",
            timeout_seconds=timeout_seconds,
            done=lambda answer: answer is not None,
            first_delay_seconds=POLL_SECONDS,
            max_delay_seconds=POLL_SECONDS,
        )
        if answered.done:
            return _record(answered.value, requested)
        answer = _resume_unanswered(client, run_id, form_input, keyset, timeout_seconds)
    if answer is not None:
        return _record(answer, requested)
    log.warning("No answer to the approval request within %s s", timeout_seconds)
    return ApprovalRecord(decision=Decision.timed_out, requested_at=requested, answered_at=utcnow())


def _answer(
    client: SyncPrefectClient, run_id: UUID, form_input: type[RunInput], keyset: Any
) -> Any | None:
    """The answer once the run was resumed with one; None while it waits. Abort when the run
    is being cancelled or has ended (Prefect's server expired it)."""
    from prefect.exceptions import Abort

    state = client.read_flow_run(run_id).state
    if state is None or state.is_paused():
        return None
    if state.is_running():
        return form_input.load(keyset, flow_run_id=run_id)
    raise Abort(f"the run left its pause for {state.type.value} while it waited for approval")


def _resume_unanswered(
    client: SyncPrefectClient,
    run_id: UUID,
    form_input: type[RunInput],
    keyset: Any,
    timeout_seconds: int,
) -> Any | None:
    """At the deadline: the answer if one came at the last moment, else the run Running again
    (None)."""
    from prefect.states import Running
    from prefect.utilities.engine import propose_state_sync

    answer = _answer(client, run_id, form_input, keyset)
    if answer is not None:
        return answer
    running: State[Any] = Running(
        message=f"no answer to the approval request within {timeout_seconds} s"
    )
    state = propose_state_sync(client=client, state=running, flow_run_id=run_id)
    if not state.is_running():
        raise TargetError(f"the run could not resume after its approval timed out: {state}")
    return None


def _record(answer: Any, requested: Any) -> ApprovalRecord:
    return ApprovalRecord(
        decision=Decision.approved if answer.approve else Decision.rejected,
        approver=answer.approver.strip(),
        comment=answer.comment.strip(),
        requested_at=requested,
        answered_at=utcnow(),
    )
