"""Storm control shared in PostgreSQL ([receiver] state_dsn): two `runbook receiver` processes
start one run per alert episode between them, a store that goes away answers 503 and loses
nothing, and a wrong DSN is a clear error that prints no password."""

from __future__ import annotations

import signal
import subprocess
import threading
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from pydantic import SecretStr

from deployments.alert_routes import Alert, Dispatch
from deployments.alert_store import PostgresAlertStore
from deployments.localpg import LocalPostgres, free_port
from tasks.errors import ConfigError
from tasks.wait import poll
from tests.conftest import Db
from tests.test_receiver import (
    RUNBOOK_CLI,
    TOKEN,
    am_alert,
    am_payload,
    answering,
    auth,
    cli_env,
    receiver_config,
    receiver_exits,
)

PASSWORD = "pw-of-the-store-9f3c2a"
STORE_ROLE = "receiver"


@pytest.fixture(scope="module")
def pw_pg() -> Iterator[LocalPostgres]:
    """A PostgreSQL of this module's own, stopped and started by its tests, where the role
    `receiver` logs in over TCP with PASSWORD (scram-sha-256); postgres stays trusted."""
    server = LocalPostgres().start()
    with psycopg.connect(server.dsn, autocommit=True) as conn:
        conn.execute(f"CREATE ROLE {STORE_ROLE} LOGIN PASSWORD '{PASSWORD}'")
    hba = server.data / "pg_hba.conf"
    rule = f"host all {STORE_ROLE} 127.0.0.1/32 scram-sha-256\n"
    hba.write_text(rule + hba.read_text())  # first match wins
    subprocess.run(server.ctl_argv("reload"), check=True, capture_output=True, timeout=60)
    yield server
    server.stop()


def store_database(server: LocalPostgres, password: str = PASSWORD) -> str:
    """A fresh database owned by `receiver`; its DSN with the password."""
    name = f"store_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server.dsn, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name} OWNER {STORE_ROLE}")
    return f"postgresql://{STORE_ROLE}:{password}@127.0.0.1:{server.port}/{name}"


def deliveries(dsn: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn, options="-c search_path=runbook_receiver") as conn:
        return conn.execute("SELECT fingerprint, status, outcome FROM deliveries").fetchall()


@contextmanager
def receivers(
    config: Path, prefect_api: str, count: int
) -> Iterator[list[tuple[str, subprocess.Popen[str]]]]:
    """`count` `runbook receiver` processes of one configuration, each on its own port:
    (url, process) each; stopped after, their output in `process.output`."""
    started: list[tuple[str, subprocess.Popen[str]]] = []
    try:
        for _ in range(count):
            port = free_port()
            proc = subprocess.Popen(
                [RUNBOOK_CLI, "receiver", "--listen", f"127.0.0.1:{port}"],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                env=cli_env(prefect_api, config),
            )
            started.append((f"http://127.0.0.1:{port}", proc))
        for url, proc in started:
            assert poll(
                partial(answering, proc, url), what="the receiver to answer", timeout_seconds=90
            ).done
        yield started
    finally:
        for _, proc in started:
            proc.send_signal(signal.SIGTERM)
        for _, proc in started:
            proc.output = proc.communicate(timeout=30)[0]  # type: ignore[attr-defined]


def post(url: str, body: Any) -> httpx.Response:
    return httpx.post(f"{url}/alerts/alertmanager", json=body, headers=auth(), timeout=60)


@pytest.mark.timeout(300)
def test_two_receivers_on_one_database_start_one_run_per_episode_and_share_the_cap(
    db: Db, pg: LocalPostgres, prefect_api: str
) -> None:
    dsn = pg.create_database(f"store_{uuid.uuid4().hex[:12]}")
    db.write_config(receiver_config(dsn, dispatch="trigger", cap=5))
    fingerprints = [f"shared{i:010d}" for i in range(4)]
    firing = am_payload(*(am_alert(f) for f in fingerprints))
    resolved = am_payload(
        *(am_alert(f, status="resolved") for f in fingerprints[:2]), status="resolved"
    )
    per_receiver = 3  # threads posting at once to each receiver
    with receivers(db.config, prefect_api, 2) as started:

        def at_once(payload: dict[str, Any]) -> list[dict[str, Any]]:
            """The payload posted by every thread to both receivers at the same instant."""
            barrier = threading.Barrier(per_receiver * len(started))
            results: list[dict[str, Any]] = []
            lock = threading.Lock()

            def deliver(url: str) -> None:
                barrier.wait()
                response = post(url, payload)
                assert response.status_code == 202, response.text
                with lock:
                    results.extend(response.json()["alerts"])

            threads = [
                threading.Thread(target=deliver, args=(url,))
                for url, _ in started
                for _ in range(per_receiver)
            ]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            return results

        def outcomes(results: list[dict[str, Any]]) -> dict[str, Counter[str]]:
            found: dict[str, Counter[str]] = {}
            for r in results:
                found.setdefault(r["fingerprint"], Counter())[r["outcome"]] += 1
            return found

        deliveries_each = per_receiver * len(started)
        first = outcomes(at_once(firing))  # one run per fingerprint between both receivers
        assert first == {
            f: Counter(started=1, deduplicated=deliveries_each - 1) for f in fingerprints
        }
        again = outcomes(at_once(firing))  # the same episodes: nothing new
        assert again == {f: Counter(deduplicated=deliveries_each) for f in fingerprints}
        closed = outcomes(at_once(resolved))
        assert closed == {f: Counter(resolved=deliveries_each) for f in fingerprints[:2]}
        # New episodes for the two resolved: the cap (5, four spent) lets exactly one start.
        reopened = outcomes(at_once(firing))
        assert sorted(reopened[f]["started"] for f in fingerprints[:2]) == [0, 1]
        for f in fingerprints[:2]:
            expected = (
                Counter(started=1, deduplicated=deliveries_each - 1)
                if reopened[f]["started"]
                else Counter(capped=deliveries_each)
            )
            assert reopened[f] == expected
        for f in fingerprints[2:]:
            assert reopened[f] == Counter(deduplicated=deliveries_each)
    recorded = deliveries(dsn)
    assert len(recorded) == deliveries_each * (4 + 4 + 2 + 4)  # every delivery, once
    assert Counter(outcome for _, _, outcome in recorded)["started"] == 5
    for _, proc in started:
        out = proc.output  # type: ignore[attr-defined]
        assert "alert started" in out or "alert deduplicated" in out, out
        assert TOKEN not in out


@pytest.mark.timeout(300)
def test_a_store_gone_is_a_503_and_the_resend_is_recorded_once(
    db: Db, pw_pg: LocalPostgres, prefect_api: str
) -> None:
    dsn = store_database(pw_pg)
    db.write_config(receiver_config(dsn, dispatch="trigger"))
    decided, undecided = am_alert(), am_alert()
    with receivers(db.config, prefect_api, 1) as running:
        [(url, proc)] = running
        [result] = post(url, am_payload(decided)).json()["alerts"]
        assert result["outcome"] == "started"
        pw_pg.stop(remove=False)
        try:
            response = post(url, am_payload(decided, undecided))
            assert response.status_code == 503, response.text
            assert "alert store is unavailable" in response.json()["detail"]
            for secret in (PASSWORD, dsn, str(pw_pg.port)):
                assert secret not in response.text
            # A receiver starting now: the clear error of an unreachable target, exit 3.
            alone = receiver_exits(prefect_api, db.config, "--listen", f"127.0.0.1:{free_port()}")
            assert alone.returncode == 3, alone.stderr
            assert "the alert store (PostgreSQL 127.0.0.1:" in alone.stderr
            assert "Traceback" not in alone.stderr and PASSWORD not in alone.stdout + alone.stderr
        finally:
            pw_pg.start()
        response = post(url, am_payload(decided, undecided))  # as Alertmanager re-sends
        assert response.status_code == 202, response.text
        assert [r["outcome"] for r in response.json()["alerts"]] == ["deduplicated", "started"]
    out = proc.output  # type: ignore[attr-defined]
    assert "alert store unavailable source=alertmanager" in out
    assert PASSWORD not in out and dsn not in out
    recorded = deliveries(dsn)
    assert Counter(f for f, _, _ in recorded) == {
        decided["fingerprint"]: 2,
        undecided["fingerprint"]: 1,
    }
    assert [o for f, _, o in recorded if f == undecided["fingerprint"]] == ["started"]


def test_a_wrong_password_is_a_clear_error_that_prints_no_password(
    db: Db, pw_pg: LocalPostgres, prefect_api: str
) -> None:
    wrong = "not-the-password-4b1d"
    dsn = store_database(pw_pg, password=wrong)
    db.write_config(receiver_config(dsn))
    proc = receiver_exits(prefect_api, db.config, "--listen", f"127.0.0.1:{free_port()}")
    assert proc.returncode == 3, proc.stderr
    assert "receiver.state_dsn (127.0.0.1:" in proc.stderr
    assert "refused the login" in proc.stderr and "password authentication failed" in proc.stderr
    assert "Traceback" not in proc.stderr
    for secret in (wrong, PASSWORD):
        assert secret not in proc.stdout + proc.stderr


def test_state_file_and_state_dsn_together_exit_2(db: Db, tmp_path: Path) -> None:
    dsn = f"postgresql://{STORE_ROLE}:{PASSWORD}@127.0.0.1:1/store"
    db.write_config(receiver_config(tmp_path / "alerts.sqlite", receiver=f'state_dsn = "{dsn}"\n'))
    proc = receiver_exits("http://127.0.0.1:1/api", db.config)
    assert proc.returncode == 2, proc.stderr
    assert "set either receiver.state_file" in proc.stderr and "not both" in proc.stderr
    assert "Traceback" not in proc.stderr and PASSWORD not in proc.stdout + proc.stderr


def test_a_role_that_may_not_create_the_schema_is_told_the_grant(
    db: Db, role: Any, pg: LocalPostgres
) -> None:
    weak = role()  # may connect, may not create a schema in the database
    dsn = SecretStr(pg.dsn_for(db.name, weak))
    with pytest.raises(ConfigError) as raised:
        PostgresAlertStore(dsn, window_seconds=600, max_runs_per_hour=20)
    message = str(raised.value)
    assert f"GRANT CREATE ON DATABASE {db.name} TO {weak}" in message
    assert f"CREATE SCHEMA runbook_receiver AUTHORIZATION {weak}" in message
    # Done as told, the same role opens the store.
    with db.admin() as conn:
        conn.execute(f"CREATE SCHEMA runbook_receiver AUTHORIZATION {weak}")
    PostgresAlertStore(dsn, window_seconds=600, max_runs_per_hour=20).close()


def test_a_restarted_server_is_reconnected_to_without_an_error(pw_pg: LocalPostgres) -> None:
    store = PostgresAlertStore(
        SecretStr(store_database(pw_pg)), window_seconds=600, max_runs_per_hour=20
    )
    dispatch = Dispatch("postgres-connections", "main", {})
    alert = Alert("generic", "A", "firing", {}, {}, "restarted0000001")
    assert store.record(alert, datetime.now(UTC), dispatch=dispatch).outcome.value == "started"
    pw_pg.stop(remove=False)
    pw_pg.start()
    # This thread's connection died with the server: a new one, and the same memory.
    again = store.record(alert, datetime.now(UTC), dispatch=dispatch)
    assert again.outcome.value == "deduplicated"
    store.close()


def test_a_store_error_other_than_unreachable_is_a_503_with_one_line_and_no_traceback(
    db: Db, pw_pg: LocalPostgres, prefect_api: str
) -> None:
    # E.g. a privilege revoked (or a read-only standby after a failover, a table dropped):
    # the transaction rolled back, Alertmanager sends it again.
    dsn = store_database(pw_pg)
    admin = pw_pg.dsn_for(dsn.rsplit("/", 1)[1])
    db.write_config(receiver_config(dsn, dispatch="trigger"))
    refused = am_alert()
    with receivers(db.config, prefect_api, 1) as running:
        [(url, proc)] = running
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f"REVOKE ALL ON ALL TABLES IN SCHEMA runbook_receiver FROM {STORE_ROLE}")
        response = post(url, am_payload(refused))
        assert response.status_code == 503, response.text
        assert response.headers["Retry-After"] == "10"
        assert "alert store is unavailable" in response.json()["detail"]
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f"GRANT ALL ON ALL TABLES IN SCHEMA runbook_receiver TO {STORE_ROLE}")
        response = post(url, am_payload(refused))  # as Alertmanager re-sends
        assert response.status_code == 202, response.text
        assert [r["outcome"] for r in response.json()["alerts"]] == ["started"]
    out = proc.output  # type: ignore[attr-defined]
    [line] = [line for line in out.splitlines() if "alert store failed" in line]
    assert "source=alertmanager" in line and "permission denied" in line
    assert "Traceback" not in out
    assert PASSWORD not in out and dsn not in out


def test_the_store_connects_with_keepalives_and_an_idle_in_transaction_timeout(
    pw_pg: LocalPostgres,
) -> None:
    # A network partition while holding the writer lock: the client gives up within about
    # 30 s (keepalives, tcp_user_timeout), the server ends the orphaned transaction and its
    # lock (idle_in_transaction_session_timeout).
    store = PostgresAlertStore(
        SecretStr(store_database(pw_pg)), window_seconds=600, max_runs_per_hour=20
    )
    conn = store._connect()
    try:
        parameters = conn.info.get_parameters()
        assert {k: parameters.get(k) for k in KEEPALIVES} == KEEPALIVES
        shown = conn.execute("SHOW idle_in_transaction_session_timeout").fetchone()
        assert shown == ("30s",)
    finally:
        conn.close()
        store.close()


KEEPALIVES = {
    "keepalives": "1",
    "keepalives_idle": "10",
    "keepalives_interval": "5",
    "keepalives_count": "3",
    "tcp_user_timeout": "30000",
}
