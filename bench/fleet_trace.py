"""Where a fleet's targets spend their time, measured inside the bench's own process (issue 18,
item 6): fleet_paths.py installs a Trace around one `fleet` flow run.

What it records, without changing what runs:
  targets  per `fleet-target` task: when the fleet submitted it, when a pool thread started
           its task engine (prefect.task_engine.run_task_sync) and when that returned, and the
           thread it ran on;
  http     every request of Prefect's HTTP clients (their `_send_with_retry`, sync and async):
           its thread, method and path, each attempt's outcome (status or exception) and
           seconds, and the backoff slept between attempts (the client retries 408, 429, 502,
           503 and connection errors, 2 ** n seconds apart when the server gives no
           Retry-After);
  logs     the records of Prefect's loggers at WARNING and above, and prefect.client's DEBUG
           ones (its "retryable" lines), counted by logger and message;
  samples  every SAMPLE_SECONDS the stack of each thread running a target's task, classified
           (an HTTP request to the Prefect API and which client call, its retry backoff, a
           lock or event wait and who waits, the check's own I/O, other Python), weighted by
           the time since the previous sample: where a target's seconds go.

Only the bench imports this module; it patches Prefect for the life of the `with` block."""

from __future__ import annotations

import logging
import re
import statistics
import sys
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

SAMPLE_SECONDS = 0.01
UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


@dataclass
class Request:
    thread: int
    thread_name: str
    method: str
    path: str
    start: float
    end: float = 0.0
    attempts: list[tuple[str, float]] = field(default_factory=list)  # outcome, seconds

    @property
    def sent(self) -> float:
        return sum(seconds for _, seconds in self.attempts)

    @property
    def backoff(self) -> float:
        """Seconds between attempts: the client's sleep before each retry."""
        if len(self.attempts) < 2:
            return 0.0
        return max(0.0, self.end - self.start - self.sent)


@dataclass
class Target:
    name: str
    submitted: float
    started: float = 0.0
    ended: float = 0.0
    thread: int = 0
    # sampled seconds by category
    where: defaultdict[str, float] = field(default_factory=lambda: defaultdict(float))


class Records(logging.Handler):
    """Prefect's log records, counted by logger and message (numbers and ids blanked)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.counts: Counter[str] = Counter()

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno < logging.WARNING and record.name != "prefect.client":
            return
        try:
            message = record.getMessage().splitlines()[0]
        except Exception:
            message = str(record.msg)
        message = re.sub(r"\d+(\.\d+)?", "N", UUID.sub("ID", message))[:120]
        self.counts[f"{record.levelname} {record.name}: {message}"] += 1


def where(frame: FrameType | None) -> str:
    """What a thread whose innermost Python frame is `frame` is doing, as a category."""
    stack: list[tuple[str, str]] = []
    while frame is not None:
        stack.append((frame.f_code.co_filename, frame.f_code.co_name))
        frame = frame.f_back
    if not stack:
        return "no frame"
    inner_file, inner_func = stack[0]
    if inner_func == "_send_with_retry":
        return "Prefect client: retry backoff (sleep)"
    if any("/httpx/" in f or "/httpcore/" in f for f, _ in stack[:12]):
        for f, fn in stack:
            if (
                "/prefect/client/" in f
                and not f.endswith("/prefect/client/base.py")
                and fn not in ("request", "send", "_request")
            ):
                return f"Prefect API request: {fn}"
        return "Prefect API request: (other caller)"
    if inner_file.endswith("threading.py") or "/concurrent/" in inner_file:
        # who waits: the first frames above the waiting machinery (Prefect's sync-to-loop
        # bridge included)
        callers = [
            f"{short(f)}:{fn}"
            for f, fn in stack
            if not (
                f.endswith(("threading.py", "asyncutils.py"))
                or "/concurrent/" in f
                or "/prefect/_internal/concurrency/" in f
            )
        ]
        if callers[1:2] == ["prefect/flow_engine.py:create_flow_run"]:
            return "waiting: the subflow's tracking task run created (loop thread)"
        return "waiting: " + " < ".join(callers[:2]) if callers else "waiting: threading"
    if any("/psycopg" in f for f, _ in stack[:6]):
        return "the check: psycopg"
    if inner_file.endswith(("/ssl.py", "/socket.py")):
        return "the check: socket/ssl"
    return f"python: {short(inner_file)}"


def short(path: str) -> str:
    """A module's path from its package down (site-packages/prefect/x.py -> prefect/x.py)."""
    parts = Path(path).parts
    for anchor in ("site-packages", "lib"):
        if anchor in parts:
            return "/".join(parts[len(parts) - parts[::-1].index(anchor) :][:3])
    return "/".join(parts[-2:])


class Trace:
    """The records described in the module docstring, for one fleet run (install())."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.targets: dict[str, Target] = {}
        self.running: dict[int, Target] = {}  # thread ident -> the target it runs now
        self.requests: list[Request] = []
        self.logs = Records()
        self.sampled = 0.0
        self._stop = threading.Event()

    @contextmanager
    def install(self) -> Iterator[Trace]:
        import prefect.task_engine as task_engine
        from prefect.client.base import PrefectHttpxAsyncClient, PrefectHttpxSyncClient
        from prefect.task_runners import ThreadPoolTaskRunner

        places: list[tuple[Any, str]] = [
            (task_engine, "run_task_sync"),
            (ThreadPoolTaskRunner, "submit"),
            (PrefectHttpxSyncClient, "_send_with_retry"),
            (PrefectHttpxAsyncClient, "_send_with_retry"),
        ]
        saved = [getattr(owner, name) for owner, name in places]
        trace = self
        run_task_sync, submit, sync_send, async_send = saved

        def traced_submit(
            runner: Any, task: Any, parameters: dict[str, Any], *a: Any, **k: Any
        ) -> Any:
            if task.name == "fleet-target":
                name = str(parameters.get("target"))
                with trace.lock:
                    trace.targets[name] = Target(name, time.perf_counter())
            return submit(runner, task, parameters, *a, **k)

        def traced_run_task_sync(task: Any, *a: Any, **k: Any) -> Any:
            parameters = k.get("parameters") or {}
            target = (
                trace.targets.get(str(parameters.get("target")))
                if task.name == "fleet-target"
                else None
            )
            if target is None:
                return run_task_sync(task, *a, **k)
            target.thread, target.started = threading.get_ident(), time.perf_counter()
            trace.running[target.thread] = target
            try:
                return run_task_sync(task, *a, **k)
            finally:
                target.ended = time.perf_counter()
                trace.running.pop(target.thread, None)

        def record(request: Any) -> Request:
            r = Request(
                threading.get_ident(),
                threading.current_thread().name,
                str(request.method),
                UUID.sub("ID", request.url.path),
                time.perf_counter(),
            )
            with trace.lock:
                trace.requests.append(r)
            return r

        def traced_sync(client: Any, request: Any, send: Any, *a: Any, **k: Any) -> Any:
            r = record(request)

            def timed(*args: Any, **kwargs: Any) -> Any:
                t0 = time.perf_counter()
                try:
                    response = send(*args, **kwargs)
                except Exception as exc:
                    r.attempts.append((type(exc).__name__, time.perf_counter() - t0))
                    raise
                r.attempts.append((str(response.status_code), time.perf_counter() - t0))
                return response

            try:
                return sync_send(client, request, timed, *a, **k)
            finally:
                r.end = time.perf_counter()

        async def traced_async(client: Any, request: Any, send: Any, *a: Any, **k: Any) -> Any:
            r = record(request)

            async def timed(*args: Any, **kwargs: Any) -> Any:
                t0 = time.perf_counter()
                try:
                    response = await send(*args, **kwargs)
                except Exception as exc:
                    r.attempts.append((type(exc).__name__, time.perf_counter() - t0))
                    raise
                r.attempts.append((str(response.status_code), time.perf_counter() - t0))
                return response

            try:
                return await async_send(client, request, timed, *a, **k)
            finally:
                r.end = time.perf_counter()

        traced = [traced_run_task_sync, traced_submit, traced_sync, traced_async]
        for (owner, name), replacement in zip(places, traced, strict=True):
            setattr(owner, name, replacement)
        prefect_logger, client_logger = (
            logging.getLogger("prefect"),
            logging.getLogger("prefect.client"),
        )
        client_level = client_logger.level
        client_logger.setLevel(logging.DEBUG)
        prefect_logger.addHandler(self.logs)
        sampler = threading.Thread(target=self._sample, name="fleet-trace-sampler", daemon=True)
        sampler.start()
        try:
            yield self
        finally:
            self._stop.set()
            sampler.join()
            prefect_logger.removeHandler(self.logs)
            client_logger.setLevel(client_level)
            for (owner, name), original in zip(places, saved, strict=True):
                setattr(owner, name, original)

    def _sample(self) -> None:
        last = time.perf_counter()
        while not self._stop.wait(SAMPLE_SECONDS):
            now = time.perf_counter()
            dt, last = now - last, now
            frames = sys._current_frames()
            for ident, target in list(self.running.items()):
                target.where[where(frames.get(ident))] += dt
            self.sampled += dt

    def summary(self, slowest: int = 3) -> dict[str, Any]:
        """The figures fleet_paths.py reports: per target (submit -> end) and what fills it,
        the client's requests and retries, Prefect's warnings, the slowest targets."""
        targets = [t for t in self.targets.values() if t.ended]
        walls = [t.ended - t.submitted for t in targets]
        queued = [t.started - t.submitted for t in targets]
        by_thread: dict[int, list[Request]] = defaultdict(list)
        for r in self.requests:
            by_thread[r.thread].append(r)

        def in_target(t: Target) -> list[Request]:
            return [r for r in by_thread.get(t.thread, []) if t.started <= r.start <= t.ended]

        where_all: defaultdict[str, float] = defaultdict(float)
        for t in targets:
            for k, v in t.where.items():
                where_all[k] += v
        target_requests = [r for t in targets for r in in_target(t)]
        retried = [r for r in self.requests if len(r.attempts) > 1]
        outcomes: Counter[str] = Counter(o for r in self.requests for o, _ in r.attempts)
        retry_causes: Counter[str] = Counter(o for r in retried for o, _ in r.attempts[:-1])
        s503 = [sec for r in self.requests for o, sec in r.attempts if o == "503"]
        slow = sorted(targets, key=lambda t: t.ended - t.submitted, reverse=True)[:slowest]
        return {
            "targets": len(targets),
            "target_wall_sum": sum(walls),
            "target_wall_p50": statistics.median(walls) if walls else 0.0,
            "target_wall_mean": statistics.fmean(walls) if walls else 0.0,
            "target_wall_max": max(walls, default=0.0),
            "queued_max": max(queued, default=0.0),
            "queued_sum": sum(queued),
            "requests": len(self.requests),
            "requests_per_target": len(target_requests) / max(len(targets), 1),
            # what a target asks of the API on its own thread, first attempts only
            "paths_per_target": {
                path: round(n / max(len(targets), 1), 2)
                for path, n in Counter(f"{r.method} {r.path}" for r in target_requests).most_common(
                    12
                )
            },
            "request_seconds_in_targets": sum(r.end - r.start for r in target_requests),
            "outcomes": dict(outcomes),
            "retried_requests": len(retried),
            "retries": sum(len(r.attempts) - 1 for r in retried),
            "retry_causes": dict(retry_causes),
            "backoff_seconds": sum(r.backoff for r in self.requests),
            "backoff_seconds_in_targets": sum(r.backoff for r in target_requests),
            "by_thread": {
                name: {
                    "requests": len(rs),
                    "retries": sum(len(r.attempts) - 1 for r in rs),
                    "backoff": round(sum(r.backoff for r in rs), 1),
                    "seconds": round(sum(r.end - r.start for r in rs), 1),
                }
                for name, rs in group(
                    self.requests, lambda r: re.sub(r"[-_]\d+(_\d+)?$", "", r.thread_name)
                ).items()
            },
            "not_2xx": dict(
                Counter(
                    f"{o} {r.method} {r.path}"
                    for r in self.requests
                    for o, _ in r.attempts
                    if not o.startswith("2")
                ).most_common(6)
            ),
            "retried_paths": {
                path: {
                    "requests": len(rs),
                    "retries": sum(len(r.attempts) - 1 for r in rs),
                    "backoff": round(sum(r.backoff for r in rs), 1),
                }
                for path, rs in group(retried, lambda r: f"{r.method} {r.path}").items()
            },
            # how fast the server answered 503: at once (SQLite refusing a write) or after
            # its busy timeout
            "503_seconds_p50": statistics.median(s503) if s503 else 0.0,
            "503_seconds_max": max(s503, default=0.0),
            "where": top(where_all, 8),
            "sampled_seconds": sum(where_all.values()),
            "slowest": [
                {
                    "target": t.name,
                    "wall": t.ended - t.submitted,
                    "queued": t.started - t.submitted,
                    "requests": len(in_target(t)),
                    "retries": sum(len(r.attempts) - 1 for r in in_target(t)),
                    "backoff": sum(r.backoff for r in in_target(t)),
                    "where": top(t.where, 4),
                }
                for t in slow
            ],
            "logs": dict(self.logs.counts.most_common(8)),
        }


def top(seconds: dict[str, float], n: int) -> dict[str, float]:
    """The n largest, rounded to 0.1 s."""
    return {k: round(v, 1) for k, v in sorted(seconds.items(), key=lambda kv: -kv[1])[:n]}


def group(requests: list[Request], key: Callable[[Request], str]) -> dict[str, list[Request]]:
    out: dict[str, list[Request]] = defaultdict(list)
    for r in requests:
        out[key(r)].append(r)
    return dict(out)


def server_log_summary(log: Path, since: int = 0) -> dict[str, Any]:
    """The Prefect server's log from byte `since`: its error lines and the exceptions its
    tracebacks end with, counted (numbers and ids blanked)."""
    text = log.read_bytes()[since:].decode(errors="replace") if log.exists() else ""
    kinds: Counter[str] = Counter()
    for line in text.splitlines():
        line = line.strip()
        if re.match(r"^[\w.]+(Error|Exception)\b", line) or re.search(
            r"\b(ERROR|WARNING|CRITICAL)\b", line
        ):
            kinds[re.sub(r"\d+(\.\d+)?", "N", UUID.sub("ID", line))[:160]] += 1
    return {"lines": len(text.splitlines()), "kinds": dict(kinds.most_common(8))}
