"""service-health against an HTTP app on loopback whose health endpoint really checks a real
PostgreSQL; resource-pressure on the host's real figures."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from deployments.localpg import LocalPostgres
from deployments.sandbox import HealthApp
from flows.resource_pressure import resource_pressure
from flows.service_health import service_health
from tasks.models import ActionStatus, RunStatus, Severity
from tasks.services import proc_stats

pytestmark = pytest.mark.usefixtures("prefect_api")


class App(HealthApp):
    """The sandbox's health app, plus: 500 while `broken` exists (the app itself is stuck),
    and `mode` = "text" for a body that says JSON but is not."""

    def __init__(self, dsn: str, tmp: Path) -> None:
        self.broken, self.mode = tmp / "broken", "json"
        super().__init__(dsn)

    def answer(self) -> tuple[int, object]:
        if self.broken.exists():
            return 500, {"status": "error"}
        if self.mode == "text":
            return 200, "OK"
        return super().answer()


@pytest.fixture
def stack(tmp_path: Path, inventory: Any) -> Iterator[tuple[LocalPostgres, App]]:
    pg = LocalPostgres().start()
    app = App(pg.dsn, tmp_path)
    inventory(
        f'[postgres.main]\ndsn = "{pg.dsn}"\nservice = "db"\n'
        f'[services.db]\nkind = "command"\nstatus_command = {json.dumps(pg.ctl_argv("status"))}\n'
        f"start_command = {json.dumps(pg.ctl_argv('start'))}\n"
        f"restart_command = {json.dumps(pg.ctl_argv('restart'))}\n"
        f'[services.api]\nkind = "command"\nhealth_url = "{app.url}"\ntimeout_seconds = 5\n'
        f'status_command = ["true"]\nrestart_command = ["rm", "-f", "{app.broken}"]\n'
    )
    yield pg, app
    app.close()
    pg.stop()


def test_healthy_app(stack: Any) -> None:
    report = service_health()
    assert report.status is RunStatus.healthy
    assert {f.check for f in report.findings} == {"http", "component.database", "component.redis"}


def test_database_error_goes_to_postgres_down_not_an_app_restart(stack: Any) -> None:
    pg, _ = stack
    pg.stop(remove=False)
    plan = service_health()
    assert plan.status is RunStatus.unhealthy
    db = next(f for f in plan.findings if f.check == "component.database")
    assert db.severity is Severity.critical and db.observed == "error"
    assert [a.kind for a in plan.actions] == ["handoff"]  # no restart of the app
    assert "postgres-down on main: unhealthy" in plan.actions[0].detail  # a dry run hand-off
    assert not pg.is_running()

    report = service_health(dry_run=False, approval="auto")
    assert report.actions[0].detail == "postgres-down on main: fixed"
    assert report.status is RunStatus.fixed
    assert pg.is_running()


def test_stuck_app_gets_a_gated_restart(stack: Any) -> None:
    _, app = stack
    app.broken.touch()
    assert service_health(dry_run=False, approval="ask").actions[0].status is ActionStatus.skipped
    assert app.broken.exists()
    report = service_health(dry_run=False, approval="auto")
    assert report.actions[0].kind == "restart_service"
    assert report.actions[0].detail.endswith("answering again")
    assert report.status is RunStatus.fixed


def test_ready_timeout_of_the_service_itself(stack: Any, inventory: Any) -> None:
    # A restart that does not help: the wait for an answer is the service's own threshold.
    _, app = stack
    app.broken.touch()
    text = (
        Path(os.environ["RUNBOOK_CONFIG"])
        .read_text()
        .replace(f'restart_command = ["rm", "-f", "{app.broken}"]', 'restart_command = ["true"]')
    )
    inventory(text + "[services.api.thresholds]\nready_timeout_seconds = 1\n")
    report = service_health(dry_run=False, approval="auto")
    assert report.actions[0].description.endswith("wait up to 1 s for it to answer")
    assert report.actions[0].detail.endswith("not answering within 1 s")
    assert report.status is RunStatus.unhealthy


def test_body_that_is_not_json(stack: Any) -> None:
    _, app = stack
    app.mode = "text"
    report = service_health(params={"service": "api"})
    http = report.findings[0]
    assert http.severity is Severity.ok and "is not JSON" in http.message


def test_resource_pressure_reads_the_host_and_reports_services(stack: Any) -> None:
    report = resource_pressure(params={"memory_percent": 99.9})
    checks = {f.check for f in report.findings}
    assert {"host_memory", "host_load", "resources"} <= checks
    host = next(f for f in report.findings if f.check == "host_memory")
    assert 0 < host.observed < 100


def test_proc_stats_of_a_real_process() -> None:
    import os

    stats = proc_stats(os.getpid(), interval=0.2)
    assert stats.memory_bytes and stats.memory_bytes > 10 * 2**20
    assert stats.cpu_percent is not None and stats.cpu_percent >= 0
