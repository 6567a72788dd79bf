"""Redis: read-only checks and the verbs the runbooks may use, one task each. Every call has
a connect and a socket timeout; keys are found with SCAN, never KEYS, and removed with UNLINK."""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, cast

import redis

from tasks.engine import io_task
from tasks.errors import (
    ActionFailed,
    AuthenticationFailed,
    ConfigError,
    TargetError,
    TargetUnreachable,
)
from tasks.redis_rules import QueueCounts, RedisHealth, lockout_patterns
from tasks.settings import RedisTarget
from tasks.wait import poll

TIMEOUT_SECONDS = 5
SCAN_COUNT = 1000
UNLINK_BATCH = 500
ACTIVE_IDS_SAMPLE = 100


@contextmanager
def connect(name: str, target: RedisTarget) -> Iterator[redis.Redis]:
    """A client of the target for one `with` block, replies decoded to str, with connect and
    socket timeouts of TIMEOUT_SECONDS (5 s); the target's `password` overrides its url's.

    Raises ConfigError when the url is not a Redis URL; AuthenticationFailed when Redis
    refuses the password or the user's ACL (NOAUTH, WRONGPASS, NOPERM); TargetUnreachable
    (transient) when it cannot connect or a reply times out; TargetError for any other error
    Redis answers with inside the block."""
    extra: dict[str, Any] = {}
    if target.password is not None:
        extra["password"] = target.password.get_secret_value()
    where = f"redis target {name!r} ({target.description})"
    try:
        client = redis.Redis.from_url(
            target.url.get_secret_value(),
            socket_timeout=TIMEOUT_SECONDS,
            socket_connect_timeout=TIMEOUT_SECONDS,
            decode_responses=True,
            **extra,
        )
    except ValueError as exc:
        raise ConfigError(
            f"{where}: redis.{name}.url is not a Redis URL: {exc}; write it as "
            "redis://[user:password@]host:port/db (rediss:// for TLS, unix:///path for a socket)"
        ) from None
    try:
        with client:
            yield client
    except redis.AuthenticationError as exc:
        raise AuthenticationFailed(
            f"{where}: authentication failed ({exc}); check the password in its url or `password`"
        ) from exc
    except redis.ResponseError as exc:
        if str(exc).startswith(("NOAUTH", "WRONGPASS", "NOPERM")):
            raise AuthenticationFailed(
                f"{where}: not authorised ({exc}); check the password and the user's ACL"
            ) from exc
        raise TargetError(f"{where}: {exc}") from exc
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        raise TargetUnreachable(
            f"{where}: cannot connect: {exc}; check that it is up and the url's host and port",
            transient=True,
        ) from exc
    except redis.RedisError as exc:
        raise TargetError(f"{where}: {exc}") from exc


# --- health ----------------------------------------------------------------------------------


@io_task("read-redis-health", timeout_seconds=120, retries=0)
def read_redis_health(name: str, target: RedisTarget, sample_seconds: float) -> RedisHealth:
    """PING three times, INFO, and the eviction rate over `sample_seconds`. Unreachable is a
    finding here, not an error: it is what this runbook diagnoses.

    Args:
        name: the [redis.NAME] target's name, for messages.
        target: its inventory entry.
        sample_seconds: seconds between the two reads of evicted_keys; 0: no sample.

    Returns:
        RedisHealth: median PING in milliseconds, INFO's flat fields, evictions per second;
        or reachable=False with the error (transient=False when credentials were refused).

    Raises:
        ConfigError: the target's url is not a Redis URL.
        TargetError: an error Redis answered with other than a refused login."""
    try:
        with connect(name, target) as r:
            pings = []
            for _ in range(3):
                start = time.perf_counter()
                r.ping()
                pings.append((time.perf_counter() - start) * 1000)
            raw = cast(dict[str, Any], r.info("all"))
            info = {k: str(v) for k, v in raw.items() if not isinstance(v, dict)}
            if sample_seconds:
                time.sleep(sample_seconds)
                evicted = int(cast(dict[str, Any], r.info("stats"))["evicted_keys"])
                rate = (evicted - int(info.get("evicted_keys", 0))) / sample_seconds
            else:
                rate = 0.0
    except (TargetUnreachable, AuthenticationFailed) as exc:
        return RedisHealth(
            reachable=False, transient=exc.transient, error=str(exc).split(": ", 1)[-1]
        )
    return RedisHealth(
        reachable=True, ping_ms=statistics.median(pings), info=info, evicted_per_second=rate
    )


def _config_set(name: str, target: RedisTarget, parameter: str, value: str) -> str:
    """CONFIG SET parameter value, then CONFIG REWRITE so it survives a restart; what was done.

    Raises ActionFailed when CONFIG SET is refused (managed Redis often disables CONFIG)."""
    with connect(name, target) as r:
        try:
            r.config_set(parameter, value)
        except redis.ResponseError as exc:
            raise ActionFailed(
                f"redis target {name!r}: CONFIG SET {parameter} refused: {exc}; managed "
                f"Redis often disables CONFIG: set {parameter} in the provider's console"
            ) from exc
        try:
            r.config_rewrite()
        except redis.ResponseError as exc:
            return (
                f"set {parameter} {value}, but CONFIG REWRITE failed ({exc}): the change will "
                f"not survive a restart; set {parameter} in the server's config too"
            )
    return f"set {parameter} {value} and wrote it to the server's config file"


@io_task("set-maxmemory-policy", timeout_seconds=30)
def set_maxmemory_policy(name: str, target: RedisTarget, policy: str) -> str:
    """CONFIG SET maxmemory-policy, then CONFIG REWRITE so it survives a restart.

    Args:
        name: the [redis.NAME] target's name, for messages.
        target: its inventory entry.
        policy: a Redis maxmemory-policy, e.g. allkeys-lru or noeviction.

    Returns:
        What was done, for the action's detail (a failed CONFIG REWRITE is said there).

    Raises:
        ActionFailed: CONFIG SET was refused (managed Redis often disables CONFIG).
        ConfigError: the target's url is not a Redis URL.
        AuthenticationFailed: Redis refused the password or the user's ACL.
        TargetUnreachable: no connection, or it timed out (transient: retried).
        TargetError: any other error Redis answered with."""
    return _config_set(name, target, "maxmemory-policy", policy)


@io_task("enable-aof", timeout_seconds=30)
def enable_aof(name: str, target: RedisTarget) -> str:
    """CONFIG SET appendonly yes (and CONFIG REWRITE): Redis starts writing its append-only
    file with a background rewrite of the whole data set (a fork and disk writes).

    Args:
        name: the [redis.NAME] target's name, for messages.
        target: its inventory entry.

    Returns:
        What was done, for the action's detail.

    Raises:
        ActionFailed: CONFIG SET was refused (managed Redis often disables CONFIG).
        ConfigError: the target's url is not a Redis URL.
        AuthenticationFailed: Redis refused the password or the user's ACL.
        TargetUnreachable: no connection, or it timed out (transient: retried).
        TargetError: any other error Redis answered with."""
    return _config_set(name, target, "appendonly", "yes")


# --- lockouts --------------------------------------------------------------------------------


def _lockout_keys(r: redis.Redis, prefix: str, subject: str | None) -> Iterator[str]:
    exact, glob = lockout_patterns(prefix, subject)
    if exact is not None and r.exists(exact):
        yield exact
    yield from r.scan_iter(match=glob, count=SCAN_COUNT)


@io_task("find-lockout-keys", timeout_seconds=300)
def find_lockout_keys(
    name: str, target: RedisTarget, subject: str | None, sample: int = 10
) -> tuple[int, list[str]]:
    """The lockout keys (SCAN, never KEYS) of one subject, or all when subject is None.

    Args:
        name: the [redis.NAME] target's name, for messages.
        target: its inventory entry (lockout_prefix).
        subject: a user id, email or IP; None: every lockout.
        sample: how many key names to return at most.

    Returns:
        (how many keys match, up to `sample` of their names).

    Raises:
        ConfigError: the target's url is not a Redis URL.
        AuthenticationFailed: Redis refused the password or the user's ACL.
        TargetUnreachable: no connection, or it timed out (transient: retried).
        TargetError: any other error Redis answered with."""
    with connect(name, target) as r:
        count, shown = 0, list[str]()
        for key in _lockout_keys(r, target.lockout_prefix, subject):
            count += 1
            if len(shown) < sample:
                shown.append(key)
    return count, shown


@io_task("clear-lockout-keys", timeout_seconds=300)
def clear_lockout_keys(name: str, target: RedisTarget, subject: str | None) -> int:
    """UNLINK in batches what matches now: idempotent, and new lockouts of the same subject
    made since the plan are cleared too.

    Args:
        name: the [redis.NAME] target's name, for messages.
        target: its inventory entry (lockout_prefix).
        subject: a user id, email or IP; None: every lockout.

    Returns:
        How many keys were unlinked.

    Raises:
        ConfigError: the target's url is not a Redis URL.
        AuthenticationFailed: Redis refused the password or the user's ACL.
        TargetUnreachable: no connection, or it timed out (transient: retried).
        TargetError: any other error Redis answered with."""
    removed = 0
    with connect(name, target) as r:
        batch: list[str] = []
        for key in _lockout_keys(r, target.lockout_prefix, subject):
            batch.append(key)
            if len(batch) >= UNLINK_BATCH:
                removed += cast(int, r.unlink(*batch))
                batch = []
        if batch:
            removed += cast(int, r.unlink(*batch))
    return removed


# --- BullMQ queues ---------------------------------------------------------------------------


def _list_len(length: int, last: str | None) -> int:
    # BullMQ before v5 kept a marker ("0:...") at the tail of the wait list; it is no job.
    return length - 1 if length and last is not None and last.startswith("0:") else length


@io_task("read-queue-counts", timeout_seconds=60)
def read_queue_counts(name: str, target: RedisTarget, queues: list[str]) -> dict[str, QueueCounts]:
    """The counts BullMQ's own getJobCounts reports, read without changing anything.

    One round trip, but no MULTI: a Redis at maxmemory with noeviction refuses every command
    inside a transaction, and a full queue Redis is what this runbook is run for. A job
    moving between two lists during the round trip may be counted in both or neither.

    Args:
        name: the [redis.NAME] target's name, for messages.
        target: its inventory entry (the BullMQ key prefix).
        queues: BullMQ queue names.

    Returns:
        Per queue name, its counts (waiting, active, delayed, failed, completed ...).

    Raises:
        ConfigError: the target's url is not a Redis URL.
        AuthenticationFailed: Redis refused the password or the user's ACL.
        TargetUnreachable: no connection, or it timed out (transient: retried).
        TargetError: any other error Redis answered with."""
    with connect(name, target) as r:
        pipe = r.pipeline(transaction=False)
        for queue in queues:
            key = f"{target.prefix}:{queue}:"
            pipe.exists(key + "meta", key + "id", key + "events")
            pipe.hget(key + "meta", "paused")
            pipe.llen(key + "wait")
            pipe.lindex(key + "wait", -1)
            pipe.llen(key + "paused")
            pipe.lindex(key + "paused", -1)
            pipe.llen(key + "active")
            pipe.lrange(key + "active", 0, ACTIVE_IDS_SAMPLE - 1)
            for zset in ("delayed", "prioritized", "waiting-children", "failed", "completed"):
                pipe.zcard(key + zset)
        replies = iter(pipe.execute())
    counts = {}
    for queue in queues:
        exists, paused_flag = next(replies), next(replies)
        wait = _list_len(next(replies), next(replies))
        paused = _list_len(next(replies), next(replies))
        active, active_ids = next(replies), next(replies)
        delayed, prioritized, children, failed, completed = (next(replies) for _ in range(5))
        counts[queue] = QueueCounts(
            exists=bool(exists),
            is_paused=paused_flag == "1" or paused > 0,
            waiting=wait,
            paused=paused,
            active=active,
            delayed=delayed,
            prioritized=prioritized,
            waiting_children=children,
            failed=failed,
            completed=completed,
            active_ids=active_ids,
        )
    return counts


@io_task("await-redis-ready", timeout_seconds=3700, retries=0)
def await_redis_ready(name: str, target: RedisTarget, timeout_seconds: float) -> bool:
    """Wait until the server answers PING, backing off from 0.2 s to 2 s between tries
    (tasks.wait.poll), for at most timeout_seconds.

    Args:
        name: the [redis.NAME] target's name, for messages.
        target: its inventory entry.
        timeout_seconds: how long to wait, in seconds; 0: try once.

    Returns:
        True when it answered within timeout_seconds, False when it did not.

    Raises:
        ConfigError: the target's url is not a Redis URL.
        TargetError: an error Redis answered with other than a refused login (LOADING,
            while it loads its data set, counts as not answering yet)."""

    def answers() -> bool:
        try:
            with connect(name, target) as r:
                return bool(r.ping())
        except (TargetUnreachable, AuthenticationFailed):
            return False

    return poll(
        answers,
        what=f"redis target {name!r} to answer",
        timeout_seconds=timeout_seconds,
        first_delay_seconds=0.2,
        max_delay_seconds=2,
    ).done
