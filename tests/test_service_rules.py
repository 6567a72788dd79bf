"""Pure decisions of the service runbooks (tasks.service_rules): postgres-down, service-health,
resource-pressure. No server needed."""

from __future__ import annotations

import pytest

from flows.service_health import HANDOFF
from tasks.host import HostStats
from tasks.http import HttpProbe
from tasks.models import ActionStatus, Finding, ServiceRef, Severity
from tasks.postgres import Probe
from tasks.service_rules import (
    HANDOFF_RUNBOOKS,
    Handoff,
    PostgresDownParams,
    ResourceParams,
    ServiceHealthParams,
    by_urgency,
    host_findings,
    http_findings,
    logs_finding,
    plan_postgres_restart,
    plan_resource_restarts,
    plan_services,
    reachability,
    resource_findings,
)
from tasks.services import ServiceStats, ServiceStatus
from tasks.settings import PostgresTarget, Settings

PG = PostgresTarget.model_validate({"dsn": "postgresql://app@127.0.0.1:5432/app", "service": "db"})
GiB = 2**30


def test_reachability_says_why_a_recovering_server_is_left_alone() -> None:
    assert reachability("main", Probe(ok=True, ms=3)).severity is Severity.ok
    down = reachability("main", Probe(ok=False, error="connection refused", recovering=True))
    assert down.severity is Severity.critical and "not restarted" in down.message
    assert "not restarted" not in reachability("main", Probe(ok=False, error="x")).message


@pytest.mark.parametrize(
    ("probe", "planned"),
    [
        (Probe(ok=True), False),
        (Probe(ok=False, transient=False), False),  # credentials: a restart would not help
        (Probe(ok=False, recovering=True), False),  # starting up or recovering
        (Probe(ok=False), True),
    ],
)
def test_postgres_restart_only_when_it_is_down(probe: Probe, planned: bool) -> None:
    actions = plan_postgres_restart("main", probe, PG, True, PostgresDownParams())
    assert [(a.kind, a.args, a.status) for a in actions] == (
        [("restart_service", ServiceRef(service="db"), ActionStatus.planned)] if planned else []
    )


def test_postgres_restart_without_a_service_is_skipped_saying_what_to_add() -> None:
    bare = PostgresTarget.model_validate({"dsn": "postgresql://app@127.0.0.1:5432/app"})
    [restart] = plan_postgres_restart("main", Probe(ok=False), bare, False, PostgresDownParams())
    assert restart.args is None and restart.status is ActionStatus.skipped
    assert "[services.NAME]" in restart.detail
    assert logs_finding("main", "db", ["a", "b"]).message == "last 2 log lines of 'db'"


def settings() -> Settings:
    return Settings(
        postgres={"main": {"dsn": "postgresql://app@127.0.0.1:5432/app"}},
        services={
            "api": {
                "kind": "command",
                "status_command": ["true"],
                "restart_command": ["true"],
                "health_url": "http://127.0.0.1:1/health",
            }
        },
    )


def probe(ok: bool, components: dict[str, str] | None = None) -> HttpProbe:
    return HttpProbe(
        url="http://127.0.0.1:1/health",
        ok=ok,
        status_code=200 if ok else 503,
        ms=5,
        components=components or {},
    )


def plan(probes: dict[str, list[HttpProbe]], config: Settings) -> list[tuple[str, object]]:
    per = {name: ServiceHealthParams() for name in probes}
    return [(a.kind, a.args) for a in plan_services(probes, config.services, config, per)]


def test_a_failing_dependency_is_handed_over_and_the_app_not_restarted() -> None:
    config = settings()
    probes = {"api": [probe(False, {"database": "down", "cache": "ok"})]}
    assert plan(probes, config) == [("handoff", Handoff(section="postgres", target="main"))]
    found = http_findings(probes)
    assert [(f.check, f.severity) for f in found] == [
        ("http", Severity.critical),
        ("component.cache", Severity.ok),
        ("component.database", Severity.critical),
    ]


def test_an_app_failing_on_its_own_gets_a_restart_and_a_healthy_one_nothing() -> None:
    config = settings()
    assert plan({"api": [probe(False)]}, config) == [("restart_service", ServiceRef(service="api"))]
    assert plan({"api": [probe(True)]}, config) == []
    assert plan({}, config) == [] and http_findings({}) == []


def test_handoffs_name_the_runbooks_the_flow_starts() -> None:
    assert {k: flow.name for k, flow in HANDOFF.items()} == HANDOFF_RUNBOOKS


HOST = HostStats(memory_total=8 * GiB, memory_available=4 * GiB, load_1m=1.0, cpus=2)
RUNNING = ServiceStatus(running=True, state="running")


@pytest.mark.parametrize(("used_mib", "expected"), [(899, Severity.ok), (900, Severity.critical)])
def test_memory_at_its_limit_boundary(used_mib: int, expected: Severity) -> None:
    stats = ServiceStats(
        cpu_percent=1, memory_bytes=used_mib * 2**20, memory_limit_bytes=1000 * 2**20
    )
    found = resource_findings("api", RUNNING, stats, HOST, ResourceParams())
    assert next(f.severity for f in found if f.check == "memory") is expected


def test_restart_only_what_is_over_its_own_limit() -> None:
    p = ResourceParams()
    limited = ServiceStats(cpu_percent=1, memory_bytes=950 * 2**20, memory_limit_bytes=1000 * 2**20)
    unlimited = ServiceStats(cpu_percent=1, memory_bytes=int(7.6 * GiB))
    stats: dict[str, ServiceStats | None] = {"api": limited, "big": unlimited, "gone": None}
    found = [f for name, s in stats.items() for f in resource_findings(name, RUNNING, s, HOST, p)]
    assert {f.target for f in found if f.severity is Severity.critical} == {"api", "big"}
    restarts = plan_resource_restarts(found, stats)
    assert [(a.kind, a.args) for a in restarts] == [("restart_service", ServiceRef(service="api"))]
    assert plan_resource_restarts([], stats) == []


def test_host_thresholds_and_urgency_order() -> None:
    busy = HostStats(memory_total=10 * GiB, memory_available=1 * GiB, load_1m=3.0, cpus=2)
    found = host_findings(busy, ResourceParams())
    assert [(f.check, f.severity) for f in found] == [
        ("host_memory", Severity.critical),
        ("host_load", Severity.warning),
    ]
    ok = Finding(check="cpu", target="a", severity=Severity.ok, observed=99.0, message="")
    small = Finding(
        check="memory", target="b", severity=Severity.critical, observed=91.0, message=""
    )
    large = Finding(
        check="memory", target="c", severity=Severity.critical, observed=99.0, message=""
    )
    assert by_urgency([ok, small, large]) == [large, small, ok]
