"""The gate between plan and act: dry run, the approval policy, and who may approve.

Dry run stops every action here. Otherwise non-destructive actions pass, and destructive
ones pass only as the approval policy says:

- auto: approved (schedules and alert rules that were written to remediate on their own);
- never: skipped;
- ask: the approver in force decides. The CLI installs one (a terminal prompt, or --yes);
  a run with no approver skips them and says how to approve. Human approval from the Prefect
  UI plugs in here, as another approver.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Literal

from tasks.models import Action, ActionStatus

Approval = Literal["auto", "ask", "never"]
Approver = Callable[[list[Action]], bool]

_approver: ContextVar[Approver | None] = ContextVar("runbook_approver", default=None)


@contextmanager
def approver(decide: Approver | None) -> Iterator[None]:
    token = _approver.set(decide)
    try:
        yield
    finally:
        _approver.reset(token)


def gate(actions: list[Action], *, dry_run: bool, approval: Approval) -> list[Action]:
    """Mark what may not run as skipped and return the actions that may."""
    pending = [a for a in actions if a.status is ActionStatus.planned]
    if dry_run:
        for action in pending:
            action.detail = action.detail or "dry run: pass --apply (or dry_run=false) to act"
        return []
    destructive = [a for a in pending if a.destructive]
    reason = _refusal(destructive, approval) if destructive else None
    if reason:
        for action in destructive:
            _skip(action, reason)
    return [a for a in pending if a.status is ActionStatus.planned]


def _refusal(destructive: list[Action], approval: Approval) -> str | None:
    if approval == "auto":
        return None
    if approval == "never":
        return "approval policy is 'never'"
    decide = _approver.get()
    if decide is None:
        return "needs approval and no approver is present: run with --yes, or approval=auto"
    return None if decide(destructive) else "declined at the approval prompt"


def _skip(action: Action, reason: str) -> None:
    action.status = ActionStatus.skipped
    action.detail = reason
