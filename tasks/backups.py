"""Backups in S3 or a local directory: listing and integrity checks that stream the file,
never holding it in memory."""

from __future__ import annotations

import fnmatch
import hashlib
import itertools
import os
import subprocess
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import suppress
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, cast

import botocore.exceptions
from pydantic import BaseModel

from tasks.backup_rules import newer_client_needed
from tasks.engine import io_task
from tasks.errors import ActionFailed, TargetError, TargetUnreachable
from tasks.host import memory_file
from tasks.progress import progress
from tasks.settings import BackupSet, S3Target
from tasks.storage import CHUNK, s3_client, storage_errors

PG_RESTORE_TIMEOUT = 3600


class Backup(BaseModel):
    """One backup: its S3 key (or file path), size in bytes, and last-modified time (UTC)."""

    key: str
    size: int
    modified: datetime


class Integrity(BaseModel):
    """What verify_backup found: ok, what failed or what it passed (detail), and the SHA-256
    (hex) of the stored bytes beside the one its sidecar or metadata gives, if any."""

    ok: bool
    detail: str
    needs_client: bool = False  # pg_restore here is too old for it: unverified, not corrupt
    sha256: str
    expected_sha256: str | None = None


def set_prefix(backup: BackupSet, s3: S3Target) -> str:
    """The set's key prefix as configured: "db/" and "app/" give "db/app/", so listing "app/"
    never reaches "app2/...", another set's backups."""
    parts = [p for p in (s3.prefix, backup.prefix or "") if p.strip("/")]
    joined = "/".join(p.strip("/") for p in parts)
    return joined + "/" if parts and parts[-1].endswith("/") else joined


def unreadable(name: str, exc: OSError) -> TargetUnreachable:
    """The error for a backup's file or directory that cannot be read: like an S3 object
    that cannot be fetched, not transient (a retry reads the same permissions), naming the
    path, the OS's reason and the fix."""
    return TargetUnreachable(
        f"backups {name!r}: cannot read {exc.filename or 'the backup directory'}: "
        f"{exc.strerror or exc}; give the user that runs the runbooks read access to it",
        transient=False,
    )


def start_tool(
    argv: list[str],
    stderr: IO[bytes],
    *,
    stdout: int = subprocess.DEVNULL,
    env: dict[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    """A PostgreSQL client tool (pg_restore, psql, pg_dump) started with stdin=PIPE (or
    stdout=PIPE for pg_dump) and its stderr to `stderr`, without a shell.

    Raises ActionFailed naming the tool and how to install it when it cannot be started
    (not installed, not executable)."""
    try:
        return subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL if stdout == subprocess.PIPE else subprocess.PIPE,
            stdout=stdout,
            stderr=stderr,
            env=env,
        )
    except OSError as exc:
        raise ActionFailed(
            f"{argv[0]} cannot be started on this machine: {exc.strerror or exc}; install "
            "the PostgreSQL client tools (Debian: apt-get install postgresql-client) as new "
            "as the servers the backups come from, on the PATH of the runbooks"
        ) from None


def _matches(backup: BackupSet, key: str) -> bool:
    return any(fnmatch.fnmatch(key.rsplit("/", 1)[-1], p) for p in backup.pattern)


@io_task("list-backups", timeout_seconds=300, retries=1)
def list_backups(name: str, backup: BackupSet, s3: S3Target | None) -> list[Backup]:
    """The set's backups, newest first: the files of its directory, or the objects right
    under its S3 prefix (not in "sub-folders": another set's), whose names match its pattern.

    Args:
        name: the [backups.NAME] set's name, for messages.
        backup: the set's inventory entry (directory or prefix, pattern).
        s3: its [s3.NAME] target, or None for a directory.

    Returns:
        One Backup per match (key, size in bytes, modified in UTC), newest first; empty when
        none match.

    Raises:
        TargetError: the set's directory is not a directory.
        AuthenticationFailed: S3 has no credentials or refused them.
        TargetUnreachable: S3 cannot be connected to (transient: retried) or failed
            otherwise (NoSuchBucket, a 5xx); the directory or a file in it cannot be read
            (permissions; not transient).
        ConfigError: botocore refuses the s3 target's endpoint_url or region."""
    found: list[Backup] = []
    if s3 is None:
        folder = Path(backup.directory or ".")
        try:
            if not folder.is_dir():
                raise TargetError(f"backups {name!r}: {folder} is not a directory")
            for path in folder.iterdir():
                if path.is_file() and _matches(backup, path.name):
                    stat = path.stat()
                    found.append(
                        Backup(
                            key=str(path),
                            size=stat.st_size,
                            modified=datetime.fromtimestamp(stat.st_mtime, UTC),
                        )
                    )
        except OSError as exc:
            raise unreadable(name, exc) from exc
    else:
        prefix = set_prefix(backup, s3)
        with storage_errors(f"backups {name!r} in s3://{s3.bucket}"):
            pages = (
                s3_client(s3)
                .get_paginator("list_objects_v2")
                .paginate(Bucket=s3.bucket, Prefix=prefix)
            )
            for page in pages:
                for obj in page.get("Contents", []):
                    # Keys right under the prefix, as in a directory: another set's backups
                    # in a "sub-folder" are never ours to judge or delete.
                    nested = "/" in obj["Key"][len(prefix) :].lstrip("/")
                    if not nested and _matches(backup, obj["Key"]):
                        found.append(
                            Backup(key=obj["Key"], size=obj["Size"], modified=obj["LastModified"])
                        )
    return sorted(found, key=lambda b: b.modified, reverse=True)


def read_chunks(
    backup: BackupSet,
    s3: S3Target | None,
    key: str,
    name: str,
    sized: Callable[[int], None] | None = None,
) -> Iterator[bytes]:
    """A backup's stored bytes as they arrive, in chunks of up to CHUNK (1 MiB): a file's, or
    an S3 object's (fetched on the first next()). Closing the iterator early closes the file
    or the S3 response. Raises TargetUnreachable (not transient, naming the set `name` and
    the path) for a file that cannot be read, and boto3's errors untranslated (callers wrap
    it in tasks.storage.storage_errors). `sized` hears the size in bytes of what is read, once
    it is open (a progress's begin)."""
    if s3 is None:
        try:
            with open(key, "rb") as fh:
                if sized is not None:
                    sized(os.fstat(fh.fileno()).st_size)
                while chunk := fh.read(CHUNK):
                    yield chunk
        except OSError as exc:
            raise unreadable(name, exc) from exc
        return
    found = s3_client(s3).get_object(Bucket=s3.bucket, Key=key)
    body = found["Body"]
    if sized is not None and isinstance(found.get("ContentLength"), int):
        sized(found["ContentLength"])
    try:
        yield from body.iter_chunks(CHUNK)
    finally:
        body.close()  # also when the reader stops early: the connection goes back


def _expected(backup: BackupSet, s3: S3Target | None, key: str, name: str) -> str | None:
    """A sidecar KEY.sha256 (`sha256sum` format), or the object's sha256 metadata."""
    if s3 is None:
        sidecar = Path(key + ".sha256")
        try:
            return _digest_of(sidecar.read_text()) if sidecar.is_file() else None
        except OSError as exc:
            raise unreadable(name, exc) from exc
    client = s3_client(s3)
    try:
        body: bytes = client.get_object(Bucket=s3.bucket, Key=key + ".sha256")["Body"].read()
        return _digest_of(body.decode(errors="replace"))
    except botocore.exceptions.ClientError as exc:
        if exc.response.get("Error", {}).get("Code") not in ("NoSuchKey", "404"):
            raise
    meta = client.head_object(Bucket=s3.bucket, Key=key).get("Metadata", {})
    value = meta.get("sha256")
    return str(value).lower() if value else None


def _digest_of(sidecar: str) -> str:
    """The digest a `sha256sum` line starts with, lower-cased; "" for an empty sidecar."""
    words = sidecar.split()
    return words[0].lower() if words else ""


@io_task("verify-backup", timeout_seconds=PG_RESTORE_TIMEOUT + 60, retries=0)
def verify_backup(name: str, backup: BackupSet, s3: S3Target | None, key: str) -> Integrity:
    """Stream it once: SHA-256 of the bytes, inflated when the name ends in .gz (as gunzip
    does: BadGzip's cases fail it), and what it holds judged by its content, not its name:
    an archive (custom format, tar, also inside a .gz) is read to the end by pg_restore into
    /dev/null, fed as it arrives; a plain SQL script is read to the end. A checksum that
    differs from the sidecar KEY.sha256 (or the object's sha256 metadata) fails it too.

    Args:
        name: the [backups.NAME] set's name, for messages.
        backup: the set's inventory entry.
        s3: its [s3.NAME] target, or None for a directory.
        key: the backup's key (or file path), as list_backups returned it.

    Returns:
        Integrity: ok, and detail saying what failed (bad gzip, pg_restore's error lines,
        checksum mismatch) or what it passed; needs_client when this machine's pg_restore is
        too old to read it (unverified, not corrupt); the SHA-256 of the stored bytes and
        the expected one, if any. A corrupt backup is a result, not an error.

    Raises:
        AuthenticationFailed: S3 has no credentials or refused them.
        TargetUnreachable: S3 cannot be connected to, or failed otherwise (NoSuchKey, a 5xx);
            the file or its sidecar cannot be read (not transient).
        ActionFailed: pg_restore cannot be started (not installed), or did not finish
            within PG_RESTORE_TIMEOUT (3600 s) of the stream's end.
        ConfigError: botocore refuses the s3 target's endpoint_url or region."""
    digest = hashlib.sha256()
    with (
        memory_file() as stderr,  # a file: pg_restore never blocks on a full pipe; in memory
        progress("integrity", f"integrity check of {name} ({_file(key)})") as read,
    ):
        chunks = _hashed(read.count(read_chunks(backup, s3, key, name, read.begin)), digest)
        problem, head, passed = _verify_stream(chunks, name, key, stderr)
    with storage_errors(f"backups {name!r}: {key}"):
        expected = _expected(backup, s3, key, name)
    sha = digest.hexdigest()
    advice = newer_client_needed(problem, head, pg_restore_version()) if problem else None
    if (not problem or advice) and expected == "":
        advice, problem = (
            None,
            f"its checksum file {key}.sha256 is empty: the job writing it did not finish",
        )
    elif (not problem or advice) and expected and expected != sha:
        advice, problem = None, f"checksum mismatch: sha256 {sha[:16]}…, expected {expected[:16]}…"
    return Integrity(
        ok=not problem,
        detail=advice or problem or passed,
        needs_client=advice is not None,
        sha256=sha,
        expected_sha256=expected,
    )


def _file(key: str) -> str:
    return key.rsplit("/", 1)[-1]


def _verify_stream(
    chunks: Iterator[bytes], name: str, key: str, stderr: IO[bytes]
) -> tuple[str, bytes, str]:
    """(what is wrong or "", the dump's first bytes, what it passed)."""
    gz = "gzip stream complete; " if key.endswith(".gz") else ""
    with storage_errors(f"backups {name!r}: {key}"):
        try:
            head, stream, plain = dump_stream(chunks, key)
            if plain:
                for _ in stream:
                    pass
        except BadGzip as exc:
            return str(exc), b"", ""
    if plain:
        return "", head, gz + "a plain SQL script, read to the end"
    problem = _stream_pg_restore(stream, name, key, stderr)
    return problem, head, gz + "pg_restore reads it to the end"


HEAD_BYTES = 1024  # a custom-format dump's header (its strings are short) fits many times


def dump_stream(chunks: Iterator[bytes], key: str) -> tuple[bytes, Iterator[bytes], bool]:
    """What the PostgreSQL tools get fed: the bytes, inflated when the name ends in .gz (as
    `gunzip -c` would; BadGzip where it refuses them), their first HEAD_BYTES, and whether
    they are a plain SQL script for psql rather than an archive for pg_restore (custom
    format, starting "PGDMP"; tar, "ustar" at offset 257). Judged by content, as pg_restore
    itself does, so a plain dump named .dump or a gzipped custom dump goes to the right tool.
    The stream returned is whole: the head is read from it, not taken out."""
    if key.endswith(".gz"):
        chunks = gunzip(chunks)
    taken: list[bytes] = []
    for chunk in chunks:
        taken.append(chunk)
        if sum(map(len, taken)) >= HEAD_BYTES:
            break
    head = b"".join(taken)[:HEAD_BYTES]
    # A custom dump cut inside its magic ("PGD") is still one: pg_restore says it is short.
    archive = head[:5] == b"PGDMP"[: len(head)] or head[257:262] == b"ustar"
    # Not a .gz: only text is a script; anything else is pg_restore's to judge (and refuse).
    plain = not archive and (key.endswith(".gz") or (bool(head) and b"\0" not in head))
    return head, itertools.chain(taken, chunks), plain


def pg_restore_version() -> str:
    """This machine's pg_restore version ("15.20 (Debian 15.20-0+deb12u1)"); "(version
    unknown)" when it cannot be run within 10 s. Never raises."""
    try:
        out = subprocess.run(
            ["pg_restore", "--version"], capture_output=True, text=True, timeout=10, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return "(version unknown)"
    return out.strip().removeprefix("pg_restore (PostgreSQL) ")


def _hashed(chunks: Iterator[bytes], digest: Any) -> Iterator[bytes]:
    """Hash each chunk on another thread while the caller inflates or pipes it: both release
    the GIL, so the checksum costs little wall time on a second core."""
    with ThreadPoolExecutor(1) as pool:
        hashing: Future[None] | None = None
        for chunk in chunks:
            if hashing is not None:
                hashing.result()  # one chunk in flight: memory stays flat
            hashing = pool.submit(digest.update, chunk)
            yield chunk
        if hashing is not None:
            hashing.result()


GZIP_MAGIC = b"\x1f\x8b"


class BadGzip(TargetError):
    """What `gzip -t` refuses, in its terms: not gzip, corrupt, truncated, trailing garbage."""


def gunzip(chunks: Iterator[bytes]) -> Iterator[bytes]:
    """Inflate a gzip stream as it arrives, accepting exactly what GNU gzip (1.12) `gzip -t`
    and `gunzip` accept with exit 0: one or more members (as `cat a.gz b.gz` makes), then
    optionally zero bytes to the end (the padding to a block boundary tar, dd conv=sync and
    tape archivers write). BadGzip for what they refuse: a file not starting with a member,
    a corrupt member (bad data, CRC or length), one cut short, and anything else after the
    last member (gzip exits 2 there: "decompression OK, trailing garbage ignored")."""
    inflate: Any = None  # None: between members
    members, pending, padding = 0, b"", False
    for chunk in chunks:
        data, pending = pending + chunk, b""
        while data:
            if padding:
                if data.strip(b"\0"):
                    raise BadGzip(_garbage())
                break
            if inflate is None:
                if len(data) < 2:  # a member's magic may straddle two chunks
                    pending = data
                    break
                if data[:2] != GZIP_MAGIC:
                    if not members:
                        raise BadGzip("not in gzip format (it does not start with 1f 8b)")
                    if data[0] != 0:
                        raise BadGzip(_garbage())
                    padding = True
                    continue
                inflate = zlib.decompressobj(wbits=31)
            try:
                yield inflate.decompress(data, CHUNK)
            except zlib.error as exc:
                raise BadGzip(f"gzip data is corrupt: {exc}") from None
            data = inflate.unconsumed_tail
            if inflate.eof:
                data, inflate, members = inflate.unused_data, None, members + 1
    # gzip reads a member's two magic bytes whole: one lone byte is an early end, unless zero
    if inflate is not None or not members or (pending and pending != b"\0"):
        raise BadGzip("gzip stream ends early (unexpected end of file): the file is truncated")


def _garbage() -> str:
    return (
        "data after the last gzip member is neither a member nor zero padding (gzip -t: "
        '"decompression OK, trailing garbage ignored", exit 2): a damaged or overwritten file'
    )


def _stream_pg_restore(chunks: Iterator[bytes], name: str, key: str, stderr: IO[bytes]) -> str:
    # --file=/dev/null: pg_restore reads every data block; --list stops after the table of
    # contents, so a dump cut short in its data would pass.
    restore = start_tool(["pg_restore", "--file=/dev/null"], stderr)
    return run_fed(restore, chunks, name, key, stderr, PG_RESTORE_TIMEOUT)


class BackupRefused(TargetError):
    """The backup holds something that must not run where it is being fed."""


def run_fed(
    proc: subprocess.Popen[bytes],
    chunks: Iterator[bytes],
    name: str,
    key: str,
    stderr: IO[bytes],
    timeout_seconds: float,
) -> str:
    """Feed a backup to a tool's stdin and wait for it; what is wrong with the backup, if
    anything. The stream is read to its end even when the tool stops early, so a checksum
    taken on the way covers every byte; the tool never outlives this call.

    proc: the tool, started with stdin=PIPE and its stderr to `stderr` (a file, read back for
    the message). name, key: the set and backup, for messages. timeout_seconds: how long the
    tool may run after the stream's end. Returns "" when the tool exited 0, else one line:
    the stream's BadGzip or BackupRefused, or "TOOL failed (exit N): its error lines".
    Raises AuthenticationFailed or TargetUnreachable when reading from S3 fails (through
    tasks.storage.storage_errors) or a file cannot be read, and ActionFailed when the tool
    has not exited timeout_seconds after the stream's end (it is killed)."""
    assert proc.stdin is not None
    problem = ""
    try:
        with storage_errors(f"backups {name!r}: {key}"):
            try:
                for chunk in chunks:
                    if not problem:
                        try:
                            proc.stdin.write(chunk)
                        except BrokenPipeError:
                            problem = "stopped"  # its exit code and stderr say why
            except (BadGzip, BackupRefused) as exc:
                problem = str(exc)
            finally:
                with suppress(BrokenPipeError):
                    proc.stdin.close()
        try:
            code = proc.wait(timeout_seconds)
        except subprocess.TimeoutExpired:
            raise ActionFailed(
                f"backups {name!r}: {key}: {_tool(proc)} had not finished {timeout_seconds:g} s "
                "after the whole backup was fed to it, and was stopped; run it by hand on "
                "the backup to see whether it hangs or needs longer"
            ) from None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if problem and problem != "stopped":
        return problem
    if code == 0:
        return ""
    return f"{_tool(proc)} failed (exit {code}): {error_lines(stderr)}"


def _tool(proc: subprocess.Popen[bytes]) -> str:
    return cast(list[str], proc.args)[0]  # always started from an argv list


def error_lines(stderr: IO[bytes]) -> str:
    """The tool's error lines, not the CONTEXT/DETAIL/LINE lines that quote rows of the
    backup (which may hold anybody's data): read from the start of `stderr`, joined by "; ",
    the last 400 characters; "no error message" when there are none."""
    stderr.seek(0)
    lines = stderr.read().decode(errors="replace").splitlines()
    errors = [
        line.strip()
        for line in lines
        if ("error" in line.lower() or "fatal" in line.lower())
        and not line.lstrip().startswith(("CONTEXT:", "DETAIL:", "LINE ", "HINT:"))
    ]
    return "; ".join(errors)[-400:] or "no error message"


def backups_location(backup: BackupSet, s3: S3Target | None) -> str:
    """Where the set's backups are, for messages: s3://BUCKET/PREFIX, or the directory."""
    return f"s3://{s3.bucket}/{set_prefix(backup, s3)}" if s3 else str(backup.directory)
