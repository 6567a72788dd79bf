"""prefect.yaml and `runbook serve` agree with the catalogue; the sandbox plants real incidents
and serve leaves nothing running when stopped."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psycopg
import pytest
import yaml

from deployments.localpg import free_port
from deployments.sandbox import Sandbox
from deployments.serve import alert_trigger_spec, build_deployments
from flows.catalog import RUNBOOKS
from tasks.settings import load_settings

ROOT = Path(__file__).resolve().parents[1]


def test_prefect_yaml_matches_the_catalogue() -> None:
    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    by_flow = {}
    for d in spec["deployments"]:
        path, function = d["entrypoint"].split(":")
        module = path.removesuffix(".py").replace("/", ".")
        by_flow[f"{module}:{function}"] = d
    assert set(by_flow) == {rb.entrypoint for rb in RUNBOOKS.values()}
    for rb in RUNBOOKS.values():
        d = by_flow[rb.entrypoint]
        assert [s["cron"] for s in d.get("schedules", [])] == ([rb.cron] if rb.cron else [])
        assert {k: v for k, v in d["parameters"].items() if k != "target"} == rb.scheduled
        flow = rb.load()
        assert flow.name == rb.name
        assert set(d["parameters"]) <= set(flow.parameters.properties)
        assert d["triggers"] == [alert_trigger_spec(rb.name, d["parameters"]["target"])]


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
    event = {
        "payload": {"parameters": {"dry_run": False, "approval": "auto", "params": params}},
        "resource": {"runbook.target": "{{ 7 * 7 }}"},
    }
    rendered = hydrate(
        spec["parameters"], HydrationContext(render_jinja=True, jinja_context={"event": event})
    )
    assert rendered == {"target": "main", "dry_run": False, "approval": "auto", "params": params}
    event["payload"]["parameters"]["approval"] = "{{ 7 * 7 }}"
    rendered = hydrate(
        spec["parameters"], HydrationContext(render_jinja=True, jinja_context={"event": event})
    )
    assert rendered["approval"] == "{{ 7 * 7 }}"


def test_sandbox_plants_incidents_and_serve_builds_its_deployments() -> None:
    box = Sandbox().start()
    try:
        settings = load_settings(box.config)
        deployments = build_deployments(settings, in_sandbox=True)
        assert {d.flow_name for d in deployments} == set(RUNBOOKS)
        assert all(d.parameters["dry_run"] is False for d in deployments)
        assert all(
            [t.match.model_dump() for t in d.triggers]
            == [{"runbook.runbook": d.flow_name, "runbook.target": d.name}]
            for d in deployments
        )
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


@pytest.mark.timeout(240)
def test_serve_starts_everything_and_sigterm_stops_it(tmp_path: Path) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API", "RUNBOOK_"))}
    env["PREFECT_HOME"] = str(tmp_path / "prefect")
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "runbook"), "serve", "--port", str(port)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    api = f"http://127.0.0.1:{port}/api"
    try:
        deadline = time.monotonic() + 150
        names: list[str] = []
        while time.monotonic() < deadline and len(names) < len(RUNBOOKS):
            time.sleep(2)
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            try:
                flows = httpx.post(f"{api}/flows/filter", json={}, timeout=2).json()
                names = [f["name"] for f in flows]
                deployed = httpx.post(f"{api}/deployments/filter", json={}, timeout=2).json()
            except httpx.HTTPError:
                continue
            if len(deployed) < len(RUNBOOKS):
                names = []
        assert sorted(names) == sorted(RUNBOOKS)
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    sandbox_dir = next(
        line.split(": ", 1)[1].strip()
        for line in out.splitlines()
        if line.startswith("Sandbox inventory:")
    )
    assert not Path(sandbox_dir).exists()  # the sandbox's PostgreSQL was stopped and removed
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{api}/health", timeout=2)
    leftovers = subprocess.run(["pgrep", "-f", Path(sandbox_dir).name], capture_output=True)
    assert leftovers.returncode == 1


def test_readme_catalogue_matches_the_catalogue() -> None:
    readme = (ROOT / "README.md").read_text()
    for rb in RUNBOOKS.values():
        assert f"| `{rb.name}` | {rb.seeds} | {rb.triggers} | {rb.changes} |" in readme
        for name, field in rb.params.model_fields.items():
            assert f"`{name}` [{field.default}]" in readme, name
