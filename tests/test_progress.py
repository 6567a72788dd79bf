"""Progress of long steps (tasks.progress): the throttle alone, then real restore drills,
backup verifications and pre-change backups of a real dump of a few MiB, their progress
artifacts read back from the Prefect API, and the CLI's bar on a pseudo-terminal."""

from __future__ import annotations

import json
import logging
import os
import pty
import select
import subprocess
import tempfile
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import prefect.artifacts
import pytest
from prefect import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

from flows.backup_verification import backup_verification
from flows.pre_change_backup import pre_change_backup
from flows.restore_drill import restore_drill
from tasks import progress as progress_module
from tasks.models import RunStatus
from tasks.progress import Snapshot, amount, listening, progress
from tests.conftest import Db
from tests.test_cli import RUNBOOK, cli
from tests.test_restore_drill import BUCKET, drill_config, pg_dump, s3_backups

MiB = 1 << 20


class Heard:
    """A test listener: every snapshot it was given."""

    def __init__(self) -> None:
        self.snapshots: list[Snapshot] = []

    def __call__(self, snapshot: Snapshot) -> None:
        self.snapshots.append(snapshot)

    def of(self, what: str) -> list[Snapshot]:
        return [s for s in self.snapshots if s.what.startswith(what)]


@pytest.fixture
def heard() -> Iterator[Heard]:
    listener = Heard()
    with listening(listener):
        yield listener


@pytest.fixture
def every_percent(monkeypatch: pytest.MonkeyPatch) -> None:
    """No time between updates: a dump of a few MiB is restored in well under the second
    between two updates, so only this shows the updates in between; the whole-percent rule
    still bounds them."""
    monkeypatch.setattr(progress_module, "MIN_INTERVAL_SECONDS", 0.0)


def assert_progressed(snapshots: list[Snapshot], total: int) -> None:
    percents = [s.percent for s in snapshots]
    dones = [s.done for s in snapshots]
    assert percents == sorted(percents) and dones == sorted(dones), percents
    assert 2 < len(snapshots) < 200, len(snapshots)
    assert percents[0] == 0 and snapshots[-1].finished and percents[-1] == 100
    assert snapshots[-1].done == snapshots[-1].total == total
    assert not any(s.ended for s in snapshots[:-1])


# -- the throttle, no Prefect run ----------------------------------------------------------


def test_thousands_of_tiny_advances_make_at_most_one_update_a_whole_percent(
    heard: Heard, every_percent: None
) -> None:
    with progress("copy", "copy of t", 10 * MiB) as p:
        for _ in range(10 * MiB // 512):
            p.advance(512)
    assert_progressed(heard.snapshots, 10 * MiB)
    assert len(heard.snapshots) <= 101  # 0 %, each whole percent from 1 to 99, 100 %
    assert heard.snapshots[-1].describe() == "copy of t: 10 of 10 MiB"


def test_without_a_second_between_them_only_the_start_and_the_end_are_sent(
    heard: Heard,
) -> None:
    with progress("tables", "analyze of app", 12, unit="tables") as p:
        for done in range(1, 13):
            p.update(done)
    assert [(s.done, s.percent) for s in heard.snapshots] == [(0, 0), (12, 100)]
    assert heard.snapshots[-1].describe() == "analyze of app: 12 of 12 tables"


def test_an_error_ends_it_where_it_stopped(heard: Heard) -> None:
    with pytest.raises(RuntimeError), progress("copy", "copy of t", 4 * MiB) as p:
        p.advance(MiB)
        raise RuntimeError("boom")
    last = heard.snapshots[-1]
    assert last.ended and last.stopped and last.percent == 25
    assert last.describe() == "copy of t: stopped at 1 of 4 MiB"


def test_an_estimated_total_is_labelled_and_replaced_by_what_was_done(
    heard: Heard, every_percent: None
) -> None:
    with progress("dump", "dump of main", 40 * MiB, estimate="the database's size") as p:
        for _ in range(12):
            p.advance(MiB)
    during, last = heard.snapshots[1], heard.snapshots[-1]
    assert during.describe() == (
        "dump of main: 1 of about 40 MiB (the total is an estimate: the database's size)"
    )
    assert last.finished and last.percent == 100 and last.total == last.done == 12 * MiB
    assert last.describe() == "dump of main: 12 of 12 MiB"


def test_no_total_no_progress(heard: Heard) -> None:
    with progress("copy", "copy of t") as p:
        p.advance(MiB)
    assert heard.snapshots == []


def test_a_listener_that_fails_is_logged_once_and_the_work_goes_on(
    heard: Heard, every_percent: None, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(snapshot: Snapshot) -> None:
        raise ValueError("no terminal")

    with listening(broken), progress("copy", "copy of t", 100) as p:
        for _ in range(100):
            p.advance(1)
    assert heard.snapshots[-1].finished  # the other listener heard every update
    warnings = [r for r in caplog.records if "progress listener failed" in r.getMessage()]
    assert len(warnings) == 1 and "no terminal" in warnings[0].getMessage()


def test_amounts_read_as_a_person_says_them() -> None:
    assert amount(412 * MiB, 1024 * MiB, "bytes") == "412 of 1,024 MiB"
    assert amount(3 * MiB // 2, 9 * MiB, "bytes") == "1.5 of 9 MiB"
    assert amount(5 << 30, 10 << 30, "bytes") == "5 of 10 GiB"
    assert amount(3, 12, "tables") == "3 of 12 tables"


# -- real runs: the artifact in the Prefect API --------------------------------------------


def progress_artifacts(flow_run_id: Any) -> dict[str, Any]:
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[uuid.UUID(str(flow_run_id))])
            )
        )
    return {a.key: a for a in found if a.type == "progress" and a.key}


def several_mib(db: Db, folder: Path, name: str = "app-1.dump") -> Path:
    """A real custom-format dump of about 9 MiB (uncompressed: -Z0)."""
    with db.admin() as conn:
        conn.execute(
            "CREATE TABLE t AS SELECT i AS id, md5(i::text) AS h FROM generate_series(1, 200000) i"
        )
    path = pg_dump(db, folder / name, "-Fc", "-Z0")
    assert 4 * MiB < path.stat().st_size < 16 * MiB
    return path


@pytest.mark.usefixtures("prefect_api", "every_percent")
def test_a_restore_drill_publishes_its_restore_as_it_goes(
    db: Db, tmp_path: Path, heard: Heard
) -> None:
    dump = several_mib(db, tmp_path)
    drill_config(db, f'directory = "{tmp_path}"', checks='"SELECT count(*) = 200000 FROM t"')
    report = restore_drill("app", dry_run=False, approval="auto")
    assert report.status is RunStatus.healthy, report.findings
    size = dump.stat().st_size
    assert_progressed(heard.of("restore of app"), size)
    artifact = progress_artifacts(report.flow_run_id)["runbook-restore-drill-app-restore"]
    assert artifact.data == 100
    total = amount(size, size, "bytes")
    assert artifact.description == f"restore of app (app-1.dump): {total}"


@pytest.mark.usefixtures("prefect_api", "every_percent")
def test_a_backup_verification_publishes_its_check_as_it_goes(
    db: Db, tmp_path: Path, heard: Heard, inventory: Any
) -> None:
    dump = several_mib(db, tmp_path)
    inventory(f'[backups.app]\ndirectory = "{tmp_path}"\n')
    report = backup_verification("app")
    assert report.status is RunStatus.healthy, report.findings
    size = dump.stat().st_size
    assert_progressed(heard.of("integrity check of app"), size)
    artifact = progress_artifacts(report.flow_run_id)["runbook-backup-verification-app-integrity"]
    assert artifact.data == 100
    assert artifact.description.endswith(f": {amount(size, size, 'bytes')}")


@pytest.mark.usefixtures("prefect_api", "every_percent")
def test_a_pre_change_backup_publishes_its_dump_against_the_database_size(
    db: Db, tmp_path: Path, heard: Heard
) -> None:
    several_mib(db, tmp_path)
    folder = tmp_path / "dumps"
    folder.mkdir()
    db.write_config(f'[backups.app]\ndirectory = "{folder}"\ndatabase = "main"\n')
    report = pre_change_backup("app", dry_run=False, approval="auto")
    assert report.status is RunStatus.healthy, report.findings
    [written] = [p for p in folder.iterdir() if p.suffix == ".dump"]
    dumped = heard.of("dump of main")
    assert dumped[0].estimate == "the database's size on disk" and dumped[0].total > 0
    assert dumped[-1].finished and dumped[-1].done == written.stat().st_size
    artifacts = progress_artifacts(report.flow_run_id)
    assert artifacts["runbook-pre-change-backup-app-dump"].data == 100
    # Then it is read back whole: backup-verification's check, under this runbook's key.
    assert artifacts["runbook-pre-change-backup-app-integrity"].data == 100


@pytest.mark.usefixtures("prefect_api", "every_percent")
def test_a_dump_to_s3_read_by_boto3s_threads_is_published_from_them(
    db: Db, tmp_path: Path, moto_server: Any, caplog: pytest.LogCaptureFixture
) -> None:
    threads: list[str] = []

    def where(snapshot: Snapshot) -> None:
        threads.append(threading.current_thread().name)

    moto_server.fresh_bucket(BUCKET)
    several_mib(db, tmp_path)
    db.write_config(
        s3_backups(moto_server.url) + '[backups.app]\ns3 = "store"\ndatabase = "main"\n'
    )
    heard = Heard()
    caplog.set_level(logging.WARNING)
    with listening(heard), listening(where):
        report = pre_change_backup("app", dry_run=False, approval="auto")
    assert report.status is RunStatus.healthy, report.findings
    dumped = heard.of("dump of main")
    assert len(dumped) > 2 and dumped[-1].finished
    # s3transfer reads the dump on its own threads: they publish, with the run's context.
    assert {t for t in threads if t != threading.current_thread().name}
    assert not [r for r in caplog.records if "not published" in r.getMessage()]
    artifacts = progress_artifacts(report.flow_run_id)
    assert artifacts["runbook-pre-change-backup-app-dump"].data == 100


@pytest.mark.usefixtures("prefect_api", "every_percent")
def test_an_api_that_fails_the_updates_does_not_fail_the_run(
    db: Db, tmp_path: Path, heard: Heard, monkeypatch: pytest.MonkeyPatch, caplog: Any
) -> None:
    calls: list[float] = []

    def down(artifact_id: Any, progress: float, description: str | None = None) -> Any:
        calls.append(progress)
        raise RuntimeError("503 Service Unavailable")

    monkeypatch.setattr(prefect.artifacts, "update_progress_artifact", down)
    several_mib(db, tmp_path)
    drill_config(db, f'directory = "{tmp_path}"')
    caplog.set_level(logging.WARNING)
    report = restore_drill("app", dry_run=False, approval="auto")
    assert report.status is RunStatus.healthy, report.findings
    assert len(calls) > 2 and calls[-1] == 100  # it kept trying, and the drill went on
    warnings = [r for r in caplog.records if "not published" in r.getMessage()]
    assert len(warnings) == 1 and "503 Service Unavailable" in warnings[0].getMessage()
    artifact = progress_artifacts(report.flow_run_id)["runbook-restore-drill-app-restore"]
    assert artifact.data == 0  # created, then every update refused


# -- the CLI: nothing through a pipe, a bar on a terminal ----------------------------------


def test_through_a_pipe_the_cli_prints_what_it_did_before(
    db: Db, tmp_path: Path, prefect_api: str
) -> None:
    several_mib(db, tmp_path)
    db.write_config(f'[backups.app]\ndirectory = "{tmp_path}"\n')
    env = {"PREFECT_API_URL": prefect_api}
    proc = cli("run", "backup-verification", env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""  # no spinner, no bar: not a terminal
    assert (
        "Findings" in proc.stdout and "backup-verification on app (dry run): healthy" in proc.stdout
    )
    assert "integrity check of" not in proc.stdout and "100%" not in proc.stdout
    proc = cli("run", "backup-verification", "--json", env=env)
    assert proc.stderr == "" and json.loads(proc.stdout)["status"] == "healthy"


def on_a_terminal(*args: str, env: dict[str, str]) -> tuple[int, str, str]:
    """Run the CLI with stderr on a pseudo-terminal (stdout a pipe, stdin /dev/null):
    (exit code, stdout, everything the terminal received)."""
    controller, terminal = pty.openpty()
    with tempfile.TemporaryFile() as out:
        proc = subprocess.Popen(
            [RUNBOOK, *args],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=terminal,
            env={**os.environ, "TERM": "xterm-256color", "COLUMNS": "160", **env},
        )
        os.close(terminal)
        received = b""
        while True:
            ready, _, _ = select.select([controller], [], [], 1)
            if ready:
                try:
                    data = os.read(controller, 65536)
                except OSError:  # EIO: the process closed the terminal
                    data = b""
                if not data:
                    break
                received += data
            elif proc.poll() is not None:
                break
        os.close(controller)
        code = proc.wait(60)
        out.seek(0)
        stdout = out.read().decode()
    return code, stdout, received.decode(errors="replace")


def test_on_a_terminal_a_bar_shows_the_check(db: Db, tmp_path: Path, prefect_api: str) -> None:
    dump = several_mib(db, tmp_path)
    db.write_config(f'[backups.app]\ndirectory = "{tmp_path}"\n')
    code, stdout, terminal = on_a_terminal(
        "run", "backup-verification", env={"PREFECT_API_URL": prefect_api}
    )
    assert code == 0, terminal
    size = dump.stat().st_size
    assert "integrity check of app (app-1.dump)" in terminal
    assert "━" in terminal and "100%" in terminal
    assert amount(size, size, "bytes") in terminal
    assert "healthy" in stdout and "integrity check of" not in stdout

    # --json: the spinner as before, no bar
    code, stdout, terminal = on_a_terminal(
        "run", "backup-verification", "--json", env={"PREFECT_API_URL": prefect_api}
    )
    assert code == 0 and json.loads(stdout)["status"] == "healthy"
    assert "integrity check of app" not in terminal and "━" not in terminal
