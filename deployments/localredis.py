"""A throwaway redis-server from the machine's own binary, on 127.0.0.1 and a free port, with
its files in a temp dir: the tests' Redis and the sandbox's."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import redis

from deployments.localpg import free_port, stop_process
from tasks.errors import ConfigError, TargetError
from tasks.wait import poll


class LocalRedis:
    def __init__(
        self,
        *,
        password: str | None = None,
        appendonly: bool = False,
        config_file: bool = False,
        maxmemory: str | None = None,
        policy: str | None = None,
    ) -> None:
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="runbook-redis-"))
        self.password = password
        settings = {
            "bind": "127.0.0.1",
            "port": str(self.port),
            "dir": str(self.dir),
            "save": '""',
            "appendonly": "yes" if appendonly else "no",
        }
        if password:
            settings["requirepass"] = password
        if maxmemory:
            settings["maxmemory"] = maxmemory
        if policy:
            settings["maxmemory-policy"] = policy
        # Only a server started from a file can CONFIG REWRITE.
        self.config = self.dir / "redis.conf" if config_file else None
        if self.config is not None:
            self.config.write_text("".join(f"{k} {v}\n" for k, v in settings.items()))
            self.argv = ["redis-server", str(self.config)]
        else:
            self.argv = ["redis-server"] + [
                a for k, v in settings.items() for a in (f"--{k}", v.strip('"'))
            ]
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis(
            host="127.0.0.1",
            port=self.port,
            password=self.password,
            decode_responses=True,
            socket_timeout=5,
        )

    def start(self) -> LocalRedis:
        binary = shutil.which(self.argv[0])
        if binary is None:
            raise ConfigError("no redis-server found: apt-get install redis-server")
        self.proc = subprocess.Popen(
            [binary, *self.argv[1:]], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        proc = self.proc

        def answers() -> bool:
            try:
                with self.client() as r:
                    return bool(r.ping())
            except redis.ConnectionError:
                return False

        started = poll(
            lambda: answers() or proc.poll() is not None,
            what="redis-server to answer",
            timeout_seconds=10,
            first_delay_seconds=0.05,
            max_delay_seconds=0.05,
        )
        if not started.done or proc.poll() is not None:
            raise TargetError(f"redis-server did not start: {self.argv}")
        return self

    def stop(self) -> None:
        stop_process(self.proc, timeout=10)
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> LocalRedis:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
