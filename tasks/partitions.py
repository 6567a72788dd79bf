"""disk-space on PostgreSQL (seed 004 s9): the tables of the configured partition patterns
(analytics.pageview_YYYY_MM), and the drop of one of them, detached first when it is
attached as a partition, in one transaction with a lock timeout. The largest tables are
tasks.postgres.read_table_stats's."""

from __future__ import annotations

import psycopg
from psycopg import sql

from tasks.disk_rules import MIB, DatedTable, parse_partition_pattern
from tasks.engine import io_task
from tasks.errors import ActionFailed
from tasks.postgres import connect
from tasks.settings import PostgresTarget

# Plain tables (relkind r) of one schema whose names start with the pattern's prefix; the
# pattern's exact match is checked in Python. Partitioned parents (p) are never candidates.
_DATED = """
SELECT n.nspname AS schema_name, c.relname AS table, pg_total_relation_size(c.oid) AS bytes,
       par.nspname AS parent_schema, par.relname AS parent_table,
       par.nspname || '.' || par.relname AS parent
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
LEFT JOIN LATERAL (
    SELECT pn.nspname, p.relname FROM pg_inherits i
    JOIN pg_class p ON p.oid = i.inhparent JOIN pg_namespace pn ON pn.oid = p.relnamespace
    WHERE i.inhrelid = c.oid AND p.relkind = 'p'
) par ON true
WHERE c.relkind = 'r' AND n.nspname = %s AND starts_with(c.relname, %s)
ORDER BY c.relname
"""


@io_task("read-dated-tables", timeout_seconds=60)
def read_dated_tables(name: str, target: PostgresTarget, patterns: list[str]) -> list[DatedTable]:
    """The plain tables whose names match one of the patterns exactly
    (analytics.pageview_YYYY_MM matches analytics.pageview_2020_01, never
    pageview_2020_01_backup nor pageviews_2020_01), with the period each name gives.

    Args:
        name: the [postgres.NAME] target's name, for messages.
        target: its inventory entry.
        patterns: partition patterns, validated at load (tasks.disk_rules).

    Returns:
        One DatedTable per match, oldest period first.

    Raises:
        AuthenticationFailed: the server refused the login.
        TargetUnreachable: no connection, or it was lost (transient: retried).
        TargetError: any other error the server answered with."""
    found: list[DatedTable] = []
    with connect(name, target) as conn:
        for text in patterns:
            pattern = parse_partition_pattern(text)
            rows = conn.execute(_DATED, [pattern.schema_name, pattern.prefix]).fetchall()
            for r in rows:
                period = pattern.period(r["table"])
                if period is not None:
                    found.append(
                        DatedTable(
                            schema_name=r["schema_name"],
                            table=r["table"],
                            parent=r["parent"],
                            bytes=r["bytes"],
                            pattern=text,
                            start=period[0],
                            end=period[1],
                        )
                    )
    return sorted(found, key=lambda t: (t.start, t.schema_name, t.table))


@io_task("drop-partition", timeout_seconds=600, retries=0)
def drop_partition(
    name: str,
    target: PostgresTarget,
    schema_name: str,
    table: str,
    pattern: str,
    lock_timeout_seconds: float,
) -> str:
    """Detach a dated table from its partitioned parent (when attached) and drop it, in one
    transaction, with lock_timeout so that it never queues for long behind a query (and
    holds up everything queued behind it). The table is found again by its name in the
    catalog inside that transaction and must still match the pattern exactly: never any
    other table. DROP without CASCADE: a view depending on it makes it fail.

    Args:
        name: the [postgres.NAME] target's name, for messages.
        target: its inventory entry.
        schema_name: the table's schema.
        table: its name.
        pattern: the partition pattern it matched.
        lock_timeout_seconds: how long each statement waits for a lock, in seconds.

    Returns:
        What was done and its size, for the action's detail ("already gone" when it is).

    Raises:
        ActionFailed: the lock was not granted in time, something depends on the table, or
            it no longer matches.
        AuthenticationFailed, TargetUnreachable, TargetError: as read_dated_tables."""
    parsed = parse_partition_pattern(pattern)
    if schema_name != parsed.schema_name or parsed.period(table) is None:
        raise ActionFailed(f"{schema_name}.{table} does not match {pattern}: never dropped")
    where = f"postgres target {name!r}: {schema_name}.{table}"
    with connect(
        name,
        target,
        autocommit=False,
        lock_timeout_seconds=lock_timeout_seconds,
        statement_timeout_seconds=300,
    ) as conn:
        rows = conn.execute(_DATED, [schema_name, table]).fetchall()
        row = next((r for r in rows if r["table"] == table), None)
        if row is None:
            return "already gone"
        child = sql.Identifier(schema_name, table)
        try:
            if row["parent"] is not None:
                conn.execute(
                    sql.SQL("ALTER TABLE {} DETACH PARTITION {}").format(
                        sql.Identifier(row["parent_schema"], row["parent_table"]), child
                    )
                )
            conn.execute(sql.SQL("DROP TABLE {}").format(child))
        except psycopg.errors.LockNotAvailable as exc:
            raise ActionFailed(
                f"{where}: its lock was not granted within lock_timeout_seconds="
                f"{lock_timeout_seconds:g} ({exc.diag.message_primary}); a long query or "
                "transaction holds it: retry when it ends, or raise lock_timeout_seconds"
            ) from None
        except psycopg.errors.DependentObjectsStillExist as exc:
            raise ActionFailed(
                f"{where}: other objects depend on it ({exc.diag.message_detail or exc}); "
                "drop or change them first: the runbook never drops with CASCADE"
            ) from None
    how = f"detached from {row['parent']} and dropped" if row["parent"] else "dropped"
    return f"{how} ({row['bytes'] / MIB:.1f} MiB)"
