"""service-health against an HTTP app on loopback whose health endpoint really checks a real
PostgreSQL; resource-pressure on the host's real figures."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from deployments.localpg import LocalPostgres
from deployments.sandbox import HealthApp
from flows.resource_pressure import resource_pressure
from flows.service_health import service_health
from tasks.limits import mutating_limit_name
from tasks.models import ActionStatus, RunStatus, Severity
from tasks.service_rules import dependency_for
from tasks.services import proc_stats
from tasks.settings import load_settings
from tests.test_limits import held_elsewhere, read_limit, short_wait_for

pytestmark = pytest.mark.usefixtures("prefect_api")


class App(HealthApp):
    """The sandbox's health app, plus: 500 while `broken` exists (the app itself is stuck),
    and `mode` = "text" for a body that says JSON but is not."""

    def __init__(self, dsn: str, tmp: Path) -> None:
        self.broken, self.mode = tmp / "broken", "json"
        super().__init__(dsn)

    def answer(self) -> tuple[int, object]:
        if self.broken.exists():
            return 500, {"status": "error"}
        if self.mode == "text":
            return 200, "OK"
        return super().answer()


@pytest.fixture
def stack(tmp_path: Path, inventory: Any) -> Iterator[tuple[LocalPostgres, App]]:
    pg = LocalPostgres().start()
    app = App(pg.dsn, tmp_path)
    inventory(
        f'[postgres.main]\ndsn = "{pg.dsn}"\nservice = "db"\n'
        f'[services.db]\nkind = "command"\nstatus_command = {json.dumps(pg.ctl_argv("status"))}\n'
        f"start_command = {json.dumps(pg.ctl_argv('start'))}\n"
        f"restart_command = {json.dumps(pg.ctl_argv('restart'))}\n"
        f'[services.api]\nkind = "command"\nhealth_url = "{app.url}"\ntimeout_seconds = 5\n'
        f'status_command = ["true"]\nrestart_command = ["rm", "-f", "{app.broken}"]\n'
    )
    yield pg, app
    app.close()
    pg.stop()


def test_healthy_app(stack: Any) -> None:
    report = service_health()
    assert report.status is RunStatus.healthy
    assert {f.check for f in report.findings} == {"http", "component.database", "component.redis"}


def test_database_error_goes_to_postgres_down_not_an_app_restart(stack: Any) -> None:
    pg, _ = stack
    pg.stop(remove=False)
    plan = service_health()
    assert plan.status is RunStatus.unhealthy
    db = next(f for f in plan.findings if f.check == "component.database")
    assert db.severity is Severity.critical and db.observed == "error"
    assert [a.kind for a in plan.actions] == ["handoff"]  # no restart of the app
    assert "postgres-down on main: unhealthy" in plan.actions[0].detail  # a dry run hand-off
    assert not pg.is_running()

    report = service_health(dry_run=False, approval="auto")
    assert report.actions[0].detail == "postgres-down on main: fixed"
    assert report.status is RunStatus.fixed
    assert pg.is_running()


def test_stuck_app_gets_a_gated_restart(stack: Any) -> None:
    _, app = stack
    app.broken.touch()
    assert service_health(dry_run=False, approval="ask").actions[0].status is ActionStatus.skipped
    assert app.broken.exists()
    report = service_health(dry_run=False, approval="auto")
    assert report.actions[0].kind == "restart_service"
    assert report.actions[0].detail.endswith("answering again")
    assert report.status is RunStatus.fixed


def test_an_app_in_maintenance_is_reported_and_never_restarted(stack: Any) -> None:
    _, app = stack
    app.maintenance = True  # as maintenance-mode or postgres-down's pair leaves it
    report = service_health(dry_run=False, approval="auto")
    http = next(f for f in report.findings if f.check == "http")
    assert http.severity is Severity.warning and http.observed == 503
    assert "in maintenance mode, not restarted" in http.message
    assert report.actions == [] and report.status is RunStatus.unhealthy
    assert app.maintenance


def test_a_third_restart_within_the_hour_is_refused_by_the_rate_limit(stack: Any) -> None:
    _, app = stack
    for _ in range(2):
        app.broken.touch()
        assert service_health(dry_run=False, approval="auto").status is RunStatus.fixed
    app.broken.touch()
    report = service_health(dry_run=False, approval="auto")
    [restart] = report.actions
    assert restart.status is ActionStatus.skipped
    assert "over the rate limit runbook-rate-restart_service-api (2 per 3600 s)" in restart.detail
    assert "next slot frees in" in restart.detail
    assert report.status is RunStatus.unhealthy and app.broken.exists()


def test_a_restart_waits_for_no_run_but_its_own_on_the_service(
    stack: Any, prefect_api: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """service-health's target is "all", but its restart of api changes services.api: a run
    holding that target's one-mutating-run lock (another process, as a maintenance-mode run
    on api) makes the restart skip saying so, and the app stays broken."""
    _, app = stack
    short_wait_for(monkeypatch, "services.api")
    with held_elsewhere(prefect_api, tmp_path, "services.api"):
        app.broken.touch()
        report = service_health(dry_run=False, approval="auto")
    [restart] = report.actions
    assert restart.kind == "restart_service" and restart.status is ActionStatus.skipped
    assert "another run is changing services.api" in restart.detail
    assert mutating_limit_name("services.api") in restart.detail
    assert app.broken.exists() and report.status is RunStatus.unhealthy
    assert read_limit(mutating_limit_name("services.api")).active_slots == 0


def test_ready_timeout_of_the_service_itself(stack: Any, inventory: Any) -> None:
    # A restart that does not help: the wait for an answer is the service's own threshold.
    _, app = stack
    app.broken.touch()
    text = (
        Path(os.environ["RUNBOOK_CONFIG"])
        .read_text()
        .replace(f'restart_command = ["rm", "-f", "{app.broken}"]', 'restart_command = ["true"]')
    )
    inventory(text + "[services.api.thresholds]\nready_timeout_seconds = 1\n")
    report = service_health(dry_run=False, approval="auto")
    assert report.actions[0].description.endswith("wait up to 1 s for it to answer")
    assert report.actions[0].detail.endswith("not answering within 1 s")
    assert report.status is RunStatus.unhealthy


def test_body_that_is_not_json(stack: Any) -> None:
    _, app = stack
    app.mode = "text"
    report = service_health(params={"service": "api"})
    http = report.findings[0]
    assert http.severity is Severity.ok and "is not JSON" in http.message


def test_resource_pressure_reads_the_host_and_reports_services(stack: Any) -> None:
    report = resource_pressure(params={"memory_percent": 99.9})
    checks = {f.check for f in report.findings}
    assert {"host_memory", "host_load", "resources"} <= checks
    host = next(f for f in report.findings if f.check == "host_memory")
    assert 0 < host.observed < 100


def test_proc_stats_of_a_real_process() -> None:
    import os

    stats = proc_stats(os.getpid(), interval=0.2)
    assert stats.memory_bytes and stats.memory_bytes > 10 * 2**20
    assert stats.cpu_percent is not None and stats.cpu_percent >= 0


class BodyApp(HealthApp):
    """A real HTTP server answering one fixed health body, as a given product does."""

    def __init__(self) -> None:
        self.code, self.body = 200, "{}"
        super().__init__("")

    def answer(self) -> tuple[int, object]:
        return self.code, self.body


@pytest.fixture
def body_app(inventory: Any) -> Iterator[BodyApp]:
    app = BodyApp()
    inventory(
        f'[services.app]\nkind = "command"\nhealth_url = "{app.url}"\ntimeout_seconds = 5\n'
        'status_command = ["true"]\nrestart_command = ["true"]\n'
    )
    yield app
    app.close()


def test_grafana_health_body_is_healthy(body_app: BodyApp) -> None:
    # Grafana's /api/health, byte for byte: commit and version are build information
    body_app.body = '{"commit": "0a1b2c3d4e", "database": "ok", "version": "10.4.1"}'
    report = service_health()
    assert report.status is RunStatus.healthy and report.exit_code == 0
    assert {f.check: f.observed for f in report.findings} == {
        "http": 200,
        "component.database": "ok",
    }
    assert not report.actions


def test_grafana_with_its_database_failing_is_critical(body_app: BodyApp) -> None:
    body_app.code = 503
    body_app.body = '{"commit": "0a1b2c3d4e", "database": "failing", "version": "10.4.1"}'
    report = service_health()
    assert report.status is RunStatus.unhealthy and report.exit_code == 1
    db = next(f for f in report.findings if f.check == "component.database")
    assert db.severity is Severity.critical and db.observed == "failing"
    assert "component.version" not in {f.check for f in report.findings}


SPRING_BOOT_3 = {
    "status": "DOWN",
    "components": {
        "db": {
            "status": "UP",
            "details": {"database": "PostgreSQL", "validationQuery": "isValid()"},
        },
        "diskSpace": {
            "status": "UP",
            "details": {
                "total": 1e11,
                "free": 5e10,
                "threshold": 1e7,
                "path": "/app/.",
                "exists": True,
            },
        },
        "ping": {"status": "UP"},
        "mail": {
            "status": "DOWN",
            "details": {"location": "smtp:25", "error": "Connection refused"},
        },
    },
}
SPRING_BOOT_2_0 = {  # 2.0 and 2.1 nest under "details"; nested groups inside
    "status": "UP",
    "details": {
        "db": {
            "status": "UP",
            "details": {
                "primary": {"status": "UP", "details": {"database": "H2", "hello": 1}},
                "replica": {"status": "UP", "details": {"database": "H2", "hello": 1}},
            },
        },
        "diskSpace": {"status": "UP", "details": {"total": 1, "free": 1, "threshold": 1}},
    },
}
SPRING_BOOT_1 = {
    "status": "UP",
    "diskSpace": {"status": "UP", "total": 1, "free": 1, "threshold": 1},
    "db": {"status": "UP", "database": "PostgreSQL", "hello": 1},
}
IETF_DRAFT = {  # draft-inadarei-api-health-check-06, section 3's example, one check warning
    "status": "warn",
    "version": "1",
    "releaseId": "1.2.2",
    "notes": [""],
    "output": "",
    "serviceId": "f03e522f-1f44-4062-9b55-9587f91c9c41",
    "description": "health of authz service",
    "checks": {
        "cassandra:responseTime": [
            {
                "componentId": "dfd6cf2b-1b6e-4412-a0b8-f6f7797a60d2",
                "componentType": "datastore",
                "observedValue": 250,
                "observedUnit": "ms",
                "status": "pass",
                "affectedEndpoints": ["/health"],
                "time": "2019-01-17T03:36:48Z",
                "output": "",
            },
            {
                "componentId": "6fd416e0-8920-410f-9c7b-c479000f7227",
                "componentType": "datastore",
                "observedValue": 600,
                "observedUnit": "ms",
                "status": "warn",
                "time": "2019-01-17T03:36:48Z",
                "output": "",
            },
        ],
        "uptime": [
            {
                "componentType": "system",
                "observedValue": 1209600.245,
                "observedUnit": "s",
                "status": "pass",
                "time": "2019-01-17T03:36:48Z",
            }
        ],
    },
    "links": {"about": "http://api.example.com/about/authz"},
}
MICROPROFILE = {
    "status": "UP",
    "checks": [
        {"name": "Database connections health check", "status": "UP", "data": {"pool": 8}},
        {"name": "ping", "status": "UP"},
    ],
}
ASPNET_CORE = {
    "status": "Degraded",
    "totalDuration": "00:00:00.0149071",
    "entries": {
        "npgsql": {"data": {}, "duration": "00:00:00.0108", "status": "Healthy", "tags": []},
        "redis": {"data": {}, "duration": "00:00:00.0031", "status": "Degraded", "tags": []},
    },
}


TERMINUS = {  # NestJS Terminus: info and error repeat what details holds
    "status": "error",
    "info": {"database": {"status": "up"}},
    "error": {"redis": {"status": "down", "message": "connect ECONNREFUSED 127.0.0.1:6379"}},
    "details": {
        "database": {"status": "up"},
        "redis": {"status": "down", "message": "connect ECONNREFUSED 127.0.0.1:6379"},
    },
}
HEALTH_GO = {  # github.com/hellofresh/health-go
    "status": "Partially Available",
    "timestamp": "2026-11-30T12:00:00Z",
    "failures": {"rabbitmq": "dial tcp 127.0.0.1:5672: connect: connection refused"},
    "system": {"version": "go1.22", "goroutines_count": 12, "total_alloc_bytes": 123456},
    "component": {"name": "orders", "version": "v1.4.2"},
}
DJANGO = {  # django-health-check's JSON
    "Cache backend: default": "working",
    "DatabaseBackend": "unavailable: Database error",
    "DiskUsage": "working",
}
KONG = {  # Kong's /status
    "database": {"reachable": False},
    "server": {"connections_accepted": 10, "connections_active": 1, "total_requests": 9},
    "memory": {"lua_shared_dicts": {"kong": {"allocated_slabs": "0.04 MiB"}}},
}
GITLAB = {  # GitLab's /-/readiness?all=1
    "status": "failed",
    "master_check": [{"status": "ok"}],
    "db_check": [{"status": "ok"}],
    "redis_check": [{"status": "failed", "message": "check error"}],
}
CONSUL = [  # Consul's /v1/health/checks/SERVICE: a list of checks
    {"Node": "n1", "CheckID": "service:web", "Name": "Service 'web' check", "Status": "passing"},
    {"Node": "n1", "CheckID": "serfHealth", "Name": "Serf Health Status", "Status": "critical"},
]
VAULT = {  # Vault's /v1/sys/health: no state word at all
    "initialized": True,
    "sealed": False,
    "standby": False,
    "replication_dr_mode": "disabled",
    "server_time_utc": 1764504000,
    "version": "1.15.2",
    "cluster_name": "vault-cluster-1",
}


@pytest.mark.parametrize(
    ("code", "body", "http", "states"),
    [
        (
            503,
            SPRING_BOOT_3,
            Severity.critical,
            {"db": "UP", "diskSpace": "UP", "ping": "UP", "mail": "DOWN"},
        ),
        (200, SPRING_BOOT_2_0, Severity.ok, {"db": "UP", "diskSpace": "UP"}),
        (200, SPRING_BOOT_1, Severity.ok, {"db": "UP", "diskSpace": "UP"}),
        (200, IETF_DRAFT, Severity.warning, {"cassandra:responseTime": "warn", "uptime": "pass"}),
        (200, MICROPROFILE, Severity.ok, {"Database connections health check": "UP", "ping": "UP"}),
        (200, ASPNET_CORE, Severity.warning, {"npgsql": "Healthy", "redis": "Degraded"}),
        (200, {"status": "ok", "time": "2026-11-30T18:00:00Z", "uptime": "3d 4h"}, Severity.ok, {}),
        (200, {"healthy": False, "maintenance": False, "message": "ok"}, Severity.critical, {}),
        (
            200,
            {"status": "fail", "checks": {"queue": {"status": "fail"}}},
            Severity.critical,
            {"queue": "fail"},
        ),
        (503, TERMINUS, Severity.critical, {"database": "up", "redis": "down"}),
        (
            200,
            HEALTH_GO,
            Severity.warning,
            {"rabbitmq": "fail: dial tcp 127.0.0.1:5672: connect: connection refused"},
        ),
        (
            500,
            DJANGO,
            Severity.critical,
            {
                "Cache backend: default": "working",
                "DatabaseBackend": "unavailable: Database error",
                "DiskUsage": "working",
            },
        ),
        (200, KONG, Severity.ok, {"database": "error"}),
        (
            503,
            GITLAB,
            Severity.critical,
            {"master_check": "ok", "db_check": "ok", "redis_check": "failed"},
        ),
        (
            200,
            CONSUL,
            Severity.critical,
            {"Service 'web' check": "passing", "Serf Health Status": "critical"},
        ),
        (200, VAULT, Severity.ok, {}),
    ],
    ids=[
        "spring3",
        "spring2.0",
        "spring1",
        "ietf",
        "microprofile",
        "aspnet",
        "meta",
        "bool",
        "fail200",
        "terminus",
        "health-go",
        "django",
        "kong",
        "gitlab",
        "consul",
        "vault",
    ],
)
def test_health_body_layouts(
    body_app: BodyApp, code: int, body: object, http: Severity, states: dict[str, str]
) -> None:
    body_app.code, body_app.body = code, json.dumps(body)
    report = service_health()
    found = {f.check: f for f in report.findings}
    assert found.pop("http").severity is http
    assert {c.removeprefix("component."): f.observed for c, f in found.items()} == states
    worst = {"ok": "healthy", "warning": "unhealthy", "critical": "unhealthy"}
    expected = max([http, *(f.severity for f in found.values())], key=list(Severity).index)
    assert report.status.value == worst[expected.value]


def test_a_component_stands_for_a_target_by_whole_words(inventory: Any) -> None:
    inventory(
        '[postgres.main]\ndsn = "postgresql://app@127.0.0.1:1/app"\n'
        '[redis.cache]\nurl = "redis://127.0.0.1:1/0"\n'
        '[services.api]\nkind = "command"\nstatus_command = ["true"]\nrestart_command = ["true"]\n'
    )
    settings = load_settings()
    api = settings.services["api"]
    guesses = {
        name: dependency_for(name, api, settings)
        for name in (
            "db",
            "primaryDb",
            "Database connections health check",
            "postgres:connections",
            "redis-cache",
            "sessionStore",
            "mysql",
            "mongodb",
            "upgrade",
            "diskSpace",
        )
    }
    assert guesses == {
        "db": "postgres.main",
        "primaryDb": "postgres.main",
        "Database connections health check": "postgres.main",
        "postgres:connections": "postgres.main",
        "redis-cache": "redis.cache",
        "sessionStore": "redis.cache",
        "mysql": None,
        "mongodb": None,
        "upgrade": None,
        "diskSpace": None,
    }
