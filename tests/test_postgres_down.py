"""postgres-down: a real PostgreSQL that the test stops and the runbook brings back through the
`command` controller (pg_ctl)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from deployments.localpg import LocalPostgres
from flows.postgres_down import postgres_down
from tasks.models import ActionStatus, RunStatus, Severity

pytestmark = pytest.mark.usefixtures("prefect_api")


@pytest.fixture
def victim() -> Iterator[LocalPostgres]:
    server = LocalPostgres().start()
    yield server
    server.stop()


def config(
    pg: LocalPostgres, *, restart: list[str] | None = None, start: bool = True, timeout: int = 20
) -> str:
    return (
        f'[postgres.main]\ndsn = "{pg.dsn}"\nservice = "db"\ndata_directory = "{pg.dir}"\n'
        f'[services.db]\nkind = "command"\ntimeout_seconds = {timeout}\n'
        f"status_command = {json.dumps(pg.ctl_argv('status'))}\n"
        + (f"start_command = {json.dumps(pg.ctl_argv('start'))}\n" if start else "")
        + f"restart_command = {json.dumps(restart or pg.ctl_argv('restart'))}\n"
        f'logs_command = ["tail", "-n", "20", "{pg.dir / "log"}"]\n'
    )


def test_killed_postgres_is_reported_then_brought_back(
    victim: LocalPostgres, inventory: Any
) -> None:
    inventory(config(victim))
    assert postgres_down("main").status is RunStatus.healthy

    victim.stop(remove=False)
    plan = postgres_down("main")
    checks = {f.check: f for f in plan.findings}
    assert checks["reachable"].severity is Severity.critical
    assert "Connection refused" in checks["reachable"].message
    assert checks["service"].severity is Severity.critical
    assert any(
        "shutting down" in line or "database system" in line for line in checks["logs"].observed
    )
    assert checks["disk"].observed > 0
    assert plan.actions[0].status is ActionStatus.planned
    assert not victim.is_running()  # a dry run only reports

    report = postgres_down("main", dry_run=False, approval="auto")
    assert report.status is RunStatus.fixed, report.findings
    assert victim.is_running()
    assert "started" in report.actions[0].detail and "ready after" in report.actions[0].detail


def test_a_restart_that_does_not_bring_it_back(victim: LocalPostgres, inventory: Any) -> None:
    inventory(config(victim, restart=["true"], start=False))
    victim.stop(remove=False)
    report = postgres_down(
        "main", dry_run=False, approval="auto", params={"ready_timeout_seconds": 2}
    )
    assert report.status is RunStatus.unhealthy
    assert "not ready within 2 s" in report.actions[0].detail


def test_a_controller_command_that_hangs_is_cut_off(victim: LocalPostgres, inventory: Any) -> None:
    inventory(config(victim, restart=["sleep", "60"], start=False, timeout=1))
    victim.stop(remove=False)
    report = postgres_down("main", dry_run=False, approval="auto")
    assert report.status is RunStatus.failed
    assert report.actions[0].status is ActionStatus.failed
    assert "did not finish within 1 s" in report.actions[0].detail


def test_without_a_service_the_restart_is_skipped_with_the_fix(
    victim: LocalPostgres, inventory: Any
) -> None:
    inventory(f'[postgres.main]\ndsn = "{victim.dsn}"\n')
    victim.stop(remove=False)
    report = postgres_down("main", dry_run=False, approval="auto")
    assert report.status is RunStatus.unhealthy
    assert report.actions[0].status is ActionStatus.skipped
    assert "service = " in report.actions[0].detail


@pytest.mark.parametrize(
    ("dsn_of", "refused"),
    [
        (lambda pg: pg.dsn_for("nosuchdb"), 'database "nosuchdb" does not exist'),
        (lambda pg: pg.dsn_for("postgres", "nobody"), 'role "nobody" does not exist'),
    ],
)
def test_refused_credentials_are_not_a_reason_to_restart(
    victim: LocalPostgres, inventory: Any, dsn_of: Any, refused: str
) -> None:
    inventory(config(victim).replace(victim.dsn, dsn_of(victim)))
    started = (victim.data / "postmaster.pid").read_text().split()[0]
    report = postgres_down("main", dry_run=False, approval="auto")
    reachable = {f.check: f for f in report.findings}["reachable"]
    assert reachable.severity is Severity.critical and refused in reachable.message
    assert "check the credentials and database name in its dsn" in reachable.message
    assert report.actions == [] and report.status is RunStatus.unhealthy
    assert (victim.data / "postmaster.pid").read_text().split()[0] == started


def test_a_migration_cut_off_by_the_outage_is_reported_once_it_is_back(
    victim: LocalPostgres, inventory: Any
) -> None:
    """Seed 004 s3: after the restart, a dirty golang-migrate version is a finding."""
    inventory(config(victim))
    with psycopg.connect(victim.dsn, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE schema_migrations (version bigint not null primary key, "
            "dirty boolean not null)"
        )
        # migrate up marks the version dirty before it runs it; the crash comes first.
        conn.execute("INSERT INTO schema_migrations VALUES (3, true)")
    victim.stop(remove=False)

    report = postgres_down("main", dry_run=False, approval="auto")
    assert victim.is_running()
    failed = {f.check: f for f in report.findings}["failed_migration"]
    assert failed.severity is Severity.critical
    assert "golang-migrate version 3 (dirty) in public.schema_migrations" in failed.message
    assert report.status is RunStatus.unhealthy


def test_a_migration_check_that_cannot_run_is_a_warning_after_a_good_restart(
    victim: LocalPostgres, inventory: Any
) -> None:
    """migrations = "prisma" but no _prisma_migrations table: the restart still counts, and the
    report says the check did not run (not exit 2 for the whole run)."""
    inventory(
        config(victim).replace("[postgres.main]\n", '[postgres.main]\nmigrations = "prisma"\n')
    )
    victim.stop(remove=False)
    report = postgres_down("main", dry_run=False, approval="auto")
    assert victim.is_running()
    assert {a.status for a in report.actions} == {ActionStatus.done}
    checked = {f.check: f for f in report.findings}["migrations"]
    assert checked.severity is Severity.warning
    assert "migrations not checked after the restart" in checked.message
