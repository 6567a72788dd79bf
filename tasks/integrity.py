"""PostgreSQL for data-integrity: orphans along configured relations, expired sessions, live
rows; and their deletion in batches, each batch its own transaction.

Every table and column comes from the inventory and goes through psycopg.sql.Identifier; an
orphan is found with NOT EXISTS over the parent's rows that are not orphans themselves
(tasks.integrity_rules), so one statement sees every level at once."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from itertools import count
from typing import Any

import psycopg
from psycopg import sql

from tasks.engine import io_task
from tasks.errors import ActionFailed, ConfigError
from tasks.integrity_rules import IntegrityState, LiveRows, Orphans
from tasks.postgres import TimeColumn, _configured_table, connect
from tasks.settings import IntegritySet, PostgresTarget, Relation, SessionsTable

# Seconds one batch (one DELETE) or one count may run.
STATEMENT_TIMEOUT_SECONDS = 60


def _alive(
    relations: list[Relation], table: tuple[str, ...], alias: sql.Identifier, names: Iterator[int]
) -> sql.Composable:
    """The row `alias` of `table` is no orphan: for each relation it is a child of, its
    reference is NULL or names a parent row that is no orphan either."""
    conditions: list[sql.Composable] = []
    for r in relations:
        if r.child_parts == table:
            conditions.append(
                sql.SQL("({a}.{c} IS NULL OR {exists})").format(
                    a=alias,
                    c=sql.Identifier(r.child_column),
                    exists=_parent_exists(relations, r, alias, names),
                )
            )
    return sql.SQL(" AND ").join(conditions) if conditions else sql.SQL("true")


def _parent_exists(
    relations: list[Relation], r: Relation, alias: sql.Identifier, names: Iterator[int]
) -> sql.Composable:
    parent = sql.Identifier(f"p{next(names)}")
    return sql.SQL(
        "EXISTS (SELECT 1 FROM {table} AS {p} WHERE {p}.{pc} = {a}.{c} AND {alive})"
    ).format(
        table=sql.Identifier(*r.parent_parts),
        p=parent,
        pc=sql.Identifier(r.parent_column),
        a=alias,
        c=sql.Identifier(r.child_column),
        alive=_alive(relations, r.parent_parts, parent, names),
    )


def orphan_condition(relations: list[Relation], index: int, alias: str = "c") -> sql.Composable:
    """SQL true for a row `alias` of relations[index]'s child table that is an orphan through
    that relation: its reference is set and names no parent row that is itself no orphan."""
    r = relations[index]
    a = sql.Identifier(alias)
    return sql.SQL("{a}.{c} IS NOT NULL AND NOT {exists}").format(
        a=a, c=sql.Identifier(r.child_column), exists=_parent_exists(relations, r, a, count())
    )


@contextmanager
def _integrity_errors(name: str) -> Iterator[None]:
    """Tables or columns the inventory names but the database lacks, and references whose type
    cannot be compared with the parent's column, are ConfigErrors naming [integrity.NAME]."""
    try:
        with _configured_table(f"integrity.{name}", "its relations and sessions"):
            yield
    except psycopg.errors.UndefinedFunction as exc:
        raise ConfigError(
            f"[integrity.{name}]: {str(exc).splitlines()[0]}: a child_column and its "
            "parent_column must be of comparable types; correct the relation in the config"
        ) from exc


def _expired(conn: psycopg.Connection[dict[str, Any]], sessions: SessionsTable) -> sql.Composable:
    return TimeColumn.read(conn, sessions, sessions.expires_column).compared("<", "now()")


@io_task("read-integrity", timeout_seconds=300)
def read_integrity(
    pg_name: str, pg: PostgresTarget, name: str, cfg: IntegritySet, sample_size: int
) -> IntegrityState:
    """Orphans per relation (count and the first sample_size child ids), expired sessions and
    live rows (pg_stat_user_tables) of the configured tables.

    Args:
        pg_name: the [postgres.NAME] target's name, for messages.
        pg: its inventory entry.
        name: the [integrity.NAME] set's name, for messages.
        cfg: the set: relations and sessions table.
        sample_size: ids of orphans returned per relation.

    Returns:
        IntegrityState: orphans in the configured order of relations, expired sessions (None
        without a sessions table), live rows per configured table.

    Raises:
        ConfigError: a configured table or column does not exist, a time column is not a
            timestamp, or a reference cannot be compared with its parent column.
        AuthenticationFailed: the server refused the login (password, role, database).
        TargetUnreachable: no connection, or it was lost (transient: retried).
        TargetError: any other error the server answered with."""
    orphans, expired = [], None
    tables = {r.child_parts for r in cfg.relations} | {r.parent_parts for r in cfg.relations}
    if cfg.sessions is not None:
        parts = cfg.sessions.table_parts
        tables.add(parts if len(parts) == 2 else ("public", *parts))
    with (
        connect(pg_name, pg, statement_timeout_seconds=STATEMENT_TIMEOUT_SECONDS) as conn,
        _integrity_errors(name),
    ):
        for i, r in enumerate(cfg.relations):
            where = orphan_condition(cfg.relations, i)
            base = sql.SQL("FROM {table} AS c WHERE {where}").format(
                table=sql.Identifier(*r.child_parts), where=where
            )
            row = conn.execute(sql.SQL("SELECT count(*) AS n ") + base).fetchone()
            n = int(row["n"]) if row else 0
            sample: list[Any] = []
            if n:
                query = sql.SQL("SELECT c.{id} AS id {base} ORDER BY 1 LIMIT %(n)s").format(
                    id=sql.Identifier(r.child_id_column), base=base
                )
                sample = [s["id"] for s in conn.execute(query, {"n": sample_size}).fetchall()]
            orphans.append(Orphans(relation=i, count=n, sample=sample))
        if cfg.sessions is not None:
            query = sql.SQL("SELECT count(*) AS n FROM {table} WHERE {expired}").format(
                table=sql.Identifier(*cfg.sessions.table_parts),
                expired=_expired(conn, cfg.sessions),
            )
            row = conn.execute(query, {"time_zone": cfg.sessions.time_zone}).fetchone()
            expired = int(row["n"]) if row else 0
        schemas, names = zip(*sorted(tables), strict=True) if tables else ((), ())
        live = conn.execute(
            "SELECT schemaname, relname, n_live_tup FROM pg_stat_user_tables "
            "WHERE (schemaname, relname) IN "
            "(SELECT * FROM unnest(%(schemas)s::text[], %(tables)s::text[])) "
            "ORDER BY schemaname, relname",
            {"schemas": list(schemas), "tables": list(names)},
        ).fetchall()
    return IntegrityState(
        orphans=orphans,
        expired_sessions=expired,
        live_rows=[
            LiveRows(table=f"{r['schemaname']}.{r['relname']}", live_rows=r["n_live_tup"])
            for r in live
        ],
    )


def _delete_in_batches(
    conn: psycopg.Connection[dict[str, Any]],
    table: sql.Identifier,
    where: sql.Composable,
    args: dict[str, Any],
    limit: int,
    batch_size: int,
) -> int:
    """DELETE up to `limit` rows matching `where` (on alias c), batch_size at a time, each
    batch one transaction; stops early when none is left. Returns the rows deleted.

    Rows are named by (tableoid, ctid): a ctid alone is the same in every partition of a
    partitioned table (or child of an inherited one), and would delete their rows too.

    Raises ActionFailed saying how many rows went before a batch failed (the batches before it
    are committed); a failure of the first batch as psycopg raised it."""
    deleted = 0
    query = sql.SQL(
        "DELETE FROM {table} WHERE (tableoid, ctid) IN ("
        "SELECT c.tableoid, c.ctid FROM {table} AS c WHERE {where} LIMIT %(batch)s)"
    ).format(table=table, where=where)
    while deleted < limit:
        try:
            with conn.transaction():
                batch = {**args, "batch": min(batch_size, limit - deleted)}
                n = conn.execute(query, batch).rowcount
        except psycopg.Error as exc:
            if not deleted:
                raise
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ActionFailed(
                f"deleted {deleted} rows, then a batch failed: {first}; run it again to go on"
            ) from exc
        deleted += n
        if n == 0:
            break
    return deleted


# No retries for the deletes: a retry would start again from the whole limit, over the batches
# already committed.
@io_task("delete-orphans", timeout_seconds=1800, retries=0)
def delete_orphans(
    pg_name: str,
    pg: PostgresTarget,
    name: str,
    relations: list[Relation],
    index: int,
    limit: int,
    batch_size: int,
) -> str:
    """DELETE the orphans of relations[index]'s child table through that relation (rows
    whose reference names no parent row that is itself no orphan, judged at each batch), at
    most `limit`, batch_size per transaction. Idempotent: rows gone or fixed meanwhile are
    left alone.

    Args:
        pg_name: the [postgres.NAME] target's name, for messages.
        pg: its inventory entry.
        name: the [integrity.NAME] set's name, for messages.
        relations: every configured relation (a parent's own orphans count).
        index: which relation's child rows to delete.
        limit: most rows deleted (the plan's share of max_rows_deleted).
        batch_size: rows per DELETE, each its own transaction.

    Returns:
        "deleted N rows in B batches of at most S".

    Raises:
        ConfigError: a configured table or column does not exist.
        AuthenticationFailed: the server refused the login (password, role, database).
        TargetUnreachable: no connection, or it was lost (not retried: the batches done
            are committed, and a retry would count its limit again).
        ActionFailed: a batch failed after others were deleted (how many went).
        TargetError: any other error the server answered with (a standby refuses writes;
            a foreign key the database does enforce)."""
    r = relations[index]
    with (
        connect(pg_name, pg, statement_timeout_seconds=STATEMENT_TIMEOUT_SECONDS) as conn,
        _integrity_errors(name),
    ):
        deleted = _delete_in_batches(
            conn,
            sql.Identifier(*r.child_parts),
            orphan_condition(relations, index),
            {},
            limit,
            batch_size,
        )
    return f"deleted {deleted} rows, at most {batch_size} per transaction"


@io_task("delete-expired-sessions", timeout_seconds=1800, retries=0)
def delete_expired_sessions(
    pg_name: str,
    pg: PostgresTarget,
    name: str,
    sessions: SessionsTable,
    limit: int,
    batch_size: int,
) -> str:
    """DELETE sessions whose expires column is before now() (a timestamp column read in the
    table's time_zone), at most `limit`, batch_size per transaction. Idempotent.

    Args:
        pg_name: the [postgres.NAME] target's name, for messages.
        pg: its inventory entry.
        name: the [integrity.NAME] set's name, for messages.
        sessions: the sessions table and its expires column.
        limit: most rows deleted (max_sessions_deleted).
        batch_size: rows per DELETE, each its own transaction.

    Returns:
        "deleted N rows, at most S per transaction".

    Raises:
        ConfigError: the table or column does not exist, or the column is not a timestamp.
        AuthenticationFailed: the server refused the login (password, role, database).
        TargetUnreachable: no connection, or it was lost (transient: retried).
        TargetError: any other error the server answered with (a standby refuses writes)."""
    with (
        connect(pg_name, pg, statement_timeout_seconds=STATEMENT_TIMEOUT_SECONDS) as conn,
        _integrity_errors(name),
    ):
        deleted = _delete_in_batches(
            conn,
            sql.Identifier(*sessions.table_parts),
            _expired(conn, sessions),
            {"time_zone": sessions.time_zone},
            limit,
            batch_size,
        )
    return f"deleted {deleted} rows, at most {batch_size} per transaction"
