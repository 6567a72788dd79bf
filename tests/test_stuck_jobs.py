"""stuck-jobs against a real jobs table shaped like seed 004's crawler.job."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from psycopg import sql

from flows.stuck_jobs import stuck_jobs
from tasks.errors import ConfigError
from tasks.models import ActionStatus, RunStatus
from tests.conftest import Db

pytestmark = pytest.mark.usefixtures("prefect_api")

JOBS = '[postgres.main.jobs]\ntable = "crawler.job"\n'


def make_jobs(db: Db) -> None:
    with db.admin() as conn:
        conn.execute("CREATE SCHEMA crawler")
        conn.execute("""CREATE TABLE crawler.job (id bigserial PRIMARY KEY, sourceid int,
                        status text NOT NULL, startedat timestamptz)""")
        conn.execute("""INSERT INTO crawler.job (sourceid, status, startedat) VALUES
            (1, 'running', now() - interval '2 hours'),   -- 1 stuck
            (2, 'running', now() - interval '31 minutes'),-- 2 stuck
            (3, 'running', now() - interval '5 minutes'), -- 3 still working
            (4, 'pending', NULL),                         -- 4 waiting
            (5, 'done', now() - interval '3 hours')       -- 5 finished""")


def rows(db: Db) -> dict[int, tuple[str, bool]]:
    with db.admin() as conn:
        return {
            r[0]: (r[1], r[2] is None)
            for r in conn.execute("SELECT id, status, startedat FROM crawler.job ORDER BY id")
        }


def test_dry_run_lists_then_apply_resets_only_stuck_jobs(db: Db) -> None:
    make_jobs(db)
    db.write_config(JOBS)
    untouched = rows(db)

    plan = stuck_jobs("main")
    assert plan.status is RunStatus.unhealthy
    assert plan.findings[0].observed == 2 and "ids 1, 2" in plan.findings[0].message
    assert plan.actions[0].args.ids == [1, 2]
    assert rows(db) == untouched

    report = stuck_jobs("main", dry_run=False, approval="auto")
    assert report.status is RunStatus.fixed
    assert report.actions[0].detail == "reset 2 jobs: ids 1, 2"
    assert rows(db) == {
        1: ("pending", True),
        2: ("pending", True),
        3: ("running", False),
        4: ("pending", True),
        5: ("done", False),
    }
    # Idempotent: nothing left to reset.
    again = stuck_jobs("main", dry_run=False, approval="auto")
    assert again.status is RunStatus.healthy and again.actions == []


def test_threshold_from_the_target_and_keep_started(db: Db) -> None:
    make_jobs(db)
    db.write_config(
        JOBS + "clear_started = false\n[postgres.main.thresholds]\nstuck_after_minutes = 3\n"
    )
    report = stuck_jobs("main", dry_run=False, approval="auto")
    assert report.findings[0].threshold == 3
    assert rows(db)[3] == ("pending", False)  # 5 minutes is stuck now; startedat kept


def test_destructive_reset_waits_for_approval(db: Db) -> None:
    make_jobs(db)
    db.write_config(JOBS)
    report = stuck_jobs("main", dry_run=False, approval="ask")
    assert report.actions[0].status is ActionStatus.skipped
    assert rows(db)[1] == ("running", False)


@pytest.mark.parametrize(
    "extra",
    [
        'table = "job; DROP TABLE victim; --"\n',
        'table = "crawler.job"\nstatus_column = "status = status; DROP TABLE victim; --"\n',
        'table = "crawler.job"\nid_column = "id) OR (1=1"\n',
    ],
)
def test_hostile_identifiers_are_quoted_never_executed(db: Db, extra: str) -> None:
    make_jobs(db)
    with db.admin() as conn:
        conn.execute("CREATE TABLE victim (id int)")
    db.write_config("[postgres.main.jobs]\n" + extra)
    with pytest.raises(ConfigError, match=r"\[postgres\.main\.jobs\].*does not exist"):
        stuck_jobs("main", dry_run=False, approval="auto")
    with db.admin() as conn:
        assert conn.execute("SELECT to_regclass('public.victim')").fetchone() == ("victim",)
    assert rows(db)[1] == ("running", False)


def test_target_without_jobs_table(db: Db) -> None:
    with pytest.raises(ConfigError, match=r"add \[postgres\.main\.jobs\]"):
        stuck_jobs("main")


def server_time_zone(db: Db, zone: str, scope: str) -> None:
    """Set the server's timezone for new sessions on this database, as an operator would."""
    with db.admin() as conn:
        where = "DATABASE" if scope == "database" else "ROLE postgres IN DATABASE"
        conn.execute(
            sql.SQL("ALTER " + where + " {} SET timezone = {}").format(
                sql.Identifier(db.name), sql.Literal(zone)
            )
        )
    with db.admin() as conn:
        assert conn.execute("SHOW timezone").fetchone() == (zone,)


def prisma_jobs(db: Db, column_type: str, zone: str = "UTC") -> None:
    """Prisma's DateTime: timestamp(3) without time zone holding wall-clock times of `zone`
    (UTC for Prisma); or a timestamptz, for comparison."""
    now = datetime.now(UTC)

    def at(minutes_ago: int) -> datetime:
        moment = (now - timedelta(minutes=minutes_ago)).astimezone(ZoneInfo(zone))
        return moment if column_type.startswith("timestamptz") else moment.replace(tzinfo=None)

    with db.admin() as conn:
        conn.execute("CREATE SCHEMA crawler")
        conn.execute(
            f"CREATE TABLE crawler.job (id text PRIMARY KEY, status text, startedat {column_type})"
        )
        conn.execute(
            "INSERT INTO crawler.job VALUES ('recent', 'running', %s), ('stale', 'running', %s)",
            [at(10), at(45)],
        )


def job_rows(db: Db) -> dict[str, tuple[str, Any]]:
    with db.admin() as conn:
        return {r[0]: (r[1], r[2]) for r in conn.execute("SELECT * FROM crawler.job")}


@pytest.mark.parametrize("column_type", ["timestamp(3)", "timestamptz(3)"])
@pytest.mark.parametrize(
    ("scope", "zone"),
    [
        ("database", "UTC"),
        ("database", "Europe/Berlin"),
        ("database", "America/New_York"),
        ("role", "America/New_York"),
        ("role", "Asia/Kathmandu"),
    ],
)
def test_prisma_timestamps_whatever_the_server_time_zone(
    db: Db, column_type: str, scope: str, zone: str
) -> None:
    prisma_jobs(db, column_type)
    server_time_zone(db, zone, scope)
    db.write_config(JOBS)
    before = job_rows(db)

    plan = stuck_jobs("main")
    assert plan.status is RunStatus.unhealthy
    assert plan.findings[0].observed == 1
    assert plan.actions[0].args.ids == ["stale"]
    # 45 minutes and the few seconds (or minutes, on a busy machine) since
    assert re.search(r"oldest started 4[5-9] min ago", plan.findings[0].message)

    report = stuck_jobs("main", dry_run=False, approval="auto")
    assert report.status is RunStatus.fixed, report.findings
    assert report.actions[0].detail == "reset 1 jobs: ids stale"
    assert job_rows(db) == {"stale": ("pending", None), "recent": before["recent"]}


def test_naive_times_of_another_zone_with_time_zone_set(db: Db) -> None:
    prisma_jobs(db, "timestamp(3)", zone="Europe/Berlin")
    server_time_zone(db, "America/New_York", "database")
    db.write_config(JOBS + 'time_zone = "Europe/Berlin"\n')

    report = stuck_jobs("main", dry_run=False, approval="auto")
    assert report.actions[0].detail == "reset 1 jobs: ids stale"
    assert job_rows(db)["recent"][0] == "running"


def test_started_column_that_is_not_a_time_is_a_config_error(db: Db) -> None:
    with db.admin() as conn:
        conn.execute("CREATE TABLE job (id int, status text, startedat text)")
    db.write_config('[postgres.main.jobs]\ntable = "job"\n')
    with pytest.raises(
        ConfigError, match=r"'startedat' of 'job' is text: .*timestamp or timestamptz"
    ):
        stuck_jobs("main")


def test_unknown_time_zone_is_refused_at_load(db: Db) -> None:
    db.write_config(JOBS + 'time_zone = "Mars/Olympus"\n')
    with pytest.raises(ConfigError, match=r"postgres\.main\.jobs\.time_zone: .*unknown time zone"):
        stuck_jobs("main")
