"""Pure decisions for the service runbooks: postgres-down, service-health, resource-pressure
(seeds 001, 002 s2 and s4, 003, 004 s1, s3 and s10, 000 s7)."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from pydantic import Field

from tasks.models import Finding, Params, Severity

if TYPE_CHECKING:
    from tasks.host import DiskUsage, HostStats
    from tasks.http import HttpProbe
    from tasks.services import ServiceStats, ServiceStatus
    from tasks.settings import ServiceTarget, Settings

DISK_WARNING, DISK_CRITICAL = 80.0, 90.0  # seed 002's monitoring thresholds
GUESSES = {"postgres": r"db|database|postgres|pg|sql", "redis": r"redis|cache|queue|session"}


class PostgresDownParams(Params):
    ready_timeout_seconds: float = Field(120, gt=0, le=3600)


class ServiceHealthParams(Params):
    service: str | None = Field(None, description="one [services.NAME]; default all")
    ready_timeout_seconds: float = Field(60, gt=0, le=3600)


class ResourceParams(Params):
    """memory_percent (of its memory limit, or of the host's memory) and cpu_percent are a
    service's, and may be set per service under its `thresholds`; the host has its own:
    host_memory_percent of its memory in use, host_load_per_cpu for the 1-minute load average
    divided by its CPUs."""

    memory_percent: float = Field(90, gt=0, le=100)
    cpu_percent: float = Field(90, gt=0, le=10_000)
    host_memory_percent: float = Field(90, gt=0, le=100)
    host_load_per_cpu: float = Field(1.5, gt=0, le=1000)


# What a [services.NAME.thresholds] may set: the parameters that are about one service.
THRESHOLD_NAMES = frozenset({"ready_timeout_seconds", "memory_percent", "cpu_percent"})


def disk_finding(name: str, disk: DiskUsage) -> Finding:
    used = disk.used_percent
    severity = (
        Severity.critical
        if used >= DISK_CRITICAL
        else Severity.warning
        if used >= DISK_WARNING
        else Severity.ok
    )
    return Finding(
        check="disk",
        target=name,
        severity=severity,
        observed=round(used, 1),
        threshold=DISK_WARNING,
        message=f"{disk.path}: {used:.0f}% used, {disk.free / 2**30:.1f} GiB free",
    )


def status_finding(name: str, service: str, status: ServiceStatus) -> Finding:
    bad = (
        not status.running
        or status.oom_killed
        or (status.health not in (None, "healthy", "starting"))
    )
    extra = (
        (f"; health {status.health}" if status.health else "")
        + ("; OOM-killed" if status.oom_killed else "")
        + (f"; {status.restarts} restarts" if status.restarts else "")
    )
    return Finding(
        check="service",
        target=name,
        severity=Severity.critical if bad else Severity.ok,
        observed=status.state,
        message=f"service {service!r}: {status.state}{extra}"
        + (f"; {status.detail}" if status.detail and bad else ""),
    )


def dependency_for(component: str, svc: ServiceTarget, settings: Settings) -> str | None:
    """The inventory target (postgres.NAME or redis.NAME) a failing component stands for."""
    if component in svc.dependencies:
        return svc.dependencies[component]
    for kind, pattern in GUESSES.items():
        targets = settings.targets(kind)
        if re.search(pattern, component, re.IGNORECASE) and len(targets) == 1:
            return f"{kind}.{next(iter(targets))}"
    return None


def probe_findings(name: str, probe: HttpProbe) -> list[Finding]:
    what = f"{probe.url}: " + (
        f"HTTP {probe.status_code} in {probe.ms:.0f} ms"
        if probe.status_code is not None
        else probe.error
    )
    found = [
        Finding(
            check="http",
            target=name,
            severity=Severity.ok if probe.ok else Severity.critical,
            observed=probe.status_code,
            threshold="2xx",
            message=what + (f"; {probe.body_note}" if probe.body_note else ""),
        )
    ]
    for component, state in sorted(probe.components.items()):
        failing = component in probe.failing
        found.append(
            Finding(
                check=f"component.{component}",
                target=name,
                severity=Severity.critical if failing else Severity.ok,
                observed=state,
                message=f"{probe.url} reports {component}: {state}",
            )
        )
    return found


def resource_findings(
    name: str, status: ServiceStatus, stats: ServiceStats | None, host: HostStats, p: ResourceParams
) -> list[Finding]:
    found: list[Finding] = []
    if stats is None or stats.memory_bytes is None:
        return [
            Finding(
                check="resources",
                target=name,
                severity=Severity.ok,
                message=f"service {name!r}: no resource figures from its controller",
            )
        ]
    memory = stats.memory_percent(host.memory_total) or 0.0
    limit = (
        f"its limit {stats.memory_limit_bytes / 2**20:.0f} MiB"
        if stats.memory_limit_bytes
        else "the host's memory"
    )
    found.append(
        Finding(
            check="memory",
            target=name,
            severity=Severity.critical if memory >= p.memory_percent else Severity.ok,
            observed=round(memory, 1),
            threshold=p.memory_percent,
            message=f"{stats.memory_bytes / 2**20:.1f} MiB, {memory:.0f}% of {limit}",
        )
    )
    cpu = stats.cpu_percent or 0.0
    found.append(
        Finding(
            check="cpu",
            target=name,
            severity=Severity.warning if cpu >= p.cpu_percent else Severity.ok,
            observed=round(cpu, 1),
            threshold=p.cpu_percent,
            message=f"{cpu:.0f}% CPU",
        )
    )
    if status.oom_killed or status.restarts:
        found.append(
            Finding(
                check="restarts",
                target=name,
                severity=Severity.warning,
                observed=status.restarts,
                message=("OOM-killed; " if status.oom_killed else "")
                + f"{status.restarts} restarts",
            )
        )
    return found


def host_findings(host: HostStats, p: ResourceParams) -> list[Finding]:
    memory, load = host.memory_percent, host.load_1m / host.cpus
    return [
        Finding(
            check="host_memory",
            target="host",
            severity=Severity.critical if memory >= p.host_memory_percent else Severity.ok,
            observed=round(memory, 1),
            threshold=p.host_memory_percent,
            message=f"{memory:.0f}% of {host.memory_total / 2**30:.1f} GiB in use",
        ),
        Finding(
            check="host_load",
            target="host",
            severity=Severity.warning if load >= p.host_load_per_cpu else Severity.ok,
            observed=round(host.load_1m, 2),
            threshold=p.host_load_per_cpu * host.cpus,
            message=f"load {host.load_1m:.2f} on {host.cpus} CPUs",
        ),
    ]
