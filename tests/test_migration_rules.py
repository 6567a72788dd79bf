"""failed-migration's pure rules: what a migration's SQL creates, and the plan."""

from __future__ import annotations

import pytest

from tasks.errors import ConfigError
from tasks.migration_rules import (
    FailedMigration,
    ForceVersion,
    MigrationParams,
    MigrationTable,
    PrismaResolve,
    SchemaObject,
    created_objects,
    plan_migrations,
    previous_version,
)
from tasks.models import ActionStatus

PRISMA_SQL = """-- CreateTable
CREATE TABLE "Category" (
    "id" TEXT NOT NULL,
    "menuId" TEXT NOT NULL, -- a semicolon; in a comment
    CONSTRAINT "Category_pkey" PRIMARY KEY ("id")
);

-- AlterTable
ALTER TABLE "Menu" ADD COLUMN "position" INTEGER NOT NULL DEFAULT 0,
ADD COLUMN     "slug" TEXT;

/* CreateIndex */
CREATE UNIQUE INDEX "Category_menuId_key" ON "Category"("menuId");

-- AddForeignKey
ALTER TABLE "Category" ADD CONSTRAINT "Category_menuId_fkey" FOREIGN KEY ("menuId")
    REFERENCES "Menu"("id") ON DELETE RESTRICT ON UPDATE CASCADE;
"""


def labels(objects: list[SchemaObject]) -> list[str]:
    return [o.label for o in objects]


def test_created_objects_of_a_prisma_migration() -> None:
    assert labels(created_objects(PRISMA_SQL)) == [
        'table "Category"',
        'column position on "Menu"',
        'column slug on "Menu"',
        'index "Category_menuId_key" on "Category"',
        'constraint "Category_menuId_fkey" on "Category"',
    ]


def test_unquoted_names_fold_to_lower_case_and_schemas_are_kept() -> None:
    found = created_objects(
        "create table if not exists Shop.Orders (id int primary key);\n"
        "ALTER TABLE ONLY shop.orders ADD total numeric, ADD PRIMARY KEY (id), "
        "ADD CONSTRAINT orders_total CHECK (total > 0);\n"
        "CREATE INDEX CONCURRENTLY IF NOT EXISTS orders_total_idx ON shop.orders (total);\n"
        "INSERT INTO shop.orders VALUES (1);"
    )
    assert [(o.kind, o.schema_name, o.table, o.name) for o in found] == [
        ("table", "shop", "orders", None),
        ("column", "shop", "orders", "total"),
        ("constraint", "shop", "orders", "orders_total"),
        ("index", "shop", "orders", "orders_total_idx"),
    ]
    assert found[3].undo == "DROP INDEX shop.orders_total_idx;"
    assert found[1].undo == "ALTER TABLE shop.orders DROP COLUMN total;"


def test_previous_version_is_the_newest_file_below() -> None:
    assert previous_version([20240101, 20240315, 20240401], 20240401) == 20240315
    assert previous_version([1, 2, 3], 1) == -1


def _prisma(*failed: FailedMigration) -> list[MigrationTable]:
    return [
        MigrationTable(tool="prisma", table="public._prisma_migrations", present=True,
                       failed=list(failed)),
        MigrationTable(tool="golang-migrate", table="public.schema_migrations", present=False),
    ]  # fmt: skip


def _failed(name: str, exists: list[bool] | None) -> FailedMigration:
    objects = None
    if exists is not None:
        objects = [
            SchemaObject(kind="table", schema_name=None, table=f"T{i}", exists=e)
            for i, e in enumerate(exists)
        ]
    return FailedMigration(tool="prisma", name=name, id=name, checksum="c", objects=objects)


def test_prisma_plan_refuses_what_the_database_contradicts() -> None:
    p = MigrationParams()
    (ok,) = plan_migrations("main", _prisma(_failed("m1", [False, False])), p)
    assert ok.status is ActionStatus.planned and ok.args == PrismaResolve(
        id="m1", migration_name="m1", checksum="c", resolve_as="rolled-back"
    )
    (partial,) = plan_migrations("main", _prisma(_failed("m1", [True, False])), p)
    assert partial.status is ActionStatus.skipped
    assert 'DROP TABLE "T0";' in partial.detail and "resolve_as=applied" in partial.detail
    applied = MigrationParams(resolve_as="applied")
    (missing,) = plan_migrations("main", _prisma(_failed("m1", [True, False])), applied)
    assert missing.status is ActionStatus.skipped and 'table "T1"' in missing.detail
    (complete,) = plan_migrations("main", _prisma(_failed("m1", [True, True])), applied)
    assert complete.status is ActionStatus.planned


def test_prisma_plan_chooses_the_named_migration_or_asks_for_one() -> None:
    two = _prisma(_failed("m1", None), _failed("m2", None))
    (ask,) = plan_migrations("main", two, MigrationParams())
    assert ask.status is ActionStatus.skipped and "--set migration=NAME" in ask.detail
    # No migration file: nothing shows whether it partly ran, so the run needs to be told how.
    (unknown,) = plan_migrations("main", two, MigrationParams(migration="m2"))
    assert unknown.status is ActionStatus.skipped and "cannot be shown" in unknown.detail
    told = MigrationParams(migration="m2", resolve_as="rolled-back")
    (named,) = plan_migrations("main", two, told)
    assert isinstance(named.args, PrismaResolve) and named.args.migration_name == "m2"
    assert named.status is ActionStatus.planned
    with pytest.raises(ConfigError, match=r"'m3' is not a failed migration.*failed: m1, m2"):
        plan_migrations("main", two, MigrationParams(migration="m3"))


def test_a_migration_file_with_nothing_to_look_up_is_no_evidence() -> None:
    """A dirty golang-migrate version whose file only changes data or drops things: forcing it
    back would run it again (the data changed twice), so only an explicit version does."""
    m = FailedMigration(tool="golang-migrate", name="7", version=7, objects=[], previous_version=5)
    table = [MigrationTable(tool="golang-migrate", table="s", present=True, failed=[m])]
    (refused,) = plan_migrations("main", table, MigrationParams())
    assert refused.status is ActionStatus.skipped and "creates no table" in refused.detail
    (forced,) = plan_migrations("main", table, MigrationParams(force_version=5))
    assert forced.status is ActionStatus.planned


def test_golang_default_version_needs_the_file_and_nothing_applied() -> None:
    def table(exists: list[bool] | None) -> list[MigrationTable]:
        objects = (
            None
            if exists is None
            else [SchemaObject(kind="table", schema_name=None, table="t", exists=e) for e in exists]
        )
        m = FailedMigration(
            tool="golang-migrate", name="7", version=7, objects=objects, previous_version=5
        )
        return [MigrationTable(tool="golang-migrate", table="s", present=True, failed=[m])]

    (clean,) = plan_migrations("main", table([False]), MigrationParams())
    assert clean.status is ActionStatus.planned
    assert clean.args == ForceVersion(dirty_version=7, version=5)
    (partial,) = plan_migrations("main", table([True]), MigrationParams())
    assert partial.status is ActionStatus.skipped and "DROP TABLE t;" in partial.detail
    (unknown,) = plan_migrations("main", table(None), MigrationParams())
    assert unknown.status is ActionStatus.skipped and "migrations_dir" in unknown.detail
    (forced,) = plan_migrations("main", table(None), MigrationParams(force_version=7))
    assert forced.status is ActionStatus.planned
    assert forced.args == ForceVersion(dirty_version=7, version=7)
