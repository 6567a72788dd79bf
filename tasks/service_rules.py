"""Pure decisions for the service runbooks: postgres-down, service-health, resource-pressure
(seeds 001, 002 s2 and s4, 003, 004 s1, s3 and s10, 000 s7)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from tasks.models import Action, ActionStatus, Finding, Params, ServiceRef, Severity

if TYPE_CHECKING:
    from tasks.host import DiskUsage, HostStats
    from tasks.http import HttpProbe
    from tasks.postgres import Probe
    from tasks.services import ServiceStats, ServiceStatus
    from tasks.settings import PostgresTarget, ServiceTarget, Settings

# The kinds of action each runbook plans (the flow and deployments.catalog read them from here).
# enable_/disable_maintenance: the pair around the mending when the target has a
# maintenance_service (tasks.maintenance_rules).
PostgresDownAction = Literal["restart_service", "enable_maintenance", "disable_maintenance"]
ServiceHealthAction = Literal["restart_service", "handoff"]
ResourceAction = Literal["restart_service"]
# The inventory sections a failing dependency can be handed over for, and their runbooks.
DependencyKind = Literal["postgres", "redis"]
HANDOFF_RUNBOOKS: dict[DependencyKind, str] = {
    "postgres": "postgres-down",
    "redis": "redis-health",
}


class Handoff(BaseModel):
    """A failing dependency handed to its own runbook: [postgres.NAME] to postgres-down,
    [redis.NAME] to redis-health."""

    model_config = ConfigDict(frozen=True)

    section: DependencyKind
    target: str


# postgres-down's restart names its service, or nothing when none is configured (skipped).
PostgresDownStep = Action[PostgresDownAction, ServiceRef | None]
ServiceHealthStep = Action[ServiceHealthAction, Handoff | ServiceRef]
ResourceStep = Action[ResourceAction, ServiceRef]

DISK_WARNING, DISK_CRITICAL = 80.0, 90.0  # seed 002's monitoring thresholds
# Words of a component's name that say which inventory kind it stands for, matched as whole
# words ("primaryDb", "Database connections", "redis-cache"), never inside another word
# ("mysql", "mongodb" and "upgrade" stand for no PostgreSQL).
GUESSES = {
    "postgres": {"db", "database", "postgres", "postgresql", "pg", "sql"},
    "redis": {"redis", "cache", "queue", "queues", "session", "sessions"},
}

# Health bodies. Only states are components. A state is recognised by its value (`ok`, `UP`,
# `pass`, `Healthy`, `green`...; `warn`, `degraded`...; `error`, `DOWN`, `fail`,
# `critical`...), in the layouts health endpoints use: top-level keys (`{"status": "ok",
# "database": "error"}`, Grafana's `{"commit": ..., "database": "ok", "version": ...}`),
# objects with their own `status` (Spring Boot actuator 1.x-3.x, under `components` or
# `details`), the nesting keys `checks`, `components`, `details`, `entries` (ASP.NET Core),
# `dependencies`, `services`, the IETF health-check draft (draft-inadarei-api-health-check:
# `status` pass/warn/fail, `checks` whose values are arrays of objects with a `status`) and
# MicroProfile Health (`checks` as an array of `{"name", "status"}`), NestJS Terminus
# (`details`, whose `info` and `error` repeat it), health-go (`failures`: name -> error
# text), Consul (a list of checks) and "state: detail" texts (django-health-check's
# "unavailable: ..."). Build information, timestamps, numbers and free text are not states
# and are ignored, whatever they say. The vocabularies of Spring Boot (UP, DOWN,
# OUT_OF_SERVICE, UNKNOWN), the IETF draft (pass, warn, fail), ASP.NET Core (Healthy,
# Degraded, Unhealthy), Consul (passing, warning, critical), Elasticsearch (green, yellow,
# red), Grafana (ok, failing), Terminus (ok, error, shutting_down), health-go (OK, Partially
# Available, Unavailable), django-health-check (working) and common apps.
STATES = {
    Severity.ok: {
        "ok", "up", "pass", "passed", "passing", "healthy", "ready", "connected", "green",
        "available", "online", "running", "success", "good", "alive", "serving", "working",
    },
    Severity.warning: {
        "warn", "warning", "degraded", "yellow", "unknown", "partial", "partially_healthy",
        "partially_available", "maintenance",
    },
    Severity.critical: {
        "error", "errored", "down", "fail", "failed", "failing", "failure", "critical",
        "unhealthy", "red", "out_of_service", "unavailable", "offline", "disconnected",
        "unreachable", "timeout", "not_serving", "not_ok", "ko", "dead", "shutting_down",
        "unknown_error", "unexpected_result",
    },
}  # fmt: skip
# Keys whose value is the state of the object holding them; booleans only under a key that
# names the good state (`{"healthy": false}`), as `{"maintenance": false}` is no state at all.
STATE_KEYS = ("status", "state", "health")
BOOLEAN_KEYS = {
    "ok", "up", "healthy", "alive", "ready", "live", "connected", "available", "reachable",
}  # fmt: skip
NAME_KEYS = ("name", "checkid", "componentid", "id")  # what a check in a list is called
# Keys whose text is build information, a time or a message, never a component's state,
# even when it happens to look like one (`"version": "unknown"`, `"message": "ok"`).
METADATA = {
    "version", "commit", "build", "revision", "branch", "release", "releaseid", "serviceid",
    "timestamp", "time", "date", "uptime", "started", "startedat", "hostname", "host", "name",
    "id", "componentid", "componenttype", "description", "output", "notes", "message",
    "messages", "links", "observedvalue", "observedunit", "duration", "totalduration",
    "tags", "data", "info", "environment", "env", "region", "node", "instance", "cluster_name",
}  # fmt: skip
NESTED = ("checks", "components", "details", "entries", "dependencies", "services")
FAILURES = ("failures", "errors")  # name -> why it fails (health-go)
MAX_DEPTH = 4


def severity_of(state: str) -> Severity | None:
    """The severity a health state stands for, or None when the value is not a state; in
    "unavailable: connection refused" the state is the part before the colon."""
    word = state.split(":", 1)[0].strip().lower().replace("-", "_").replace(" ", "_")
    return next((sev for sev, words in STATES.items() if word in words), None)


def _worst(states: list[str]) -> str | None:
    order = [Severity.ok, Severity.warning, Severity.critical]
    known = [(order.index(sev), s) for s in states if (sev := severity_of(s)) is not None]
    return max(known)[1] if known else None


def state_of(value: Any) -> str | None:
    """The state a health-body value stands for: a state word, an object's `status`/`state`/
    `health` (or a boolean `healthy`/`ok`/`up`... key, as "ok" or "error"), or the worst of an
    IETF draft's array of check objects; None when the value is no state."""
    if isinstance(value, str):
        return value if severity_of(value) is not None else None
    if isinstance(value, list):
        return _worst([s for item in value if isinstance(item, dict) and (s := state_of(item))])
    if not isinstance(value, dict):
        return None
    for key, inner in value.items():
        if key.lower() in STATE_KEYS and isinstance(inner, str) and severity_of(inner):
            return inner
    for key, inner in value.items():
        if key.lower() in BOOLEAN_KEYS and isinstance(inner, bool):
            return "ok" if inner else "error"
    return None


def _walk(body: dict[str, Any], prefix: str, depth: int, found: dict[str, str]) -> None:
    for key, value in body.items():
        low = key.lower()
        if low in STATE_KEYS or (low in METADATA and isinstance(value, str)):
            continue
        if low in NESTED and isinstance(value, list):  # MicroProfile: [{"name", "status"}]
            _listed(value, prefix, key, found)
        elif low in FAILURES and isinstance(value, dict):
            found.update({f"{prefix}{name}": f"fail: {why}" for name, why in value.items()})
        elif low in NESTED and isinstance(value, dict) and depth < MAX_DEPTH:
            _walk(value, prefix, depth + 1, found)
        elif (state := state_of(value)) is not None:
            found[f"{prefix}{key}"] = state
        elif isinstance(value, dict) and depth < MAX_DEPTH:  # a group: {"databases": {...}}
            _walk(value, f"{prefix}{key}.", depth + 1, found)


def _listed(items: list[Any], prefix: str, default: str, found: dict[str, str]) -> None:
    for item in items:
        if isinstance(item, dict) and (state := state_of(item)) is not None:
            named = {k.lower(): v for k, v in item.items() if isinstance(v, str)}
            name = next((named[k] for k in NAME_KEYS if k in named), default)
            found[f"{prefix}{name}"] = state


def components(body: Any) -> dict[str, str]:
    """Component name -> state as the body wrote it, for the states only (see the module's
    docstring for the layouts); a component with its own state is not looked into further
    (Spring Boot's `details` under it are figures, not components)."""
    found: dict[str, str] = {}
    if isinstance(body, list):  # Consul: [{"Name", "CheckID", "Status": "passing"}, ...]
        _listed(body, "", "check", found)
    elif isinstance(body, dict):
        if isinstance(body.get("details"), dict):  # Terminus: info and error repeat details
            body = {k: v for k, v in body.items() if k not in ("info", "error")}
        _walk(body, "", 0, found)
    return found


class PostgresDownParams(Params):
    ready_timeout_seconds: float = Field(
        120,
        gt=0,
        le=3600,
        description="seconds to wait for SELECT 1 after a restart; over 0, at most 3600",
    )


class ServiceHealthParams(Params):
    run_only = frozenset({"service"})
    service: str | None = Field(None, description="one [services.NAME]; default all")
    ready_timeout_seconds: float = Field(
        60,
        gt=0,
        le=3600,
        description="seconds to wait for health after a restart; over 0, at most 3600",
    )


class ResourceParams(Params):
    """memory_percent (of its memory limit, or of the host's memory) and cpu_percent are a
    service's, and may be set per service under its `thresholds`; the host has its own:
    host_memory_percent of its memory in use, host_load_per_cpu for the 1-minute load average
    divided by its CPUs."""

    run_only = frozenset({"host_memory_percent", "host_load_per_cpu"})

    memory_percent: float = Field(
        90,
        gt=0,
        le=100,
        description="service memory, % of its limit or the host's, critical; over 0, at most 100",
    )
    cpu_percent: float = Field(
        90,
        gt=0,
        le=10_000,
        description="service CPU, % of one CPU (docker stats), a warning; over 0, at most 10000",
    )
    host_memory_percent: float = Field(
        90,
        gt=0,
        le=100,
        description="host memory in use, %, for critical (seed 002: 90); over 0, at most 100",
    )
    host_load_per_cpu: float = Field(
        1.5,
        gt=0,
        le=1000,
        description="1-minute load average per CPU for a warning; over 0, at most 1000",
    )


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
    words = set(re.findall(r"[a-z0-9]+", re.sub(r"([a-z0-9])([A-Z])", r"\1 \2", component).lower()))
    for kind, names in GUESSES.items():
        targets = settings.targets(kind)
        if words & names and len(targets) == 1:
            return f"{kind}.{next(iter(targets))}"
    return None


def probe_findings(name: str, probe: HttpProbe) -> list[Finding]:
    """The probe's answer (critical when not 2xx or its body's own status fails, warning when
    that status is degraded) and one finding per component state of its body (see
    tasks.http for the states and layouts recognised; anything else in the body is ignored)."""
    what = f"{probe.url}: " + (
        f"HTTP {probe.status_code} in {probe.ms:.0f} ms"
        if probe.status_code is not None
        else probe.error
    )
    if probe.status:
        what += f", status {probe.status}"
    if probe.in_maintenance:
        what += (
            f"; in maintenance mode, not restarted: once it may serve again, runbook run "
            f"maintenance-mode --target {name} --set enable=false --apply"
        )
    found = [
        Finding(
            check="http",
            target=name,
            severity=probe.severity,
            observed=probe.status_code,
            threshold="2xx",
            message=what + (f"; {probe.body_note}" if probe.body_note else ""),
        )
    ]
    for component, state in sorted(probe.components.items()):
        found.append(
            Finding(
                check=f"component.{component}",
                target=name,
                severity=severity_of(state) or Severity.ok,
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
    memory, load_1m = host.memory_percent, host.load_1m
    if memory is None or load_1m is None:
        return _unknown_host_findings(host, p)
    load = load_1m / host.cpus
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
            observed=round(load_1m, 2),
            threshold=p.host_load_per_cpu * host.cpus,
            message=f"load {load_1m:.2f} on {host.cpus} CPUs",
        ),
    ]


def _unknown_host_findings(host: HostStats, p: ResourceParams) -> list[Finding]:
    """What the source did not give is said to be unknown, not judged."""
    total = f"{host.memory_total / 2**30:.1f} GiB"
    return [
        Finding(
            check="host_memory",
            target="host",
            severity=Severity.ok,
            observed=None,
            threshold=p.host_memory_percent,
            message=f"unknown: {host.machine} reports its total ({total}), not what is in use",
        ),
        Finding(
            check="host_load",
            target="host",
            severity=Severity.ok,
            observed=None,
            threshold=p.host_load_per_cpu * host.cpus,
            message=f"unknown: {host.machine} does not report its load ({host.cpus} CPUs)",
        ),
    ]


# --- postgres-down -------------------------------------------------------------------------


def reachability(name: str, probe: Probe) -> Finding:
    """ok with the time SELECT 1 took; critical with why not, and, when the server is up but
    not accepting connections (starting up, recovering), why it is not restarted."""
    if probe.ok:
        return Finding(
            check="reachable",
            target=name,
            severity=Severity.ok,
            observed=True,
            message=f"SELECT 1 answered in {probe.ms:.0f} ms",
        )
    return Finding(
        check="reachable",
        target=name,
        severity=Severity.critical,
        observed=False,
        message=probe.error
        + (
            "; it is up but not accepting connections (starting up, recovering after a crash, "
            "or a standby with hot_standby off): not restarted, as that would begin its "
            "recovery again; follow its log"
            if probe.recovering
            else ""
        ),
    )


def logs_finding(name: str, service: str, logs: list[str]) -> Finding:
    """The last log lines of the service, as an ok finding the report shows in full."""
    return Finding(
        check="logs",
        target=name,
        severity=Severity.ok,
        observed=logs,
        message=f"last {len(logs)} log lines of {service!r}",
    )


def plan_postgres_restart(
    name: str, probe: Probe, pg: PostgresTarget, has_service: bool, p: PostgresDownParams
) -> list[PostgresDownStep]:
    """A restart, only when the server is down: not when it refused the credentials, nor
    while it is starting up or recovering. Skipped, saying what to configure, when the target
    has no [services.NAME] to restart it through (has_service False)."""
    if probe.ok or not probe.transient or probe.recovering:
        return []
    restart: PostgresDownStep = Action(
        kind="restart_service",
        target=name,
        destructive=True,
        description=f"restart {pg.service or 'its service'} and wait up to "
        f"{p.ready_timeout_seconds:g} s for SELECT 1",
        args=ServiceRef(service=pg.service) if pg.service else None,
        touches=f"services.{pg.service}" if pg.service else None,
    )
    if not has_service:
        restart.status = ActionStatus.skipped
        restart.detail = (
            f"no service is configured for postgres target {name!r}: add "
            f'service = "NAME" and a [services.NAME] section'
        )
    return [restart]


# --- service-health ------------------------------------------------------------------------


def http_findings(probes: Mapping[str, list[HttpProbe]]) -> list[Finding]:
    """The findings of every service's probes (probe_findings), service by service."""
    return [
        f for name, found in probes.items() for probe in found for f in probe_findings(name, probe)
    ]


def plan_services(
    probes: Mapping[str, list[HttpProbe]],
    services: Mapping[str, ServiceTarget],
    settings: Settings,
    per: Mapping[str, ServiceHealthParams],
) -> list[ServiceHealthStep]:
    """Per service: a hand-off of each failing dependency it names (dependency_for) to that
    dependency's runbook; only a service failing with no dependency to blame gets a restart,
    waited for up to its own ready_timeout_seconds (per: parameters by service). An app that
    answers it is in maintenance (HttpProbe.in_maintenance) was put there on purpose: never
    restarted."""
    actions: list[ServiceHealthStep] = []
    for name, found in probes.items():
        failing = {c: s for probe in found for c, s in probe.failing.items()}
        refs = {ref for c in failing if (ref := dependency_for(c, services[name], settings))}
        for ref in sorted(refs):
            section, dep = ref.split(".", 1)
            handoff = Handoff.model_validate({"section": section, "target": dep})
            actions.append(
                Action(
                    kind="handoff",
                    target=name,
                    destructive=False,
                    description=f"{', '.join(failing)} failing: hand over to "
                    f"{HANDOFF_RUNBOOKS[handoff.section]} on {dep}",
                    args=handoff,
                )
            )
        if not refs and any(not probe.ok and not probe.in_maintenance for probe in found):
            actions.append(
                Action(
                    kind="restart_service",
                    target=name,
                    destructive=True,
                    description=f"restart {name} and wait up to "
                    f"{per[name].ready_timeout_seconds:g} s for it to answer",
                    args=ServiceRef(service=name),
                    touches=f"services.{name}",
                )
            )
    return actions


# --- resource-pressure ---------------------------------------------------------------------


def by_urgency(findings: list[Finding]) -> list[Finding]:
    """Top consumers first, as the report is read from the top at 3 a.m.: problems before
    ok, memory before other checks, then the largest observed figure first."""
    return sorted(
        findings,
        key=lambda f: (
            f.severity is Severity.ok,
            f.check != "memory",
            -(f.observed if isinstance(f.observed, float) else 0),
        ),
    )


def plan_resource_restarts(
    findings: list[Finding], stats: Mapping[str, ServiceStats | None]
) -> list[ResourceStep]:
    """A restart of each service over its own memory limit; never one merely large on the
    host (no memory limit: a restart would not bring it under anything)."""
    return [
        Action(
            kind="restart_service",
            target=f.target,
            destructive=True,
            description=f"restart {f.target}: {f.message}",
            args=ServiceRef(service=f.target),
            touches=f"services.{f.target}",
        )
        for f in findings
        if f.check == "memory"
        and f.severity is not Severity.ok
        and (s := stats.get(f.target)) is not None
        and s.memory_limit_bytes
    ]
