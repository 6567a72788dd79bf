"""S3 (any S3-compatible endpoint, through boto3) as the storage runbooks reach it: the client,
and its errors classified into what an on-call person can act on. Backups are in
tasks.backups, the object-storage canary in tasks.canary, retention deletes in
tasks.retention."""

from __future__ import annotations

import re
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import boto3
import botocore.config
import botocore.exceptions
import httpx

from tasks.errors import AuthenticationFailed, ConfigError, TargetUnreachable
from tasks.settings import S3Target

CHUNK = 1 << 20  # bytes per read of a streamed object: 1 MiB


def s3_client(s3: S3Target) -> Any:
    """A boto3 S3 client for the target: its endpoint_url and region, connect and read
    timeouts of its timeout_seconds, botocore's standard retries (2 attempts), and its
    access keys when both are set (else boto3's own chain: AWS_* variables, files, roles).
    Makes no request itself.

    Raises ConfigError when botocore refuses endpoint_url or region (settings refuse both at
    load; this is for a target built in code without validation)."""
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
    try:
        return boto3.client(
            "s3", endpoint_url=s3.endpoint_url, region_name=s3.region, config=config, **extra
        )
    except ValueError as exc:  # botocore's "Invalid endpoint", and its InvalidRegionError
        what = "region" if isinstance(exc, botocore.exceptions.InvalidRegionError) else "endpoint"
        raise ConfigError(
            f"the [s3.*] target of bucket {s3.bucket!r}: botocore refuses its {what}: "
            "correct endpoint_url (http(s)://HOST[:PORT]) or region (e.g. us-east-1)"
        ) from None


def classify(exc: Exception) -> str:
    """What an operator does next: DNS/connect, credentials, or the provider's side. Takes
    boto3's errors and httpx's (a presigned URL fetched over plain HTTP); one line of text,
    any other exception as "Type: message". Never raises."""
    if isinstance(
        exc,
        botocore.exceptions.EndpointConnectionError
        | botocore.exceptions.ConnectTimeoutError
        | httpx.ConnectError
        | httpx.ConnectTimeout,
    ):
        if _name_unresolved(exc):
            return f"cannot connect: the endpoint's name does not resolve (DNS): {exc}"
        cause = _root_cause(exc)
        return f"cannot connect (network): {exc}" + ("" if cause in str(exc) else f": {cause}")
    if isinstance(exc, botocore.exceptions.FlexibleChecksumError):
        return f"the data read back is not what was written: {exc}"
    if isinstance(exc, botocore.exceptions.ReadTimeoutError | httpx.TimeoutException):
        return f"the storage provider did not answer in time: {exc}"
    if isinstance(exc, httpx.HTTPStatusError):
        found = re.search(r"<Code>([^<]+)</Code>", exc.response.text[:4096])
        status = exc.response.status_code
        return _by_code(found.group(1) if found else str(status), status)
    if isinstance(exc, botocore.exceptions.NoCredentialsError):
        return "no credentials: set access_key_id/secret_access_key or the AWS variables"
    if isinstance(exc, botocore.exceptions.ClientError):
        code = exc.response.get("Error", {}).get("Code", "?")
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        return _by_code(code, status)
    return f"{type(exc).__name__}: {exc}"


_DENIED = ("InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "AccessDenied", "403")


def _denied(exc: Exception) -> bool:
    """Whether the provider refused the credentials (or there were none to send)."""
    if isinstance(exc, botocore.exceptions.NoCredentialsError):
        return True
    if isinstance(exc, botocore.exceptions.ClientError):
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        return exc.response.get("Error", {}).get("Code", "?") in _DENIED or status == 403
    return False


def _by_code(code: str, status: int) -> str:
    if code in _DENIED or status == 403:
        return f"credentials expired or denied ({code})"
    if status >= 500:
        return f"the storage provider failed ({code}, HTTP {status})"
    return f"{code} (HTTP {status})"


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """The exception and what it wraps: botocore keeps urllib3's error in kwargs['error']."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        current = todo.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        wrapped = getattr(current, "kwargs", {}).get("error")
        todo += [current.__cause__, current.__context__]
        if isinstance(wrapped, BaseException):
            todo.append(wrapped)


def _name_unresolved(exc: BaseException) -> bool:
    return any(
        isinstance(e, socket.gaierror) or type(e).__name__ == "NameResolutionError"
        for e in _causes(exc)
    )


def _root_cause(exc: BaseException) -> str:
    errors = [e for e in _causes(exc) if isinstance(e, OSError) and e.strerror]
    return errors[-1].strerror if errors and errors[-1].strerror else "no connection"


@contextmanager
def storage_errors(where: str) -> Iterator[None]:
    """Translate boto3's errors raised in the block into the tree of tasks.errors, each
    message `where` (e.g. "backups 'db' in s3://bucket") and classify()'s words.

    Raises TargetUnreachable (transient) when the endpoint cannot be connected to or does
    not answer in time; AuthenticationFailed when there are no credentials or the provider
    refuses them (InvalidAccessKeyId, SignatureDoesNotMatch, ExpiredToken, AccessDenied,
    HTTP 403); TargetUnreachable (not transient) for any other botocore or S3 error
    (NoSuchKey, NoSuchBucket, a 5xx). Other exceptions go through unchanged."""
    try:
        yield
    # A read timeout is transient like a connect error: the provider was slow this once (a
    # busy node, a long listing); another attempt often gets an answer. Errors the provider
    # answered with (a missing key, a 5xx) say the same on a retry.
    except (
        botocore.exceptions.EndpointConnectionError,
        botocore.exceptions.ConnectTimeoutError,
        botocore.exceptions.ReadTimeoutError,
    ) as exc:
        raise TargetUnreachable(f"{where}: {classify(exc)}", transient=True) from exc
    except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
        if _denied(exc):
            raise AuthenticationFailed(f"{where}: {classify(exc)}") from exc
        raise TargetUnreachable(f"{where}: {classify(exc)}", transient=False) from exc
