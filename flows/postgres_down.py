"""postgres-down: PostgreSQL unreachable (seeds 001 "Postgres unavailable", 002 s2, 003
"Database Connection Issues", 004 s3): status, logs and disk of its service, a gated restart,
and readiness awaited with backoff."""

from __future__ import annotations

from typing import get_args

from prefect import State

from tasks.engine import run_action, runbook_flow
from tasks.errors import RunbookError
from tasks.gate import APPROVAL_TIMEOUT_SECONDS, ApprovalTimeout
from tasks.host import read_disk_usage
from tasks.maintenance import MaintenancePair
from tasks.migration_rules import migration_findings
from tasks.migrations import read_migrations
from tasks.models import AlertInfo, Approval, Finding, Report, Severity
from tasks.postgres import Probe, await_postgres_ready, probe_postgres
from tasks.run import open_run
from tasks.service_rules import (
    PostgresDownAction,
    PostgresDownParams,
    disk_finding,
    logs_finding,
    plan_postgres_restart,
    reachability,
    status_finding,
)
from tasks.services import restart_service, service_logs, service_status
from tasks.settings import PostgresTarget, Settings

RUNBOOK = "postgres-down"


def migrations_after_restart(name: str, pg: PostgresTarget) -> list[Finding]:
    """failed-migration's findings once the server answers again; a check that cannot run
    (migrations misconfigured, no privilege) is a warning saying so, not the end of a run whose
    restart worked."""
    try:
        return migration_findings(name, read_migrations(name, pg))
    except RunbookError as exc:
        return [
            Finding(
                check="migrations",
                target=name,
                severity=Severity.warning,
                message=f"migrations not checked after the restart: {exc}",
            )
        ]


@runbook_flow(RUNBOOK, inventory="postgres", actions=get_args(PostgresDownAction))
def postgres_down(
    target: str,
    dry_run: bool = True,
    approval: Approval = "ask",
    approval_timeout_seconds: ApprovalTimeout = APPROVAL_TIMEOUT_SECONDS,
    params: PostgresDownParams | None = None,
    alert: AlertInfo | None = None,
) -> State[Report]:
    """Whether PostgreSQL answers SELECT 1; when it does not: its service's status, last log
    lines and the disk of its data directory.

    May restart its service (never while it is recovering or when credentials are refused),
    then waits for it to answer; once it answers, reports a failed or dirty migration
    (failed-migration's checks). With the target's maintenance_service, the application is
    put in maintenance before the restart and taken out once it verifies (seed 004 s3 step 6).
    """
    run = open_run(Settings.postgres_target, target, PostgresDownParams, params)
    name, pg, p = run.name, run.target, run.p
    svc = run.settings.service(pg.service) if pg.service else None

    def diagnose() -> tuple[Probe, list[Finding]]:
        probe = probe_postgres(name, pg)
        found = [reachability(name, probe)]
        if not probe.ok and svc is not None and pg.service is not None:
            found.append(status_finding(name, pg.service, service_status(pg.service, svc)))
            found.append(logs_finding(name, pg.service, service_logs(pg.service, svc)))
        if pg.data_directory and (disk := read_disk_usage(pg.data_directory)):
            found.append(disk_finding(name, disk))
        return probe, found

    # 1. diagnose
    probe, before = diagnose()
    maintenance = MaintenancePair.read(run.settings, name, pg.maintenance_service)
    before += maintenance.findings
    # 2. plan: a restart, only when the server is down (not when credentials are wrong, nor
    # while it is starting up or recovering); in maintenance around it when configured
    actions = maintenance.around(plan_postgres_restart(name, probe, pg, svc is not None, p))
    # 3. gate
    approved = run.gate(actions, before)
    # 4. act: maintenance on first, then the restart
    for action in maintenance.enter(approved):
        assert svc is not None and pg.service is not None
        if run_action(action, restart_service, pg.service, svc) is not None:
            waited = await_postgres_ready(name, pg, p.ready_timeout_seconds)
            action.detail += (
                f"; ready after {waited:.1f} s"
                if waited is not None
                else f"; not ready within {p.ready_timeout_seconds:g} s"
            )
    # 5. verify and report
    after = before
    if approved:
        probe, after = diagnose()
        # Seed 004 s3: a migration cut off by the outage shows once the server is back.
        if probe.ok:
            after += migrations_after_restart(name, pg)
        # Out of maintenance only when it verifies; else the app stays in and the report says so.
        after += maintenance.leave(after)
    return run.finish(before, after, actions)
