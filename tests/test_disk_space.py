"""disk-space against a filesystem that really fills up (a 4 MiB tmpfs, written to the last
byte), a real Docker Engine's json-file log, real monthly partitions in PostgreSQL with
look-alike tables beside them, and local backups under a retention policy."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest

from flows.disk_space import disk_space
from tasks.disk_rules import DiskParams
from tasks.models import ActionStatus, RunStatus, Severity
from tasks.wait import poll
from tests.conftest import Db
from tests.docker_engine import IMAGE
from tests.test_cli import cli, no_traceback

KIB = 1024
BACKUP_BYTES = 600 * KIB
# Days ago of each backup: the newest is kept by the policy below, the five older are past it.
BACKUP_AGES = (2, 10, 20, 30, 40, 50)
LOG_LINES = 20_000  # about 3 MiB of json-file log: over max_log_mb = 1


def _month(now: datetime, back: int) -> tuple[int, int]:
    index = now.year * 12 + now.month - 1 - back
    return index // 12, index % 12 + 1


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs mounted on a temp dir (the tests run as root), unmounted after."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    d = tmp_path / "disk"
    d.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(d)],
        check=True,
        capture_output=True,
        timeout=30,
    )
    try:
        yield d
    finally:
        subprocess.run(["umount", "-l", str(d)], check=True, capture_output=True, timeout=30)


def plant_backups(folder: Path) -> list[Path]:
    """Six dumps, 2 to 50 days old, each with a .sha256 sidecar."""
    folder.mkdir()
    now = time.time()
    made = []
    for n, days in enumerate(BACKUP_AGES):
        path = folder / f"app-{n}.dump"
        path.write_bytes(os.urandom(BACKUP_BYTES))
        (folder / f"app-{n}.dump.sha256").write_text("0" * 64 + "\n")
        for p in (path, Path(f"{path}.sha256")):
            os.utime(p, (now - days * 86400, now - days * 86400))
        made.append(path)
    return made


def fill(folder: Path) -> Path:
    """Write a file until the filesystem refuses with ENOSPC: the disk is full."""
    filler = folder / "upload.bin"
    chunk = b"\0" * (64 * KIB)
    with filler.open("wb") as out:
        while True:
            try:
                out.write(chunk)
                out.flush()
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
                break
    return filler


def plant_partitions(db: Db) -> dict[str, list[str]]:
    """analytics.pageview by month: two of 2020 (older than 12 months), last month and this
    month, a default partition; and two look-alike plain tables of 2020 that must stay."""
    now = datetime.now(UTC)
    recent = [_month(now, 1), _month(now, 0)]
    old = [(2020, 1), (2020, 2)]
    with db.admin() as conn:
        conn.execute("CREATE SCHEMA analytics")
        conn.execute(
            "CREATE TABLE analytics.pageview (id bigint, path text, viewed_at timestamptz "
            "NOT NULL) PARTITION BY RANGE (viewed_at)"
        )
        for year, month in old + recent:
            nxt = (year + month // 12, month % 12 + 1)
            conn.execute(
                f"CREATE TABLE analytics.pageview_{year}_{month:02d} PARTITION OF "
                f"analytics.pageview FOR VALUES FROM ('{year}-{month:02d}-01') "
                f"TO ('{nxt[0]}-{nxt[1]:02d}-01')"
            )
            conn.execute(
                "INSERT INTO analytics.pageview SELECT g, '/p', %s FROM generate_series(1, 2000) g",
                [datetime(year, month, 2, tzinfo=UTC)],
            )
        conn.execute(
            "CREATE TABLE analytics.pageview_default PARTITION OF analytics.pageview DEFAULT"
        )
        conn.execute("CREATE TABLE analytics.pageview_2020_01_backup (id int)")
        conn.execute("CREATE TABLE analytics.pageviews_2020_01 (id int)")
    return {
        "old": [f"pageview_{y}_{m:02d}" for y, m in old],
        "kept": [f"pageview_{y}_{m:02d}" for y, m in recent]
        + ["pageview_default", "pageview_2020_01_backup", "pageviews_2020_01"],
    }


def tables(db: Db) -> set[str]:
    with db.admin() as conn:
        rows = conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'analytics'")
        return {r[0] for r in rows}


@pytest.fixture
def chatty(docker_engine: Any) -> Iterator[dict[str, Any]]:
    """A busybox container that prints LOG_LINES lines, then sleeps: its json-file log, as
    the engine names it (LogPath), grows past 1 MiB and stays there."""
    name = f"chatty-{uuid.uuid4().hex[:8]}"
    line = "x" * 100
    script = f'i=0; while [ $i -lt {LOG_LINES} ]; do echo "{line}"; i=$((i+1)); done; sleep 3600'
    client = docker_engine.client()
    container = client.containers.run(
        IMAGE, ["sh", "-c", script], name=name, detach=True, network_mode="none"
    )
    log_path = Path(client.api.inspect_container(name)["LogPath"])
    done = poll(
        lambda: log_path.exists() and log_path.stat().st_size > 2 * 2**20,
        what="the container's log to pass 2 MiB",
        timeout_seconds=60,
    )
    assert done.done, "the container did not log 2 MiB"
    try:
        yield {"name": name, "log": log_path, "container": container, "engine": docker_engine}
    finally:
        container.remove(force=True)
        client.close()


def write_inventory(db: Db, disk: Path, backups: Path, chatty: dict[str, Any]) -> None:
    """The disk, the backups on it and the container; PostgreSQL's data_directory is the
    test server's, on another filesystem than the disk."""
    db.write_config(
        f"""data_directory = "{db.server.data}"

[services.chatty]
kind = "docker"
container = "{chatty["name"]}"
docker_host = "{chatty["engine"].socket}"

[backups.local]
directory = "{backups}"
pattern = ["*.dump"]

[backups.local.thresholds]
keep_daily = 1
keep_weekly = 0
keep_monthly = 0

[disk.box]
paths = ["{disk}"]
postgres = "main"
services = ["chatty"]
backups = "local"
partitions = ["analytics.pageview_YYYY_MM"]

[disk.box.thresholds]
max_log_mb = 1
"""
    )


def run(*args: str, api: str) -> tuple[int, dict[str, Any]]:
    proc = cli(
        "run", "disk-space", "--target", "box", "--json", *args, env={"PREFECT_API_URL": api}
    )
    no_traceback(proc)
    report = json.loads(proc.stdout) if proc.stdout.strip() else {"err": proc.stderr}
    return proc.returncode, report


def by_check(report: dict[str, Any], check: str) -> list[dict[str, Any]]:
    return [f for f in report["findings"] if f["check"] == check]


def test_a_full_disk_is_diagnosed_then_freed_through_the_cli(
    db: Db, small_disk: Path, chatty: dict[str, Any], prefect_api: str
) -> None:
    backups = plant_backups(small_disk / "backups")
    planted = plant_partitions(db)
    write_inventory(db, small_disk, small_disk / "backups", chatty)
    fill(small_disk)  # the disk is full: the diagnosis must still work
    assert os.statvfs(small_disk).f_bavail == 0
    log_bytes = chatty["log"].stat().st_size

    code, report = run(api=prefect_api)
    assert code == 1, report
    [space] = by_check(report, "disk_space")
    assert space["severity"] == Severity.critical and space["observed"] == 100.0
    [log] = by_check(report, "container_log")
    assert log["severity"] == Severity.warning and log["observed"] > 1
    # The old partitions are in a data_directory on another filesystem: dropping them would
    # free nothing on the full disk.
    assert os.stat(db.server.data).st_dev != os.stat(small_disk).st_dev
    [old] = by_check(report, "old_partitions")
    assert old["severity"] == Severity.ok and old["observed"] == 2
    assert "frees nothing there" in old["message"]
    [gone] = by_check(report, "old_backups")
    assert gone["severity"] == Severity.warning and gone["observed"] == 5
    [largest] = by_check(report, "largest_entries")
    assert largest["observed"][0]["path"] == str(small_disk / "backups")
    assert str(small_disk / "upload.bin") in {r["path"] for r in largest["observed"]}
    tables_found = by_check(report, "largest_tables")[0]["observed"]
    assert {r["table"] for r in tables_found} >= {"analytics.pageview_2020_01"}
    kinds = [a["kind"] for a in report["actions"]]
    assert kinds == ["truncate_container_log"] + ["delete_backup"] * 5
    # Backup deletions name the set, as backup-retention's do.
    assert {a["target"] for a in report["actions"][1:]} == {"local"}
    assert all(a["status"] == ActionStatus.planned for a in report["actions"])
    # A dry run changed nothing.
    assert all(b.exists() for b in backups)
    assert tables(db) >= set(planted["old"])
    assert chatty["log"].stat().st_size == log_bytes

    code, report = run("--apply", "--yes", api=prefect_api)
    assert code == 0, report
    assert report["status"] == RunStatus.fixed
    assert [a["status"] for a in report["actions"]] == [ActionStatus.done] * 6, report["actions"]
    # The incident is gone: below the thresholds, backups past the policy deleted (the newest
    # kept), the log emptied, the container still running; the partitions, elsewhere, kept.
    vfs = os.statvfs(small_disk)
    assert 1 - vfs.f_bavail / vfs.f_blocks < 0.8
    assert [b.exists() for b in backups] == [True] + [False] * 5
    assert not any(Path(f"{b}.sha256").exists() for b in backups[1:])
    assert tables(db) >= set(planted["old"]) | set(planted["kept"])
    assert chatty["log"].stat().st_size < 2**20
    chatty["container"].reload()
    assert chatty["container"].status == "running"
    [freed] = by_check(report, "freed")
    assert freed["observed"]["after_free_bytes"] > freed["observed"]["before_free_bytes"] == 0

    code, report = run(api=prefect_api)
    assert code == 0, report
    assert report["status"] == RunStatus.healthy and report["actions"] == []


def test_below_the_thresholds_only_an_oversized_log_is_cleaned(
    db: Db, tmp_path: Path, chatty: dict[str, Any], prefect_api: str
) -> None:
    """Backups past their policy and old partitions are data: removed only while the disk
    needs the room. A log over max_log_mb is unrotated whatever the disk's usage."""
    backups = plant_backups(tmp_path / "backups")
    planted = plant_partitions(db)
    write_inventory(db, tmp_path, tmp_path / "backups", chatty)
    # Thresholds no real filesystem here reaches, space nor inodes.
    params = DiskParams(
        used_warning_percent=99.99,
        used_critical_percent=100,
        inodes_warning_percent=99.99,
        inodes_critical_percent=100,
    )
    report = disk_space(target="box", dry_run=False, approval="auto", params=params)
    assert [(a.kind, a.status) for a in report.actions] == [
        ("truncate_container_log", ActionStatus.done)
    ]
    assert all(b.exists() for b in backups)
    assert tables(db) >= set(planted["old"])
    assert chatty["log"].stat().st_size < 2**20
    [old] = [f for f in report.findings if f.check == "old_partitions"]
    assert old.severity is Severity.ok and "kept while the disk is below" in old.message


@pytest.mark.parametrize("data_directory", [True, False], ids=["data_directory", "unknown"])
def test_old_partitions_are_dropped_when_the_data_directorys_filesystem_is_over(
    db: Db, prefect_api: str, data_directory: bool
) -> None:
    """The filesystem holding PostgreSQL's data directory is over a (low) warning threshold:
    the old partitions go, the recent ones and the look-alikes stay. Without data_directory
    which filesystem holds them is unknown: they are reported, never dropped."""
    planted = plant_partitions(db)
    data = db.server.data
    db.write_config(
        (f'data_directory = "{data}"\n' if data_directory else "")
        + f"""
[disk.box]
paths = ["{data}"]
postgres = "main"
partitions = ["analytics.pageview_YYYY_MM"]

[disk.box.thresholds]
used_warning_percent = 0.001
used_critical_percent = 100
inodes_warning_percent = 100
inodes_critical_percent = 100
"""
    )
    report = disk_space(target="box", dry_run=False, approval="auto")
    drops = [a for a in report.actions if a.kind == "drop_partition"]
    left = tables(db)
    [old] = [f for f in report.findings if f.check == "old_partitions"]
    if data_directory:
        assert [a.status for a in drops] == [ActionStatus.done] * 2, report.actions
        assert not left & set(planted["old"]) and left >= set(planted["kept"])
        with db.admin() as conn:
            # The partitioned table lives on with its recent months.
            assert conn.execute("SELECT count(*) FROM analytics.pageview").fetchone() == (4000,)
        # Honest: the filesystem is still over 0.001 %.
        assert report.status is RunStatus.unhealthy
    else:
        assert drops == [] and left >= set(planted["old"]) | set(planted["kept"])
        assert old.severity is Severity.warning and old.observed == 2
        assert "set [postgres.main] data_directory" in old.message


BAD = [
    (
        'paths = ["/"]\npartitions = ["analytics.pageview_YYYY"]\npostgres = "main"',
        "disk.box.partitions: partition pattern 'analytics.pageview_YYYY' must be SCHEMA.PREFIX",
    ),
    (
        'paths = ["/"]\npartitions = ["pageview_YYYY_MM"]\npostgres = "main"',
        "must be SCHEMA.PREFIX followed by YYYY_MM or YYYY_MM_DD",
    ),
    (
        'paths = ["/"]\npartitions = ["analytics.pageview_YYYY_MM_backup"]\npostgres = "main"',
        "nothing after the date",
    ),
    ('paths = ["/"]\npartitions = ["analytics.pageview_YYYY_MM"]', "partitions need postgres"),
    ('paths = ["var/log"]', "'var/log' is not an absolute path"),
    ("paths = []", "disk.box.paths"),
    ('paths = ["/"]\npostgres = "nope"', "disk.box.postgres names 'nope', which is not a"),
    ('paths = ["/"]\nservices = ["db"]', "of kind command: only kind docker has json-file logs"),
    ('paths = ["/"]\nbackups = "nope"', "disk.box.backups names 'nope', which is not a"),
    ('paths = ["/"]\nbackups = "remote"', "which is kept in S3"),
    ('paths = ["/"]\n[disk.box.thresholds]\nused_warning_percent = 95', "used_warning_percent"),
]


@pytest.mark.parametrize(("entry", "expected"), BAD, ids=[e for _, e in BAD])
def test_bad_configuration_exits_2_with_a_clear_message(
    inventory: Any, entry: str, expected: str
) -> None:
    inventory(
        '[postgres.main]\ndsn = "postgresql://app@127.0.0.1:1/app"\n'
        '[services.db]\nkind = "command"\nstatus_command = ["true"]\nrestart_command = ["true"]\n'
        '[s3.store]\nbucket = "b"\n[backups.remote]\ns3 = "store"\n'
        f"[disk.box]\n{entry}\n"
    )
    proc = cli("run", "disk-space", "--target", "box")
    no_traceback(proc)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert expected in proc.stderr, proc.stderr


def test_the_sandbox_plants_old_partitions_that_disk_space_drops(
    prefect_api: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from deployments.sandbox import Sandbox

    box = Sandbox().start()
    try:
        monkeypatch.setenv("RUNBOOK_CONFIG", str(box.config))
        report = disk_space(target="sandbox", dry_run=False, approval="auto")
        drops = [a for a in report.actions if a.kind == "drop_partition"]
        assert [a.status for a in drops] == [ActionStatus.done] * 2, report.actions
        # Honest about what it cannot fix: the sandbox's disk is over its 1 % threshold still.
        assert report.status is RunStatus.unhealthy
        settings_dsn = box.pg.dsn_for("app")
        with psycopg.connect(settings_dsn) as conn:
            left = {
                r[0]
                for r in conn.execute(
                    "SELECT tablename FROM pg_tables WHERE schemaname = 'analytics'"
                )
            }
        this_month = datetime.now(UTC).strftime("pageview_%Y_%m")
        assert left == {"pageview", this_month, "pageview_2020_01_backup"}
    finally:
        box.stop()


def test_a_drop_gives_up_on_a_held_lock_and_never_drops_a_look_alike(db: Db) -> None:
    from tasks.errors import ActionFailed
    from tasks.partitions import drop_partition
    from tasks.settings import PostgresTarget

    planted = plant_partitions(db)
    target = PostgresTarget(dsn=db.dsn)
    pattern = "analytics.pageview_YYYY_MM"
    reader = db.session(user="postgres")
    reader.execute("SELECT count(*) FROM analytics.pageview")  # a transaction left open
    with pytest.raises(ActionFailed, match="lock was not granted within lock_timeout_seconds"):
        drop_partition.fn("main", target, "analytics", planted["old"][0], pattern, 0.2)
    reader.rollback()
    assert planted["old"][0] in tables(db)  # rolled back: still attached and there
    for look_alike in ("pageview_2020_01_backup", "pageviews_2020_01"):
        with pytest.raises(ActionFailed, match="never dropped"):
            drop_partition.fn("main", target, "analytics", look_alike, pattern, 5)
    assert tables(db) >= set(planted["kept"])
    done = drop_partition.fn("main", target, "analytics", planted["old"][0], pattern, 5)
    assert done.startswith("detached from analytics.pageview and dropped (")
    assert planted["old"][0] not in tables(db)
    assert drop_partition.fn("main", target, "analytics", planted["old"][0], pattern, 5) == (
        "already gone"
    )
