"""failed-migration against a real PostgreSQL: migration tables with the layouts Prisma and
golang-migrate create, and migrations that really failed (their SQL run until the server
refused a statement, the error kept as the tool keeps it)."""

from __future__ import annotations

import hashlib
import json
import uuid
from pathlib import Path
from typing import Any

import psycopg
import psycopg.sql
import pytest

from flows.failed_migration import failed_migration
from tasks.models import ActionStatus, RunStatus, Severity
from tests.conftest import Db
from tests.test_cli import cli, no_traceback

pytestmark = pytest.mark.usefixtures("prefect_api")

# Prisma's own DDL for its table (schema engine, PostgreSQL).
PRISMA_TABLE = """CREATE TABLE "_prisma_migrations" (
    "id"                    VARCHAR(36) PRIMARY KEY NOT NULL,
    "checksum"              VARCHAR(64) NOT NULL,
    "finished_at"           TIMESTAMPTZ,
    "migration_name"        VARCHAR(255) NOT NULL,
    "logs"                  TEXT,
    "rolled_back_at"        TIMESTAMPTZ,
    "started_at"            TIMESTAMPTZ NOT NULL DEFAULT now(),
    "applied_steps_count"   INTEGER NOT NULL DEFAULT 0
)"""
# golang-migrate's (database/postgres).
GOLANG_TABLE = (
    'CREATE TABLE IF NOT EXISTS "schema_migrations" '
    "(version bigint not null primary key, dirty boolean not null)"
)

INIT = """-- CreateTable
CREATE TABLE "Menu" ("id" TEXT NOT NULL, "name" TEXT NOT NULL,
    CONSTRAINT "Menu_pkey" PRIMARY KEY ("id"));
"""
# Fails on its second statement: Menu has rows, so a NOT NULL column without a default fails.
CATEGORY = """-- CreateTable
CREATE TABLE "Category" ("id" TEXT NOT NULL, "menuId" TEXT NOT NULL,
    CONSTRAINT "Category_pkey" PRIMARY KEY ("id"));

-- AlterTable
ALTER TABLE "Menu" ADD COLUMN "slug" TEXT NOT NULL;

-- CreateIndex
CREATE UNIQUE INDEX "Menu_slug_key" ON "Menu"("slug");
"""
INIT_NAME, CATEGORY_NAME = "20240101000000_init", "20240201000000_add_category"


def run_script(conn: psycopg.Connection[Any], script: str) -> str | None:
    """Each statement in turn, as a tool without a transaction does: the error, or None."""
    for stmt in script.split(";"):
        if stmt.strip() and not all(
            line.strip().startswith("--") or not line.strip() for line in stmt.splitlines()
        ):
            try:
                conn.execute(stmt)
            except psycopg.Error as exc:
                return f"Database error code: {exc.sqlstate}\n\nDatabase error:\nERROR: {exc}"
    return None


def prisma_deploy(db: Db, folder: Path, name: str, script: str) -> str | None:
    """What `prisma migrate deploy` does for one migration: a started row, the script, then
    finished_at, or the logs of its error."""
    (folder / name).mkdir(parents=True, exist_ok=True)
    (folder / name / "migration.sql").write_text(script)
    row_id = str(uuid.uuid4())
    with db.admin() as conn:
        conn.execute(
            "INSERT INTO _prisma_migrations (id, checksum, migration_name) VALUES (%s, %s, %s)",
            [row_id, "a" * 64, name],
        )
        error = run_script(conn, script)
        if error is None:
            conn.execute(
                "UPDATE _prisma_migrations SET finished_at = now(), applied_steps_count = 1 "
                "WHERE id = %s",
                [row_id],
            )
        else:
            conn.execute("UPDATE _prisma_migrations SET logs = %s WHERE id = %s", [error, row_id])
    return error


def prisma_incident(db: Db, folder: Path, *, partial: bool) -> None:
    with db.admin() as conn:
        conn.execute(PRISMA_TABLE)
    assert prisma_deploy(db, folder, INIT_NAME, INIT) is None
    with db.admin() as conn:
        conn.execute("""INSERT INTO "Menu" VALUES ('m1', 'Lunch')""")
    script = CATEGORY if partial else CATEGORY.split("-- AlterTable")[1]
    error = prisma_deploy(db, folder, CATEGORY_NAME, script)
    assert error is not None and "contains null values" in error


def prisma_rows(db: Db) -> list[tuple[Any, ...]]:
    with db.admin() as conn:
        return conn.execute(
            "SELECT migration_name, finished_at IS NOT NULL, rolled_back_at IS NOT NULL "
            "FROM _prisma_migrations ORDER BY started_at, finished_at NULLS FIRST"
        ).fetchall()


def config(folder: Path | None = None, extra: str = "") -> str:
    return (f'migrations_dir = "{folder}"\n' if folder else "") + extra


def test_a_failed_prisma_migration_is_reported_then_marked_rolled_back(
    db: Db, tmp_path: Path
) -> None:
    folder = tmp_path / "migrations"
    prisma_incident(db, folder, partial=False)
    db.write_config(config(folder))

    plan = failed_migration("main")
    assert plan.status is RunStatus.unhealthy
    failed = [f for f in plan.findings if f.check == "failed_migration"]
    assert failed[0].severity is Severity.critical and failed[0].observed == CATEGORY_NAME
    assert 'column "slug" of relation "Menu" contains null values' in failed[0].message
    assert "not applied: none of the 2 objects it creates exists" in failed[0].message
    assert "no migration table" not in plan.findings[-1].message
    assert plan.actions[0].status is ActionStatus.planned
    assert prisma_rows(db)[1] == (CATEGORY_NAME, False, False)  # a dry run writes nothing

    report = failed_migration("main", dry_run=False, approval="auto")
    assert report.status is RunStatus.fixed, report.findings
    assert report.actions[0].detail == f"{CATEGORY_NAME} marked rolled-back"
    assert prisma_rows(db) == [(INIT_NAME, True, False), (CATEGORY_NAME, False, True)]
    again = failed_migration("main", dry_run=False, approval="auto")
    assert again.status is RunStatus.healthy and again.actions == []


def test_a_partially_applied_prisma_migration_is_refused_with_what_to_undo(
    db: Db, tmp_path: Path
) -> None:
    folder = tmp_path / "migrations"
    prisma_incident(db, folder, partial=True)
    db.write_config(config(folder))

    report = failed_migration("main", dry_run=False, approval="auto")
    objects = next(f for f in report.findings if f.check == "migration_objects")
    assert objects.severity is Severity.warning
    assert objects.observed == {
        "exists": ['table "Category"'],
        "missing": ['column slug on "Menu"', 'index "Menu_slug_key" on "Menu"'],
    }
    assert report.status is RunStatus.unhealthy
    assert report.actions[0].status is ActionStatus.skipped
    assert 'undo them by hand (DROP TABLE "Category";)' in report.actions[0].detail
    assert prisma_rows(db)[1] == (CATEGORY_NAME, False, False)

    # Marked applied while parts are missing: refused too.
    applied = failed_migration(
        "main", dry_run=False, approval="auto", params={"resolve_as": "applied"}
    )
    assert applied.actions[0].status is ActionStatus.skipped
    assert "column slug" in applied.actions[0].detail

    # Completed by hand, it may be marked applied: a finished row as `resolve --applied` writes.
    with db.admin() as conn:
        conn.execute("""ALTER TABLE "Menu" ADD COLUMN "slug" TEXT NOT NULL DEFAULT 'lunch'""")
        conn.execute("""CREATE UNIQUE INDEX "Menu_slug_key" ON "Menu"("slug")""")
    done = failed_migration(
        "main", dry_run=False, approval="auto", params={"resolve_as": "applied"}
    )
    assert done.status is RunStatus.fixed, done.actions
    assert prisma_rows(db) == [
        (INIT_NAME, True, False),
        (CATEGORY_NAME, False, True),
        (CATEGORY_NAME, True, False),
    ]
    with db.admin() as conn:
        checksum = conn.execute(
            "SELECT checksum FROM _prisma_migrations WHERE finished_at IS NOT NULL "
            "AND migration_name = %s",
            [CATEGORY_NAME],
        ).fetchone()
    file = folder / CATEGORY_NAME / "migration.sql"
    assert checksum == (hashlib.sha256(file.read_bytes()).hexdigest(),)


def golang_incident(db: Db, folder: Path, *, partial: bool) -> None:
    folder.mkdir()
    (folder / "1_create_users.up.sql").write_text(
        "CREATE TABLE users (id serial PRIMARY KEY, email text);"
    )
    (folder / "1_create_users.down.sql").write_text("DROP TABLE users;")
    second = (
        "CREATE TABLE orders (id serial PRIMARY KEY, user_id int REFERENCES users);\n"
        if partial
        else ""
    ) + "CREATE UNIQUE INDEX users_email_key ON users (email);\n"
    (folder / "2_add_orders.up.sql").write_text(second)
    with db.admin() as conn:
        conn.execute(GOLANG_TABLE)
        # migrate up: dirty while a version runs, clean when it succeeded.
        conn.execute("INSERT INTO schema_migrations VALUES (1, true)")
        assert run_script(conn, (folder / "1_create_users.up.sql").read_text()) is None
        conn.execute("UPDATE schema_migrations SET dirty = false")
        conn.execute("INSERT INTO users (email) VALUES ('a@x'), ('a@x')")
        conn.execute("TRUNCATE schema_migrations")
        conn.execute("INSERT INTO schema_migrations VALUES (2, true)")
        assert "could not create unique index" in (run_script(conn, second) or "")


def versions(db: Db) -> list[tuple[int, bool]]:
    with db.admin() as conn:
        return conn.execute("SELECT version, dirty FROM schema_migrations").fetchall()


def test_a_dirty_golang_migrate_version_is_forced_back(db: Db, tmp_path: Path) -> None:
    golang_incident(db, tmp_path / "m", partial=False)
    db.write_config(config(tmp_path / "m", 'migrations = "golang-migrate"\n'))
    plan = failed_migration("main")
    (failed,) = [f for f in plan.findings if f.check == "failed_migration"]
    assert failed.severity is Severity.critical and "version 2 (dirty)" in failed.message
    assert "not applied" in failed.message
    assert plan.actions[0].description.startswith("migrate force 1:")

    report = failed_migration("main", dry_run=False, approval="auto")
    assert report.status is RunStatus.fixed, report.findings
    assert versions(db) == [(1, False)]


def test_a_partially_applied_dirty_version_is_refused_unless_forced(db: Db, tmp_path: Path) -> None:
    golang_incident(db, tmp_path / "m", partial=True)
    db.write_config(config(tmp_path / "m"))
    report = failed_migration("main", dry_run=False, approval="auto")
    assert report.status is RunStatus.unhealthy
    assert report.actions[0].status is ActionStatus.skipped
    assert "table orders exist" in report.actions[0].detail
    assert "DROP TABLE orders;" in report.actions[0].detail
    assert versions(db) == [(2, True)]

    # Undone by hand as the report says: the default applies.
    with db.admin() as conn:
        conn.execute("DROP TABLE orders")
    fixed = failed_migration("main", dry_run=False, approval="auto")
    assert fixed.status is RunStatus.fixed and versions(db) == [(1, False)]


def test_without_the_files_only_an_explicit_version_is_forced(db: Db, tmp_path: Path) -> None:
    golang_incident(db, tmp_path / "m", partial=False)
    report = failed_migration("main", dry_run=False, approval="auto")
    assert report.actions[0].status is ActionStatus.skipped
    assert "set migrations_dir" in report.actions[0].detail
    forced = failed_migration("main", dry_run=False, approval="auto", params={"force_version": 1})
    assert forced.status is RunStatus.fixed and versions(db) == [(1, False)]


def test_a_migrations_table_in_another_schema(db: Db, tmp_path: Path) -> None:
    with db.admin() as conn:
        conn.execute('CREATE SCHEMA "Deploy"')
        conn.execute('SET search_path = "Deploy"')
        conn.execute(GOLANG_TABLE)
        conn.execute("INSERT INTO schema_migrations VALUES (5, true)")
    db.write_config('migrations_schema = "Deploy"\n')
    plan = failed_migration("main")
    assert plan.status is RunStatus.unhealthy
    assert "Deploy.schema_migrations failed" in plan.findings[0].message


def test_through_the_cli_exit_1_then_0(db: Db, tmp_path: Path, prefect_api: str) -> None:
    folder = tmp_path / "migrations"
    prisma_incident(db, folder, partial=False)
    db.write_config(config(folder))
    env = {"PREFECT_API_URL": prefect_api}

    proc = cli("run", "failed-migration", "--target", "main", "--json", env=env)
    assert proc.returncode == 1, proc.stderr
    assert json.loads(proc.stdout)["findings"][0]["observed"] == CATEGORY_NAME
    proc = cli("run", "failed-migration", "--target", "main", "--apply", "--yes", "--json", env=env)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["status"] == "fixed"
    proc = cli("run", "failed-migration", "--target", "main", env=env)
    assert proc.returncode == 0, proc.stderr
    no_traceback(proc)


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ('migrations = "prisma"\n', "public._prisma_migrations does not exist"),
        ('migrations_dir = "/nonexistent/migrations"\n', "migrations_dir: /nonexistent"),
        ('migrations = "flyway"\n', "postgres.main.migrations"),
        ('migrations_schema = "deploy"\n', "migrations_schema = 'deploy': no such schema"),
    ],
)
def test_bad_configuration_exits_2(db: Db, prefect_api: str, extra: str, expected: str) -> None:
    db.write_config(extra)
    proc = cli("run", "failed-migration", env={"PREFECT_API_URL": prefect_api})
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert expected in proc.stderr
    no_traceback(proc)


def test_a_database_without_migration_tables_is_healthy(db: Db) -> None:
    report = failed_migration("main", dry_run=False, approval="auto")
    assert report.status is RunStatus.healthy and report.actions == []
    assert report.findings[0].message == (
        "no migration table: neither public._prisma_migrations nor public.schema_migrations exists"
    )


def test_the_resolve_waits_for_approval(db: Db, tmp_path: Path) -> None:
    prisma_incident(db, tmp_path / "migrations", partial=False)
    report = failed_migration("main", dry_run=False, approval="ask")
    assert report.actions[0].status is ActionStatus.skipped
    assert prisma_rows(db)[1] == (CATEGORY_NAME, False, False)


HOSTILE = 'x"; DROP TABLE victim; --'


def test_a_hostile_schema_name_is_quoted_never_executed(db: Db) -> None:
    with db.admin() as conn:
        conn.execute("CREATE TABLE victim (id int)")
        conn.execute(psycopg.sql.SQL("CREATE SCHEMA {}").format(psycopg.sql.Identifier(HOSTILE)))
        conn.execute(
            psycopg.sql.SQL("SET search_path = {}").format(psycopg.sql.Identifier(HOSTILE))
        )
        conn.execute(GOLANG_TABLE)
        conn.execute("INSERT INTO schema_migrations VALUES (4, true)")
    db.write_config(f"migrations_schema = {json.dumps(HOSTILE)}\n")
    report = failed_migration("main", dry_run=False, approval="auto", params={"force_version": 3})
    assert report.status is RunStatus.fixed, report.findings
    with db.admin() as conn:
        assert conn.execute("SELECT to_regclass('public.victim')").fetchone() == ("victim",)
        rows = conn.execute(
            psycopg.sql.SQL("SELECT version, dirty FROM {}").format(
                psycopg.sql.Identifier(HOSTILE, "schema_migrations")
            )
        ).fetchall()
    assert rows == [(3, False)]
