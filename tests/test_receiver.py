"""The alert receiver against a real Prefect API and a real PostgreSQL: alerts start tracked runs
that fix real incidents, storm control holds under replays, races and bursts, and nothing
malformed or unauthenticated starts anything."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deployments.alert_store import AlertStore
from deployments.localpg import free_port
from deployments.receiver import Receiver, ReceiverServer, build_receiver
from flows.catalog import RUNBOOKS
from tasks.models import wait_until
from tasks.settings import load_settings
from tests.conftest import Db

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
set = {{ idle_in_transaction_seconds = 1, max_backends_ended = 50 }}
"""


def receiver_config(
    state: Path,
    *,
    apply: bool = False,
    window: int = 600,
    cap: int = 20,
    dispatch: str = "direct",
    port: int = 8787,
    extra: str = "",
) -> str:
    return (
        f'[receiver]\nlisten = "127.0.0.1:{port}"\ntoken = "{TOKEN}"\n'
        f'hmac_secret = "{HMAC_SECRET}"\nstate_file = "{state}"\n'
        f"dedup_window_seconds = {window}\nmax_runs_per_hour = {cap}\n"
        f'dispatch = "{dispatch}"\n' + ROUTE.format(apply=str(apply).lower()) + extra
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


def api_post(api: str, path: str, body: dict[str, Any]) -> Any:
    response = httpx.post(f"{api}{path}", json=body, timeout=10)
    response.raise_for_status()
    return response.json()


def flow_run(api: str, run_id: str) -> dict[str, Any]:
    response = httpx.get(f"{api}/flow_runs/{run_id}", timeout=10)
    response.raise_for_status()
    result: dict[str, Any] = response.json()
    return result


def wait_final(api: str, run_id: str, timeout: float = 90) -> dict[str, Any]:
    assert wait_until(lambda: flow_run(api, run_id)["state_type"] in FINAL, timeout), run_id
    return flow_run(api, run_id)


def states(api: str, run_id: str) -> list[str]:
    response = httpx.get(f"{api}/flow_run_states/", params={"flow_run_id": run_id}, timeout=10)
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

    wait_until(seen, timeout)
    return found


@pytest.fixture
def served_deployment(prefect_api: str) -> str:
    """postgres-connections/main registered on the API, as `runbook serve` registers it
    (not served here: the receiver runs it in this process)."""
    flow = RUNBOOKS[RUNBOOK].load()
    deployment = flow.to_deployment(name="main", parameters={"target": "main"})  # type: ignore[arg-type]
    return str(deployment.apply())


@pytest.fixture
def make_receiver(
    db: Db, tmp_path: Path, prefect_api: str, served_deployment: str
) -> Iterator[Any]:
    made: list[Receiver] = []

    """A receiver for this test's inventory, listening on a free port (stopped after it)."""
    servers: list[ReceiverServer] = []

    def make(*, in_process: bool = True, **kwargs: Any) -> ReceiverServer:
        state = tmp_path / f"alerts-{len(servers)}.sqlite"
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
    assert run["parameters"] == {
        "target": "main",
        "dry_run": False,
        "approval": "auto",
        "params": {"idle_in_transaction_seconds": 1, "max_backends_ended": 50},
    }
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
