"""Storm control's memory, shared by every receiver that opens the same store: a SQLite file
(the receivers of one machine) or a PostgreSQL database (receivers on several machines, e.g.
behind a load balancer).

Each delivered alert is recorded and decided in one transaction that takes the store's one
writer lock before its first read (SQLite: BEGIN IMMEDIATE, its write lock, which also holds
across processes; PostgreSQL: pg_advisory_xact_lock on one constant key, which holds across
processes and hosts), so two deliveries of one alert at the same instant start one run. The
decision and its bookkeeping are one code path (AlertStore); the backends (SqliteAlertStore,
PostgresAlertStore) differ only in connecting, their schema's column types, their placeholder
and the statements that open that transaction. Tables:

    alerts      one row per fingerprint: firing or resolved, and the run of its episode
    runs        one row per run started (or being started), for the per-runbook cap
    deliveries  every alert of every payload with its outcome: nothing is dropped

A run started is first reserved (record: a runs row, alerts.started_at), then settled
(started: the run exists; not_started: the reservation released; alerts.settled_at). A
reservation whose settling was lost (the store failed in between, or a COMMIT was lost after
the server applied it) is taken as not started once SETTLE_GRACE has passed: the re-send
starts the run rather than being deduplicated for the window (a run may then start twice,
when only started() was lost; an alert is never dropped).

Connections: ONE per store, shared by every thread under a lock held for the whole
transaction: the writer lock serializes every transaction anyway, and the receiver records
from worker threads that come and go (a connection per thread would outlive them).

Errors: every backend error inside a transaction rolls it back (nothing of it recorded) and
is raised as a StoreError: StoreUnavailable (also a TargetUnreachable, transient) when the
store cannot be reached or does not answer in time (PostgreSQL down or partitioned, a lock
wait over BUSY_TIMEOUT_SECONDS, SQLite's "database is locked"), StoreError itself for the rest
(a read-only standby after a failover, a privilege revoked, a table dropped). At opening also
AuthenticationFailed (PostgreSQL refused the login) and ConfigError (no privilege to create
the schema). Their messages never quote the DSN nor its password.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
from pydantic import SecretStr

from deployments.alert_routes import CAP_PERIOD, Alert, Dispatch, Episode, Outcome, storm_decision
from tasks.errors import AuthenticationFailed, ConfigError, TargetError, TargetUnreachable
from tasks.redact import redact
from tasks.settings import describe_dsn, dsn_keywords

BUSY_TIMEOUT_SECONDS = 30  # a writer waits this long for another process's transaction
CONNECT_TIMEOUT_SECONDS = 5
STATEMENT_TIMEOUT_SECONDS = 60  # over BUSY_TIMEOUT_SECONDS: a lock wait ends first
# A transaction left open by a client cut off (a network partition) holds the writer lock
# until the server ends it: after this long idle in it. Over any pause between the
# statements of one transaction, which run back to back.
IDLE_IN_TRANSACTION_TIMEOUT_SECONDS = 30
# The client side of a partition: TCP keepalives on an idle connection, and a limit on data
# left unacknowledged (libpq's names; ignored on a Unix socket), so a statement waiting on a
# dead network fails within about 30 s, not the kernel's 15 minutes.
PG_KEEPALIVES: dict[str, Any] = {
    "keepalives": 1,
    "keepalives_idle": 10,
    "keepalives_interval": 5,
    "keepalives_count": 3,
    "tcp_user_timeout": 30_000,  # milliseconds
}
KEEP_DELIVERIES = timedelta(days=30)  # and runs, and alerts not seen since
PG_SCHEMA = "runbook_receiver"
# The one writer lock of PostgreSQL stores: an advisory lock of the database, on this key.
PG_LOCK_KEY = 0x72756E626F6F6B  # "runbook"

# One schema for both backends; {id} and {time} are the column types that differ.
SCHEMA = """
CREATE TABLE IF NOT EXISTS alerts (
    fingerprint TEXT PRIMARY KEY,
    alert TEXT NOT NULL,
    status TEXT NOT NULL,
    first_seen {time} NOT NULL,
    last_seen {time} NOT NULL,
    started_at {time},
    flow_run_id TEXT,
    deliveries INTEGER NOT NULL DEFAULT 0,
    settled_at {time}
);
CREATE TABLE IF NOT EXISTS runs (
    id {id},
    runbook TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    started_at {time} NOT NULL,
    flow_run_id TEXT
);
CREATE INDEX IF NOT EXISTS runs_by_runbook ON runs (runbook, started_at);
CREATE TABLE IF NOT EXISTS deliveries (
    id {id},
    received_at {time} NOT NULL,
    source TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    alert TEXT NOT NULL,
    status TEXT NOT NULL,
    outcome TEXT NOT NULL,
    runbook TEXT,
    target TEXT,
    flow_run_id TEXT,
    detail TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS deliveries_by_time ON deliveries (received_at);
"""


class StoreError(TargetError):
    """A transaction of the store failed and rolled back: nothing of it recorded."""


class StoreUnavailable(StoreError, TargetUnreachable):
    """The store could not be reached or did not answer in time; the transaction rolled back."""

    def __init__(self, message: str) -> None:
        super().__init__(message, transient=True)


@dataclass(frozen=True)
class Decision:
    outcome: Outcome
    detail: str
    delivery_id: int
    run_id: int | None = None  # the runs row reserved for a started run
    # Its episode's started_at: the alerts row is the same episode only while it still matches.
    started_at: float | None = None
    flow_run_id: str | None = None  # of a deduplicated alert: the run already started


def _ts(moment: datetime) -> float:
    return moment.timestamp()


def _dt(value: float | None) -> datetime | None:
    return None if value is None else datetime.fromtimestamp(value, UTC)


class AlertStore:
    """The decision and its bookkeeping, whichever backend keeps them. A backend gives its
    connection, its schema's column types, its placeholder and BEGIN: the statements that
    open a transaction holding the one writer lock."""

    BEGIN: tuple[str, ...] = ("BEGIN",)
    PLACEHOLDER = "?"
    ID_TYPE = "INTEGER PRIMARY KEY"
    TIME_TYPE = "REAL"
    # The backend's errors: StoreError; those meaning "unreachable or too slow now":
    # StoreUnavailable.
    ERRORS: tuple[type[Exception], ...] = ()
    UNAVAILABLE: tuple[type[Exception], ...] = ()

    def __init__(self, *, window_seconds: int, max_runs_per_hour: int) -> None:
        self.window_seconds = window_seconds
        self.max_runs_per_hour = max_runs_per_hour
        self._db: Any = None  # the one connection, opened on first use
        # Held for a whole transaction: one thread at a time uses the connection.
        self._lock = threading.Lock()

    # -- what a backend provides -------------------------------------------------------------

    @property
    def description(self) -> str:
        raise NotImplementedError

    def _connect(self) -> Any:
        raise NotImplementedError

    def _create_schema(self, db: Any) -> None:
        """The tables, and what a store written by an earlier version lacks."""
        for statement in SCHEMA.format(id=self.ID_TYPE, time=self.TIME_TYPE).split(";"):
            if statement.strip():
                db.execute(statement)
        columns = {column[0] for column in db.execute("SELECT * FROM alerts LIMIT 0").description}
        if "settled_at" not in columns:
            db.execute(f"ALTER TABLE alerts ADD COLUMN settled_at {self.TIME_TYPE}")
            # Reserved before settling was recorded: settled then, or long since.
            db.execute("UPDATE alerts SET settled_at = started_at WHERE started_at IS NOT NULL")

    def _broken(self, db: Any) -> bool:
        """Whether the connection died (its server restarted): a new one is needed."""
        return False

    # -- connections and the one-writer transaction -------------------------------------------

    def _open(self) -> None:
        """Create what is missing, then forget what is older than KEEP_DELIVERIES; under the
        writer lock, so receivers opening at once do not race on the schema."""
        try:
            with self._transaction() as db:
                self._create_schema(db)
                cutoff = _ts(datetime.now(UTC) - KEEP_DELIVERIES)
                self._run(db, "DELETE FROM deliveries WHERE received_at < ?", cutoff)
                self._run(db, "DELETE FROM runs WHERE started_at < ?", cutoff)
                # Alertmanager re-sends what still fires (repeat_interval): one unseen for
                # this long is over, whether or not its resolution arrived.
                self._run(db, "DELETE FROM alerts WHERE last_seen < ?", cutoff)
        except BaseException:
            self.close()  # a store that failed to open keeps no connection
            raise

    def _run(self, db: Any, statement: str, *params: Any) -> Any:
        """Execute one statement written with ? placeholders; its cursor."""
        return db.execute(statement.replace("?", self.PLACEHOLDER), params)

    def _forget(self) -> None:
        """Drop the connection (under self._lock): the next transaction opens a new one."""
        db, self._db = self._db, None
        if db is not None:
            with suppress(*self.ERRORS):  # already dead
                db.close()

    def _begin(self) -> Any:
        if self._db is None:
            self._db = self._connect()
        try:
            self._db.execute(self.BEGIN[0])
        except self.UNAVAILABLE:
            if not self._broken(self._db):
                raise
            # It died while idle (the server restarted): nothing was sent on it, so one new
            # connection may try again.
            self._forget()
            self._db = self._connect()
            self._db.execute(self.BEGIN[0])
        db = self._db
        try:
            for statement in self.BEGIN[1:]:
                db.execute(statement)
        except BaseException:
            self._rollback(db)
            raise
        return db

    def _rollback(self, db: Any) -> None:
        try:
            db.execute("ROLLBACK")
        except self.ERRORS:
            self._forget()  # the server drops a transaction it never saw committed

    @contextmanager
    def _transaction(self) -> Iterator[Any]:
        """One transaction holding the writer lock from its start, on the one connection:
        committed at the end of the block, rolled back on any error. Raises StoreUnavailable
        for the backend's UNAVAILABLE errors, StoreError for its other ERRORS."""
        # Bounded: each transaction ahead ends within its statement timeout.
        if not self._lock.acquire(timeout=STATEMENT_TIMEOUT_SECONDS):
            raise StoreUnavailable(
                f"the alert store ({self.description}) is busy: this receiver's other "
                f"transactions held it for {STATEMENT_TIMEOUT_SECONDS} s"
            )
        try:
            db = self._begin()
            try:
                yield db
                db.execute("COMMIT")
            except BaseException:
                # Also after a failed COMMIT: SQLite's may leave the transaction open.
                self._rollback(db)
                raise
        except self.ERRORS as exc:
            if self._db is not None and self._broken(self._db):
                self._forget()
            if isinstance(exc, self.UNAVAILABLE):
                raise StoreUnavailable(
                    f"the alert store ({self.description}) is unavailable: {self._say(exc)}"
                ) from exc
            raise StoreError(
                f"the alert store ({self.description}) failed: {self._say(exc)}"
            ) from exc
        finally:
            self._lock.release()

    def _say(self, exc: BaseException) -> str:
        """The first line of a backend error, for a message."""
        return (str(exc).strip().splitlines() or [type(exc).__name__])[0]

    # -- the decision and its bookkeeping -----------------------------------------------------

    def record(
        self,
        alert: Alert,
        now: datetime,
        *,
        dispatch: Dispatch | None = None,
        unrouted: bool = False,
        rejected: str | None = None,
    ) -> Decision:
        """Record one delivered alert and decide its outcome, atomically.

        A resolved alert closes its episode; a firing one that routes to `dispatch` starts a
        run unless deduplicated or capped (a started run reserves its place in `runs`).
        Raises StoreError (StoreUnavailable), with nothing recorded."""
        with self._transaction() as db:
            row = self._run(
                db,
                "SELECT status, started_at, flow_run_id, settled_at FROM alerts "
                "WHERE fingerprint = ?",
                alert.fingerprint,
            ).fetchone()
            previous = (
                None
                if row is None
                else Episode(
                    status=row[0],
                    started_at=_dt(row[1]),
                    flow_run_id=row[2],
                    settled=row[3] is not None,
                )
            )
            run_id: int | None = None
            detail = ""
            flow_run_id: str | None = None
            if alert.status == "resolved":
                outcome = Outcome.resolved
            elif unrouted:
                outcome, detail = Outcome.unrouted, "no route matches this alert"
            elif rejected is not None or dispatch is None:
                outcome, detail = Outcome.rejected, rejected or "nothing to run"
            else:
                runs = self._run(
                    db,
                    "SELECT count(*) FROM runs WHERE runbook = ? AND started_at > ?",
                    dispatch.runbook,
                    _ts(now - CAP_PERIOD),
                ).fetchone()[0]
                outcome = storm_decision(
                    previous,
                    runs,
                    now,
                    window_seconds=self.window_seconds,
                    max_runs_per_hour=self.max_runs_per_hour,
                )
                if outcome is Outcome.deduplicated and previous is not None:
                    flow_run_id = previous.flow_run_id
                    detail = "a run already started for this alert within the window"
                elif outcome is Outcome.capped:
                    detail = (
                        f"{dispatch.runbook} started {runs} runs in the last hour "
                        f"(max_runs_per_hour = {self.max_runs_per_hour})"
                    )
                else:
                    run_id = self._run(
                        db,
                        "INSERT INTO runs (runbook, fingerprint, started_at) VALUES (?, ?, ?) "
                        "RETURNING id",
                        dispatch.runbook,
                        alert.fingerprint,
                        _ts(now),
                    ).fetchone()[0]
            self._upsert_alert(db, alert, now, previous, started=run_id is not None)
            delivery_id: int = self._run(
                db,
                "INSERT INTO deliveries (received_at, source, fingerprint, alert, status, "
                "outcome, runbook, target, flow_run_id, detail) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
                _ts(now),
                alert.source,
                alert.fingerprint,
                alert.name,
                alert.status,
                outcome.value,
                dispatch.runbook if dispatch else None,
                dispatch.target if dispatch else None,
                flow_run_id,
                detail,
            ).fetchone()[0]
        started_at = _ts(now) if run_id is not None else None
        return Decision(outcome, detail, delivery_id, run_id, started_at, flow_run_id)

    def _upsert_alert(
        self,
        db: Any,
        alert: Alert,
        now: datetime,
        previous: Episode | None,
        *,
        started: bool,
    ) -> None:
        ts = _ts(now)
        if previous is None:
            self._run(
                db,
                "INSERT INTO alerts (fingerprint, alert, status, first_seen, last_seen, "
                "started_at, deliveries) VALUES (?, ?, ?, ?, ?, ?, 1)",
                alert.fingerprint,
                alert.name,
                alert.status,
                ts,
                ts,
                ts if started else None,
            )
            return
        if alert.status == "resolved":
            # Closed: the next firing of this fingerprint is a new episode.
            self._run(
                db,
                "UPDATE alerts SET status = 'resolved', last_seen = ?, started_at = NULL, "
                "deliveries = deliveries + 1 WHERE fingerprint = ?",
                ts,
                alert.fingerprint,
            )
            return
        reopened = previous.status == "resolved"
        self._run(
            db,
            "UPDATE alerts SET status = 'firing', last_seen = ?, deliveries = deliveries + 1, "
            "first_seen = CASE WHEN ? THEN ? ELSE first_seen END, "
            "started_at = CASE WHEN ? THEN ? ELSE started_at END, "
            "flow_run_id = CASE WHEN ? THEN NULL ELSE flow_run_id END, "
            "settled_at = CASE WHEN ? THEN NULL ELSE settled_at END "
            "WHERE fingerprint = ?",
            ts,
            reopened,
            ts,
            started,
            ts,
            started,
            started,
            alert.fingerprint,
        )

    def started(
        self,
        decision: Decision,
        fingerprint: str,
        flow_run_id: str | None,
        now: datetime | None = None,
    ) -> None:
        """The run reserved by `decision` exists now (None: a trigger creates it): settled.

        The alerts row is updated only while it is still the episode `decision` started: a
        resolve and a new firing in between made another, which this must not overwrite."""
        settled_at = _ts(now or datetime.now(UTC))
        with self._transaction() as db:
            self._run(
                db, "UPDATE runs SET flow_run_id = ? WHERE id = ?", flow_run_id, decision.run_id
            )
            self._run(
                db,
                "UPDATE alerts SET flow_run_id = ?, settled_at = ? "
                "WHERE fingerprint = ? AND started_at = ?",
                flow_run_id,
                settled_at,
                fingerprint,
                decision.started_at,
            )
            self._run(
                db,
                "UPDATE deliveries SET flow_run_id = ? WHERE id = ?",
                flow_run_id,
                decision.delivery_id,
            )

    def not_started(
        self, decision: Decision, fingerprint: str, detail: str, now: datetime | None = None
    ) -> None:
        """The reserved run could not be created: free its place, so a re-send may retry.
        Settled too; should this fail, the reservation lapses after SETTLE_GRACE."""
        settled_at = _ts(now or datetime.now(UTC))
        with self._transaction() as db:
            self._run(db, "DELETE FROM runs WHERE id = ?", decision.run_id)
            self._run(
                db,
                "UPDATE alerts SET started_at = NULL, settled_at = ? "
                "WHERE fingerprint = ? AND started_at = ?",
                settled_at,
                fingerprint,
                decision.started_at,
            )
            self._run(
                db,
                "UPDATE deliveries SET outcome = ?, detail = ? WHERE id = ?",
                Outcome.rejected.value,
                detail,
                decision.delivery_id,
            )

    def deliveries(self, **where: Any) -> list[dict[str, Any]]:
        """Recorded deliveries, oldest first, filtered by column equality."""
        for column in where:
            if column not in DELIVERY_COLUMNS:
                raise ValueError(f"no column {column!r} in deliveries")
        clauses = " AND ".join(f"{column} = ?" for column in where) or "TRUE"
        with self._transaction() as db:
            cursor = self._run(
                db, f"SELECT * FROM deliveries WHERE {clauses} ORDER BY id", *where.values()
            )
            names = [column[0] for column in cursor.description]
            return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]

    def close(self) -> None:
        """Close the connection, from any thread (after the transaction under way); a later
        transaction opens a new one."""
        with self._lock:
            self._forget()


class SqliteAlertStore(AlertStore):
    """One SQLite file: every receiver process of one machine that opens it."""

    # IMMEDIATE takes the write lock up front: the read that decides and the write that
    # records happen under it, whichever process gets there first.
    BEGIN = ("BEGIN IMMEDIATE",)
    ERRORS = (sqlite3.Error,)
    # "database is locked": another process's transaction held the write lock too long.
    UNAVAILABLE = (sqlite3.OperationalError,)

    def __init__(self, path: Path, *, window_seconds: int, max_runs_per_hour: int) -> None:
        super().__init__(window_seconds=window_seconds, max_runs_per_hour=max_runs_per_hour)
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._open()

    @property
    def description(self) -> str:
        return f"SQLite {self.path}"

    def _connect(self) -> sqlite3.Connection:
        # Used by one thread at a time (under self._lock), by whichever thread records.
        db = sqlite3.connect(
            self.path, timeout=BUSY_TIMEOUT_SECONDS, isolation_level=None, check_same_thread=False
        )
        # WAL: readers never block the one writer; the journal mode sticks to the file (and
        # cannot change inside a transaction: here, before the first).
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        return db


class PostgresAlertStore(AlertStore):
    """Tables in the schema runbook_receiver of one PostgreSQL database: every receiver that
    opens it, on any host.

    The one writer lock is pg_advisory_xact_lock(PG_LOCK_KEY), taken first in every
    transaction: the same one-writer semantics as SQLite's BEGIN IMMEDIATE, across processes
    and hosts, held until COMMIT or ROLLBACK (also when the connection drops). Every
    transaction is READ COMMITTED, whatever the database's default_transaction_isolation:
    under REPEATABLE READ or SERIALIZABLE its snapshot would predate the lock wait and miss
    what the transaction ahead committed. The connection: connect timeout
    CONNECT_TIMEOUT_SECONDS, lock timeout BUSY_TIMEOUT_SECONDS, statement timeout
    STATEMENT_TIMEOUT_SECONDS, idle-in-transaction timeout
    IDLE_IN_TRANSACTION_TIMEOUT_SECONDS, TCP keepalives and user timeout PG_KEEPALIVES.

    Raises (on opening) AuthenticationFailed when PostgreSQL refuses the login, ConfigError
    when the role may not create the schema, StoreUnavailable when it cannot be reached."""

    BEGIN = (
        "BEGIN ISOLATION LEVEL READ COMMITTED",
        f"SELECT pg_advisory_xact_lock({PG_LOCK_KEY})",
    )
    PLACEHOLDER = "%s"
    ID_TYPE = "BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY"
    TIME_TYPE = "DOUBLE PRECISION"
    ERRORS = (psycopg.Error,)
    UNAVAILABLE = (psycopg.OperationalError,)

    def __init__(self, dsn: SecretStr, *, window_seconds: int, max_runs_per_hour: int) -> None:
        super().__init__(window_seconds=window_seconds, max_runs_per_hour=max_runs_per_hour)
        self.dsn = dsn
        self._parts = dsn_keywords(dsn)
        self._open()

    @property
    def description(self) -> str:
        return f"PostgreSQL {describe_dsn(self.dsn)} schema {PG_SCHEMA}"

    def _say(self, exc: BaseException) -> str:
        # libpq's texts name the host and user, never the password; masked anyway.
        return redact(super()._say(exc), [self.dsn, self._parts.get("password")])

    def _connect(self) -> psycopg.Connection[Any]:
        options = (
            f"-c search_path={PG_SCHEMA} "
            f"-c lock_timeout={BUSY_TIMEOUT_SECONDS * 1000} "
            f"-c statement_timeout={STATEMENT_TIMEOUT_SECONDS * 1000} "
            f"-c idle_in_transaction_session_timeout={IDLE_IN_TRANSACTION_TIMEOUT_SECONDS * 1000}"
        )
        try:
            return psycopg.connect(
                self.dsn.get_secret_value(),
                connect_timeout=CONNECT_TIMEOUT_SECONDS,
                autocommit=True,  # transactions are the explicit BEGIN ... COMMIT
                application_name="runbook-receiver",
                options=options,
                **PG_KEEPALIVES,
            )
        except psycopg.OperationalError as exc:
            from tasks.postgres import credentials_refused

            if credentials_refused(exc):
                raise AuthenticationFailed(
                    f"receiver.state_dsn ({describe_dsn(self.dsn)}): PostgreSQL refused the "
                    f"login: {self._say(exc)}; check the user, password and database name"
                ) from None
            raise

    def _broken(self, db: psycopg.Connection[Any]) -> bool:
        return db.closed or db.broken

    def _open(self) -> None:
        try:
            super()._open()
        except StoreError as exc:
            # InvalidSchemaName: the schema exists, but not for this role (no USAGE), so
            # search_path skips it.
            denied = (psycopg.errors.InsufficientPrivilege, psycopg.errors.InvalidSchemaName)
            if not isinstance(exc.__cause__, denied):
                raise
            user = self._parts.get("user") or "ROLE"
            dbname = self._parts.get("dbname") or "DBNAME"
            raise ConfigError(
                f"receiver.state_dsn ({describe_dsn(self.dsn)}): the role may not create or "
                f"use the schema {PG_SCHEMA} and its tables. As the database's owner run "
                f"GRANT CREATE ON DATABASE {dbname} TO {user} (the receiver creates the "
                f"schema), or create it ahead of time: CREATE SCHEMA {PG_SCHEMA} AUTHORIZATION "
                f"{user}; every receiver logs in as that one role"
            ) from None

    def _create_schema(self, db: psycopg.Connection[Any]) -> None:
        # CREATE SCHEMA needs CREATE on the database even when the schema exists.
        exists = db.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s", (PG_SCHEMA,))
        if exists.fetchone() is None:
            db.execute(f"CREATE SCHEMA IF NOT EXISTS {PG_SCHEMA}")
        super()._create_schema(db)


DELIVERY_COLUMNS = frozenset(
    {
        "id",
        "received_at",
        "source",
        "fingerprint",
        "alert",
        "status",
        "outcome",
        "runbook",
        "target",
        "flow_run_id",
        "detail",
    }
)
