"""queue-backlog against queues filled by the real BullMQ library, so the key layout is its own."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from bullmq import Queue, Worker

from flows.queue_backlog import queue_backlog
from tasks.errors import ConfigError
from tasks.models import ActionStatus, RunStatus, Severity

pytestmark = pytest.mark.usefixtures("prefect_api")
STATES = (
    "waiting",
    "paused",
    "active",
    "delayed",
    "prioritized",
    "waiting-children",
    "failed",
    "completed",
)


def fill(
    url: str, queue: str, n: int, *, delayed: int = 0, prioritized: int = 0, pause: bool = False
) -> dict[str, int]:
    async def go() -> dict[str, int]:
        q = Queue(queue, {"connection": url})
        for start in range(0, n, 500):
            await q.addBulk(
                [{"name": "job", "data": {"i": i}} for i in range(start, min(n, start + 500))]
            )
        for i in range(delayed):
            await q.add("later", {"i": i}, {"delay": 600_000})
        for i in range(prioritized):
            await q.add("vip", {"i": i}, {"priority": 5})
        if pause:
            await q.pause()
        counts: dict[str, int] = await q.getJobCounts(*STATES)
        await q.close()
        return counts

    return asyncio.run(go())


def bullmq_counts(url: str, queue: str) -> dict[str, int]:
    async def go() -> dict[str, int]:
        q = Queue(queue, {"connection": url})
        counts: dict[str, int] = await q.getJobCounts(*STATES)
        await q.close()
        return counts

    return asyncio.run(go())


@contextmanager
def worker(
    url: str, queue: str, process: Callable[[Any, str], Awaitable[Any]], concurrency: int = 5
) -> Iterator[None]:
    """A real BullMQ worker in a thread of its own, closed on the way out."""
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    holder: dict[str, Worker] = {}

    async def start() -> None:
        holder["w"] = Worker(queue, process, {"connection": url, "concurrency": concurrency})
        ready.set()

    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(start(), loop).result(10)
    ready.wait(10)
    try:
        yield
    finally:
        asyncio.run_coroutine_threadsafe(holder["w"].close(force=True), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def observed(report: Any, queue: str) -> dict[str, Any]:
    return {
        f.check.removeprefix(f"{queue}."): f.observed
        for f in report.findings
        if f.check.startswith(f"{queue}.")
    }


def test_counts_match_what_bullmq_reports(redis_server: Any, inventory: Any) -> None:
    server = redis_server(policy="noeviction")
    url = server.url

    async def half_fail(job: Any, token: str) -> str:
        if job.data["i"] % 2:
            raise ValueError("boom")
        return "ok"

    fill(url, "emails", 300, delayed=4, prioritized=3)
    with worker(url, "emails", half_fail):  # some completed, some failed
        time.sleep(1.5)
    fill(url, "images", 40, pause=True)
    inventory(f'[redis.queue]\nurl = "{url}"\nrole = "queue"\nqueues = ["emails", "images"]\n')

    report = queue_backlog("queue", params={"sample_seconds": 0.2})
    for queue in ("emails", "images"):
        theirs = bullmq_counts(url, queue)
        ours = observed(report, queue)
        assert {s: ours[s.replace("-", "_")] for s in STATES} == theirs
    emails = bullmq_counts(url, "emails")
    assert emails["completed"] > 0 and emails["failed"] > 0 and emails["delayed"] == 4
    images = next(f for f in report.findings if f.check == "images.backlog")
    assert images.observed == 40 and "PAUSED" in images.message
    assert report.status is RunStatus.healthy  # nothing over the threshold of 1000


def test_backlog_not_draining_is_flagged_and_scaling_is_planned(
    redis_server: Any, inventory: Any
) -> None:
    server = redis_server(policy="noeviction")
    fill(server.url, "images", 3000)
    inventory(f'[redis.queue]\nurl = "{server.url}"\nrole = "queue"\nqueues = ["images"]\n')
    report = queue_backlog("queue", dry_run=False, approval="auto", params={"sample_seconds": 0.3})
    backlog = next(f for f in report.findings if f.check == "images.backlog")
    assert backlog.observed == 3000 and backlog.severity is Severity.warning
    assert report.status is RunStatus.unhealthy
    assert report.actions[0].kind == "scale_workers"
    assert report.actions[0].status is ActionStatus.skipped
    assert 'worker_service = "NAME"' in report.actions[0].detail


def test_draining_backlog_is_healthy_with_an_eta(redis_server: Any, inventory: Any) -> None:
    server = redis_server(policy="noeviction")

    async def quick(job: Any, token: str) -> None:
        await asyncio.sleep(0.01)

    fill(server.url, "emails", 2000)
    inventory(
        f'[redis.queue]\nurl = "{server.url}"\nrole = "queue"\nqueues = ["emails"]\n'
        "[redis.queue.thresholds]\nwaiting_threshold = 100\n"
    )
    with worker(server.url, "emails", quick, concurrency=20):
        report = queue_backlog("queue", params={"sample_seconds": 1})
    drain = next(f for f in report.findings if f.check == "emails.drain_rate")
    backlog = next(f for f in report.findings if f.check == "emails.backlog")
    assert drain.observed > 0
    assert backlog.severity is Severity.ok and "empty in about" in backlog.message


def test_stalled_workers_are_flagged(redis_server: Any, inventory: Any) -> None:
    server = redis_server(policy="noeviction")

    async def hang(job: Any, token: str) -> None:
        await asyncio.sleep(60)

    fill(server.url, "emails", 10)
    inventory(f'[redis.queue]\nurl = "{server.url}"\nrole = "queue"\nqueues = ["emails"]\n')
    with worker(server.url, "emails", hang, concurrency=3):
        time.sleep(0.5)
        report = queue_backlog("queue", params={"sample_seconds": 0.5})
    progress = next(f for f in report.findings if f.check == "emails.progress")
    assert progress.severity is Severity.warning and "stalled" in progress.message
    assert observed(report, "emails")["active"] == 3


def test_unknown_queue_and_no_queues(redis_server: Any, inventory: Any) -> None:
    server = redis_server()
    inventory(
        f'[redis.queue]\nurl = "{server.url}"\nrole = "queue"\nqueues = ["nope"]\n'
        f'[redis.cache]\nurl = "{server.url}"\n'
    )
    report = queue_backlog("queue", params={"sample_seconds": 0.1})
    assert report.findings[0].check == "nope.exists"
    assert report.findings[0].severity is Severity.warning
    with pytest.raises(ConfigError, match="lists no queues"):
        queue_backlog("cache")
    json.loads(report.model_dump_json())
