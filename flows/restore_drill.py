"""restore-drill: does the newest backup (or a chosen one) restore, and how long does it take?
Restores it into a scratch database, runs the configured checks, compares its tables with the
source, reports RTO and RPO, and always drops the scratch database (seed 002 "Database
Recovery" and its monthly disaster recovery drill)."""

from __future__ import annotations

import time
import uuid
from datetime import datetime

from prefect import flow

from tasks.backup_rules import storage_finding
from tasks.drill_rules import (
    DRILL_DB_PREFIX,
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
    list_tables,
    on_database,
    restore_backup,
    run_checks,
)
from tasks.engine import finish, run_action
from tasks.errors import TargetUnreachable
from tasks.gate import Approval, gate
from tasks.models import Action, Finding, Report, utcnow
from tasks.settings import load_settings
from tasks.storage import backups_location, list_backups

RUNBOOK = "restore-drill"


@flow(name=RUNBOOK, flow_run_name="{target}")
def restore_drill(
    target: str,
    dry_run: bool = True,
    approval: Approval = "ask",
    params: RestoreDrillParams | None = None,
) -> Report:
    started = utcnow()
    settings = load_settings()
    name, cfg = settings.target("backups", target)
    p = RestoreDrillParams.resolve(params, {}, f"{RUNBOOK} on {name}")
    source = settings.postgres_target(cfg.database) if cfg.database else None
    scratch_name, scratch = refuse_source(
        name, cfg, settings.postgres_target(cfg.scratch) if cfg.scratch else None, source
    )
    s3 = settings.s3[cfg.s3] if cfg.s3 else None
    where = backups_location(cfg, s3)
    dbname = f"{DRILL_DB_PREFIX}{uuid.uuid4().hex[:12]}"

    # 1. diagnose: which backup
    try:
        backup = pick_backup(list_backups(name, cfg, s3), p.backup)
    except TargetUnreachable as exc:
        return _report(name, dry_run, started, [storage_finding(name, str(exc))], [])
    before = [chosen_finding(name, where, backup, p.backup, utcnow(), p)]
    # 2. plan
    actions = plan_drill(name, backup, scratch_name, dbname)
    # 3. gate
    approved = gate(actions, dry_run=dry_run, approval=approval)
    if not approved or backup is None:
        return _report(name, dry_run, started, before, actions)
    # 4. act: restore, check, and drop whatever happens
    drill = approved[0]
    clock = time.perf_counter()
    if run_action(drill, create_scratch_database, scratch_name, scratch, dbname) is None:
        return _report(name, dry_run, started, before, actions)
    try:
        restore = restore_backup(name, cfg, s3, backup.key, scratch_name, scratch, dbname)
        checks, restored_tables = [], None
        if restore.ok:
            checks = run_checks(name, scratch, dbname, cfg.checks, p.check_timeout_seconds)
            restored_tables = list_tables(name, on_database(scratch, dbname))
        rto = time.perf_counter() - clock
    finally:
        dropped = drop_scratch_database(scratch_name, scratch, dbname)
    source_tables = list_tables(*source) if source and restored_tables is not None else None
    drill.detail = f"{restore.detail}; {sum(c.ok for c in checks)}/{len(checks)} checks passed"
    # 5. verify and report
    after = before + drill_findings(
        name, restore, checks, restored_tables, source_tables, rto, dropped, p
    )
    return _report(name, dry_run, started, before, actions, after)


def _report(
    name: str,
    dry_run: bool,
    started: datetime,
    before: list[Finding],
    actions: list[Action],
    after: list[Finding] | None = None,
) -> Report:
    return finish(
        RUNBOOK,
        name,
        dry_run=dry_run,
        started_at=started,
        before=before,
        after=before if after is None else after,
        actions=actions,
    )
