"""The host: memory, load and disk, read from /proc and statvfs (no subprocess) on this
machine, or memory from the Docker engine's info when the services run on a remote engine."""

from __future__ import annotations

import os
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
    """The file system holding `path` (os.statvfs): total and free bytes (free: what an
    unprivileged user may still write, f_bavail, as `df` and node_exporter's avail show),
    inodes total and free (f_files, f_favail), and its device (st_dev), which tells whether
    two paths share a file system. error: why it could not be read (then the numbers are 0;
    only disk_usage_of sets it)."""

    path: str
    total: int = 0
    free: int = 0
    inodes_total: int = 0
    inodes_free: int = 0
    device: int | None = None
    error: str | None = None

    @property
    def used_percent(self) -> float:
        """Space not free to write, 0 to 100 (1 - avail/size, as the DiskUsageHigh rule);
        0.0 for a file system of size 0."""
        return 100 * (1 - self.free / self.total) if self.total else 0.0

    @property
    def inodes_used_percent(self) -> float | None:
        """Inodes in use, 0 to 100; None where the file system has no fixed count (btrfs: 0)."""
        return 100 * (1 - self.inodes_free / self.inodes_total) if self.inodes_total else None


def disk_usage_of(path: str) -> DiskUsage:
    """The usage of the file system that holds `path`, from os.statvfs and os.stat (no
    subprocess, no file written: it works on a full disk). Plain function: callers' tasks
    bound it.

    Returns:
        DiskUsage in bytes and inodes; with `error` set (the OS's reason) when the path
        cannot be read."""
    try:
        vfs = os.statvfs(path)
        device = os.stat(path).st_dev
    except OSError as exc:
        return DiskUsage(path=path, error=exc.strerror or str(exc))
    return DiskUsage(
        path=path,
        total=vfs.f_blocks * vfs.f_frsize,
        free=vfs.f_bavail * vfs.f_frsize,
        inodes_total=vfs.f_files,
        inodes_free=vfs.f_favail,
        device=device,
    )


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
    usage = disk_usage_of(path)
    return None if usage.error is not None else usage


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
