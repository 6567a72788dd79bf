"""Backups in S3 (any S3-compatible endpoint, through boto3) or a local directory: listing and
integrity checks that stream the file, never holding it in memory."""

from __future__ import annotations

import fnmatch
import hashlib
import subprocess
import tempfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import boto3
import botocore.config
import botocore.exceptions
from pydantic import BaseModel

from tasks.engine import io_task
from tasks.errors import TargetError, TargetUnreachable
from tasks.settings import BackupSet, S3Target

CHUNK = 1 << 20
PG_RESTORE_TIMEOUT = 3600


class Backup(BaseModel):
    key: str
    size: int
    modified: datetime


class Integrity(BaseModel):
    ok: bool
    detail: str
    sha256: str
    expected_sha256: str | None = None


def s3_client(s3: S3Target) -> Any:
    extra = {}
    if s3.access_key_id is not None and s3.secret_access_key is not None:
        extra = {
            "aws_access_key_id": s3.access_key_id.get_secret_value(),
            "aws_secret_access_key": s3.secret_access_key.get_secret_value(),
        }
    config = botocore.config.Config(
        connect_timeout=s3.timeout_seconds,
        read_timeout=s3.timeout_seconds,
        retries={"max_attempts": 2, "mode": "standard"},
    )
    return boto3.client(
        "s3", endpoint_url=s3.endpoint_url, region_name=s3.region, config=config, **extra
    )


def classify(exc: Exception) -> str:
    """What an operator does next: DNS/connect, credentials, or the provider's side."""
    if isinstance(
        exc, botocore.exceptions.EndpointConnectionError | botocore.exceptions.ConnectTimeoutError
    ):
        return f"cannot connect (DNS or network): {exc}"
    if isinstance(exc, botocore.exceptions.NoCredentialsError):
        return "no credentials: set access_key_id/secret_access_key or the AWS variables"
    if isinstance(exc, botocore.exceptions.ClientError):
        code = exc.response.get("Error", {}).get("Code", "?")
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        if (
            code
            in (
                "InvalidAccessKeyId",
                "SignatureDoesNotMatch",
                "ExpiredToken",
                "AccessDenied",
                "403",
            )
            or status == 403
        ):
            return f"credentials expired or denied ({code})"
        if status >= 500:
            return f"the storage provider failed ({code}, HTTP {status})"
        return f"{code} (HTTP {status})"
    return f"{type(exc).__name__}: {exc}"


@contextmanager
def _storage_errors(where: str) -> Iterator[None]:
    try:
        yield
    except (
        botocore.exceptions.EndpointConnectionError,
        botocore.exceptions.ConnectTimeoutError,
    ) as exc:
        raise TargetUnreachable(f"{where}: {classify(exc)}", transient=True) from exc
    except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
        raise TargetUnreachable(f"{where}: {classify(exc)}", transient=False) from exc


def _prefix(backup: BackupSet, s3: S3Target) -> str:
    return "/".join(p.strip("/") for p in (s3.prefix, backup.prefix or "") if p.strip("/"))


def _matches(backup: BackupSet, key: str) -> bool:
    return any(fnmatch.fnmatch(key.rsplit("/", 1)[-1], p) for p in backup.pattern)


@io_task("list-backups", timeout_seconds=300, retries=1)
def list_backups(name: str, backup: BackupSet, s3: S3Target | None) -> list[Backup]:
    """Newest first."""
    found: list[Backup] = []
    if s3 is None:
        folder = Path(backup.directory or ".")
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
    else:
        with _storage_errors(f"backups {name!r} in s3://{s3.bucket}"):
            pages = (
                s3_client(s3)
                .get_paginator("list_objects_v2")
                .paginate(Bucket=s3.bucket, Prefix=_prefix(backup, s3))
            )
            for page in pages:
                for obj in page.get("Contents", []):
                    if _matches(backup, obj["Key"]):
                        found.append(
                            Backup(key=obj["Key"], size=obj["Size"], modified=obj["LastModified"])
                        )
    return sorted(found, key=lambda b: b.modified, reverse=True)


def _chunks(backup: BackupSet, s3: S3Target | None, key: str) -> Iterator[bytes]:
    if s3 is None:
        with open(key, "rb") as fh:
            while chunk := fh.read(CHUNK):
                yield chunk
        return
    body = s3_client(s3).get_object(Bucket=s3.bucket, Key=key)["Body"]
    yield from body.iter_chunks(CHUNK)


def _expected(backup: BackupSet, s3: S3Target | None, key: str) -> str | None:
    """A sidecar KEY.sha256 (`sha256sum` format), or the object's sha256 metadata."""
    if s3 is None:
        sidecar = Path(key + ".sha256")
        return sidecar.read_text().split()[0].lower() if sidecar.is_file() else None
    client = s3_client(s3)
    try:
        body: bytes = client.get_object(Bucket=s3.bucket, Key=key + ".sha256")["Body"].read()
        return body.decode().split()[0].lower()
    except botocore.exceptions.ClientError as exc:
        if exc.response.get("Error", {}).get("Code") not in ("NoSuchKey", "404"):
            raise
    meta = client.head_object(Bucket=s3.bucket, Key=key).get("Metadata", {})
    value = meta.get("sha256")
    return str(value).lower() if value else None


@io_task("verify-backup", timeout_seconds=PG_RESTORE_TIMEOUT + 60, retries=0)
def verify_backup(name: str, backup: BackupSet, s3: S3Target | None, key: str) -> Integrity:
    """Stream it once: SHA-256 of the bytes, and a gzip test (.gz) or `pg_restore --list`
    (custom-format dumps) fed as it arrives."""
    digest = hashlib.sha256()
    is_gzip = key.endswith(".gz")
    with tempfile.TemporaryFile() as stderr:  # a file: pg_restore never blocks on a full pipe
        if is_gzip:
            problem = _stream_gzip(_hashed(_chunks(backup, s3, key), digest), name, key)
        else:
            problem = _stream_pg_restore(
                _hashed(_chunks(backup, s3, key), digest), name, key, stderr
            )
    with _storage_errors(f"backups {name!r}: {key}"):
        expected = _expected(backup, s3, key)
    sha = digest.hexdigest()
    if not problem and expected and expected != sha:
        problem = f"checksum mismatch: sha256 {sha[:16]}…, expected {expected[:16]}…"
    return Integrity(
        ok=not problem,
        detail=problem
        or ("gzip stream complete" if is_gzip else "pg_restore reads its table of contents"),
        sha256=sha,
        expected_sha256=expected,
    )


def _hashed(chunks: Iterator[bytes], digest: Any) -> Iterator[bytes]:
    for chunk in chunks:
        digest.update(chunk)
        yield chunk


def _stream_gzip(chunks: Iterator[bytes], name: str, key: str) -> str:
    inflate = zlib.decompressobj(wbits=31)
    with _storage_errors(f"backups {name!r}: {key}"):
        try:
            for chunk in chunks:
                while chunk:
                    inflate.decompress(chunk, CHUNK)
                    chunk = inflate.unconsumed_tail
                    if inflate.eof and inflate.unused_data:
                        # another gzip member follows, as `cat a.gz b.gz` makes
                        chunk, inflate = inflate.unused_data, zlib.decompressobj(wbits=31)
        except zlib.error as exc:
            return f"gzip data is corrupt: {exc}"
    return "" if inflate.eof else "gzip stream ends early: the file is truncated"


def _stream_pg_restore(chunks: Iterator[bytes], name: str, key: str, stderr: Any) -> str:
    restore = subprocess.Popen(
        ["pg_restore", "--list"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=stderr
    )
    assert restore.stdin is not None
    with _storage_errors(f"backups {name!r}: {key}"):
        try:
            for chunk in chunks:
                restore.stdin.write(chunk)
        except BrokenPipeError:
            pass  # pg_restore gave up early: its exit code says why
        finally:
            with suppress(BrokenPipeError):
                restore.stdin.close()
    if restore.wait(PG_RESTORE_TIMEOUT) == 0:
        return ""
    stderr.seek(0)
    return f"pg_restore --list failed: {stderr.read().decode(errors='replace').strip()[-300:]}"
