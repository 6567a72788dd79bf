"""Pure decisions for backup-verification (seed 002 "Backup & Recovery" and its daily
checklist, 001 backups)."""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING

from pydantic import Field

from tasks.models import Finding, Params, Severity

if TYPE_CHECKING:
    from tasks.settings import BackupSet
    from tasks.storage import Backup, Integrity, Probe


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


# --- object-storage (seed 004 section 8, "Object Storage Unreachable") ----------------------


class ObjectStorageParams(Params):
    """Latency of each step of the canary round trip (head, put, get, presigned GET, delete)."""

    latency_warning_ms: float = Field(1000, gt=0, le=600_000)
    # Not checked against each other: a run may raise one alone, and critical is tested first.
    latency_critical_ms: float = Field(5000, gt=0, le=600_000)


OBJECT_STORAGE_THRESHOLDS = frozenset(ObjectStorageParams.model_fields)

STEPS = {
    "head_bucket": "head bucket",
    "put": "put canary",
    "get": "get and compare canary",
    "presigned_get": "presigned GET of the canary",
    "delete": "delete canary",
}


def storage_advice(error: str) -> str:
    """What to do next, by the class tasks.storage.classify put the failure in."""
    if error.startswith("cannot connect"):
        return (
            "check endpoint_url and its DNS name, the provider's status page and the network "
            "path from here; while it lasts, consider turning new uploads off behind a feature "
            "flag"
        )
    if error.startswith(("credentials expired or denied", "no credentials")):
        return (
            "check the key pair (access_key_id/secret_access_key or the AWS variables) has not "
            "expired or been rotated, and that its policy allows s3:ListBucket, s3:GetObject, "
            "s3:PutObject and s3:DeleteObject on the bucket and prefix"
        )
    if error.startswith("the storage provider failed"):
        return (
            "the provider is failing: check its status page and retry later; consider turning "
            "new uploads off behind a feature flag meanwhile"
        )
    if error.startswith("the storage provider did not answer"):
        return "the provider is slow or overloaded: check its status page; raise timeout_seconds"
    if error.startswith("the data read back is not what was written"):
        return (
            "the store, or something between (a proxy, a CDN, a cache), serves other bytes than "
            "were written: find which hop, and tell the provider"
        )
    if error.startswith("NoSuchBucket") or error == "404 (HTTP 404)":  # HEAD has no body
        return "the bucket does not exist: check bucket and region in the [s3.NAME] entry"
    return "see the error; the other steps show what still works"


def canary_findings(
    name: str, where: str, probes: list[Probe], p: ObjectStorageParams
) -> list[Finding]:
    found = []
    for probe in probes:
        step = STEPS[probe.step]
        observed = round(probe.ms, 1)
        if probe.error is not None:
            later = [STEPS[s] for s in list(STEPS)[list(STEPS).index(probe.step) + 1 :]]
            skipped = (
                f" (not attempted: {', '.join(later)})"
                if probe is probes[-1] and probe.step in ("head_bucket", "put")
                else ""
            )
            found.append(
                Finding(
                    check=probe.step,
                    target=name,
                    severity=Severity.critical,
                    observed=observed,
                    threshold=p.latency_warning_ms,
                    message=f"{step} on {where} failed after {probe.ms:.0f} ms: {probe.error}. "
                    f"{storage_advice(probe.error)}{skipped}",
                )
            )
            continue
        severity = (
            Severity.critical
            if probe.ms > p.latency_critical_ms
            else Severity.warning
            if probe.ms > p.latency_warning_ms
            else Severity.ok
        )
        found.append(
            Finding(
                check=probe.step,
                target=name,
                severity=severity,
                observed=observed,
                threshold=p.latency_warning_ms,
                message=f"{step}: {probe.detail}, {probe.ms:.0f} ms"
                + (
                    f" (over {p.latency_warning_ms:.0f} ms: slow; check the provider's status "
                    "page and the network path)"
                    if severity is not Severity.ok
                    else ""
                ),
            )
        )
    return found
