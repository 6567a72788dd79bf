"""postgres-maintenance against a real server: a table bloated by a mass UPDATE and DELETE."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from flows.postgres_maintenance import postgres_maintenance
from tasks.models import ActionStatus, RunStatus, Severity
from tests.conftest import Db

pytestmark = pytest.mark.usefixtures("prefect_api")


def dead_tuples(db: Db, table: str) -> int:
    with db.admin() as conn:
        row = conn.execute(
            "SELECT n_dead_tup FROM pg_stat_user_tables WHERE relname = %s", [table]
        ).fetchone()
    assert row is not None
    return int(row[0])


def bloat(db: Db) -> None:
    with db.admin() as conn:
        # Off for this table from its creation (a server-wide reload takes effect later), and
        # the counts flushed before this returns (a backend flushes at most once a second,
        # or at its exit, which comes after the client has gone): however busy the machine.
        conn.execute(
            "CREATE TABLE event (id int PRIMARY KEY, payload text) "
            "WITH (autovacuum_enabled = false)"
        )
        conn.execute("INSERT INTO event SELECT g, 'x' FROM generate_series(1, 20000) g")
        conn.execute("UPDATE event SET payload = 'y'")
        conn.execute("DELETE FROM event WHERE id % 2 = 0")
        conn.execute("CREATE TABLE quiet (id int) WITH (autovacuum_enabled = false)")
        conn.execute("INSERT INTO quiet SELECT generate_series(1, 100)")
        for _ in range(3):
            conn.execute("SELECT count(*) FROM event WHERE payload = 'y'")
        conn.execute("SELECT pg_stat_force_next_flush()")


def test_bloated_table_is_vacuumed(db: Db) -> None:
    bloat(db)
    assert dead_tuples(db, "event") >= 20000

    plan = postgres_maintenance("main")
    assert plan.status is RunStatus.unhealthy
    assert [a.description.rsplit(" (", 1)[0] for a in plan.actions] == [
        "VACUUM (ANALYZE) public.event"
    ]
    assert plan.actions[0].status is ActionStatus.planned
    assert dead_tuples(db, "event") >= 20000  # plan only
    top = next(f for f in plan.findings if f.check == "top_queries_total")
    assert any("event" in q["query"] for q in top.observed)
    sizes = next(f for f in plan.findings if f.check == "table_sizes")
    assert sizes.observed[0]["table"] == "public.event"

    report = postgres_maintenance("main", dry_run=False, approval="never")
    # VACUUM is not destructive: it runs whatever the approval policy says.
    assert report.status is RunStatus.fixed
    assert dead_tuples(db, "event") == 0
    assert report.actions[0].status is ActionStatus.done
    assert report.actions[0].detail.endswith("-> 0")
    assert {f.check: f.severity for f in report.findings}["dead_tuples"] is Severity.ok


def test_missing_pg_stat_statements_is_a_finding_not_a_crash(db: Db) -> None:
    with db.admin() as conn:
        conn.execute("DROP EXTENSION pg_stat_statements")
    report = postgres_maintenance("main")
    finding = next(f for f in report.findings if f.check == "pg_stat_statements")
    assert "CREATE EXTENSION pg_stat_statements" in finding.message
    assert report.status is RunStatus.healthy


def test_a_vacuum_that_cannot_get_its_lock_fails_clearly(db: Db) -> None:
    bloat(db)
    holder = db.session(user="postgres")
    # What a concurrent VACUUM or CREATE INDEX CONCURRENTLY holds: reads go on, VACUUM waits.
    holder.execute("LOCK TABLE event IN SHARE UPDATE EXCLUSIVE MODE")
    report = postgres_maintenance("main", dry_run=False, params={"lock_timeout_seconds": 0.2})
    assert report.status is RunStatus.failed
    assert report.actions[0].status is ActionStatus.failed
    assert "lock_timeout" in report.actions[0].detail


def test_role_that_may_not_vacuum_or_read_query_texts_is_told_the_grants(
    db: Db, role: Callable[[str], str]
) -> None:
    bloat(db)  # as postgres: its table, its statements
    runbook = role("")
    db.config.write_text(f'[postgres.main]\ndsn = "{db.server.dsn_for(db.name, runbook)}"\n')

    report = postgres_maintenance("main", dry_run=False, approval="auto")
    found = {f.check: f for f in report.findings}
    assert found["stats_privilege"].severity is Severity.warning
    assert found["stats_privilege"].observed >= 1
    assert f"GRANT pg_read_all_stats TO {runbook}" in found["stats_privilege"].message
    # The server skips a table the role does not own with a WARNING: not "vacuumed".
    vacuum = report.actions[0]
    assert vacuum.status is ActionStatus.failed and report.status is RunStatus.failed
    assert "was skipped" in vacuum.detail and "owner" in vacuum.detail
    assert dead_tuples(db, "event") >= 20000
