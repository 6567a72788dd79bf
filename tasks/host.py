"""The local host: memory, load and disk, read from /proc and statvfs (no subprocess)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import IO

from pydantic import BaseModel

from tasks.engine import io_task


class HostStats(BaseModel):
    memory_total: int
    memory_available: int
    load_1m: float
    cpus: int

    @property
    def memory_percent(self) -> float:
        return 100 * (1 - self.memory_available / self.memory_total)


class DiskUsage(BaseModel):
    path: str
    total: int
    free: int

    @property
    def used_percent(self) -> float:
        return 100 * (1 - self.free / self.total) if self.total else 0.0


@io_task("read-host-stats", timeout_seconds=10, retries=0)
def read_host_stats() -> HostStats:
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


@io_task("read-disk-usage", timeout_seconds=10, retries=0)
def read_disk_usage(path: str) -> DiskUsage | None:
    """None when the path is not on this host (a remote or containerised server)."""
    try:
        usage = shutil.disk_usage(path)
    except OSError:
        return None
    return DiskUsage(path=path, total=usage.total, free=usage.free)


def memory_file() -> IO[bytes]:
    """An unnamed file in memory (memfd_create, Linux), for the output of a command the
    runbooks run: unlike a temp file it needs no disk space, and a full disk may be the very
    incident being diagnosed. It is gone once closed."""
    return open(os.memfd_create("runbook-output", os.MFD_CLOEXEC), "w+b")
