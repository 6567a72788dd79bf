"""disk-space: how full each configured filesystem is (space and inodes), what fills it (the
largest entries, container logs, tables, old backups and partitions), and the cleanup of seed
000 s4 "Disk Full (Log/Upload Bloat)" and seed 004 s9 "Disk Space Critical" (alert
DiskUsageHigh), judged by seed 002's thresholds (over 80 % a warning, over 90 % critical)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import get_args

from prefect import State

from tasks.backups import Backup, list_backups
from tasks.disk import (
    container_log_files,
    device_of,
    largest_entries,
    read_path_usage,
    truncate_container_log,
)
from tasks.disk_rules import (
    DatedTable,
    DiskAction,
    DiskParams,
    LogFile,
    LogRef,
    PartitionDisk,
    PartitionRef,
    backup_findings,
    freed_findings,
    log_findings,
    months_before,
    partition_disk,
    partition_findings,
    plan_partition_drops,
    plan_truncations,
    pressured,
    table_findings,
    usage_findings,
    walk_findings,
)
from tasks.engine import run_action, runbook_flow
from tasks.errors import TargetError
from tasks.gate import APPROVAL_TIMEOUT_SECONDS, ApprovalTimeout
from tasks.host import DiskUsage
from tasks.models import Action, AlertInfo, Approval, Finding, Report, Severity, utcnow
from tasks.partitions import drop_partition, read_dated_tables
from tasks.postgres import read_table_stats
from tasks.postgres_rules import MaintenanceParams
from tasks.retention import delete_approved
from tasks.retention_rules import (
    BackupKey,
    RetentionAction,
    RetentionParams,
    RetentionPlan,
    plan_deletions,
    plan_retention,
)
from tasks.run import open_run
from tasks.settings import Settings

RUNBOOK = "disk-space"


@dataclass
class Seen:
    """One look at the disk: its findings, and what the plan needs."""

    findings: list[Finding]
    usages: list[DiskUsage]
    logs: list[LogFile] = field(default_factory=list)
    dated: list[DatedTable] = field(default_factory=list)
    retention: RetentionPlan | None = None
    backups_pressured: bool = False
    partitions_disk: PartitionDisk = "cool"


@runbook_flow(RUNBOOK, inventory="disk", actions=get_args(DiskAction))
def disk_space(
    target: str,
    dry_run: bool = True,
    approval: Approval = "ask",
    approval_timeout_seconds: ApprovalTimeout = APPROVAL_TIMEOUT_SECONDS,
    params: DiskParams | None = None,
    alert: AlertInfo | None = None,
) -> State[Report]:
    """Per path: space and inodes used against the warning and critical thresholds and the
    free bytes (statvfs); the largest entries under it (a walk bounded by scan_depth and by
    scan_seconds for all paths together, one filesystem, no symlinks followed); the
    json-file logs of the configured docker services (the engine's LogPath); the largest
    tables of the linked PostgreSQL, with VACUUM FULL only ever suggested (it locks the table
    ACCESS EXCLUSIVE) and never run; dated tables older than keep_months; backups past the
    linked set's retention policy.

    May truncate a container's json-file log over max_log_mb whatever the disk's usage, and,
    only while the filesystem that holds them is over a warning threshold (space or inodes),
    delete backups past the set's own retention policy (backup-retention's rules) and detach
    and drop dated tables older than keep_months, oldest first; each capped per run. The
    tables' filesystem is that of PostgreSQL's data_directory: without it (or not readable
    here), old tables are reported, never dropped. Then reads the usage again and reports
    the free bytes before and after.
    """
    run = open_run(Settings.disk_target, target, DiskParams, params)
    name, disk, p, settings = run.name, run.target, run.p, run.settings
    pg_name = disk.postgres
    pg = settings.postgres[pg_name] if pg_name else None
    services = {s: settings.service(s) for s in disk.services}
    bset = settings.backups[disk.backups] if disk.backups else None
    # The dead-tuple thresholds postgres-maintenance vacuums at on that database, for the
    # VACUUM FULL suggestion.
    vacuum = (
        MaintenanceParams.resolve(None, pg.thresholds, f"{RUNBOOK} on {name}: postgres.{pg_name}")
        if pg is not None
        else MaintenanceParams()
    )
    policy = (
        RetentionParams.resolve(None, bset.thresholds, f"{RUNBOOK} on {name}: backups")
        if bset
        else None
    )
    if policy is not None:
        policy = policy.model_copy(
            update={"max_deletions": min(policy.max_deletions, p.max_backups_deleted)}
        )
    now = utcnow()
    cutoff = months_before(now, p.keep_months)

    def diagnose() -> Seen:
        usages = read_path_usage(disk.paths)
        hot = pressured(usages, p)
        seen = Seen(findings=usage_findings(name, usages, p), usages=usages)
        for service, cfg in services.items():
            try:
                seen.logs += container_log_files(service, cfg)
            except TargetError as exc:
                seen.findings.append(_unread(name, "container_log", exc))
        seen.findings += log_findings(name, seen.logs, p)
        if pg is not None and pg_name is not None and disk.partitions:
            # Dropping tables frees room only on the filesystem of the data directory: without
            # it (not set, or a remote server's, not readable here) nothing is dropped.
            data = device_of(pg.data_directory) if pg.data_directory else None
            seen.partitions_disk = partition_disk(data, hot)
            try:
                seen.dated = read_dated_tables(pg_name, pg, disk.partitions)
            except TargetError as exc:
                seen.findings.append(_unread(name, "old_partitions", exc))
            else:
                seen.findings += partition_findings(
                    name, pg_name, seen.dated, cutoff, seen.partitions_disk, p
                )
        if bset is not None and policy is not None and disk.backups is not None:
            seen.backups_pressured = device_of(bset.directory or "/") in hot
            try:
                found: list[Backup] = list_backups(disk.backups, bset, None)
            except TargetError as exc:
                seen.findings.append(_unread(name, "old_backups", exc))
            else:
                plan = seen.retention = plan_retention(found, now, policy)
                past = plan.delete + plan.deferred
                seen.findings.append(
                    backup_findings(
                        name,
                        disk.backups,
                        len(past),
                        sum(d.size for d in past),
                        len(plan.deferred),
                        seen.backups_pressured,
                    )
                )
        return seen

    # 1. diagnose: what fills the disk is looked at once, before acting
    before = diagnose()
    walks = largest_entries(disk.paths, p.scan_depth, p.scan_seconds, p.largest_entries)
    context = walk_findings(name, walks)
    if pg is not None and pg_name is not None:
        try:
            context += table_findings(name, pg_name, read_table_stats(pg_name, pg), p, vacuum)
        except TargetError as exc:
            context.append(_unread(name, "largest_tables", exc))
    # 2. plan
    logs = plan_truncations(name, before.logs, p)
    # The backup deletions show backup-retention's target, the set's name (as its runs on that
    # set do), not this disk's; and touch backups.SET: the gate applies that set's approval,
    # rate limits and lock as well as this disk's.
    backups: list[Action[RetentionAction, BackupKey]] = (
        plan_deletions(disk.backups, before.retention)
        if disk.backups is not None and before.retention is not None and before.backups_pressured
        else []
    )
    for deletion in backups:
        deletion.touches = f"backups.{disk.backups}"
    drops = (
        plan_partition_drops(name, pg_name, before.dated, cutoff, p)
        if pg_name is not None and before.partitions_disk == "hot"
        else []
    )
    actions: list[Action] = [*logs, *backups, *drops]
    # 3. gate
    approved = run.gate(actions, before.findings + context)
    # 4. act: logs first (no one's data), then backups past their policy, then partitions
    passed = {id(a) for a in approved}
    for action in (a for a in logs if id(a) in passed):
        ref: LogRef = action.args
        run_action(
            action,
            truncate_container_log,
            ref.service,
            services[ref.service],
            ref.container_id,
            ref.log_path,
        )
    if bset is not None and disk.backups is not None:
        delete_approved(disk.backups, bset, None, [a for a in backups if id(a) in passed])
    for drop in (a for a in drops if id(a) in passed):
        part: PartitionRef = drop.args
        assert pg is not None  # drops are planned only with a linked postgres
        run_action(
            drop,
            drop_partition,
            part.postgres,
            pg,
            part.schema_name,
            part.table,
            part.pattern,
            p.lock_timeout_seconds,
        )
    # 5. verify and report: usage again, and the free bytes before and after
    if not approved:
        return run.finish(before.findings + context, before.findings + context, actions)
    after = diagnose()
    freed = freed_findings(name, before.usages, after.usages)
    # The walk and the table sizes are not repeated: said to be from before acting.
    seen_before = [f.model_copy(update={"message": f"before acting: {f.message}"}) for f in context]
    return run.finish(before.findings + context, after.findings + freed + seen_before, actions)


def _unread(name: str, check: str, exc: TargetError) -> Finding:
    """A source of the diagnosis that could not be read: the rest of it goes on."""
    return Finding(check=check, target=name, severity=Severity.warning, message=str(exc))
