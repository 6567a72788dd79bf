"""Pure decisions for backup-verification (seed 002 "Backup & Recovery" and its daily
checklist, 001 backups)."""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING

from tasks.models import Finding, Params, Severity

if TYPE_CHECKING:
    from tasks.settings import BackupSet
    from tasks.storage import Backup, Integrity


class BackupParams(Params):
    """Age and size limits live with each backup set in the inventory (max_age_hours,
    min_size_ratio)."""


def backup_findings(
    name: str,
    where: str,
    cfg: BackupSet,
    backups: list[Backup],
    integrity: Integrity | None,
    now: datetime,
) -> list[Finding]:
    if not backups:
        return [
            Finding(
                check="newest",
                target=name,
                severity=Severity.critical,
                observed=0,
                message=f"no backup matching {', '.join(cfg.pattern)} in {where}",
            )
        ]
    newest = backups[0]
    age = (now - newest.modified).total_seconds() / 3600
    found = [
        Finding(
            check="age",
            target=name,
            observed=round(age, 1),
            threshold=cfg.max_age_hours,
            severity=(
                Severity.critical
                if age > 2 * cfg.max_age_hours
                else Severity.warning
                if age > cfg.max_age_hours
                else Severity.ok
            ),
            message=f"newest {newest.key} is {age:.1f} h old"
            + (
                ": the last backup did not run or did not upload" if age > cfg.max_age_hours else ""
            ),
        )
    ]
    if len(backups) > 1 and backups[1].size:
        ratio = newest.size / backups[1].size
        found.append(
            Finding(
                check="size",
                target=name,
                observed=round(ratio, 3),
                threshold=cfg.min_size_ratio,
                severity=Severity.warning if ratio < cfg.min_size_ratio else Severity.ok,
                message=f"{newest.size / 2**20:.1f} MiB, {ratio:.0%} of the previous "
                f"({backups[1].size / 2**20:.1f} MiB)"
                + ("; a sudden drop: an incomplete dump?" if ratio < cfg.min_size_ratio else ""),
            )
        )
    if integrity is not None:
        found.append(
            Finding(
                check="integrity",
                target=name,
                observed=integrity.ok,
                threshold=True,
                severity=Severity.ok if integrity.ok else Severity.critical,
                message=f"{newest.key}: {integrity.detail}; sha256 {integrity.sha256[:16]}…"
                + ("" if integrity.expected_sha256 else " (no checksum to compare)"),
            )
        )
    return found


def storage_finding(name: str, error: str) -> Finding:
    return Finding(
        check="storage", target=name, severity=Severity.critical, observed=False, message=error
    )
