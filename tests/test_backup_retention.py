"""backup-retention: the grandfather-father-son decision on its own (fixed clocks, period
edges, the cap, the safety rules), then the flow deleting for real from a directory and from
an S3 endpoint (moto's server) whose objects were written days ago."""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from flows.backup_retention import backup_retention
from tasks.backups import Backup
from tasks.models import ActionStatus, RunStatus, Severity
from tasks.retention import batches
from tasks.retention_rules import RetentionParams, plan_retention, retention_findings
from tests.s3_helpers import KEY, SECRET, MotoServer, client
from tests.test_cli import cli, no_traceback

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)  # a Monday
BUCKET = "backups"


def backup(at: datetime, key: str | None = None, size: int = 1000) -> Backup:
    return Backup(key=key or f"app-{at:%Y%m%dT%H%M%S}.sql.gz", size=size, modified=at)


def daily(n: int, *, hour: int = 2, end: datetime = NOW) -> list[Backup]:
    """One backup a day at `hour` UTC, the newest on `end`'s day."""
    last = end.replace(hour=hour, minute=0, second=0)
    return [backup(last - timedelta(days=i)) for i in range(n)]


def verdicts(backups: list[Backup], now: datetime = NOW, **params: int) -> dict[str, str]:
    plan = plan_retention(backups, now, RetentionParams(**params))
    return {d.key: d.verdict for d in plan.decisions}


def kept(backups: list[Backup], now: datetime = NOW, **params: int) -> set[str]:
    return {k for k, v in verdicts(backups, now, **params).items() if v == "keep"}


# --- the decision ------------------------------------------------------------------------------


def test_fewer_backups_than_the_counts_are_all_kept() -> None:
    backups = daily(5)
    plan = plan_retention(backups, NOW, RetentionParams())
    assert {d.verdict for d in plan.decisions} == {"keep"}
    findings = retention_findings("app", "/b", plan, RetentionParams())
    assert findings[0].severity is Severity.ok and "none past the policy" in findings[0].message


def test_ninety_daily_backups_under_the_defaults() -> None:
    backups = daily(90)  # 2026-08-26 .. 2026-11-23, 02:00 UTC
    keep = kept(backups)
    days = {b.modified.date().isoformat() for b in backups if b.key in keep}
    # 7 daily: 17th..23rd. Weekly, newest of the 4 latest ISO weeks: Mon 23rd (W48), Sun 22nd
    # (W47), Sun 15th (W46), Sun 8th (W45). Monthly, newest of each of the 6 latest months
    # that have one: 23 Nov, 31 Oct, 30 Sep, 31 Aug.
    expected = {f"2026-11-{d:02d}" for d in range(17, 24)} | {
        "2026-11-15",
        "2026-11-08",
        "2026-10-31",
        "2026-09-30",
        "2026-08-31",
    }
    assert days == expected
    assert len(verdicts(backups)) - len(keep) == 90 - len(expected)


def test_several_backups_a_day_keep_the_days_newest() -> None:
    morning = NOW.replace(hour=1) - timedelta(days=3)
    backups = [backup(morning), backup(morning + timedelta(hours=6)), *daily(1)]
    result = verdicts(backups, keep_daily=2, keep_weekly=0, keep_monthly=0)
    assert result[backups[1].key] == "keep" and result[backups[0].key] == "delete"


def test_days_without_a_backup_are_not_counted() -> None:
    # backups 2 and 30 days ago: keep_daily=2 keeps both, however far apart
    backups = [backup(NOW - timedelta(days=2)), backup(NOW - timedelta(days=30))]
    assert len(kept(backups, keep_daily=2, keep_weekly=0, keep_monthly=0)) == 2


@pytest.mark.parametrize(
    ("last_second", "rule"),
    [
        (datetime(2026, 11, 10, 23, 59, 59, tzinfo=UTC), "keep_daily"),  # midnight UTC
        (datetime(2026, 11, 8, 23, 59, 59, tzinfo=UTC), "keep_weekly"),  # Sunday to Monday
        (datetime(2026, 10, 31, 23, 59, 59, tzinfo=UTC), "keep_monthly"),  # October to November
    ],
)
def test_period_edges(last_second: datetime, rule: str) -> None:
    counts = {"keep_daily": 0, "keep_weekly": 0, "keep_monthly": 0, rule: 3}
    newest = backup(NOW + timedelta(days=200), key="newest")
    now = NOW + timedelta(days=260)
    # one second apart across the edge: two periods, each keeps its own
    across = [newest, backup(last_second + timedelta(seconds=1)), backup(last_second)]
    assert kept(across, now, **counts) == {b.key for b in across}
    # one second apart before the edge: one period, whose newest is the later one
    within = [newest, backup(last_second), backup(last_second - timedelta(seconds=1))]
    assert kept(within, now, **counts) == {"newest", within[1].key}


def test_iso_weeks_run_across_the_new_year() -> None:
    # Thursday 31 Dec 2026 and Friday 1 Jan 2027 are both in ISO week 2026-W53
    backups = [
        backup(datetime(2026, 12, 31, 2, tzinfo=UTC)),
        backup(datetime(2027, 1, 1, 2, tzinfo=UTC)),
    ]
    now = datetime(2027, 3, 1, tzinfo=UTC)
    plan = plan_retention(backups, now, RetentionParams(keep_daily=0, keep_monthly=0))
    assert [d.why for d in plan.decisions] == [["newest", "weekly 2026-W53"], ["past the policy"]]


def test_periods_are_utc_whatever_the_timestamp_zone() -> None:
    plus_two = timezone(timedelta(hours=2))
    # 01:00 at +02:00 is 23:00 UTC the day before: a different UTC day from 12:00 UTC that day
    a = backup(datetime(2026, 11, 11, 1, tzinfo=plus_two), key="a")
    b = backup(datetime(2026, 11, 10, 12, tzinfo=UTC), key="b")
    plan = plan_retention([a, b], NOW, RetentionParams(keep_daily=1, keep_weekly=0, keep_monthly=0))
    assert [d.why for d in plan.decisions] == [["newest", "daily 2026-11-10"], ["past the policy"]]


def test_the_newest_is_kept_even_when_every_count_is_zero() -> None:
    backups = daily(10, end=NOW - timedelta(days=40))
    result = verdicts(backups, keep_daily=0, keep_weekly=0, keep_monthly=0)
    assert [result[b.key] for b in backups] == ["keep"] + ["delete"] * 9


def test_nothing_younger_than_a_day_is_deleted() -> None:
    young = [backup(NOW - timedelta(hours=h)) for h in (1, 5, 23.9)]
    old = backup(NOW - timedelta(hours=24, seconds=1))
    future = backup(NOW + timedelta(hours=3), key="clock-skew")  # a store ahead of our clock
    result = verdicts([*young, old, future], keep_daily=0, keep_weekly=0, keep_monthly=0)
    assert result[old.key] == "delete"
    assert all(result[b.key] == "keep" for b in [*young, future])


def test_the_cap_deletes_the_oldest_first_and_says_so() -> None:
    backups = daily(20, end=NOW - timedelta(days=100))
    p = RetentionParams(keep_daily=2, keep_weekly=0, keep_monthly=0, max_deletions=5)
    plan = plan_retention(backups, NOW, p)
    assert [d.key for d in plan.delete] == [b.key for b in reversed(backups)][:5]
    assert len(plan.deferred) == 13 and len(plan.kept) == 2
    findings = {f.check: f for f in retention_findings("app", "/b", plan, p)}
    cap = findings["max_deletions"]
    assert cap.severity is Severity.warning and cap.observed == 18 and cap.threshold == 5
    assert "deletes the 5 oldest" in cap.message


def test_ties_do_not_depend_on_listing_order() -> None:
    at = NOW - timedelta(days=10)
    backups = [backup(at, key=k) for k in ("b", "a", "c")]
    one = verdicts(backups, keep_daily=1, keep_weekly=0, keep_monthly=0)
    other = verdicts(list(reversed(backups)), keep_daily=1, keep_weekly=0, keep_monthly=0)
    assert one == other == {"c": "keep", "b": "delete", "a": "delete"}


def test_no_backups() -> None:
    plan = plan_retention([], NOW, RetentionParams())
    [finding] = retention_findings("app", "/b", plan, RetentionParams())
    assert finding.severity is Severity.ok and "nothing to prune" in finding.message


def test_batches_of_at_most_a_thousand() -> None:
    keys = [str(i) for i in range(2345)]
    parts = list(batches(keys, 1000))
    assert [len(p) for p in parts] == [1000, 1000, 345] and [
        k for part in parts for k in part
    ] == keys


# --- the flow on a directory ---------------------------------------------------------------------


def make_dir_backups(folder: Path, days_ago: list[float]) -> list[Path]:
    paths = []
    for n, days in enumerate(days_ago):
        path = folder / f"app-{n:03d}.sql.gz"
        path.write_bytes(b"dump %d" % n)
        sidecar = folder / f"{path.name}.sha256"
        sidecar.write_text(f"{'0' * 64}  {path.name}\n")
        at = time.time() - days * 86400
        for p in (path, sidecar):
            os.utime(p, (at, at))
        paths.append(path)
    return paths


# Ten backups a day apart (the newest 12 h old): with keep_daily=3 and no weekly or monthly
# the three newest stay and the seven others go.
AGES = [0.5 + i for i in range(10)]
THREE_DAILY = {"keep_daily": 3, "keep_weekly": 0, "keep_monthly": 0}


def names(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


def test_directory_dry_run_then_apply(tmp_path: Path, inventory: Any, prefect_api: str) -> None:
    folder = tmp_path / "backups"
    folder.mkdir()
    paths = make_dir_backups(folder, AGES)
    (folder / "notes.txt").write_text("not a backup: the pattern does not match it")
    inventory(f'[backups.app]\ndirectory = "{folder}"\n')
    before = names(folder)

    report = backup_retention("app", params=RetentionParams(**THREE_DAILY))
    assert report.status is RunStatus.unhealthy and report.exit_code == 1
    assert [a.status for a in report.actions] == [ActionStatus.planned] * 7
    assert names(folder) == before

    report = backup_retention(
        "app", dry_run=False, approval="auto", params=RetentionParams(**THREE_DAILY)
    )
    assert report.status is RunStatus.fixed, report.findings
    assert {a.status for a in report.actions} == {ActionStatus.done}
    left = {p.name for p in paths[:3]}
    assert names(folder) == left | {f"{n}.sha256" for n in left} | {"notes.txt"}
    assert report.findings[0].severity is Severity.ok


def test_directory_cap_spreads_deletions_over_runs(
    tmp_path: Path, inventory: Any, prefect_api: str
) -> None:
    paths = make_dir_backups(tmp_path, AGES)
    # the cap from the backup set's own thresholds, the policy from the run
    inventory(
        f'[backups.app]\ndirectory = "{tmp_path}"\n[backups.app.thresholds]\nmax_deletions = 4\n'
    )
    report = backup_retention(
        "app", dry_run=False, approval="auto", params=RetentionParams(**THREE_DAILY)
    )
    assert report.status is RunStatus.unhealthy  # three more are past the policy
    assert {f.check for f in report.findings} >= {"retention"}
    assert [a.args.key for a in report.actions] == [str(p) for p in reversed(paths[6:])]
    assert {p.name for p in tmp_path.glob("*.gz")} == {p.name for p in paths[:6]}
    before = {f.check: f for f in report.findings}
    assert before["retention"].observed == 3

    report = backup_retention(
        "app", dry_run=False, approval="auto", params=RetentionParams(**THREE_DAILY)
    )
    assert report.status is RunStatus.fixed
    assert {p.name for p in tmp_path.glob("*.gz")} == {p.name for p in paths[:3]}


# --- the flow on S3 ----------------------------------------------------------------------------

# moto's server as it runs, with the clock its S3 stamps LastModified from set back by the
# seconds in a file: objects written while it says 864000 were written ten days ago.
CLOCKED_MOTO = """
import datetime, pathlib, sys
import moto.s3.models
from moto.server import main

offset = pathlib.Path(sys.argv[1])
wall = moto.s3.models.utcnow

def utcnow():
    return wall() - datetime.timedelta(seconds=float(offset.read_text() or 0))

moto.s3.models.utcnow = utcnow
main(["-H", "127.0.0.1", "-p", sys.argv[2]])
"""


class AgedS3(MotoServer):
    def __init__(self, tmp: Path) -> None:
        super().__init__()
        self.offset = tmp / "offset"
        self.offset.write_text("0")
        self.client = client(self.url)

    def argv(self) -> list[str]:
        return [sys.executable, "-c", CLOCKED_MOTO, str(self.offset), str(self.port)]

    def put(self, key: str, days_ago: float) -> None:
        self.offset.write_text(str(days_ago * 86400))
        try:
            self.client.put_object(Bucket=BUCKET, Key=key, Body=b"dump")
            self.client.put_object(Bucket=BUCKET, Key=f"{key}.sha256", Body=b"0" * 64)
        finally:
            self.offset.write_text("0")

    def keys(self) -> set[str]:
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET)
        return {o["Key"] for page in pages for o in page.get("Contents", [])}


@pytest.fixture(scope="module")
def aged_s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgedS3]:
    server = AgedS3(tmp_path_factory.mktemp("aged-s3"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def s3_backups(aged_s3: AgedS3, inventory: Any) -> AgedS3:
    aged_s3.fresh_bucket(BUCKET)
    inventory(
        f'[s3.store]\nbucket = "{BUCKET}"\nprefix = "db/"\nendpoint_url = "{aged_s3.url}"\n'
        f'access_key_id = "{KEY}"\nsecret_access_key = "{SECRET}"\ntimeout_seconds = 5\n'
        '[backups.app]\ns3 = "store"\nprefix = "app/"\n'
    )
    return aged_s3


def with_sidecars(keys: list[str]) -> set[str]:
    return set(keys) | {f"{k}.sha256" for k in keys}


def test_s3_plan_then_apply_through_the_cli(s3_backups: AgedS3, prefect_api: str) -> None:
    keys = [f"db/app/app-{n:03d}.sql.gz" for n in range(len(AGES))]
    for key, days in zip(keys, AGES, strict=True):
        s3_backups.put(key, days)
    s3_backups.put("db/app2/app-x.sql.gz", 30)  # another set whose prefix starts like ours
    s3_backups.put("db/app/archive/app-y.sql.gz", 300)  # a sub-folder: not this set's listing
    before = s3_backups.keys()
    env = {"PREFECT_API_URL": prefect_api}
    sets = [a for k, v in THREE_DAILY.items() for a in ("--set", f"{k}={v}")]

    proc = cli("run", "backup-retention", "--target", "app", *sets, "--json", env=env)
    assert proc.returncode == 1, proc.stderr
    report = json.loads(proc.stdout)
    assert report["dry_run"] is True and len(report["actions"]) == 7
    assert {a["status"] for a in report["actions"]} == {"planned"}
    assert s3_backups.keys() == before

    proc = cli("run", "backup-retention", *sets, "--apply", "--yes", "--json", env=env)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["status"] == "fixed"
    assert s3_backups.keys() == with_sidecars(
        [*keys[:3], "db/app2/app-x.sql.gz", "db/app/archive/app-y.sql.gz"]
    )
    no_traceback(proc)


def test_s3_young_backups_are_never_deleted(s3_backups: AgedS3, prefect_api: str) -> None:
    keys = [f"db/app/app-{n}.sql.gz" for n in range(4)]
    for key in keys:
        s3_backups.put(key, 0)
    report = backup_retention(
        "app",
        dry_run=False,
        approval="auto",
        params=RetentionParams(keep_daily=0, keep_weekly=0, keep_monthly=0),
    )
    assert report.status is RunStatus.healthy and report.actions == []
    assert s3_backups.keys() == with_sidecars(keys)
    rows = next(f for f in report.findings if f.check == "backups").observed
    assert {r["why"] for r in rows} >= {"younger than 24 h", "newest; younger than 24 h"}


def test_s3_a_protected_backup_is_reported_and_the_rest_deleted(
    s3_backups: AgedS3, prefect_api: str
) -> None:
    keys = [f"db/app/app-{n:03d}.sql.gz" for n in range(len(AGES))]
    for key, days in zip(keys, AGES, strict=True):
        s3_backups.put(key, days)
    protected = keys[5]
    s3_backups.client.put_bucket_policy(
        Bucket=BUCKET,
        Policy=json.dumps(
            {
                "Version": "2012-10-17",
                "Statement": [
                    {
                        "Effect": "Deny",
                        "Principal": "*",
                        "Action": "s3:DeleteObject",
                        "Resource": f"arn:aws:s3:::{BUCKET}/{protected}",
                    }
                ],
            }
        ),
    )
    report = backup_retention(
        "app", dry_run=False, approval="auto", params=RetentionParams(**THREE_DAILY)
    )
    assert report.status is RunStatus.failed and report.exit_code == 3
    failed = [a for a in report.actions if a.status is ActionStatus.failed]
    assert [a.args.key for a in failed] == [protected]
    assert "AccessDenied" in failed[0].detail
    # its sidecar went (the policy names only the dump); every other old backup is gone
    assert s3_backups.keys() == with_sidecars(keys[:3]) | {protected}


def test_s3_more_than_a_thousand_keys_in_one_run(
    s3_backups: AgedS3, prefect_api: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 520 old backups and their sidecars: 1038 keys to delete, more than one DeleteObjects call;
    # over the default rate of delete_backup (50 a day), raised as a first clean-up would.
    monkeypatch.setenv("RUNBOOK_LIMITS__DELETE_BACKUP__MAX", "1000")
    monkeypatch.setenv("RUNBOOK_LIMITS__DELETE_BACKUP__PER_SECONDS", "86400")
    keys = [f"db/app/app-{n:04d}.sql.gz" for n in range(520)]
    for n, key in enumerate(keys):
        s3_backups.put(key, 10 + n / 100)
    report = backup_retention(
        "app",
        dry_run=False,
        approval="auto",
        params=RetentionParams(keep_daily=0, keep_weekly=0, keep_monthly=0, max_deletions=1000),
    )
    assert report.status is RunStatus.fixed, report.findings
    assert len(report.actions) == 519
    assert s3_backups.keys() == with_sidecars(keys[:1])


def test_deletions_over_the_daily_rate_are_skipped_saying_when_it_frees(
    s3_backups: AgedS3, prefect_api: str
) -> None:
    keys = [f"db/app/app-{n:03d}.sql.gz" for n in range(60)]
    for n, key in enumerate(keys):
        s3_backups.put(key, 10 + n / 100)
    report = backup_retention(
        "app",
        dry_run=False,
        approval="auto",
        params=RetentionParams(keep_daily=0, keep_weekly=0, keep_monthly=0, max_deletions=100),
    )
    done = [a for a in report.actions if a.status is ActionStatus.done]
    refused = [a for a in report.actions if a.status is ActionStatus.skipped]
    assert (len(done), len(refused)) == (50, 9)  # the newest is always kept
    assert "over the rate limit runbook-rate-delete_backup-app (50 per 86400 s)" in (
        refused[0].detail
    )
    assert len(s3_backups.keys()) == 2 * (60 - 50)
