"""Progress of long steps (a restore, an integrity check, a dump): one Prefect progress artifact
per step of a run, which the UI shows in the run's Artifacts tab as it moves, and the same
figures for whoever listens in this process (the CLI's progress bar).

    with progress("restore", f"restore of {name}", unit="bytes") as p:
        p.begin(size)                   # the total, from a real size, when it is known
        for chunk in p.count(chunks):   # or p.advance(n) / p.update(done)
            ...

Created at 0 % once the total is known, updated as the work advances but throttled (at most
one update every MIN_INTERVAL_SECONDS, and only when a whole percent has passed, so a 10 GB
restore sends about a hundred updates, not a million), 100 % when the step ends. Outside a
flow run only the listeners hear of it (no artifact). Progress never fails the work: an error
of the API or of a listener is logged once and ignored."""

from __future__ import annotations

import contextvars
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any, cast
from uuid import UUID

MIN_INTERVAL_SECONDS = 1.0
MiB = 1 << 20
GiB = 1 << 30


@dataclass(frozen=True)
class Snapshot:
    """One published state of a step: what it is, how much is done of the total (in `unit`:
    "bytes" or a plural noun such as "tables"), whether the total is an estimate (and of
    what), and whether the step has ended: finished (all of it done) or stopped short."""

    what: str
    done: int
    total: int
    unit: str
    estimate: str | None = None
    ended: bool = False
    stopped: bool = False  # ended by an error, or before all of the total was done

    @property
    def finished(self) -> bool:
        return self.ended and not self.stopped

    @property
    def percent(self) -> float:
        """0 to 100; 100 only once the step finished."""
        if self.finished:
            return 100.0
        return min(99.0, 100.0 * self.done / self.total) if self.total > 0 else 0.0

    def describe(self) -> str:
        """'restore of app: 412 of 1,024 MiB', '3 of 12 tables', with what an estimate is."""
        if self.stopped:
            return f"{self.what}: stopped at {amount(self.done, self.total, self.unit)}"
        text = f"{self.what}: {amount(self.done, self.total, self.unit, self.estimate)}"
        return f"{text} (the total is an estimate: {self.estimate})" if self.estimate else text


Listener = Callable[[Snapshot], None]
_listeners: contextvars.ContextVar[tuple[Listener, ...]] = contextvars.ContextVar(
    "runbook_progress_listeners", default=()
)


@contextmanager
def listening(listener: Listener) -> Iterator[None]:
    """Within: `listener` receives every snapshot the steps started in this context publish
    (the same throttled ones as the artifact, then the last), on whichever thread advances."""
    token = _listeners.set((*_listeners.get(), listener))
    try:
        yield
    finally:
        _listeners.reset(token)


def amount(done: int, total: int, unit: str, estimate: str | None = None) -> str:
    about = "about " if estimate else ""
    if unit != "bytes":
        return f"{done:,} of {about}{total:,} {unit}"
    # MiB up to 10 GiB: "412 of 1,024 MiB" says more than "0.4 of 1 GiB"
    scale, name = (GiB, "GiB") if total >= 10 * GiB else (MiB, "MiB")
    if total < MiB:
        scale, name = 1024, "KiB"
    return f"{_number(done / scale)} of {about}{_number(total / scale)} {name}"


def _number(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 or value == int(value) else f"{value:,.1f}"


class Progress:
    """A step's progress; use progress() to make one. Thread-safe: a dump read by boto3's
    upload threads advances it from them."""

    def __init__(self, step: str, what: str, unit: str, estimate: str | None) -> None:
        self.step, self.what, self.unit, self.estimate = step, what, unit, estimate
        self.done: int = 0
        self.total: int | None = None
        self.completed = True  # False after an error: end() says where it stopped
        self._lock = threading.Lock()
        # The Prefect run context, the API settings and the listeners, for any thread.
        self._context = contextvars.copy_context()
        self._listeners = _listeners.get()
        self._in_run = _in_flow_run()
        self._artifact: UUID | None = None
        self._sent_at, self._sent_percent = 0.0, -1
        self._warned = False

    def begin(self, total: int) -> None:
        """Start publishing, at 0 % (or where it is), now that the total is known: a real
        size (a file's, an object's), or an estimate when progress() was given one. Once."""
        with self._lock:
            if self.total is None:
                self.total = max(0, total)
                self._publish(self._snapshot())

    def advance(self, n: int) -> None:
        """n more done."""
        with self._lock:
            self.done += n
            self._throttled()

    def update(self, done: int) -> None:
        """`done` done in all (never goes back)."""
        with self._lock:
            self.done = max(self.done, done)
            self._throttled()

    def count(self, chunks: Iterable[bytes]) -> Iterator[bytes]:
        """The chunks, each counted when the consumer takes the next one (it is done with
        this one: written to pg_restore's stdin, hashed)."""
        for chunk in chunks:
            yield chunk
            self.advance(len(chunk))

    def fall_short(self) -> None:
        """The step ends without having done its work (the tool refused the backup, say),
        though it may have read all of it: the last update says where it stopped, not 100 %."""
        self.completed = False

    def end(self) -> None:
        """The last update: 100 % when the step finished with all of it done (an estimated
        total becomes what was done), else where it stopped."""
        with self._lock:
            if self.total is None:
                return
            if self.estimate is not None and self.completed:
                self.total, self.estimate = self.done, None
            stopped = not self.completed or self.done < self.total
            self._publish(replace(self._snapshot(), ended=True, stopped=stopped))

    def _snapshot(self) -> Snapshot:
        assert self.total is not None
        return Snapshot(self.what, self.done, self.total, self.unit, self.estimate)

    def _throttled(self) -> None:
        if self.total is None:
            return
        snapshot = self._snapshot()
        if int(snapshot.percent) <= self._sent_percent:
            return
        if time.monotonic() - self._sent_at < MIN_INTERVAL_SECONDS:
            return
        self._publish(snapshot)

    def _publish(self, snapshot: Snapshot) -> None:
        self._sent_at, self._sent_percent = time.monotonic(), int(snapshot.percent)
        for listener in self._listeners:
            try:
                listener(snapshot)
            except Exception as exc:
                self._warn(f"a progress listener failed: {type(exc).__name__}: {exc}")
        if self._in_run:
            try:
                # A copy of the opening context: the boto3 thread that reads a dump has no
                # Prefect settings, and one context cannot be entered by two threads at once.
                self._context.copy().run(self._send, snapshot)
            except Exception as exc:
                self._warn(
                    f"progress of {self.what} not published: {type(exc).__name__}: {exc}; "
                    "the work goes on"
                )

    def _send(self, snapshot: Snapshot) -> None:
        from prefect.artifacts import create_progress_artifact, update_progress_artifact

        if self._artifact is None:
            key = _key(self.step)
            created = create_progress_artifact(snapshot.percent, key, snapshot.describe())
            self._artifact = cast(UUID, created)  # sync here: no event loop in this thread
        else:
            update_progress_artifact(self._artifact, snapshot.percent, snapshot.describe())

    def _warn(self, message: str) -> None:
        if self._warned:
            return
        self._warned = True
        self._context.copy().run(_logger().warning, message)


@contextmanager
def progress(
    step: str,
    what: str,
    total: int | None = None,
    unit: str = "bytes",
    *,
    estimate: str | None = None,
) -> Iterator[Progress]:
    """A long step's progress, ended (100 %, or where it stopped) when the block exits.

    step: its name in the artifact's key (runbook-RUNBOOK-TARGET-STEP, stable per runbook and
    target so the UI keeps its history). what: what it does, for the description ("restore
    of app"). total: how much there is in `unit`, from a real size; None until p.begin(total).
    estimate: when the total is an estimate, of what ("the database's size on disk"); the
    description says so, and the last update takes what was done as the total."""
    p = Progress(step, what, unit, estimate)
    if total is not None:
        p.begin(total)
    try:
        yield p
    except BaseException:
        p.completed = False
        raise
    finally:
        p.end()


def _in_flow_run() -> bool:
    from prefect.context import FlowRunContext, TaskRunContext

    return FlowRunContext.get() is not None or TaskRunContext.get() is not None


def _key(step: str) -> str:
    from prefect.runtime import flow_run

    from tasks.render import artifact_key

    parameters: dict[str, Any] = flow_run.parameters or {}
    target = str(parameters.get("target") or flow_run.name or "run")
    return f"{artifact_key(str(flow_run.flow_name), target)}-{step}"


def _logger() -> logging.Logger | logging.LoggerAdapter[logging.Logger]:
    from prefect.exceptions import MissingContextError
    from prefect.logging import get_run_logger

    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger(__name__)
