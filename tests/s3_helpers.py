"""moto's S3 server on a free loopback port, for the tests."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import boto3
import httpx

from deployments.localpg import free_port, stop_process

KEY, SECRET = "AKIAEXAMPLE", "example-secret"


def client(url: str, key: str = KEY, secret: str = SECRET) -> Any:
    return boto3.client(
        "s3",
        endpoint_url=url,
        region_name="us-east-1",
        aws_access_key_id=key,
        aws_secret_access_key=secret,
    )


class MotoServer:
    def __init__(self, *, enforce_auth: bool = False) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.enforce_auth = enforce_auth
        self.proc: subprocess.Popen[bytes] | None = None

    def argv(self) -> list[str]:
        binary = shutil.which("moto_server", path=str(Path(sys.executable).parent))
        assert binary, "moto_server is not installed: pip install 'moto[server]'"
        return [binary, "-H", "127.0.0.1", "-p", str(self.port)]

    def start(self) -> MotoServer:
        env = {**os.environ}
        if self.enforce_auth:
            env["INITIAL_NO_AUTH_ACTION_COUNT"] = "0"  # every request must be signed by a user
        self.proc = subprocess.Popen(
            self.argv(),
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(f"{self.url}/moto-api/", timeout=1)
                return self
            except httpx.HTTPError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError("moto_server did not start") from None
                time.sleep(0.1)

    def reset(self) -> None:
        httpx.post(f"{self.url}/moto-api/reset", timeout=10)

    def fresh_bucket(self, name: str) -> Any:
        """Forget everything, then one empty bucket; a client for it."""
        self.reset()
        s3 = client(self.url)
        s3.create_bucket(Bucket=name)
        return s3

    def stop(self) -> None:
        stop_process(self.proc)
