"""Storm control's memory: one SQLite file, shared by every receiver process on the machine.

Each delivered alert is recorded and decided in one IMMEDIATE transaction (SQLite's write
lock, which also holds across processes), so two deliveries of one alert at the same instant
start one run. Tables:

    alerts      one row per fingerprint: firing or resolved, and the run of its episode
    runs        one row per run started (or being started), for the per-runbook cap
    deliveries  every alert of every payload with its outcome: nothing is dropped
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from deployments.alert_routes import CAP_PERIOD, Alert, Dispatch, Episode, Outcome, storm_decision

BUSY_TIMEOUT_SECONDS = 30  # a writer waits this long for another process's transaction
KEEP_DELIVERIES = timedelta(days=30)  # and runs, and alerts not seen since

SCHEMA = """
CREATE TABLE IF NOT EXISTS alerts (
    fingerprint TEXT PRIMARY KEY,
    alert TEXT NOT NULL,
    status TEXT NOT NULL,
    first_seen REAL NOT NULL,
    last_seen REAL NOT NULL,
    started_at REAL,
    flow_run_id TEXT,
    deliveries INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY,
    runbook TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    started_at REAL NOT NULL,
    flow_run_id TEXT
);
CREATE INDEX IF NOT EXISTS runs_by_runbook ON runs (runbook, started_at);
CREATE TABLE IF NOT EXISTS deliveries (
    id INTEGER PRIMARY KEY,
    received_at REAL NOT NULL,
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
    def __init__(self, path: Path, *, window_seconds: int, max_runs_per_hour: int) -> None:
        self.path = path
        self.window_seconds = window_seconds
        self.max_runs_per_hour = max_runs_per_hour
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        path.parent.mkdir(parents=True, exist_ok=True)
        self._init()

    def _init(self) -> None:
        with closing(self._connect()) as db:
            # WAL: readers never block the one writer; the journal mode sticks to the file.
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(SCHEMA)
            cutoff = _ts(datetime.now(UTC) - KEEP_DELIVERIES)
            db.execute("DELETE FROM deliveries WHERE received_at < ?", (cutoff,))
            db.execute("DELETE FROM runs WHERE started_at < ?", (cutoff,))
            # Alertmanager re-sends what still fires (repeat_interval): one unseen for this
            # long is over, whether or not its resolution arrived.
            db.execute("DELETE FROM alerts WHERE last_seen < ?", (cutoff,))

    def _connect(self) -> sqlite3.Connection:
        # Each connection is used by one thread only; close() may close it from another.
        db = sqlite3.connect(
            self.path, timeout=BUSY_TIMEOUT_SECONDS, isolation_level=None, check_same_thread=False
        )
        db.execute("PRAGMA synchronous=NORMAL")
        return db

    def _db(self) -> sqlite3.Connection:
        # One connection per thread: sqlite3 connections are not shared across threads.
        db: sqlite3.Connection | None = getattr(self._local, "db", None)
        if db is None:
            db = self._local.db = self._connect()
            with self._lock:
                self._connections.append(db)
        return db

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        db = self._db()
        # IMMEDIATE takes the write lock up front: the read that decides and the write that
        # records happen under it, whichever process gets there first.
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

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
        run unless deduplicated or capped (a started run reserves its place in `runs`)."""
        with self._transaction() as db:
            row = db.execute(
                "SELECT status, started_at, flow_run_id FROM alerts WHERE fingerprint = ?",
                (alert.fingerprint,),
            ).fetchone()
            previous = (
                None
                if row is None
                else Episode(status=row[0], started_at=_dt(row[1]), flow_run_id=row[2])
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
                runs = db.execute(
                    "SELECT count(*) FROM runs WHERE runbook = ? AND started_at > ?",
                    (dispatch.runbook, _ts(now - CAP_PERIOD)),
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
                    run_id = db.execute(
                        "INSERT INTO runs (runbook, fingerprint, started_at) VALUES (?, ?, ?)",
                        (dispatch.runbook, alert.fingerprint, _ts(now)),
                    ).lastrowid
            self._upsert_alert(db, alert, now, previous, started=run_id is not None)
            delivery_id = db.execute(
                "INSERT INTO deliveries (received_at, source, fingerprint, alert, status, "
                "outcome, runbook, target, flow_run_id, detail) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
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
                ),
            ).lastrowid
        assert delivery_id is not None
        started_at = _ts(now) if run_id is not None else None
        return Decision(outcome, detail, delivery_id, run_id, started_at, flow_run_id)

    @staticmethod
    def _upsert_alert(
        db: sqlite3.Connection,
        alert: Alert,
        now: datetime,
        previous: Episode | None,
        *,
        started: bool,
    ) -> None:
        ts = _ts(now)
        if previous is None:
            db.execute(
                "INSERT INTO alerts (fingerprint, alert, status, first_seen, last_seen, "
                "started_at, deliveries) VALUES (?, ?, ?, ?, ?, ?, 1)",
                (alert.fingerprint, alert.name, alert.status, ts, ts, ts if started else None),
            )
            return
        if alert.status == "resolved":
            # Closed: the next firing of this fingerprint is a new episode.
            db.execute(
                "UPDATE alerts SET status = 'resolved', last_seen = ?, started_at = NULL, "
                "deliveries = deliveries + 1 WHERE fingerprint = ?",
                (ts, alert.fingerprint),
            )
            return
        reopened = previous.status == "resolved"
        db.execute(
            "UPDATE alerts SET status = 'firing', last_seen = ?, deliveries = deliveries + 1, "
            "first_seen = CASE WHEN ? THEN ? ELSE first_seen END, "
            "started_at = CASE WHEN ? THEN ? ELSE started_at END, "
            "flow_run_id = CASE WHEN ? THEN NULL ELSE flow_run_id END "
            "WHERE fingerprint = ?",
            (ts, reopened, ts, started, ts, started, alert.fingerprint),
        )

    def started(self, decision: Decision, fingerprint: str, flow_run_id: str | None) -> None:
        """The run reserved by `decision` exists now (None: a trigger creates it).

        The alerts row is updated only while it is still the episode `decision` started: a
        resolve and a new firing in between made another, which this must not overwrite."""
        with self._transaction() as db:
            db.execute(
                "UPDATE runs SET flow_run_id = ? WHERE id = ?", (flow_run_id, decision.run_id)
            )
            db.execute(
                "UPDATE alerts SET flow_run_id = ? WHERE fingerprint = ? AND started_at = ?",
                (flow_run_id, fingerprint, decision.started_at),
            )
            db.execute(
                "UPDATE deliveries SET flow_run_id = ? WHERE id = ?",
                (flow_run_id, decision.delivery_id),
            )

    def not_started(self, decision: Decision, fingerprint: str, detail: str) -> None:
        """The reserved run could not be created: free its place, so a re-send may retry."""
        with self._transaction() as db:
            db.execute("DELETE FROM runs WHERE id = ?", (decision.run_id,))
            db.execute(
                "UPDATE alerts SET started_at = NULL WHERE fingerprint = ? AND started_at = ?",
                (fingerprint, decision.started_at),
            )
            db.execute(
                "UPDATE deliveries SET outcome = ?, detail = ? WHERE id = ?",
                (Outcome.rejected.value, detail, decision.delivery_id),
            )

    def deliveries(self, **where: Any) -> list[dict[str, Any]]:
        """Recorded deliveries, oldest first, filtered by column equality."""
        for column in where:
            if column not in DELIVERY_COLUMNS:
                raise ValueError(f"no column {column!r} in deliveries")
        clauses = " AND ".join(f"{column} = ?" for column in where) or "1"
        db = self._db()
        db.row_factory = sqlite3.Row
        try:
            rows = db.execute(
                f"SELECT * FROM deliveries WHERE {clauses} ORDER BY id", tuple(where.values())
            ).fetchall()
        finally:
            db.row_factory = None
        return [dict(r) for r in rows]

    def close(self) -> None:
        """Close every thread's connection, not only the caller's: the receiver records from
        a pool of worker threads."""
        with self._lock:
            connections, self._connections = self._connections, []
        for db in connections:
            db.close()
        self._local = threading.local()


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
