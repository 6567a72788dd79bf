"""prefect.yaml and `runbook serve` agree with the catalogue; the sandbox plants real incidents
and serve leaves nothing running when stopped."""

from __future__ import annotations

import importlib
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import yaml

from deployments.catalog import ROUTINES, RUNBOOKS
from deployments.fleet import FLEETS
from deployments.localpg import free_port
from deployments.sandbox import NOT_SERVED, Sandbox
from deployments.serve import alert_trigger_spec, build_deployments, fleet_trigger_spec
from tasks.settings import load_settings
from tasks.wait import poll

ROOT = Path(__file__).resolve().parents[1]
# Every entry of the registry that is a deployment: the runbooks and the routines.
ALL_ENTRIES: list[Any] = [*RUNBOOKS.values(), *ROUTINES.values()]


def test_prefect_yaml_matches_the_catalogue() -> None:
    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    by_flow, fleets = {}, {}
    for d in spec["deployments"]:
        path, function = d["entrypoint"].split(":")
        module = path.removesuffix(".py").replace("/", ".")
        if d["name"] == "fleet":
            fleets[f"{module}:{function}"] = d
        else:
            by_flow[f"{module}:{function}"] = d
    # A fleet deployment per runbook (NAME/fleet), unscheduled, with its alert trigger.
    assert set(fleets) == {f"deployments.fleet:{n.replace('-', '_')}" for n in RUNBOOKS}
    for entry, d in fleets.items():
        fleet = getattr(importlib.import_module("deployments.fleet"), entry.split(":")[1])
        assert fleet is FLEETS[fleet.name]
        assert "schedules" not in d and d["parameters"] == {"selector": "all", "dry_run": True}
        assert set(d["parameters"]) <= set(fleet.parameters.properties)
        assert d["triggers"] == [fleet_trigger_spec(fleet.name)]
    entrypoints = {rb.entrypoint for rb in ALL_ENTRIES}
    missing = sorted(entrypoints - set(by_flow))
    assert not missing, f"prefect.yaml has no deployment of {missing}: add one per target"
    assert set(by_flow) == entrypoints
    for rb in RUNBOOKS.values():
        d = by_flow[rb.entrypoint]
        assert [s["cron"] for s in d.get("schedules", [])] == ([rb.cron] if rb.cron else [])
        assert {k: v for k, v in d["parameters"].items() if k != "target"} == rb.scheduled
        flow = rb.load()
        assert flow.name == rb.name
        assert set(d["parameters"]) <= set(flow.parameters.properties)
        assert d["triggers"] == [alert_trigger_spec(rb.name, d["parameters"]["target"])]
    for routine in ROUTINES.values():
        d = by_flow[routine.entrypoint]
        assert d["name"] == "all"
        assert [s["cron"] for s in d["schedules"]] == [routine.cron]
        assert d["parameters"] == routine.scheduled
        flow = routine.load()
        assert flow.name == routine.name
        assert set(d["parameters"]) <= set(flow.parameters.properties)
        assert "triggers" not in d


def test_alert_trigger_renders_typed_parameters_from_the_event() -> None:
    """The trigger's parameters, rendered by the server's own hydration with a dispatch event,
    keep the event's JSON types; a label-like value in the event stays inert data."""
    from prefect.events import DeploymentEventTrigger
    from prefect.server.events.actions import RunDeployment
    from prefect.utilities.schema_tools.hydration import HydrationContext, hydrate

    spec = alert_trigger_spec("postgres-connections", "main")
    trigger = DeploymentEventTrigger.model_validate(spec)
    assert trigger.expect == {"runbook.alert.dispatch"}
    RunDeployment.validate_parameters(spec["parameters"])  # what the server checks on create
    params = {"idle_in_transaction_seconds": 60, "ratio": 0.5, "names": ["a", "b"], "x": None}
    event: dict[str, Any] = {
        "payload": {"parameters": {"dry_run": False, "approval": "auto", "params": params}},
        "resource": {"runbook.target": "{{ 7 * 7 }}"},
    }
    rendered = hydrate(
        spec["parameters"], HydrationContext(render_jinja=True, jinja_context={"event": event})
    )
    assert rendered == {
        "target": "main",
        "dry_run": False,
        "approval": "auto",
        "params": params,
        "alert": None,  # an event from a receiver that sent none
    }
    event["payload"]["parameters"]["approval"] = "{{ 7 * 7 }}"
    rendered = hydrate(
        spec["parameters"], HydrationContext(render_jinja=True, jinja_context={"event": event})
    )
    assert rendered["approval"] == "{{ 7 * 7 }}"


def test_the_fleet_trigger_renders_the_selector_from_the_event() -> None:
    from prefect.events import DeploymentEventTrigger
    from prefect.server.events.actions import RunDeployment
    from prefect.utilities.schema_tools.hydration import HydrationContext, hydrate

    spec = fleet_trigger_spec("postgres-connections")
    trigger = DeploymentEventTrigger.model_validate(spec)
    assert match_of(trigger) == {
        "runbook.runbook": "postgres-connections",
        "runbook.target": "fleet",
    }
    RunDeployment.validate_parameters(spec["parameters"])
    sent = {"selector": "env=prod", "dry_run": True, "approval": "never", "params": {}}
    event: dict[str, Any] = {"payload": {"parameters": {**sent, "alert": {"name": "A"}}}}
    rendered = hydrate(
        spec["parameters"], HydrationContext(render_jinja=True, jinja_context={"event": event})
    )
    assert rendered == {**sent, "alert": {"name": "A"}}


def match_of(trigger: object) -> dict[str, str | list[str]]:
    """The resource labels an event trigger matches (runbook serve builds only those)."""
    from prefect.events.schemas.automations import EventTrigger
    from prefect.events.schemas.events import ResourceSpecification

    assert isinstance(trigger, EventTrigger), type(trigger)
    assert isinstance(trigger.match, ResourceSpecification), type(trigger.match)
    return dict(trigger.match.root)


def test_sandbox_plants_incidents_and_serve_builds_its_deployments() -> None:
    box = Sandbox().start()
    try:
        settings = load_settings(box.config)
        deployments = [d for d, _ in build_deployments(settings, in_sandbox=True)]
        assert {d.flow_name for d in deployments} == (set(RUNBOOKS) - set(NOT_SERVED)) | set(
            ROUTINES
        )
        assert all(d.parameters["dry_run"] is (d.name == "fleet") for d in deployments)
        assert all(
            [match_of(t) for t in d.triggers]
            == [{"runbook.runbook": d.flow_name, "runbook.target": d.name}]
            for d in deployments
            if d.flow_name in RUNBOOKS
        )
        assert all(not d.triggers for d in deployments if d.flow_name in ROUTINES)
        with psycopg.connect(settings.postgres["main"].dsn.get_secret_value()) as conn:
            states = [
                r[0]
                for r in conn.execute("SELECT state FROM pg_stat_activity WHERE usename = 'app'")
            ]
            assert states.count("idle in transaction") == 3 and "active" in states
            assert conn.execute(
                "SELECT count(*) FROM crawler.job WHERE status = 'running'"
            ).fetchone() == (5,)
    finally:
        box.stop()
    assert not box.pg.is_running() and not box.pg.dir.exists()


@pytest.mark.timeout(300)
def test_serve_runs_the_sandbox_in_process_and_sigterm_stops_it(tmp_path: Path) -> None:
    """On a port of its own: the UI is told that port's API; the planted incidents are run
    in serve's own process and end in states named after the outcome; SIGTERM stops
    everything within 30 s, with no traceback and nothing left behind."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "RUNBOOK_"))}
    env["PREFECT_HOME"] = str(tmp_path / "prefect")
    # Its own temp dir, readable by the postgres user that runs the sandbox's server.
    tmp = Path(tempfile.mkdtemp(prefix="runbook-serve-test-"))
    tmp.chmod(0o755)
    env["TMPDIR"] = str(tmp)
    log = tmp_path / "serve.log"
    with log.open("wb") as sink:
        proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "runbook"), "serve", "--port", str(port)],
            cwd=tmp_path,
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    api = f"http://127.0.0.1:{port}/api"
    try:
        assert poll(
            lambda: "Serving " in log.read_text(),
            what="serve to say Serving",
            timeout_seconds=200,
            max_delay_seconds=1,
        ).done, log.read_text()
        ui = httpx.get(f"http://127.0.0.1:{port}/ui-settings", timeout=10).json()
        assert ui["api_url"] == api
        deployed = httpx.post(f"{api}/deployments/filter", json={}, timeout=30).json()
        assert {d["name"] for d in deployed} >= {"main", "cache", "queue"}
        inventory = tmp_path / "prefect" / "runbook-sandbox.toml"
        assert "[postgres.main]" in inventory.read_text()

        def outcomes() -> set[str]:
            ended = {"flow_runs": {"state": {"type": {"any_": ["COMPLETED", "FAILED"]}}}}
            runs = httpx.post(f"{api}/flow_runs/filter", json=ended, timeout=30).json()
            return {r["state_name"] for r in runs}

        # stuck-jobs and postgres-maintenance fix theirs at once, TLS stays unhealthy
        assert poll(
            lambda: {"Fixed", "Unhealthy"} <= outcomes(),
            what="a fixed and an unhealthy run",
            timeout_seconds=180,
            max_delay_seconds=2,
        ).done
        assert "Flow run could not start" not in log.read_text()
        assert not [p for p in session_processes(proc.pid) if "prefect.engine" in p]
    finally:
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    stopped_in = time.monotonic() - started
    out = log.read_text()
    assert proc.returncode == 0, out
    assert stopped_in < 30, out
    assert "Traceback" not in out and "| ERROR" not in out, out
    assert out.rstrip().endswith("Stopped")
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{api}/health", timeout=2)
    assert not inventory.exists()
    assert session_processes(proc.pid) == []
    assert list(tmp.iterdir()) == []  # the sandbox and the server's log removed
    tmp.rmdir()
    # The deployments were paused: no scheduled run is left to make the next start spin.
    with sqlite3.connect(tmp_path / "prefect" / "prefect.db") as db:
        left = db.execute("SELECT count(*) FROM flow_run WHERE state_type = 'SCHEDULED'")
        assert left.fetchone() == (0,)


def session_processes(sid: int) -> list[str]:
    found = subprocess.run(["pgrep", "-a", "-s", str(sid)], capture_output=True, text=True)
    return found.stdout.splitlines()


def test_readme_catalogue_matches_the_catalogue() -> None:
    readme = (ROOT / "README.md").read_text()
    for rb in RUNBOOKS.values():
        kinds = ", ".join(f"`{k}`" for k in rb.actions) or "none"
        row = f"| `{rb.name}` | {rb.seeds} | {rb.triggers} | {rb.changes} | {kinds} |"
        assert row in readme, f"README.md's catalogue needs this row:\n{row}"
        for name, field in rb.params.model_fields.items():
            cell = f"`{name}` [{field.default}]"
            assert cell in readme, f"README.md's parameter table: {rb.name}'s row needs {cell}"
    for routine in ROUTINES.values():
        steps = ", ".join(
            f"`{s.runbook}`" + (" (diagnose only)" if s.diagnose_only else "")
            for s in routine.steps
        )
        row = f"| `{routine.name}` | {routine.seeds} | {routine.triggers} | {steps} |"
        assert row in readme, f"README.md's routines table needs this row:\n{row}"


# Every incident section of the seeds (the team's own runbooks, ../shared/seeds/, not part of
# this repository): (seed, incident) as their headings name them.
SEED_INCIDENTS = [
    ("000 s1", "Redis Crash / Data Loss"),
    ("000 s2", "DB Connection Pool Exhaustion"),
    ("000 s3", "Worker Backlog Spike"),
    ("000 s4", "Disk Full (Log/Upload Bloat)"),
    ("000 s5", "SSL Certificate Expiration"),
    ("000 s6", "Migration Failure"),
    ("000 s7", "AdminJS Crash"),
    ("001", "Postgres unavailable"),
    ("001", "Redis unavailable / rate limiter failing open"),
    ("001", "Excessive login lockouts"),
    ("001", "Metrics endpoint failing authentication"),
    ("001", "Operational tasks: backups, secrets rotation"),
    ("002 s1", "Database Performance Issues"),
    ("002 s2", "Service Downtime"),
    ("002 s3", "SSL Certificate Issues"),
    ("002 s4", "High CPU/Memory Usage"),
    ("002 s5", "Database Connection Pool Exhausted"),
    ("002 s6", "Deployment Failures"),
    ("002", "Routine Maintenance: Daily"),
    ("002", "Routine Maintenance: Weekly"),
    ("002", "Routine Maintenance: Monthly"),
    ("002", "Monitoring Thresholds"),
    ("002", "Suspected Security Breach"),
    ("002", "DDoS Attack"),
    ("002", "Backup Verification"),
    ("002", "Database Recovery"),
    ("002", "Change Management"),
    ("003", "Application Not Responding"),
    ("003", "Database Connection Issues"),
    ("003", "High CPU/Memory Usage"),
    ("003", "SSL Certificate Issues"),
    ("003", "Login Problems"),
    ("003", "Data Corruption"),
    ("003", "Deployment Failures"),
    ("004 s1", "High API Error Rate (5xx)"),
    ("004 s2", "High API Latency"),
    ("004 s3", "PostgreSQL Down / Unreachable"),
    ("004 s4", "Redis Down / Unreachable"),
    ("004 s5", "DB Connection Pool Exhausted"),
    ("004 s6", "Crawler Stuck Jobs"),
    ("004 s7", "SMTP / Email Delivery Failure"),
    ("004 s8", "Object Storage Unreachable"),
    ("004 s9", "Disk Space Critical"),
    ("004 s10", "Memory / OOM"),
    ("004 s11", "Failed Migration"),
    ("004 s12", "Security Incident (Token Compromise)"),
]


def test_every_seed_incident_maps_to_a_runbook_in_the_readme() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("### Every seed incident and its runbook", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if line.startswith("| 00") and len(cells) == 3:
            rows[(cells[0], cells[1])] = [n.strip(" `") for n in cells[2].split(",")]
    assert list(rows) == SEED_INCIDENTS
    for incident, names in rows.items():
        unknown = [n for n in names if n not in RUNBOOKS and n not in ROUTINES]
        assert names and not unknown, (incident, unknown)
