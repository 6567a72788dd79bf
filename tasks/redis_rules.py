"""Pure decisions for the Redis runbooks (seeds 000 s1 and s3, 001, 004 s4): findings from what
was read, actions from findings. No I/O here."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, ClassVar, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

from tasks.models import Action, ActionStatus, Finding, Params, ServiceRef, Severity

if TYPE_CHECKING:
    from tasks.settings import RedisTarget

MiB = 2**20
# Below this resident size a high fragmentation ratio is noise (a near-empty allocator).
FRAGMENTATION_MIN_RSS = 64 * MiB
NO_CONTROLLER = (
    "no service is configured for this target ({setting}), so this is not done here: {what} "
    "by hand (e.g. `docker compose {command}`)"
)

# The kinds of action each runbook plans (the flow and deployments.catalog read them from here).
# enable_/disable_maintenance: the pair around the mending when the target has a
# maintenance_service (tasks.maintenance_rules).
RedisHealthAction = Literal[
    "set_maxmemory_policy",
    "enable_aof",
    "restart_service",
    "enable_maintenance",
    "disable_maintenance",
]
LockoutAction = Literal["clear_lockout_keys", "clear_lockout_rows"]
QueueBacklogAction = Literal["scale_workers"]


class MaxmemoryPolicy(BaseModel):
    """The maxmemory-policy to set (what the target's role wants)."""

    model_config = ConfigDict(frozen=True)

    policy: str


class ScaleTo(BaseModel):
    """How many replicas of the worker service to run."""

    model_config = ConfigDict(frozen=True)

    replicas: int


# set_maxmemory_policy carries the policy, restart_service the service (None: none is
# configured, and the restart is skipped), enable_aof nothing.
RedisHealthStep = Action[RedisHealthAction, MaxmemoryPolicy | ServiceRef | None]
LockoutStep = Action[LockoutAction, None]


class RedisHealthParams(Params):
    memory_warning_percent: float = Field(
        80,
        gt=0,
        le=100,
        description="used memory, % of maxmemory, for a warning; over 0, at most 100",
    )
    memory_critical_percent: float = Field(
        90,
        gt=0,
        le=100,
        description="used memory, % of maxmemory, for critical; over 0, at most 100",
    )
    fragmentation_ratio: float = Field(
        1.5,
        gt=1,
        le=100,
        description="mem_fragmentation_ratio (RSS / used memory), a warning; over 1, at most 100",
    )
    latency_warning_ms: float = Field(
        100,
        gt=0,
        le=60_000,
        description="median PING time, milliseconds, for a warning; over 0, at most 60000",
    )
    sample_seconds: float = Field(
        2,
        ge=0,
        le=60,
        description="seconds between the two reads of evicted_keys (0: no sample); 0 to 60",
    )


class LockoutParams(Params):
    run_only = frozenset({"subject", "all"})
    subject: str | None = Field(
        None, min_length=1, description="a user id, email or IP whose lockout is cleared"
    )
    all: bool = Field(False, description="clear every lockout (instead of one subject)")

    @model_validator(mode="after")
    def _subject_or_all(self) -> Self:
        if (self.subject is None) == (not self.all):
            raise ValueError("set either subject=USER_EMAIL_OR_IP or all=true (not both)")
        return self

    @property
    def who(self) -> str:
        """Whose lockouts, for messages: "all subjects" or the subject quoted."""
        return "all subjects" if self.all else repr(self.subject)


class QueueBacklogParams(Params):
    waiting_threshold: int = Field(
        1000,
        ge=0,
        description="waiting jobs over which a queue is backlogged (seed 000: 1000); 0 or more",
    )
    sample_seconds: float = Field(
        5,
        gt=0,
        le=300,
        description="seconds between the two counts, for the drain rate; over 0, at most 300",
    )
    scale_workers_to: int = Field(
        3, ge=1, le=100, description="worker replicas to scale a stuck queue's service to; 1 to 100"
    )


# --- redis-health --------------------------------------------------------------------------


class RedisHealth(BaseModel):
    reachable: bool
    transient: bool = True  # False: refused credentials; a restart will not help
    error: str = ""
    ping_ms: float | None = None
    info: dict[str, str] = Field(default_factory=dict)
    evicted_per_second: float = 0.0


def _num(info: dict[str, str], key: str) -> float:
    try:
        return float(info.get(key, 0))
    except ValueError:
        return 0.0


def policy_severity(target: RedisTarget, policy: str) -> Severity:
    if policy == target.wanted_policy:
        return Severity.ok
    if target.role == "queue" and policy.startswith("allkeys"):
        return Severity.critical  # BullMQ's keys get evicted: jobs vanish silently
    return Severity.warning


def health_findings(
    name: str, target: RedisTarget, h: RedisHealth, p: RedisHealthParams
) -> list[Finding]:
    def finding(
        check: str, severity: Severity, observed: object, message: str, threshold: object = None
    ) -> Finding:
        return Finding(
            check=check,
            target=name,
            severity=severity,
            observed=observed,
            threshold=threshold,
            message=message,
        )

    if not h.reachable:
        return [finding("reachable", Severity.critical, False, f"{target.description}: {h.error}")]
    info = h.info
    found = [
        finding(
            "ping",
            Severity.warning if (h.ping_ms or 0) > p.latency_warning_ms else Severity.ok,
            round(h.ping_ms or 0, 2),
            f"PING answered in {h.ping_ms:.2f} ms",
            p.latency_warning_ms,
        )
    ]

    used, limit = _num(info, "used_memory"), _num(info, "maxmemory")
    if limit:
        percent = 100 * used / limit
        severity = (
            Severity.critical
            if percent >= p.memory_critical_percent
            else Severity.warning
            if percent >= p.memory_warning_percent
            else Severity.ok
        )
        found.append(
            finding(
                "memory",
                severity,
                round(percent, 1),
                f"{used / MiB:.1f} MiB of maxmemory {limit / MiB:.1f} MiB",
                p.memory_warning_percent,
            )
        )
    else:
        cache = target.role == "cache"
        found.append(
            finding(
                "memory",
                Severity.warning if cache else Severity.ok,
                None,
                f"{used / MiB:.1f} MiB used, no maxmemory"
                + (
                    "; a cache without a limit grows until the host kills it: set maxmemory"
                    if cache
                    else ""
                ),
            )
        )

    ratio, rss = _num(info, "mem_fragmentation_ratio"), _num(info, "used_memory_rss")
    fragmented = ratio > p.fragmentation_ratio and rss >= FRAGMENTATION_MIN_RSS
    found.append(
        finding(
            "fragmentation",
            Severity.warning if fragmented else Severity.ok,
            ratio,
            f"mem_fragmentation_ratio {ratio} with {rss / MiB:.1f} MiB "
            "resident" + ("; consider activedefrag yes" if fragmented else ""),
            p.fragmentation_ratio,
        )
    )

    rate = round(h.evicted_per_second, 2)
    if rate > 0:
        severity = Severity.critical if target.role == "queue" else Severity.warning
        what = (
            "queued jobs are being lost"
            if target.role == "queue"
            else "the working set does not fit in maxmemory"
        )
        message = f"evicting {rate} keys/s (evicted_keys {info.get('evicted_keys')}): {what}"
    else:
        severity, message = (
            Severity.ok,
            f"no evictions while sampling (evicted_keys {info.get('evicted_keys', 0)} in all)",
        )
    found.append(finding("evictions", severity, rate, message, 0))

    policy = info.get("maxmemory_policy", "?")
    found.append(
        finding(
            "maxmemory_policy",
            policy_severity(target, policy),
            policy,
            f"{policy} on a {target.role} target, which wants {target.wanted_policy}",
            target.wanted_policy,
        )
    )

    statuses = {
        k: info.get(k, "ok")
        for k in ("aof_last_write_status", "aof_last_bgrewrite_status", "rdb_last_bgsave_status")
    }
    broken = {k: v for k, v in statuses.items() if v != "ok"}
    aof = info.get("aof_enabled") == "1"
    if broken:
        severity = Severity.critical
        message = (
            "persistence failing: "
            + ", ".join(f"{k} {v}" for k, v in broken.items())
            + " (disk full or not writable?)"
        )
    elif target.role == "queue" and not aof:
        severity, message = Severity.warning, "AOF is off on a queue: a restart loses jobs"
    else:
        severity, message = Severity.ok, f"aof {'on' if aof else 'off'}, last writes ok"
    found.append(finding("persistence", severity, broken or ("aof" if aof else "rdb"), message))

    clients, maxclients = _num(info, "connected_clients"), _num(info, "maxclients")
    busy = bool(maxclients) and clients >= 0.8 * maxclients
    found.append(
        finding(
            "clients",
            Severity.warning if busy else Severity.ok,
            int(clients),
            f"{int(clients)} connected of maxclients {int(maxclients)}, "
            f"{info.get('blocked_clients', 0)} blocked (workers waiting for jobs block)",
            int(0.8 * maxclients) if maxclients else None,
        )
    )
    return found


def plan_health(name: str, target: RedisTarget, h: RedisHealth) -> list[RedisHealthStep]:
    """Unreachable: a restart through its service (none when credentials are refused: a
    restart would not help); reachable: the maxmemory-policy its role wants, and AOF on a
    queue."""
    if not h.reachable:
        restart: RedisHealthStep = Action(
            kind="restart_service",
            target=name,
            destructive=True,
            description=f"restart {target.service or 'the service of'} redis "
            f"target {name!r} and wait for PING",
            args=ServiceRef(service=target.service) if target.service else None,
            touches=f"services.{target.service}" if target.service else None,
        )
        if target.service is None:
            restart.status = ActionStatus.skipped
            restart.detail = NO_CONTROLLER.format(
                setting='service = "NAME"', what="restart Redis", command="restart redis"
            )
        return [restart] if h.transient else []
    actions: list[RedisHealthStep] = []
    policy = h.info.get("maxmemory_policy")
    if policy is not None and policy != target.wanted_policy:
        actions.append(
            Action(
                kind="set_maxmemory_policy",
                target=name,
                # Moving to an evicting policy starts deleting keys at once if memory is full.
                destructive=target.wanted_policy != "noeviction",
                description=f"CONFIG SET maxmemory-policy {target.wanted_policy} (was {policy}), "
                "and CONFIG REWRITE so it survives a restart",
                args=MaxmemoryPolicy(policy=target.wanted_policy),
            )
        )
    if target.role == "queue" and h.info.get("aof_enabled") == "0":
        actions.append(
            Action(
                kind="enable_aof",
                target=name,
                # A background rewrite of the whole data set: a fork and disk writes.
                destructive=True,
                description="CONFIG SET appendonly yes, so a restart keeps the queue's jobs "
                "(a background rewrite writes the data set to disk once), and CONFIG REWRITE",
            )
        )
    return actions


# --- login-lockouts ------------------------------------------------------------------------


def glob_escape(text: str) -> str:
    """Escape Redis MATCH glob characters, so a user id such as `*` matches only itself."""
    return re.sub(r"([*?\[\]\\^])", r"\\\1", text)


def lockout_patterns(prefix: str, subject: str | None) -> tuple[str | None, str]:
    """(the exact key or None, the glob) that a clear of one subject, or of all, covers."""
    if subject is None:
        return None, f"{glob_escape(prefix)}:*"
    return f"{prefix}:{subject}", f"{glob_escape(prefix)}:{glob_escape(subject)}:*"


# Per login-lockouts check: the action that clears what it found, and what that does.
CLEARS: dict[str, tuple[LockoutAction, str]] = {
    "lockout_keys": ("clear_lockout_keys", "UNLINK the lockout keys"),
    "lockout_rows": ("clear_lockout_rows", "DELETE the rows"),
}


def lockout_findings(
    name: str,
    target: RedisTarget,
    p: LockoutParams,
    keys: int,
    sample: list[str],
    rows: int | None,
) -> list[Finding]:
    """The lockout keys found under the target's lockout_prefix (a sample of their names),
    and, when it has a lockout table, its rows for the subject (rows None: not counted);
    a warning for any found, ok for none."""
    found = [
        Finding(
            check="lockout_keys",
            target=name,
            severity=Severity.warning if keys else Severity.ok,
            observed=keys,
            threshold=0,
            message=f"{keys} lockout keys for {p.who} under {target.lockout_prefix}:"
            + (f"; e.g. {', '.join(sample)}" if sample else ""),
        )
    ]
    table = target.lockout_table
    if table is not None and rows is not None:
        found.append(
            Finding(
                check="lockout_rows",
                target=name,
                severity=Severity.warning if rows else Severity.ok,
                observed=rows,
                threshold=0,
                message=f"{rows} rows for {p.who} in {table.table} on postgres {table.postgres}",
            )
        )
    return found


def plan_lockouts(name: str, p: LockoutParams, findings: list[Finding]) -> list[LockoutStep]:
    """One clear per place that holds lockouts of the subject (CLEARS), none where none
    were found."""
    actions: list[LockoutStep] = []
    for f in findings:
        if f.check in CLEARS and f.observed:
            kind, what = CLEARS[f.check]
            actions.append(
                Action(
                    kind=kind,
                    target=name,
                    destructive=True,
                    description=f"{what} of {p.who} ({f.observed} now)",
                )
            )
    return actions


def refuse_rows(actions: list[LockoutStep], postgres: str, refusal: str | None) -> None:
    """Skip the clear of lockout rows when their PostgreSQL refuses writes (a standby, a
    read-only transaction default), saying why and where to delete them instead."""
    for action in (a for a in actions if refusal and a.kind == "clear_lockout_rows"):
        action.status = ActionStatus.skipped
        action.detail = f"postgres {postgres} refuses writes: {refusal}; delete them on the primary"


# --- queue-backlog -------------------------------------------------------------------------


class QueueCounts(BaseModel):
    exists: bool
    is_paused: bool
    waiting: int
    # A paused queue keeps its waiting jobs here (BullMQ's "paused" count).
    paused: int
    active: int
    delayed: int
    prioritized: int
    waiting_children: int
    failed: int
    completed: int
    active_ids: list[str]

    COUNTED: ClassVar[tuple[str, ...]] = (
        "waiting",
        "paused",
        "active",
        "delayed",
        "prioritized",
        "waiting_children",
        "failed",
        "completed",
    )

    @property
    def backlog(self) -> int:
        return self.waiting + self.paused


def queue_findings(
    name: str,
    queue: str,
    t0: QueueCounts,
    t1: QueueCounts,
    seconds: float,
    p: QueueBacklogParams,
) -> list[Finding]:
    def finding(
        check: str, severity: Severity, observed: object, message: str, threshold: object = None
    ) -> Finding:
        return Finding(
            check=f"{queue}.{check}",
            target=name,
            severity=severity,
            observed=observed,
            threshold=threshold,
            message=message,
        )

    if not t1.exists:
        return [
            finding(
                "exists",
                Severity.warning,
                False,
                f"no BullMQ queue {queue!r} here: check `queues` and `prefix`",
            )
        ]
    found = [
        finding(state, Severity.ok, getattr(t1, state), f"{getattr(t1, state)} {state}")
        for state in QueueCounts.COUNTED
    ]
    drain = (t0.backlog - t1.backlog) / seconds
    finished = (t1.completed + t1.failed) - (t0.completed + t0.failed)
    rate = f"drain {drain:.1f} jobs/s, {finished / seconds:.1f} finished/s"
    paused = "; the queue is PAUSED" if t1.is_paused else ""
    backlog = t1.backlog
    if backlog <= p.waiting_threshold:
        severity, message = Severity.ok, f"{backlog} waiting ({rate}){paused}"
    elif drain > 0:
        severity, message = (
            Severity.ok,
            (
                f"{backlog} waiting, over the threshold but draining: {rate}, empty in about "
                f"{backlog / drain:.0f} s"
            ),
        )
    else:
        severity, message = Severity.warning, f"{backlog} waiting and not draining ({rate}){paused}"
    found.insert(0, finding("backlog", severity, backlog, message, p.waiting_threshold))
    stalled = (
        t1.active > 0
        and finished <= 0
        and t0.active_ids == t1.active_ids
        and t0.waiting <= t1.waiting
    )
    found.append(
        finding(
            "progress",
            Severity.warning if stalled else Severity.ok,
            round(finished / seconds, 2),
            f"{t1.active} active jobs, none finished or taken in {seconds:g} s: workers stalled?"
            if stalled
            else f"{rate}",
            0,
        )
    )
    found.append(finding("drain_rate", Severity.ok, round(drain, 2), rate))
    return found


def plan_backlog(
    name: str, target: RedisTarget, findings: list[Finding], p: QueueBacklogParams
) -> list[Action[QueueBacklogAction, ScaleTo]]:
    stuck = [
        f.check.rsplit(".", 1)[0]
        for f in findings
        if f.severity is not Severity.ok and f.check.endswith((".backlog", ".progress"))
    ]
    if not stuck:
        return []
    scale: Action[QueueBacklogAction, ScaleTo] = Action(
        kind="scale_workers",
        target=name,
        destructive=False,
        description=f"scale {target.worker_service or 'the workers'} of "
        f"{', '.join(sorted(set(stuck)))} to {p.scale_workers_to} replicas",
        args=ScaleTo(replicas=p.scale_workers_to),
        touches=f"services.{target.worker_service}" if target.worker_service else None,
    )
    if target.worker_service is None:
        scale.status = ActionStatus.skipped
        scale.detail = NO_CONTROLLER.format(
            setting='worker_service = "NAME"',
            what="scale the workers",
            command=f"up -d --scale worker={p.scale_workers_to}",
        )
    return [scale]
