"""object-storage: one canary object through what uploads and downloads need (head, put, get,
a presigned get, delete), each step timed and its failure classified."""

from __future__ import annotations

import hashlib
import time
import uuid
from collections.abc import Callable
from datetime import datetime

import botocore.exceptions
import httpx
from pydantic import BaseModel

from tasks.engine import io_task
from tasks.settings import S3Target
from tasks.storage import classify, s3_client

CANARY_DIR = ".runbook-canary"
PRESIGN_SECONDS = 300
_STORAGE_ERRORS = (
    botocore.exceptions.BotoCoreError,
    botocore.exceptions.ClientError,
    httpx.HTTPError,
)


class Probe(BaseModel):
    """One step of the canary round trip: how long it took, and the class of its failure."""

    step: str
    ms: float
    error: str | None = None
    detail: str = ""


class _Mismatch(Exception):
    pass


def canary_key(s3: S3Target, now: datetime) -> str:
    """The canary's key: under the target's prefix, in .runbook-canary/, named by `now`
    (UTC, to the second) and a random suffix, so it is unique per run and nobody takes it for
    data."""
    name = f"{CANARY_DIR}/{now:%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:12]}"
    prefix = s3.prefix.strip("/")
    return f"{prefix}/{name}" if prefix else name


def canary_body(key: str) -> bytes:
    """4 KiB that only this key has: another object served in its place cannot compare equal."""
    return hashlib.sha256(key.encode()).digest() * 128


def _compare(data: bytes, key: str) -> None:
    expected = canary_body(key)
    if data != expected:
        raise _Mismatch(
            f"the data read back is not what was written ({len(data)} bytes, sha256 "
            f"{hashlib.sha256(data).hexdigest()[:16]}…; wrote {len(expected)} bytes, sha256 "
            f"{hashlib.sha256(expected).hexdigest()[:16]}…)"
        )


def _timed(step: str, call: Callable[[], str]) -> Probe:
    """Only the calls are timed: building the client (loading botocore's models) is not."""
    start = time.perf_counter()
    try:
        detail = call()
    except _Mismatch as exc:
        return Probe(step=step, ms=_ms_since(start), error=str(exc))
    except _STORAGE_ERRORS as exc:
        return Probe(step=step, ms=_ms_since(start), error=classify(exc))
    return Probe(step=step, ms=_ms_since(start), detail=detail)


def _ms_since(start: float) -> float:
    return (time.perf_counter() - start) * 1000


# No Prefect retries: a probe reports what one attempt saw (boto3 already retries once).
@io_task("head-bucket", timeout_seconds=120, retries=0)
def head_bucket(name: str, s3: S3Target) -> Probe:
    """HeadBucket: whether the bucket answers, with these credentials.

    Args:
        name: the [s3.NAME] target's name.
        s3: its inventory entry.

    Returns:
        Probe "head_bucket": milliseconds, and the class of the failure (DNS, network,
        credentials, the provider) when there was one.

    Raises:
        ConfigError: botocore refuses the target's endpoint_url or region (settings refuse
            both at load); storage errors are in the Probe, not raised."""
    client = s3_client(s3)

    def call() -> str:
        client.head_bucket(Bucket=s3.bucket)
        return f"s3://{s3.bucket} answers"

    return _timed("head_bucket", call)


@io_task("put-canary", timeout_seconds=120, retries=0)
def put_canary(name: str, s3: S3Target, key: str) -> Probe:
    """PutObject of the canary: 4 KiB that only this key has (canary_body).

    Args:
        name: the [s3.NAME] target's name.
        s3: its inventory entry.
        key: the canary's key (canary_key).

    Returns:
        Probe "put": milliseconds, and the class of the failure when there was one.

    Raises:
        ConfigError: botocore refuses the target's endpoint_url or region (settings refuse
            both at load); storage errors are in the Probe, not raised."""
    client, body = s3_client(s3), canary_body(key)

    def call() -> str:
        client.put_object(Bucket=s3.bucket, Key=key, Body=body)
        return f"wrote {len(body)} bytes to {key}"

    return _timed("put", call)


@io_task("get-canary", timeout_seconds=120, retries=0)
def get_canary(name: str, s3: S3Target, key: str) -> Probe:
    """GetObject of the canary, compared byte for byte with what put_canary wrote.

    Args:
        name: the [s3.NAME] target's name.
        s3: its inventory entry.
        key: the canary's key.

    Returns:
        Probe "get": milliseconds, and the class of the failure when there was one (a body
        that differs from what was written is one, with both sizes and checksums).

    Raises:
        ConfigError: botocore refuses the target's endpoint_url or region (settings refuse
            both at load); storage errors are in the Probe, not raised."""
    client = s3_client(s3)

    def call() -> str:
        data: bytes = client.get_object(Bucket=s3.bucket, Key=key)["Body"].read()
        _compare(data, key)
        return f"read back {len(data)} bytes, identical"

    return _timed("get", call)


@io_task("presigned-get", timeout_seconds=120, retries=0)
def presigned_get(name: str, s3: S3Target, key: str) -> Probe:
    """What a browser does with an upload's download link: a GET over plain HTTP of a
    presigned URL (valid PRESIGN_SECONDS, 300 s), compared byte for byte. The URL carries a
    signature: it goes into no message.

    Args:
        name: the [s3.NAME] target's name.
        s3: its inventory entry (timeout_seconds bounds the GET).
        key: the canary's key.

    Returns:
        Probe "presigned_get": milliseconds, and the class of the failure when there was one
        (an HTTP error status, a timeout, a body that differs).

    Raises:
        ConfigError: botocore refuses the target's endpoint_url or region (settings refuse
            both at load); storage errors are in the Probe, not raised."""
    client = s3_client(s3)

    def call() -> str:
        url = client.generate_presigned_url(
            "get_object", Params={"Bucket": s3.bucket, "Key": key}, ExpiresIn=PRESIGN_SECONDS
        )
        response = httpx.get(url, timeout=s3.timeout_seconds)
        response.raise_for_status()
        _compare(response.content, key)
        return f"a presigned URL ({PRESIGN_SECONDS} s) serves it over plain HTTP, identical"

    return _timed("presigned_get", call)


@io_task("delete-canary", timeout_seconds=120, retries=0)
def delete_canary(name: str, s3: S3Target, key: str) -> Probe:
    """DeleteObject of the canary, then HeadObject to see that it is gone (404).

    Args:
        name: the [s3.NAME] target's name.
        s3: its inventory entry.
        key: the canary's key.

    Returns:
        Probe "delete": milliseconds of the delete, and the failure when there was one: the
        delete's, the check's, or that the object is still there.

    Raises:
        ConfigError: botocore refuses the target's endpoint_url or region (settings refuse
            both at load); storage errors are in the Probe, not raised."""
    client = s3_client(s3)

    def call() -> str:
        client.delete_object(Bucket=s3.bucket, Key=key)
        return f"deleted {key}"

    probe = _timed("delete", call)
    if probe.error is None:
        try:
            client.head_object(Bucket=s3.bucket, Key=key)
        except botocore.exceptions.ClientError as exc:
            if exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") != 404:
                probe.error = f"deleted, but checking it is gone failed: {classify(exc)}"
        except _STORAGE_ERRORS as exc:
            probe.error = f"deleted, but checking it is gone failed: {classify(exc)}"
        else:
            probe.error = f"{key} is still there after DeleteObject: delete it by hand"
    return probe
