"""An alert end to end through real parts: posted to a real Alertmanager's own API, delivered to
our receiver inside `runbook serve`, recorded as a Prefect event, run as a deployment on a real
Prefect server (by the receiver itself, or by Prefect's deployment trigger), and the incident
(sessions idle in transaction) gone from PostgreSQL. Resolving the alert starts nothing."""

from __future__ import annotations

import secrets
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from deployments.localpg import free_port
from tasks.models import utcnow
from tasks.wait import poll
from tests.alertmanager_helpers import (
    Alertmanager,
    PrefectServer,
    Serve,
    automations,
    events,
    flow_runs,
    port_open,
)
from tests.conftest import Db

RUNBOOK = "postgres-connections"
FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
LABELS = {"alertname": "IdleInTransaction", "target": "main", "severity": "critical"}

RECEIVER = """
[receiver]
listen = "127.0.0.1:{port}"
token = "{token}"
dispatch = "{dispatch}"
state_file = "{state}"

[[routes]]
alert = "IdleInTransaction"
matchers = {{ severity = "critical" }}
runbook = "{runbook}"
target_label = "target"
apply = true
approval = "auto"
set = {{ idle_in_transaction_seconds = 1 }}
"""


def alert_runs(api: str) -> list[dict[str, Any]]:
    """Runs of the runbook an alert started: the served schedule's runs are dry runs."""
    return [run for run in flow_runs(api, RUNBOOK) if run["parameters"].get("dry_run") is False]


def feed(api: str, name: str, fingerprint: str) -> dict[str, Any]:
    """The one event `name` of this alert in Prefect's event feed (persisted in batches)."""
    found: list[dict[str, Any]] = []

    def listed() -> bool:
        found[:] = events(api, name, f"runbook.alert.{fingerprint}")
        return bool(found)

    assert poll(
        listed,
        what="the alert event",
        timeout_seconds=30,
        first_delay_seconds=0.5,
        max_delay_seconds=1,
    ).done, name
    assert len(found) == 1, found
    return found[0]


@pytest.mark.timeout(240)
@pytest.mark.parametrize("dispatch", ["direct", "trigger"])
def test_alertmanager_alert_runs_the_runbook_and_fixes_the_incident(
    dispatch: str, db: Db, tmp_path: Path
) -> None:
    receiver_port, token = free_port(), secrets.token_urlsafe(24)
    db.write_config(
        RECEIVER.format(
            port=receiver_port,
            token=token,
            dispatch=dispatch,
            state=tmp_path / "alerts.sqlite",
            runbook=RUNBOOK,
        )
    )
    pids = db.idle_in_transaction(3)
    # Served flow runs are polled for every second, not Prefect's 10 s: the trigger path's
    # latency is measured in bench/alert_latency.py, not sat out here.
    server = PrefectServer(tmp_path / "prefect")
    serve = Serve(db.config, server.api, tmp_path / "serve", {"PREFECT_RUNNER_POLL_FREQUENCY": "1"})
    alertmanager = Alertmanager(f"http://127.0.0.1:{receiver_port}/alerts/alertmanager", token)
    try:
        server.start()
        serve.start("Alert receiver at")
        assert serve.line("Alert receiver at").startswith(
            f"Alert receiver at http://127.0.0.1:{receiver_port}"
        )
        assert httpx.get(f"http://127.0.0.1:{receiver_port}/healthz", timeout=5).status_code == 200
        # The trigger has to exist before the event it waits for.
        assert poll(
            lambda: f"{RUNBOOK}/main: alert" in {a["name"] for a in automations(serve.api)},
            what="the alert trigger",
            timeout_seconds=60,
        ).done, serve.output
        alertmanager.start()

        starts_at = utcnow()
        alertmanager.post(LABELS, starts_at=starts_at, annotations={"summary": "3 sessions"})
        fingerprint = alertmanager.fingerprint(LABELS)

        done: list[dict[str, Any]] = []

        def finished() -> bool:
            done[:] = [r for r in alert_runs(serve.api) if r["state_type"] in FINAL]
            return bool(done)

        assert poll(
            finished, what="an alert run to finish", timeout_seconds=90, max_delay_seconds=1
        ).done, f"no run finished; serve: {serve.output[-3000:]}; Alertmanager: {alertmanager.log}"
        (run,) = done
        assert run["state_type"] == "COMPLETED", run["state"]
        # Typed all the way: an int and a bool, not "1" and "false".
        assert run["parameters"]["params"] == {"idle_in_transaction_seconds": 1}
        assert run["parameters"]["dry_run"] is False
        assert run["parameters"]["approval"] == "auto"
        assert run["parameters"]["target"] == "main"
        assert db.alive(pids) == set()

        firing = feed(serve.api, "runbook.alert.firing", fingerprint)
        assert firing["resource"]["runbook.runbook"] == RUNBOOK
        assert firing["resource"]["runbook.target"] == "main"
        assert firing["resource"]["prefect.resource.name"] == "IdleInTransaction"
        assert firing["payload"]["source"] == "alertmanager"
        assert firing["payload"]["labels"] == LABELS
        assert firing["payload"]["annotations"] == {"summary": "3 sessions"}
        assert firing["payload"]["outcome"] == "started"
        if dispatch == "direct":
            assert firing["payload"]["flow_run_id"] == run["id"]
        else:
            dispatched = feed(serve.api, "runbook.alert.dispatch", fingerprint)
            assert dispatched["payload"]["parameters"].pop("alert")["fingerprint"] == fingerprint
            assert dispatched["payload"]["parameters"] == {
                "target": "main",
                "dry_run": False,
                "approval": "auto",
                "params": {"idle_in_transaction_seconds": 1},
            }
            # The run came from the deployment trigger's automation, not from the receiver.
            (automation,) = [
                a for a in automations(serve.api) if a["name"] == f"{RUNBOOK}/main: alert"
            ]
            assert run["idempotency_key"].startswith(f"automation {automation['id']},")

        alertmanager.resolve(LABELS, starts_at=starts_at)
        resolved = feed(serve.api, "runbook.alert.resolved", fingerprint)
        assert resolved["payload"]["outcome"] == "resolved"
        dispatched_events = events(
            serve.api, "runbook.alert.dispatch", f"runbook.alert.{fingerprint}"
        )
        assert len(dispatched_events) == (1 if dispatch == "trigger" else 0)
        # A run started by the resolution would exist within a second of its event.
        time.sleep(2)
        assert [r["id"] for r in alert_runs(serve.api)] == [run["id"]]
    finally:
        alertmanager.stop()
        out = serve.stop()
        server.stop()
    assert serve.proc is not None and serve.proc.returncode is not None, out
    assert serve.session_processes() == [], out
    assert not port_open(receiver_port) and not port_open(server.port)
    assert not port_open(alertmanager.port) and not alertmanager.dir.exists()
    for name in (tmp_path.name, alertmanager.dir.name, f"--port {server.port}"):
        leftovers = subprocess.run(
            ["pgrep", "-a", "-f", "--", name], capture_output=True, text=True
        )
        assert leftovers.returncode == 1, leftovers.stdout
