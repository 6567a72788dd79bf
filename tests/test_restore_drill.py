"""restore-drill and pre-change-backup with real pg_dump, pg_restore and psql, a real PostgreSQL,
backups in a directory and in S3 (moto's server over HTTP)."""

from __future__ import annotations

import gzip
import hashlib
import re
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest

from deployments.localpg import LocalPostgres, free_port
from flows.pre_change_backup import pre_change_backup
from flows.restore_drill import restore_drill
from tasks.drill_rules import DRILL_DB_PREFIX, PreChangeParams, RestoreDrillParams
from tasks.errors import ConfigError
from tasks.models import ActionStatus, RunStatus, Severity
from tests.conftest import Db
from tests.s3_helpers import KEY, SECRET
from tests.test_cli import cli, no_traceback

pytestmark = pytest.mark.usefixtures("prefect_api")
BUCKET = "backups"


def fill(db: Db, rows: int = 500) -> None:
    with db.admin() as conn:
        conn.execute("CREATE TABLE items (id int PRIMARY KEY, name text)")
        conn.execute(
            "INSERT INTO items SELECT i, 'item ' || i FROM generate_series(1, %s) i", [rows]
        )
        conn.execute("CREATE SCHEMA shop")
        conn.execute("CREATE TABLE shop.orders (id int, item int REFERENCES items)")


def pg_dump(db: Db, path: Path, *fmt: str) -> Path:
    with path.open("wb") as out:
        if not path.name.endswith(".gz"):
            subprocess.run(["pg_dump", *fmt, db.dsn], stdout=out, check=True, timeout=60)
            return path
        dump = subprocess.Popen(["pg_dump", *fmt, db.dsn], stdout=subprocess.PIPE)
        with dump.stdout as stream:  # type: ignore[union-attr]
            subprocess.run(["gzip", "-c"], stdin=stream, stdout=out, check=True, timeout=60)
        assert dump.wait(60) == 0
    return path


def drill_config(db: Db, backups: str, *, scratch: str = "scratch", checks: str = "") -> None:
    db.write_config(
        f'[postgres.scratch]\ndsn = "{db.server.dsn_for("postgres")}"\n'
        f'[backups.app]\n{backups}\ndatabase = "main"\nscratch = "{scratch}"\n'
        f"checks = [{checks}]\n"
    )


def scratch_databases(pg: LocalPostgres) -> list[str]:
    with psycopg.connect(pg.dsn, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT datname FROM pg_database WHERE datname LIKE %s", [DRILL_DB_PREFIX + "%"]
        ).fetchall()
    return [r[0] for r in rows]


def by_check(report: Any) -> dict[str, Any]:
    return {f.check: f for f in report.findings}


@pytest.mark.parametrize("name", ["app-1.dump", "app-1.sql.gz"])
def test_a_drill_restores_checks_reports_rto_rpo_and_drops(
    db: Db, tmp_path: Path, name: str
) -> None:
    fill(db)
    pg_dump(db, tmp_path / name, *(["-Fc"] if name.endswith(".dump") else []))
    drill_config(
        db,
        f'directory = "{tmp_path}"',
        checks='"SELECT count(*) = 500 FROM items", "SELECT max(id) > 0 FROM items"',
    )
    report = restore_drill("app", dry_run=False, approval="auto")
    found = by_check(report)
    assert report.status is RunStatus.healthy, report.findings
    assert found["restore"].severity is Severity.ok
    assert found["check-1"].observed is True and found["check-2"].observed is True
    assert found["tables"].observed == found["tables"].threshold == 2
    assert found["rto"].severity is Severity.ok and found["rto"].observed > 0
    assert 0 <= found["rpo"].observed < 0.1
    assert found["cleanup"].observed is True and scratch_databases(db.server) == []
    assert report.actions[0].status is ActionStatus.done


def test_a_failing_check_still_leaves_no_scratch_database(db: Db, tmp_path: Path) -> None:
    fill(db, rows=10)
    pg_dump(db, tmp_path / "app-1.dump", "-Fc")
    drill_config(
        db,
        f'directory = "{tmp_path}"',
        checks='"SELECT count(*) >= 1000 FROM items", "SELECT 1", "SELECT * FROM nowhere"',
    )
    report = restore_drill("app", dry_run=False, approval="auto")
    found = by_check(report)
    assert report.status is RunStatus.unhealthy and report.exit_code == 1
    assert found["check-1"].severity is Severity.critical
    assert "one boolean" in found["check-2"].message
    assert "does not exist" in found["check-3"].message
    assert found["cleanup"].observed is True and scratch_databases(db.server) == []


def test_a_truncated_dump_does_not_restore(db: Db, tmp_path: Path) -> None:
    fill(db, rows=20_000)
    good = pg_dump(db, tmp_path / "app-1.dump", "-Fc").read_bytes()
    (tmp_path / "app-1.dump").write_bytes(good[: len(good) // 2])
    drill_config(db, f'directory = "{tmp_path}"')
    report = restore_drill("app", dry_run=False, approval="auto")
    found = by_check(report)
    assert found["restore"].severity is Severity.critical
    assert "does not restore" in found["restore"].message
    assert report.exit_code == 1 and scratch_databases(db.server) == []


def test_a_plain_dump_that_would_reach_the_source_database_is_refused(
    db: Db, tmp_path: Path
) -> None:
    # pg_dump --create --clean writes DROP DATABASE and \connect lines: psql, started in the
    # scratch database on the same server, would follow them to the source.
    fill(db, rows=50)
    pg_dump(db, tmp_path / "app-1.sql.gz", "--create", "--clean")
    drill_config(db, f'directory = "{tmp_path}"')
    report = restore_drill("app", dry_run=False, approval="auto")
    found = by_check(report)
    assert found["restore"].severity is Severity.critical and "refused" in found["restore"].message
    with db.admin() as conn:
        assert conn.execute("SELECT count(*) FROM items").fetchone() == (50,)
    assert scratch_databases(db.server) == []


def test_a_chosen_backup_and_the_dry_run(db: Db, tmp_path: Path) -> None:
    fill(db, rows=3)
    pg_dump(db, tmp_path / "app-old.dump", "-Fc")
    drill_config(db, f'directory = "{tmp_path}"')
    dry = restore_drill("app")
    assert dry.actions[0].status is ActionStatus.planned and scratch_databases(db.server) == []
    assert "dry run" in dry.actions[0].detail
    missing = restore_drill(
        "app", dry_run=False, approval="auto", params=RestoreDrillParams(backup="nope.dump")
    )
    assert missing.exit_code == 1 and "no backup named 'nope.dump'" in missing.findings[0].message


@pytest.mark.parametrize("scratch", ["main", "same-dsn"])
def test_a_scratch_target_that_is_the_source_is_refused(
    db: Db, tmp_path: Path, scratch: str
) -> None:
    pg_dump(db, tmp_path / "app-1.dump", "-Fc")
    db.write_config(
        f'[postgres.same-dsn]\ndsn = "{db.dsn}"\n'
        f'[backups.app]\ndirectory = "{tmp_path}"\ndatabase = "main"\nscratch = "{scratch}"\n'
    )
    with pytest.raises(ConfigError, match="never runs against the source"):
        restore_drill("app", dry_run=False, approval="auto")
    proc = cli("run", "restore-drill", "--target", "app", "--apply", "--yes")
    assert proc.returncode == 2 and "never runs against the source" in proc.stderr
    no_traceback(proc)
    assert scratch_databases(db.server) == []


def test_the_source_is_recognised_by_host_port_and_database_whatever_the_spelling() -> None:
    from pydantic import SecretStr

    from tasks.drill_rules import refuse_source
    from tasks.settings import PostgresTarget

    def pg(dsn: str) -> PostgresTarget:
        return PostgresTarget(dsn=SecretStr(dsn))

    source = ("main", pg("postgresql://app:secret@db.internal:5432/app"))
    same = ("copy", pg("host=db.internal port=5432 dbname=app user=other"))
    with pytest.raises(ConfigError, match="never runs against the source") as err:
        refuse_source("app", same, source)
    assert "secret" not in str(err.value)
    other_db = ("scratch", pg("host=db.internal dbname=postgres"))
    assert refuse_source("app", other_db, source) == other_db
    # Unix sockets: the same socket, another database, is allowed; the same database is not.
    socket_source = ("main", pg("host=/run/postgresql dbname=app"))
    maintenance = ("s", pg("host=/run/postgresql dbname=postgres"))
    assert refuse_source("app", maintenance, socket_source) == maintenance
    with pytest.raises(ConfigError):
        refuse_source("app", ("s", pg("dbname=app host=/run/postgresql")), socket_source)


# --- pre-change-backup, then a drill of what it made --------------------------------------


@pytest.fixture
def bucket(moto_server: Any) -> Any:
    return moto_server.fresh_bucket(BUCKET)


def s3_backups(url: str) -> str:
    return (
        f'[s3.store]\nbucket = "{BUCKET}"\nprefix = "db/"\nendpoint_url = "{url}"\n'
        f'access_key_id = "{KEY}"\nsecret_access_key = "{SECRET}"\ntimeout_seconds = 5\n'
    )


def test_pre_change_backup_to_s3_then_a_drill_restores_it(
    db: Db, bucket: Any, moto_server: Any
) -> None:
    fill(db, rows=1000)
    db.write_config(
        s3_backups(moto_server.url)
        + f'[postgres.scratch]\ndsn = "{db.server.dsn_for("postgres")}"\n'
        '[backups.app]\ns3 = "store"\ndatabase = "main"\nscratch = "scratch"\n'
        'checks = ["SELECT count(*) = 1000 FROM items"]\n'
    )
    report = pre_change_backup(
        "app", dry_run=False, approval="auto", params=PreChangeParams(label="add-index")
    )
    assert report.status is RunStatus.healthy, report.findings
    keys = [o["Key"] for o in bucket.list_objects_v2(Bucket=BUCKET)["Contents"]]
    dump = next(k for k in keys if k.endswith(".dump"))
    assert dump.startswith("db/main-add-index-") and dump + ".sha256" in keys
    body = bucket.get_object(Bucket=BUCKET, Key=dump)["Body"].read()
    sidecar = bucket.get_object(Bucket=BUCKET, Key=dump + ".sha256")["Body"].read().decode()
    assert sidecar.split()[0] == hashlib.sha256(body).hexdigest()
    assert by_check(report)["integrity"].severity is Severity.ok
    assert SECRET not in report.model_dump_json()

    drill = restore_drill("app", dry_run=False, approval="auto")
    assert drill.status is RunStatus.healthy, drill.findings
    assert dump in by_check(drill)["rpo"].message and by_check(drill)["check-1"].observed is True


def test_a_failed_dump_leaves_nothing_behind(db: Db, tmp_path: Path) -> None:
    folder = tmp_path / "dumps"
    folder.mkdir()
    db.write_config(
        f'[postgres.gone]\ndsn = "postgresql://postgres@127.0.0.1:{free_port()}/x"\n'
        f'[backups.app]\ndirectory = "{folder}"\ndatabase = "gone"\n'
    )
    report = pre_change_backup("app", dry_run=False, approval="auto")
    assert report.status is RunStatus.failed and report.exit_code == 3
    assert "pg_dump of postgres target 'gone'" in report.actions[0].detail
    assert list(folder.iterdir()) == []


def test_a_dump_that_fails_half_way_leaves_nothing_behind(db: Db, tmp_path: Path) -> None:
    with db.admin() as conn:
        conn.execute(
            "CREATE TABLE big AS SELECT i, md5(i::text) AS h FROM generate_series(1, 3000000) i"
        )
    folder = tmp_path / "dumps"
    folder.mkdir()
    db.write_config(f'[backups.app]\ndirectory = "{folder}"\ndatabase = "main"\n')
    copying = threading.Event()

    def kill_pg_dump_while_it_copies() -> None:
        with db.admin() as conn:
            while not copying.is_set():
                row = conn.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE application_name = 'pg_dump' AND query LIKE 'COPY%%'"
                ).fetchone()
                if row is not None:
                    copying.set()
                time.sleep(0.01)

    killer = threading.Thread(target=kill_pg_dump_while_it_copies, daemon=True)
    killer.start()
    report = pre_change_backup("app", dry_run=False, approval="auto")
    copying.set()
    killer.join(10)
    assert report.status is RunStatus.failed and "pg_dump" in report.actions[0].detail
    assert list(folder.iterdir()) == []  # no .dump, no .partial, no .sha256


def test_pre_change_backup_to_a_directory_through_the_cli(db: Db, tmp_path: Path) -> None:
    fill(db, rows=5)
    folder = tmp_path / "dumps"
    folder.mkdir()
    db.write_config(f'[backups.app]\ndirectory = "{folder}"\ndatabase = "main"\n')
    dry = cli("run", "pre-change-backup", "--json")
    assert dry.returncode == 0 and list(folder.iterdir()) == []
    proc = cli("run", "pre-change-backup", "--apply", "--set", "label=v2", "--json")
    assert proc.returncode == 0, proc.stderr
    files = sorted(p.name for p in folder.iterdir())
    assert len(files) == 2 and files[0].startswith("main-v2-") and files[1].endswith(".sha256")
    restored = subprocess.run(
        ["pg_restore", "--list", str(folder / files[0])], capture_output=True, text=True
    )
    assert restored.returncode == 0 and "TABLE public items" in restored.stdout


# -- what the gzip tools and pg_restore accept ---------------------------------------------


def pad(path: Path, how: str) -> None:
    """Zero padding to a 10 KiB block boundary, as tar, `dd conv=sync` and tape archivers
    write it."""
    size = path.stat().st_size
    if how == "dd":
        padded = path.with_name("padded")
        subprocess.run(
            ["dd", f"if={path}", f"of={padded}", "bs=10240", "conv=sync", "status=none"],
            check=True,
            timeout=60,
        )
        padded.replace(path)
    else:
        subprocess.run(
            ["truncate", "-s", str((size // 10240 + 1) * 10240), str(path)], check=True, timeout=60
        )
    assert path.stat().st_size % 10240 == 0 and path.stat().st_size > size


def gzip_t(path: Path) -> int:
    return subprocess.run(["gzip", "-t", str(path)], capture_output=True, timeout=60).returncode


def sql_gz(db: Db, path: Path, how: str) -> Path:
    """A real plain dump through real gzip, padded, or as two members (schema, then data,
    joined as `cat schema.gz data.gz` joins them)."""
    if how == "concatenated":
        schema = pg_dump(db, path.with_name("schema.gz"), "--schema-only")
        data = pg_dump(db, path.with_name("data.gz"), "--data-only")
        path.write_bytes(schema.read_bytes() + data.read_bytes())
        schema.unlink()
        data.unlink()
    else:
        pg_dump(db, path)
        pad(path, how)
    return path


def future_dump(path: Path) -> int:
    """A real custom-format dump made to look as a newer pg_dump writes it: the archive
    version in its header past what this pg_restore reads (1.99), and the pg_dump and server
    versions it names four majors on. Returns that major."""
    out = subprocess.run(["pg_restore", "--version"], capture_output=True, text=True, timeout=30)
    major = int(out.stdout.split()[2].split(".")[0])
    data = bytearray(path.read_bytes())
    assert data[:7] == b"PGDMP\x01\x0e"  # this pg_dump writes archive version 1.14
    data[6] = 99
    head = bytes(data[:256]).replace(f"{major}.".encode(), f"{major + 4}.".encode())
    path.write_bytes(head + bytes(data[256:]))
    return major + 4


@pytest.mark.parametrize("how", ["dd", "truncate", "concatenated"])
def test_a_sql_gz_the_gzip_tools_accept_restores(db: Db, tmp_path: Path, how: str) -> None:
    fill(db)
    path = sql_gz(db, tmp_path / "app-1.sql.gz", how)
    assert gzip_t(path) == 0
    drill_config(db, f'directory = "{tmp_path}"', checks='"SELECT count(*) = 500 FROM items"')
    report = restore_drill("app", dry_run=False, approval="auto")
    found = by_check(report)
    assert report.status is RunStatus.healthy, report.findings
    assert found["restore"].severity is Severity.ok
    assert found["check-1"].observed is True and found["tables"].observed == 2


def test_a_sql_gz_with_trailing_garbage_is_refused_as_gzip_refuses_it(
    db: Db, tmp_path: Path
) -> None:
    fill(db)
    path = pg_dump(db, tmp_path / "app-1.sql.gz")
    with path.open("ab") as out:
        out.write(b"\0" * 100 + b"not gzip")  # zeros, then something else
    assert gzip_t(path) == 2  # "decompression OK, trailing garbage ignored"
    drill_config(db, f'directory = "{tmp_path}"')
    report = restore_drill("app", dry_run=False, approval="auto")
    found = by_check(report)
    assert found["restore"].severity is Severity.critical
    assert "trailing garbage" in found["restore"].message and report.exit_code == 1
    assert scratch_databases(db.server) == []


def test_a_dump_from_a_newer_pg_dump_says_which_client_to_install(db: Db, tmp_path: Path) -> None:
    fill(db)
    major = future_dump(pg_dump(db, tmp_path / "app-1.dump", "-Fc"))
    drill_config(db, f'directory = "{tmp_path}"')
    report = restore_drill("app", dry_run=False, approval="auto")
    found = by_check(report)
    assert "restore" not in found  # not "the backup does not restore"
    client = found["pg_restore_version"]
    assert client.severity is Severity.warning and report.exit_code == 1
    assert "unsupported version (1.99) in file header" in client.message  # pg_restore's words
    assert f"postgresql-client-{major}" in client.message
    assert "not a sign of corruption" in client.message
    assert scratch_databases(db.server) == []


@pytest.mark.parametrize(
    ("name", "fmt", "tool"),
    [
        ("app-1.dump", [], "psql"),  # `pg_dump -f app.dump`: plain SQL whatever the name
        ("app-1.dump", ["-Ft"], "pg_restore"),
        ("app-1.dump.gz", ["-Fc"], "pg_restore"),  # `pg_dump -Fc | gzip`
    ],
)
def test_the_tool_is_chosen_by_what_the_backup_holds_not_its_name(
    db: Db, tmp_path: Path, name: str, fmt: list[str], tool: str
) -> None:
    fill(db)
    pg_dump(db, tmp_path / name, *fmt)
    drill_config(
        db,
        f'directory = "{tmp_path}"\npattern = ["*.dump", "*.dump.gz"]',
        checks='"SELECT count(*) = 500 FROM items"',
    )
    report = restore_drill("app", dry_run=False, approval="auto")
    found = by_check(report)
    assert report.status is RunStatus.healthy, report.findings
    assert found["check-1"].observed is True and found["tables"].observed == 2


def test_a_plain_dump_from_a_newer_pg_dump_says_the_scratch_server_is_too_old(
    db: Db, tmp_path: Path
) -> None:
    # What pg_dump 17 writes, and PostgreSQL 15 refuses: its header names its version, and it
    # sets transaction_timeout (new in 17) before anything else.
    fill(db)
    plain = pg_dump(db, tmp_path / "plain.sql").read_text()
    assert "SET statement_timeout = 0;\n" in plain
    newer = re.sub(r"(-- Dumped (?:from database|by pg_dump) version )\d+", r"\g<1>19", plain)
    newer = newer.replace(
        "SET statement_timeout = 0;\n", "SET statement_timeout = 0;\nSET transaction_timeout = 0;\n"
    )
    (tmp_path / "plain.sql").unlink()
    (tmp_path / "app-1.sql.gz").write_bytes(gzip.compress(newer.encode()))
    drill_config(db, f'directory = "{tmp_path}"')
    report = restore_drill("app", dry_run=False, approval="auto")
    restore = by_check(report)["restore"]
    assert restore.severity is Severity.critical
    assert 'unrecognized configuration parameter "transaction_timeout"' in restore.message
    with psycopg.connect(db.dsn) as conn:
        server = conn.info.server_version // 10000
    assert f"runs PostgreSQL {server}" in restore.message
    assert "a PostgreSQL 19 (or newer) server" in restore.message
    assert scratch_databases(db.server) == []
