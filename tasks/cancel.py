"""Cancellation of runs served in-process (deployments.runner).

The runner marks a run with request_cancel() when someone sets it Cancelling (the UI's Cancel)
or serve stops. The run then raises prefect.exceptions.Abort at its next task call
(tasks.engine.RunbookTask) or during a wait of the flow between tasks (pause, and
tasks.wait.poll), which ends it without a Failed or Crashed state; the runner then
sets it Cancelled. Inside a task nothing is raised (Prefect would log the task as an error):
the task finishes on its own timeouts and the run stops at the next call. Outside such a run
(the CLI, tests) nothing is ever requested and the checks cost a set lookup."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from uuid import UUID

_lock = threading.Lock()
_requested: set[UUID] = set()
# The runs whose cancellation also stops the current one: a fleet's, for the subflows it runs
# in its process (cancel_scope). A context variable, so its tasks' threads inherit it.
_scope: ContextVar[frozenset[UUID]] = ContextVar("runbook_cancel_scope", default=frozenset())
SLICE_SECONDS = 0.5


@contextmanager
def cancel_scope(flow_run_id: UUID) -> Iterator[None]:
    """Within it, the cancellation of flow_run_id also stops the subflows started here."""
    token = _scope.set(_scope.get() | {flow_run_id})
    try:
        yield
    finally:
        _scope.reset(token)


def request_cancel(flow_run_id: UUID) -> None:
    """Ask the in-process run flow_run_id to stop at its next task or wait."""
    with _lock:
        _requested.add(flow_run_id)


def forget_cancel(flow_run_id: UUID) -> bool:
    """Drop a run's cancel request once it has ended; whether there was one."""
    with _lock:
        if flow_run_id in _requested:
            _requested.remove(flow_run_id)
            return True
        return False


def cancel_requested() -> bool:
    """Whether the current flow run (or a run whose cancel_scope it is in) was asked to stop;
    always False inside one of its tasks."""
    if not _requested:
        return False
    from prefect.context import FlowRunContext, TaskRunContext

    ctx = FlowRunContext.get()
    if ctx is None or ctx.flow_run is None:
        return False
    task = TaskRunContext.get()
    # A subflow called from a task still sees that task's context: only a task of this very
    # run is "inside a task".
    if task is not None and task.task_run.flow_run_id == ctx.flow_run.id:
        return False
    with _lock:
        return ctx.flow_run.id in _requested or bool(_scope.get() & _requested)


def raise_if_cancel_requested(where: str) -> None:
    """Raises prefect.exceptions.Abort in a flow run whose cancellation was requested
    (cancel_requested), after logging that it stops `where` (e.g. "before the next task")."""
    if cancel_requested():
        from prefect.exceptions import Abort
        from prefect.logging import get_run_logger

        get_run_logger().warning("Cancelled: stopping %s", where)
        raise Abort(f"cancelled: stopped {where}")


def pause(seconds: float) -> None:
    """time.sleep(seconds), in slices of at most SLICE_SECONDS, that ends with Abort as soon
    as the run's cancellation is requested (in a flow, between tasks)."""
    end = time.monotonic() + seconds
    while True:
        raise_if_cancel_requested("during a wait")
        left = end - time.monotonic()
        if left <= 0:
            return
        time.sleep(min(SLICE_SECONDS, left))
