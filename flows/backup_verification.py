"""backup-verification: is the newest backup there, recent, of a plausible size, readable
to its end and the checksum it claims? (seed 002 "Backup & Recovery", its daily checklist)"""

from __future__ import annotations

from prefect import State

from tasks.backup_rules import BackupParams, backup_findings, storage_finding
from tasks.backups import backups_location, list_backups, verify_backup
from tasks.engine import runbook_flow
from tasks.errors import AuthenticationFailed, TargetUnreachable
from tasks.models import AlertInfo, Approval, Report, utcnow
from tasks.run import open_run
from tasks.settings import Settings

RUNBOOK = "backup-verification"


@runbook_flow(RUNBOOK, inventory="backups", actions=())
def backup_verification(
    target: str,
    dry_run: bool = True,
    approval: Approval = "ask",
    params: BackupParams | None = None,
    alert: AlertInfo | None = None,
) -> State[Report]:
    """The newest backup of a set: its age, its size against the previous one, a full read
    (gzip or pg_restore --list) and its checksum.

    Nothing: read-only.
    """
    run = open_run(Settings.backup_set, target, BackupParams, params)
    name, cfg = run.name, run.target
    s3 = run.settings.storage_of(cfg)
    where = backups_location(cfg, s3)

    # 1. diagnose (read-only: this runbook plans, gates and changes nothing)
    try:
        backups = list_backups(name, cfg, s3)
        integrity = verify_backup(name, cfg, s3, backups[0].key) if backups else None
        findings = backup_findings(name, where, cfg, backups, integrity, utcnow())
    except (TargetUnreachable, AuthenticationFailed) as exc:
        findings = [storage_finding(name, str(exc))]
    # 5. report
    return run.finish(findings, findings, [])
