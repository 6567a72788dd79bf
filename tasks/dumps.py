"""pg_dump and pg_restore: restoring a backup into a scratch database (restore-drill) and
dumping a database straight to its backup storage (pre-change-backup).

Both stream: a backup never sits whole in memory or in a temp file. The tools get their
connection through libpq's environment (PGPASSWORD...), never on a command line anyone can read
in `ps`."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
from psycopg import sql
from pydantic import BaseModel, SecretStr

from tasks.backup_rules import newer_client_needed, older_server_note
from tasks.backups import (
    BackupRefused,
    BadGzip,
    dump_stream,
    error_lines,
    pg_restore_version,
    read_chunks,
    run_fed,
    set_prefix,
    start_tool,
)
from tasks.engine import io_task
from tasks.errors import ActionFailed, ConfigError, RunbookError
from tasks.host import memory_file
from tasks.postgres import _first_line, connect, dsn_parts
from tasks.progress import Progress, progress
from tasks.settings import BackupSet, PostgresTarget, S3Target
from tasks.storage import CHUNK, s3_client, storage_errors

RESTORE_TIMEOUT_SECONDS = 6 * 3600
DUMP_TIMEOUT_SECONDS = 6 * 3600
# libpq connection keywords and the environment variables that carry them
_LIBPQ_ENV = {
    "host": "PGHOST",
    "hostaddr": "PGHOSTADDR",
    "port": "PGPORT",
    "dbname": "PGDATABASE",
    "user": "PGUSER",
    "password": "PGPASSWORD",
    "passfile": "PGPASSFILE",
    "service": "PGSERVICE",
    "options": "PGOPTIONS",
    "application_name": "PGAPPNAME",
    "sslmode": "PGSSLMODE",
    "sslrootcert": "PGSSLROOTCERT",
    "sslcert": "PGSSLCERT",
    "sslkey": "PGSSLKEY",
    "sslcrl": "PGSSLCRL",
    "target_session_attrs": "PGTARGETSESSIONATTRS",
    "connect_timeout": "PGCONNECT_TIMEOUT",
}


def libpq_env(name: str, target: PostgresTarget, dbname: str | None = None) -> dict[str, str]:
    """The environment that points pg_dump, pg_restore or psql at a target (or at another
    database on its server)."""
    parts = dsn_parts(name, target)
    unknown = sorted(set(parts) - set(_LIBPQ_ENV))
    if unknown:
        raise ConfigError(
            f"postgres.{name}.dsn: {', '.join(unknown)} cannot be passed to pg_dump/pg_restore; "
            "use the keywords libpq reads from its environment"
        )
    if dbname is not None:
        parts["dbname"] = dbname
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["PGCONNECT_TIMEOUT"] = "10"
    env.update({_LIBPQ_ENV[k]: str(v) for k, v in parts.items() if v is not None})
    return env


def on_database(target: PostgresTarget, dbname: str) -> PostgresTarget:
    """The same server and credentials, another database."""
    dsn = psycopg.conninfo.make_conninfo(target.dsn.get_secret_value(), dbname=dbname)
    return PostgresTarget(dsn=SecretStr(dsn))


# --- restore-drill ------------------------------------------------------------------------


class Restore(BaseModel):
    ok: bool
    seconds: float
    detail: str
    needs_client: bool = False  # pg_restore here is too old for the dump: not a bad backup


@io_task("create-scratch-database", timeout_seconds=120, retries=0)  # not idempotent
def create_scratch_database(name: str, scratch: PostgresTarget, dbname: str) -> str:
    """CREATE DATABASE on the scratch server, for a restore drill.

    Args:
        name: the scratch [postgres.NAME] target's name, for messages.
        scratch: its inventory entry.
        dbname: the database to create (runbook_drill_...).

    Returns:
        What was done, for the action's detail.

    Raises:
        AuthenticationFailed: the server refused the login (password, role, database).
        TargetUnreachable: no connection, or it was lost (transient: retried).
        TargetError: any other error the server answered with."""
    with connect(name, scratch) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(dbname)))
    return f"created {dbname}"


@io_task("drop-scratch-database", timeout_seconds=300, retries=2)
def drop_scratch_database(name: str, scratch: PostgresTarget, dbname: str) -> bool:
    """Drop it (its sessions too) and say whether it is gone.

    Args:
        name: the scratch [postgres.NAME] target's name, for messages.
        scratch: its inventory entry.
        dbname: the database to drop.

    Returns:
        True when no database of that name is left.

    Raises:
        AuthenticationFailed: the server refused the login (password, role, database).
        TargetUnreachable: no connection, or it was lost (transient: retried).
        TargetError: any other error the server answered with."""
    with connect(name, scratch, statement_timeout_seconds=240) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(dbname))
        )
        row = conn.execute("SELECT count(*) AS n FROM pg_database WHERE datname = %s", [dbname])
        left = row.fetchone()
    return left is not None and left["n"] == 0


@io_task("restore-backup", timeout_seconds=RESTORE_TIMEOUT_SECONDS + 60, retries=0)
def restore_backup(
    name: str,
    backup: BackupSet,
    s3: S3Target | None,
    key: str,
    scratch_name: str,
    scratch: PostgresTarget,
    dbname: str,
) -> Restore:
    """Stream the backup into the scratch database: pg_restore for archives (custom format,
    tar), psql for plain SQL scripts, judged by content (tasks.backups.dump_stream), .gz
    inflated on the way. A backup that does not restore is a result, not an error.

    Args:
        name: the [backups.NAME] set's name, for messages.
        backup: the set's inventory entry.
        s3: its [s3.NAME] target, or None for a directory.
        key: the backup's key (or file name in the directory).
        scratch_name: the scratch [postgres.NAME] target's name.
        scratch: its inventory entry.
        dbname: the scratch database restored into.

    Returns:
        Restore: whether it restored, in how many seconds, and the tool's error if not.

    Raises:
        ConfigError: the scratch target's dsn is one pg_restore cannot use.
        AuthenticationFailed: the storage or the scratch server refused the credentials.
        TargetUnreachable: the storage or the scratch server did not answer, or the backup's
            file cannot be read.
        TargetError: the scratch server refused a query.
        ActionFailed: psql or pg_restore cannot be started (not installed), or did not
            finish within RESTORE_TIMEOUT_SECONDS (6 h) of the stream's end."""
    start = time.perf_counter()
    with progress("restore", f"restore of {name} ({key.rsplit('/', 1)[-1]})") as fed:
        try:
            with storage_errors(f"backups {name!r}: {key}"):
                chunks = fed.count(read_chunks(backup, s3, key, name, fed.begin))
                head, stream, plain = dump_stream(chunks, key)
        except BadGzip as exc:
            return Restore(ok=False, seconds=time.perf_counter() - start, detail=str(exc))
        if plain:
            argv = ["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "--no-password"]
            stream = _one_database(stream)
        else:
            argv = ["pg_restore", "--no-owner", "--no-privileges", "--exit-on-error"]
            argv += ["--no-password", "--dbname", dbname]  # with -d it restores, not prints
        env = libpq_env(scratch_name, scratch, dbname)
        with memory_file() as stderr:  # a file: the tool never blocks on a full pipe; in memory
            proc = start_tool(argv, stderr, env=env)
            # Counted as the tool takes them: a pipe holds 64 KiB, so bytes fed are bytes
            # restored, give or take a chunk; the indexes and constraints come after the last.
            problem = run_fed(proc, stream, name, key, stderr, RESTORE_TIMEOUT_SECONDS)
        if problem:
            fed.fall_short()
    seconds = time.perf_counter() - start
    advice = newer_client_needed(problem, head, pg_restore_version()) if problem else None
    if problem and not advice:
        problem += older_server_note(head, server_major(scratch_name, scratch))
    return Restore(
        ok=not problem,
        seconds=seconds,
        detail=advice or problem or f"restored in {seconds:.1f} s",
        needs_client=advice is not None,
    )


def server_major(name: str, target: PostgresTarget) -> int | None:
    """The server's major version (15), or None when it cannot be asked."""
    try:
        with connect(name, target) as conn:
            row = conn.execute("SELECT current_setting('server_version_num') AS v").fetchone()
    except (RunbookError, psycopg.Error):
        return None
    return int(row["v"]) // 10000 if row else None


# psql would follow these out of the scratch database: a plain dump made with --create or
# --clean connects to (and drops) the database it came from, on this server the source.
_SWITCHES_DATABASE = re.compile(
    rb"^(?:\\c(?:onnect)?\b|(?:DROP|CREATE)\s+DATABASE\b)", re.MULTILINE | re.IGNORECASE
)


def _one_database(sql_text: Iterator[bytes]) -> Iterator[bytes]:
    """Pass a plain SQL dump through, refusing it before psql sees a line that leaves, drops
    or creates a database. Lines may span chunks: the start of the last one is kept."""
    tail = b""
    for chunk in sql_text:
        window = tail + chunk
        if _SWITCHES_DATABASE.search(window):
            raise BackupRefused(
                "the dump connects to, drops or creates a database (made with pg_dump "
                "--create or --clean?): restoring it could reach the source, so it was refused"
            )
        line_start = window.rfind(b"\n") + 1
        tail = window[line_start:][:64]  # enough of the last line's start for the pattern
        yield chunk


class CheckResult(BaseModel):
    query: str
    ok: bool
    detail: str


@io_task("run-restore-checks", timeout_seconds=1800, retries=0)
def run_checks(
    name: str, scratch: PostgresTarget, dbname: str, checks: list[str], timeout_seconds: float
) -> list[CheckResult]:
    """Each check is a query returning one boolean; anything else is a failed check.

    Args:
        name: the scratch [postgres.NAME] target's name, for messages.
        scratch: its inventory entry.
        dbname: the restored database the checks run in.
        checks: SQL queries, each returning one row with one boolean column.
        timeout_seconds: statement timeout of each query, in seconds.

    Returns:
        One CheckResult per query, in order: ok, and what it returned or its error.

    Raises:
        AuthenticationFailed: the server refused the login (password, role, database).
        TargetUnreachable: no connection, or it was lost (transient: retried).
        TargetError: any other error the server answered with."""
    results = []
    with connect(
        name, on_database(scratch, dbname), statement_timeout_seconds=timeout_seconds
    ) as conn:
        for query in checks:
            try:
                row = conn.execute(query).fetchone()
            except psycopg.Error as exc:
                results.append(CheckResult(query=query, ok=False, detail=_first_line(exc)))
                continue
            value = next(iter(row.values())) if row and len(row) == 1 else None
            ok = value is True
            detail = "true" if ok else f"returned {value!r}, not true"
            if not isinstance(value, bool):
                detail = "must return one row with one boolean column"
            results.append(CheckResult(query=query, ok=ok, detail=detail))
    return results


_TABLES = """
SELECT n.nspname || '.' || c.relname AS name
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'p') AND n.nspname NOT IN ('pg_catalog', 'information_schema')
  AND n.nspname NOT LIKE 'pg_toast%%'
"""


@io_task("list-tables", timeout_seconds=60)
def list_tables(name: str, target: PostgresTarget) -> list[str]:
    """The ordinary and partitioned tables of a database, outside the system schemas.

    Args:
        name: the [postgres.NAME] target's name, for messages.
        target: its inventory entry (its dsn names the database).

    Returns:
        schema.table names, sorted.

    Raises:
        AuthenticationFailed: the server refused the login (password, role, database).
        TargetUnreachable: no connection, or it was lost (transient: retried).
        TargetError: any other error the server answered with."""
    with connect(name, target) as conn:
        return sorted(row["name"] for row in conn.execute(_TABLES))


# --- pre-change-backup --------------------------------------------------------------------


class Dump(BaseModel):
    key: str
    size: int
    sha256: str
    seconds: float


class _DumpFailed(Exception):
    pass


class _DumpReader:
    """pg_dump's stdout as a file object for the upload or the file, hashed and counted as it
    goes; at its end, pg_dump's exit code, so a failed dump fails the write instead of
    completing it."""

    def __init__(self, proc: subprocess.Popen[bytes], written: Progress) -> None:
        assert proc.stdout is not None
        self.proc, self.stream, self.written = proc, proc.stdout, written
        self.digest, self.size = hashlib.sha256(), 0

    def read(self, size: int = -1) -> bytes:
        data = self.stream.read(size)
        if not data and size != 0 and (code := self.proc.wait(DUMP_TIMEOUT_SECONDS)) != 0:
            raise _DumpFailed(code)
        self.digest.update(data)
        self.size += len(data)
        self.written.advance(len(data))
        return data


def database_size(name: str, target: PostgresTarget) -> int | None:
    """pg_database_size of the target's database, in bytes: what a dump's progress is
    measured against, as an estimate (a custom-format dump is compressed and has no
    indexes, so it is usually smaller); None when it cannot be asked (the dump then says why)."""
    try:
        with connect(name, target) as conn:
            row = conn.execute("SELECT pg_database_size(current_database()) AS n").fetchone()
    except (RunbookError, psycopg.Error):
        return None
    return int(row["n"]) if row else None


def dump_key(backup: BackupSet, s3: S3Target | None, database: str, label: str, stamp: str) -> str:
    filename = f"{database}-{label}-{stamp}.dump"
    if s3 is None:
        return str(Path(backup.directory or ".") / filename)
    prefix = set_prefix(backup, s3)
    return f"{prefix}{'' if prefix.endswith('/') or not prefix else '/'}{filename}"


@io_task("dump-to-storage", timeout_seconds=DUMP_TIMEOUT_SECONDS + 60, retries=0)
def dump_to_storage(
    name: str,
    backup: BackupSet,
    s3: S3Target | None,
    key: str,
    source_name: str,
    source: PostgresTarget,
) -> Dump:
    """pg_dump -Fc straight into the bucket (a multipart upload fed from the pipe) or the
    directory, then a `sha256sum`-style sidecar. A failed dump leaves nothing behind.

    Args:
        name: the [backups.NAME] set's name, for messages.
        backup: the set's inventory entry.
        s3: its [s3.NAME] target, or None for a directory.
        key: the key (or file name) the dump is written to.
        source_name: the [postgres.NAME] target dumped.
        source: its inventory entry.

    Returns:
        Dump: its key, size in bytes, SHA-256 and the seconds it took.

    Raises:
        ConfigError: the source's dsn is one pg_dump cannot use.
        ActionFailed: pg_dump failed or cannot be started, or the upload or the file
            write did.
        AuthenticationFailed: the storage refused the credentials.
        TargetUnreachable: the storage did not answer."""
    start = time.perf_counter()
    estimate = database_size(source_name, source)
    with (
        memory_file() as stderr,
        progress(
            "dump", f"dump of {source_name}", estimate, estimate="the database's size on disk"
        ) as written,
    ):
        proc = start_tool(
            ["pg_dump", "--format=custom", "--no-password"],
            stderr,
            stdout=subprocess.PIPE,
            env=libpq_env(source_name, source),
        )
        reader = _DumpReader(proc, written)
        try:
            _write(s3, key, reader, name)
        except _DumpFailed as exc:
            raise ActionFailed(
                f"pg_dump of postgres target {source_name!r} ({source.description}) failed "
                f"(exit {exc.args[0]}): {error_lines(stderr)}; nothing was kept"
            ) from None
        finally:
            reader.stream.close()
            if proc.poll() is None:  # the write failed: pg_dump must not outlive it
                proc.kill()
                proc.wait()
    sha = reader.digest.hexdigest()
    sidecar = f"{sha}  {key.rsplit('/', 1)[-1]}\n".encode()
    if s3 is None:
        try:
            Path(key + ".sha256").write_bytes(sidecar)
        except OSError as exc:
            raise _unwritable(name, exc) from exc
    else:
        with storage_errors(f"backups {name!r}: {key}.sha256"):
            s3_client(s3).put_object(Bucket=s3.bucket, Key=key + ".sha256", Body=sidecar)
    return Dump(key=key, size=reader.size, sha256=sha, seconds=time.perf_counter() - start)


def _unwritable(name: str, exc: OSError) -> ActionFailed:
    return ActionFailed(
        f"backups {name!r}: cannot write {exc.filename or 'the dump'}: {exc.strerror or exc}; "
        "check the directory's free space and that the user running the runbooks may write there"
    )


def _write(s3: S3Target | None, key: str, reader: _DumpReader, name: str) -> None:
    """The whole dump under `key`, or nothing: a directory gets KEY.partial (never matched
    as a backup) renamed once pg_dump has exited 0; S3 gets an upload that fails, and so is
    never completed, when the reader raises at the end."""
    if s3 is None:
        partial = Path(key + ".partial")
        try:
            with partial.open("wb") as out:
                shutil.copyfileobj(reader, out, CHUNK)
            partial.rename(key)
        except OSError as exc:
            raise _unwritable(name, exc) from exc
        finally:
            partial.unlink(missing_ok=True)
        return
    from boto3.s3.transfer import TransferConfig

    with storage_errors(f"backups {name!r}: {key}"):
        s3_client(s3).upload_fileobj(
            reader,
            s3.bucket,
            key,
            Config=TransferConfig(multipart_chunksize=16 * CHUNK, max_concurrency=4),
        )
