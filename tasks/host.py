"""The host: memory, load and disk, read from /proc and statvfs (no subprocess) on this
machine, or memory from the Docker engine's info when the services run on a remote engine."""

from __future__ import annotations

import os
import shutil
import subprocess
from contextlib import closing
from pathlib import Path
from typing import IO

import docker
import docker.errors
from pydantic import BaseModel

from tasks.engine import io_task
from tasks.errors import ActionFailed, TargetUnreachable


class HostStats(BaseModel):
    """Memory in bytes; None where the source does not give it (a Docker engine's info has
    the total and the CPUs, not what is available nor the load). machine: where it was read."""

    memory_total: int
    memory_available: int | None
    load_1m: float | None
    cpus: int
    machine: str = "this machine"

    @property
    def memory_percent(self) -> float | None:
        """Memory in use, 0 to 100, as total minus available; None when available is unknown."""
        if self.memory_available is None:
            return None
        return 100 * (1 - self.memory_available / self.memory_total)


class DiskUsage(BaseModel):
    """The file system holding `path`: total and free bytes (free: what an unprivileged user
    may still write, as `df` shows as available)."""

    path: str
    total: int
    free: int

    @property
    def used_percent(self) -> float:
        """Space not free to write, 0 to 100; 0.0 for a file system of size 0."""
        return 100 * (1 - self.free / self.total) if self.total else 0.0


@io_task("read-host-stats", timeout_seconds=30, retries=0)
def read_host_stats(docker_host: str | None = None) -> HostStats:
    """This machine's memory, load and CPUs from /proc; with docker_host (a Docker API URL,
    for services on a remote engine), that engine's total memory and CPUs, the rest unknown.

    Args:
        docker_host: the remote engine's Docker API URL (tcp://..., ssh://...); None: this
            machine.

    Returns:
        HostStats: memory_total and memory_available in bytes, the 1-minute load average,
        the CPU count, and which machine it was read on (available and load are None for a
        Docker host).

    Raises:
        TargetUnreachable: the Docker engine cannot be reached or does not answer in 10 s
            (transient, though this task is not retried).
        OSError: /proc/meminfo cannot be read (not Linux)."""
    if docker_host is not None:
        return _engine_stats(docker_host)
    meminfo = {
        line.split(":")[0]: int(line.split()[1]) * 1024
        for line in Path("/proc/meminfo").read_text().splitlines()
        if line.count(" ")
    }
    return HostStats(
        memory_total=meminfo["MemTotal"],
        memory_available=meminfo["MemAvailable"],
        load_1m=os.getloadavg()[0],
        cpus=os.cpu_count() or 1,
    )


def _engine_stats(docker_host: str) -> HostStats:
    try:
        with closing(docker.DockerClient(base_url=docker_host, timeout=10)) as client:
            info = client.info()
    except docker.errors.DockerException as exc:
        raise TargetUnreachable(
            f"Docker host {docker_host}: cannot read its memory: {exc}", transient=True
        ) from exc
    return HostStats(
        memory_total=int(info["MemTotal"]),
        memory_available=None,
        load_1m=None,
        cpus=int(info.get("NCPU") or 1),
        machine=f"the Docker host {docker_host}",
    )


@io_task("read-disk-usage", timeout_seconds=10, retries=0)
def read_disk_usage(path: str) -> DiskUsage | None:
    """The usage of the file system that holds `path`, on this machine.

    Args:
        path: a file or directory, e.g. a PostgreSQL data directory.

    Returns:
        DiskUsage in bytes; None when the path is not on this host (a remote or containerised
        server) or cannot be read.

    Raises:
        Nothing of its own: an unreadable path is None."""
    try:
        usage = shutil.disk_usage(path)
    except OSError:
        return None
    return DiskUsage(path=path, total=usage.total, free=usage.free)


def memory_file() -> IO[bytes]:
    """An unnamed file in memory (memfd_create, Linux), for the output of a command the
    runbooks run: unlike a temp file it needs no disk space, and a full disk may be the very
    incident being diagnosed. It is gone once closed. Linux only (os.memfd_create); OSError
    when the process is out of file descriptors."""
    return open(os.memfd_create("runbook-output", os.MFD_CLOEXEC), "w+b")


def run_command(
    subject: str, what: str, argv: list[str], timeout_seconds: float
) -> subprocess.CompletedProcess[str]:
    """Run a configured command (a proxy's test or reload, a CA client's renew) on this
    machine, text out, no stdin; its exit code is the caller's to judge. subject names the
    target in messages ("proxy 'edge'").

    Raises ActionFailed when it does not finish within timeout_seconds, or cannot run."""
    try:
        return subprocess.run(
            argv,
            capture_output=True,
            text=True,
            check=False,
            timeout=timeout_seconds,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired:
        raise ActionFailed(
            f"{subject}: {what} command {argv[0]!r} did not finish within {timeout_seconds} s"
        ) from None
    except OSError as exc:
        raise ActionFailed(
            f"{subject}: {what} command {argv[0]!r} cannot run: {exc.strerror}"
        ) from None
