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
from uuid import UUID

_lock = threading.Lock()
_requested: set[UUID] = set()
SLICE_SECONDS = 0.5


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


def raise_if_cancel_requested(where: str) -> None:
    """Raises prefect.exceptions.Abort in a flow run whose cancellation was requested, after
    logging that it stops `where` (e.g. "before the next task")."""
    if not _requested:
        return
    from prefect.context import FlowRunContext, TaskRunContext
    from prefect.exceptions import Abort
    from prefect.logging import get_run_logger

    ctx = FlowRunContext.get()
    if ctx is None or ctx.flow_run is None or TaskRunContext.get() is not None:
        return
    with _lock:
        cancelled = ctx.flow_run.id in _requested
    if cancelled:
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
