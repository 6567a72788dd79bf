"""disk-space on this machine: filesystem usage (os.statvfs), the largest entries under a path
(a bounded walk), and the json-file logs of Docker containers found through the Engine API's
inspect (`LogPath`, never a glob over /var/lib/docker), and their truncation.

Nothing here writes a file to read its results: the diagnosis must work on a full disk."""

from __future__ import annotations

import heapq
import os
import stat
import time
from urllib.parse import urlsplit

import docker.errors

from tasks.disk_rules import MIB, Entry, LogFile, Walk
from tasks.engine import io_task
from tasks.errors import ActionFailed, TargetUnreachable
from tasks.host import DiskUsage, disk_usage_of
from tasks.services import DockerController
from tasks.settings import ServiceTarget

# What `truncate -s 0` is safe for (seed 000 s4): dockerd appends to a json-file log, so the
# next line lands at the new end. The `local` driver's files are compressed and indexed.
TRUNCATABLE_DRIVERS = ("json-file",)


@io_task("read-path-usage", timeout_seconds=30, retries=0)
def read_path_usage(paths: list[str]) -> list[DiskUsage]:
    """The file system of each path (tasks.host.disk_usage_of: os.statvfs, no subprocess, no
    file written).

    Args:
        paths: absolute paths (files or directories).

    Returns:
        One DiskUsage per path, in order: bytes total and free to an unprivileged writer,
        inodes total and free, the device (st_dev); a path that cannot be read has `error`
        set instead.

    Raises:
        Nothing of its own: an unreadable path is reported in its DiskUsage."""
    return [disk_usage_of(path) for path in paths]


def walk_largest(
    root: str, depth: int, budget_seconds: float, top: int, deadline: float | None = None
) -> Walk:
    """The `top` largest files and directories under root, as `du -a -x` would size them
    (st_blocks), from a walk that reads at most `depth` levels below root, never follows a
    symlink, never leaves root's filesystem, and stops when budget_seconds are spent, or at
    `deadline` (time.monotonic()) when given: a deadline shared with other walks, of which
    budget_seconds is then the whole budget (for the message).

    A directory's size is the sum of what the walk saw under it: with a walk cut short, a
    lower bound; Walk.cut_short then says why. Unreadable directories are counted and
    skipped. Plain Python (no task): the caller's task bounds it; budget_seconds 0 (or a
    deadline passed) reads nothing."""
    if deadline is None:
        deadline = time.monotonic() + budget_seconds
    try:
        root_dev = os.lstat(root).st_dev
    except OSError as exc:
        return Walk(path=root, entries=[], seen=0, error=exc.strerror or str(exc))
    sizes: dict[str, int] = {}
    files: list[tuple[int, str]] = []  # a min-heap of the largest files
    stack: list[tuple[str, int, tuple[str, ...]]] = [(root, 0, ())]
    seen = not_entered = unreadable = other_fs = 0
    out_of_time = False
    while stack and not out_of_time:
        if time.monotonic() >= deadline:
            out_of_time = True  # a shared deadline may be spent before this walk begins
            break
        folder, level, ancestors = stack.pop()
        try:
            with os.scandir(folder) as listing:
                for entry in listing:
                    if time.monotonic() >= deadline:
                        out_of_time = True
                        break
                    try:
                        st = entry.stat(follow_symlinks=False)
                    except OSError:
                        unreadable += 1
                        continue
                    seen += 1
                    if stat.S_ISLNK(st.st_mode):
                        continue  # never followed; the link itself takes no room to speak of
                    if st.st_dev != root_dev:
                        other_fs += 1  # a mount point: another filesystem, not this one's
                        continue
                    used = st.st_blocks * 512
                    for a in ancestors:
                        sizes[a] += used
                    if stat.S_ISDIR(st.st_mode):
                        sizes[entry.path] = used
                        if level + 1 < depth:
                            stack.append((entry.path, level + 1, (*ancestors, entry.path)))
                        else:
                            not_entered += 1
                    elif len(files) < top:
                        heapq.heappush(files, (used, entry.path))
                    elif used > files[0][0]:
                        heapq.heapreplace(files, (used, entry.path))
        except OSError:
            unreadable += 1
    if time.monotonic() >= deadline and (stack or out_of_time):
        out_of_time = True
    entries = [Entry(path=p, bytes=n, directory=False) for n, p in files]
    entries += [Entry(path=p, bytes=n, directory=True) for p, n in sizes.items()]
    entries.sort(key=lambda e: (-e.bytes, e.path))
    why = []
    if out_of_time:
        why.append(f"the time budget of {budget_seconds:g} s ran out")
    if not_entered:
        why.append(f"{not_entered} directories below scan_depth={depth} not entered")
    if unreadable:
        why.append(f"{unreadable} entries could not be read")
    if other_fs:
        why.append(f"{other_fs} mount points of other filesystems skipped")
    return Walk(path=root, entries=entries[:top], seen=seen, cut_short="; ".join(why) or None)


# Above the most scan_seconds allows (600, tasks.disk_rules.DiskParams) for all paths together:
# the walks stop at their shared deadline, the task's timeout is only a backstop.
@io_task("largest-entries", timeout_seconds=660, retries=0)
def largest_entries(paths: list[str], depth: int, budget_seconds: float, top: int) -> list[Walk]:
    """walk_largest for each path, in order, against one deadline: budget_seconds from the
    start is the time all walks together may take (a path reached after it is not walked,
    and says so).

    Args:
        paths: absolute paths.
        depth: levels below each path that are read.
        budget_seconds: the time all walks together may take, in seconds (at most 600).
        top: how many entries each keeps.

    Returns:
        One Walk per path, in order.

    Raises:
        Nothing of its own: unreadable paths are in the Walks."""
    deadline = time.monotonic() + budget_seconds
    return [walk_largest(path, depth, budget_seconds, top, deadline) for path in paths]


def _remote(cfg: ServiceTarget) -> bool:
    host = cfg.docker_host or os.environ.get("DOCKER_HOST") or ""
    return bool(host) and urlsplit(host).scheme not in ("", "unix")


@io_task("container-log-files", timeout_seconds=120, retries=1)
def container_log_files(name: str, cfg: ServiceTarget) -> list[LogFile]:
    """The log files of a docker service's containers: the engine's inspect names each one
    (LogPath) and its driver (HostConfig.LogConfig.Type); the size is read here when the
    engine runs on this machine.

    Args:
        name: the [services.NAME] entry's name.
        cfg: that entry (kind docker).

    Returns:
        One LogFile per container; `note` says why one cannot be judged (not json-file, a
        remote engine, a file not visible here) and bytes is None then.

    Raises:
        TargetError: no such container, or none with the compose labels.
        TargetUnreachable: the engine does not answer (transient: retried)."""
    ctl = DockerController(name, cfg)
    try:
        containers = ctl.containers()
    finally:
        ctl.client.close()
    found = []
    for c in containers:
        attrs = c.attrs
        path = str(attrs.get("LogPath") or "")
        driver = str(((attrs.get("HostConfig") or {}).get("LogConfig") or {}).get("Type") or "?")
        log = LogFile(
            service=name, container=c.name, container_id=c.id, log_path=path, driver=driver
        )
        if driver not in TRUNCATABLE_DRIVERS or not path:
            log.note = f"log driver {driver}: no json-file log to judge"
        elif _remote(cfg):
            log.note = "the engine is remote: its log files are on its own machine"
        else:
            try:
                log.bytes = os.lstat(path).st_size
            except OSError as exc:
                log.note = f"not readable on this machine: {exc.strerror}"
        found.append(log)
    return found


@io_task("truncate-container-log", timeout_seconds=60, retries=0)
def truncate_container_log(name: str, cfg: ServiceTarget, container_id: str, log_path: str) -> str:
    """Truncate a container's json-file log to 0 bytes, what `truncate -s 0` does (seed 000
    s4): the container keeps running and dockerd keeps appending to the same file. Only the
    path the engine names for that container now, opened without following symlinks.

    Args:
        name: the [services.NAME] entry's name.
        cfg: that entry.
        container_id: the container, as found by container_log_files.
        log_path: its LogPath then.

    Returns:
        What was done and how many MiB it freed, for the action's detail.

    Raises:
        ActionFailed: the container is gone, the engine names another log file or driver
            now, or the file cannot be truncated.
        TargetUnreachable: the engine does not answer (transient)."""
    ctl = DockerController(name, cfg)
    try:
        attrs = ctl.client.containers.get(container_id).attrs
    except docker.errors.NotFound:
        raise ActionFailed(
            f"service {name!r}: container {container_id[:12]} is gone; nothing to truncate"
        ) from None
    except docker.errors.DockerException as exc:
        raise TargetUnreachable(f"service {name!r}: Docker API: {exc}", transient=True) from exc
    finally:
        ctl.client.close()
    driver = ((attrs.get("HostConfig") or {}).get("LogConfig") or {}).get("Type")
    if attrs.get("LogPath") != log_path or driver not in TRUNCATABLE_DRIVERS:
        raise ActionFailed(
            f"service {name!r}: container {container_id[:12]} now logs to "
            f"{attrs.get('LogPath')!r} ({driver}), not {log_path}: not truncated; run again"
        )
    try:
        fd = os.open(log_path, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            size = os.fstat(fd).st_size
            os.ftruncate(fd, 0)
        finally:
            os.close(fd)
    except OSError as exc:
        raise ActionFailed(
            f"service {name!r}: cannot truncate {log_path}: {exc.strerror}; the runbooks "
            "need write access to the engine's log files (root on the engine's machine)"
        ) from None
    return f"truncated {log_path}: {size / MIB:.1f} MiB freed; the container runs on"


def device_of(path: str) -> int | None:
    """The st_dev of a path (which filesystem holds it), None when it cannot be read."""
    try:
        return os.stat(path).st_dev
    except OSError:
        return None
