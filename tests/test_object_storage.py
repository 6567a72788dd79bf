"""object-storage against moto's S3 server over HTTP: a healthy bucket, a user whose policy
does not let it write, unknown keys, an endpoint nobody listens on, a name that does not
resolve, and an endpoint answering 503; slow steps through the latency thresholds."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import boto3
import httpx
import pytest

from deployments.localpg import free_port
from flows.object_storage import object_storage
from tasks.backup_rules import ObjectStorageParams
from tasks.canary import CANARY_DIR, head_bucket, put_canary
from tasks.errors import ConfigError
from tasks.models import RunStatus, Severity
from tasks.settings import S3Target
from tests.s3_helpers import KEY, SECRET, MotoServer, client
from tests.test_cli import cli, no_traceback

pytestmark = pytest.mark.usefixtures("prefect_api")
BUCKET = "uploads"
STEPS = ["head_bucket", "put", "get", "presigned_get", "delete"]


def s3_config(url: str, key: str = KEY, secret: str = SECRET, extra: str = "") -> str:
    return (
        f'[s3.store]\nbucket = "{BUCKET}"\nprefix = "covers/"\nendpoint_url = "{url}"\n'
        f'access_key_id = "{key}"\nsecret_access_key = "{secret}"\ntimeout_seconds = 3\n{extra}'
    )


def all_keys(s3: Any) -> list[str]:
    return [o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET).get("Contents", [])]


@pytest.fixture
def bucket(moto_server: Any) -> Any:
    s3 = moto_server.fresh_bucket(BUCKET)
    s3.put_object(Bucket=BUCKET, Key="covers/test.webp", Body=b"an image")
    return s3


def by_check(report: Any) -> dict[str, Any]:
    return {f.check: f for f in report.findings}


def test_a_healthy_bucket_through_the_cli(
    bucket: Any, moto_server: Any, inventory: Any, prefect_api: str
) -> None:
    inventory(s3_config(moto_server.url))
    # A busy machine can take over the default 1000 ms a step: slow steps have their own test.
    proc = cli(
        "run",
        "object-storage",
        "--target",
        "store",
        "--set",
        "latency_warning_ms=60000",
        "--set",
        "latency_critical_ms=120000",
        "--json",
        env={"PREFECT_API_URL": prefect_api},
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["status"] == "healthy" and report["actions"] == []
    assert [f["check"] for f in report["findings"]] == STEPS
    for finding in report["findings"]:
        assert finding["severity"] == "ok" and 0 < finding["observed"] < 60000
        assert finding["threshold"] == 60000
    get, delete = report["findings"][2], report["findings"][4]
    assert "identical" in get["message"] and f"covers/{CANARY_DIR}/" in delete["message"]
    # the canary is gone, the app's object untouched
    assert all_keys(bucket) == ["covers/test.webp"]
    assert SECRET not in proc.stdout + proc.stderr
    no_traceback(proc)


def test_slow_steps_by_the_targets_thresholds(
    bucket: Any, moto_server: Any, inventory: Any
) -> None:
    # Real latencies are well over a microsecond: every step is over this warning limit.
    inventory(
        s3_config(moto_server.url, extra="[s3.store.thresholds]\nlatency_warning_ms = 0.001\n")
    )
    report = object_storage("store")
    assert report.status is RunStatus.unhealthy and report.exit_code == 1
    assert {f.severity for f in report.findings} == {Severity.warning}
    assert all("slow" in f.message for f in report.findings)
    # a run's own value wins over the target's
    report = object_storage("store", params=ObjectStorageParams(latency_warning_ms=60_000))
    assert report.status is RunStatus.healthy
    assert all_keys(bucket) == ["covers/test.webp"]


@pytest.fixture
def auth_moto() -> Iterator[MotoServer]:
    server = MotoServer(enforce_auth=True).start()
    try:
        yield server
    finally:
        server.stop()


def open_auth(server: MotoServer, requests: float) -> None:
    """Let the next `requests` through unsigned (to set things up), then enforce again."""
    httpx.post(f"{server.url}/moto-api/reset-auth", content=str(requests), timeout=5)


def reader_user(server: MotoServer) -> tuple[str, str]:
    """A user whose policy lets it look and read, not write: an upload key that lost its
    write permission."""
    open_auth(server, float("inf"))
    iam = boto3.client(
        "iam",
        endpoint_url=server.url,
        region_name="us-east-1",
        aws_access_key_id=KEY,
        aws_secret_access_key=SECRET,
    )
    iam.create_user(UserName="uploader")
    iam.put_user_policy(
        UserName="uploader",
        PolicyName="read-only",
        PolicyDocument=json.dumps(
            {
                "Version": "2012-10-17",
                "Statement": [
                    {
                        "Effect": "Allow",
                        "Action": ["s3:HeadBucket", "s3:ListBucket", "s3:GetObject"],
                        "Resource": "*",
                    }
                ],
            }
        ),
    )
    access = iam.create_access_key(UserName="uploader")["AccessKey"]
    client(server.url).create_bucket(Bucket=BUCKET)
    open_auth(server, 0)
    return access["AccessKeyId"], access["SecretAccessKey"]


def test_a_user_that_may_not_write(auth_moto: MotoServer, inventory: Any) -> None:
    key, secret = reader_user(auth_moto)
    inventory(s3_config(auth_moto.url, key, secret))
    report = object_storage("store")
    assert report.status is RunStatus.unhealthy and report.exit_code == 1
    head, put = report.findings
    assert head.check == "head_bucket" and head.severity is Severity.ok
    assert put.check == "put" and put.severity is Severity.critical
    assert "credentials expired or denied (AccessDenied)" in put.message
    assert "s3:PutObject" in put.message and "not attempted: get" in put.message
    open_auth(auth_moto, float("inf"))
    assert all_keys(client(auth_moto.url)) == []  # nothing was written


def test_unknown_keys_through_the_cli(
    auth_moto: MotoServer, inventory: Any, prefect_api: str
) -> None:
    reader_user(auth_moto)
    inventory(s3_config(auth_moto.url, "AKIAEXPIRED00000", "wrong-secret"))
    proc = cli("run", "object-storage", "--json", env={"PREFECT_API_URL": prefect_api})
    assert proc.returncode == 1, proc.stderr
    [head] = json.loads(proc.stdout)["findings"]
    assert head["check"] == "head_bucket" and head["severity"] == "critical"
    assert "credentials expired or denied" in head["message"]
    assert "wrong-secret" not in proc.stdout + proc.stderr
    no_traceback(proc)


def test_a_bucket_that_does_not_exist(moto_server: Any, inventory: Any) -> None:
    moto_server.reset()
    inventory(s3_config(moto_server.url))
    [head] = object_storage("store").findings
    assert head.severity is Severity.critical and "the bucket does not exist" in head.message


def test_an_endpoint_that_is_down(inventory: Any) -> None:
    inventory(s3_config(f"http://127.0.0.1:{free_port()}"))
    report = object_storage("store")
    assert report.exit_code == 1
    [head] = report.findings
    assert head.severity is Severity.critical
    assert "cannot connect (network)" in head.message and "Connection refused" in head.message
    assert "endpoint_url" in head.message  # what to check next


@pytest.mark.parametrize(
    ("url", "extra", "expected"),
    [
        ("127.0.0.1:9000", "", "s3.store.endpoint_url: not an S3 endpoint URL: use http(s)://"),
        ("ftp://127.0.0.1:9000", "", "s3.store.endpoint_url: not an S3 endpoint URL"),
        ("http://u:s3cret-pw@no host", "", "s3.store.endpoint_url: not an S3 endpoint URL"),
        ("http://127.0.0.1:9000", 'region = "eu central"', "'eu central' is not a region name"),
    ],
)
def test_a_malformed_endpoint_or_region_exits_2_naming_its_key(
    inventory: Any, url: str, extra: str, expected: str
) -> None:
    inventory(s3_config(url, extra=extra))
    proc = cli("run", "object-storage")
    assert proc.returncode == 2, proc.stderr
    assert expected in proc.stderr and "s3cret-pw" not in proc.stderr + proc.stdout
    no_traceback(proc)


@pytest.mark.parametrize(
    ("endpoint_url", "region", "what"),
    [("127.0.0.1:9000", "us-east-1", "endpoint"), (None, "eu central", "region")],
)
def test_a_target_built_without_validation_gets_a_config_error(
    endpoint_url: str | None, region: str, what: str
) -> None:
    target = S3Target.model_construct(bucket=BUCKET, endpoint_url=endpoint_url, region=region)
    expected = f"botocore refuses its {what}: correct endpoint_url"
    with pytest.raises(ConfigError, match=expected):
        head_bucket.fn("store", target)
    with pytest.raises(ConfigError, match=expected):
        put_canary.fn("store", target, "key")


def test_a_name_that_does_not_resolve(inventory: Any) -> None:
    # .invalid never resolves (RFC 2606)
    inventory(s3_config("http://s3.storage.invalid:9000"))
    [head] = object_storage("store").findings
    assert "cannot connect: the endpoint's name does not resolve (DNS)" in head.message


class Unavailable(BaseHTTPRequestHandler):
    """An S3 endpoint whose provider is failing: every request gets S3's 503."""

    def _answer(self) -> None:
        body = (
            b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>ServiceUnavailable</Code>'
            b"<Message>Please reduce your request rate.</Message></Error>"
        )
        self.send_response(503)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_PUT = do_HEAD = do_DELETE = _answer

    def log_message(self, format: str, *args: Any) -> None:
        pass


def test_a_provider_answering_503(inventory: Any) -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Unavailable)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        inventory(s3_config(f"http://127.0.0.1:{server.server_address[1]}"))
        [head] = object_storage("store").findings
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
    assert head.severity is Severity.critical
    assert "the storage provider failed (503, HTTP 503)" in head.message
    assert "status page" in head.message


def corrupting_proxy(upstream: str) -> type[BaseHTTPRequestHandler]:
    """A hop in front of the store (a cache, a CDN) that flips the first byte of every object
    it serves: what comes back is not what was written."""

    class Proxy(BaseHTTPRequestHandler):
        def _forward(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
            answer = httpx.request(
                self.command, upstream + self.path, headers=headers, content=body, timeout=10
            )
            content = answer.content
            if self.command == "GET" and answer.status_code == 200 and content:
                content = bytes([content[0] ^ 0xFF]) + content[1:]
            self.send_response(answer.status_code)
            for k, v in answer.headers.items():
                if k.lower() not in ("content-length", "transfer-encoding", "connection"):
                    self.send_header(k, v)
            self.send_header("Content-Length", str(len(content)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(content)

        do_GET = do_PUT = do_HEAD = do_DELETE = do_POST = _forward

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Proxy


def test_data_that_comes_back_different(bucket: Any, moto_server: Any, inventory: Any) -> None:
    proxy = ThreadingHTTPServer(("127.0.0.1", 0), corrupting_proxy(moto_server.url))
    thread = threading.Thread(target=proxy.serve_forever, daemon=True)
    thread.start()
    try:
        inventory(s3_config(f"http://127.0.0.1:{proxy.server_address[1]}"))
        report = object_storage("store")
    finally:
        proxy.shutdown()
        proxy.server_close()
        thread.join(5)
    found = by_check(report)
    assert report.status is RunStatus.unhealthy
    # boto3 checks the object's CRC and refuses it; the presigned GET is compared byte by byte
    assert "checksum" in found["get"].message
    for step in ("get", "presigned_get"):
        assert found[step].severity is Severity.critical
        assert "the data read back is not what was written" in found[step].message
        assert "a proxy, a CDN" in found[step].message
    # the canary was deleted all the same
    assert found["delete"].severity is Severity.ok
    assert all_keys(bucket) == ["covers/test.webp"]
