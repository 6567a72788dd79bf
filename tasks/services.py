"""Service control: see, restart, scale and measure a service through Docker's API (Docker or
Podman's Docker-compatible socket), systemd, or operator-given commands. One small interface,
chosen per service by `kind`; every call is bounded by the service's timeout_seconds."""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any, Protocol

import docker
import docker.errors
import requests
from pydantic import BaseModel

from tasks.engine import io_task
from tasks.errors import ActionFailed, TargetError, TargetUnreachable
from tasks.host import memory_file
from tasks.settings import ServiceTarget

LOG_LINES = 50
COMPOSE_PROJECT = "com.docker.compose.project"
COMPOSE_SERVICE = "com.docker.compose.service"
COMPOSE_NUMBER = "com.docker.compose.container-number"
DEFAULT_DOCKER_HOST = "unix:///var/run/docker.sock"
COMPOSE_FILES = "com.docker.compose.project.config_files"
COMPOSE_DIR = "com.docker.compose.project.working_dir"


class ServiceStatus(BaseModel):
    """How a service is: running (every container of it, or the unit, is), its state in the
    system's words, health (Docker's healthcheck: "healthy", or the states when any is not),
    restarts counted by Docker or systemd, whether it was OOM-killed, and its containers."""

    running: bool
    state: str
    health: str | None = None
    restarts: int = 0
    oom_killed: bool = False
    replicas: int = 1
    detail: str = ""


class ServiceStats(BaseModel):
    """CPU in percent of one core (100: one core busy; summed over a compose service's
    containers, so it may exceed 100) and memory in bytes; None where it is unknown."""

    cpu_percent: float | None = None
    memory_bytes: int | None = None
    memory_limit_bytes: int | None = None  # None: no limit of its own; judged against the host

    def memory_percent(self, host_total: int) -> float | None:
        """Memory used, in percent of its own limit, or of host_total (bytes) when it has
        none; None when the memory used is unknown."""
        if self.memory_bytes is None:
            return None
        return 100 * self.memory_bytes / (self.memory_limit_bytes or host_total)


class Controller(Protocol):
    """One service through one kind of control (controller() picks it). Every call is bounded
    by the service's timeout_seconds; a refused change raises ActionFailed."""

    def status(self) -> ServiceStatus:
        """How it is now."""

    def restart(self) -> str:
        """Restart it (or start it when it is down and it has a way to); what was done."""

    def logs(self, lines: int) -> list[str]:
        """Its last `lines` log lines at most, oldest first."""

    def stats(self) -> ServiceStats | None:
        """CPU and memory now; None when this kind cannot tell."""

    def scale(self, replicas: int) -> str:
        """Run `replicas` instances of it; what was done. ActionFailed where it cannot."""

    def close(self) -> None:
        """Release what it holds (the Docker client's connections)."""


def _tail(text: str, lines: int) -> list[str]:
    return text.strip().splitlines()[-lines:] if text.strip() else []


# --- command ---------------------------------------------------------------------------------


class CommandController:
    """For hosts the other kinds do not reach (fly.io, a pg_ctl cluster): argv lists, no shell.
    Running means status_command exits 0 (one that cannot run or times out is state
    "unknown"); restart runs start_command instead when it is down and there is one; no stats;
    no scaling."""

    def __init__(self, name: str, cfg: ServiceTarget) -> None:
        self.name, self.cfg = name, cfg

    def _run(self, what: str, argv: list[str]) -> subprocess.CompletedProcess[str]:
        """Output goes to files in memory, not pipes: a daemon the command leaves behind keeps its
        stdout open, and waiting for a pipe's end would then never return. On timeout the
        whole process group is killed."""
        with memory_file() as out, memory_file() as err:
            try:
                proc = subprocess.Popen(
                    argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err, start_new_session=True
                )
            except OSError as exc:
                raise ActionFailed(
                    f"service {self.name!r}: {what} command {argv[0]!r} cannot run: {exc.strerror}"
                ) from None
            try:
                code = proc.wait(self.cfg.timeout_seconds)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                raise ActionFailed(
                    f"service {self.name!r}: {what} command {argv[0]!r} did not finish within "
                    f"{self.cfg.timeout_seconds:g} s (timeout_seconds)"
                ) from None
            out.seek(0)
            err.seek(0)
            return subprocess.CompletedProcess(
                argv, code, out.read().decode(errors="replace"), err.read().decode(errors="replace")
            )

    def _checked(self, what: str, argv: list[str]) -> str:
        proc = self._run(what, argv)
        if proc.returncode != 0:
            raise ActionFailed(
                f"service {self.name!r}: {what} command exited "
                f"{proc.returncode}: {(proc.stderr or proc.stdout).strip()[-500:]}"
            )
        return proc.stdout

    def status(self) -> ServiceStatus:
        assert self.cfg.status_command is not None
        try:
            proc = self._run("status", self.cfg.status_command)
        except ActionFailed as exc:
            return ServiceStatus(running=False, state="unknown", detail=str(exc))
        running = proc.returncode == 0
        return ServiceStatus(
            running=running,
            state="running" if running else "stopped",
            detail=(proc.stdout or proc.stderr).strip()[-500:],
        )

    def restart(self) -> str:
        assert self.cfg.restart_command is not None
        down = self.cfg.start_command is not None and not self.status().running
        argv = (
            self.cfg.start_command if down and self.cfg.start_command else self.cfg.restart_command
        )
        self._checked("start" if down else "restart", argv)
        return "started" if down else "restarted"

    def logs(self, lines: int) -> list[str]:
        if not self.cfg.logs_command:
            return []
        return _tail(self._checked("logs", self.cfg.logs_command), lines)

    def stats(self) -> ServiceStats | None:
        return None

    def scale(self, replicas: int) -> str:
        raise ActionFailed(f"service {self.name!r}: a command service cannot be scaled here")

    def close(self) -> None:
        pass


# --- systemd ---------------------------------------------------------------------------------


def proc_stats(pid: int, interval: float = 0.5) -> ServiceStats:
    """CPU (over `interval` seconds, slept here) and resident memory of one process, from
    /proc: cpu_percent 100 is one core busy, memory_bytes its VmRSS. An empty ServiceStats
    (all None) when the process is gone or cannot be read; never raises."""

    def cpu_ticks() -> int:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])  # utime + stime

    try:
        first, start = cpu_ticks(), time.monotonic()
        time.sleep(interval)
        used = cpu_ticks() - first
        rss = next(
            int(line.split()[1]) * 1024
            for line in Path(f"/proc/{pid}/status").read_text().splitlines()
            if line.startswith("VmRSS:")
        )
    except (OSError, StopIteration, IndexError, ValueError):
        return ServiceStats()
    seconds = time.monotonic() - start
    return ServiceStats(
        cpu_percent=100 * used / os.sysconf("SC_CLK_TCK") / seconds, memory_bytes=rss
    )


class SystemdController(CommandController):
    """A systemd unit on this machine, through systemctl (status, restart, the main process's
    stats) and journalctl (logs); it cannot be scaled."""

    def __init__(self, name: str, cfg: ServiceTarget) -> None:
        super().__init__(name, cfg)
        self.unit = cfg.unit or ""

    def status(self) -> ServiceStatus:
        proc = self._run(
            "status",
            [
                "systemctl",
                "show",
                self.unit,
                "--property",
                "ActiveState,SubState,NRestarts,Result,MainPID",
            ],
        )
        props = dict(line.split("=", 1) for line in proc.stdout.splitlines() if "=" in line)
        state = props.get("ActiveState", "unknown")
        return ServiceStatus(
            running=state == "active",
            state=f"{state}/{props.get('SubState', '?')}",
            restarts=int(props.get("NRestarts") or 0),
            oom_killed=props.get("Result") == "oom-kill",
            detail=proc.stderr.strip()[-300:],
        )

    def restart(self) -> str:
        self._checked("restart", ["systemctl", "restart", self.unit])
        return "restarted"

    def logs(self, lines: int) -> list[str]:
        return _tail(
            self._checked(
                "logs", ["journalctl", "-u", self.unit, "-n", str(lines), "--no-pager", "-o", "cat"]
            ),
            lines,
        )

    def stats(self) -> ServiceStats | None:
        pid = self._checked(
            "status", ["systemctl", "show", self.unit, "--property", "MainPID", "--value"]
        ).strip()
        return proc_stats(int(pid)) if pid.isdigit() and int(pid) > 0 else None

    def scale(self, replicas: int) -> str:
        raise ActionFailed(f"service {self.name!r}: a systemd unit cannot be scaled here")


# --- docker ----------------------------------------------------------------------------------


def cpu_percent(stats: dict[str, Any]) -> float | None:
    """Docker's own formula (as `docker stats` prints it), from one reply of the Docker stats
    API (stream=False): percent of one CPU, up to 100 times the CPUs; None when the reply
    lacks the counters (a container that is not running)."""
    cpu, pre = stats.get("cpu_stats", {}), stats.get("precpu_stats", {})
    try:
        used = cpu["cpu_usage"]["total_usage"] - pre["cpu_usage"]["total_usage"]
        system = cpu["system_cpu_usage"] - pre["system_cpu_usage"]
    except KeyError:
        return None
    cpus = cpu.get("online_cpus") or len(cpu["cpu_usage"].get("percpu_usage") or [1])
    return 100.0 * used / system * cpus if system > 0 else 0.0


class ComposeScale(BaseModel):
    """How to scale a compose service: argv to run here (None: it cannot run here, `missing`
    says why), and the command for a human either way."""

    argv: list[str] | None
    command: list[str]
    missing: str = ""


def compose_cli() -> list[str] | None:
    """The compose CLI of this machine: the docker plugin (`docker compose`), else the
    standalone `docker-compose`; None when neither is installed."""
    docker_cli = shutil.which("docker")
    if docker_cli is not None:
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            probe = subprocess.run(
                [docker_cli, "compose", "version"],
                capture_output=True,
                check=False,
                stdin=subprocess.DEVNULL,
                timeout=10,
            )
            if probe.returncode == 0:
                return [docker_cli, "compose"]
    standalone = shutil.which("docker-compose")
    return [standalone] if standalone is not None else None


def compose_scale(
    cfg: ServiceTarget,
    labels: dict[str, str],
    replicas: int,
    docker_host: str,
    cli: list[str] | None,
) -> ComposeScale:
    """The compose command that scales cfg's service to `replicas`, from the labels docker
    compose puts on the containers it makes (project, config files, working directory), for
    the engine at docker_host. cli: this machine's compose CLI (compose_cli()). The command is
    runnable here (argv) when there is a CLI and the project's files are on this machine."""
    project = labels.get(COMPOSE_PROJECT) or cfg.compose_project or ""
    service = cfg.compose_service or ""
    files = [f for f in labels.get(COMPOSE_FILES, "").split(",") if f]
    where = labels.get(COMPOSE_DIR)
    args = ["-p", project]
    for f in files or ["<the project's compose file>"]:
        args += ["-f", f]
    args += ["--project-directory", where] if where else []
    args += ["up", "-d", "--scale", f"{service}={replicas}", "--no-recreate", service]
    command = ["docker", "compose", *args]
    if docker_host != DEFAULT_DOCKER_HOST:
        command = ["env", f"DOCKER_HOST={docker_host}", *command]
    if not files:
        missing = f"its containers carry no {COMPOSE_FILES} label (not made by docker compose)"
    elif absent := [f for f in files if not Path(f).is_file()]:
        missing = f"the compose file {', '.join(absent)} is not on this machine"
    elif cli is None:
        missing = "no docker compose here (apt-get install docker-compose-v2 or docker-compose)"
    else:
        return ComposeScale(argv=[*cli, *args], command=command)
    return ComposeScale(argv=None, command=command, missing=missing)


# What docker-py raises when the engine does not answer: its own errors, and requests' for a
# connection that breaks after the client was made (the engine stopped, the socket went away).
_DOCKER_UNREACHABLE = (docker.errors.DockerException, requests.RequestException)


class DockerController:
    """One container, or every container of a compose service (by its compose labels),
    through the Docker API at docker_host (else $DOCKER_HOST, else the local socket).
    Raises TargetUnreachable (transient) when the client cannot be made."""

    def __init__(self, name: str, cfg: ServiceTarget) -> None:
        self.name, self.cfg = name, cfg
        self.base_url = cfg.docker_host or os.environ.get("DOCKER_HOST", DEFAULT_DOCKER_HOST)
        try:
            self.client = docker.DockerClient(
                base_url=self.base_url, timeout=int(cfg.timeout_seconds)
            )
        except docker.errors.DockerException as exc:
            raise TargetUnreachable(
                f"service {name!r}: cannot reach the Docker API: {exc}", transient=True
            ) from exc

    def containers(self) -> list[Any]:
        """The service's containers (docker-py Container objects), by name; TargetError when
        there are none, TargetUnreachable (transient) when the engine does not answer."""
        try:
            if self.cfg.container:
                return [self.client.containers.get(self.cfg.container)]
            found: list[Any] = self.client.containers.list(
                all=True,
                filters={
                    "label": [
                        f"{COMPOSE_PROJECT}={self.cfg.compose_project}",
                        f"{COMPOSE_SERVICE}={self.cfg.compose_service}",
                    ]
                },
            )
        except docker.errors.NotFound:
            raise TargetError(
                f"service {self.name!r}: no container {self.cfg.container!r}; "
                "check `container` in the config"
            ) from None
        except _DOCKER_UNREACHABLE as exc:
            raise TargetUnreachable(
                f"service {self.name!r}: Docker API: {exc}", transient=True
            ) from exc
        if not found:
            raise TargetError(
                f"service {self.name!r}: no container carries the compose labels "
                f"{self.cfg.compose_project}/{self.cfg.compose_service}"
            )
        return sorted(found, key=lambda c: c.name)

    @contextmanager
    def _reading(self, what: str) -> Iterator[None]:
        """Docker API errors of a read in the block (`what`: "logs of api-1") as the tree of
        tasks.errors: TargetError when the engine answered with an error (the container is
        gone, its log driver cannot be read), TargetUnreachable (transient) when it did not
        answer."""
        try:
            yield
        except docker.errors.APIError as exc:
            raise TargetError(
                f"service {self.name!r}: Docker API: reading the {what}: {exc.explanation or exc}"
            ) from exc
        except _DOCKER_UNREACHABLE as exc:
            raise TargetUnreachable(
                f"service {self.name!r}: Docker API: reading the {what}: {exc}", transient=True
            ) from exc

    def status(self) -> ServiceStatus:
        containers = self.containers()
        states = [c.attrs["State"] for c in containers]
        health = [s.get("Health", {}).get("Status") for s in states]
        known = [h for h in health if h]
        return ServiceStatus(
            running=all(s.get("Running") for s in states),
            state=", ".join(
                f"{c.name} {s.get('Status')}" for c, s in zip(containers, states, strict=True)
            ),
            health=None
            if not known
            else ("healthy" if all(h == "healthy" for h in known) else ", ".join(known)),
            restarts=sum(c.attrs.get("RestartCount", 0) for c in containers),
            oom_killed=any(s.get("OOMKilled") for s in states),
            replicas=len(containers),
        )

    def restart(self) -> str:
        containers = self.containers()
        try:
            for c in containers:
                c.restart(timeout=int(self.cfg.timeout_seconds))
        except _DOCKER_UNREACHABLE as exc:
            raise ActionFailed(f"service {self.name!r}: restart failed: {exc}") from exc
        return f"restarted {', '.join(c.name for c in containers)}"

    def logs(self, lines: int) -> list[str]:
        out: list[str] = []
        for c in self.containers():
            with self._reading(f"logs of {c.name}"):
                out += _tail(c.logs(tail=lines).decode(errors="replace"), lines)
        return out[-lines:]

    def stats(self) -> ServiceStats | None:
        total = ServiceStats(cpu_percent=0.0, memory_bytes=0, memory_limit_bytes=0)
        host_memory: int | None = None  # the engine's machine, which may not be this one
        for c in self.containers():
            if c.status != "running":
                continue
            with self._reading(f"stats of {c.name}"):
                raw = c.stats(stream=False)
            mem = raw.get("memory_stats", {})
            total.cpu_percent = (total.cpu_percent or 0) + (cpu_percent(raw) or 0)
            total.memory_bytes = (total.memory_bytes or 0) + int(mem.get("usage", 0))
            limit = int(mem.get("limit", 0))
            # Docker reports the host's memory as the limit of an unlimited container.
            if limit and host_memory is None:
                with self._reading("engine's info"):
                    host_memory = int(self.client.info()["MemTotal"])
            if limit and host_memory is not None and limit < host_memory:
                total.memory_limit_bytes = (total.memory_limit_bytes or 0) + limit
        if not total.memory_limit_bytes:
            total.memory_limit_bytes = None
        return total

    def scale(self, replicas: int) -> str:
        """Compose services only, through the compose project's own service definition (its
        volumes, ports and limits): `docker compose ... up -d --scale S=N --no-recreate S`
        with the project, files and directory its containers' labels name. Without a compose
        CLI or the project's files on this machine, fewer replicas are had by stopping and
        removing the last containers by name; more are refused (ActionFailed) with the
        command to run, since a container copied by hand would lack what the definition gives
        it."""
        if self.cfg.container:
            raise ActionFailed(
                f"service {self.name!r} is one container: scaling needs "
                "compose_project and compose_service"
            )
        containers = self.containers()
        have = len(containers)
        plan = compose_scale(self.cfg, containers[0].labels, replicas, self.base_url, compose_cli())
        if plan.argv is not None:
            self._compose(plan.argv, replicas)
        elif replicas > have:
            raise ActionFailed(
                f"service {self.name!r}: not scaled to {replicas}: {plan.missing}; a copy made "
                "here would lack the volumes, ports and limits of the compose definition. Run: "
                f"{shlex.join(plan.command)}"
            )
        else:
            try:
                for c in containers[replicas:][::-1]:
                    c.stop(timeout=int(self.cfg.timeout_seconds))
                    c.remove()
            except _DOCKER_UNREACHABLE as exc:
                raise ActionFailed(
                    f"service {self.name!r}: scaling to {replicas} failed: {exc}"
                ) from exc
        return f"{have} -> {replicas} replicas"

    def _compose(self, argv: list[str], replicas: int) -> None:
        try:
            proc = subprocess.run(
                argv,
                capture_output=True,
                text=True,
                check=False,
                stdin=subprocess.DEVNULL,
                timeout=self.cfg.timeout_seconds,
                env={**os.environ, "DOCKER_HOST": self.base_url},
            )
        except subprocess.TimeoutExpired:
            raise ActionFailed(
                f"service {self.name!r}: {shlex.join(argv)} did not finish within "
                f"{self.cfg.timeout_seconds:g} s (timeout_seconds)"
            ) from None
        except OSError as exc:  # the compose CLI went away, or cannot be executed
            raise ActionFailed(
                f"service {self.name!r}: cannot run {shlex.join(argv)}: {exc.strerror}; "
                "install Docker Compose (apt-get install docker-compose) or run it by hand"
            ) from exc
        if proc.returncode != 0:
            raise ActionFailed(
                f"service {self.name!r}: {shlex.join(argv)} exited {proc.returncode}: "
                f"{(proc.stderr or proc.stdout).strip()[-500:]}"
            )
        now = len(self.containers())
        if now != replicas:
            raise ActionFailed(
                f"service {self.name!r}: {shlex.join(argv)} left {now} containers, not "
                f"{replicas}: {(proc.stderr or proc.stdout).strip()[-500:]}"
            )

    def close(self) -> None:
        self.client.close()


def remote_docker_host(services: dict[str, ServiceTarget]) -> str | None:
    """The Docker API URL of the one remote engine (not a unix socket here) that runs every
    one of these services, whose host figures are that machine's; None when they run here,
    or on several machines (then this machine's figures are read, as for systemd)."""
    urls = {
        cfg.docker_host or os.environ.get("DOCKER_HOST", DEFAULT_DOCKER_HOST)
        if cfg.kind == "docker"
        else DEFAULT_DOCKER_HOST
        for cfg in services.values()
    }
    if len(urls) != 1:
        return None
    (url,) = urls
    return None if url.startswith("unix://") else url


def controller(name: str, cfg: ServiceTarget) -> Controller:
    """The controller of cfg.kind (docker, systemd, command) for the service `name`; close it
    after use. Raises TargetUnreachable (transient) when the Docker API client cannot be made."""
    kinds: dict[str, Callable[[str, ServiceTarget], Controller]] = {
        "docker": DockerController,
        "systemd": SystemdController,
        "command": CommandController,
    }
    return kinds[cfg.kind](name, cfg)


# --- tasks -----------------------------------------------------------------------------------


@io_task("service-status", timeout_seconds=120, retries=1)
def service_status(name: str, cfg: ServiceTarget) -> ServiceStatus:
    """How the service is now: running, state, health, restarts, OOM kills, replicas.

    Args:
        name: the [services.NAME] service's name, for messages.
        cfg: its inventory entry (kind docker, systemd or command).

    Returns:
        ServiceStatus. For kind command, running means status_command exited 0; a status
        command that cannot run or times out gives state "unknown", not an error.

    Raises:
        TargetUnreachable: the Docker API cannot be reached (transient: retried).
        TargetError: no container of that name, or none carries the compose labels.
        ActionFailed: systemctl cannot run or did not finish within timeout_seconds."""
    with closing(controller(name, cfg)) as c:
        return c.status()


@io_task("service-logs", timeout_seconds=120, retries=0)
def service_logs(name: str, cfg: ServiceTarget, lines: int = LOG_LINES) -> list[str]:
    """The service's last log lines: docker logs of each container (in name order), journalctl
    of the unit, or logs_command's output.

    Args:
        name: the [services.NAME] service's name, for messages.
        cfg: its inventory entry.
        lines: how many lines at most.

    Returns:
        Up to `lines` lines, oldest first; empty for a command service without logs_command;
        one line "(logs unavailable: why)" when they cannot be read (the Docker API does
        not answer or refuses, systemctl or logs_command fails).

    Raises:
        Nothing of its own: every failure is the "(logs unavailable)" line."""
    try:
        with closing(controller(name, cfg)) as c:
            return c.logs(lines)
    except (ActionFailed, TargetError) as exc:
        return [f"(logs unavailable: {exc})"]


@io_task("service-stats", timeout_seconds=120, retries=1)
def service_stats(name: str, cfg: ServiceTarget) -> ServiceStats | None:
    """The service's CPU and memory now.

    Args:
        name: the [services.NAME] service's name, for messages.
        cfg: its inventory entry.

    Returns:
        ServiceStats: for docker, CPU percent and memory bytes summed over its running
        containers, and their memory limit when they have one below the engine's memory;
        for systemd, the main process's, from /proc over 0.5 s. None for a command service
        or a unit without a main process.

    Raises:
        TargetUnreachable: the Docker API cannot be reached, or stops answering while the
            stats or the engine's info are read (transient: retried).
        TargetError: no container of that name, none carries the compose labels, or the
            engine refuses to read the stats (the container was removed meanwhile).
        ActionFailed: systemctl cannot run, exited non-zero or did not finish within
            timeout_seconds."""
    with closing(controller(name, cfg)) as c:
        return c.stats()


@io_task("restart-service", timeout_seconds=3600, retries=0)
def restart_service(name: str, cfg: ServiceTarget) -> str:
    """Restart the service: each of its containers (docker restart, giving each up to
    timeout_seconds to stop), `systemctl restart UNIT`, or restart_command (start_command
    instead when the status command says it is down and there is one).

    Args:
        name: the [services.NAME] service's name, for messages.
        cfg: its inventory entry.

    Returns:
        What was done, for the action's detail ("restarted api-1, api-2", "started").

    Raises:
        ActionFailed: Docker refused the restart, or the command exited non-zero, could not
            run, or did not finish within timeout_seconds.
        TargetUnreachable: the Docker API cannot be reached (transient: retried).
        TargetError: no container of that name, or none carries the compose labels."""
    with closing(controller(name, cfg)) as c:
        return c.restart()


@io_task("scale-service", timeout_seconds=3600, retries=0)
def scale_service(name: str, cfg: ServiceTarget, replicas: int) -> str:
    """Scale a compose service to `replicas` containers through docker compose and the
    project's own service definition (its volumes, ports and limits). Without a compose CLI or
    the project's files on this machine, fewer replicas are had by stopping and removing the
    last containers by name, and more are refused.

    Args:
        name: the [services.NAME] service's name, for messages.
        cfg: its inventory entry (kind docker, compose_project and compose_service).
        replicas: how many containers it should have.

    Returns:
        "HAVE -> WANT replicas", for the action's detail.

    Raises:
        ActionFailed: it is not a compose service (one container, systemd, command); more
            replicas without compose here (the message holds the command to run); compose
            exited non-zero, timed out or left another number of containers; stopping or
            removing a container failed.
        TargetUnreachable: the Docker API cannot be reached (transient: retried).
        TargetError: no container of that name, or none carries the compose labels."""
    with closing(controller(name, cfg)) as c:
        return c.scale(replicas)
