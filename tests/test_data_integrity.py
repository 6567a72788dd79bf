"""data-integrity against a real database shaped as seed 003's Prisma schema: Menu, Category
("menuId") and Item ("categoryId") with real orphans at two levels (no foreign keys, as
Prisma's relationMode = "prisma" creates none), and a Session table whose "expiresAt" is
Prisma's DateTime, timestamp(3) without time zone holding UTC wall-clock times."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest
from psycopg import sql

from flows.data_integrity import data_integrity
from tasks.errors import ConfigError
from tasks.integrity_rules import IntegrityParams
from tasks.models import ActionStatus, RunStatus
from tests.conftest import Db
from tests.test_cli import cli, no_traceback

pytestmark = pytest.mark.usefixtures("prefect_api")

INTEGRITY = """
[integrity.app]
target = "main"
sessions = { table = "Session", expires_column = "expiresAt" }

[[integrity.app.relations]]
child_table = "Category"
child_column = "menuId"
parent_table = "Menu"
parent_column = "id"

[[integrity.app.relations]]
child_table = "Item"
child_column = "categoryId"
parent_table = "PARENT"
"""


def config(parent: str = "Category", extra: str = "") -> str:
    return INTEGRITY.replace("PARENT", parent) + extra


def make_schema(db: Db) -> None:
    """Prisma's migration SQL for the seed's models (text ids, timestamp(3)), without the
    foreign keys; then menus m1, m2; categories c1 (m1), c2 (m2), c3 and c4 (of a deleted
    menu: orphans); items i1 (c1), i2 (c2), i6 (c1), i3 (c3) and i5 (c4) (orphans once their
    category goes), i4 (of a deleted category: an orphan)."""
    now = datetime.now(UTC).replace(tzinfo=None)  # UTC wall-clock time, as Prisma writes it
    with db.admin() as conn:
        conn.execute("""CREATE TABLE "Menu" ("id" TEXT NOT NULL, "name" TEXT NOT NULL,
                        CONSTRAINT "Menu_pkey" PRIMARY KEY ("id"))""")
        conn.execute("""CREATE TABLE "Category" ("id" TEXT NOT NULL, "name" TEXT NOT NULL,
                        "menuId" TEXT NOT NULL, CONSTRAINT "Category_pkey" PRIMARY KEY ("id"))""")
        conn.execute("""CREATE TABLE "Item" ("id" TEXT NOT NULL, "name" TEXT NOT NULL,
                        "categoryId" TEXT NOT NULL, CONSTRAINT "Item_pkey" PRIMARY KEY ("id"))""")
        conn.execute("""CREATE TABLE "Session" ("id" TEXT NOT NULL, "userId" TEXT NOT NULL,
                        "expiresAt" TIMESTAMP(3) NOT NULL,
                        "createdAt" TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP,
                        CONSTRAINT "Session_pkey" PRIMARY KEY ("id"))""")
        conn.execute("""INSERT INTO "Menu" VALUES ('m1', 'Lunch'), ('m2', 'Dinner')""")
        conn.execute("""INSERT INTO "Category" VALUES ('c1', 'Mains', 'm1'),
                        ('c2', 'Desserts', 'm2'), ('c3', 'Old', 'm9'), ('c4', 'Gone', 'm8')""")
        conn.execute("""INSERT INTO "Item" VALUES ('i1', 'Soup', 'c1'), ('i2', 'Cake', 'c2'),
                        ('i3', 'Stale', 'c3'), ('i4', 'Lost', 'c7'), ('i5', 'Orphan', 'c4'),
                        ('i6', 'Bread', 'c1')""")
        conn.execute(
            """INSERT INTO "Session" ("id", "userId", "expiresAt") VALUES
               ('s1', 'u1', %s), ('s2', 'u2', %s), ('s3', 'u1', %s), ('s4', 'u3', %s)""",
            [
                now - timedelta(days=1),
                now - timedelta(minutes=1),
                now + timedelta(hours=2),
                now + timedelta(days=7),
            ],
        )


def ids(db: Db, table: str) -> list[str]:
    with db.admin() as conn:
        query = sql.SQL("SELECT id FROM {} ORDER BY id").format(sql.Identifier(table))
        return [r[0] for r in conn.execute(query)]


def test_dry_run_reports_orphans_at_every_level_then_apply_deletes_deepest_first(db: Db) -> None:
    make_schema(db)
    # The server's time zone far from UTC: a timestamp(3) column still reads as UTC.
    with db.admin() as conn:
        conn.execute(
            sql.SQL("ALTER DATABASE {} SET timezone = 'Pacific/Kiritimati'").format(
                sql.Identifier(db.name)
            )
        )
    db.write_config(config())

    plan = data_integrity("app")
    assert plan.status is RunStatus.unhealthy
    orphans = [f for f in plan.findings if f.check == "orphans"]
    assert [f.observed for f in orphans] == [2, 3]
    assert '"Category"."menuId" -> public."Menu".id' in orphans[0].message
    assert "id c3, c4" in orphans[0].message
    assert "id i3, i4, i5" in orphans[1].message
    expired = next(f for f in plan.findings if f.check == "expired_sessions")
    assert expired.observed == 2
    live = next(f for f in plan.findings if f.check == "live_rows")
    assert {r["table"] for r in live.observed} == {
        "public.Menu",
        "public.Category",
        "public.Item",
        "public.Session",
    }
    # Deepest level first: Item's orphans, then Category's, then the sessions.
    assert [(a.kind, a.args.model_dump()) for a in plan.actions] == [
        ("delete_orphans", {"relation": 1, "limit": 3}),
        ("delete_orphans", {"relation": 0, "limit": 2}),
        ("delete_expired_sessions", {"limit": 2}),
    ]
    assert all(a.destructive and a.status is ActionStatus.planned for a in plan.actions)
    assert all("dry run" in a.detail for a in plan.actions)
    assert len(ids(db, "Item")) == 6 and len(ids(db, "Session")) == 4

    report = data_integrity("app", dry_run=False, approval="auto")
    assert report.status is RunStatus.fixed, report.actions
    assert [a.status for a in report.actions] == [ActionStatus.done] * 3
    assert report.actions[0].detail.startswith("deleted 3 rows")
    assert ids(db, "Menu") == ["m1", "m2"]
    assert ids(db, "Category") == ["c1", "c2"]
    assert ids(db, "Item") == ["i1", "i2", "i6"]
    assert ids(db, "Session") == ["s3", "s4"]
    assert all(f.observed == 0 for f in report.findings if f.check != "live_rows")

    again = data_integrity("app", dry_run=False, approval="auto")
    assert again.status is RunStatus.healthy and again.actions == []


def test_cap_stops_at_the_deepest_level_and_each_batch_is_its_own_transaction(db: Db) -> None:
    make_schema(db)
    with db.admin() as conn:
        # Each deleted row notes the transaction that deleted it.
        conn.execute("CREATE TABLE deleted (tbl text, id text, xid bigint)")
        conn.execute("""CREATE FUNCTION note_delete() RETURNS trigger LANGUAGE plpgsql AS $$
                        BEGIN INSERT INTO deleted VALUES (TG_TABLE_NAME, OLD.id, txid_current());
                        RETURN OLD; END $$""")
        for table in ("Item", "Category"):
            conn.execute(
                sql.SQL(
                    "CREATE TRIGGER noted AFTER DELETE ON {} FOR EACH ROW EXECUTE FUNCTION "
                    "note_delete()"
                ).format(sql.Identifier(table))
            )
    # Schema-qualified on one side, unqualified on the other: the same table.
    db.write_config(config(parent="public.Category"))

    capped = data_integrity(
        "app",
        dry_run=False,
        approval="auto",
        params=IntegrityParams(max_rows_deleted=2, batch_size=1, max_sessions_deleted=0),
    )
    assert capped.status is RunStatus.unhealthy
    items, categories, sessions = capped.actions
    assert (items.status, items.args.limit) == (ActionStatus.done, 2)
    assert categories.status is ActionStatus.skipped
    assert "max_rows_deleted" in categories.detail
    assert sessions.status is ActionStatus.skipped
    with db.admin() as conn:
        rows = conn.execute("SELECT tbl, id, xid FROM deleted").fetchall()
    assert len(rows) == 2 and {r[0] for r in rows} == {"Item"}
    assert {r[1] for r in rows} <= {"i3", "i4", "i5"}
    assert len({r[2] for r in rows}) == 2  # two batches of one row, two transactions
    assert ids(db, "Category") == ["c1", "c2", "c3", "c4"]  # nothing above the deepest level
    remaining = [f.observed for f in capped.findings if f.check == "orphans"]
    assert remaining == [2, 1]

    done = data_integrity(
        "app", dry_run=False, approval="auto", params=IntegrityParams(batch_size=2)
    )
    assert done.status is RunStatus.fixed
    assert ids(db, "Category") == ["c1", "c2"]
    assert ids(db, "Item") == ["i1", "i2", "i6"]
    with db.admin() as conn:
        batches = conn.execute(
            "SELECT tbl, count(DISTINCT xid) FROM deleted GROUP BY tbl ORDER BY tbl"
        ).fetchall()
    # Category: 2 rows in one batch of 2; Item: 2 earlier batches and 1 now.
    assert batches == [("Category", 1), ("Item", 3)]


def test_approval_ask_without_an_answer_deletes_nothing(db: Db) -> None:
    make_schema(db)
    db.write_config(config())
    report = data_integrity("app", dry_run=False, approval="ask")
    assert all(a.status is ActionStatus.skipped for a in report.actions)
    assert len(ids(db, "Item")) == 6 and len(ids(db, "Category")) == 4


@pytest.mark.parametrize(
    "relation",
    [
        'child_table = "Item; DROP TABLE victim; --"\nchild_column = "categoryId"\n'
        'parent_table = "Category"\n',
        'child_table = "Item"\nchild_column = "categoryId\\" IS NULL; DROP TABLE victim; --"\n'
        'parent_table = "Category"\n',
        'child_table = "item"\nchild_column = "categoryid"\nparent_table = "category"\n',
    ],
)
def test_hostile_or_wrongly_cased_names_are_config_errors(db: Db, relation: str) -> None:
    make_schema(db)
    with db.admin() as conn:
        conn.execute("CREATE TABLE victim (id int)")
    db.write_config(f'[integrity.app]\ntarget = "main"\n[[integrity.app.relations]]\n{relation}')
    with pytest.raises(ConfigError, match=r"\[integrity\.app\].*does not exist"):
        data_integrity("app", dry_run=False, approval="auto")
    with db.admin() as conn:
        assert conn.execute("SELECT to_regclass('public.victim')").fetchone() == ("victim",)
    assert len(ids(db, "Item")) == 6


def test_a_reference_of_another_type_is_a_config_error(db: Db) -> None:
    make_schema(db)
    with db.admin() as conn:
        conn.execute('CREATE TABLE "Order" (id int PRIMARY KEY, "menuId" int)')
    db.write_config(
        '[integrity.app]\ntarget = "main"\n[[integrity.app.relations]]\nchild_table = "Order"\n'
        'child_column = "menuId"\nparent_table = "Menu"\n'
    )
    with pytest.raises(ConfigError, match=r"\[integrity\.app\].*comparable types"):
        data_integrity("app")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            '[integrity.app]\ntarget = "nope"\nsessions = { table = "S", expires_column = "e" }\n',
            r"integrity\.app\.target names 'nope'",
        ),
        ('[integrity.app]\ntarget = "main"\n', r"nothing to check"),
        (
            '[integrity.app]\ntarget = "main"\n[[integrity.app.relations]]\nchild_table = "A"\n'
            'child_column = "bId"\nparent_table = "B"\n[[integrity.app.relations]]\n'
            'child_table = "public.B"\nchild_column = "aId"\nparent_table = "A"\n',
            r"closes a cycle",
        ),
        (
            '[integrity.app]\ntarget = "main"\n[[integrity.app.relations]]\n'
            'child_table = "a.b.c"\nchild_column = "x"\nparent_table = "B"\n',
            r"TABLE or SCHEMA\.TABLE",
        ),
    ],
)
def test_bad_inventory_is_one_clear_error(db: Db, text: str, message: str) -> None:
    db.write_config(text)
    with pytest.raises(ConfigError, match=message):
        data_integrity("app")


def test_from_the_cli_report_then_fix_then_clean(db: Db, prefect_api: str) -> None:
    make_schema(db)
    db.write_config(config())
    env = {"PREFECT_API_URL": prefect_api}

    proc = cli("run", "data-integrity", "--target", "app", "--json", env=env)
    assert proc.returncode == 1, proc.stderr
    report = json.loads(proc.stdout)
    assert report["status"] == "unhealthy" and report["dry_run"] is True
    assert [f["observed"] for f in report["findings"] if f["check"] == "orphans"] == [2, 3]
    assert len(ids(db, "Item")) == 6

    proc = cli("run", "data-integrity", "--target", "app", "--apply", "--yes", "--json", env=env)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["status"] == "fixed"
    assert ids(db, "Item") == ["i1", "i2", "i6"] and ids(db, "Category") == ["c1", "c2"]

    proc = cli("run", "data-integrity", "--target", "app", "--json", env=env)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["status"] == "healthy"

    db.write_config(config().replace('target = "main"', 'target = "elsewhere"'))
    proc = cli("run", "data-integrity", "--target", "app", env=env)
    assert proc.returncode == 2
    assert "integrity.app.target names 'elsewhere'" in proc.stderr
    no_traceback(proc)


def test_a_partitioned_sessions_table_loses_only_its_expired_rows(db: Db) -> None:
    """The same ctid is in every partition: rows are named by (tableoid, ctid), so the live
    session beside an expired one in another partition stays."""
    now = datetime.now(UTC).replace(tzinfo=None)
    with db.admin() as conn:
        conn.execute('CREATE TABLE "Menu" ("id" TEXT PRIMARY KEY)')
        conn.execute('CREATE TABLE "Category" ("id" TEXT PRIMARY KEY, "menuId" TEXT NOT NULL)')
        conn.execute('CREATE TABLE "Item" ("id" TEXT PRIMARY KEY, "categoryId" TEXT NOT NULL)')
        conn.execute("""CREATE TABLE "Session" ("id" TEXT NOT NULL, "userId" TEXT NOT NULL,
                        "expiresAt" TIMESTAMP(3) NOT NULL) PARTITION BY LIST ("userId")""")
        conn.execute("""CREATE TABLE "Session_u1" PARTITION OF "Session" FOR VALUES IN ('u1')""")
        conn.execute("""CREATE TABLE "Session_u2" PARTITION OF "Session" FOR VALUES IN ('u2')""")
        # The first row of each partition: the same ctid (0,1).
        conn.execute(
            """INSERT INTO "Session" VALUES ('s1', 'u1', %s), ('s2', 'u2', %s)""",
            [now - timedelta(days=1), now + timedelta(days=1)],
        )
    db.write_config(config())
    report = data_integrity("app", dry_run=False, approval="auto")
    assert report.status is RunStatus.fixed, report.findings
    assert ids(db, "Session") == ["s2"]
