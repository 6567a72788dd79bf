"""The journal of one flow run: its timeline (the shape of seed 003's post-incident list) and
the human answer to its approval request, gathered by the steps as they happen and handed to
the report by tasks.engine.finish.

Kept in a context variable that runbook_flow sets for the length of each run (journal_scope):
served runs each run in their own copy of the context (deployments.runner), and a subflow has
its own journal and gives its parent's back when it ends."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from uuid import UUID

from tasks.models import AlertInfo, Approval, ApprovalRecord, TimelineEntry, utcnow


@dataclass(frozen=True)
class RunOptions:
    """A runbook run's own options, from its flow's parameters: whether it acts, who decides
    on destructive actions, how long a paused run waits for an answer (seconds; None: the
    runbook changes nothing and has no such parameter)."""

    dry_run: bool
    approval: Approval = "ask"
    approval_timeout_seconds: int | None = None


@dataclass
class Journal:
    flow_run_id: UUID | None
    # The runbook's name, its run's options and its start (UTC): set by runbook_flow.
    runbook: str | None = None
    options: RunOptions | None = None
    started_at: datetime | None = None
    # A run of a deployment, or a subflow of one: a human can answer it in the Prefect UI.
    deployed: bool = False
    timeline: list[TimelineEntry] = field(default_factory=list)
    approval: ApprovalRecord | None = None
    # The actions the gate let through in this run (by identity): the only ones act may run.
    passed: set[int] = field(default_factory=set)
    # What the run holds until it finishes (a mutating-run slot): closed by close_journal.
    held: ExitStack = field(default_factory=ExitStack)
    # What its runbook declares (tasks.engine.runbook_flow): the inventory section of its
    # targets, and the kinds of action it may plan; None: not declared (a test's flow).
    inventory: str | None = None
    actions: tuple[str, ...] | None = None
    # The run's parent in this process (a subflow's), and the one-mutating-run slots this run
    # holds (resources, tasks.limits.mutating_run): a subflow does not wait for its parent.
    parent: Journal | None = None
    locks: set[str] = field(default_factory=set)
    # Called by the gate after approval and the locks, before rate slots are taken: each
    # skips the actions that can no longer run because others were skipped
    # (tasks.maintenance.MaintenancePair), so that they spend no rate.
    before_admit: list[Callable[[], None]] = field(default_factory=list)

    def note(self, event: str, detail: str = "") -> None:
        self.timeline.append(TimelineEntry(at=utcnow(), event=event, detail=detail))

    @contextmanager
    def holding(self, resource: str) -> Iterator[None]:
        """Within: this run holds the mutating slot of `resource` (held_by_ancestor)."""
        self.locks.add(resource)
        try:
            yield
        finally:
            self.locks.discard(resource)


def held_by_ancestor(resource: str) -> bool:
    """Whether a flow run enclosing the current one in this process (its parent, the
    parent's parent ...) holds the mutating slot of `resource` (tasks.limits.mutating_run)."""
    found = _current.get()
    ancestor = found.parent if found is not None else None
    while ancestor is not None:
        if resource in ancestor.locks:
            return True
        ancestor = ancestor.parent
    return False


_current: ContextVar[Journal | None] = ContextVar("runbook_journal", default=None)


def _flow_run() -> Any:
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    return ctx.flow_run if ctx is not None else None


@contextmanager
def journal_scope(
    inventory: str | None = None,
    actions: tuple[str, ...] | None = None,
    *,
    runbook: str | None = None,
    options: RunOptions | None = None,
) -> Iterator[Journal]:
    """A flow run's journal, from its start to its end (tasks.engine.runbook_flow): a subflow
    has its own and leaves its parent's as it was. On exit, what the run held is released.

    inventory, actions: what the runbook declares (Journal.inventory, Journal.actions);
    runbook, options: its name and the run's options (Journal.runbook, Journal.options)."""
    parent = _current.get()
    run = _flow_run()
    found = Journal(
        run.id if run is not None else None,
        deployed=(run is not None and run.deployment_id is not None)
        or (parent is not None and parent.deployed),
        runbook=runbook,
        options=options,
        inventory=inventory,
        actions=actions,
        parent=parent,
    )
    token = _current.set(found)
    try:
        yield found
    finally:
        found.held.close()
        _current.reset(token)


def journal() -> Journal:
    """The current flow run's journal (a fresh one outside any: unit tests of the gate)."""
    found = _current.get()
    if found is None:
        found = Journal(None)
        _current.set(found)
    return found


def begin(alert: AlertInfo | None = None) -> datetime:
    """A run's first step: notes the alert that started it, if any (the flows' `alert`
    parameter), then the start; returns the start time (UTC)."""
    found = journal()
    if alert is not None:
        labels = ", ".join(f"{k}={v}" for k, v in sorted(alert.labels.items()))
        found.timeline.append(
            TimelineEntry(
                at=alert.received_at or utcnow(),
                event="alert_received",
                detail=f"{alert.name} from {alert.source} {{{labels}}}",
            )
        )
    found.note("started")
    found.started_at = found.timeline[-1].at
    return found.started_at


def run_logger(fallback: str) -> logging.Logger | logging.LoggerAdapter[logging.Logger]:
    """The flow run's logger (its lines reach the Prefect UI), or the logger named fallback
    outside a run (unit tests, a helper thread without the run's context)."""
    from prefect.exceptions import MissingContextError
    from prefect.logging import get_run_logger

    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger(fallback)
