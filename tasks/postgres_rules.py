"""Pure decisions for the Postgres runbooks: findings from what was read, actions from findings.
No I/O here: everything is testable without a server."""

from __future__ import annotations

import re
from collections import Counter
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from tasks.models import Action, ActionStatus, Finding, Params, Severity

if TYPE_CHECKING:
    from tasks.postgres import Activity, Backend, StuckJobs, TableStats, TopQueries
    from tasks.settings import JobsTable, PostgresTarget

CLIENT = "client backend"  # pg_stat_activity.backend_type of an application's session
# Both are a transaction left open by the client; "(aborted)": one of its statements failed.
IDLE_IN_TRANSACTION = frozenset({"idle in transaction", "idle in transaction (aborted)"})
CONNECTIONS_WARNING = 0.8  # of max_connections; seeds 002/004: warn at 80 %, act at 90 %
CONNECTIONS_CRITICAL = 0.9
LISTED = 10  # ids or pids named in one message

# The kinds of action each runbook plans (the flow and deployments.catalog read them from here).
ConnectionsAction = Literal["cancel_query", "terminate_backend"]
MaintenanceAction = Literal["vacuum_analyze"]
StuckJobsAction = Literal["reset_stuck_jobs"]
# The state a backend must still be in when it is terminated: the one it was planned in.
TerminateWhen = Literal["idle_in_transaction", "active"]


class BackendRef(BaseModel):
    """One backend as planned: signalled only while it is still this backend (pid and
    backend_start) in the same query (query_start) or idle transaction (state_change)."""

    model_config = ConfigDict(frozen=True)

    pid: int
    backend_start: datetime | None
    query_start: datetime | None = None
    state_change: datetime | None = None


class TableRef(BaseModel):
    """A table to vacuum, with its dead tuples when planned (for the before/after detail)."""

    model_config = ConfigDict(frozen=True)

    schema_name: str
    table: str
    dead_before: int


class JobIds(BaseModel):
    """The ids of the stuck jobs to reset, as read from the jobs table."""

    model_config = ConfigDict(frozen=True)

    ids: list[Any]


ConnectionsStep = Action[ConnectionsAction, BackendRef]


class ConnectionsParams(Params):
    idle_in_transaction_seconds: int = Field(
        600,
        ge=1,
        le=7 * 86400,
        description="seconds a transaction may sit idle before its backend is ended; 1 to 604800",
    )
    long_query_seconds: int = Field(
        300,
        ge=1,
        le=7 * 86400,
        description="seconds a statement may run before it is cancelled; 1 to 604800",
    )
    cancel_grace_seconds: int = Field(
        10,
        ge=0,
        le=300,
        description="seconds a cancelled query gets before its backend is terminated; 0 to 300",
    )
    max_backends_ended: int = Field(
        20, ge=0, le=1000, description="most backends cancelled or terminated per run; 0 to 1000"
    )


class MaintenanceParams(Params):
    dead_tuple_ratio: float = Field(
        0.2,
        gt=0,
        le=1,
        description="dead tuples over all tuples from which a table is vacuumed; over 0, at most 1",
    )
    min_dead_tuples: int = Field(
        1000, ge=0, description="dead tuples a table needs before its ratio counts; 0 or more"
    )
    top_queries: int = Field(
        10, ge=1, le=100, description="slowest statements listed (pg_stat_statements); 1 to 100"
    )
    max_tables: int = Field(
        20, ge=0, le=1000, description="most tables vacuumed per run; 0 to 1000"
    )
    lock_timeout_seconds: float = Field(
        5, gt=0, le=600, description="seconds VACUUM waits for its lock; over 0, at most 600"
    )
    vacuum_timeout_seconds: float = Field(
        1800, gt=0, le=86400, description="seconds one VACUUM may run; over 0, at most 86400"
    )


class StuckJobsParams(Params):
    stuck_after_minutes: int = Field(
        30,
        ge=1,
        le=30 * 1440,
        description="minutes running after which a job is stuck (seed 004: 30); 1 to 43200",
    )
    max_jobs_reset: int = Field(
        1000, ge=0, le=100_000, description="most stuck jobs reset per run; 0 to 100000"
    )


def _age(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def listing(items: list[Any]) -> str:
    shown = ", ".join(str(i) for i in items[:LISTED])
    return shown + (f" and {len(items) - LISTED} more" if len(items) > LISTED else "")


# --- postgres-connections ------------------------------------------------------------------


def ineligible(b: Backend, target: PostgresTarget) -> str | None:
    """Why this backend must be left alone, or None if the runbook may end it."""
    if b.ours:
        return "the runbook's own session"
    if b.hidden:
        return "hidden from the runbook's role (pg_read_all_stats)"
    if b.backend_type != CLIENT:
        return f"a {b.backend_type}, not a client backend"
    if b.superuser:
        return "a superuser's session"
    for allowed, value, what in (
        (target.allow_roles, b.usename, "role"),
        (target.allow_databases, b.datname, "database"),
        (target.allow_applications, b.application_name, "application"),
    ):
        if allowed is not None and value not in allowed:
            return f"{what} {value!r} is not in allow_{what}s"
    return None


def _who(b: Backend) -> str:
    app = f" app {b.application_name!r}" if b.application_name else ""
    return f"pid {b.pid} ({b.usename}@{b.datname}{app})"


def quote_ident(name: str) -> str:
    """An SQL identifier as PostgreSQL's quote_ident writes it, for a statement to copy."""
    if re.fullmatch(r"[a-z_][a-z0-9_$]*", name):
        return name
    return '"' + name.replace('"', '""') + '"'


def idle_in_transaction(activity: Activity, p: ConnectionsParams) -> list[Backend]:
    """Client sessions idle in a transaction (aborted or not) for over the limit."""
    return [
        b
        for b in activity.backends
        if b.backend_type == CLIENT
        and b.state in IDLE_IN_TRANSACTION
        and b.state_change is not None
        and (activity.now - b.state_change).total_seconds() > p.idle_in_transaction_seconds
    ]


def long_queries(activity: Activity, p: ConnectionsParams) -> list[Backend]:
    """Active client queries over the limit, leaving out the ones only waiting on a lock: they
    are victims, and ending whoever blocks them is what helps. Walsenders (a replica,
    pg_receivewal), replication and parallel workers, autovacuum and other background workers
    are active for as long as they live: never long queries."""
    return [
        b
        for b in activity.backends
        if b.backend_type == CLIENT
        and b.state == "active"
        and b.query_start is not None
        and not b.blocked_by
        and (activity.now - b.query_start).total_seconds() > p.long_query_seconds
    ]


def connection_findings(
    target_name: str, activity: Activity, target: PostgresTarget, p: ConnectionsParams
) -> list[Finding]:
    clients = [b for b in activity.backends if b.backend_type == CLIENT]
    hidden = [b for b in activity.backends if b.hidden]
    # A hidden row's type is hidden too: one on a database is counted as a client.
    hidden_clients = [b for b in hidden if b.datname is not None]
    counted = len(clients) + len(hidden_clients)
    used = counted / activity.max_connections
    states = Counter(b.state or "unknown" for b in clients)
    if hidden_clients:
        states["hidden"] = len(hidden_clients)
    waits = Counter(
        f"{b.wait_event_type}/{b.wait_event}"
        for b in clients
        if b.wait_event_type and b.state != "idle"
    )
    breakdown = ", ".join(f"{s} {n}" for s, n in states.most_common())
    if waits:
        breakdown += "; waiting on " + ", ".join(f"{w} {n}" for w, n in waits.most_common(5))
    findings = [
        Finding(
            check="connections",
            target=target_name,
            severity=(
                Severity.critical
                if used >= CONNECTIONS_CRITICAL
                else Severity.warning
                if used >= CONNECTIONS_WARNING
                else Severity.ok
            ),
            observed=counted,
            threshold=int(activity.max_connections * CONNECTIONS_WARNING),
            message=f"{counted} of max_connections {activity.max_connections} "
            f"({used:.0%}): {breakdown or 'none'}",
        )
    ]
    others = Counter(
        b.backend_type for b in activity.backends if b.backend_type not in (None, CLIENT)
    )
    if others:
        senders = sorted(
            {b.application_name or "?" for b in activity.backends if b.backend_type == "walsender"}
        )
        findings.append(
            Finding(
                check="other_backends",
                target=target_name,
                severity=Severity.ok,
                observed=dict(others),
                message="not client sessions, never counted or ended as such: "
                + ", ".join(f"{t} {n}" for t, n in sorted(others.items()))
                + (f" (replication: {', '.join(senders)})" if senders else ""),
            )
        )
    if hidden:
        role = quote_ident(activity.role)
        findings.append(
            Finding(
                check="stats_privilege",
                target=target_name,
                severity=Severity.warning,
                observed=len(hidden),
                threshold=0,
                message=f"{len(hidden)} backends of other roles are hidden from role "
                f"{activity.role!r}, which lacks pg_read_all_stats: their type, state and age "
                "cannot be read, so only the sessions of its own roles are checked and ended; "
                f"run GRANT pg_read_all_stats TO {role}",
            )
        )

    def per_backend(check: str, found: list[Backend], since: str, limit: int, what: str) -> None:
        for b in found:
            age = (activity.now - getattr(b, since)).total_seconds()
            reason = ineligible(b, target)
            findings.append(
                Finding(
                    check=check,
                    target=target_name,
                    severity=Severity.warning,
                    observed=round(age),
                    threshold=limit,
                    message=f"{_who(b)} {what} for {_age(age)}"
                    + (f"; left alone: {reason}" if reason else ""),
                )
            )
        if not found:
            findings.append(
                Finding(
                    check=check,
                    target=target_name,
                    severity=Severity.ok,
                    observed=0,
                    threshold=limit,
                    message=f"no session {what} longer than {_age(limit)}",
                )
            )

    per_backend(
        "idle_in_transaction",
        idle_in_transaction(activity, p),
        "state_change",
        p.idle_in_transaction_seconds,
        "idle in transaction",
    )
    per_backend(
        "long_query",
        long_queries(activity, p),
        "query_start",
        p.long_query_seconds,
        "running one query",
    )

    by_pid = {b.pid: b for b in activity.backends}
    blocked = [b for b in activity.backends if b.blocked_by]
    for b in blocked:
        blockers = "; ".join(
            f"{_who(by_pid[pid])} {by_pid[pid].state or 'state hidden'}"
            if pid in by_pid
            else f"pid {pid}"
            for pid in b.blocked_by
        )
        waited = f" {_age((activity.now - b.query_start).total_seconds())}" if b.query_start else ""
        findings.append(
            Finding(
                check="blocked",
                target=target_name,
                severity=Severity.warning,
                observed=b.blocked_by,
                threshold=None,
                message=f"{_who(b)} waiting{waited} on a lock held by {blockers}",
            )
        )
    if not blocked:
        findings.append(
            Finding(
                check="blocked",
                target=target_name,
                severity=Severity.ok,
                observed=0,
                message="no session waits on another's lock",
            )
        )
    return findings


def plan_connections(
    target_name: str, activity: Activity, target: PostgresTarget, p: ConnectionsParams
) -> list[ConnectionsStep]:
    """Cancel long queries first (a terminate follows only if one outlives the grace period),
    then end sessions idle in transaction; never more than max_backends_ended backends."""
    actions: list[ConnectionsStep] = []
    for b in long_queries(activity, p):
        if ineligible(b, target) is None:
            actions.append(
                Action(
                    kind="cancel_query",
                    target=target_name,
                    destructive=True,
                    description=f"cancel the query of {_who(b)}; terminate it if still running "
                    f"{p.cancel_grace_seconds} s later",
                    args=BackendRef(
                        pid=b.pid, backend_start=b.backend_start, query_start=b.query_start
                    ),
                )
            )
    for b in idle_in_transaction(activity, p):
        if ineligible(b, target) is None:
            actions.append(
                Action(
                    kind="terminate_backend",
                    target=target_name,
                    destructive=True,
                    description=f"terminate {_who(b)}, idle in transaction",
                    args=BackendRef(
                        pid=b.pid, backend_start=b.backend_start, state_change=b.state_change
                    ),
                )
            )
    for action in actions[p.max_backends_ended :]:
        action.status = ActionStatus.skipped
        action.detail = (
            f"over the cap of {p.max_backends_ended} backends per run (max_backends_ended)"
        )
    return actions


# --- postgres-maintenance ------------------------------------------------------------------


def bloated(tables: list[TableStats], p: MaintenanceParams) -> list[TableStats]:
    return sorted(
        (
            t
            for t in tables
            if t.dead_tuples >= p.min_dead_tuples and t.dead_ratio >= p.dead_tuple_ratio
        ),
        key=lambda t: t.dead_tuples,
        reverse=True,
    )


def _last(*stamps: Any) -> str:
    known = [s for s in stamps if s is not None]
    # In the session's TimeZone as read: shown in UTC whatever the server's timezone setting.
    return f"{max(known).astimezone(UTC):%Y-%m-%d %H:%M} UTC" if known else "never"


def maintenance_findings(
    target_name: str, tables: list[TableStats], top: TopQueries, p: MaintenanceParams
) -> list[Finding]:
    findings: list[Finding] = []
    if top.available:
        for check, ranked, key in (
            ("top_queries_total", top.by_total, "total_ms"),
            ("top_queries_mean", top.by_mean, "mean_ms"),
        ):
            head = ranked[0] if ranked else None
            findings.append(
                Finding(
                    check=check,
                    target=target_name,
                    severity=Severity.ok,
                    observed=[q.model_dump() for q in ranked],
                    threshold=p.top_queries,
                    message=(
                        f"top {len(ranked)} by {key}; first: {getattr(head, key):.1f} ms, "
                        f"{head.calls} calls: {head.query[:120]}"
                    )
                    if head
                    else "pg_stat_statements has no queries for this database yet",
                )
            )
        if top.hidden:
            findings.append(
                Finding(
                    check="stats_privilege",
                    target=target_name,
                    severity=Severity.warning,
                    observed=top.hidden,
                    threshold=0,
                    message=f"{top.hidden} of the top {len(top.by_total)} queries belong to "
                    f"other roles and role {top.role!r} may not read their text (it lacks "
                    f"pg_read_all_stats): run GRANT pg_read_all_stats TO {quote_ident(top.role)}",
                )
            )
    else:
        findings.append(
            Finding(
                check="pg_stat_statements",
                target=target_name,
                severity=Severity.ok,
                observed="unavailable",
                message=top.reason,
            )
        )
    for t in bloated(tables, p):
        findings.append(
            Finding(
                check="dead_tuples",
                target=target_name,
                severity=Severity.warning,
                observed=round(t.dead_ratio, 3),
                threshold=p.dead_tuple_ratio,
                message=f"{t.qualified}: {t.dead_tuples} dead of {t.live_tuples + t.dead_tuples} "
                f"tuples; last vacuum {_last(t.last_vacuum, t.last_autovacuum)}, "
                f"last analyze {_last(t.last_analyze, t.last_autoanalyze)}",
            )
        )
    if not bloated(tables, p):
        findings.append(
            Finding(
                check="dead_tuples",
                target=target_name,
                severity=Severity.ok,
                observed=0,
                threshold=p.dead_tuple_ratio,
                message=f"no table over {p.dead_tuple_ratio:.0%} dead tuples "
                f"(and {p.min_dead_tuples} at least) among {len(tables)}",
            )
        )
    findings.append(
        Finding(
            check="table_sizes",
            target=target_name,
            severity=Severity.ok,
            observed=[
                {
                    "table": t.qualified,
                    "total_bytes": t.total_bytes,
                    "table_bytes": t.table_bytes,
                    "index_bytes": t.index_bytes,
                }
                for t in tables[:LISTED]
            ],
            message=f"{len(tables)} tables, "
            f"{sum(t.total_bytes for t in tables) / 2**20:.1f} MiB with indexes",
        )
    )
    return findings


def plan_maintenance(
    target_name: str, tables: list[TableStats], p: MaintenanceParams
) -> list[Action[MaintenanceAction, TableRef]]:
    actions: list[Action[MaintenanceAction, TableRef]] = [
        Action(
            kind="vacuum_analyze",
            target=target_name,
            destructive=False,
            description=f"VACUUM (ANALYZE) {t.qualified} ({t.dead_tuples} dead tuples)",
            args=TableRef(schema_name=t.schema_name, table=t.table, dead_before=t.dead_tuples),
        )
        for t in bloated(tables, p)
    ]
    for action in actions[p.max_tables :]:
        action.status = ActionStatus.skipped
        action.detail = f"over the cap of {p.max_tables} tables per run (max_tables)"
    return actions


# --- stuck-jobs ----------------------------------------------------------------------------


def stuck_findings(
    target_name: str, jobs: JobsTable, stuck: StuckJobs, p: StuckJobsParams
) -> list[Finding]:
    n = len(stuck.ids)
    oldest = (
        f"; oldest started {_age(stuck.oldest_seconds)} ago"
        if stuck.oldest_seconds is not None
        else ""
    )
    return [
        Finding(
            check="stuck_jobs",
            target=target_name,
            severity=Severity.warning if n else Severity.ok,
            observed=n,
            threshold=p.stuck_after_minutes,
            message=(
                f"{n} jobs in {jobs.table} {jobs.running_value!r} for over "
                f"{p.stuck_after_minutes} min: ids {listing(stuck.ids)}{oldest}"
            )
            if n
            else f"no job in {jobs.table} {jobs.running_value!r} for over "
            f"{p.stuck_after_minutes} min",
        )
    ]


def plan_stuck_jobs(
    target_name: str, jobs: JobsTable, stuck: StuckJobs, p: StuckJobsParams
) -> list[Action[StuckJobsAction, JobIds]]:
    if not stuck.ids:
        return []
    ids = stuck.ids[: p.max_jobs_reset]
    action: Action[StuckJobsAction, JobIds] = Action(
        kind="reset_stuck_jobs",
        target=target_name,
        destructive=True,
        description=f"set {len(ids)} stuck jobs in {jobs.table} back to "
        f"{jobs.pending_value!r}: ids {listing(ids)}",
        args=JobIds(ids=ids),
    )
    if not ids:
        action.status = ActionStatus.skipped
        action.detail = "max_jobs_reset is 0"
    elif len(stuck.ids) > len(ids):
        action.detail = f"the oldest {len(ids)} only: cap max_jobs_reset"
    return [action]
