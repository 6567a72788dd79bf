"""PostgreSQL: read-only checks and the few verbs the runbooks may use, one task each.

Every connection has a connect timeout and a statement timeout; identifiers go through
psycopg.sql.Identifier; signals and VACUUM run in autocommit."""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import dict_row
from pydantic import BaseModel, Field

from tasks.engine import io_task
from tasks.errors import (
    ActionFailed,
    AuthenticationFailed,
    ConfigError,
    TargetError,
    TargetUnreachable,
)
from tasks.models import Action, ActionStatus
from tasks.postgres_rules import BackendRef, TerminateWhen
from tasks.settings import JobsTable, LockoutTable, PostgresTarget, TimedTable, dsn_keywords
from tasks.wait import poll

CONNECT_TIMEOUT_SECONDS = 5
APPLICATION_NAME = "runbook"
CANCELLED = "cancelled"
# What pg_stat_activity and pg_stat_statements show of another role's statement to a role
# without pg_read_all_stats.
HIDDEN_QUERY = "<insufficient privilege>"
# Where connecting again cannot help: bad password or role, unknown database (SQLSTATE 28P01,
# 28000, 3D000). libpq gives no SQLSTATE for a refused connection, so its message is read too.
_REFUSED_ERRORS = (
    psycopg.errors.InvalidPassword,
    psycopg.errors.InvalidAuthorizationSpecification,
    psycopg.errors.InvalidCatalogName,
)
_REFUSED = re.compile(
    r'authentication failed|no pg_hba\.conf entry|(role|database) ".*" does not exist'
)
# The connection broke (SQLSTATE class 08), or the server is shutting down or restarting under
# us (57P01, 57P02, 57P03): worth another try.
_CONNECTION_LOST = (
    psycopg.errors.ConnectionException,
    psycopg.errors.SqlclientUnableToEstablishSqlconnection,
    psycopg.errors.ConnectionDoesNotExist,
    psycopg.errors.SqlserverRejectedEstablishmentOfSqlconnection,
    psycopg.errors.ConnectionFailure,
    psycopg.errors.TransactionResolutionUnknown,
    psycopg.errors.ProtocolViolation,
    psycopg.errors.AdminShutdown,
    psycopg.errors.CrashShutdown,
    psycopg.errors.CannotConnectNow,
)


def credentials_refused(exc: psycopg.Error) -> bool:
    """Whether the server refused the login itself (password, role, database), as opposed to
    not answering: the first is an AuthenticationFailed, never retried."""
    return isinstance(exc, _REFUSED_ERRORS) or _REFUSED.search(str(exc)) is not None


def dsn_parts(name: str, target: PostgresTarget) -> dict[str, Any]:
    """The target's DSN as libpq's keywords (host, port, dbname, user, password...).

    Raises ConfigError naming postgres.NAME.dsn when libpq cannot parse it (settings catch
    that at load; this is for a target built in code), without quoting the DSN."""
    try:
        return dsn_keywords(target.dsn)
    except ValueError as exc:
        raise ConfigError(f"postgres.{name}.dsn: {exc}") from None


@contextmanager
def connect(
    name: str,
    target: PostgresTarget,
    *,
    statement_timeout_seconds: float = 30,
    lock_timeout_seconds: float = 5,
    autocommit: bool = True,
) -> Iterator[psycopg.Connection[dict[str, Any]]]:
    """A connection to the target for one `with` block: rows as dicts, application_name
    "runbook", a connect timeout of CONNECT_TIMEOUT_SECONDS (5 s), and statement_timeout and
    lock_timeout (seconds, sent in milliseconds) for every statement; autocommit unless told
    otherwise (then the block is one transaction, committed at its end, rolled back on error).

    Raises AuthenticationFailed when the server refuses the login (password, role, database);
    TargetUnreachable (transient) when it cannot be reached or the connection is lost
    (SQLSTATE class 08, a shutdown, no SQLSTATE at all); TargetError for any other error the
    server answers with inside the block; ConfigError (naming postgres.NAME.dsn) for a dsn
    that is not a connection string at all."""
    options = (
        f"-c statement_timeout={int(statement_timeout_seconds * 1000)} "
        f"-c lock_timeout={int(lock_timeout_seconds * 1000)}"
    )
    dsn_parts(name, target)  # psycopg's own ProgrammingError would quote the DSN
    try:
        conn = psycopg.connect(
            target.dsn.get_secret_value(),
            connect_timeout=CONNECT_TIMEOUT_SECONDS,
            autocommit=autocommit,
            application_name=APPLICATION_NAME,
            options=options,
            row_factory=dict_row,
        )
    except psycopg.OperationalError as exc:
        where = f"postgres target {name!r} ({target.description})"
        if credentials_refused(exc):
            raise AuthenticationFailed(
                f"{where}: cannot connect: {_first_line(exc)}; "
                "check the credentials and database name in its dsn"
            ) from exc
        raise TargetUnreachable(
            f"{where}: cannot connect: {_first_line(exc)}; "
            "check that the server is up and the dsn's host and port",
            transient=True,
        ) from exc
    try:
        with conn:
            yield conn
    except psycopg.Error as exc:
        if exc.sqlstate is None or isinstance(exc, _CONNECTION_LOST):
            raise TargetUnreachable(
                f"postgres target {name!r} ({target.description}): connection lost: "
                f"{_first_line(exc)}",
                transient=True,
            ) from exc
        raise TargetError(
            f"postgres target {name!r} ({target.description}): {_first_line(exc)}"
        ) from exc


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


# --- connections -------------------------------------------------------------------------


class Backend(BaseModel):
    """One row of pg_stat_activity. A row of another role's session that the runbook's role
    may not read in full (no pg_read_all_stats) is `hidden`: PostgreSQL shows its query as
    '<insufficient privilege>' and its type, state and times as NULL."""

    pid: int
    backend_type: str | None
    usename: str | None
    datname: str | None
    application_name: str
    state: str | None
    wait_event_type: str | None
    wait_event: str | None
    backend_start: datetime | None
    xact_start: datetime | None
    query_start: datetime | None
    state_change: datetime | None
    blocked_by: list[int]
    superuser: bool
    ours: bool
    hidden: bool


class Activity(BaseModel):
    """pg_stat_activity at one moment: the server's now() (UTC), max_connections, the role
    the runbook connects as, and every backend (ours included, marked `ours`)."""

    now: datetime
    max_connections: int
    role: str = Field(description="the runbook's role (current_user)")
    backends: list[Backend]


_ACTIVITY = """
SELECT a.pid, a.backend_type, a.usename, a.datname, coalesce(a.application_name, '')
         AS application_name,
       a.state, a.wait_event_type, a.wait_event, a.backend_start, a.xact_start,
       a.query_start, a.state_change, pg_blocking_pids(a.pid) AS blocked_by,
       coalesce(r.rolsuper, false) AS superuser, a.pid = pg_backend_pid() AS ours,
       a.backend_start IS NULL AS hidden
FROM pg_stat_activity a LEFT JOIN pg_roles r ON r.oid = a.usesysid
"""


@io_task("read-activity", timeout_seconds=45)
def read_activity(name: str, target: PostgresTarget) -> Activity:
    """Every backend in pg_stat_activity, with now() and max_connections from the server.

    Args:
        name: the [postgres.NAME] target's name, for messages.
        target: its inventory entry.

    Returns:
        Activity: the server's now(), max_connections, the runbook's role and every backend
        (rows the role may not read in full are marked hidden).

    Raises:
        AuthenticationFailed: the server refused the login (password, role, database).
        TargetUnreachable: no connection, or it was lost (transient: retried).
        TargetError: any other error the server answered with."""
    with connect(name, target) as conn:
        head = conn.execute(
            "SELECT now() AS now, current_setting('max_connections')::int AS max_connections, "
            "current_user AS role"
        ).fetchone()
        assert head is not None
        rows = conn.execute(_ACTIVITY).fetchall()
    return Activity(**head, backends=[Backend(**r) for r in rows])


# The WHERE clauses below make each signal idempotent and pid-reuse safe: a backend is
# signalled only while it is still the same backend in the same state as when planned.
_CANCEL = """
SELECT pg_cancel_backend(pid) AS ok FROM pg_stat_activity
WHERE pid = %(pid)s AND backend_start = %(backend_start)s AND query_start = %(query_start)s
  AND state = 'active'
"""
_STILL_RUNNING = """
SELECT pid FROM pg_stat_activity
WHERE pid = ANY(%(pids)s) AND state = 'active' AND (pid, query_start) IN (
  SELECT * FROM unnest(%(pids)s::int[], %(starts)s::timestamptz[]))
"""
_TERMINATE = """
SELECT pg_terminate_backend(pid, 5000) AS ok FROM pg_stat_activity
WHERE pid = %(pid)s AND backend_start = %(backend_start)s AND {condition}
"""


def _signal(
    name: str, target: PostgresTarget, query: str | sql.Composed, args: BackendRef
) -> bool | None:
    """True: signalled; None: the backend is no longer in the planned state."""
    with connect(name, target) as conn:
        try:
            row = conn.execute(query, args.model_dump()).fetchone()
        except psycopg.errors.InsufficientPrivilege as exc:
            raise ActionFailed(
                f"postgres target {name!r}: not allowed to signal pid {args.pid}: "
                f"{_first_line(exc)}; grant pg_signal_backend to the runbook's role"
            ) from exc
    if row is None:
        return None
    if not row["ok"]:
        raise ActionFailed(
            f"postgres target {name!r}: pid {args.pid} did not end within 5 s of the signal"
        )
    return True


@io_task("cancel-query", timeout_seconds=30)
def cancel_query(name: str, target: PostgresTarget, args: BackendRef) -> str:
    """pg_cancel_backend on one backend, only while it is still the same backend (pid and
    backend_start) running the same query (query_start, state active): idempotent, and safe
    when the pid has been reused.

    Args:
        name: the [postgres.NAME] target's name, for messages.
        target: its inventory entry.
        args: the backend as planned (pid, backend_start, query_start).

    Returns:
        "cancelled", or "query had already finished" when it no longer matches the plan.

    Raises:
        ActionFailed: the role may not signal it (needs pg_signal_backend), or the server
            reported the signal as not sent.
        AuthenticationFailed: the server refused the login (password, role, database).
        TargetUnreachable: no connection, or it was lost (transient: retried).
        TargetError: any other error the server answered with."""
    if _signal(name, target, _CANCEL, args) is None:
        return "query had already finished"
    return CANCELLED


@io_task("await-queries-ended", timeout_seconds=600)
def await_queries_ended(
    name: str, target: PostgresTarget, queries: list[BackendRef], grace_seconds: float
) -> list[int]:
    """Wait up to grace_seconds for cancelled queries to end, reading pg_stat_activity every
    0.5 s (tasks.wait.poll). A query counts as ended once its pid is no longer active with the
    same query_start.

    Args:
        name: the [postgres.NAME] target's name, for messages.
        target: its inventory entry.
        queries: the cancelled backends (pid and query_start are compared).
        grace_seconds: how long to wait, in seconds; 0: look once.

    Returns:
        The pids still running the cancelled query at the end; empty when all ended.

    Raises:
        AuthenticationFailed: the server refused the login (password, role, database).
        TargetUnreachable: no connection, or it was lost (transient: retried).
        TargetError: any other error the server answered with."""
    args = {"pids": [q.pid for q in queries], "starts": [q.query_start for q in queries]}

    def running() -> list[int]:
        with connect(name, target) as conn:
            return [r["pid"] for r in conn.execute(_STILL_RUNNING, args).fetchall()]

    return poll(
        running,
        what=f"the cancelled queries on postgres target {name!r} to end",
        timeout_seconds=grace_seconds,
        done=lambda pids: not pids,
        first_delay_seconds=0.5,
        max_delay_seconds=0.5,
    ).value


@io_task("terminate-backend", timeout_seconds=30)
def terminate_backend(
    name: str, target: PostgresTarget, args: BackendRef, when: TerminateWhen
) -> str:
    """pg_terminate_backend on one backend that is still `when`: idle_in_transaction (same
    state_change) or active (same query_start, a query that ignored its cancel), and still the
    same backend (pid and backend_start). Waits up to 5 s for it to end.

    Args:
        name: the [postgres.NAME] target's name, for messages.
        target: its inventory entry.
        args: the backend as planned (pid, backend_start, and state_change or query_start).
        when: the state it must still be in: "idle_in_transaction" or "active".

    Returns:
        "terminated", or "backend had already ended or moved on" when it no longer matches.

    Raises:
        ActionFailed: the role may not signal it (needs pg_signal_backend), or the backend did
            not end within 5 s of the signal.
        AuthenticationFailed: the server refused the login (password, role, database).
        TargetUnreachable: no connection, or it was lost (transient: retried).
        TargetError: any other error the server answered with."""
    conditions: dict[TerminateWhen, str] = {
        "idle_in_transaction": "state IN ('idle in transaction', 'idle in transaction (aborted)')"
        " AND state_change = %(state_change)s",
        "active": "state = 'active' AND query_start = %(query_start)s",
    }
    condition = conditions[when]
    if _signal(name, target, _TERMINATE.format(condition=condition), args) is None:
        return "backend had already ended or moved on"
    return "terminated"


# --- maintenance ---------------------------------------------------------------------------


class TableStats(BaseModel):
    """One row of pg_stat_user_tables (plain and partitioned tables, materialized views):
    tuple counts (estimates), the last (auto)vacuum and analyze, sizes in bytes (table with
    TOAST, its indexes, and both), and the partitioned table it is a partition of, if any
    (schema.table)."""

    schema_name: str
    table: str
    live_tuples: int
    dead_tuples: int
    last_vacuum: datetime | None
    last_autovacuum: datetime | None
    last_analyze: datetime | None
    last_autoanalyze: datetime | None
    table_bytes: int
    index_bytes: int
    total_bytes: int
    partition_of: str | None = None

    @property
    def qualified(self) -> str:
        """schema.table, unquoted: for messages, never for SQL."""
        return f"{self.schema_name}.{self.table}"

    @property
    def dead_ratio(self) -> float:
        """Dead tuples over live plus dead, 0.0 to 1.0; 0.0 for an empty table."""
        total = self.live_tuples + self.dead_tuples
        return self.dead_tuples / total if total else 0.0


_TABLE_STATS = """
SELECT s.schemaname AS schema_name, s.relname AS table, s.n_live_tup AS live_tuples,
       s.n_dead_tup AS dead_tuples, s.last_vacuum, s.last_autovacuum, s.last_analyze,
       s.last_autoanalyze, pg_table_size(s.relid) AS table_bytes,
       pg_indexes_size(s.relid) AS index_bytes, pg_total_relation_size(s.relid) AS total_bytes,
       (SELECT pn.nspname || '.' || p.relname FROM pg_inherits i
          JOIN pg_class p ON p.oid = i.inhparent JOIN pg_namespace pn ON pn.oid = p.relnamespace
         WHERE i.inhrelid = s.relid AND p.relkind = 'p') AS partition_of
FROM pg_stat_user_tables s ORDER BY total_bytes DESC, 1, 2
"""


@io_task("read-table-stats", timeout_seconds=60)
def read_table_stats(name: str, target: PostgresTarget) -> list[TableStats]:
    """Tuples, sizes, last (auto)vacuum and analyze, and partitioned parent of every user
    table, largest first (postgres-maintenance; disk-space's largest tables).

    Args:
        name: the [postgres.NAME] target's name, for messages.
        target: its inventory entry.

    Returns:
        One TableStats per table.

    Raises:
        AuthenticationFailed: the server refused the login (password, role, database).
        TargetUnreachable: no connection, or it was lost (transient: retried).
        TargetError: any other error the server answered with."""
    with connect(name, target) as conn:
        return [TableStats(**r) for r in conn.execute(_TABLE_STATS).fetchall()]


class QueryStat(BaseModel):
    """One pg_stat_statements entry: the statement's first 300 characters, its calls, total
    and mean execution time in milliseconds, and rows returned or affected."""

    query: str
    calls: int
    total_ms: float
    mean_ms: float
    rows: int


class TopQueries(BaseModel):
    """The statements ranked by total and by mean time; or available False and why."""

    available: bool
    reason: str = ""
    by_total: list[QueryStat] = []
    by_mean: list[QueryStat] = []
    role: str = ""
    hidden: int = Field(0, description="of the top by total time, those the role may not read")


_TOP_QUERIES = sql.SQL("""
SELECT left(query, 300) AS query, calls, total_exec_time AS total_ms, mean_exec_time AS mean_ms,
       rows
FROM pg_stat_statements
WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())
ORDER BY {order} DESC LIMIT %(limit)s
""")


@io_task("read-top-queries", timeout_seconds=60)
def read_top_queries(name: str, target: PostgresTarget, limit: int) -> TopQueries:
    """The statements with the most total and the most mean execution time, from
    pg_stat_statements.

    Args:
        name: the [postgres.NAME] target's name, for messages.
        target: its inventory entry.
        limit: how many statements, at most.

    Returns:
        TopQueries: both rankings (calls, total and mean milliseconds, rows) and how many
        the role may not read; or available=False with the reason (the extension is not
        installed or not loaded).

    Raises:
        AuthenticationFailed: the server refused the login (password, role, database).
        TargetUnreachable: no connection, or it was lost (transient: retried).
        TargetError: any other error the server answered with."""
    with connect(name, target) as conn:
        installed = conn.execute(
            "SELECT extnamespace::regnamespace::text AS schema FROM pg_extension "
            "WHERE extname = 'pg_stat_statements'"
        ).fetchone()
        if installed is None:
            return TopQueries(
                available=False,
                reason=(
                    "pg_stat_statements is not installed in this database: run CREATE EXTENSION "
                    "pg_stat_statements (it also needs shared_preload_libraries)"
                ),
            )
        conn.execute(
            sql.SQL("SET search_path = {}, pg_catalog").format(sql.Identifier(installed["schema"]))
        )
        role = conn.execute("SELECT current_user AS role").fetchone()
        try:
            ranked = {
                order: [
                    QueryStat(**r)
                    for r in conn.execute(
                        _TOP_QUERIES.format(order=sql.Identifier(order)), {"limit": limit}
                    ).fetchall()
                ]
                for order in ("total_exec_time", "mean_exec_time")
            }
        except psycopg.errors.ObjectNotInPrerequisiteState as exc:
            return TopQueries(
                available=False,
                reason=(
                    f"pg_stat_statements cannot be read: {_first_line(exc)}; add it to "
                    "shared_preload_libraries and restart the server"
                ),
            )
    return TopQueries(
        available=True,
        by_total=ranked["total_exec_time"],
        by_mean=ranked["mean_exec_time"],
        role=role["role"] if role else "",
        # Without pg_read_all_stats, other roles' statements read as this placeholder.
        hidden=sum(q.query == HIDDEN_QUERY for q in ranked["total_exec_time"]),
    )


@io_task("vacuum-table", timeout_seconds=3600, retries=1)
def vacuum_table(
    name: str,
    target: PostgresTarget,
    schema_name: str,
    table: str,
    lock_timeout_seconds: float,
    statement_timeout_seconds: float,
) -> str:
    """VACUUM (ANALYZE) one table. The server skips a table the role may not vacuum with only a
    WARNING (15: 'skipping "t" --- only table or database owner can vacuum it'; 16+:
    'permission denied to vacuum "t", skipping it'): that is a failure.

    Args:
        name: the [postgres.NAME] target's name, for messages.
        target: its inventory entry.
        schema_name: the table's schema.
        table: the table's name.
        lock_timeout_seconds: how long to wait for the table's lock, in seconds.
        statement_timeout_seconds: how long the VACUUM may run, in seconds.

    Returns:
        What was done, for the action's detail.

    Raises:
        ActionFailed: the lock or statement timeout ended it, or the server skipped the table.
        AuthenticationFailed: the server refused the login (password, role, database).
        TargetUnreachable: no connection, or it was lost (transient: retried).
        TargetError: any other error the server answered with."""
    skipped: list[str] = []
    with connect(
        name,
        target,
        statement_timeout_seconds=statement_timeout_seconds,
        lock_timeout_seconds=lock_timeout_seconds,
    ) as conn:
        conn.add_notice_handler(
            lambda d: (
                skipped.append(d.message_primary or "")
                if d.severity_nonlocalized == "WARNING" and "skipping" in (d.message_primary or "")
                else None
            )
        )
        try:
            conn.execute(
                sql.SQL("VACUUM (ANALYZE) {}.{}").format(
                    sql.Identifier(schema_name), sql.Identifier(table)
                )
            )
        except (psycopg.errors.LockNotAvailable, psycopg.errors.QueryCanceled) as exc:
            raise ActionFailed(
                f"postgres target {name!r}: VACUUM of {schema_name}.{table} gave up: "
                f"{_first_line(exc)} (lock_timeout {lock_timeout_seconds} s, statement_timeout "
                f"{statement_timeout_seconds} s); retry off-peak or raise the timeouts"
            ) from exc
    if skipped:
        raise ActionFailed(
            f"postgres target {name!r}: VACUUM of {schema_name}.{table} was skipped: "
            f"{skipped[0]}; make the runbook's role the table's owner (or grant it pg_maintain "
            "on PostgreSQL 17+)"
        )
    return "vacuumed and analyzed"


# --- jobs table --------------------------------------------------------------------------


class StuckJobs(BaseModel):
    """The stuck jobs' ids (the id column's values), oldest first."""

    ids: list[Any]
    oldest_seconds: float | None = Field(description="how long ago the oldest one started")


# --- time columns of configured tables -----------------------------------------------------

_COLUMN_TYPE = """
SELECT coalesce(nullif(t.typbasetype, 0), t.oid)::regtype::text AS type
FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid
WHERE a.attrelid = %(table)s::regclass AND a.attname = %(column)s AND a.attnum > 0
  AND NOT a.attisdropped
"""
_WITH_ZONE = {"timestamp with time zone": True, "timestamp without time zone": False}


class TimeColumn:
    """A configured table's time column as SQL that means the same whatever the server's or
    the session's timezone: a timestamptz is compared as it is; a timestamp (without time
    zone) holds wall-clock times of the table's time_zone (the %(time_zone)s parameter)."""

    def __init__(self, column: sql.Identifier, with_zone: bool) -> None:
        self.column, self.with_zone = column, with_zone

    @classmethod
    def read(
        cls, conn: psycopg.Connection[dict[str, Any]], table: TimedTable, column: str
    ) -> TimeColumn:
        """The column's type from the catalog; anything but timestamp or timestamptz (a
        domain over one counts) is a ConfigError, and so is a missing table or column."""
        row = conn.execute(
            _COLUMN_TYPE,
            {"table": sql.Identifier(*table.table_parts).as_string(conn), "column": column},
        ).fetchone()
        if row is None:
            raise psycopg.errors.UndefinedColumn(f'column "{column}" does not exist')
        if row["type"] not in _WITH_ZONE:
            raise ConfigError(
                f"column {column!r} of {table.table!r} is {row['type']}: a time column must be "
                "timestamp or timestamptz; name another column in the config"
            )
        return cls(sql.Identifier(column), _WITH_ZONE[row["type"]])

    def compared(self, op: str, moment: str) -> sql.Composed:
        """`column OP moment`, moment an SQL timestamptz expression such as now(). For a
        timestamp column the moment is turned into the zone's wall-clock time rather than the
        column into a timestamptz, so an index on the column still serves the comparison."""
        if self.with_zone:
            return sql.SQL("{} " + op + " (" + moment + ")").format(self.column)
        return sql.SQL("{} " + op + " ((" + moment + ") AT TIME ZONE %(time_zone)s)").format(
            self.column
        )

    def seconds_ago(self) -> sql.Composed:
        """Seconds between the column's moment and now()."""
        if self.with_zone:
            return sql.SQL("extract(epoch FROM now() - {})").format(self.column)
        return sql.SQL("extract(epoch FROM now() - ({} AT TIME ZONE %(time_zone)s))").format(
            self.column
        )


# --- jobs table --------------------------------------------------------------------------


def _jobs_sql(jobs: JobsTable, started: TimeColumn) -> dict[str, sql.Composable]:
    return {
        "table": sql.Identifier(*jobs.table_parts),
        "id": sql.Identifier(jobs.id_column),
        "status": sql.Identifier(jobs.status_column),
        "started": started.column,
        "stuck": sql.SQL("{} = %(running)s AND {}").format(
            sql.Identifier(jobs.status_column),
            started.compared("<", "now() - make_interval(mins => %(minutes)s)"),
        ),
        "age": started.seconds_ago(),
    }


@contextmanager
def _configured_table(section: str, described: str) -> Iterator[None]:
    """A table or column the config names but the database lacks is a config error."""
    try:
        yield
    except (
        psycopg.errors.UndefinedTable,
        psycopg.errors.UndefinedColumn,
        psycopg.errors.InvalidSchemaName,
        psycopg.errors.InvalidParameterValue,  # a time_zone PostgreSQL does not know
    ) as exc:
        raise ConfigError(
            f"[{section}]: {_first_line(exc)} ({described}); correct the table and column "
            "names (and time_zone) in the config"
        ) from exc


def _jobs_errors(name: str, jobs: JobsTable) -> contextlib.AbstractContextManager[None]:
    return _configured_table(
        f"postgres.{name}.jobs",
        f"table {jobs.table!r}, columns {jobs.id_column!r}, {jobs.status_column!r}, "
        f"{jobs.started_column!r}",
    )


@io_task("find-stuck-jobs", timeout_seconds=60)
def find_stuck_jobs(name: str, target: PostgresTarget, jobs: JobsTable, minutes: int) -> StuckJobs:
    """Jobs in the running state that started over `minutes` ago, oldest first.

    Args:
        name: the [postgres.NAME] target's name, for messages.
        target: its inventory entry.
        jobs: the jobs table, its columns and status values.
        minutes: minutes running after which a job is stuck.

    Returns:
        StuckJobs: their ids, oldest first, and the oldest one's age in seconds.

    Raises:
        ConfigError: the jobs table or one of its columns does not exist as configured.
        AuthenticationFailed: the server refused the login (password, role, database).
        TargetUnreachable: no connection, or it was lost (transient: retried).
        TargetError: any other error the server answered with."""
    args = {"running": jobs.running_value, "minutes": minutes, "time_zone": jobs.time_zone}
    with connect(name, target) as conn, _jobs_errors(name, jobs):
        parts = _jobs_sql(jobs, TimeColumn.read(conn, jobs, jobs.started_column))
        query = sql.SQL(
            "SELECT {id} AS id, {age} AS age FROM {table} WHERE {stuck} ORDER BY {started}"
        ).format(**parts)
        rows = conn.execute(query, args).fetchall()
    return StuckJobs(
        ids=[r["id"] for r in rows], oldest_seconds=float(rows[0]["age"]) if rows else None
    )


@io_task("reset-stuck-jobs", timeout_seconds=120)
def reset_stuck_jobs(
    name: str, target: PostgresTarget, jobs: JobsTable, ids: list[Any], minutes: int
) -> list[Any]:
    """Set the given jobs back to pending (and their started column to NULL when
    clear_started), in one transaction, and only those still stuck now: running and started
    over `minutes` ago. Idempotent: a job that finished or was reset meanwhile is left alone.

    Args:
        name: the [postgres.NAME] target's name, for messages.
        target: its inventory entry.
        jobs: the jobs table, its columns and status values.
        ids: the ids find_stuck_jobs returned.
        minutes: minutes running after which a job is stuck (as when they were found).

    Returns:
        The ids that were reset.

    Raises:
        ConfigError: the jobs table or one of its columns does not exist as configured, or
            the started column is not a timestamp.
        AuthenticationFailed: the server refused the login (password, role, database).
        TargetUnreachable: no connection, or it was lost (transient: retried).
        TargetError: any other error the server answered with (a standby refuses writes)."""
    args = {
        "pending": jobs.pending_value,
        "running": jobs.running_value,
        "minutes": minutes,
        "time_zone": jobs.time_zone,
        "ids": ids,
    }
    with connect(name, target, autocommit=False) as conn, _jobs_errors(name, jobs):
        parts = _jobs_sql(jobs, TimeColumn.read(conn, jobs, jobs.started_column))
        assignments = [sql.SQL("{status} = %(pending)s").format(**parts)]
        if jobs.clear_started:
            assignments.append(sql.SQL("{started} = NULL").format(**parts))
        query = sql.SQL(
            "UPDATE {table} SET {assign} WHERE {id} = ANY(%(ids)s) AND {stuck} RETURNING {id} AS id"
        ).format(assign=sql.SQL(", ").join(assignments), **parts)
        rows = conn.execute(query, args).fetchall()
    return [r["id"] for r in rows]


# --- lockout table ---------------------------------------------------------------------------


def _lockout_query(
    conn: psycopg.Connection[dict[str, Any]], verb: str, table: LockoutTable, subject: str | None
) -> sql.Composed:
    """Rows of the subject (all rows: None) whose lockout is still in force (expires_column
    after now(); every row when the table has none)."""
    where = []
    if subject is not None:
        where.append(sql.SQL("{} = %(subject)s").format(sql.Identifier(table.column)))
    if table.expires_column is not None:
        where.append(TimeColumn.read(conn, table, table.expires_column).compared(">", "now()"))
    return sql.SQL(verb + " {}{}").format(
        sql.Identifier(*table.table_parts),
        sql.SQL(" WHERE ") + sql.SQL(" AND ").join(where) if where else sql.SQL(""),
    )


@io_task("count-lockout-rows", timeout_seconds=60)
def count_lockout_rows(
    name: str, target: PostgresTarget, redis_name: str, table: LockoutTable, subject: str | None
) -> int:
    """How many rows of the lockout table hold one subject, or all rows when subject is None.

    Args:
        name: the [postgres.NAME] target's name, for messages.
        target: its inventory entry.
        redis_name: the [redis.NAME] whose lockout_table this is, for messages.
        table: the lockout table and its columns.
        subject: a user id, email or IP; None: every lockout.

    Returns:
        The number of rows.

    Raises:
        ConfigError: the table or one of its columns does not exist as configured.
        AuthenticationFailed: the server refused the login (password, role, database).
        TargetUnreachable: no connection, or it was lost (transient: retried).
        TargetError: any other error the server answered with."""
    args = {"subject": subject, "time_zone": table.time_zone}
    with connect(name, target) as conn, _lockout_errors(redis_name, table):
        query = _lockout_query(conn, "SELECT count(*) AS n FROM", table, subject)
        row = conn.execute(query, args).fetchone()
    return int(row["n"]) if row else 0


@io_task("delete-lockout-rows", timeout_seconds=120)
def delete_lockout_rows(
    name: str, target: PostgresTarget, redis_name: str, table: LockoutTable, subject: str | None
) -> int:
    """DELETE the lockout rows of one subject, or every row when subject is None, that are
    still in force (expires_column after now(); every row when the table has none), in one
    transaction. Idempotent: rows already gone are not counted.

    Args:
        name: the [postgres.NAME] target's name, for messages.
        target: its inventory entry.
        redis_name: the [redis.NAME] whose lockout_table this is, for messages.
        table: the lockout table and its columns.
        subject: a user id, email or IP; None: every lockout.

    Returns:
        The number of rows deleted.

    Raises:
        ConfigError: the table or one of its columns does not exist as configured, or the
            expires column is not a timestamp.
        AuthenticationFailed: the server refused the login (password, role, database).
        TargetUnreachable: no connection, or it was lost (transient: retried).
        TargetError: any other error the server answered with (a standby refuses writes)."""
    args = {"subject": subject, "time_zone": table.time_zone}
    with connect(name, target, autocommit=False) as conn, _lockout_errors(redis_name, table):
        cur = conn.execute(_lockout_query(conn, "DELETE FROM", table, subject), args)
        return cur.rowcount


def _lockout_errors(
    redis_name: str, table: LockoutTable
) -> contextlib.AbstractContextManager[None]:
    columns = ", ".join(repr(c) for c in (table.column, table.expires_column) if c)
    return _configured_table(
        f"redis.{redis_name}.lockout_table", f"table {table.table!r}, columns {columns}"
    )


# --- writability -------------------------------------------------------------------------------


class Writability(BaseModel):
    """Whether the server is a standby (pg_is_in_recovery()) and whether its transactions
    are read-only (transaction_read_only)."""

    in_recovery: bool
    read_only: bool

    @property
    def refusal(self) -> str | None:
        """Why this server refuses writes, or None when it takes them."""
        if self.in_recovery:
            return "it is a standby in recovery (pg_is_in_recovery())"
        if self.read_only:
            return "default_transaction_read_only is on"
        return None


@io_task("read-writability", timeout_seconds=30)
def read_writability(name: str, target: PostgresTarget) -> Writability:
    """Whether the target takes writes: read before planning changes a standby (or a database
    set read-only) would refuse, so they are skipped with the reason instead of failing.

    Args:
        name: the [postgres.NAME] target's name, for messages.
        target: its inventory entry.

    Returns:
        Writability: in_recovery (a standby) and read_only (transaction_read_only).

    Raises:
        AuthenticationFailed: the server refused the login (password, role, database).
        TargetUnreachable: no connection, or it was lost (transient: retried).
        TargetError: any other error the server answered with."""
    with connect(name, target) as conn:
        row = conn.execute(
            "SELECT pg_is_in_recovery() AS in_recovery, "
            "current_setting('transaction_read_only')::bool AS read_only"
        ).fetchone()
    assert row is not None
    return Writability(**row)


def skip_if_read_only(
    name: str, target: PostgresTarget, actions: Sequence[Action], fix: str
) -> None:
    """Before the gate: when an action is still planned and the target refuses writes (a
    standby, a read-only default), mark each planned action skipped with the reason and fix
    (e.g. "run stuck-jobs on the primary"), instead of letting it fail. Reads the server only
    when something is planned.

    Raises what read_writability raises."""
    planned = [a for a in actions if a.status is ActionStatus.planned]
    refusal = read_writability(name, target).refusal if planned else None
    for action in planned if refusal else []:
        action.status = ActionStatus.skipped
        action.detail = f"the server refuses writes: {refusal}; {fix}"


# --- reachability ------------------------------------------------------------------------------


# The server's own refusals (SQLSTATE 57P03, which libpq does not hand over for a connection)
# while it starts up, replays WAL after a crash, or is a standby with hot_standby off.
_NOT_ACCEPTING = re.compile(
    r"the database system is (starting up|in recovery mode|not (yet )?accepting connections)"
)


class Probe(BaseModel):
    """One try at SELECT 1: ok and its milliseconds, or the error and what it means."""

    ok: bool
    transient: bool = True  # False: credentials or database wrong; a restart will not help
    # True: the server is up but not accepting connections yet; a restart would only begin its
    # start-up (and crash recovery) again.
    recovering: bool = False
    error: str = ""
    ms: float | None = None


@io_task("probe-postgres", timeout_seconds=30, retries=0)
def probe_postgres(name: str, target: PostgresTarget) -> Probe:
    """Like pg_isready, plus a query: a server that accepts connections but cannot answer
    SELECT 1 is not up. A server that is down is a result, not an error.

    Args:
        name: the [postgres.NAME] target's name, for messages.
        target: its inventory entry.

    Returns:
        Probe: ok and the milliseconds SELECT 1 took; or the error, whether a restart may help
        (transient False: credentials or database refused) and whether it is recovering.

    Raises:
        Nothing of its own: a server that is down, refuses the login or errs is in the Probe."""
    start = time.perf_counter()
    try:
        with connect(name, target, statement_timeout_seconds=5) as conn:
            conn.execute("SELECT 1")
    except (TargetUnreachable, AuthenticationFailed) as exc:
        recovering = _NOT_ACCEPTING.search(str(exc)) is not None
        return Probe(ok=False, transient=exc.transient, recovering=recovering, error=str(exc))
    except TargetError as exc:
        return Probe(ok=False, error=str(exc))
    return Probe(ok=True, ms=(time.perf_counter() - start) * 1000)


@io_task("await-postgres-ready", timeout_seconds=3700, retries=0)
def await_postgres_ready(name: str, target: PostgresTarget, timeout_seconds: float) -> float | None:
    """Wait until the server answers SELECT 1 (probe_postgres), backing off from 0.5 s to 5 s
    between tries (tasks.wait.poll), for at most timeout_seconds.

    Args:
        name: the [postgres.NAME] target's name, for messages.
        target: its inventory entry.
        timeout_seconds: how long to wait, in seconds; 0: try once.

    Returns:
        Seconds until it answered; None when it did not within timeout_seconds.

    Raises:
        Nothing of its own: a server that does not answer (or refuses the login) is None."""
    waited = poll(
        lambda: probe_postgres.fn(name, target).ok,
        what=f"postgres target {name!r} to answer",
        timeout_seconds=timeout_seconds,
    )
    return waited.seconds if waited.done else None
