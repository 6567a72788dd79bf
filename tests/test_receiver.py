"""The alert receiver against a real Prefect API and a real PostgreSQL: alerts start tracked runs
that fix real incidents, storm control holds under replays, races and bursts, and nothing
malformed or unauthenticated starts anything."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import closing, suppress
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import SecretStr, ValidationError

from deployments.alert_routes import (
    SETTLE_GRACE,
    Alert,
    AlertmanagerPayload,
    Dispatch,
    fingerprint_of,
)
from deployments.alert_store import (
    KEEP_DELIVERIES,
    PG_LOCK_KEY,
    AlertStore,
    PostgresAlertStore,
    SqliteAlertStore,
    StoreError,
)
from deployments.catalog import RUNBOOKS
from deployments.localpg import LocalPostgres, free_port
from deployments.receiver import ReceiverServer, build_receiver
from tasks.settings import load_settings
from tasks.wait import poll
from tests.alertmanager_helpers import Alertmanager
from tests.conftest import Db, runner_deployment

TOKEN = "s3cret-token-for-tests"
HMAC_SECRET = "another-secret-for-hmac"
RUNBOOK = "postgres-connections"
FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
RUNBOOK_CLI = str(Path(sys.executable).parent / "runbook")

ROUTE = """
[[routes]]
alert = "IdleInTransaction"
matchers = {{ severity = "critical" }}
runbook = "postgres-connections"
target_label = "target"
apply = {apply}
approval = "auto"
set = {{ idle_in_transaction_seconds = 1, max_backends_ended = 50 }}
"""


def receiver_config(
    state: Path | str,
    *,
    apply: bool = False,
    window: int = 600,
    cap: int = 20,
    dispatch: str = "direct",
    port: int = 8787,
    extra: str = "",
    receiver: str = "",
) -> str:
    """state: the SQLite file, or a PostgreSQL DSN (state_dsn); receiver: more [receiver] keys;
    extra: more [[routes]]."""
    store = f'state_dsn = "{state}"' if isinstance(state, str) else f'state_file = "{state}"'
    return (
        f'[receiver]\nlisten = "127.0.0.1:{port}"\ntoken = "{TOKEN}"\n'
        f'hmac_secret = "{HMAC_SECRET}"\n{store}\n'
        f"dedup_window_seconds = {window}\nmax_runs_per_hour = {cap}\n"
        f'dispatch = "{dispatch}"\n' + receiver + ROUTE.format(apply=str(apply).lower()) + extra
    )


def am_payload(*alerts: dict[str, Any], status: str = "firing") -> dict[str, Any]:
    """An Alertmanager webhook (version 4) group, as Alertmanager sends it."""
    return {
        "version": "4",
        "groupKey": '{}:{alertname="IdleInTransaction"}',
        "truncatedAlerts": 0,
        "status": status,
        "receiver": "runbook-receiver",
        "groupLabels": {"alertname": "IdleInTransaction"},
        "commonLabels": {},
        "commonAnnotations": {},
        "externalURL": "http://alertmanager.example:9093",
        "alerts": list(alerts),
    }


def am_alert(
    fingerprint: str | None = None, status: str = "firing", **labels: str
) -> dict[str, Any]:
    return {
        "status": status,
        "labels": {"alertname": "IdleInTransaction", "severity": "critical", "target": "main"}
        | labels,
        "annotations": {"summary": "sessions idle in transaction"},
        "startsAt": "2026-11-23T12:00:00Z",
        "endsAt": "0001-01-01T00:00:00Z",
        "generatorURL": "http://prometheus.example/graph",
        "fingerprint": fingerprint or uuid.uuid4().hex[:16],
    }


def auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKEN}"}


@dataclass
class StoreAt:
    """Where a test's alert store lives: a SQLite file, or a fresh PostgreSQL database."""

    where: Path | str  # the file, or the DSN

    def open(self, window: int = 600, cap: int = 20) -> AlertStore:
        if isinstance(self.where, Path):
            return SqliteAlertStore(self.where, window_seconds=window, max_runs_per_hour=cap)
        return PostgresAlertStore(
            SecretStr(self.where), window_seconds=window, max_runs_per_hour=cap
        )

    def rows(self, query: str) -> list[tuple[Any, ...]]:
        """A query on the store's tables, read back past the store."""
        if isinstance(self.where, Path):
            with closing(sqlite3.connect(self.where)) as db:
                return db.execute(query).fetchall()
        with psycopg.connect(self.where, options="-c search_path=runbook_receiver") as conn:
            return conn.execute(query).fetchall()

    def connections(self) -> int:
        """Connections open on the store: the file's descriptors, or PostgreSQL sessions."""
        if isinstance(self.where, Path):
            return open_files(self.where)
        with psycopg.connect(self.where, autocommit=True) as conn:
            row = conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND application_name = 'runbook-receiver'"
            ).fetchone()
        assert row is not None
        return int(row[0])


def new_store_at(request: pytest.FixtureRequest, tmp_path: Path, kind: str) -> StoreAt:
    if kind == "sqlite":
        return StoreAt(tmp_path / "alerts.sqlite")
    pg: LocalPostgres = request.getfixturevalue("pg")
    return StoreAt(pg.create_database(f"store_{uuid.uuid4().hex[:12]}"))


@pytest.fixture(params=["sqlite", "postgres"])
def store_at(request: pytest.FixtureRequest, tmp_path: Path) -> StoreAt:
    """Each storm-control test runs against both backends."""
    return new_store_at(request, tmp_path, request.param)


# The test session's Prefect server is SQLite: a write lock held by its event recording can
# stall a read for many seconds when the suite is busy.
API_TIMEOUT = 60


def api_post(api: str, path: str, body: dict[str, Any]) -> Any:
    response = httpx.post(f"{api}{path}", json=body, timeout=API_TIMEOUT)
    response.raise_for_status()
    return response.json()


def flow_run(api: str, run_id: str) -> dict[str, Any]:
    response = httpx.get(f"{api}/flow_runs/{run_id}", timeout=API_TIMEOUT)
    response.raise_for_status()
    result: dict[str, Any] = response.json()
    return result


def wait_final(api: str, run_id: str, timeout: float = 90) -> dict[str, Any]:
    assert poll(
        lambda: flow_run(api, run_id)["state_type"] in FINAL,
        what="the run to end",
        timeout_seconds=timeout,
    ).done, run_id
    return flow_run(api, run_id)


def states(api: str, run_id: str) -> list[str]:
    response = httpx.get(
        f"{api}/flow_run_states/", params={"flow_run_id": run_id}, timeout=API_TIMEOUT
    )
    response.raise_for_status()
    return [s["type"] for s in response.json()]


def deployment_runs(api: str, deployment_id: str, since: datetime) -> list[dict[str, Any]]:
    runs: list[dict[str, Any]] = api_post(
        api,
        "/flow_runs/filter",
        {
            "deployments": {"id": {"any_": [deployment_id]}},
            "flow_runs": {"start_time": {"after_": None}},
            "limit": 200,
        },
    )
    return [r for r in runs if datetime.fromisoformat(r["created"]) >= since]


def alert_events(api: str, name: str, fingerprint: str, timeout: float = 30) -> list[Any]:
    """Events of one alert as the Prefect API returns them (persisted in batches)."""
    body = {
        "filter": {
            "occurred": {"since": "2020-01-01T00:00:00Z"},
            "event": {"name": [name]},
            "resource": {"id": [f"runbook.alert.{fingerprint}"]},
        },
        "limit": 50,
    }
    found: list[Any] = []

    def seen() -> bool:
        found[:] = api_post(api, "/events/filter", body)["events"]
        return bool(found)

    poll(seen, what="the events", timeout_seconds=timeout)
    return found


@pytest.fixture
def served_deployment(prefect_api: str) -> str:
    """postgres-connections/main registered on the API, as `runbook serve` registers it
    (not served here: the receiver runs it in this process)."""
    flow = RUNBOOKS[RUNBOOK].load()
    deployment = runner_deployment(flow.to_deployment(name="main", parameters={"target": "main"}))
    return str(deployment.apply())


@pytest.fixture
def make_receiver(
    db: Db, tmp_path: Path, prefect_api: str, served_deployment: str
) -> Iterator[Any]:
    """A receiver for this test's inventory, listening on a free port (stopped after it)."""
    servers: list[ReceiverServer] = []

    def make(
        *, in_process: bool = True, store: StoreAt | None = None, **kwargs: Any
    ) -> ReceiverServer:
        state = store.where if store else tmp_path / f"alerts-{len(servers)}.sqlite"
        db.write_config(receiver_config(state, port=free_port(), **kwargs))
        server = ReceiverServer(build_receiver(load_settings(), in_process=in_process)).start()
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()


def post(url: str, path: str, body: Any, headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.post(
        f"{url}{path}",
        content=json.dumps(body),
        headers=auth() | {"Content-Type": "application/json"} | (headers or {}),
        timeout=60,
    )


# -- the working path ----------------------------------------------------------------------


def test_alert_runs_the_deployment_in_process_and_fixes_the_incident(
    db: Db, prefect_api: str, served_deployment: str, make_receiver: Any
) -> None:
    server = make_receiver(apply=True)
    pids = db.idle_in_transaction(3)
    time.sleep(1.5)  # over the route's idle_in_transaction_seconds = 1
    fingerprint = uuid.uuid4().hex[:16]
    response = post(server.url, "/alerts/alertmanager", am_payload(am_alert(fingerprint)))
    assert response.status_code == 202, response.text
    [result] = response.json()["alerts"]
    assert result["outcome"] == "started" and result["fingerprint"] == fingerprint
    assert (result["runbook"], result["target"]) == (RUNBOOK, "main")

    run = wait_final(prefect_api, result["flow_run_id"])
    assert run["state_type"] == "COMPLETED", run["state"]
    assert run["deployment_id"] == served_deployment and "alert" in run["tags"]
    # Typed all the way: numbers arrive as numbers, not strings.
    sent = run["parameters"].pop("alert")
    assert run["parameters"] == {
        "target": "main",
        "dry_run": False,
        "approval": "auto",
        "params": {"idle_in_transaction_seconds": 1, "max_backends_ended": 50},
    }
    assert (sent["name"], sent["fingerprint"]) == ("IdleInTransaction", fingerprint)
    assert states(prefect_api, result["flow_run_id"]).count("RUNNING") == 1
    assert db.alive(pids) == set()  # the sessions idle in transaction are gone

    [event] = alert_events(prefect_api, "runbook.alert.firing", fingerprint)
    assert event["resource"]["runbook.runbook"] == RUNBOOK
    assert event["resource"]["runbook.target"] == "main"
    assert event["resource"]["prefect.resource.name"] == "IdleInTransaction"
    assert event["payload"]["outcome"] == "started"
    assert event["payload"]["flow_run_id"] == result["flow_run_id"]
    assert event["payload"]["labels"]["severity"] == "critical"
    assert event["payload"]["source"] == "alertmanager"
    [delivery] = server.receiver.store.deliveries(fingerprint=fingerprint)
    assert delivery["outcome"] == "started" and delivery["flow_run_id"] == result["flow_run_id"]


FLEET_ROUTE = """
[[routes]]
alert = "ConnectionsEverywhere"
runbook = "postgres-connections"
selector = "env=prod"

[postgres.second]
dsn = "{dsn}"
labels = {{ env = "prod" }}
[postgres.third]
dsn = "{dsn}"
labels = {{ env = "dev" }}
"""


def test_a_route_with_a_selector_starts_the_runbooks_fleet(
    db: Db, prefect_api: str, make_receiver: Any
) -> None:
    """A route naming a selector starts postgres-connections/fleet (registered as `runbook
    serve` registers it) with that selector, in this process: one child run per selected
    target, each carrying the alert; `main` (no labels) and the dev database are left out."""
    from deployments.fleet import FLEETS

    fleet = FLEETS[RUNBOOK]
    deployment = str(
        runner_deployment(
            fleet.to_deployment(name="fleet", parameters={"selector": "all", "dry_run": True})
        ).apply()
    )
    db.config.write_text("")  # make_receiver writes it whole
    server = make_receiver(extra=FLEET_ROUTE.format(dsn=db.dsn))
    fingerprint = uuid.uuid4().hex[:16]
    alert = am_alert(fingerprint, alertname="ConnectionsEverywhere")
    response = post(server.url, "/alerts/alertmanager", am_payload(alert))
    assert response.status_code == 202, response.text
    [result] = response.json()["alerts"]
    assert (result["outcome"], result["runbook"], result["target"]) == (
        "started",
        RUNBOOK,
        "fleet",
    ), result
    run = wait_final(prefect_api, result["flow_run_id"])
    assert (run["state_type"], run["state_name"]) == ("COMPLETED", "Healthy"), run["state"]
    assert run["deployment_id"] == deployment and run["name"] == "fleet on env=prod"
    assert run["parameters"]["selector"] == "env=prod"
    assert run["parameters"]["alert"]["fingerprint"] == fingerprint
    tasks = api_post(prefect_api, "/task_runs/filter", {"flow_runs": {"id": {"any_": [run["id"]]}}})
    children = api_post(
        prefect_api,
        "/flow_runs/filter",
        {"flow_runs": {"parent_task_run_id": {"any_": [t["id"] for t in tasks]}}},
    )
    assert [c["name"] for c in children] == ["second"]
    assert children[0]["parameters"]["alert"]["fingerprint"] == fingerprint


@pytest.mark.parametrize(
    ("route", "problem"),
    [
        ('selector = "env=prod"\ntarget = "main"', "set one of target, target_label and selector"),
        ('selector = "main"', "selector 'main' names one target: set target instead"),
        ('selector = "env=nowhere"', "routes[0].selector: "),
        ('selector = "main,missing"', "routes[0].selector: "),
    ],
)
def test_a_route_selector_is_checked_when_the_inventory_loads(
    db: Db, route: str, problem: str
) -> None:
    from deployments.config import load_config
    from tasks.errors import ConfigError

    db.write_config(f'[[routes]]\nalert = "A"\nrunbook = "{RUNBOOK}"\n{route}\n')
    with pytest.raises(ConfigError) as raised:
        load_config()
    assert problem in str(raised.value)


# -- storm control -------------------------------------------------------------------------


def test_a_replayed_alert_starts_one_run_within_the_window(
    prefect_api: str, served_deployment: str, make_receiver: Any, store_at: StoreAt
) -> None:
    server = make_receiver(store=store_at)
    since = datetime.now(UTC)
    payload = am_payload(am_alert())
    outcomes = [
        post(server.url, "/alerts/alertmanager", payload).json()["alerts"][0] for _ in range(4)
    ]
    assert [o["outcome"] for o in outcomes] == ["started"] + ["deduplicated"] * 3
    # Every re-send names the run the first one started.
    assert {o["flow_run_id"] for o in outcomes} == {outcomes[0]["flow_run_id"]}
    wait_final(prefect_api, outcomes[0]["flow_run_id"])
    assert [r["id"] for r in deployment_runs(prefect_api, served_deployment, since)] == [
        outcomes[0]["flow_run_id"]
    ]
    assert len(server.receiver.store.deliveries()) == 4


def test_after_the_window_the_same_alert_runs_again(make_receiver: Any, prefect_api: str) -> None:
    server = make_receiver(window=1)
    payload = am_payload(am_alert())
    first = post(server.url, "/alerts/alertmanager", payload).json()["alerts"][0]
    time.sleep(1.2)
    second = post(server.url, "/alerts/alertmanager", payload).json()["alerts"][0]
    assert (first["outcome"], second["outcome"]) == ("started", "started")
    assert first["flow_run_id"] != second["flow_run_id"]
    for result in (first, second):
        wait_final(prefect_api, result["flow_run_id"])


def test_simultaneous_deliveries_of_one_alert_start_one_run(
    prefect_api: str, served_deployment: str, make_receiver: Any, store_at: StoreAt
) -> None:
    server = make_receiver(store=store_at)
    since = datetime.now(UTC)
    payload = am_payload(am_alert())
    barrier = threading.Barrier(8)
    results: list[dict[str, Any]] = []

    def deliver() -> None:
        barrier.wait()
        results.append(post(server.url, "/alerts/alertmanager", payload).json()["alerts"][0])

    threads = [threading.Thread(target=deliver) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert Counter(r["outcome"] for r in results) == {"started": 1, "deduplicated": 7}
    [started] = [r for r in results if r["outcome"] == "started"]
    wait_final(prefect_api, started["flow_run_id"])
    assert len(deployment_runs(prefect_api, served_deployment, since)) == 1


RACER = """
import sys, time
from datetime import UTC, datetime
from pathlib import Path
from pydantic import SecretStr
from deployments.alert_store import PostgresAlertStore, SqliteAlertStore
from deployments.alert_routes import Alert, Dispatch

where = sys.argv[1]
store = (
    PostgresAlertStore(SecretStr(where), window_seconds=600, max_runs_per_hour=20)
    if where.startswith("postgresql://")
    else SqliteAlertStore(Path(where), window_seconds=600, max_runs_per_hour=20)
)
alert = Alert("alertmanager", "IdleInTransaction", "firing", {}, {}, "racefingerprint01")
dispatch = Dispatch("postgres-connections", "main", {})
store.deliveries(fingerprint="none")  # connected ahead: the transactions begin at once
time.sleep(max(0.0, float(sys.argv[2]) - time.time()))
print(store.record(alert, datetime.now(UTC), dispatch=dispatch).outcome.value)
"""


def test_two_processes_recording_one_alert_at_once_start_one_run(store_at: StoreAt) -> None:
    race(store_at)


def test_under_a_serializable_default_two_processes_at_once_start_one_run_without_an_error(
    pg: LocalPostgres,
) -> None:
    # A snapshot taken before the writer lock was granted would miss the winner's row:
    # every transaction of the store is READ COMMITTED, whatever the database's default.
    name = f"store_{uuid.uuid4().hex[:12]}"
    dsn = pg.create_database(name)
    with psycopg.connect(pg.dsn, autocommit=True) as conn:
        conn.execute(f"ALTER DATABASE {name} SET default_transaction_isolation = 'serializable'")
    race(StoreAt(dsn))


def race(store_at: StoreAt) -> None:
    """Four processes record one alert at the same instant: one starts, none fails."""
    store_at.open().close()
    at = str(time.time() + 3)  # every process imports first, then all go at this instant
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", RACER, str(store_at.where), at],
            stdout=subprocess.PIPE,
            text=True,
            cwd=Path(__file__).resolve().parents[1],
        )
        for _ in range(4)
    ]
    outcomes = [p.communicate(timeout=60)[0].strip() for p in procs]
    assert sorted(outcomes) == ["deduplicated"] * 3 + ["started"]
    opened = store_at.open()
    assert len(opened.deliveries(fingerprint="racefingerprint01")) == 4
    opened.close()


def test_the_record_forgets_what_is_older_than_30_days(store_at: StoreAt) -> None:
    at, store = store_at, store_at.open()
    dispatch = Dispatch("postgres-connections", "main", {})
    now = datetime.now(UTC)
    for fingerprint, when in (("old", now - KEEP_DELIVERIES - timedelta(hours=1)), ("new", now)):
        alert = Alert("generic", "A", "firing", {}, {}, fingerprint)
        assert store.record(alert, when, dispatch=dispatch).outcome.value == "started"
    store.close()
    store = at.open()  # prunes on opening
    assert [d["fingerprint"] for d in store.deliveries()] == ["new"]
    assert at.rows("SELECT fingerprint FROM alerts") == [("new",)]
    assert at.rows("SELECT fingerprint FROM runs") == [("new",)]
    store.close()


def test_late_bookkeeping_of_an_earlier_episode_leaves_the_newer_one_alone(
    store_at: StoreAt,
) -> None:
    at, store = store_at, store_at.open()
    dispatch = Dispatch("postgres-connections", "main", {})
    firing = Alert("alertmanager", "A", "firing", {}, {}, "episodes00000001")
    resolved = Alert("alertmanager", "A", "resolved", {}, {}, "episodes00000001")
    now = datetime.now(UTC)
    first = store.record(firing, now, dispatch=dispatch)
    store.record(resolved, now + timedelta(seconds=1))
    second = store.record(firing, now + timedelta(seconds=2), dispatch=dispatch)
    assert (first.outcome.value, second.outcome.value) == ("started", "started")
    store.started(second, firing.fingerprint, "run-of-the-second-episode")
    # The first episode's start is settled only now, both ways: neither may touch the second.
    store.not_started(first, firing.fingerprint, "could not start")
    store.started(first, firing.fingerprint, "run-of-the-first-episode")
    assert at.rows("SELECT started_at, flow_run_id FROM alerts") == [
        (second.started_at, "run-of-the-second-episode")
    ]
    again = store.record(firing, now + timedelta(seconds=3), dispatch=dispatch)
    assert again.outcome.value == "deduplicated"
    assert again.flow_run_id == "run-of-the-second-episode"
    store.close()


def open_files(path: Path) -> int:
    fds = Path("/proc/self/fd")
    found = 0
    for fd in fds.iterdir():
        with suppress(OSError):
            found += os.readlink(fd) == str(path)
    return found


def test_connections_stay_bounded_as_recording_threads_come_and_go(store_at: StoreAt) -> None:
    # The receiver records from anyio's worker threads, which exit when idle: the store must
    # not keep a connection for each thread that ever recorded.
    at, store = store_at, store_at.open()
    dispatch = Dispatch("postgres-connections", "main", {})

    def record(i: int) -> None:
        alert = Alert("generic", "A", "firing", {}, {}, f"thread{i:010d}")
        store.record(alert, datetime.now(UTC), dispatch=dispatch)

    for i in range(6):  # one short-lived thread after another, and then two at once
        thread = threading.Thread(target=record, args=(i,))
        thread.start()
        thread.join()
    pair = [threading.Thread(target=record, args=(i,)) for i in (6, 7)]
    for t in pair:
        t.start()
    for t in pair:
        t.join()
    assert len(store.deliveries()) == 8
    assert at.connections() == 1
    store.close()  # from a thread that never recorded
    # PostgreSQL ends a closed session's backend a moment later.
    assert poll(lambda: at.connections() == 0, what="closed", timeout_seconds=10).done


def hold_writer_lock(at: StoreAt) -> Any:
    """A connection of the test's own holding the store's writer lock until it is closed."""
    if isinstance(at.where, Path):
        lite = sqlite3.connect(at.where, isolation_level=None)
        lite.execute("BEGIN IMMEDIATE")
        return lite
    conn = psycopg.connect(at.where, autocommit=True)
    conn.execute("SELECT pg_advisory_lock(%s)", (PG_LOCK_KEY,))
    return conn


def test_a_start_whose_settling_was_lost_starts_again_after_the_grace(
    store_at: StoreAt, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The writer lock held elsewhere past the busy timeout: the settling fails as it would
    # with the store gone (or a COMMIT lost after the server applied it).
    monkeypatch.setattr("deployments.alert_store.BUSY_TIMEOUT_SECONDS", 1)
    store = store_at.open()
    dispatch = Dispatch("postgres-connections", "main", {})
    alert = Alert("alertmanager", "A", "firing", {}, {}, "unsettled0000001")
    now = datetime.now(UTC)
    reserved = store.record(alert, now, dispatch=dispatch)
    assert reserved.outcome.value == "started"
    blocker = hold_writer_lock(store_at)
    try:
        with pytest.raises(StoreError):
            store.not_started(reserved, alert.fingerprint, "could not start")
    finally:
        blocker.close()
    # Within the grace the start may still be under way: deduplicated.
    soon = store.record(alert, now + timedelta(seconds=5), dispatch=dispatch)
    assert soon.outcome.value == "deduplicated"
    later = store.record(alert, now + SETTLE_GRACE, dispatch=dispatch)
    assert later.outcome.value == "started"
    # Settled, the episode is deduplicated for the rest of the window.
    store.started(later, alert.fingerprint, None)
    after = store.record(alert, now + SETTLE_GRACE * 2, dispatch=dispatch)
    assert after.outcome.value == "deduplicated"
    store.close()


OLD_ALERTS = """CREATE TABLE alerts (fingerprint TEXT PRIMARY KEY, alert TEXT NOT NULL,
status TEXT NOT NULL, first_seen {time} NOT NULL, last_seen {time} NOT NULL, started_at {time},
flow_run_id TEXT, deliveries INTEGER NOT NULL DEFAULT 0)"""


def test_a_store_written_before_settling_was_recorded_opens_and_keeps_its_episodes(
    store_at: StoreAt,
) -> None:
    started = datetime.now(UTC) - timedelta(minutes=5)  # past the grace, within the window
    row = ("before0000000001", "A", "firing", started.timestamp())
    insert = (
        "INSERT INTO alerts (fingerprint, alert, status, first_seen, last_seen, started_at) "
        "VALUES ({p}, {p}, {p}, {p}, {p}, {p})"
    )
    if isinstance(store_at.where, Path):
        with closing(sqlite3.connect(store_at.where)) as lite, lite:
            lite.execute(OLD_ALERTS.format(time="REAL"))
            lite.execute(insert.format(p="?"), (*row, row[3], row[3]))
    else:
        with psycopg.connect(store_at.where, autocommit=True) as conn:
            conn.execute("CREATE SCHEMA runbook_receiver")
            conn.execute("SET search_path = runbook_receiver")
            conn.execute(OLD_ALERTS.format(time="DOUBLE PRECISION"))
            conn.execute(insert.format(p="%s"), (*row, row[3], row[3]))
    store = store_at.open()
    alert = Alert("alertmanager", "A", "firing", {}, {}, "before0000000001")
    dispatch = Dispatch("postgres-connections", "main", {})
    # Started before the upgrade: settled then, deduplicated for the rest of its window.
    again = store.record(alert, datetime.now(UTC), dispatch=dispatch)
    assert again.outcome.value == "deduplicated"
    store.close()


def test_resolved_never_starts_and_closes_the_episode(
    prefect_api: str, served_deployment: str, make_receiver: Any, store_at: StoreAt
) -> None:
    server = make_receiver(store=store_at)
    since = datetime.now(UTC)
    fingerprint = uuid.uuid4().hex[:16]
    firing = am_payload(am_alert(fingerprint))
    resolved = am_payload(am_alert(fingerprint, status="resolved"), status="resolved")

    def send(payload: dict[str, Any]) -> dict[str, Any]:
        result: dict[str, Any] = post(server.url, "/alerts/alertmanager", payload).json()
        alert: dict[str, Any] = result["alerts"][0]
        return alert

    assert send(resolved)["outcome"] == "resolved"  # unknown yet: still no run
    first = send(firing)
    assert first["outcome"] == "started"
    assert send(firing)["outcome"] == "deduplicated"
    assert send(resolved)["outcome"] == "resolved"
    again = send(firing)  # a new episode, inside the window: the record was closed
    assert again["outcome"] == "started"
    runs = deployment_runs(prefect_api, served_deployment, since)
    assert sorted(r["id"] for r in runs) == sorted([first["flow_run_id"], again["flow_run_id"]])
    for run_id in (first["flow_run_id"], again["flow_run_id"]):
        wait_final(prefect_api, run_id)
    assert alert_events(prefect_api, "runbook.alert.resolved", fingerprint)


@pytest.mark.timeout(240)
def test_a_burst_of_500_alerts_is_recorded_whole_and_runs_are_capped(
    prefect_api: str, served_deployment: str, make_receiver: Any, store_at: StoreAt
) -> None:
    server = make_receiver(cap=3, store=store_at)
    since = datetime.now(UTC)
    fingerprints = [f"burst{i:011d}" for i in range(500)]
    batches = [fingerprints[i : i + 10] for i in range(0, 500, 10)]
    results: list[dict[str, Any]] = []
    lock = threading.Lock()

    def deliver(batch: list[str]) -> None:
        response = post(server.url, "/alerts/alertmanager", am_payload(*map(am_alert, batch)))
        assert response.status_code == 202, response.text
        with lock:
            results.extend(response.json()["alerts"])

    def deliver_each(some: list[list[str]]) -> None:
        for batch in some:
            deliver(batch)

    threads = [threading.Thread(target=deliver_each, args=(batches[i::10],)) for i in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(r["fingerprint"] for r in results) == fingerprints
    assert Counter(r["outcome"] for r in results) == {"started": 3, "capped": 497}
    recorded = server.receiver.store.deliveries()
    assert sorted(d["fingerprint"] for d in recorded) == fingerprints
    assert Counter(d["outcome"] for d in recorded) == {"started": 3, "capped": 497}
    started = [r["flow_run_id"] for r in results if r["outcome"] == "started"]
    for run_id in started:
        wait_final(prefect_api, run_id, timeout=120)
    assert sorted(
        r["id"] for r in deployment_runs(prefect_api, served_deployment, since)
    ) == sorted(started)


def test_an_unknown_alert_is_accepted_recorded_and_not_run(
    prefect_api: str, make_receiver: Any
) -> None:
    server = make_receiver()
    fingerprint = uuid.uuid4().hex[:16]
    alert = am_alert(fingerprint, alertname="SomethingElse")
    response = post(server.url, "/alerts/alertmanager", am_payload(alert))
    assert response.status_code == 202
    [result] = response.json()["alerts"]
    assert result["outcome"] == "unrouted" and result["flow_run_id"] is None
    [delivery] = server.receiver.store.deliveries(fingerprint=fingerprint)
    assert delivery["outcome"] == "unrouted" and delivery["alert"] == "SomethingElse"
    [event] = alert_events(prefect_api, "runbook.alert.firing", fingerprint)
    assert event["payload"]["outcome"] == "unrouted"
    assert event["resource"]["runbook.runbook"] == ""


@pytest.mark.parametrize(
    "target",
    ["other", "main; DROP TABLE x", "{{ event.id }}", "main\n", "MAIN"],
)
def test_a_label_only_selects_an_inventory_target(
    make_receiver: Any, target: str, prefect_api: str
) -> None:
    server = make_receiver()
    response = post(server.url, "/alerts/alertmanager", am_payload(am_alert(target=target)))
    assert response.status_code == 202
    [result] = response.json()["alerts"]
    assert result["outcome"] == "rejected" and result["flow_run_id"] is None
    assert "names no postgres-connections target" in result["detail"]
    assert target not in result["detail"]  # the label's value is not echoed into anything


# -- what is refused -----------------------------------------------------------------------


def test_credentials_are_checked_in_constant_time_and_never_echoed(
    make_receiver: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    server = make_receiver()
    body = json.dumps(am_payload(am_alert())).encode()
    url = f"{server.url}/alerts/alertmanager"
    json_type = {"Content-Type": "application/json"}
    for headers in (
        {},
        {"Authorization": "Bearer wrong-token-of-some-length"},
        {"Authorization": f"Basic {TOKEN}"},
        {"Authorization": f"Bearer {TOKEN}x"},
        {"X-Runbook-Signature": "sha256=" + "0" * 64},
        {"X-Runbook-Signature": hmac.new(HMAC_SECRET.encode(), body, "sha256").hexdigest()},
    ):
        response = httpx.post(url, content=body, headers=json_type | headers, timeout=10)
        assert response.status_code == 401, headers
        assert "Bearer" in response.json()["detail"] and TOKEN not in response.text
    signature = "sha256=" + hmac.new(HMAC_SECRET.encode(), body, hashlib.sha256).hexdigest()
    ok = httpx.post(
        url, content=body, headers=json_type | {"X-Runbook-Signature": signature}, timeout=10
    )
    assert ok.status_code == 202 and ok.json()["alerts"][0]["outcome"] == "started"
    assert len(server.receiver.store.deliveries()) == 1  # the refused ones recorded nothing
    out = capsys.readouterr()
    assert TOKEN not in out.out + out.err and HMAC_SECRET not in out.out + out.err
    assert "alert started" in out.out


def test_an_oversized_body_is_refused_while_it_streams(make_receiver: Any) -> None:
    server = make_receiver()
    url = f"{server.url}/alerts/generic"
    big = json.dumps(
        {
            "alerts": [
                {"name": "IdleInTransaction", "status": "firing", "labels": {"x": "y" * 2_000_000}}
            ]
        }
    ).encode()
    headers = auth() | {"Content-Type": "application/json"}
    declared = httpx.post(url, content=big, headers=headers, timeout=30)
    assert declared.status_code == 413

    def chunks() -> Iterator[bytes]:  # no Content-Length: Transfer-Encoding chunked
        for i in range(0, len(big), 65536):
            yield big[i : i + 65536]

    chunked = httpx.post(url, content=chunks(), headers=headers, timeout=30)
    assert chunked.status_code == 413
    assert "max_body_bytes" in chunked.json()["detail"]
    assert server.receiver.store.deliveries() == []


MALFORMED: list[tuple[str, str, bytes, str]] = [
    ("alertmanager", "not json", b"{not json", "json_invalid"),
    ("alertmanager", "a JSON list", b"[]", "model_type"),
    ("alertmanager", "empty object", b"{}", "missing"),
    ("alertmanager", "no alerts", json.dumps(am_payload()).encode(), "too_short"),
    (
        "alertmanager",
        "version 3",
        json.dumps(am_payload(am_alert()) | {"version": "3"}).encode(),
        "literal_error",
    ),
    (
        "alertmanager",
        "a label that is a number",
        json.dumps(am_payload(am_alert() | {"labels": {"alertname": "A", "n": 1}})).encode(),
        "string_type",
    ),
    (
        "alertmanager",
        "no alertname",
        json.dumps(am_payload(am_alert() | {"labels": {"target": "main"}})).encode(),
        "alertname",
    ),
    (
        "alertmanager",
        "status burning",
        json.dumps(am_payload(am_alert(status="burning"))).encode(),
        "literal_error",
    ),
    (
        "alertmanager",
        "fingerprint with a space",
        json.dumps(am_payload(am_alert("a b"))).encode(),
        "string_pattern_mismatch",
    ),
    ("grafana", "alerts is a string", b'{"status": "firing", "alerts": "x"}', "list_type"),
    ("generic", "no name", b'{"alerts": [{"status": "firing"}]}', "missing"),
    (
        "generic",
        "labels a list",
        b'{"alerts": [{"name": "A", "status": "firing", "labels": []}]}',
        "dict_type",
    ),
    ("generic", "empty alerts", b'{"alerts": []}', "too_short"),
    ("generic", "null", b"null", "model_type"),
]


@pytest.mark.parametrize(
    ("source", "body", "error"),
    [(s, b, e) for s, _, b, e in MALFORMED],
    ids=[name for _, name, _, _ in MALFORMED],
)
def test_a_malformed_payload_is_a_422_naming_the_problem_and_starts_nothing(
    make_receiver: Any, source: str, body: bytes, error: str
) -> None:
    server = make_receiver()
    response = httpx.post(
        f"{server.url}/alerts/{source}",
        content=body,
        headers=auth() | {"Content-Type": "application/json"},
        timeout=10,
    )
    assert response.status_code == 422, response.text
    assert error in response.text
    assert server.receiver.store.deliveries() == []


def test_a_wrong_content_type_is_a_415(make_receiver: Any) -> None:
    server = make_receiver()
    body = json.dumps(am_payload(am_alert()))
    for content_type in ("text/plain", "application/x-www-form-urlencoded", ""):
        response = httpx.post(
            f"{server.url}/alerts/alertmanager",
            content=body,
            headers=auth() | {"Content-Type": content_type},
            timeout=10,
        )
        assert response.status_code == 415, content_type
    assert server.receiver.store.deliveries() == []
    assert httpx.get(f"{server.url}/healthz", timeout=5).json()["status"] == "ok"


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=20,
)
LABELS = st.dictionaries(st.text(min_size=1, max_size=12), st.text(max_size=12), max_size=4)
ALERTISH = st.fixed_dictionaries(
    {
        "status": st.sampled_from(["firing", "resolved", "other"]),
        "labels": LABELS | st.just({"alertname": "Fuzzed"}),
        "name": st.text(max_size=8),
    },
    optional={"fingerprint": st.text(max_size=20), "annotations": JSON},
)
PAYLOADISH = st.fixed_dictionaries(
    {"alerts": st.lists(ALERTISH, max_size=3)},
    optional={
        "version": st.sampled_from(["4", "1", 4]),
        "status": st.sampled_from(["firing", "x"]),
    },
)


def test_fuzzed_payloads_never_give_a_5xx_or_start_a_run(make_receiver: Any) -> None:
    server = make_receiver()
    client = httpx.Client(
        base_url=server.url, headers=auth() | {"Content-Type": "application/json"}, timeout=30
    )

    @settings(
        max_examples=150,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    @given(
        source=st.sampled_from(["alertmanager", "grafana", "generic"]),
        body=JSON | PAYLOADISH,
    )
    def check(source: str, body: Any) -> None:
        response = client.post(f"/alerts/{source}", content=json.dumps(body))
        assert response.status_code in (202, 422), response.text
        if response.status_code == 202:
            assert all(a["outcome"] != "started" for a in response.json()["alerts"])

    with client:
        check()
    assert not server.receiver.store.deliveries(outcome="started")


OVERSIZED = st.sampled_from(["x" * 257, "x" * 4097, "x" * 600_000])
BAD = JSON | OVERSIZED | st.sampled_from(["", "a b", "burning", "pending", "3"])
# One field of a valid, routed alert at a time: (where in the alert, key).
FIELDS = [
    ("alert", "status"),
    ("alert", "fingerprint"),
    ("alert", "labels"),
    ("alert", "annotations"),
    ("labels", "alertname"),
    ("labels", "severity"),
    ("labels", "target"),
    ("labels", "x" * 257),
    ("labels", "k"),
    ("annotations", "summary"),
    ("payload", "version"),
    ("payload", "status"),
    ("payload", "alerts"),
    ("payload", "truncatedAlerts"),
]


@st.composite
def corrupted_alertmanager_payloads(draw: st.DrawFn) -> dict[str, Any]:
    """A valid Alertmanager group of one alert that routes to a run, with one field replaced
    by anything (an oversized string too) or removed."""
    alert = am_alert(draw(st.uuids()).hex[:16])
    payload = am_payload(alert)
    where, key = draw(st.sampled_from(FIELDS))
    holder = {
        "payload": payload,
        "alert": alert,
        "labels": alert["labels"],
        "annotations": alert["annotations"],
    }[where]
    if draw(st.booleans()):
        holder[key] = draw(BAD)
    else:
        holder.pop(key, None)
    return payload


def test_a_corrupted_routed_alert_starts_a_run_only_when_it_validates(
    prefect_api: str, make_receiver: Any
) -> None:
    server = make_receiver(cap=3)  # a few real runs at most; beyond, capped shows routing
    store = server.receiver.store
    client = httpx.Client(
        base_url=server.url, headers=auth() | {"Content-Type": "application/json"}, timeout=60
    )
    seen: Counter[str] = Counter()

    @settings(
        max_examples=120,
        deadline=None,
        suppress_health_check=[
            HealthCheck.function_scoped_fixture,
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
        ],
    )
    @given(body=corrupted_alertmanager_payloads())
    def check(body: dict[str, Any]) -> None:
        try:
            AlertmanagerPayload.model_validate(body)
            valid = True
        except ValidationError:
            valid = False
        started = len(store.deliveries(outcome="started"))
        response = client.post("/alerts/alertmanager", content=json.dumps(body))
        assert response.status_code == (202 if valid else 422), response.text[:500]
        if not valid:
            assert len(store.deliveries(outcome="started")) == started
            seen["refused"] += 1
            return
        [result] = response.json()["alerts"]
        seen[result["outcome"]] += 1
        if result["outcome"] in ("started", "deduplicated", "capped"):  # it routed
            labels = body["alerts"][0]["labels"]
            assert (labels["alertname"], labels["severity"]) == ("IdleInTransaction", "critical")
            assert labels.get("target", "main") == "main"
        if result["outcome"] == "started":
            # Ended before the next draw: a run's threads using `random` meanwhile would look
            # to Hypothesis like a strategy that does.
            wait_final(prefect_api, result["flow_run_id"])
            time.sleep(0.5)

    with client:
        check()
    # Both sides were exercised: refused corruptions, and harmless ones that started runs.
    assert seen["refused"] and seen["started"] + seen["capped"], seen
    for delivery in store.deliveries(outcome="started"):
        assert delivery["alert"] == "IdleInTransaction" and delivery["target"] == "main"


# -- what is large, failing, truncated or stopping -----------------------------------------


def test_a_huge_alertname_is_a_422_naming_it(make_receiver: Any) -> None:
    server = make_receiver()
    alert = am_alert()
    alert["labels"]["alertname"] = "A" * 600_000
    response = post(server.url, "/alerts/alertmanager", am_payload(alert))
    assert response.status_code == 422, response.text[:300]
    [error] = response.json()["detail"]
    assert error["loc"][-2:] == ["labels", "alertname"]
    assert error["type"] == "string_too_long"
    assert server.receiver.store.deliveries() == []


@pytest.mark.timeout(180)
def test_a_group_with_events_over_prefects_size_limit_is_handled_whole(
    prefect_api: str, make_receiver: Any
) -> None:
    server = make_receiver(receiver="max_body_bytes = 8388608\n")
    many = {f"label{i:03d}": "v" * 4096 for i in range(400)}  # each allowed, 1.6 MB together
    big_labels = am_alert(alertname="ManyLabels", **many)
    big_notes = am_alert(alertname="LongNotes")
    big_notes["annotations"] = {"description": "d" * 2_000_000}
    routed = am_alert()
    response = post(server.url, "/alerts/alertmanager", am_payload(big_labels, big_notes, routed))
    assert response.status_code == 202, response.text[:500]
    outcomes = [a["outcome"] for a in response.json()["alerts"]]
    assert outcomes == ["unrouted", "unrouted", "started"]
    assert len(server.receiver.store.deliveries()) == 3
    truncated = {"truncated": "over Prefect's event size limit"}
    [event] = alert_events(prefect_api, "runbook.alert.firing", big_labels["fingerprint"])
    assert event["payload"]["labels"] == truncated == event["payload"]["annotations"]
    assert event["resource"]["prefect.resource.name"] == "ManyLabels"
    [event] = alert_events(prefect_api, "runbook.alert.firing", big_notes["fingerprint"])
    assert event["payload"]["annotations"] == truncated
    assert event["payload"]["labels"]["alertname"] == "LongNotes"
    [event] = alert_events(prefect_api, "runbook.alert.firing", routed["fingerprint"])
    assert event["payload"]["annotations"] == routed["annotations"]
    wait_final(prefect_api, response.json()["alerts"][2]["flow_run_id"])


def test_a_run_that_cannot_start_gets_a_fixed_detail_and_the_log_the_reason(
    db: Db, make_receiver: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    unserved = '[[routes]]\nalert = "Unserved"\nrunbook = "postgres-maintenance"\ntarget = "main"\n'
    server = make_receiver(in_process=False, extra=unserved)
    fingerprint = uuid.uuid4().hex[:16]
    response = post(
        server.url, "/alerts/alertmanager", am_payload(am_alert(fingerprint, alertname="Unserved"))
    )
    [result] = response.json()["alerts"]
    assert result["outcome"] == "rejected"
    detail = result["detail"]
    assert detail.startswith("could not start postgres-maintenance/main (")
    assert detail.endswith("); see the receiver's log")
    [delivery] = server.receiver.store.deliveries(fingerprint=fingerprint)
    assert delivery["outcome"] == "rejected" and delivery["detail"] == detail
    out = capsys.readouterr().out
    assert f'alert start failed fingerprint="{fingerprint}"' in out
    for secret in (TOKEN, HMAC_SECRET, db.dsn):
        assert secret not in out + response.text


def test_credentials_in_a_url_or_from_settings_never_reach_the_log() -> None:
    from tasks.redact import redact_urls as redact

    text = (
        "Client error '404 Not Found' for url "
        "'https://user:pa55word@prefect.example/api/deployments/name/x' token s3cret-value"
    )
    clean = redact(text, ("s3cret-value",))
    assert "pa55word" not in clean and "user:" not in clean and "s3cret-value" not in clean
    assert "https://***@prefect.example/api/deployments/name/x" in clean


def test_truncated_alerts_are_reported(
    make_receiver: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    server = make_receiver()
    payload = am_payload(am_alert(alertname="SomethingElse")) | {"truncatedAlerts": 7}
    response = post(server.url, "/alerts/alertmanager", payload)
    assert response.status_code == 202 and response.json()["truncated"] == 7
    assert "alerts truncated source=alertmanager count=7" in capsys.readouterr().out
    generic = {"alerts": [{"name": "SomethingElse", "status": "firing"}]}
    assert post(server.url, "/alerts/generic", generic).json()["truncated"] == 0


@pytest.mark.timeout(180)
def test_stopping_cancels_the_runs_still_queued_and_returns(
    prefect_api: str, make_receiver: Any
) -> None:
    server = make_receiver(receiver="max_concurrent_runs = 1\n")
    # The one run thread is busy until released, so every alert run is still queued at stop.
    busy = threading.Event()
    server.receiver.starter._pool.submit(busy.wait, 60)
    alerts = [am_alert() for _ in range(3)]
    response = post(server.url, "/alerts/alertmanager", am_payload(*alerts))
    results = response.json()["alerts"]
    assert [r["outcome"] for r in results] == ["started"] * 3
    stopper = threading.Thread(target=server.stop, daemon=True)
    stopper.start()
    time.sleep(1)  # stop() cancels what is queued, then waits for the busy thread
    busy.set()
    stopper.join(90)
    assert not stopper.is_alive(), "stop() hung"
    final = Counter(flow_run(prefect_api, r["flow_run_id"])["state_type"] for r in results)
    assert final == {"CANCELLED": 3}, final


def test_an_alert_after_shutdown_starts_nothing_and_leaves_nothing_pending(
    prefect_api: str, served_deployment: str, make_receiver: Any
) -> None:
    server = make_receiver()
    since = datetime.now(UTC)
    server.receiver.starter.shutdown()  # as when `runbook serve` stops with a request in flight
    [result] = post(server.url, "/alerts/alertmanager", am_payload(am_alert())).json()["alerts"]
    assert result["outcome"] == "rejected" and "(TargetError)" in result["detail"]
    assert deployment_runs(prefect_api, served_deployment, since) == []


def test_a_run_created_when_its_threads_are_gone_ends_cancelled(
    prefect_api: str, served_deployment: str, make_receiver: Any
) -> None:
    server = make_receiver()
    since = datetime.now(UTC)
    # The pool refuses work (RuntimeError) after the run was created from the deployment.
    server.receiver.starter._pool.shutdown(wait=True)
    [result] = post(server.url, "/alerts/alertmanager", am_payload(am_alert())).json()["alerts"]
    assert result["outcome"] == "rejected" and "(RuntimeError)" in result["detail"]
    [run] = deployment_runs(prefect_api, served_deployment, since)
    assert run["state_type"] == "CANCELLED"


# -- dispatch through Prefect's trigger path and through the deployment --------------------


def test_trigger_dispatch_emits_the_dispatch_event_with_typed_parameters(
    prefect_api: str, served_deployment: str, make_receiver: Any
) -> None:
    server = make_receiver(dispatch="trigger", apply=True)
    since = datetime.now(UTC)
    fingerprint = uuid.uuid4().hex[:16]
    response = post(server.url, "/alerts/alertmanager", am_payload(am_alert(fingerprint)))
    [result] = response.json()["alerts"]
    assert result["outcome"] == "started" and result["flow_run_id"] is None
    [event] = alert_events(prefect_api, "runbook.alert.dispatch", fingerprint)
    assert event["resource"]["runbook.runbook"] == RUNBOOK
    assert event["resource"]["runbook.target"] == "main"
    assert event["payload"]["parameters"].pop("alert")["fingerprint"] == fingerprint
    assert event["payload"]["parameters"] == {
        "target": "main",
        "dry_run": False,
        "approval": "auto",
        "params": {"idle_in_transaction_seconds": 1, "max_backends_ended": 50},
    }
    assert alert_events(prefect_api, "runbook.alert.firing", fingerprint)
    # No trigger is registered here: the receiver itself created no run.
    assert deployment_runs(prefect_api, served_deployment, since) == []


def cli_env(prefect_api: str, config: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_LOGGING", "RUNBOOK_"))}
    return env | {"PREFECT_API_URL": prefect_api, "RUNBOOK_CONFIG": str(config)}


def receiver_exits(prefect_api: str, config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`runbook receiver ARGS` that is to exit at once, on an error: its result."""
    return subprocess.run(
        [RUNBOOK_CLI, "receiver", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=cli_env(prefect_api, config),
    )


def test_runbook_receiver_without_a_token_exits_2(db: Db) -> None:
    proc = receiver_exits("http://127.0.0.1:1/api", db.config)
    assert proc.returncode == 2 and "no [receiver] token" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.timeout(180)
def answering(proc: subprocess.Popen[str], url: str) -> bool:
    """The receiver process is alive and answers /healthz."""
    assert proc.poll() is None, "the receiver exited"
    try:
        return httpx.get(f"{url}/healthz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def test_runbook_receiver_alone_creates_the_run_through_the_deployment(
    db: Db, tmp_path: Path, prefect_api: str, served_deployment: str
) -> None:
    port = free_port()
    db.write_config(receiver_config(tmp_path / "alerts.sqlite", port=port))
    proc = subprocess.Popen(
        [RUNBOOK_CLI, "receiver"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=cli_env(prefect_api, db.config),
    )
    url = f"http://127.0.0.1:{port}"
    try:
        assert poll(
            partial(answering, proc, url), what="the receiver to answer", timeout_seconds=60
        ).done
        response = post(url, "/alerts/alertmanager", am_payload(am_alert()))
        [result] = response.json()["alerts"]
        assert result["outcome"] == "started"
        run = flow_run(prefect_api, result["flow_run_id"])
        # Nobody serves the deployment in this test: the run waits for a runner, Scheduled.
        assert run["deployment_id"] == served_deployment and run["state_type"] == "SCHEDULED"
        assert run["parameters"]["params"] == {
            "idle_in_transaction_seconds": 1,
            "max_backends_ended": 50,
        }
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    assert f"Alert receiver at {url}" in out and "alert started" in out
    assert TOKEN not in out
    httpx.delete(f"{prefect_api}/flow_runs/{result['flow_run_id']}", timeout=API_TIMEOUT)


@pytest.mark.timeout(240)
def test_runbook_serve_runs_an_alert_in_its_own_process_and_the_runner_leaves_it_alone(
    db: Db, tmp_path: Path, prefect_api: str
) -> None:
    port = free_port()
    db.write_config(receiver_config(tmp_path / "alerts.sqlite", port=port, apply=True))
    pids = db.idle_in_transaction(2)
    # The runner polls every second here: had it taken the run too, it would show within seconds.
    env = cli_env(prefect_api, db.config) | {"PREFECT_RUNNER_POLL_FREQUENCY": "1"}
    proc = subprocess.Popen(
        [RUNBOOK_CLI, "serve"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        assert poll(
            partial(answering, proc, url), what="the receiver to answer", timeout_seconds=120
        ).done
        assert httpx.get(f"{url}/healthz", timeout=5).json()["dispatch"] == "in-process"
        response = post(url, "/alerts/alertmanager", am_payload(am_alert()))
        [result] = response.json()["alerts"]
        assert result["outcome"] == "started", result
        run = wait_final(prefect_api, result["flow_run_id"])
        assert run["state_type"] == "COMPLETED"
        assert db.alive(pids) == set()
        time.sleep(3)
        assert states(prefect_api, result["flow_run_id"]) == ["PENDING", "RUNNING", "COMPLETED"]
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    assert f"Alert receiver at {url}" in out and "alert started" in out
    assert TOKEN not in out and HMAC_SECRET not in out
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{url}/healthz", timeout=2)


def test_a_deployment_registered_again_gets_the_next_run(
    prefect_api: str, served_deployment: str, make_receiver: Any
) -> None:
    server = make_receiver()
    first = post(server.url, "/alerts/alertmanager", am_payload(am_alert())).json()["alerts"][0]
    wait_final(prefect_api, first["flow_run_id"])
    from uuid import UUID

    from prefect import get_client

    # Prefect's client: it retries the 503 a busy SQLite server answers with.
    with get_client(sync_client=True) as client:
        client.delete_deployment(UUID(served_deployment))
    flow = RUNBOOKS[RUNBOOK].load()
    again = str(
        runner_deployment(flow.to_deployment(name="main", parameters={"target": "main"})).apply()
    )
    assert again != served_deployment
    second = post(server.url, "/alerts/alertmanager", am_payload(am_alert())).json()["alerts"][0]
    assert second["outcome"] == "started", second
    assert wait_final(prefect_api, second["flow_run_id"])["deployment_id"] == again


def test_a_busy_port_is_a_clear_config_error(db: Db, tmp_path: Path, prefect_api: str) -> None:
    import socket

    from tasks.errors import ConfigError

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        db.write_config(receiver_config(tmp_path / "alerts.sqlite", port=port))
        receiver = build_receiver(load_settings(), in_process=True)
        with pytest.raises(ConfigError, match=f"could not listen on 127.0.0.1:{port}"):
            ReceiverServer(receiver).start()
    receiver.starter.shutdown()
    receiver.store.close()


# -- payloads from the versions people run -------------------------------------------------


def test_alertmanager_before_0_19_without_fingerprints(
    prefect_api: str, make_receiver: Any
) -> None:
    # Alertmanager 0.18's webhook: no fingerprint on the alerts, no truncatedAlerts.
    server = make_receiver()
    labels = {"alertname": "IdleInTransaction", "severity": "critical", "target": "main"}
    payload = am_payload(am_alert(**labels))
    del payload["truncatedAlerts"]
    del payload["alerts"][0]["fingerprint"]
    response = post(server.url, "/alerts/alertmanager", payload)
    assert response.status_code == 202, response.text
    [result] = response.json()["alerts"]
    assert result["outcome"] == "started" and response.json()["truncated"] == 0
    # The fingerprint a real Alertmanager 0.19+ gives the same labels: an upgrade keeps it.
    alertmanager = Alertmanager("http://127.0.0.1:9/unused", TOKEN).start()
    try:
        alertmanager.post(labels, starts_at=datetime.now(UTC))
        assert result["fingerprint"] == alertmanager.fingerprint(labels)
    finally:
        alertmanager.stop()
    wait_final(prefect_api, result["flow_run_id"])
    # Sent again (as Alertmanager repeats a group): the same alert, deduplicated.
    [again] = post(server.url, "/alerts/alertmanager", payload).json()["alerts"]
    assert again["outcome"] == "deduplicated" and again["fingerprint"] == result["fingerprint"]


def test_an_empty_fingerprint_is_computed_from_the_labels_for_every_source(
    make_receiver: Any,
) -> None:
    server = make_receiver()
    labels = {"alertname": "SomethingElse", "instance": "db-1:9187"}
    bodies = {
        "alertmanager": am_payload(am_alert(**labels) | {"fingerprint": ""}),
        "grafana": {
            "status": "firing",
            "alerts": [{"status": "firing", "labels": labels, "fingerprint": ""}],
        },
        "generic": {
            "alerts": [
                {"name": "SomethingElse", "status": "firing", "labels": {"instance": "db-1:9187"}}
            ]
        },
    }
    fingerprints = set()
    for source, body in bodies.items():
        response = post(server.url, f"/alerts/{source}", body)
        assert response.status_code == 202, response.text
        [result] = response.json()["alerts"]
        assert result["outcome"] == "unrouted"
        fingerprints.add(result["fingerprint"])
    # One function for all: the same labels, the same fingerprint, whoever sent them (the
    # Alertmanager alert also carries severity and target labels, so it differs).
    am = {**labels, "severity": "critical", "target": "main"}
    expected = {fingerprint_of("SomethingElse", labels), fingerprint_of("SomethingElse", am)}
    assert fingerprints == expected


def test_grafana_truncated_alerts_are_reported(
    make_receiver: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    server = make_receiver()
    payload = {  # Grafana's webhook contact point, version 1, max_alerts = 1 of 4
        "receiver": "runbook",
        "status": "firing",
        "orgId": 1,
        "alerts": [
            {
                "status": "firing",
                "labels": {"alertname": "SomethingElse", "grafana_folder": "ops"},
                "annotations": {},
                "startsAt": "2026-11-30T12:00:00Z",
                "endsAt": "0001-01-01T00:00:00Z",
                "fingerprint": "57c6d9296de2ad39",
            }
        ],
        "groupLabels": {"alertname": "SomethingElse"},
        "commonLabels": {"alertname": "SomethingElse"},
        "externalURL": "http://grafana.example/",
        "version": "1",
        "groupKey": '{}:{alertname="SomethingElse"}',
        "truncatedAlerts": 3,
        "title": "[FIRING:4] SomethingElse",
        "state": "alerting",
        "message": "",
    }
    response = post(server.url, "/alerts/grafana", payload)
    assert response.status_code == 202 and response.json()["truncated"] == 3
    assert "alerts truncated source=grafana count=3" in capsys.readouterr().out
