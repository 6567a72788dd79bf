"""disk-space's pure rules (patterns, periods, thresholds, plans and their caps) and its
bounded walk over real directories."""

from __future__ import annotations

import os
from datetime import UTC, date, datetime
from pathlib import Path

import pytest

from tasks.disk import largest_entries, walk_largest
from tasks.disk_rules import (
    DatedTable,
    DiskParams,
    LogFile,
    months_before,
    parse_partition_pattern,
    partition_disk,
    partition_findings,
    plan_partition_drops,
    plan_truncations,
    pressured,
    stale,
    table_findings,
    usage_findings,
)
from tasks.errors import ConfigError
from tasks.host import DiskUsage
from tasks.models import ActionStatus, Severity
from tasks.postgres import TableStats
from tasks.postgres_rules import MaintenanceParams

MIB = 2**20


def test_a_monthly_pattern_matches_its_own_tables_only() -> None:
    pattern = parse_partition_pattern("analytics.pageview_YYYY_MM")
    assert (pattern.schema_name, pattern.prefix, pattern.granularity) == (
        "analytics",
        "pageview_",
        "month",
    )
    assert pattern.period("pageview_2020_01") == (date(2020, 1, 1), date(2020, 2, 1))
    assert pattern.period("pageview_2020_12") == (date(2020, 12, 1), date(2021, 1, 1))
    for other in (
        "pageview_2020_01_backup",
        "pageviews_2020_01",
        "pageview_2020_13",
        "pageview_2020_1",
        "old_pageview_2020_01",
        "pageview_default",
    ):
        assert pattern.period(other) is None, other


def test_a_daily_pattern() -> None:
    pattern = parse_partition_pattern("logs.event_YYYY_MM_DD")
    assert pattern.period("event_2024_02_29") == (date(2024, 2, 29), date(2024, 3, 1))
    assert pattern.period("event_2023_02_29") is None
    assert pattern.period("event_2024_02") is None


@pytest.mark.parametrize(
    "text",
    [
        "pageview_YYYY_MM",
        "analytics.YYYY_MM",
        "analytics.pageview_YYYY",
        "analytics.pageview_YYYY_MM_x",
        "analytics.pageview_MM_YYYY",
        "a.b.pageview_YYYY_MM",
        'analytics."Pageview"_YYYY_MM',
        "analytics.page-view_YYYY_MM",
        "analytics.pageview_%_YYYY_MM",
        "analytics.YYYY_MM_YYYY_MM",
        "analytics." + "p" * 57 + "YYYY_MM",
    ],
)
def test_a_loose_pattern_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match=r"must be SCHEMA\.PREFIX followed by YYYY_MM"):
        parse_partition_pattern(text)


def test_months_before_clamps_the_day() -> None:
    now = datetime(2026, 3, 31, 8, 0, tzinfo=UTC)
    assert months_before(now, 1) == datetime(2026, 2, 28, 8, 0, tzinfo=UTC)
    assert months_before(now, 12) == datetime(2025, 3, 31, 8, 0, tzinfo=UTC)
    assert months_before(now, 15) == datetime(2024, 12, 31, 8, 0, tzinfo=UTC)


def _dated(table: str, start: date, end: date) -> DatedTable:
    return DatedTable(
        schema_name="analytics",
        table=table,
        parent="analytics.pageview",
        bytes=MIB,
        pattern="analytics.pageview_YYYY_MM",
        start=start,
        end=end,
    )


def test_keep_months_keeps_any_month_that_ends_within_them() -> None:
    now = datetime(2026, 12, 1, 8, 0, tzinfo=UTC)
    cutoff = months_before(now, 12)  # 2025-12-01 08:00
    months = [
        _dated("pageview_2025_11", date(2025, 11, 1), date(2025, 12, 1)),
        _dated("pageview_2025_12", date(2025, 12, 1), date(2026, 1, 1)),
        _dated("pageview_2025_10", date(2025, 10, 1), date(2025, 11, 1)),
    ]
    assert [t.table for t in stale(months, cutoff)] == ["pageview_2025_10", "pageview_2025_11"]


def test_drops_are_oldest_first_and_capped() -> None:
    now = datetime(2026, 12, 1, tzinfo=UTC)
    months = [
        _dated(f"pageview_2020_{m:02d}", date(2020, m, 1), date(2020, m + 1, 1)) for m in (3, 1, 2)
    ]
    plan = plan_partition_drops(
        "box", "main", months, months_before(now, 12), DiskParams(max_partitions_dropped=2)
    )
    assert [a.args.table for a in plan] == [
        "pageview_2020_01",
        "pageview_2020_02",
        "pageview_2020_03",
    ]
    assert [a.status for a in plan] == [ActionStatus.planned] * 2 + [ActionStatus.skipped]
    assert "detach from analytics.pageview and drop" in plan[0].description
    # The gate applies postgres.main's policy, rate limits and lock to them (Action.touches).
    assert {a.touches for a in plan} == {"postgres.main"}


def test_truncations_largest_first_capped_and_only_judged_logs() -> None:
    def log(name: str, mib: int | None, note: str | None = None) -> LogFile:
        return LogFile(
            service="api",
            container=name,
            container_id=name * 4,
            log_path=f"/var/lib/docker/containers/{name}/{name}-json.log",
            driver="json-file",
            bytes=None if mib is None else mib * MIB,
            note=note,
        )

    logs = [
        log("a", 150),
        log("b", 900),
        log("c", 50),
        log("d", 500),
        log("e", None, "the engine is remote"),
    ]
    plan = plan_truncations("box", logs, DiskParams(max_log_mb=100, max_truncations=2))
    assert [a.args.container_id for a in plan] == ["bbbb", "dddd", "aaaa"]
    assert [a.status for a in plan] == [ActionStatus.planned] * 2 + [ActionStatus.skipped]
    assert plan[0].args.service == "api"  # its rate limit counts per service
    assert {a.touches for a in plan} == {"services.api"}


def test_thresholds_grade_space_and_inodes() -> None:
    p = DiskParams()
    usages = [
        DiskUsage(path="/a", total=100, free=25, inodes_total=10, inodes_free=9, device=1),
        DiskUsage(path="/b", total=100, free=10, inodes_total=0, inodes_free=0, device=2),
        DiskUsage(path="/c", total=100, free=50, inodes_total=10, inodes_free=0, device=3),
        DiskUsage(path="/gone", error="No such file or directory"),
    ]
    found = {
        (f.message.split(":")[0], f.check): f.severity for f in usage_findings("box", usages, p)
    }
    assert found[("/a", "disk_space")] is Severity.ok  # 75 %
    assert found[("/b", "disk_space")] is Severity.critical  # 90 %
    assert found[("/b", "inodes")] is Severity.ok  # no fixed inode count
    assert found[("/c", "inodes")] is Severity.critical
    assert found[("/gone", "disk_space")] is Severity.critical
    assert pressured(usages, p) == {2, 3}


def test_warning_over_critical_is_a_configuration_error() -> None:
    with pytest.raises(ConfigError, match=r"used_warning_percent \(95\) must not be over"):
        DiskParams.resolve(None, {"used_warning_percent": 95}, "disk-space on box")


def _tree(root: Path) -> None:
    (root / "a" / "b" / "c").mkdir(parents=True)
    (root / "a" / "b" / "c" / "deep.bin").write_bytes(os.urandom(3 * MIB))
    (root / "a" / "one.bin").write_bytes(os.urandom(MIB))
    (root / "top.bin").write_bytes(os.urandom(2 * MIB))
    (root / "link").symlink_to("/usr")  # never followed


def test_the_walk_sizes_directories_and_never_follows_symlinks(tmp_path: Path) -> None:
    _tree(tmp_path)
    walk = walk_largest(str(tmp_path), depth=10, budget_seconds=60, top=10)
    sizes = {Path(e.path).relative_to(tmp_path).as_posix(): e.bytes for e in walk.entries}
    assert walk.cut_short is None
    assert list(sizes)[:2] == ["a", "a/b"]
    assert sizes["a"] >= 4 * MIB and sizes["a/b/c/deep.bin"] >= 3 * MIB
    assert "link" not in sizes and not any(p.startswith("link/") for p in sizes)


def test_the_walk_is_bounded_in_depth_and_time_and_says_so(tmp_path: Path) -> None:
    _tree(tmp_path)
    shallow = walk_largest(str(tmp_path), depth=2, budget_seconds=60, top=10)
    names = {Path(e.path).relative_to(tmp_path).as_posix() for e in shallow.entries}
    assert "a/b/c/deep.bin" not in names and "a/one.bin" in names
    assert shallow.cut_short == "1 directories below scan_depth=2 not entered"
    none = walk_largest(str(tmp_path), depth=10, budget_seconds=0, top=10)
    assert none.entries == [] and none.cut_short == "the time budget of 0 s ran out"
    missing = walk_largest(str(tmp_path / "nope"), depth=2, budget_seconds=1, top=10)
    assert missing.error == "No such file or directory"


def test_a_deadline_shared_by_the_walks_is_kept_whatever_each_budget(tmp_path: Path) -> None:
    """scan_seconds bounds all paths together: a walk reached after the run's deadline reads
    nothing, however much of the budget a walk of its own would have had."""
    _tree(tmp_path)
    # time.monotonic() 0.0 is the clock's start (boot, on Linux): long past.
    late = walk_largest(str(tmp_path), depth=10, budget_seconds=60, top=10, deadline=0.0)
    assert late.entries == [] and late.cut_short == "the time budget of 60 s ran out"
    walks = largest_entries.fn([str(tmp_path), str(tmp_path / "a")], 10, 0, 10)
    assert [w.cut_short for w in walks] == ["the time budget of 0 s ran out"] * 2


def test_old_partitions_are_dropped_only_for_the_data_directorys_filesystem() -> None:
    assert partition_disk(7, {7, 8}) == "hot"
    assert partition_disk(9, {7}) == "elsewhere"  # another disk is full: dropping frees nothing
    assert partition_disk(None, {7}) == "unknown"  # no data_directory here: never dropped
    assert partition_disk(None, set()) == partition_disk(7, set()) == "cool"
    now = datetime(2026, 12, 1, tzinfo=UTC)
    old = [_dated("pageview_2020_01", date(2020, 1, 1), date(2020, 2, 1))]
    found = {
        disk: partition_findings("box", "main", old, months_before(now, 12), disk, DiskParams())
        for disk in ("hot", "elsewhere", "unknown", "cool")
    }
    severity = {disk: f.severity for disk, [f] in found.items()}
    assert severity == {
        "hot": Severity.warning,
        "elsewhere": Severity.ok,
        "unknown": Severity.warning,
        "cool": Severity.ok,
    }
    assert "drop them, oldest first" in found["hot"][0].message
    assert "frees nothing there" in found["elsewhere"][0].message
    assert "set [postgres.main] data_directory" in found["unknown"][0].message


def test_vacuum_full_is_suggested_at_postgres_maintenances_thresholds() -> None:
    def table(name: str, live: int, dead: int) -> TableStats:
        return TableStats(
            schema_name="public",
            table=name,
            live_tuples=live,
            dead_tuples=dead,
            last_vacuum=None,
            last_autovacuum=None,
            last_analyze=None,
            last_autoanalyze=None,
            table_bytes=MIB,
            index_bytes=0,
            total_bytes=MIB,
        )

    tables = [table("bloated", 6000, 4000), table("few", 10, 90), table("clean", 9000, 1000)]
    [_, suggestion] = table_findings("box", "main", tables, DiskParams(), MaintenanceParams())
    # "few" is over the ratio with fewer than min_dead_tuples; "clean" is at 10 %.
    assert suggestion.check == "vacuum_full" and suggestion.observed == ["public.bloated"]
    stricter = MaintenanceParams(dead_tuple_ratio=0.5)
    assert [f.check for f in table_findings("box", "main", tables, DiskParams(), stricter)] == [
        "largest_tables"
    ]
