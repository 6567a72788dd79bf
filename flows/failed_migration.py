"""failed-migration: a Prisma migration that failed or a golang-migrate version left dirty
(seeds 000 s6, 002 s6, 003 "Deployment Failures", 004 s11, and 004 s3 after a restart) is
reported with its error and whether it partially applied, then marked resolved."""

from __future__ import annotations

from typing import get_args

from prefect import State

from tasks.engine import run_action, runbook_flow
from tasks.gate import APPROVAL_TIMEOUT_SECONDS, ApprovalTimeout
from tasks.migration_rules import (
    ForceVersion,
    MigrationAction,
    MigrationParams,
    PrismaResolve,
    migration_findings,
    plan_migrations,
)
from tasks.migrations import force_migration_version, read_migrations, resolve_prisma_migration
from tasks.models import AlertInfo, Approval, Report
from tasks.run import open_run
from tasks.settings import Settings

RUNBOOK = "failed-migration"


@runbook_flow(RUNBOOK, inventory="postgres", actions=get_args(MigrationAction))
def failed_migration(
    target: str,
    dry_run: bool = True,
    approval: Approval = "ask",
    approval_timeout_seconds: ApprovalTimeout = APPROVAL_TIMEOUT_SECONDS,
    params: MigrationParams | None = None,
    alert: AlertInfo | None = None,
) -> State[Report]:
    """Prisma's _prisma_migrations (a row neither finished nor rolled back: a failed
    migration, with its logs) and golang-migrate's schema_migrations (dirty at a version) in
    the target database; with migrations_dir, whether the failed migration's tables, columns,
    indexes and constraints exist (did it partially apply?).

    May write what `prisma migrate resolve --rolled-back|--applied NAME` or `migrate force V`
    writes, never when the database contradicts it (a partially applied migration is
    refused, with what to undo by hand).
    """
    run = open_run(Settings.postgres_target, target, MigrationParams, params)
    name, pg, p = run.name, run.target, run.p

    # 1. diagnose
    tables = read_migrations(name, pg)
    before = migration_findings(name, tables)
    # 2. plan
    actions = plan_migrations(name, tables, p)
    # 3. gate
    approved = run.gate(actions, before)
    # 4. act
    for action in approved:
        if isinstance(action.args, PrismaResolve):
            run_action(action, resolve_prisma_migration, name, pg, action.args)
        elif isinstance(action.args, ForceVersion):
            run_action(action, force_migration_version, name, pg, action.args)
    # 5. verify and report
    after = migration_findings(name, read_migrations(name, pg)) if approved else before
    return run.finish(before, after, actions)
