"""login-lockouts against a real Redis (and a real lockout table): exactly the intended keys go."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from psycopg import sql

from flows.login_lockouts import login_lockouts
from tasks.errors import ConfigError
from tasks.models import ActionStatus, RunStatus
from tests.conftest import Db

pytestmark = pytest.mark.usefixtures("prefect_api")

KEYS = [
    "login_attempt:alice",
    "login_attempt:alice:10.0.0.1",
    "login_attempt:alice:10.0.0.2",
    "login_attempt:alice2",
    "login_attempt:alicex:1",
    "login_attempt:*",
    "login_attempt:*:10.0.0.9",
    "login_attempt:a?ice",
    "login_attempt:[ab]lice",
    "login_attempt:bob",
    "session:alice",
    "other:login_attempt:alice",
]


@pytest.fixture
def locked(redis_server: Any, inventory: Any) -> Any:
    server = redis_server()
    with server.client() as r:
        for key in KEYS:
            r.set(key, 5, ex=3600)
    inventory(f'[redis.cache]\nurl = "{server.url}"\n')
    return server


def remaining(server: Any) -> set[str]:
    with server.client() as r:
        return set(r.scan_iter(count=1000))


def clear(**params: Any) -> Any:
    return login_lockouts("cache", dry_run=False, approval="auto", params=params)


@pytest.mark.parametrize(
    ("subject", "gone"),
    [
        (
            "alice",
            {"login_attempt:alice", "login_attempt:alice:10.0.0.1", "login_attempt:alice:10.0.0.2"},
        ),
        ("*", {"login_attempt:*", "login_attempt:*:10.0.0.9"}),
        ("a?ice", {"login_attempt:a?ice"}),
        ("[ab]lice", {"login_attempt:[ab]lice"}),
        ("nobody", set()),
    ],
)
def test_one_subject_clears_exactly_its_keys(locked: Any, subject: str, gone: set[str]) -> None:
    report = clear(subject=subject)
    assert remaining(locked) == set(KEYS) - gone
    assert report.status is (RunStatus.fixed if gone else RunStatus.healthy)
    if gone:
        assert report.actions[0].detail == f"removed {len(gone)}"


def test_dry_run_counts_and_samples_without_deleting(locked: Any) -> None:
    report = login_lockouts("cache", params={"subject": "alice"})
    assert report.status is RunStatus.unhealthy
    assert report.findings[0].observed == 3 and "login_attempt:alice" in report.findings[0].message
    assert report.actions[0].status is ActionStatus.planned
    assert remaining(locked) == set(KEYS)


def test_all_clears_every_lockout_and_nothing_else(locked: Any) -> None:
    report = clear(all=True)
    assert remaining(locked) == {"session:alice", "other:login_attempt:alice"}
    assert report.actions[0].detail == "removed 10"


def test_many_keys_are_cleared_in_batches(redis_server: Any, inventory: Any) -> None:
    server = redis_server()
    with server.client() as r:
        r.mset({f"login_attempt:carol:{i}": 1 for i in range(1800)})
        r.set("login_attempt:dave", 1)
    inventory(f'[redis.cache]\nurl = "{server.url}"\n')
    assert clear(subject="carol").actions[0].detail == "removed 1800"
    assert remaining(server) == {"login_attempt:dave"}


def test_subject_or_all_is_required(locked: Any) -> None:
    with pytest.raises(ConfigError, match="subject=USER_EMAIL_OR_IP or all=true"):
        login_lockouts("cache")


def test_lockout_table_rows_go_too(db: Db, redis_server: Any) -> None:
    server = redis_server()
    with server.client() as r:
        r.set("login_attempt:alice", 5)
    with db.admin() as conn:
        conn.execute('CREATE TABLE "Lockout" ("userId" text, "until" timestamptz)')
        conn.execute("""INSERT INTO "Lockout" VALUES ('alice', now()), ('alice', now()),
                        ('bob', now()), ('alice''; DROP TABLE "Lockout"; --', now())""")
    db.write_config(
        f'[redis.cache]\nurl = "{server.url}"\n[redis.cache.lockout_table]\n'
        'postgres = "main"\ntable = "Lockout"\ncolumn = "userId"\n'
    )
    plan = login_lockouts("cache", params={"subject": "alice"})
    assert [f.observed for f in plan.findings] == [1, 2]
    report = clear(subject="alice")
    assert report.status is RunStatus.fixed
    assert [a.detail for a in report.actions] == ["removed 1", "removed 2"]
    with db.admin() as conn:
        rows = [r[0] for r in conn.execute('SELECT "userId" FROM "Lockout" ORDER BY 1')]
    assert rows == ['alice\'; DROP TABLE "Lockout"; --', "bob"]


def test_lockout_table_must_name_a_postgres_target(inventory: Any) -> None:
    inventory(
        '[redis.cache]\nurl = "redis://127.0.0.1:1/0"\n[redis.cache.lockout_table]\n'
        'postgres = "nope"\ntable = "Lockout"\ncolumn = "userId"\n'
    )
    with pytest.raises(ConfigError, match="not a \\[postgres"):
        login_lockouts("cache", params={"subject": "alice"})


@pytest.mark.parametrize("server_zone", ["UTC", "Europe/Berlin", "America/New_York"])
@pytest.mark.parametrize("column_type", ["timestamp(3)", "timestamptz(3)"])
def test_only_lockouts_still_in_force_count_whatever_the_time_zone(
    db: Db, redis_server: Any, server_zone: str, column_type: str
) -> None:
    server = redis_server()
    now = datetime.now(UTC)
    now = now.replace(microsecond=now.microsecond // 1000 * 1000)  # timestamp(3): ms

    def until(minutes: int) -> datetime:
        moment = now + timedelta(minutes=minutes)
        return moment if column_type.startswith("timestamptz") else moment.replace(tzinfo=None)

    with db.admin() as conn:
        # Prisma's Lockout: DateTime is timestamp(3) holding UTC.
        conn.execute(f'CREATE TABLE "Lockout" ("userId" text, "lockedUntil" {column_type})')
        conn.execute(
            """INSERT INTO "Lockout" VALUES ('alice', %s), ('alice', %s), ('bob', %s)""",
            [until(30), until(-30), until(30)],
        )
        conn.execute(
            sql.SQL("ALTER DATABASE {} SET timezone = {}").format(
                sql.Identifier(db.name), sql.Literal(server_zone)
            )
        )
    db.write_config(
        f'[redis.cache]\nurl = "{server.url}"\n[redis.cache.lockout_table]\n'
        'postgres = "main"\ntable = "Lockout"\ncolumn = "userId"\n'
        'expires_column = "lockedUntil"\n'
    )
    plan = login_lockouts("cache", params={"subject": "alice"})
    assert [f.observed for f in plan.findings] == [0, 1]  # the expired one is no lockout

    report = clear(subject="alice")
    assert report.status is RunStatus.fixed
    assert [a.detail for a in report.actions] == ["removed 1"]
    with db.admin() as conn:
        left = conn.execute('SELECT "userId", "lockedUntil" FROM "Lockout" ORDER BY 1').fetchall()
    assert left == [("alice", until(-30)), ("bob", until(30))]
