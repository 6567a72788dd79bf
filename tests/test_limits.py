"""Blast-radius limits over time: rate limits and one mutating run per target, kept by a real
Prefect API (the session's), across OS processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from deployments.config import load_config
from tasks.errors import ConfigError, TargetError
from tasks.limits import (
    DEFAULT_RATES,
    UNRATED,
    RateLimit,
    admit,
    mutating_limit_name,
    mutating_run,
    rate_limit_name,
)
from tasks.models import Action, ActionStatus
from tasks.settings import load_settings

HOUR = RateLimit(max=2, per_seconds=3600)
# A child process: import, say it is ready, wait for the go file, then do its part.
CHILD_ADMIT = """
import json, sys, time
from pathlib import Path
from tasks.limits import RateLimit, admit
from tasks.models import Action
go, ready, service = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
ready.touch()
while not go.exists():
    time.sleep(0.01)
actions = [
    Action(kind="restart_service", target=service, description="restart", destructive=True)
    for _ in range(2)
]
admit(actions, rates={"restart_service": RateLimit(max=2, per_seconds=3600)})
print(json.dumps([[a.status.value, a.detail] for a in actions]))
"""
CHILD_HOLD = """
import sys, time
from pathlib import Path
from tasks.limits import mutating_run
held, release, resource = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
with mutating_run(resource) as reason:
    assert reason is None, reason
    held.touch()
    while not release.exists():
        time.sleep(0.05)
"""


def restart(target: str) -> Action:
    return Action(kind="restart_service", target=target, description="restart", destructive=True)


def read_limit(name: str) -> Any:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_global_concurrency_limit_by_name(name)


def child_env(api_url: str) -> dict[str, str]:
    return {**os.environ, "PREFECT_API_URL": api_url}


@contextmanager
def held_elsewhere(prefect_api: str, tmp_path: Path, resource: str) -> Iterator[Path]:
    """Within: another process holds `resource`'s one-mutating-run lock (as another run
    changing that target does); it lets go when the body ends, or earlier once the yielded
    file exists, and must have held it cleanly."""
    held, release = tmp_path / f"held-{resource}", tmp_path / f"release-{resource}"
    holder = subprocess.Popen(
        [sys.executable, "-c", CHILD_HOLD, str(held), str(release), resource],
        env=child_env(prefect_api),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(held, holder, "hold")
        yield release
    finally:
        release.touch()
        _, err = holder.communicate(timeout=120)
    assert holder.returncode == 0, err


def short_wait_for(monkeypatch: pytest.MonkeyPatch, held: str) -> None:
    """mutating_run waits 10 s instead of the minute for `held` (which another process
    holds), and its usual wait for every other lock, however slowly a busy API grants it."""
    real = mutating_run

    def shortened(resource: str, wait_seconds: float | None = None) -> Any:
        return real(resource, 10.0 if resource == held else wait_seconds)

    monkeypatch.setattr("tasks.limits.mutating_run", shortened)


def wait_for(path: Path, proc: subprocess.Popen[str], what: str) -> None:
    # Generous: a child imports Prefect (~2 s) on a machine shared with other work.
    deadline = time.monotonic() + 120
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"{what}: child exited {proc.returncode}: {proc.stderr.read()}")  # type: ignore[union-attr]
        assert time.monotonic() < deadline, f"{what}: child not ready within 120 s"
        time.sleep(0.05)


# --- configuration -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "[limits]\nrestart = { max = 2, per_seconds = 3600 }\n",
            r"limits: unknown action kind restart; known: .*cancel_query, .*"
            r"restart_service",
        ),
        (
            "[limits]\nrestart_service = { max = 0, per_seconds = 3600 }\n",
            r"limits\.restart_service\.max: Input should be greater than or equal to 1",
        ),
        (
            "[limits]\nterminate_backend = { max = 5, per_seconds = 30 }\n",
            r"limits\.terminate_backend\.per_seconds: Input should be greater than or equal to 60",
        ),
        (
            "[limits]\nrestart_service = { max = 2 }\n",
            r"limits\.restart_service\.per_seconds: Field required",
        ),
        (
            "[limits]\nrestart_service = { max = 2, per_seconds = 3600, burst = 3 }\n",
            r"limits\.restart_service\.burst: Extra inputs are not permitted",
        ),
    ],
)
def test_bad_limits_are_one_clear_error(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "runbook.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=expected) as caught:
        load_config(path)
    assert str(path) in str(caught.value)


def test_limits_configure_from_file_and_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "runbook.toml"
    path.write_text("[limits]\nrestart_service = { max = 3, per_seconds = 7200 }\n")
    monkeypatch.setenv("RUNBOOK_LIMITS__DELETE_BACKUP__MAX", "10")
    monkeypatch.setenv("RUNBOOK_LIMITS__DELETE_BACKUP__PER_SECONDS", "86400")
    limits = load_settings(path).limits
    assert limits == {
        "restart_service": RateLimit(max=3, per_seconds=7200),
        "delete_backup": RateLimit(max=10, per_seconds=86400),
    }


def test_every_destructive_kind_of_the_catalogue_has_a_default_rate() -> None:
    from deployments.catalog import ACTION_KINDS

    destructive = {
        "cancel_query",
        "terminate_backend",
        "reset_stuck_jobs",
        "restart_service",
        "clear_lockout_keys",
        "clear_lockout_rows",
        "delete_backup",
        "enable_aof",
        "set_maxmemory_policy",
    }
    assert destructive <= ACTION_KINDS
    assert destructive <= set(DEFAULT_RATES)
    # A new kind needs a default rate or a reason to have none (tasks/limits.py).
    missing = sorted(ACTION_KINDS - set(DEFAULT_RATES) - set(UNRATED))
    assert not missing, f"add to tasks/limits.py DEFAULT_RATES, or UNRATED with why: {missing}"
    assert not set(DEFAULT_RATES) & set(UNRATED)
    assert set(DEFAULT_RATES) | set(UNRATED) == ACTION_KINDS
    assert DEFAULT_RATES["restart_service"] == RateLimit(max=2, per_seconds=3600)
    assert DEFAULT_RATES["terminate_backend"] == RateLimit(max=500, per_seconds=3600)


def test_limit_names_are_readable_and_never_shared() -> None:
    assert rate_limit_name("restart_service", "api") == "runbook-rate-restart_service-api"
    assert mutating_limit_name("postgres.main") == "runbook-mutating-postgres.main"
    odd = rate_limit_name("restart_service", "web/api v2")
    assert odd.startswith("runbook-rate-restart_service-web-api-v2-")
    assert not set("/%&<> ") & set(odd)
    assert odd != rate_limit_name("restart_service", "web-api-v2")
    assert odd != rate_limit_name("restart_service", "web api/v2")


def test_next_slot_at_counts_whole_slots_from_the_last_write() -> None:
    from datetime import UTC, datetime, timedelta

    from prefect.client.schemas.responses import GlobalConcurrencyLimitResponse

    from tasks.limits import next_slot_at

    written = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)

    def limit(active: int, size: int, decay: float) -> GlobalConcurrencyLimitResponse:
        return GlobalConcurrencyLimitResponse(
            name="x", limit=size, active_slots=active, slot_decay_per_second=decay, updated=written
        )

    hourly = 1 / 3600
    now = written + timedelta(minutes=20)
    assert next_slot_at(limit(2, 2, hourly), now) == written + timedelta(hours=1)
    # Made smaller in the UI than the slots in use: two slots must go first.
    assert next_slot_at(limit(3, 2, hourly), now) == written + timedelta(hours=2)
    # One slot already gone (the read shows it), the limit still full: the second one.
    later = written + timedelta(minutes=90)
    assert next_slot_at(limit(2, 2, hourly), later) == written + timedelta(hours=2)
    # No decay: it frees only on release.
    assert next_slot_at(limit(1, 1, 0.0), now) == now


# --- rate limits against a real Prefect API ------------------------------------------------


def test_admit_within_and_over_a_rate(prefect_api: str) -> None:
    service = f"api-{uuid.uuid4().hex[:8]}"
    name = rate_limit_name("restart_service", service)
    first = [restart(service), restart(service)]
    assert admit(first, rates={"restart_service": HOUR}) == first
    assert all(a.status is ActionStatus.planned for a in first)
    taken_at = read_limit(name).updated

    third = restart(service)
    other = restart(f"other-{service}")
    unlimited = Action(kind="handoff", target=service, description="hand off", destructive=False)
    before = time.time()
    admitted = admit([third, other, unlimited], rates={"restart_service": HOUR})
    assert admitted == [other, unlimited]
    assert third.status is ActionStatus.skipped
    assert f"over the rate limit {name} (2 per 3600 s)" in third.detail
    # The next slot frees one window after the second restart took its slot.
    seconds = int(third.detail.split("frees in ")[1].split(" s")[0])
    assert 3600 - (time.time() - before) - 60 <= seconds <= 3600
    assert " UTC" in third.detail

    limit = read_limit(name)
    assert (limit.limit, limit.active_slots) == (2, 2)
    assert limit.slot_decay_per_second == pytest.approx(1 / 3600)
    # A refusal leaves the limit as it was: its decay clock runs from the second restart.
    assert limit.updated == taken_at


def test_admit_uses_default_rates_and_skips_the_rest_of_a_full_limit(prefect_api: str) -> None:
    service = f"api-{uuid.uuid4().hex[:8]}"
    actions = [restart(service) for _ in range(4)]
    admitted = admit(actions, rates={})
    assert admitted == actions[:2]
    assert [a.status for a in actions[2:]] == [ActionStatus.skipped] * 2
    assert actions[2].detail == actions[3].detail
    assert read_limit(rate_limit_name("restart_service", service)).active_slots == 2


def test_a_changed_rate_updates_the_limit(prefect_api: str) -> None:
    service = f"api-{uuid.uuid4().hex[:8]}"
    admit([restart(service)], rates={"restart_service": HOUR})
    wider = RateLimit(max=3, per_seconds=7200)
    assert len(admit([restart(service), restart(service)], rates={"restart_service": wider})) == 2
    limit = read_limit(rate_limit_name("restart_service", service))
    assert (limit.limit, limit.active_slots) == (3, 3)
    assert limit.slot_decay_per_second == pytest.approx(1 / 7200)


def test_never_more_than_max_in_any_window(prefect_api: str) -> None:
    """The decay admit gives Prefect (one slot per window) keeps at most max per window
    through the leaky bucket, whatever the timing of the requests. A window of 3 s stands in
    for an hour (configuration refuses less than 60 s: built unvalidated here)."""
    window = 3.0
    rate = RateLimit.model_construct(max=2, per_seconds=int(window))
    service = f"api-{uuid.uuid4().hex[:8]}"
    taken: list[tuple[float, float]] = []  # (sent, answered) of each admitted action
    refused = 0
    end = time.monotonic() + 4 * window
    while time.monotonic() < end:
        sent = time.monotonic()
        action = restart(service)
        if admit([action], rates={"restart_service": rate}):
            taken.append((sent, time.monotonic()))
        else:
            refused += 1
        time.sleep(0.1)
    assert len(taken) >= 3 and refused
    # The server took slot i+max at least one window after slot i: it answered the later one
    # no sooner than one window after it was sent the earlier one.
    for (first_sent, _), (_, later_answered) in zip(taken, taken[2:], strict=False):
        assert later_answered - first_sent >= window


def test_limits_hold_under_concurrent_runs_in_two_processes(
    prefect_api: str, tmp_path: Path
) -> None:
    service = f"api-{uuid.uuid4().hex[:8]}"
    go = tmp_path / "go"
    children = []
    for i in range(2):
        ready = tmp_path / f"ready-{i}"
        proc = subprocess.Popen(
            [sys.executable, "-c", CHILD_ADMIT, str(go), str(ready), service],
            env=child_env(prefect_api),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        children.append((proc, ready))
    for proc, ready in children:
        wait_for(ready, proc, "admit")
    go.touch()
    statuses = []
    for proc, _ in children:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        statuses += json.loads(out.strip().splitlines()[-1])
    assert sorted(s for s, _ in statuses) == ["planned", "planned", "skipped", "skipped"]
    name = rate_limit_name("restart_service", service)
    assert all(name in detail for s, detail in statuses if s == "skipped")
    assert read_limit(name).active_slots == 2


# --- one mutating run per target -----------------------------------------------------------


def test_one_mutating_run_at_a_time_across_processes(prefect_api: str, tmp_path: Path) -> None:
    resource = f"postgres.{uuid.uuid4().hex[:8]}"
    name = mutating_limit_name(resource)
    with held_elsewhere(prefect_api, tmp_path, resource):
        assert read_limit(name).active_slots == 1
        started = time.monotonic()
        with mutating_run(resource, wait_seconds=2) as reason:
            assert reason is not None
            assert f"another run is changing {resource}" in reason
            assert name in reason
        # It waited its wait_seconds for the holder, not for the holder to finish.
        assert time.monotonic() - started < 60
        assert read_limit(name).active_slots == 1
    assert read_limit(name).active_slots == 0
    with mutating_run(resource) as reason:  # free: granted
        assert reason is None
        assert read_limit(name).active_slots == 1
    assert read_limit(name).active_slots == 0


def test_a_run_waits_for_the_run_changing_its_target_then_goes_on(
    prefect_api: str, tmp_path: Path
) -> None:
    """Two runs due together on one target follow one another instead of one skipping."""
    resource = f"redis.{uuid.uuid4().hex[:8]}"
    with held_elsewhere(prefect_api, tmp_path, resource) as release:
        threading.Timer(2, release.touch).start()  # the first run finishes while we wait
        with mutating_run(resource, wait_seconds=120) as reason:
            assert reason is None
            assert read_limit(mutating_limit_name(resource)).active_slots == 1


def test_a_mutating_run_releases_its_slot_when_the_body_raises(prefect_api: str) -> None:
    resource = f"services.{uuid.uuid4().hex[:8]}"
    with pytest.raises(RuntimeError, match="boom"), mutating_run(resource) as reason:
        assert reason is None
        raise RuntimeError("boom")
    assert read_limit(mutating_limit_name(resource)).active_slots == 0


# --- strict: a limit that cannot be kept is an error, never a pass -------------------------


class _Forbidden(BaseHTTPRequestHandler):
    """An API behind a proxy that refuses this client: every request gets 403."""

    def _refuse(self) -> None:
        body = b'{"detail": "forbidden"}'
        self.send_response(403)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_PATCH = _refuse

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def forbidding_api() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Forbidden)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/api"
    server.shutdown()
    server.server_close()


def test_a_limit_that_cannot_be_created_is_an_error(forbidding_api: str) -> None:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    actions = [restart("api")]
    with temporary_settings(updates={PREFECT_API_URL: forbidding_api}):
        with pytest.raises(TargetError, match="HTTP 403") as caught:
            admit(actions, rates={})
        assert forbidding_api in str(caught.value)
        with (
            pytest.raises(TargetError, match=r"runbook-mutating-postgres\.main"),
            mutating_run("postgres.main"),
        ):
            raise AssertionError("the body ran without the limit")
    assert actions[0].status is ActionStatus.planned


def test_a_limit_deleted_in_the_ui_is_created_again(prefect_api: str) -> None:
    from prefect.client.orchestration import get_client

    service = f"api-{uuid.uuid4().hex[:8]}"
    name = rate_limit_name("restart_service", service)
    admit([restart(service), restart(service)], rates={})
    with get_client(sync_client=True) as client:
        client.delete_global_concurrency_limit_by_name(name)
    again = [restart(service)]
    assert admit(again, rates={}) == again
    assert read_limit(name).active_slots == 1
