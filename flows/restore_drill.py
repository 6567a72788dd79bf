"""restore-drill: does the newest backup (or a chosen one) restore, and how long does it take?
Restores it into a scratch database, runs the configured checks, compares its tables with the
source, reports RTO and RPO, and always drops the scratch database (seed 002 "Database
Recovery" and its monthly disaster recovery drill)."""

from __future__ import annotations

import time
import uuid
from typing import get_args

from prefect import State

from tasks.backup_rules import storage_finding
from tasks.backups import backups_location, list_backups
from tasks.drill_rules import (
    DRILL_DB_PREFIX,
    RestoreDrillAction,
    RestoreDrillParams,
    chosen_finding,
    drill_findings,
    pick_backup,
    plan_drill,
    refuse_source,
)
from tasks.dumps import (
    create_scratch_database,
    drop_scratch_database,
    libpq_env,
    list_tables,
    on_database,
    restore_backup,
    run_checks,
)
from tasks.engine import run_action, runbook_flow
from tasks.errors import AuthenticationFailed, RunbookError, TargetUnreachable
from tasks.gate import APPROVAL_TIMEOUT_SECONDS, ApprovalTimeout
from tasks.models import ActionStatus, AlertInfo, Approval, Report, utcnow
from tasks.run import open_run
from tasks.settings import PostgresTarget, Settings

RUNBOOK = "restore-drill"


@runbook_flow(RUNBOOK, inventory="backups", actions=get_args(RestoreDrillAction))
def restore_drill(
    target: str,
    dry_run: bool = True,
    approval: Approval = "ask",
    approval_timeout_seconds: ApprovalTimeout = APPROVAL_TIMEOUT_SECONDS,
    params: RestoreDrillParams | None = None,
    alert: AlertInfo | None = None,
) -> State[Report]:
    """Whether the newest (or a chosen) backup restores: into a scratch database, with the
    configured checks, its tables compared with the source's, RTO and RPO reported.

    Creates and drops a scratch database on the scratch target's server; never touches the
    source database.
    """
    run = open_run(Settings.backup_set, target, RestoreDrillParams, params)
    name, cfg, p = run.name, run.target, run.p
    s3 = run.settings.storage_of(cfg)
    source = run.settings.postgres_target(cfg.database) if cfg.database else None
    scratch_name, scratch = refuse_source(
        name, run.settings.postgres_target(cfg.scratch) if cfg.scratch else None, source
    )
    libpq_env(scratch_name, scratch)  # a DSN pg_restore cannot use fails now, not half-way
    where = backups_location(cfg, s3)
    dbname = f"{DRILL_DB_PREFIX}{uuid.uuid4().hex[:12]}"

    # 1. diagnose: which backup
    try:
        backup = pick_backup(list_backups(name, cfg, s3), p.backup)
    except (TargetUnreachable, AuthenticationFailed) as exc:
        unreachable = [storage_finding(name, str(exc))]
        return run.finish(unreachable, unreachable, [])
    before = [chosen_finding(name, where, backup, p.backup, utcnow(), p)]
    # 2. plan
    actions = plan_drill(name, backup, scratch_name, dbname)
    # 3. gate
    approved = run.gate(actions, before)
    if not approved or backup is None:
        return run.finish(before, before, actions)
    # 4. act: restore, check, and drop whatever happens
    drill = approved[0]
    clock = time.perf_counter()
    restore, checks, restored_tables, stopped = None, [], None, None
    if run_action(drill, create_scratch_database, scratch_name, scratch, dbname) is not None:
        try:
            restore = restore_backup(name, cfg, s3, backup.key, scratch_name, scratch, dbname)
            if restore.ok:
                checks = run_checks(name, scratch, dbname, cfg.checks, p.check_timeout_seconds)
                restored_tables = list_tables(name, on_database(scratch, dbname))
        except RunbookError as exc:
            stopped = str(exc)
    rto = time.perf_counter() - clock
    dropped = _drop(scratch_name, scratch, dbname)  # also after a failed create: it may exist
    source_tables = list_tables(*source) if source and restored_tables is not None else None
    if stopped:
        drill.status, drill.detail = ActionStatus.failed, f"the drill stopped: {stopped}"
    elif restore is not None:
        passed = sum(c.ok for c in checks)
        drill.detail = f"{restore.detail}; {passed}/{len(checks)} checks passed"
    # 5. verify and report
    after = before + drill_findings(
        name, restore, checks, restored_tables, source_tables, rto, dropped, p
    )
    return run.finish(before, after, actions)


def _drop(scratch_name: str, scratch: PostgresTarget, dbname: str) -> bool:
    try:
        return drop_scratch_database(scratch_name, scratch, dbname)
    except RunbookError:
        return False  # the report says to drop it by hand
