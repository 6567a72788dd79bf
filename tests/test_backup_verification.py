"""backup-verification against an S3 endpoint (moto's server, over HTTP with boto3) and a local
directory, with backups made and broken for real: truncated, wrong checksum, old, shrunk."""

from __future__ import annotations

import gzip
import hashlib
import os
import random
import socket
import subprocess
import time
import tracemalloc
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deployments.localpg import free_port
from flows.backup_verification import backup_verification
from tasks.backup_rules import dump_made_by, newer_client_needed
from tasks.backups import BadGzip, gunzip, list_backups, run_fed, verify_backup
from tasks.errors import ActionFailed, AuthenticationFailed, TargetUnreachable
from tasks.host import memory_file
from tasks.models import RunStatus, Severity
from tasks.settings import BackupSet, S3Target, load_settings
from tests.conftest import Db
from tests.s3_helpers import KEY, SECRET, MotoServer
from tests.test_restore_drill import fill, future_dump, gzip_t, pg_dump, sql_gz

pytestmark = pytest.mark.usefixtures("prefect_api")
BUCKET = "backups"


@pytest.fixture
def s3(moto_server: Any) -> Any:
    return moto_server.fresh_bucket(BUCKET)


def s3_config(url: str, key: str = KEY, prefix: str = "db/") -> str:
    return (
        f'[s3.store]\nbucket = "{BUCKET}"\nprefix = "{prefix}"\nendpoint_url = "{url}"\n'
        f'access_key_id = "{key}"\nsecret_access_key = "{SECRET}"\ntimeout_seconds = 2\n'
        '[backups.app]\ns3 = "store"\n'
    )


def dump(size: int, seed: int = 1) -> bytes:
    rng = random.Random(seed)
    lines = [f"INSERT INTO t VALUES ({i}, '{rng.random()}');\n" for i in range(size // 40)]
    return gzip.compress("".join(lines).encode())


def put(client: Any, key: str, data: bytes, checksum: str | None = None) -> None:
    client.put_object(Bucket=BUCKET, Key=key, Body=data)
    client.put_object(
        Bucket=BUCKET,
        Key=key + ".sha256",
        Body=f"{checksum or hashlib.sha256(data).hexdigest()}  x\n".encode(),
    )
    time.sleep(1.1)  # S3 timestamps have 1 s resolution: keep "newest" unambiguous


def checks(report: Any) -> dict[str, Severity]:
    return {f.check: f.severity for f in report.findings}


def test_a_good_backup_passes(s3: Any, moto_server: Any, inventory: Any) -> None:
    put(s3, "db/app-1.sql.gz", dump(200_000, 1))
    put(s3, "db/app-2.sql.gz", dump(210_000, 2))
    inventory(s3_config(moto_server.url))
    report = backup_verification("app")
    assert report.status is RunStatus.healthy, report.findings
    assert "app-2.sql.gz" in report.findings[0].message


@pytest.mark.parametrize(
    ("incident", "check", "words"),
    [
        ("truncated", "integrity", "truncated"),
        ("checksum", "integrity", "checksum mismatch"),
        ("shrunk", "size", "a sudden drop"),
    ],
)
def test_incidents_in_s3(
    s3: Any, moto_server: Any, inventory: Any, incident: str, check: str, words: str
) -> None:
    good = dump(200_000, 1)
    put(s3, "db/app-1.sql.gz", good)
    newest = dump(200_000, 2)
    if incident == "truncated":
        put(s3, "db/app-2.sql.gz", newest[: len(newest) // 2])
    elif incident == "checksum":
        put(s3, "db/app-2.sql.gz", newest, checksum="0" * 64)
    else:
        put(s3, "db/app-2.sql.gz", dump(80_000, 2))
    inventory(s3_config(moto_server.url))
    report = backup_verification("app")
    assert report.status is RunStatus.unhealthy and report.exit_code == 1
    finding = next(f for f in report.findings if f.check == check)
    assert finding.severity is not Severity.ok and words in finding.message


def test_two_day_old_backup_in_a_directory(tmp_path: Path, inventory: Any) -> None:
    path = tmp_path / "app-1.sql.gz"
    path.write_bytes(dump(50_000))
    two_days_ago = time.time() - 48 * 3600
    os.utime(path, (two_days_ago, two_days_ago))
    inventory(f'[backups.app]\ndirectory = "{tmp_path}"\n')
    report = backup_verification("app")
    age = next(f for f in report.findings if f.check == "age")
    assert age.severity is Severity.warning and 47.9 < age.observed < 48.2
    assert checks(report)["integrity"] is Severity.ok


def test_no_backups_under_the_prefix(s3: Any, moto_server: Any, inventory: Any) -> None:
    put(s3, "other/app-1.sql.gz", dump(10_000))
    inventory(s3_config(moto_server.url))
    report = backup_verification("app")
    assert report.findings[0].severity is Severity.critical
    assert "no backup matching" in report.findings[0].message


def test_endpoint_down(inventory: Any) -> None:
    inventory(s3_config(f"http://127.0.0.1:{free_port()}"))
    report = backup_verification("app")
    assert report.findings[0].check == "storage"
    assert "cannot connect" in report.findings[0].message and report.exit_code == 1
    assert SECRET not in report.model_dump_json()


def test_an_endpoint_that_does_not_answer_in_time_is_worth_a_retry() -> None:
    # Accepts connections (the kernel's backlog) and never answers a request.
    with socket.create_server(("127.0.0.1", 0)) as silent:
        port = silent.getsockname()[1]
        store = S3Target(
            bucket=BUCKET,
            endpoint_url=f"http://127.0.0.1:{port}",
            access_key_id=KEY,
            secret_access_key=SECRET,
            timeout_seconds=0.5,
        )
        with pytest.raises(TargetUnreachable) as caught:
            list_backups.fn("app", BackupSet(s3="store"), store)
    assert "the storage provider did not answer in time" in str(caught.value)
    assert caught.value.transient


def test_credentials_denied(inventory: Any) -> None:
    server = MotoServer(enforce_auth=True).start()
    try:
        inventory(s3_config(server.url, key="AKIAUNKNOWN"))
        report = backup_verification("app")
        assert report.findings[0].check == "storage"
        assert "credentials expired or denied" in report.findings[0].message
        # Its own error, never retried: not a connection that may come back.
        with pytest.raises(AuthenticationFailed, match="credentials expired or denied"):
            settings = load_settings()
            name, cfg = settings.backup_set("app")
            list_backups.fn(name, cfg, settings.storage_of(cfg))
    finally:
        server.stop()


@contextmanager
def as_nobody() -> Iterator[None]:
    """This process without root's power to read anything, for the block (not needed, and
    not possible, when the tests do not run as root)."""
    if os.geteuid() != 0:
        yield
        return
    os.seteuid(65534)
    try:
        yield
    finally:
        os.seteuid(0)


def test_a_directory_that_cannot_be_read(tmp_path: Path, inventory: Any) -> None:
    folder = tmp_path / "backups"
    folder.mkdir(mode=0o000)
    inventory(f'[backups.app]\ndirectory = "{folder}"\n')
    settings = load_settings()
    name, cfg = settings.backup_set("app")
    with as_nobody(), pytest.raises(TargetUnreachable) as caught:
        list_backups.fn(name, cfg, None)
    assert f"backups 'app': cannot read {folder}: Permission denied" in str(caught.value)
    assert "give the user that runs the runbooks read access" in str(caught.value)
    # Not transient: a retry reads with the same permissions. backup-verification reports it
    # as its storage finding, as it does an S3 bucket it cannot read.
    assert not caught.value.transient


def test_a_backup_gone_before_it_is_verified(tmp_path: Path) -> None:
    gone = tmp_path / "app-1.sql.gz"
    with pytest.raises(TargetUnreachable, match=f"cannot read {gone}: No such file or directory"):
        verify_backup.fn("app", BackupSet(directory=str(tmp_path)), None, str(gone))


def test_without_pg_restore_on_the_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, db: Db
) -> None:
    dump = tmp_path / "app-1.dump"
    subprocess.run(["pg_dump", "-Fc", "-f", str(dump), db.dsn], check=True, timeout=60)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ActionFailed) as caught:
        verify_backup.fn("app", BackupSet(directory=str(tmp_path)), None, str(dump))
    assert "pg_restore cannot be started on this machine: No such file or directory" in str(
        caught.value
    )
    assert "apt-get install postgresql-client" in str(caught.value)


def test_a_tool_that_does_not_finish_is_stopped_and_named(tmp_path: Path) -> None:
    with memory_file() as stderr:
        sleeper = subprocess.Popen(["sleep", "60"], stdin=subprocess.PIPE, stderr=stderr)
        started = time.monotonic()
        with pytest.raises(ActionFailed) as caught:
            run_fed(sleeper, iter([b"x" * 100]), "app", "app-1.dump", stderr, 0.5)
    assert time.monotonic() - started < 10 and sleeper.poll() is not None  # killed, not left
    assert "backups 'app': app-1.dump: sleep had not finished 0.5 s after" in str(caught.value)


@pytest.mark.parametrize("cut", [200, "half"])
def test_custom_format_dumps_are_read_to_the_end_by_pg_restore(
    db: Db, tmp_path: Path, inventory: Any, cut: int | str
) -> None:
    # Several MiB, far more than a pipe buffer: pg_restore must read the data, not only the
    # table of contents, and the checksum must cover every byte.
    with db.admin() as conn:
        conn.execute(
            "CREATE TABLE t AS SELECT i AS id, md5(i::text) AS h FROM generate_series(1, 300000) i"
        )
    good = tmp_path / "app-1.dump"
    subprocess.run(["pg_dump", "-Fc", "-Z0", "-f", str(good), db.dsn], check=True, timeout=60)
    data = good.read_bytes()
    assert len(data) > 8 * 2**20
    (tmp_path / "app-1.dump.sha256").write_text(f"{hashlib.sha256(data).hexdigest()}  app-1.dump\n")
    inventory(f'[backups.app]\ndirectory = "{tmp_path}"\nmin_size_ratio = 0\n')
    report = backup_verification("app")
    assert checks(report)["integrity"] is Severity.ok, report.findings
    broken = tmp_path / "app-2.dump"
    broken.write_bytes(data[: 200 if cut == 200 else len(data) // 2])
    report = backup_verification("app")
    integrity = next(f for f in report.findings if f.check == "integrity")
    assert integrity.severity is Severity.critical and "pg_restore failed" in integrity.message


def test_a_huge_object_is_streamed(s3: Any, moto_server: Any) -> None:
    data = gzip.compress(os.urandom(48 * 2**20), compresslevel=1)
    s3.put_object(Bucket=BUCKET, Key="db/huge.sql.gz", Body=data)
    store = S3Target(
        bucket=BUCKET,
        prefix="db/",
        endpoint_url=moto_server.url,
        access_key_id=KEY,
        secret_access_key=SECRET,
    )
    tracemalloc.start()
    result = verify_backup.fn("app", BackupSet(s3="store"), store, "db/huge.sql.gz")
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert result.ok and result.sha256 == hashlib.sha256(data).hexdigest()
    assert peak < 16 * 2**20, (
        f"peak {peak / 2**20:.1f} MiB for a {len(data) / 2**20:.0f} MiB object"
    )


# -- accepted exactly as the gzip tools accept; a dump for a newer pg_restore --------------


def sidecar(path: Path) -> None:
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    path.with_name(path.name + ".sha256").write_text(f"{digest}  {path.name}\n")


@pytest.mark.parametrize("how", ["dd", "truncate", "concatenated"])
def test_a_sql_gz_the_gzip_tools_accept_passes(
    db: Db, tmp_path: Path, inventory: Any, how: str
) -> None:
    fill(db)
    path = sql_gz(db, tmp_path / "app-1.sql.gz", how)
    sidecar(path)
    assert gzip_t(path) == 0
    inventory(f'[backups.app]\ndirectory = "{tmp_path}"\n')
    report = backup_verification("app")
    assert report.status is RunStatus.healthy and report.exit_code == 0, report.findings
    integrity = next(f for f in report.findings if f.check == "integrity")
    assert "gzip stream complete" in integrity.message


@pytest.mark.parametrize(
    ("tail", "gzip_exit", "words"),
    [
        (b"\0" * 100 + b"x", 2, "trailing garbage"),
        (b"garbage", 2, "trailing garbage"),
        (b"\x1f\x8b\x08", 1, "truncated"),  # a second member cut short
    ],
)
def test_a_sql_gz_the_gzip_tools_refuse_is_critical(
    db: Db, tmp_path: Path, inventory: Any, tail: bytes, gzip_exit: int, words: str
) -> None:
    fill(db)
    path = pg_dump(db, tmp_path / "app-1.sql.gz")
    with path.open("ab") as out:
        out.write(tail)
    sidecar(path)  # the checksum matches: what is wrong is in the file itself
    assert gzip_t(path) == gzip_exit
    inventory(f'[backups.app]\ndirectory = "{tmp_path}"\n')
    report = backup_verification("app")
    integrity = next(f for f in report.findings if f.check == "integrity")
    assert integrity.severity is Severity.critical and words in integrity.message


def test_a_dump_from_a_newer_pg_dump_is_its_own_finding(
    db: Db, tmp_path: Path, inventory: Any
) -> None:
    fill(db)
    path = pg_dump(db, tmp_path / "app-1.dump", "-Fc")
    major = future_dump(path)
    sidecar(path)
    inventory(f'[backups.app]\ndirectory = "{tmp_path}"\n')
    report = backup_verification("app")
    found = {f.check: f for f in report.findings}
    assert "integrity" not in found
    client = found["pg_restore_version"]
    assert client.severity is Severity.warning and report.exit_code == 1
    assert "unsupported version (1.99) in file header" in client.message
    assert f"PostgreSQL {major} client" in client.message
    # the same file with another checksum on record is damaged, whatever its header says
    path.with_name("app-1.dump.sha256").write_text("0" * 64 + "  app-1.dump\n")
    found = {f.check: f for f in backup_verification("app").findings}
    assert found["integrity"].severity is Severity.critical
    assert "checksum mismatch" in found["integrity"].message


def test_a_damaged_version_byte_is_corruption_not_a_newer_dump(
    db: Db, tmp_path: Path, inventory: Any
) -> None:
    fill(db)
    path = pg_dump(db, tmp_path / "app-1.dump", "-Fc")
    data = bytearray(path.read_bytes())
    data[6] = 99  # the header still names this machine's own pg_dump
    path.write_bytes(bytes(data))
    inventory(f'[backups.app]\ndirectory = "{tmp_path}"\n')
    found = {f.check: f for f in backup_verification("app").findings}
    assert "pg_restore_version" not in found
    assert found["integrity"].severity is Severity.critical
    assert "unsupported version (1.99)" in found["integrity"].message


def test_the_header_of_a_1_16_dump_names_its_pg_dump(db: Db, tmp_path: Path) -> None:
    # From archive 1.15 the compression is one byte, not an int: rewrite a real 1.14 header
    # (intSize 4: the int is 5 bytes at offset 11) the way pg_dump 16 and later write it.
    fill(db, rows=1)
    head = pg_dump(db, tmp_path / "x.dump", "-Fc").read_bytes()[:1024]
    assert dump_made_by(head) is not None
    newer = head[:6] + b"\x10" + head[7:11] + b"\x00" + head[16:]
    assert dump_made_by(newer) == dump_made_by(head)
    message = newer_client_needed("unsupported version (1.16) in file header", newer, "9.6.1")
    assert message is not None and "postgresql-client-" in message
    assert dump_made_by(b"PGDMP\x01\x10") is None and dump_made_by(b"-- plain SQL") is None


@given(
    members=st.lists(st.binary(max_size=3000), min_size=1, max_size=3),
    tail=st.one_of(
        st.just(b""),
        st.binary(max_size=40).map(lambda b: b"\0" * len(b)),
        st.binary(min_size=1, max_size=40),
        st.integers(1, 30).map(lambda n: b"\0" * n + b"\1"),
    ),
    cut=st.one_of(st.none(), st.integers(0, 200)),
    flip=st.one_of(st.none(), st.integers(0, 10_000)),
)
@settings(max_examples=150)
def test_accepted_exactly_when_gzip_t_accepts(
    members: list[bytes], tail: bytes, cut: int | None, flip: int | None
) -> None:
    # Members written by the real gzip, then damaged: padding, garbage, cut, a flipped bit.
    data = b"".join(
        subprocess.run(["gzip", "-c"], input=m, capture_output=True, check=True).stdout
        for m in members
    )
    data += tail
    if cut is not None:
        data = data[: max(len(data) - cut, 0)]
    if flip is not None and data:
        damaged = bytearray(data)
        damaged[flip % len(damaged)] ^= 0x10
        data = bytes(damaged)
    gzip = subprocess.run(["gzip", "-t"], input=data, capture_output=True, timeout=30)
    try:
        for _ in gunzip(iter([data[:7], data[7:]])):  # a chunk boundary inside the header
            pass
        accepted = True
    except BadGzip:
        accepted = False
    assert accepted == (gzip.returncode == 0), gzip.stderr


@pytest.mark.parametrize(
    ("name", "fmt", "passed"),
    [
        ("app-1.dump", [], "a plain SQL script, read to the end"),
        ("app-1.dump", ["-Ft"], "pg_restore reads it to the end"),
        ("app-1.dump.gz", ["-Fc"], "gzip stream complete; pg_restore reads it to the end"),
    ],
)
def test_what_the_backup_holds_decides_how_it_is_read(
    db: Db, tmp_path: Path, inventory: Any, name: str, fmt: list[str], passed: str
) -> None:
    fill(db)
    path = pg_dump(db, tmp_path / name, *fmt)
    inventory(f'[backups.app]\ndirectory = "{tmp_path}"\npattern = ["*.dump", "*.dump.gz"]\n')
    report = backup_verification("app")
    integrity = next(f for f in report.findings if f.check == "integrity")
    assert report.status is RunStatus.healthy and passed in integrity.message, report.findings
    # A gzipped custom dump cut short inside is pg_restore's to refuse, not only gzip's.
    if name.endswith(".gz"):
        inner = subprocess.run(["gunzip", "-c", str(path)], capture_output=True, check=True)
        path.write_bytes(gzip.compress(inner.stdout[: len(inner.stdout) // 2]))
        integrity = next(f for f in backup_verification("app").findings if f.check == "integrity")
        assert integrity.severity is Severity.critical and "pg_restore failed" in integrity.message


def test_an_empty_checksum_file_fails_the_backup(tmp_path: Path, inventory: Any) -> None:
    (tmp_path / "app-1.sql").write_text("CREATE TABLE t (id int);\n")
    (tmp_path / "app-1.sql.sha256").write_text("")  # the job writing it stopped first
    inventory(f'[backups.app]\ndirectory = "{tmp_path}"\npattern = ["*.sql"]\n')
    found = {f.check: f for f in backup_verification("app").findings}
    assert found["integrity"].severity is Severity.critical
    assert "app-1.sql.sha256 is empty" in found["integrity"].message
