"""backup-verification against an S3 endpoint (moto's server, over HTTP with boto3) and a local
directory, with backups made and broken for real: truncated, wrong checksum, old, shrunk."""

from __future__ import annotations

import gzip
import hashlib
import os
import random
import subprocess
import time
import tracemalloc
from pathlib import Path
from typing import Any

import pytest

from deployments.localpg import free_port
from flows.backup_verification import backup_verification
from tasks.models import RunStatus, Severity
from tasks.settings import BackupSet, S3Target
from tasks.storage import verify_backup
from tests.conftest import Db
from tests.s3_helpers import KEY, SECRET, MotoServer

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


def test_credentials_denied(inventory: Any) -> None:
    server = MotoServer(enforce_auth=True).start()
    try:
        inventory(s3_config(server.url, key="AKIAUNKNOWN"))
        report = backup_verification("app")
        assert report.findings[0].check == "storage"
        assert "credentials expired or denied" in report.findings[0].message
    finally:
        server.stop()


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
