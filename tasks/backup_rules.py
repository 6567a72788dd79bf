"""Pure decisions for backup-verification (seed 002 "Backup & Recovery" and its daily
checklist, 001 backups)."""

from __future__ import annotations

import re
from datetime import datetime
from typing import TYPE_CHECKING

from pydantic import Field

from tasks.models import Finding, Params, Severity

if TYPE_CHECKING:
    from tasks.backups import Backup, Integrity
    from tasks.canary import Probe
    from tasks.settings import BackupSet


class BackupParams(Params):
    """Age and size limits live with each backup set in the inventory (max_age_hours,
    min_size_ratio)."""


# The first PostgreSQL whose pg_dump writes each custom-format archive version
# (src/bin/pg_dump/pg_backup_archiver.h: K_VERS_1_14 "add tableam", K_VERS_1_15 "add
# compression_algorithm in header", K_VERS_1_16 "BLOB METADATA entries and multiple BLOBS,
# relkind"); pg_restore refuses any version newer than its own pg_dump writes.
ARCHIVE_FIRST_MAJOR = {(1, 14): 12, (1, 15): 16, (1, 16): 17}
UNSUPPORTED_ARCHIVE = re.compile(r"unsupported version \((\d+)\.(\d+)\) in file header")


def dump_made_by(head: bytes) -> str | None:
    """The pg_dump version ("17.2 (Debian 17.2-1.pgdg120+1)") a custom-format dump's header
    names, read from its first bytes, or None when they do not say. The header (ReadHead in
    pg_backup_archiver.c): "PGDMP", version major, minor, revision, int size, offset size,
    format; the compression (one byte from archive 1.15, an int before); seven ints of
    creation time; then the strings database name, server version and pg_dump version. An
    int is a sign byte and `int size` bytes little-endian; a string an int length and its
    bytes. A version newer than 1.16 is read with either layout, whichever is consistent."""
    if head[:5] != b"PGDMP" or len(head) < 11:
        return None
    int_size = head[8]
    newer = (head[5], head[6]) >= (1, 15)

    def read_int(pos: int) -> tuple[int, int]:
        end = pos + 1 + int_size
        if end > len(head):
            raise ValueError("header cut short")
        value = int.from_bytes(head[pos + 1 : end], "little")
        return (-value if head[pos] else value), end

    for one_byte in (newer, not newer):
        pos = 12 if one_byte else read_int(11)[1]
        try:
            stamp = []
            for _ in range(7):
                value, pos = read_int(pos)
                stamp.append(value)
            strings = []
            for _ in range(3):
                length, pos = read_int(pos)
                if not 0 <= length <= 256 or pos + length > len(head):
                    raise ValueError("not a header string")
                strings.append(head[pos : pos + length].decode())
                pos += length
        except (ValueError, UnicodeDecodeError):
            continue
        sec, minute, hour, mday, month, year, _ = stamp
        sane_time = 0 <= sec <= 61 and 0 <= minute < 60 and 0 <= hour < 24 and 1 <= mday <= 31
        if sane_time and 0 <= month < 12 and 70 <= year < 1100 and re.match(r"\d+", strings[2]):
            return strings[2]
    return None


def newer_client_needed(problem: str, head: bytes, pg_restore_version: str) -> str | None:
    """When pg_restore refused a dump for its archive version ("unsupported version (1.16)
    in file header"): a message naming the PostgreSQL major whose client reads it (from the
    dump's header, else ARCHIVE_FIRST_MAJOR) and how to get it. None for any other failure,
    and when the header names a pg_dump no newer than this pg_restore (the version bytes
    are damaged, then): only a genuinely newer dump is no sign of a damaged backup."""
    found = UNSUPPORTED_ARCHIVE.search(problem)
    if found is None:
        return None
    archive = (int(found[1]), int(found[2]))
    made_by = dump_made_by(head)
    major = re.match(r"\d+", made_by or "")
    local = re.match(r"\d+", pg_restore_version)
    if major and local and int(major[0]) <= int(local[0]):
        return None  # its own pg_dump could not have written it: a damaged header
    if made_by and major:
        client = f"PostgreSQL {major[0]} client (Debian/Ubuntu: postgresql-client-{major[0]})"
        source = f"pg_dump {made_by}"
    else:
        first = ARCHIVE_FIRST_MAJOR.get(archive)
        newest = max(ARCHIVE_FIRST_MAJOR.values())
        client = (
            f"PostgreSQL {first} (or later) client"
            if first
            else f"client of the PostgreSQL that made it (newer than {newest})"
        )
        source = "a newer pg_dump"
    return (
        f"made by {source} (archive format {archive[0]}.{archive[1]}), which pg_restore "
        f'{pg_restore_version} here cannot read ("{found[0]}"); not a sign of corruption: '
        "install the "
        f"{client} where backups are verified and restored; its pg_restore reads older dumps too"
    )


def dumped_by_major(head: bytes) -> int | None:
    """The major version of the pg_dump that made a dump, from its first bytes: a plain
    dump's "-- Dumped by pg_dump version 17.2" comment, or a custom dump's header."""
    plain = re.search(rb"^-- Dumped by pg_dump version (\d+)", head, re.MULTILINE)
    if plain:
        return int(plain[1])
    major = re.match(r"\d+", dump_made_by(head) or "")
    return int(major[0]) if major else None


def older_server_note(head: bytes, server_major: int | None) -> str:
    """When a dump from a newer pg_dump failed to restore into an older server: why, and
    what to change. Dumps restore into the same or a newer major only (pg_dump emits the
    settings and syntax of its own release, e.g. 17's `SET transaction_timeout`)."""
    major = dumped_by_major(head)
    if major is None or server_major is None or major <= server_major:
        return ""
    return (
        f"; the dump comes from pg_dump {major} and the scratch server runs PostgreSQL "
        f"{server_major}: a dump restores into the same or a newer major, so point `scratch` "
        f"at a PostgreSQL {major} (or newer) server; not a sign of corruption"
    )


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
    if integrity is not None and integrity.needs_client:
        found.append(client_finding(name, newest.key, integrity.detail, Severity.warning))
    elif integrity is not None:
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


def client_finding(name: str, key: str, detail: str, severity: Severity) -> Finding:
    """A dump this machine's pg_restore is too old for: unverified, not corrupt."""
    return Finding(
        check="pg_restore_version",
        target=name,
        severity=severity,
        observed=False,
        threshold=True,
        message=f"{key}: {detail}",
    )


def storage_finding(name: str, error: str) -> Finding:
    return Finding(
        check="storage", target=name, severity=Severity.critical, observed=False, message=error
    )


# --- object-storage (seed 004 section 8, "Object Storage Unreachable") ----------------------


class ObjectStorageParams(Params):
    """Latency of each step of the canary round trip (head, put, get, presigned GET, delete)."""

    latency_warning_ms: float = Field(
        1000,
        gt=0,
        le=600_000,
        description="milliseconds of one step for a warning; over 0, at most 600000",
    )
    # Not checked against each other: a run may raise one alone, and critical is tested first.
    latency_critical_ms: float = Field(
        5000,
        gt=0,
        le=600_000,
        description="milliseconds of one step for critical; over 0, at most 600000",
    )


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
