"""pre-change-backup: a custom-format pg_dump of the backup set's database, straight to its S3
prefix or directory with a checksum, read back and verified before the change goes ahead
(seed 002 change management: "create backup" before any change)."""

from __future__ import annotations

from typing import get_args

from prefect import State

from tasks.backups import verify_backup
from tasks.drill_rules import PreChangeAction, PreChangeParams, dump_findings, plan_dump
from tasks.dumps import Dump, dump_key, dump_to_storage
from tasks.engine import run_action, runbook_flow
from tasks.errors import ConfigError
from tasks.gate import APPROVAL_TIMEOUT_SECONDS, ApprovalTimeout
from tasks.models import AlertInfo, Approval, Report
from tasks.run import open_run
from tasks.settings import Settings

RUNBOOK = "pre-change-backup"


@runbook_flow(RUNBOOK, inventory="backups", actions=get_args(PreChangeAction))
def pre_change_backup(
    target: str,
    dry_run: bool = True,
    approval: Approval = "ask",
    approval_timeout_seconds: ApprovalTimeout = APPROVAL_TIMEOUT_SECONDS,
    params: PreChangeParams | None = None,
    alert: AlertInfo | None = None,
) -> State[Report]:
    """A custom-format pg_dump of the set's database, written to its S3 prefix or directory
    with a checksum, read back and verified.

    Writes one new dump and its .sha256 to the backup storage.
    """
    run = open_run(Settings.backup_set, target, PreChangeParams, params)
    name, cfg, p = run.name, run.target, run.p
    s3 = run.settings.storage_of(cfg)
    if cfg.database is None:
        raise ConfigError(f"backups.{name}.database is not set: name the [postgres.NAME] to dump")
    source_name, source = run.settings.postgres_target(cfg.database)
    key = dump_key(cfg, s3, source_name, p.label, run.started_at.strftime("%Y%m%dT%H%M%SZ"))
    where = f"s3://{s3.bucket}/{key}" if s3 else key

    # 1. diagnose: nothing to look at before; the dump itself is the check
    # 2. plan
    actions = plan_dump(name, source_name, source, where)
    # 3. gate
    approved = run.gate(actions, [])
    # 4. act
    dump: Dump | None = None
    if approved:
        dump = run_action(approved[0], dump_to_storage, name, cfg, s3, key, source_name, source)
    # 5. verify: read it back as backup-verification would
    integrity = verify_backup(name, cfg, s3, dump.key) if dump else None
    if dump is not None:
        approved[0].detail = f"{dump.size} bytes in {dump.seconds:.1f} s"
    return run.finish([], dump_findings(name, dump, integrity), actions)
