"""A throwaway PostgreSQL server from the machine's own binaries: the tests' server and the
sandbox's. Listens on 127.0.0.1 only, on a free port, with its data in a temp dir."""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import psycopg
from psycopg import sql

from tasks.errors import ConfigError


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def stop_process(proc: subprocess.Popen[bytes] | None, timeout: float = 30) -> None:
    """SIGTERM, then SIGKILL if it has not ended within timeout seconds."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _bindir() -> Path:
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda p: int(p.split("/")[4])
    )
    if found:
        return Path(found[-1]).parent
    pg_ctl = shutil.which("pg_ctl")
    if pg_ctl:
        return Path(pg_ctl).parent
    raise ConfigError("no PostgreSQL server binaries (pg_ctl) found: apt-get install postgresql")


class LocalPostgres:
    def __init__(self, port: int | None = None, *, max_connections: int = 100) -> None:
        self.port = port or free_port()
        self.max_connections = max_connections
        self.dir = Path(tempfile.mkdtemp(prefix="runbook-pg-"))
        self.data = self.dir / "data"
        self.bindir = _bindir()
        # initdb and pg_ctl refuse to run as root: run them as the postgres user.
        self._as: list[str] = []
        if os.geteuid() == 0:
            user = pwd.getpwnam("postgres")
            os.chown(self.dir, user.pw_uid, user.pw_gid)
            self._as = ["runuser", "-u", "postgres", "--"]

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def dsn_for(self, dbname: str, user: str = "postgres") -> str:
        return f"postgresql://{user}@127.0.0.1:{self.port}/{dbname}"

    def _run(self, *argv: str) -> None:
        subprocess.run(list(argv), check=True, capture_output=True, timeout=120)

    def start(self) -> LocalPostgres:
        if not self.data.exists():
            self._run(
                *self._as,
                str(self.bindir / "initdb"),
                "-D",
                str(self.data),
                "-U",
                "postgres",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--no-sync",
            )
        self._run(*self.ctl_argv("start"))
        return self

    def ctl_argv(self, action: str) -> list[str]:
        """The pg_ctl command line for start, stop, restart or status of this server: also
        what a `command` service controller runs."""
        options = (
            f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 "
            f"-c shared_preload_libraries=pg_stat_statements -c fsync=off "
            f"-c max_connections={self.max_connections}"
        )
        extra = {
            "start": ["-l", str(self.dir / "log"), "-w", "-t", "60", "-o", options],
            "restart": ["-l", str(self.dir / "log"), "-w", "-t", "60", "-o", options],
            "stop": ["-m", "immediate", "-w"],  # as abrupt as a crash
        }.get(action, [])
        return [*self._as, str(self.bindir / "pg_ctl"), "-D", str(self.data), *extra, action]

    def is_running(self) -> bool:
        try:
            with psycopg.connect(self.dsn, connect_timeout=2):
                return True
        except psycopg.OperationalError:
            return False

    def stop(self, *, remove: bool = True) -> None:
        if (self.data / "postmaster.pid").exists():
            with contextlib.suppress(subprocess.SubprocessError):
                self._run(*self.ctl_argv("stop"))
        if remove:
            shutil.rmtree(self.dir, ignore_errors=True)

    def create_database(self, name: str) -> str:
        with psycopg.connect(self.dsn, autocommit=True, connect_timeout=5) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        with psycopg.connect(self.dsn_for(name), autocommit=True, connect_timeout=5) as conn:
            conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        return self.dsn_for(name)

    def __enter__(self) -> LocalPostgres:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
