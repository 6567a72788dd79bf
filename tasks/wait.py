"""Waiting for a condition: the one polling loop of the runbooks and of the programs that serve
them, with a deadline, a backoff, and what it waited for in its timeout message.

Its pauses go through tasks.cancel.pause, so a run whose cancellation was requested stops
during a wait (prefect.exceptions.Abort), as it does between tasks. Outside such a run (the
CLI, `runbook serve` starting, tests) a pause is a plain sleep."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from tasks.cancel import pause
from tasks.errors import WaitTimedOut

T = TypeVar("T")


@dataclass(frozen=True)
class Polled(Generic[T]):
    """How a poll ended: the last value `check` returned, whether it counted as done, and the
    seconds waited (monotonic clock) against the timeout_seconds allowed."""

    what: str
    value: T
    done: bool
    seconds: float
    timeout_seconds: float

    @property
    def timeout_message(self) -> str:
        """What was waited for and for how long, e.g. "timed out after 10 s waiting for
        redis-server to answer"."""
        return f"timed out after {self.timeout_seconds:g} s waiting for {self.what}"

    def result(self) -> T:
        """The value that was done. Raises tasks.errors.WaitTimedOut (with timeout_message)
        when the poll ran out of time."""
        if not self.done:
            raise WaitTimedOut(self.timeout_message)
        return self.value


def poll(
    check: Callable[[], T],
    *,
    what: str,
    timeout_seconds: float,
    done: Callable[[T], object] = bool,
    first_delay_seconds: float = 0.5,
    max_delay_seconds: float = 5.0,
) -> Polled[T]:
    """Call check() until done(its value) is true, or timeout_seconds have passed.

    check runs at once, then after pauses that double from first_delay_seconds up to
    max_delay_seconds (equal values: a fixed interval), and once more at the deadline; the
    last pause is cut to the deadline. done defaults to truthiness. `what` names what is
    waited for, as it reads after "waiting for" (e.g. "the cancelled queries to end").

    Returns a Polled: never raises on timeout itself (Polled.result() does). Raises
    ValueError for a negative timeout or delays that are not positive and ordered, and
    prefect.exceptions.Abort when the flow run's cancellation is requested meanwhile;
    whatever check raises goes through unchanged."""
    if timeout_seconds < 0:
        raise ValueError(f"poll for {what}: timeout_seconds must be >= 0, got {timeout_seconds}")
    if not 0 < first_delay_seconds <= max_delay_seconds:
        raise ValueError(
            f"poll for {what}: need 0 < first_delay_seconds <= max_delay_seconds, got "
            f"{first_delay_seconds} and {max_delay_seconds}"
        )
    start, delay = time.monotonic(), first_delay_seconds
    while True:
        value = check()
        waited = time.monotonic() - start
        if done(value):
            return Polled(what, value, True, waited, timeout_seconds)
        left = timeout_seconds - waited
        if left <= 0:
            return Polled(what, value, False, waited, timeout_seconds)
        pause(min(delay, left))
        delay = min(delay * 2, max_delay_seconds)
