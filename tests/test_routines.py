"""The routine schedules against real targets: a real PostgreSQL with a bloated table, one that is
down, a TLS endpoint, a backup restored into a scratch database, a service's health URL. The
summary's rows are checked against the child runs read back from the Prefect API."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest

from deployments.catalog import ROUTINES, RUNBOOKS
from deployments.localpg import free_port
from deployments.routines import routine_monthly, routine_weekly
from tasks.models import RunStatus
from tasks.outcome import state_report
from tasks.routines import RoutineReport, RoutineRow, render_summary, worst_status
from tests.conftest import Db
from tests.test_cli import cli, no_traceback
from tests.test_postgres_maintenance import bloat, dead_tuples
from tests.test_restore_drill import fill, pg_dump, scratch_databases
from tests.tls_helpers import CA, Servers


@pytest.fixture
def servers() -> Iterator[Servers]:
    s = Servers()
    yield s
    s.close()


def child_runs(parent: UUID) -> list[tuple[str, str, str]]:
    """(flow name, run name, state name) of every subflow run of `parent`, from the API."""
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(
                parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[parent])
            )
        )
        flows = {run.flow_id: client.read_flow(run.flow_id).name for run in runs}
    return sorted((flows[r.flow_id], r.name, r.state_name or "") for r in runs)


def ran(report: RoutineReport) -> list[tuple[str, str, str]]:
    """The summary's rows that ran, as child_runs gives them."""
    return sorted(
        (r.runbook, r.target or "", r.status.value.capitalize())
        for r in report.rows
        if r.status is not None
    )


def summary_artifact(key: str) -> str:
    from prefect import get_client

    with get_client(sync_client=True) as client:
        found = client.read_latest_artifacts()
    (artifact,) = [a for a in found if a.key == key]
    return str(artifact.data)


@pytest.mark.usefixtures("prefect_api")
def test_weekly_reviews_every_target_and_a_target_down_fails_alone(
    db: Db, tmp_path: Path, servers: Servers
) -> None:
    bloat(db)
    ca = CA(tmp_path, "Routine CA")
    port = servers.tls(*ca.issue("app", ["app.test"], days=90))
    dead = free_port()  # nothing listens: that PostgreSQL is down
    db.write_config(
        f'[postgres.down]\ndsn = "postgresql://app@127.0.0.1:{dead}/app?connect_timeout=2"\n'
        f'[tls.app]\nhost = "127.0.0.1"\nport = {port}\nserver_name = "app.test"\n'
        f'ca_file = "{ca.pem}"\n'
    )

    # As scheduled: the registry's parameters of its scheduled runs (a review: dry runs).
    assert ROUTINES["routine-weekly"].scheduled == {"dry_run": True}
    state = routine_weekly(**ROUTINES["routine-weekly"].scheduled, return_state=True)
    report = state_report(state)
    assert isinstance(report, RoutineReport)

    rows = {(r.runbook, r.target): r for r in report.rows}
    # The target that is down fails; the others still ran, after it and before it.
    assert rows["postgres-maintenance", "down"].status is RunStatus.failed
    assert "127.0.0.1" in rows["postgres-maintenance", "down"].detail
    assert rows["postgres-maintenance", "main"].status is RunStatus.unhealthy
    assert rows["tls-certificates", "all"].status is RunStatus.healthy
    assert dead_tuples(db, "event") >= 20000  # a review: nothing vacuumed
    assert all(r.dry_run for r in report.rows)
    # The routine ends with the worst, in a runbook's final states.
    assert report.status is RunStatus.failed and report.exit_code == 3
    assert state.is_failed() and state.name == "Failed"
    # Its rows are its child runs, as the Prefect API has them.
    assert report.flow_run_id is not None
    assert (
        child_runs(UUID(report.flow_run_id))
        == ran(report)
        == [
            ("postgres-maintenance", "down", "Failed"),
            ("postgres-maintenance", "main", "Unhealthy"),
            ("tls-certificates", "all", "Healthy"),
        ]
    )
    # One summary artifact, linking each child run.
    summary = summary_artifact("routine-weekly")
    for row in report.rows:
        assert f"/runs/flow-run/{row.flow_run_id})" in summary


@pytest.mark.usefixtures("prefect_api")
def test_monthly_vacuums_and_drills_only_when_its_run_acts(db: Db, tmp_path: Path) -> None:
    fill(db)
    bloat(db)
    backups = tmp_path / "backups"
    backups.mkdir()
    pg_dump(db, backups / "app-1.dump", "-Fc")

    # By hand, with no flags, before any backup set is configured: the routine is a dry run,
    # and so is every runbook in it; the drill has no target, which the summary says.
    planned = state_report(routine_monthly(return_state=True))
    assert isinstance(planned, RoutineReport)
    assert dead_tuples(db, "event") >= 20000
    assert [(r.runbook, r.target, r.status, r.dry_run) for r in planned.rows] == [
        ("postgres-maintenance", "main", RunStatus.unhealthy, True),
        ("restore-drill", None, None, None),
    ]
    assert "no configured target: add a [backups.NAME] with a scratch target" in (
        planned.rows[1].detail
    )
    assert planned.status is RunStatus.unhealthy

    db.write_config(
        f'[postgres.scratch]\ndsn = "{db.server.dsn_for("postgres")}"\n'
        f'[backups.app]\ndirectory = "{backups}"\ndatabase = "main"\nscratch = "scratch"\n'
        'checks = ["SELECT count(*) = 500 FROM items"]\n'
    )

    # As scheduled: both runbooks have earned acting on their own schedule (the registry),
    # so the routine's scheduled runs act, each through its own gate.
    scheduled = ROUTINES["routine-monthly"].scheduled
    assert scheduled == {"dry_run": False, "approval": "auto"}
    state = routine_monthly(**scheduled, return_state=True)
    report = state_report(state)
    assert isinstance(report, RoutineReport)
    statuses = {(r.runbook, r.target): r.status for r in report.rows}
    assert statuses["postgres-maintenance", "main"] is RunStatus.fixed
    assert dead_tuples(db, "event") == 0
    assert statuses["restore-drill", "app"] is RunStatus.healthy
    assert scratch_databases(db.server) == []
    # Fixed is the worst of its rows (the scratch server's database needed nothing).
    assert report.status is RunStatus.fixed is worst_status(report.rows)
    assert state.is_completed() and state.name == "Fixed"
    assert report.flow_run_id is not None
    assert child_runs(UUID(report.flow_run_id)) == ran(report)


def test_daily_from_the_cli_runs_every_runbook_and_exits_with_the_worst(
    db: Db, prefect_api: str, tmp_path: Path
) -> None:
    """`runbook run routine-daily --json` against a real service's health URLs and a real
    dump in a backup directory; disk-space may not be installed: the summary says so."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    from threading import Thread

    class Health(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = b'{"status": "ok"}'
            self.send_response(200 if self.path == "/health" else 503)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Health)
    Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        fill(db, rows=10)
        backups = tmp_path / "backups"
        backups.mkdir()
        pg_dump(db, backups / "app-1.dump", "-Fc")
        db.write_config(
            f'[backups.app]\ndirectory = "{backups}"\n'
            f'[services.api]\nkind = "command"\nhealth_url = "{base}/health"\n'
            'status_command = ["true"]\nrestart_command = ["true"]\n'
            f'[services.worker]\nkind = "command"\nhealth_url = "{base}/down"\n'
            'status_command = ["true"]\nrestart_command = ["true"]\n'
        )
        env = {"PREFECT_API_URL": prefect_api, "RUNBOOK_CONFIG": str(db.config)}
        proc = cli("run", "routine-daily", "--json", env=env)
        no_traceback(proc)
        report = RoutineReport.model_validate_json(proc.stdout)
        # The worker's health URL answers 503: service-health is unhealthy, and so the
        # routine; its exit code is a runbook's for that status.
        assert proc.returncode == 1 == report.exit_code, proc.stderr
        rows = {r.runbook: r for r in report.rows}
        assert rows["service-health"].status is RunStatus.unhealthy
        assert rows["backup-verification"].target == "app"
        assert rows["backup-verification"].status in (RunStatus.healthy, RunStatus.unhealthy)
        # No [disk.*] target: a "not run" row saying what to add.
        assert rows["disk-space"].status is None and "[disk." in rows["disk-space"].detail
        assert report.flow_run_id is not None
        assert child_runs(UUID(report.flow_run_id)) == ran(report)

        bad = cli("run", "routine-daily", "--target", "api", env=env)
        assert bad.returncode == 2 and "--target" in bad.stderr
        no_traceback(bad)
    finally:
        server.shutdown()
        server.server_close()


def test_the_summary_escapes_and_links() -> None:
    from datetime import UTC, datetime

    at = datetime(2026, 12, 1, tzinfo=UTC)
    rows = [
        RoutineRow(
            runbook="a",
            target="x|y",
            status=RunStatus.fixed,
            dry_run=False,
            flow_run_id="1",
            link="http://ui/runs/flow-run/1",
            detail="two\nlines",
        ),
        RoutineRow(runbook="b", target=None, status=None, detail="no configured target"),
    ]
    report = RoutineReport(
        routine="r",
        dry_run=False,
        status=worst_status(rows),
        rows=rows,
        started_at=at,
        finished_at=at,
    )
    text = render_summary(report)
    assert report.status is RunStatus.fixed
    assert "| a | x\\|y | fixed | [1](http://ui/runs/flow-run/1) | two lines |" in text
    assert "| b | - | not run |  | no configured target |" in text
    assert worst_status([]) is RunStatus.healthy
    assert json.loads(report.model_dump_json())["status"] == "fixed"


def test_every_step_names_a_runbook_and_scheduled_runs_act_only_where_earned() -> None:
    for routine in ROUTINES.values():
        assert routine.load().name == routine.name
        for step in routine.steps:
            assert step.runbook in RUNBOOKS, (routine.name, step.runbook)
        if not routine.scheduled["dry_run"]:
            for step in routine.runbooks:
                own = RUNBOOKS[step.runbook].scheduled
                assert step.diagnose_only or not own.get("dry_run", True), step
