"""postgres-connections against a real server: the incidents are real sessions."""

from __future__ import annotations

import subprocess
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest
from pydantic import SecretStr

from deployments.localpg import stop_process
from flows.postgres_connections import postgres_connections
from tasks.dumps import libpq_env
from tasks.errors import AuthenticationFailed, ConfigError, TargetUnreachable
from tasks.models import ActionStatus, RunStatus, Severity
from tasks.postgres import connect
from tasks.settings import PostgresTarget
from tasks.wait import poll
from tests.conftest import Db

pytestmark = pytest.mark.usefixtures("prefect_api")
FAST = {"idle_in_transaction_seconds": 1, "long_query_seconds": 1, "cancel_grace_seconds": 2}


def run(dry_run: bool = False, **params: Any) -> Any:
    return postgres_connections("main", dry_run=dry_run, approval="auto", params={**FAST, **params})


def wait_past_threshold() -> None:
    threading.Event().wait(1.5)


def test_idle_in_transaction_dry_run_then_apply(db: Db) -> None:
    pids = db.idle_in_transaction(3)
    wait_past_threshold()

    report = run(dry_run=True)
    assert report.status is RunStatus.unhealthy and report.dry_run
    idle = [f for f in report.findings if f.check == "idle_in_transaction"]
    assert {f.severity for f in idle} == {Severity.warning} and len(idle) == 3
    assert all(a.status is ActionStatus.planned for a in report.actions)
    assert db.alive(pids) == set(pids)  # a dry run touches nothing

    report = run()
    assert report.status is RunStatus.fixed, report.findings
    assert [a.status for a in report.actions] == [ActionStatus.done] * 3
    assert db.alive(pids) == set()
    assert {f.check: f.severity for f in report.findings}["idle_in_transaction"] is Severity.ok
    # A second run finds nothing left to do.
    assert run().status is RunStatus.healthy


def test_leaves_superusers_and_unlisted_applications_alone(db: Db) -> None:
    db.write_config('allow_applications = ["worker"]\n')
    worker = db.idle_in_transaction(1, application_name="worker")
    web = db.idle_in_transaction(1, application_name="web")
    root = db.idle_in_transaction(1, user="postgres")
    wait_past_threshold()

    report = run()
    assert db.alive(worker + web + root) == set(web + root)
    assert report.status is RunStatus.unhealthy  # what it may not touch is still reported
    left = [f.message for f in report.findings if "left alone" in f.message]
    assert len(left) == 2
    assert any("superuser" in m for m in left) and any("allow_applications" in m for m in left)


def test_cap_on_backends_ended(db: Db) -> None:
    pids = db.idle_in_transaction(3)
    wait_past_threshold()
    report = run(max_backends_ended=2)
    assert len(db.alive(pids)) == 1
    assert [a.status for a in report.actions].count(ActionStatus.skipped) == 1
    assert report.status is RunStatus.unhealthy


def in_thread(conn: psycopg.Connection[Any], query: str) -> tuple[threading.Thread, list[Any]]:
    outcome: list[Any] = []

    def work() -> None:
        try:
            conn.execute(query)
            outcome.append("finished")
        except psycopg.Error as exc:
            outcome.append(exc)

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    return thread, outcome


def test_long_query_is_cancelled(db: Db) -> None:
    conn = db.session(autocommit=True)
    thread, outcome = in_thread(conn, "SELECT pg_sleep(60)")
    wait_past_threshold()
    report = run()
    thread.join(10)
    assert isinstance(outcome[0], psycopg.errors.QueryCanceled)
    assert report.status is RunStatus.fixed
    assert report.actions[0].detail == "cancelled"
    assert not conn.closed  # cancelled, not terminated
    conn.execute("SELECT 1")


def test_query_that_ignores_cancel_is_terminated_after_the_grace_period(db: Db) -> None:
    with db.admin() as admin:
        # Swallows every cancel, as some application code does: only a terminate ends it.
        admin.execute("""
            CREATE FUNCTION stubborn() RETURNS void LANGUAGE plpgsql AS $$
            BEGIN LOOP BEGIN PERFORM pg_sleep(60);
            EXCEPTION WHEN query_canceled THEN NULL; END; END LOOP; END $$""")
    conn = db.session(autocommit=True)
    pid = conn.info.backend_pid
    thread, outcome = in_thread(conn, "SELECT stubborn()")
    wait_past_threshold()
    report = run()
    thread.join(10)
    assert isinstance(outcome[0], psycopg.OperationalError)
    assert db.alive([pid]) == set()
    assert report.status is RunStatus.fixed
    assert report.actions[0].detail.startswith("cancel ignored for 2 s; terminated")


def test_lock_blocker_is_ended_and_the_waiter_goes_on(db: Db) -> None:
    with db.admin() as admin:
        admin.execute("CREATE TABLE account (id int PRIMARY KEY, balance int)")
        admin.execute("INSERT INTO account VALUES (1, 100)")
        admin.execute("GRANT ALL ON account TO app")
    holder = db.session()
    holder.execute("UPDATE account SET balance = 0 WHERE id = 1")  # and never commits
    waiter = db.session(autocommit=True)
    thread, outcome = in_thread(waiter, "UPDATE account SET balance = 50 WHERE id = 1")
    wait_past_threshold()

    before = run(dry_run=True, long_query_seconds=3600)
    blocked = [f for f in before.findings if f.check == "blocked"]
    assert len(blocked) == 1 and blocked[0].observed == [holder.info.backend_pid]

    report = run(long_query_seconds=3600)
    thread.join(10)
    assert outcome == ["finished"]
    assert report.status is RunStatus.fixed
    assert {f.check: f.severity for f in report.findings}["blocked"] is Severity.ok
    with db.admin() as admin:
        assert admin.execute("SELECT balance FROM account").fetchone() == (50,)


def test_refused_connection_is_a_clear_error(db: Db) -> None:
    db.config.write_text('[postgres.main]\ndsn = "postgresql://app:hunter2@127.0.0.1:1/app"\n')
    with pytest.raises(TargetUnreachable) as caught:
        run()
    assert "127.0.0.1:1/app" in str(caught.value) and "hunter2" not in str(caught.value)
    assert caught.value.transient


def test_a_dsn_libpq_cannot_parse_is_a_config_error_naming_its_key() -> None:
    # Settings refuse it at load; a target built in code without validation still gets a
    # ConfigError, not psycopg's ProgrammingError (whose message quotes the DSN).
    target = PostgresTarget.model_construct(dsn=SecretStr("password=s3cret-pw bogus=1"))
    for call in (lambda: connect("main", target).__enter__(), lambda: libpq_env("main", target)):
        with pytest.raises(ConfigError) as caught:
            call()
        assert "postgres.main.dsn: not a PostgreSQL connection string" in str(caught.value)
        assert "s3cret-pw" not in str(caught.value)


@pytest.mark.parametrize(
    "dsn_of",
    [lambda db: db.server.dsn_for(db.name, "nobody"), lambda db: db.server.dsn_for("nosuchdb")],
)
def test_refused_credentials_are_their_own_error(db: Db, dsn_of: Callable[[Db], str]) -> None:
    db.config.write_text(f'[postgres.main]\ndsn = "{dsn_of(db)}"\n')
    with pytest.raises(AuthenticationFailed, match="check the credentials and database name"):
        run()


def test_replication_connection_of_pg_receivewal_is_not_a_long_query(
    db: Db, role: Callable[[str], str], tmp_path: Path
) -> None:
    replicator = role("REPLICATION")
    wal = tmp_path / "wal"
    wal.mkdir()
    argv = [str(db.server.bindir / "pg_receivewal"), "-h", "127.0.0.1", "-p", str(db.server.port)]
    log = tmp_path / "pg_receivewal.log"
    with log.open("wb") as stderr:
        receiver = subprocess.Popen(
            [*argv, "-U", replicator, "-D", str(wal), "--no-password"], stderr=stderr
        )
    try:

        def walsender() -> list[int]:
            with db.admin() as conn:
                rows = conn.execute(
                    "SELECT pid FROM pg_stat_activity WHERE backend_type = 'walsender' "
                    "AND usename = %s AND state = 'active'",
                    [replicator],
                ).fetchall()
            return [r[0] for r in rows]

        assert poll(lambda: bool(walsender()), what="a walsender", timeout_seconds=30).done, (
            log.read_text()
        )
        sender = walsender()
        wait_past_threshold()  # streaming for longer than long_query_seconds

        report = run()
        assert report.status is RunStatus.healthy, report.findings
        assert report.actions == []
        found = {f.check: f for f in report.findings}
        assert found["long_query"].severity is Severity.ok
        assert found["other_backends"].observed["walsender"] == 1
        assert "replication: pg_receivewal" in found["other_backends"].message
        assert db.alive(sender) == set(sender) and receiver.poll() is None
    finally:
        stop_process(receiver)


def test_idle_in_aborted_transaction_is_ended_like_idle_in_transaction(db: Db) -> None:
    conn = db.session()
    with pytest.raises(psycopg.errors.DivisionByZero):
        conn.execute("SELECT 1 / 0")  # the transaction stays open, aborted
    pid = conn.info.backend_pid
    wait_past_threshold()

    plan = run(dry_run=True)
    idle = [f for f in plan.findings if f.check == "idle_in_transaction"]
    assert [f.severity for f in idle] == [Severity.warning] and f"pid {pid}" in idle[0].message
    report = run()
    assert report.status is RunStatus.fixed, report.findings
    assert [(a.kind, a.args.pid, a.status) for a in report.actions] == [
        ("terminate_backend", pid, ActionStatus.done)
    ]
    assert db.alive([pid]) == set()


def test_role_without_pg_read_all_stats_gets_a_warning_naming_the_grant(
    db: Db, role: Callable[[str], str]
) -> None:
    runbook = role("")
    others = db.idle_in_transaction(2)  # role app: hidden from the runbook's role
    own = db.idle_in_transaction(1, user=runbook)
    wait_past_threshold()
    db.config.write_text(f'[postgres.main]\ndsn = "{db.server.dsn_for(db.name, runbook)}"\n')

    report = run()
    found = {f.check: f for f in report.findings}
    assert found["stats_privilege"].severity is Severity.warning
    assert found["stats_privilege"].observed >= 2  # app's sessions, and the server's processes
    assert f"GRANT pg_read_all_stats TO {runbook}" in found["stats_privilege"].message
    # What it may see it still handles: its own role's session is ended, the others are not.
    assert [(a.args.pid, a.status) for a in report.actions] == [(own[0], ActionStatus.done)]
    assert db.alive(own + others) == set(others)
    assert report.status is RunStatus.unhealthy

    with db.admin() as conn:
        conn.execute(f"GRANT pg_read_all_stats TO {runbook}")
    report = run(dry_run=True)
    assert "stats_privilege" not in {f.check for f in report.findings}
    idle = [f for f in report.findings if f.check == "idle_in_transaction"]
    assert len(idle) == 2 and all(f.severity is Severity.warning for f in idle)
