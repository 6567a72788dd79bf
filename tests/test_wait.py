"""tasks.wait.poll: the deadline, the backoff, the timeout message, and a wait that a cancelled
flow run leaves at once."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from itertools import pairwise

import pytest
from prefect import flow
from prefect.context import FlowRunContext
from prefect.exceptions import Abort

from tasks.cancel import forget_cancel, request_cancel
from tasks.errors import TargetError, WaitTimedOut
from tasks.wait import poll


def counter(ready_at: int) -> tuple[list[float], Callable[[], bool]]:
    """A check that is true from its ready_at-th call on, recording when it was called."""
    calls: list[float] = []

    def check() -> bool:
        calls.append(time.monotonic())
        return len(calls) >= ready_at

    return calls, check


def test_a_condition_already_true_is_checked_once_without_a_pause() -> None:
    calls, check = counter(1)
    waited = poll(check, what="nothing", timeout_seconds=10)
    assert waited.done and waited.value is True and len(calls) == 1
    assert waited.seconds < 0.1 and waited.result() is True


def test_the_pauses_double_up_to_their_maximum() -> None:
    calls, check = counter(5)
    waited = poll(
        check,
        what="the fifth call",
        timeout_seconds=10,
        first_delay_seconds=0.05,
        max_delay_seconds=0.2,
    )
    assert waited.done and len(calls) == 5
    gaps = [b - a for a, b in pairwise(calls)]
    for gap, planned in zip(gaps, [0.05, 0.1, 0.2, 0.2], strict=True):
        assert planned <= gap < planned + 0.15, gaps


def test_a_timeout_returns_the_last_value_and_says_what_was_waited_for() -> None:
    values = iter(range(100))
    started = time.monotonic()
    waited = poll(
        lambda: next(values),
        what="the counter to reach 100",
        timeout_seconds=0.5,
        done=lambda n: n >= 100,
        first_delay_seconds=0.1,
        max_delay_seconds=0.1,
    )
    took = time.monotonic() - started
    assert not waited.done and 0.5 <= took < 0.8
    # Checked at once, every 0.1 s, and once more at the deadline.
    assert 5 <= waited.value <= 6 and waited.seconds >= 0.5
    assert waited.timeout_message == ("timed out after 0.5 s waiting for the counter to reach 100")
    with pytest.raises(WaitTimedOut, match="waiting for the counter to reach 100") as raised:
        waited.result()
    assert isinstance(raised.value, TargetError) and raised.value.exit_code == 3


def test_a_zero_timeout_checks_once() -> None:
    calls, check = counter(2)
    waited = poll(check, what="a second call", timeout_seconds=0)
    assert not waited.done and len(calls) == 1


def test_what_check_raises_goes_through() -> None:
    def broken() -> bool:
        raise ConnectionError("refused")

    with pytest.raises(ConnectionError, match="refused"):
        poll(broken, what="a broken check", timeout_seconds=1)


@pytest.mark.parametrize(
    ("timeout", "first", "most", "says"),
    [
        (-1, 0.5, 5, "timeout_seconds must be >= 0, got -1"),
        (1, 0, 5, "need 0 < first_delay_seconds <= max_delay_seconds, got 0 and 5"),
        (1, 2, 1, "need 0 < first_delay_seconds <= max_delay_seconds, got 2 and 1"),
    ],
)
def test_bad_bounds_are_refused_with_what_to_fix(
    timeout: float, first: float, most: float, says: str
) -> None:
    with pytest.raises(ValueError, match=f"poll for the thing: {says}"):
        poll(
            lambda: True,
            what="the thing",
            timeout_seconds=timeout,
            first_delay_seconds=first,
            max_delay_seconds=most,
        )


@flow
def waits_for_ever() -> float:
    ctx = FlowRunContext.get()
    assert ctx is not None and ctx.flow_run is not None
    run_id = ctx.flow_run.id
    threading.Timer(0.5, request_cancel, [run_id]).start()
    started = time.monotonic()
    try:
        poll(lambda: False, what="never", timeout_seconds=60, first_delay_seconds=5)
    except Abort:
        return time.monotonic() - started
    finally:
        forget_cancel(run_id)
    raise AssertionError("the wait was not cancelled")


@pytest.mark.usefixtures("prefect_api")
def test_a_cancelled_run_stops_during_a_wait() -> None:
    # The first pause is 5 s long; the run's cancellation half a second in ends it.
    assert waits_for_ever() < 2
