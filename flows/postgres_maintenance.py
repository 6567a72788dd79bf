"""postgres-maintenance: slow queries, bloat and stale statistics (seed 002 s1 and its monthly
checklist, 004 s2): VACUUM (ANALYZE) the tables over the dead-tuple threshold, one at a time."""

from __future__ import annotations

from typing import get_args

from prefect import State

from tasks.engine import run_action, runbook_flow
from tasks.gate import APPROVAL_TIMEOUT_SECONDS, ApprovalTimeout
from tasks.models import AlertInfo, Approval, Finding, Report, Severity
from tasks.postgres import read_table_stats, read_top_queries, read_writability, vacuum_table
from tasks.postgres_rules import (
    MaintenanceAction,
    MaintenanceParams,
    maintenance_findings,
    plan_maintenance,
)
from tasks.run import open_run
from tasks.settings import Settings

RUNBOOK = "postgres-maintenance"


@runbook_flow(RUNBOOK, inventory="postgres", actions=get_args(MaintenanceAction))
def postgres_maintenance(
    target: str,
    dry_run: bool = True,
    approval: Approval = "ask",
    approval_timeout_seconds: ApprovalTimeout = APPROVAL_TIMEOUT_SECONDS,
    params: MaintenanceParams | None = None,
    alert: AlertInfo | None = None,
) -> State[Report]:
    """Top queries, dead tuples, vacuum and analyze age, table and index sizes of one
    PostgreSQL.

    May run VACUUM (ANALYZE) on the tables over the dead-tuple threshold, one at a time,
    bounded by lock and statement timeouts.
    """
    run = open_run(Settings.postgres_target, target, MaintenanceParams, params)
    name, pg, p = run.name, run.target, run.p

    # 1. diagnose
    tables = read_table_stats(name, pg)
    top = read_top_queries(name, pg, p.top_queries)
    before = maintenance_findings(name, tables, top, p)
    standby = read_writability(name, pg).in_recovery
    if standby:
        before.append(
            Finding(
                check="recovery",
                target=name,
                severity=Severity.warning,
                observed=True,
                message="a standby in recovery: its dead-tuple counts are its own, not the "
                "primary's, and VACUUM cannot run here; point this target's dsn at the primary",
            )
        )
    # 2. plan
    actions = [] if standby else plan_maintenance(name, tables, p)
    # 3. gate
    approved = run.gate(actions, before)
    # 4. act: one table at a time, each bounded by lock and statement timeouts
    vacuum = vacuum_table.with_options(timeout_seconds=p.vacuum_timeout_seconds + 30)
    for action in approved:
        run_action(
            action,
            vacuum,
            name,
            pg,
            action.args.schema_name,
            action.args.table,
            p.lock_timeout_seconds,
            p.vacuum_timeout_seconds,
        )
    # 5. verify and report: dead tuples before and after, per table
    after = before
    if approved:
        tables = read_table_stats(name, pg)
        after = maintenance_findings(name, tables, top, p)
        dead = {(t.schema_name, t.table): t.dead_tuples for t in tables}
        for action in approved:
            now = dead.get((action.args.schema_name, action.args.table))
            action.detail += f"; dead tuples {action.args.dead_before} -> {now}"
    return run.finish(before, after, actions)
