"""Pure decisions for disk-space (seed 000 section 4 "Disk Full (Log/Upload Bloat)", seed 004
section 9 "Disk Space Critical", seed 002's thresholds: over 80 % used a warning, over 90 %
critical): how full each filesystem is, what fills it, and what to clean up. No I/O here.

When it acts (the decision an on-call engineer expects):
- a configured container's json-file log over max_log_mb is truncated whatever the disk's
  usage: a log that size is unrotated (seed 000's prevention is `max-size: 10m`);
- backups past the backup set's own retention policy (backup-retention's, the same rules)
  and partitions older than keep_months are removed only while the filesystem they live on
  is over a warning threshold (space or inodes); they are data, and removing them is only
  worth it when the disk needs the room.
"""

from __future__ import annotations

import calendar
import re
from datetime import UTC, date, datetime
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from tasks.models import Action, ActionStatus, Finding, Params, ServiceRef, Severity
from tasks.postgres_rules import MaintenanceParams, bloated

if TYPE_CHECKING:
    from tasks.host import DiskUsage
    from tasks.postgres import TableStats

# The kinds of action disk-space plans (the flow and deployments.catalog read them from here).
# delete_backup is backup-retention's kind: the same deletion, the same default rate.
DiskAction = Literal["truncate_container_log", "delete_backup", "drop_partition"]

MIB = 2**20

# SCHEMA.PREFIX followed by the date tokens, e.g. analytics.pageview_YYYY_MM: unquoted
# PostgreSQL identifiers (letters, digits, _; not starting with a digit), at most 63 bytes.
_PATTERN = re.compile(
    r"(?P<schema>[A-Za-z_][A-Za-z0-9_]{0,62})\.(?P<prefix>[A-Za-z_][A-Za-z0-9_]*?)"
    r"(?P<token>YYYY_MM_DD|YYYY_MM)"
)


class PartitionPattern(BaseModel):
    """A pattern of dated tables: schema, the name's fixed prefix, and whether the date is a
    month (YYYY_MM) or a day (YYYY_MM_DD)."""

    model_config = ConfigDict(frozen=True)

    text: str
    schema_name: str
    prefix: str
    granularity: Literal["month", "day"]

    @property
    def name_regex(self) -> re.Pattern[str]:
        """A table name of this pattern exactly: the prefix, then the digits, nothing after."""
        digits = r"(\d{4})_(\d{2})_(\d{2})" if self.granularity == "day" else r"(\d{4})_(\d{2})"
        return re.compile(re.escape(self.prefix) + digits)

    def period(self, table: str) -> tuple[date, date] | None:
        """The [start, end) dates a table of this pattern holds, or None when the name does
        not match exactly or names no real date (pageview_2020_13)."""
        found = self.name_regex.fullmatch(table)
        if found is None:
            return None
        year, month = int(found.group(1)), int(found.group(2))
        try:
            if self.granularity == "month":
                start = date(year, month, 1)
                end = date(year + month // 12, month % 12 + 1, 1)
            else:
                start = date(year, month, int(found.group(3)))
                end = date.fromordinal(start.toordinal() + 1)
        except ValueError:
            return None
        return start, end


def parse_partition_pattern(text: str) -> PartitionPattern:
    """SCHEMA.PREFIXYYYY_MM or SCHEMA.PREFIXYYYY_MM_DD (e.g. analytics.pageview_YYYY_MM).

    Raises ValueError saying what is wrong and what to write instead."""
    found = _PATTERN.fullmatch(text)
    if (
        found is None
        or not found.group("prefix")
        or "YYYY" in found.group("prefix")
        or len(text.split(".", 1)[1]) > 63
    ):
        raise ValueError(
            f"partition pattern {text!r} must be SCHEMA.PREFIX followed by YYYY_MM or "
            "YYYY_MM_DD at the end, e.g. analytics.pageview_YYYY_MM: unquoted identifiers "
            "(letters, digits, _), the table name at most 63 characters, nothing after the date"
        )
    return PartitionPattern(
        text=text,
        schema_name=found.group("schema"),
        prefix=found.group("prefix"),
        granularity="day" if found.group("token") == "YYYY_MM_DD" else "month",
    )


def months_before(now: datetime, months: int) -> datetime:
    """now moved back by whole calendar months (the day clamped to the month's length)."""
    index = now.year * 12 + now.month - 1 - months
    year, month = divmod(index, 12)
    day = min(now.day, calendar.monthrange(year, month + 1)[1])
    return now.replace(year=year, month=month + 1, day=day)


class DiskParams(Params):
    used_warning_percent: float = Field(
        80,
        gt=0,
        le=100,
        description="space used, %, for a warning (seed 002: 80); over 0, at most 100",
    )
    used_critical_percent: float = Field(
        90,
        gt=0,
        le=100,
        description="space used, %, for critical (seed 002: 90); over 0, at most 100",
    )
    inodes_warning_percent: float = Field(
        80, gt=0, le=100, description="inodes used, %, for a warning; over 0, at most 100"
    )
    inodes_critical_percent: float = Field(
        90, gt=0, le=100, description="inodes used, %, for critical; over 0, at most 100"
    )
    max_log_mb: int = Field(
        100,
        ge=1,
        le=1_000_000,
        description="a container's json-file log over this many MiB is truncated; 1 to 1000000",
    )
    keep_months: int = Field(
        12,
        ge=1,
        le=1200,
        description="partitions whose whole period is older than this many months may be "
        "dropped (seed 004 s9: keep the last 12); 1 to 1200",
    )
    largest_entries: int = Field(
        10, ge=1, le=100, description="largest files, directories and tables shown; 1 to 100"
    )
    scan_depth: int = Field(
        6,
        ge=1,
        le=64,
        description="levels below each path the largest-entries walk reads; 1 to 64",
    )
    scan_seconds: float = Field(
        20,
        gt=0,
        le=600,
        description="time budget of the whole largest-entries walk, all paths together (one "
        "deadline per run), in seconds; over 0, at most 600",
    )
    max_truncations: int = Field(
        10, ge=1, le=1000, description="most container logs truncated per run; 1 to 1000"
    )
    max_partitions_dropped: int = Field(
        12, ge=1, le=1000, description="most partitions dropped per run, oldest first; 1 to 1000"
    )
    max_backups_deleted: int = Field(
        20,
        ge=1,
        le=10_000,
        description="most backups deleted per run (and never more than the set's own "
        "max_deletions); 1 to 10000",
    )
    lock_timeout_seconds: float = Field(
        5,
        gt=0,
        le=300,
        description="how long a partition's detach and drop waits for its locks, in seconds; "
        "over 0, at most 300",
    )

    @model_validator(mode="after")
    def _warning_below_critical(self) -> DiskParams:
        for what in ("used", "inodes"):
            warning = getattr(self, f"{what}_warning_percent")
            critical = getattr(self, f"{what}_critical_percent")
            if warning > critical:
                raise ValueError(
                    f"{what}_warning_percent ({warning:g}) must not be over "
                    f"{what}_critical_percent ({critical:g})"
                )
        return self


# --- what the tasks read ---------------------------------------------------------------


class Entry(BaseModel):
    """A file or directory under a path and the bytes it takes on disk (st_blocks; for a
    directory, the sum of what the walk saw under it)."""

    path: str
    bytes: int
    directory: bool


class Walk(BaseModel):
    """The largest entries under one path, from a walk bounded in depth and time that never
    follows symlinks nor leaves the path's filesystem. cut_short: why it saw less than all
    (the time budget ran out; directories below scan_depth not entered); None: it saw all."""

    path: str
    entries: list[Entry]
    seen: int
    cut_short: str | None = None
    error: str | None = None


class LogFile(BaseModel):
    """A container's log file as its engine names it (inspect's LogPath) and its size in
    bytes; local: the file is readable here (the engine runs on this machine);
    note: why it cannot be judged (another log driver, a remote engine)."""

    service: str
    container: str
    container_id: str
    log_path: str
    driver: str
    bytes: int | None = None
    note: str | None = None


class LogRef(ServiceRef):
    """A container log to truncate: the service (its rate limit counts against the service,
    as a restart's does), the container's id and its LogPath."""

    container_id: str
    log_path: str


class DatedTable(BaseModel):
    """A table whose name matches a partition pattern: its parent when attached as a
    partition, its size in bytes and the period its name gives."""

    schema_name: str
    table: str
    parent: str | None
    bytes: int
    pattern: str
    start: date
    end: date


class PartitionRef(BaseModel):
    """A dated table to drop (detached first when it is a partition); pattern: the pattern it
    matched, checked again in the transaction that drops it."""

    model_config = ConfigDict(frozen=True)

    postgres: str
    schema_name: str
    table: str
    pattern: str


# --- findings --------------------------------------------------------------------------


def _grade(value: float | None, warning: float, critical: float) -> Severity:
    if value is None:
        return Severity.ok
    if value >= critical:
        return Severity.critical
    return Severity.warning if value >= warning else Severity.ok


def _size(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", MIB), ("KiB", 1024)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def usage_findings(name: str, usages: list[DiskUsage], p: DiskParams) -> list[Finding]:
    """Per path: space used (warning at used_warning_percent, critical at
    used_critical_percent; seed 002) and inodes used (inodes_*); a path that cannot be read
    is critical (it is configured to be watched)."""
    found: list[Finding] = []
    for u in usages:
        if u.error is not None:
            found.append(
                Finding(
                    check="disk_space",
                    target=name,
                    severity=Severity.critical,
                    message=f"{u.path}: cannot be read: {u.error}; correct disk.{name}.paths",
                )
            )
            continue
        used = u.used_percent
        found.append(
            Finding(
                check="disk_space",
                target=name,
                severity=_grade(used, p.used_warning_percent, p.used_critical_percent),
                observed=round(used, 1),
                threshold=p.used_warning_percent,
                message=f"{u.path}: {used:.1f}% used, {_size(u.free)} free of "
                f"{_size(u.total)} (warning at {p.used_warning_percent:g}%, critical at "
                f"{p.used_critical_percent:g}%)",
            )
        )
        inodes = u.inodes_used_percent
        found.append(
            Finding(
                check="inodes",
                target=name,
                severity=_grade(inodes, p.inodes_warning_percent, p.inodes_critical_percent),
                observed=None if inodes is None else round(inodes, 1),
                threshold=p.inodes_warning_percent,
                message=f"{u.path}: "
                + (
                    "the filesystem has no fixed inode count"
                    if inodes is None
                    else f"{inodes:.1f}% of {u.inodes_total} inodes used"
                ),
            )
        )
    return found


def pressured(usages: list[DiskUsage], p: DiskParams) -> set[int]:
    """The devices (st_dev) of the filesystems over a warning threshold, space or inodes."""
    return {
        u.device
        for u in usages
        if u.device is not None
        and u.error is None
        and (
            u.used_percent >= p.used_warning_percent
            or (u.inodes_used_percent or 0.0) >= p.inodes_warning_percent
        )
    }


def walk_findings(name: str, walks: list[Walk]) -> list[Finding]:
    """The largest entries under each path, as rows; the message says when the walk was cut
    short (time budget, depth) or failed."""
    found: list[Finding] = []
    for w in walks:
        if w.error is not None:
            message = f"largest entries under {w.path}: not walked: {w.error}"
        else:
            message = f"largest entries under {w.path} ({w.seen} entries seen"
            message += f"; cut short: {w.cut_short})" if w.cut_short else ")"
        found.append(
            Finding(
                check="largest_entries",
                target=name,
                severity=Severity.ok,
                observed=[
                    {
                        "path": e.path,
                        "MiB": round(e.bytes / MIB, 1),
                        "kind": "directory" if e.directory else "file",
                    }
                    for e in w.entries
                ],
                message=message,
            )
        )
    return found


def log_findings(name: str, logs: list[LogFile], p: DiskParams) -> list[Finding]:
    """Per container log: a warning over max_log_mb (truncated whatever the disk's usage)."""
    found: list[Finding] = []
    for log in logs:
        over = log.bytes is not None and log.bytes > p.max_log_mb * MIB
        size = "?" if log.bytes is None else _size(log.bytes)
        message = f"service {log.service}, container {log.container}: {log.log_path} {size}"
        if log.note:
            message += f" ({log.note})"
        elif over:
            message += (
                f", over max_log_mb={p.max_log_mb}: truncate it, and set the json-file "
                "driver's max-size (seed 000: 10m) so it rotates"
            )
        found.append(
            Finding(
                check="container_log",
                target=name,
                severity=Severity.warning if over else Severity.ok,
                observed=None if log.bytes is None else round(log.bytes / MIB, 1),
                threshold=p.max_log_mb,
                message=message,
            )
        )
    return found


def table_findings(
    name: str, postgres: str, tables: list[TableStats], p: DiskParams, vacuum: MaintenanceParams
) -> list[Finding]:
    """The largest tables of the linked database (seed 004 s9 step 2; tables largest first,
    the first largest_entries shown), and VACUUM FULL as a suggestion only, for the tables
    postgres-maintenance would vacuum (tasks.postgres_rules.bloated with that database's
    MaintenanceParams: dead_tuple_ratio, min_dead_tuples; seed 002 s1): it is never run here."""
    found = [
        Finding(
            check="largest_tables",
            target=name,
            severity=Severity.ok,
            observed=[
                {
                    "table": f"{t.schema_name}.{t.table}",
                    "MiB": round(t.total_bytes / MIB, 1),
                    "dead_tuples": t.dead_tuples,
                    "partition_of": t.partition_of or "",
                }
                for t in tables[: p.largest_entries]
            ],
            message=f"largest tables of postgres.{postgres} (pg_total_relation_size)",
        )
    ]
    dead = bloated(tables, vacuum)
    if dead:
        found.append(
            Finding(
                check="vacuum_full",
                target=name,
                severity=Severity.ok,
                observed=[t.qualified for t in dead],
                message="suggestion, not run: VACUUM FULL "
                + ", ".join(t.qualified for t in dead)
                + " gives their dead space back to the filesystem (seed 004 s9), but holds an "
                "ACCESS EXCLUSIVE lock (no reads, no writes) for its whole duration and needs "
                "free space for a full copy of the table; plain VACUUM (postgres-maintenance) "
                "makes the space reusable without either",
            )
        )
    return found


# Where the dated tables are, against the filesystems over a warning threshold (partition_disk).
PartitionDisk = Literal["hot", "elsewhere", "unknown", "cool"]


def partition_disk(data_device: int | None, hot: set[int]) -> PartitionDisk:
    """Whether dropping dated tables would free room on a filesystem that needs it.

    Args:
        data_device: the st_dev of PostgreSQL's data_directory; None when it is not
            configured or cannot be read on this machine (a remote server).
        hot: the devices over a warning threshold (pressured).

    Returns:
        "hot": the data directory's filesystem is over a threshold (drop them);
        "elsewhere": another filesystem is, not the data directory's (dropping frees nothing
        there); "unknown": one is, and which holds the tables is not known here; "cool":
        none is."""
    if not hot:
        return "cool"
    if data_device is None:
        return "unknown"
    return "hot" if data_device in hot else "elsewhere"


def partition_findings(
    name: str,
    postgres: str,
    dated: list[DatedTable],
    cutoff: datetime,
    disk: PartitionDisk,
    p: DiskParams,
) -> list[Finding]:
    """The dated tables older than keep_months (their whole period before cutoff): a warning
    while the filesystem of the data directory holding them is over a warning threshold
    (they are dropped) or while one is and which holds them is unknown (nothing is dropped:
    data_directory is needed); else information (see partition_disk)."""
    old = stale(dated, cutoff)
    if not old:
        message = f"no table of the partition patterns is older than keep_months={p.keep_months}"
        if dated:
            message += f" ({len(dated)} dated tables, the oldest {dated[0].table})"
        return [Finding(check="old_partitions", target=name, severity=Severity.ok, message=message)]
    total = sum(t.bytes for t in old)
    names = ", ".join(f"{t.schema_name}.{t.table}" for t in old[:10])
    more = f" and {len(old) - 10} more" if len(old) > 10 else ""
    why = {
        "hot": f"the filesystem of postgres.{postgres}'s data_directory is over its warning "
        "threshold: drop them, oldest first",
        "elsewhere": f"not dropped: postgres.{postgres}'s data_directory is not on a filesystem "
        "of this target's paths over a warning threshold, so dropping them frees nothing there",
        "unknown": f"not dropped: a filesystem is over its warning threshold, but which one "
        f"holds postgres.{postgres}'s tables is unknown here (data_directory is not set, or "
        f"not readable on this machine); set [postgres.{postgres}] data_directory to have them "
        "dropped while its filesystem is over",
        "cool": "kept while the disk is below its warning thresholds",
    }[disk]
    return [
        Finding(
            check="old_partitions",
            target=name,
            severity=Severity.warning if disk in ("hot", "unknown") else Severity.ok,
            observed=len(old),
            threshold=p.keep_months,
            message=f"{len(old)} tables older than keep_months={p.keep_months} "
            f"({_size(total)}): {names}{more}; {why}",
        )
    ]


def stale(dated: list[DatedTable], cutoff: datetime) -> list[DatedTable]:
    """The dated tables whose whole period ends at or before cutoff, oldest first."""
    limit = cutoff.astimezone(UTC).date()
    return sorted((t for t in dated if t.end <= limit), key=lambda t: (t.start, t.table))


def backup_findings(
    name: str, backups: str, past: int, reclaim: int, deferred: int, pressure: bool
) -> Finding:
    """The backups of the linked set past its retention policy: a warning while their disk is
    over a warning threshold (then they are deleted), else information."""
    if not past:
        return Finding(
            check="old_backups",
            target=name,
            severity=Severity.ok,
            observed=0,
            message=f"backups.{backups}: none past its retention policy",
        )
    why = (
        "the disk is over its warning threshold: delete them, oldest first"
        if pressure
        else "kept while the disk is below its warning thresholds (backup-retention prunes "
        "them on its schedule)"
    )
    later = f"; {deferred} over the per-run cap, for a later run" if deferred and pressure else ""
    return Finding(
        check="old_backups",
        target=name,
        severity=Severity.warning if pressure else Severity.ok,
        observed=past,
        message=f"backups.{backups}: {past} backups past its retention policy "
        f"({_size(reclaim)}); {why}{later}",
    )


def freed_findings(name: str, before: list[DiskUsage], after: list[DiskUsage]) -> list[Finding]:
    """Free bytes per path before and after acting (information)."""
    earlier = {u.path: u for u in before}
    found = []
    for u in after:
        was = earlier.get(u.path)
        if was is None or u.error or was.error:
            continue
        found.append(
            Finding(
                check="freed",
                target=name,
                severity=Severity.ok,
                observed={"before_free_bytes": was.free, "after_free_bytes": u.free},
                message=f"{u.path}: {_size(was.free)} free before, "
                f"{_size(u.free)} after ({_size(max(0, u.free - was.free))} "
                "freed)",
            )
        )
    return found


# --- plans -----------------------------------------------------------------------------


def plan_truncations(
    name: str, logs: list[LogFile], p: DiskParams
) -> list[Action[DiskAction, LogRef]]:
    """A truncate of each judged json-file log over max_log_mb, largest first; those over
    max_truncations are skipped, for a later run. Each touches services.SERVICE
    (tasks.models.Action.touches)."""
    over = sorted(
        (g for g in logs if g.note is None and (g.bytes or 0) > p.max_log_mb * MIB),
        key=lambda g: -(g.bytes or 0),
    )
    actions: list[Action[DiskAction, LogRef]] = []
    for n, log in enumerate(over):
        action: Action[DiskAction, LogRef] = Action(
            kind="truncate_container_log",
            target=name,
            description=f"truncate the log of container {log.container} (service "
            f"{log.service}) to 0 bytes, freeing {_size(log.bytes or 0)}: {log.log_path}",
            destructive=True,
            args=LogRef(service=log.service, container_id=log.container_id, log_path=log.log_path),
            touches=f"services.{log.service}",
        )
        if n >= p.max_truncations:
            action.status = ActionStatus.skipped
            action.detail = f"over max_truncations={p.max_truncations}: a later run"
        actions.append(action)
    return actions


def plan_partition_drops(
    name: str, postgres: str, dated: list[DatedTable], cutoff: datetime, p: DiskParams
) -> list[Action[DiskAction, PartitionRef]]:
    """A detach (when attached) and drop of each dated table older than keep_months, oldest
    first; those over max_partitions_dropped are skipped, for a later run. Call it only when
    the data directory's filesystem is over a threshold (partition_disk "hot"). Each touches
    postgres.POSTGRES (tasks.models.Action.touches): the gate applies that target's policy,
    rate limits and lock."""
    actions: list[Action[DiskAction, PartitionRef]] = []
    for n, t in enumerate(stale(dated, cutoff)):
        how = f"detach from {t.parent} and drop" if t.parent else "drop"
        action: Action[DiskAction, PartitionRef] = Action(
            kind="drop_partition",
            target=name,
            description=f"{how} {t.schema_name}.{t.table} ({t.start:%Y-%m-%d} to "
            f"{t.end:%Y-%m-%d}, {_size(t.bytes)}) on postgres.{postgres}",
            destructive=True,
            args=PartitionRef(
                postgres=postgres, schema_name=t.schema_name, table=t.table, pattern=t.pattern
            ),
            touches=f"postgres.{postgres}",
        )
        if n >= p.max_partitions_dropped:
            action.status = ActionStatus.skipped
            action.detail = f"over max_partitions_dropped={p.max_partitions_dropped}: a later run"
        actions.append(action)
    return actions
