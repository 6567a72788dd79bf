"""Pure decisions for restore-drill (seed 002 "Database Recovery" and its monthly disaster
recovery drill) and pre-change-backup (seed 002 change management: "create backup" first)."""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Literal

import psycopg
from pydantic import BaseModel, ConfigDict, Field

from tasks.backup_rules import client_finding
from tasks.errors import ConfigError
from tasks.models import Action, Finding, Params, Severity

if TYPE_CHECKING:
    from tasks.backups import Backup, Integrity
    from tasks.dumps import CheckResult, Dump, Restore
    from tasks.settings import PostgresTarget

# The kinds of action each runbook plans (the flow and deployments.catalog read them from here).
RestoreDrillAction = Literal["restore_drill"]
PreChangeAction = Literal["dump"]


class DrillRef(BaseModel):
    """What a drill restores, and into which scratch database."""

    model_config = ConfigDict(frozen=True)

    key: str
    dbname: str


DRILL_DB_PREFIX = "runbook_drill_"


class RestoreDrillParams(Params):
    # Each run's own choice: the inventory's [backups.NAME] keeps no drill thresholds.
    run_only = frozenset({"backup", "max_rto_seconds", "max_rpo_hours", "check_timeout_seconds"})
    backup: str | None = Field(
        None, description="the backup to restore (its key or file name); unset: the newest"
    )
    max_rto_seconds: float = Field(
        3600, gt=0, description="seconds the restore plus checks may take (RTO); over 0"
    )
    max_rpo_hours: float = Field(
        26, gt=0, description="hours old the restored backup may be (RPO); over 0"
    )
    check_timeout_seconds: float = Field(
        300, gt=0, le=3600, description="seconds each check query may run; over 0, at most 3600"
    )


class PreChangeParams(Params):
    run_only = frozenset({"label"})
    label: str = Field(
        "pre-change",
        pattern=r"^[A-Za-z0-9_.-]{1,64}$",
        description="in the dump's name, e.g. the migration's; 1 to 64 of A-Z a-z 0-9 _ . -",
    )


def refuse_source(
    name: str,
    scratch: tuple[str, PostgresTarget] | None,
    source: tuple[str, PostgresTarget] | None,
) -> tuple[str, PostgresTarget]:
    """The scratch target, or a ConfigError when there is none or it is the source itself."""
    if scratch is None:
        raise ConfigError(
            f"backups.{name}.scratch is not set: name the [postgres.NAME] target of a server "
            "the drill may restore into (a scratch database is created there and dropped)"
        )
    if source is not None:
        same_name = scratch[0] == source[0]
        if same_name or _address(scratch[1]) == _address(source[1]):
            raise ConfigError(
                f"backups.{name}.scratch {scratch[0]!r} is the source database "
                f"({source[1].description}): a restore drill never runs against the source. "
                "Point scratch at another database or server."
            )
    return scratch


def _address(target: PostgresTarget) -> tuple[str, str, str]:
    """Host, port and database as libpq resolves them, whatever the user or password."""
    parts = psycopg.conninfo.conninfo_to_dict(target.dsn.get_secret_value())
    host = parts.get("host") or parts.get("hostaddr") or ""  # "": the local socket
    return str(host), str(parts.get("port") or 5432), str(parts.get("dbname") or parts.get("user"))


def pick_backup(backups: list[Backup], wanted: str | None) -> Backup | None:
    """The newest, or the one named by its key or file name."""
    if wanted is None:
        return backups[0] if backups else None
    return next((b for b in backups if wanted in (b.key, b.key.rsplit("/", 1)[-1])), None)


def chosen_finding(
    name: str,
    where: str,
    backup: Backup | None,
    wanted: str | None,
    now: datetime,
    p: RestoreDrillParams,
) -> Finding:
    if backup is None:
        what = f"no backup named {wanted!r}" if wanted else "no backup"
        return Finding(
            check="backup",
            target=name,
            severity=Severity.critical,
            observed=None,
            message=f"{what} in {where}: nothing to restore",
        )
    hours = (now - backup.modified).total_seconds() / 3600
    late = hours > p.max_rpo_hours
    return Finding(
        check="rpo",
        target=name,
        severity=Severity.warning if late else Severity.ok,
        observed=round(hours, 2),
        threshold=p.max_rpo_hours,
        message=f"{backup.key}: restoring it loses the last {hours:.1f} h of data"
        + ("; backups are not recent enough for the recovery point wanted" if late else ""),
    )


def plan_drill(
    name: str, backup: Backup | None, scratch_name: str, dbname: str
) -> list[Action[RestoreDrillAction, DrillRef]]:
    """One drill of the chosen backup into the scratch database dbname; none without one."""
    if backup is None:
        return []
    return [
        Action(
            kind="restore_drill",
            target=name,
            description=f"restore {backup.key} into scratch database {dbname} on "
            f"{scratch_name}, run the checks, drop it",
            destructive=False,
            args=DrillRef(key=backup.key, dbname=dbname),
        )
    ]


def plan_dump(
    name: str, source_name: str, source: PostgresTarget, where: str
) -> list[Action[PreChangeAction, None]]:
    """One dump of the source database to `where` (an s3:// URL or a path)."""
    return [
        Action(
            kind="dump",
            target=name,
            description=f"pg_dump --format=custom of {source_name} ({source.description}) to "
            f"{where}, with a .sha256 beside it, then read it back",
            destructive=False,
        )
    ]


def drill_findings(
    name: str,
    restore: Restore | None,
    checks: list[CheckResult],
    restored_tables: list[str] | None,
    source_tables: list[str] | None,
    rto_seconds: float,
    dropped: bool,
    p: RestoreDrillParams,
) -> list[Finding]:
    """restore is None when the drill stopped before it; restored_tables is None when it did
    not get to the end (the failed action says why), so there is no RTO to report."""
    found = []
    if restore is not None and restore.needs_client:
        found.append(client_finding(name, "the backup", restore.detail, Severity.warning))
    elif restore is not None:
        found.append(
            Finding(
                check="restore",
                target=name,
                severity=Severity.ok if restore.ok else Severity.critical,
                observed=round(restore.seconds, 2),
                message=restore.detail
                if restore.ok
                else f"the backup does not restore: {restore.detail}",
            )
        )
    if restored_tables is not None:
        slow = rto_seconds > p.max_rto_seconds
        found.append(
            Finding(
                check="rto",
                target=name,
                severity=Severity.warning if slow else Severity.ok,
                observed=round(rto_seconds, 2),
                threshold=p.max_rto_seconds,
                message=f"restore and checks took {rto_seconds:.1f} s"
                + ("; longer than the recovery time allowed" if slow else ""),
            )
        )
    if restored_tables is not None:
        found.append(_tables_finding(name, restored_tables, source_tables))
    for i, check in enumerate(checks, 1):
        found.append(
            Finding(
                check=f"check-{i}",
                target=name,
                severity=Severity.ok if check.ok else Severity.critical,
                observed=check.ok,
                threshold=True,
                message=f"{check.query}: {check.detail}",
            )
        )
    found.append(
        Finding(
            check="cleanup",
            target=name,
            severity=Severity.ok if dropped else Severity.critical,
            observed=dropped,
            threshold=True,
            message="scratch database dropped"
            if dropped
            else "the scratch database is still there: drop it by hand",
        )
    )
    return found


def _tables_finding(name: str, restored: list[str], source: list[str] | None) -> Finding:
    if source is None:
        return Finding(
            check="tables",
            target=name,
            severity=Severity.critical if not restored else Severity.ok,
            observed=len(restored),
            message=f"{len(restored)} tables restored (no source database to compare with)",
        )
    missing = sorted(set(source) - set(restored))
    severity = Severity.ok
    if missing:
        severity = Severity.critical if not restored else Severity.warning
    return Finding(
        check="tables",
        target=name,
        severity=severity,
        observed=len(restored),
        threshold=len(source),
        message=f"{len(restored)} tables restored, {len(source)} in the source"
        + (f"; missing: {', '.join(missing[:10])}" if missing else ""),
    )


def dump_findings(name: str, dump: Dump | None, integrity: Integrity | None) -> list[Finding]:
    if dump is None:
        return []
    found = [
        Finding(
            check="dump",
            target=name,
            severity=Severity.ok,
            observed=dump.size,
            message=f"{dump.key}: {dump.size / 2**20:.1f} MiB in {dump.seconds:.1f} s, "
            f"sha256 {dump.sha256[:16]}…",
        )
    ]
    if integrity is not None and integrity.needs_client:
        found.append(client_finding(name, dump.key, integrity.detail, Severity.warning))
    elif integrity is not None:
        found.append(
            Finding(
                check="integrity",
                target=name,
                severity=Severity.ok if integrity.ok else Severity.critical,
                observed=integrity.ok,
                threshold=True,
                message=f"read back: {integrity.detail}",
            )
        )
    return found
