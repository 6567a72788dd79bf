"""Diagnosis during the incident it exists for: each runbook's read-only checks against a real
degraded server, a Redis at maxmemory with noeviction (every write and every transaction
refused) and a PostgreSQL that refuses writes, with the findings asserted."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis
from bullmq import Queue
from psycopg import sql

from deployments.localpg import LocalPostgres
from flows.login_lockouts import login_lockouts
from flows.postgres_connections import postgres_connections
from flows.postgres_down import postgres_down
from flows.postgres_maintenance import postgres_maintenance
from flows.pre_change_backup import pre_change_backup
from flows.queue_backlog import queue_backlog
from flows.redis_health import redis_health
from flows.restore_drill import restore_drill
from flows.stuck_jobs import stuck_jobs
from tasks.models import ActionStatus, RunStatus, Severity
from tests.conftest import APP_ROLE, Db
from tests.test_postgres_down import config as pg_down_config

pytestmark = pytest.mark.usefixtures("prefect_api")


def fill_until_full(url: str, queue: str) -> int:
    """Add BullMQ jobs until Redis refuses the next one with OOM; the number of jobs added."""

    async def go() -> int:
        q = Queue(queue, {"connection": url})
        job = {"i": 0, "body": "x" * 200}
        try:
            while True:  # batches while there is room, then one job at a time to the brim
                try:
                    await q.addBulk([{"name": "send", "data": job}] * 100)
                except redis.OutOfMemoryError:
                    break
            added: int = (await q.getJobCounts("waiting"))["waiting"]
            while True:
                try:
                    await q.add("send", job)
                except redis.OutOfMemoryError:
                    return added
                added += 1
        finally:
            await q.close()

    return asyncio.run(go())


@pytest.fixture
def full_redis(redis_server: Any, inventory: Any) -> tuple[Any, int]:
    """A queue Redis at maxmemory with noeviction, full of real BullMQ jobs, with two lockout
    keys of alice and one of bob written while there was room."""
    server = redis_server(maxmemory="3mb", policy="noeviction")
    with server.client() as r:
        r.set("login_attempt:alice", 5)
        r.set("login_attempt:alice:10.0.0.1", 5)
        r.set("login_attempt:bob", 5)
    jobs = fill_until_full(server.url, "emails")
    with server.client() as r:
        # Closing BullMQ's connections freed their buffers: bring the limit down by as much,
        # so the server stays over it.
        r.config_set("maxmemory", int(r.info("memory")["used_memory"]) - 64 * 1024)
        with pytest.raises(redis.OutOfMemoryError):
            r.set("probe", 1)  # the incident: writes are refused
    inventory(f'[redis.jobs]\nurl = "{server.url}"\nrole = "queue"\nqueues = ["emails"]\n')
    return server, jobs


def by_check(report: Any) -> dict[str, Any]:
    return {f.check: f for f in report.findings}


def test_queue_backlog_counts_a_full_redis(full_redis: tuple[Any, int]) -> None:
    _, jobs = full_redis
    assert jobs > 1000
    report = queue_backlog("jobs", params={"sample_seconds": 0.2})
    found = by_check(report)
    assert found["emails.waiting"].observed == jobs
    assert found["emails.active"].observed == 0
    assert found["emails.backlog"].observed == jobs
    assert found["emails.backlog"].severity is Severity.warning
    assert report.status is RunStatus.unhealthy


def test_redis_health_says_a_full_redis_is_out_of_memory(full_redis: tuple[Any, int]) -> None:
    report = redis_health("jobs", params={"sample_seconds": 0.2})
    found = by_check(report)
    assert found["memory"].severity is Severity.critical
    assert found["memory"].observed >= 100
    assert found["maxmemory_policy"].severity is Severity.ok  # noeviction is right for a queue
    assert found["evictions"].observed == 0
    assert report.status is RunStatus.unhealthy


def test_login_lockouts_are_counted_and_cleared_on_a_full_redis(
    full_redis: tuple[Any, int],
) -> None:
    server, _ = full_redis
    plan = login_lockouts("jobs", params={"subject": "alice"})
    assert by_check(plan)["lockout_keys"].observed == 2
    # UNLINK frees memory, so a full Redis allows it: the lockouts can be cleared there too.
    report = login_lockouts("jobs", dry_run=False, approval="auto", params={"subject": "alice"})
    assert report.actions[0].status is ActionStatus.done
    assert report.status is RunStatus.fixed
    with server.client() as r:
        assert sorted(r.scan_iter(match="login_attempt:*")) == ["login_attempt:bob"]


# --- PostgreSQL that refuses writes ----------------------------------------------------------


def make_incidents(dsn: str) -> None:
    """Two jobs stuck 'running' for hours (ids 1 and 2) beside a fresh one and a pending one,
    and a table with half its tuples dead."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE job (id int PRIMARY KEY, status text, startedat timestamptz)")
        conn.execute(
            "INSERT INTO job VALUES (1, 'running', now() - interval '2 hours'), "
            "(2, 'running', now() - interval '3 hours'), (3, 'running', now()), "
            "(4, 'pending', NULL)"
        )
        conn.execute(
            "CREATE TABLE event (id int PRIMARY KEY, payload text) "
            "WITH (autovacuum_enabled = false)"
        )
        conn.execute("INSERT INTO event SELECT g, 'x' FROM generate_series(1, 20000) g")
        conn.execute("DELETE FROM event WHERE id % 2 = 0")
        conn.execute(f"GRANT SELECT ON job, event TO {APP_ROLE}")
        conn.execute("SELECT pg_stat_force_next_flush()")  # counted before this returns


def refuses_writes(dsn: str) -> None:
    with (
        psycopg.connect(dsn, autocommit=True) as conn,
        pytest.raises(psycopg.errors.ReadOnlySqlTransaction),
    ):
        conn.execute("INSERT INTO job VALUES (5, 'pending', NULL)")


def idle_in_transaction(dsn: str, n: int) -> list[psycopg.Connection[Any]]:
    sessions = []
    for _ in range(n):
        conn = psycopg.connect(dsn, application_name="web")
        conn.execute("SELECT count(*) FROM job")  # opens the transaction and leaves it open
        sessions.append(conn)
    threading.Event().wait(1.5)  # past the 1 s threshold the runbook is given
    return sessions


def assert_read_only_diagnosis(idle_pids: set[int], refusal: str, standby: bool) -> None:
    """What each PostgreSQL runbook finds on the server in the inventory as [postgres.main],
    with make_incidents' data and the given sessions idle in transaction: the same as on a
    primary that takes writes, and the changes it refuses skipped, saying why."""
    connections = postgres_connections("main", params={"idle_in_transaction_seconds": 1})
    idle = [f for f in connections.findings if f.check == "idle_in_transaction"]
    assert {f.severity for f in idle} == {Severity.warning} and len(idle) == len(idle_pids)
    assert {a.args.pid for a in connections.actions} == idle_pids
    assert connections.status is RunStatus.unhealthy

    jobs = stuck_jobs("main", dry_run=False, approval="auto")
    assert by_check(jobs)["stuck_jobs"].observed == 2
    assert "ids 2, 1" in by_check(jobs)["stuck_jobs"].message  # oldest first
    assert jobs.actions[0].status is ActionStatus.skipped
    assert jobs.actions[0].detail.startswith(f"the server refuses writes: {refusal}")
    assert jobs.status is RunStatus.unhealthy

    down = postgres_down("main")
    assert by_check(down)["reachable"].observed is True and down.status is RunStatus.healthy

    maintenance = postgres_maintenance("main")
    found = by_check(maintenance)
    assert {t["table"] for t in found["table_sizes"].observed} == {"public.job", "public.event"}
    assert found["top_queries_total"].severity is Severity.ok
    if standby:  # its dead-tuple counts are its own: it says so instead of "no bloat"
        assert found["recovery"].severity is Severity.warning
        assert maintenance.actions == [] and maintenance.status is RunStatus.unhealthy
    else:  # counted where they are made: the bloated table is found
        assert "recovery" not in found
        assert found["dead_tuples"].severity is Severity.warning
        assert found["dead_tuples"].message.startswith("public.event: 10000 dead")


@pytest.fixture
def read_only(db: Db) -> Iterator[Db]:
    make_incidents(db.dsn)
    with db.admin() as conn:
        conn.execute(
            sql.SQL("ALTER DATABASE {} SET default_transaction_read_only = on").format(
                sql.Identifier(db.name)
            )
        )
    refuses_writes(db.dsn)
    db.write_config('[postgres.main.jobs]\ntable = "job"\n')
    yield db


def test_postgres_diagnosis_on_a_read_only_database(read_only: Db) -> None:
    sessions = idle_in_transaction(read_only.server.dsn_for(read_only.name, APP_ROLE), 2)
    pids = {conn.info.backend_pid for conn in sessions}
    assert_read_only_diagnosis(pids, "default_transaction_read_only is on", standby=False)
    # Ending sessions is no write: it works on a read-only database too.
    report = postgres_connections(
        "main", dry_run=False, approval="auto", params={"idle_in_transaction_seconds": 1}
    )
    assert report.status is RunStatus.fixed and read_only.alive(list(pids)) == set()
    for conn in sessions:
        conn.close()


def test_lockout_rows_on_a_read_only_database_are_counted_not_deleted(
    read_only: Db, redis_server: Any
) -> None:
    server = redis_server()
    with server.client() as r:
        r.set("login_attempt:alice", 5)
    with read_only.admin() as conn:
        conn.execute("SET default_transaction_read_only = off")  # the app's own data, made
        conn.execute('CREATE TABLE "Lockout" ("userId" text)')
        conn.execute("""INSERT INTO "Lockout" VALUES ('alice'), ('alice'), ('bob')""")
    read_only.write_config(
        f'[redis.cache]\nurl = "{server.url}"\n[redis.cache.lockout_table]\n'
        'postgres = "main"\ntable = "Lockout"\ncolumn = "userId"\n'
    )
    report = login_lockouts("cache", dry_run=False, approval="auto", params={"subject": "alice"})
    assert [f.observed for f in report.findings] == [0, 2]  # the keys went, the rows could not
    keys, rows = report.actions
    assert keys.status is ActionStatus.done and keys.detail == "removed 1"
    assert rows.status is ActionStatus.skipped
    assert "refuses writes: default_transaction_read_only is on" in rows.detail
    assert report.status is RunStatus.unhealthy


def test_backup_runbooks_read_a_read_only_database(read_only: Db, tmp_path: Path) -> None:
    folder = tmp_path / "dumps"
    folder.mkdir()
    read_only.write_config(
        f'[postgres.scratch]\ndsn = "{read_only.server.dsn_for("postgres")}"\n'
        f'[backups.app]\ndirectory = "{folder}"\ndatabase = "main"\nscratch = "scratch"\n'
        'checks = ["SELECT count(*) = 10000 FROM event"]\n'
    )
    dump = pre_change_backup("app", dry_run=False, approval="auto")
    assert dump.status is RunStatus.healthy, dump.findings
    assert [p.suffix for p in sorted(folder.iterdir())] == [".dump", ".sha256"]
    drill = restore_drill("app", dry_run=False, approval="auto")
    found = by_check(drill)
    assert drill.status is RunStatus.healthy, drill.findings
    assert found["check-1"].observed is True
    assert found["tables"].observed == found["tables"].threshold == 2


def basebackup(primary: LocalPostgres, replica: LocalPostgres) -> None:
    """The replica's data directory made a standby of the primary, as pg_basebackup -R does."""
    subprocess.run(
        [
            *replica._as,
            str(replica.bindir / "pg_basebackup"),
            f"--dbname={primary.dsn}",
            f"--pgdata={replica.data}",
            "--write-recovery-conf",
            "--checkpoint=fast",
            "--no-sync",
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )


@pytest.fixture
def standby(inventory: Any) -> Iterator[tuple[LocalPostgres, LocalPostgres]]:
    """A primary with the incidents, and a hot standby of it made by pg_basebackup -R: in
    recovery, every write refused. The inventory's [postgres.main] is the standby."""
    primary = LocalPostgres().start()
    replica = LocalPostgres()
    try:
        with psycopg.connect(primary.dsn, autocommit=True) as conn:
            conn.execute(f"CREATE ROLE {APP_ROLE} LOGIN")
        primary.create_database("app")
        make_incidents(primary.dsn_for("app"))
        basebackup(primary, replica)
        replica.start()
        with psycopg.connect(replica.dsn_for("app")) as conn:
            assert conn.execute("SELECT pg_is_in_recovery()").fetchone() == (True,)
        refuses_writes(replica.dsn_for("app"))
        inventory(
            f'[postgres.main]\ndsn = "{replica.dsn_for("app")}"\n'
            '[postgres.main.jobs]\ntable = "job"\n'
        )
        yield primary, replica
    finally:
        replica.stop()
        primary.stop()


def test_postgres_diagnosis_on_a_hot_standby(standby: tuple[LocalPostgres, LocalPostgres]) -> None:
    _, replica = standby
    sessions = idle_in_transaction(replica.dsn_for("app", APP_ROLE), 2)
    pids = {conn.info.backend_pid for conn in sessions}
    assert_read_only_diagnosis(pids, "it is a standby in recovery", standby=True)
    for conn in sessions:
        conn.close()


def test_postgres_down_does_not_restart_a_server_that_is_recovering(inventory: Any) -> None:
    # A standby with hot_standby off: up and replaying WAL, refusing every connection with
    # "the database system is not accepting connections", as a server in crash recovery does.
    primary = LocalPostgres().start()
    replica = LocalPostgres()
    try:
        basebackup(primary, replica)
        with (replica.data / "postgresql.auto.conf").open("a") as conf:
            conf.write("hot_standby = off\n")
        replica.start()
        started = (replica.data / "postmaster.pid").read_text().split()[0]
        inventory(pg_down_config(replica))
        report = postgres_down("main", dry_run=False, approval="auto")
        found = by_check(report)
        assert found["reachable"].severity is Severity.critical
        assert "not accepting connections" in found["reachable"].message
        assert "not restarted" in found["reachable"].message
        assert found["service"].severity is Severity.ok and found["service"].observed == "running"
        assert report.actions == [] and report.status is RunStatus.unhealthy
        assert (replica.data / "postmaster.pid").read_text().split()[0] == started
    finally:
        replica.stop()
        primary.stop()


# --- a full disk -----------------------------------------------------------------------------


@pytest.fixture
def full_disk(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A 64 MiB filesystem (tmpfs) that is the temp directory: a PostgreSQL is put on it by
    the test, then it is filled to the last byte."""
    mount = Path(tempfile.mkdtemp(prefix="runbook-disk-"))  # outside pytest's 0700 tmp_path
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mount)], check=True)
    monkeypatch.setattr(tempfile, "tempdir", str(mount))
    monkeypatch.setenv("TMPDIR", str(mount))
    try:
        yield mount
    finally:
        subprocess.run(["umount", "--lazy", str(mount)], check=False)
        mount.rmdir()


def fill_disk(mount: Path) -> None:
    with (mount / "filler").open("wb") as out, pytest.raises(OSError, match="No space left"):
        while True:
            out.write(b"\0" * 2**20)
            out.flush()


def test_postgres_down_reads_status_and_logs_on_a_full_disk(
    full_disk: Path, inventory: Any
) -> None:
    victim = LocalPostgres().start()
    try:
        assert victim.dir.is_relative_to(full_disk)
        inventory(pg_down_config(victim))
        victim.stop(remove=False)
        fill_disk(full_disk)
        assert shutil.disk_usage(full_disk).free < 2**16
        plan = postgres_down("main")
    finally:
        victim.stop()
    found = by_check(plan)
    assert found["reachable"].severity is Severity.critical
    assert found["disk"].severity is Severity.critical and found["disk"].observed >= 99.9
    # The status and logs commands' output needs no disk space on the way to the report.
    assert found["service"].observed == "stopped"
    assert "no server running" in found["service"].message
    assert any("database system is shut down" in line for line in found["logs"].observed)
    assert plan.actions[0].status is ActionStatus.planned
