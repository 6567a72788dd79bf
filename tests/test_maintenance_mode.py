"""maintenance-mode, and the maintenance pair around postgres-down, redis-health and
security-incident, against a real HTTP admin API (deployments.sandbox.HealthApp: a threaded
http.server whose /health answers 503 maintenance while its flag is on, and whose admin API
checks the bearer token). Each switch of the flag is recorded with what the mended system
looked like at that moment (a real PostgreSQL, Redis or sessions table), so the order of the
pair against the mending is read from the systems themselves."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from deployments.localpg import LocalPostgres, free_port
from deployments.sandbox import HealthApp
from flows.maintenance_mode import maintenance_mode
from flows.postgres_down import postgres_down
from flows.redis_health import redis_health
from flows.security_incident import security_incident
from tasks.errors import AuthenticationFailed, ConfigError
from tasks.maintenance import read_maintenance
from tasks.maintenance_rules import at_path, flag_of
from tasks.models import ActionStatus, Report, RunStatus, Severity
from tasks.settings import load_settings
from tests.conftest import Db
from tests.test_cli import cli, no_traceback
from tests.test_postgres_down import config as postgres_config
from tests.test_redis_health import QUICK
from tests.test_security_incident import make_tables

pytestmark = pytest.mark.usefixtures("prefect_api")

TOKEN = "Admin-Token-4e9d2a71"


@pytest.fixture
def app() -> Iterator[HealthApp]:
    server = HealthApp(None, token=TOKEN)
    yield server
    server.close()


def health(app: HealthApp) -> int:
    return httpx.get(app.url, timeout=5).status_code


def kinds(report: Report) -> list[tuple[str, ActionStatus]]:
    return [(a.kind, a.status) for a in report.actions]


def service(app: HealthApp, name: str = "api", check: bool = True) -> str:
    table = app.maintenance_toml(name)
    if not check:
        table = "\n".join(line for line in table.splitlines() if "check_" not in line) + "\n"
    return (
        f'[services.{name}]\nkind = "command"\nstatus_command = ["true"]\n'
        f'restart_command = ["true"]\nhealth_url = "{app.url}"\n' + table
    )


# --- pure rules ----------------------------------------------------------------------------


def test_the_flag_values_an_admin_api_answers() -> None:
    assert [flag_of(v) for v in ("true", "TRUE", True, 1, "on", "yes")] == [True] * 6
    assert [flag_of(v) for v in ("false", False, 0, "off", None, "")] == [False] * 6
    assert flag_of("sometimes") is None and flag_of(7) is None
    assert at_path({"data": {"value": "true"}}, "data.value") == (True, "true")
    assert at_path({"items": [{"v": 1}]}, "items.0.v") == (True, 1)
    assert at_path({"value": "x"}, "data.value") == (False, None)


# --- maintenance-mode ----------------------------------------------------------------------


@pytest.mark.parametrize("check", [True, False], ids=["check_url", "health_url"])
def test_enable_then_disable_switch_the_real_flag(
    app: HealthApp, inventory: Any, check: bool
) -> None:
    inventory(service(app, check=check))
    plan = maintenance_mode("api", params={"enable": True})
    assert plan.status is RunStatus.unhealthy and not app.maintenance  # a dry run
    assert kinds(plan) == [("enable_maintenance", ActionStatus.planned)]

    on = maintenance_mode("api", dry_run=False, approval="auto", params={"enable": True})
    assert on.status is RunStatus.fixed, on.findings
    assert app.maintenance and health(app) == 503
    assert on.findings[0].observed == "on"
    assert (app.check_url if check else app.url) in on.findings[0].message
    again = maintenance_mode("api", dry_run=False, approval="auto", params={"enable": True})
    assert again.status is RunStatus.healthy and again.actions == []

    off = maintenance_mode("api", dry_run=False, approval="auto", params={"enable": False})
    assert off.status is RunStatus.fixed, off.findings
    assert not app.maintenance and health(app) == 200
    assert [on for on, _ in app.switches] == [True, False]
    again = maintenance_mode("api", dry_run=False, approval="auto", params={"enable": False})
    assert again.status is RunStatus.healthy and again.actions == []


def test_a_wrong_token_is_a_clear_finding_and_never_shown(
    app: HealthApp, inventory: Any, caplog: pytest.LogCaptureFixture
) -> None:
    wrong = "Wrong-Token-77c1e0b3"
    inventory(service(app).replace(TOKEN, wrong))
    caplog.set_level("DEBUG")
    report = maintenance_mode("api", dry_run=False, approval="auto", params={"enable": True})
    finding = report.findings[0]
    assert finding.severity is Severity.critical and report.status is RunStatus.unhealthy
    assert "answered 401 to the token" in finding.message
    assert "check services.api.maintenance.token" in finding.message
    assert report.actions == [] and not app.maintenance and app.refused >= 1
    with pytest.raises(AuthenticationFailed):
        read_maintenance.fn("api", load_settings().services["api"])
    # The right token works, and neither token shows anywhere.
    inventory(service(app))
    fixed = maintenance_mode("api", dry_run=False, approval="auto", params={"enable": True})
    assert fixed.status is RunStatus.fixed and app.maintenance
    for text in (caplog.text, report.model_dump_json(), fixed.model_dump_json()):
        assert wrong not in text and TOKEN not in text


def test_through_the_cli_with_exit_codes(app: HealthApp, inventory: Any, prefect_api: str) -> None:
    inventory(service(app))
    env = {"PREFECT_API_URL": prefect_api}
    proc = cli("run", "maintenance-mode", "--target", "api", "--set", "enable=true", env=env)
    assert proc.returncode == 1 and not app.maintenance, proc.stderr
    run = ["run", "maintenance-mode", "--target", "api", "--apply", "--yes", "--json"]
    proc = cli(*run, "--set", "enable=true", env=env)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["status"] == "fixed" and app.maintenance
    proc = cli(*run, "--set", "enable=false", env=env)
    assert proc.returncode == 0 and not app.maintenance, proc.stderr
    assert TOKEN not in proc.stdout + proc.stderr


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ("", "set enable=true"),  # no choice made: refused, not a default
        ('[postgres.main]\ndsn = "postgresql://a@127.0.0.1/b"\nmaintenance_service = "web"\n',
         "postgres.main.maintenance_service names 'web', which is not a [services.*] entry"),
        ('[services.db]\nkind = "command"\nstatus_command = ["true"]\nrestart_command = ["true"]\n'
         '[redis.cache]\nurl = "redis://127.0.0.1:1/0"\nmaintenance_service = "db"\n',
         "redis.cache.maintenance_service names 'db', which has no maintenance API"),
    ],
)  # fmt: skip
def test_bad_configuration_is_exit_2(
    app: HealthApp, inventory: Any, extra: str, expected: str
) -> None:
    inventory(service(app) + extra)
    sets = ["--set", "enable=true"] if extra else []
    proc = cli("run", "maintenance-mode", "--target", "api", *sets)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert expected in proc.stderr
    no_traceback(proc)


def test_unreadable_flag_settings_are_exit_2(app: HealthApp, inventory: Any) -> None:
    body = (
        service(app)
        .replace('check_url = "', 'check_url = "ftp://x')
        .replace("health_url", "# health_url")
    )
    inventory(body)
    proc = cli("run", "maintenance-mode", "--target", "api", "--set", "enable=true")
    assert proc.returncode == 2 and "services.api.maintenance.check_url" in proc.stderr
    no_traceback(proc)
    inventory(service(app, check=False).replace("health_url", "# health_url"))
    proc = cli("run", "maintenance-mode", "--target", "api", "--set", "enable=true")
    assert proc.returncode == 2 and "a way to read the flag back" in proc.stderr
    inventory('[services.db]\nkind = "command"\nstatus_command = ["true"]\n'
              'restart_command = ["true"]\n')  # fmt: skip
    proc = cli("run", "maintenance-mode", "--target", "db", "--set", "enable=true")
    assert proc.returncode == 2 and "needs a maintenance API" in proc.stderr
    no_traceback(proc)
    # A run a worker starts (no registry) says the same.
    with pytest.raises(ConfigError, match=r"services\.db has no maintenance API"):
        maintenance_mode("db", params={"enable": True})


# --- the pair around postgres-down ---------------------------------------------------------


@pytest.fixture
def victim() -> Iterator[LocalPostgres]:
    server = LocalPostgres().start()
    yield server
    server.stop()


@pytest.fixture
def pg_app(victim: LocalPostgres) -> Iterator[HealthApp]:
    # The app's /health checks the database, as seed 001's API does; each switch records
    # whether PostgreSQL was running at that moment.
    server = HealthApp(victim.dsn, token=TOKEN, observe=victim.is_running)
    yield server
    server.close()


def pg_config(victim: LocalPostgres, app: HealthApp, **kwargs: Any) -> str:
    text = postgres_config(victim, **kwargs).replace(
        "[postgres.main]\n", '[postgres.main]\nmaintenance_service = "api"\n'
    )
    return text + service(app)


def test_postgres_down_keeps_the_app_in_maintenance_while_it_restarts(
    victim: LocalPostgres, pg_app: HealthApp, inventory: Any
) -> None:
    inventory(pg_config(victim, pg_app))
    assert postgres_down("main").actions == []  # up: nothing to do, no pair

    victim.stop(remove=False)
    plan = postgres_down("main")
    assert [k for k, _ in kinds(plan)] == [
        "enable_maintenance",
        "restart_service",
        "disable_maintenance",
    ]
    assert pg_app.switches == []

    report = postgres_down("main", dry_run=False, approval="auto")
    assert report.status is RunStatus.fixed, report.findings
    assert {s for _, s in kinds(report)} == {ActionStatus.done}
    # In maintenance while PostgreSQL was down; out once it was back and verified.
    assert pg_app.switches == [(True, False), (False, True)]
    assert not pg_app.maintenance and health(pg_app) == 200
    flag = [f for f in report.findings if f.check == "maintenance"]
    assert flag and flag[0].severity is Severity.ok and flag[0].observed == "off"


def test_postgres_down_that_does_not_verify_stays_in_maintenance(
    victim: LocalPostgres, pg_app: HealthApp, inventory: Any
) -> None:
    inventory(pg_config(victim, pg_app, restart=["true"], start=False))
    victim.stop(remove=False)
    report = postgres_down(
        "main", dry_run=False, approval="auto", params={"ready_timeout_seconds": 2}
    )
    assert report.status is RunStatus.unhealthy
    assert pg_app.switches == [(True, False)] and pg_app.maintenance
    assert health(pg_app) == 503
    disable = report.actions[-1]
    assert disable.kind == "disable_maintenance" and disable.status is ActionStatus.skipped
    assert "api stays in maintenance" in disable.detail
    stays = next(f for f in report.findings if f.check == "maintenance")
    assert "stays in maintenance mode" in stays.message and "enable=false" in stays.message


def test_an_app_already_in_maintenance_is_left_as_it_is(
    victim: LocalPostgres, pg_app: HealthApp, inventory: Any
) -> None:
    inventory(pg_config(victim, pg_app))
    pg_app.maintenance = True  # someone put it there before the run
    victim.stop(remove=False)
    report = postgres_down("main", dry_run=False, approval="auto")
    assert report.status is RunStatus.fixed and victim.is_running()
    assert [k for k, _ in kinds(report)] == ["restart_service"]
    assert pg_app.switches == [] and pg_app.maintenance


def test_a_pair_refused_by_policy_does_not_hold_back_the_restart(
    victim: LocalPostgres, pg_app: HealthApp, inventory: Any
) -> None:
    inventory(
        pg_config(victim, pg_app)
        + '[approval]\n"postgres-down" = { enable_maintenance = "never" }\n'
    )
    victim.stop(remove=False)
    report = postgres_down("main", dry_run=False, approval="auto")
    assert report.status is RunStatus.fixed and victim.is_running()
    assert kinds(report) == [
        ("enable_maintenance", ActionStatus.skipped),
        ("restart_service", ActionStatus.done),
        ("disable_maintenance", ActionStatus.skipped),
    ]
    assert "did not pass the gate together" in report.actions[-1].detail
    assert pg_app.switches == []


# --- the pair around redis-health and security-incident -----------------------------------


def test_redis_health_restarts_a_down_redis_inside_maintenance(
    inventory: Any, tmp_path: Path
) -> None:
    port = free_port()
    server = ["redis-server", "--bind", "127.0.0.1", "--port", str(port), "--save", ""]
    server += ["--dir", str(tmp_path), "--daemonize", "yes"]
    server += ["--maxmemory", "64mb", "--maxmemory-policy", "allkeys-lru"]
    ping = ["redis-cli", "-p", str(port), "ping"]

    def answers() -> object:
        done = subprocess.run(ping, capture_output=True, text=True, check=False, timeout=10)
        return done.stdout.strip() == "PONG"

    app = HealthApp(None, token=TOKEN, observe=answers)
    try:
        inventory(
            f'[redis.cache]\nurl = "redis://127.0.0.1:{port}/0"\nservice = "cache"\n'
            'maintenance_service = "api"\n'
            f'[services.cache]\nkind = "command"\ntimeout_seconds = 10\n'
            f"status_command = {json.dumps(ping)}\nstart_command = {json.dumps(server)}\n"
            f"restart_command = {json.dumps(server)}\n" + service(app)
        )
        report = redis_health("cache", dry_run=False, approval="auto", params=QUICK)
        assert report.status is RunStatus.fixed, report.findings
        assert [k for k, _ in kinds(report)] == [
            "enable_maintenance",
            "restart_service",
            "disable_maintenance",
        ]
        # In maintenance while Redis was down, out once it answered again.
        assert app.switches == [(True, False), (False, True)]
        assert not app.maintenance
    finally:
        app.close()
        subprocess.run(
            ["redis-cli", "-p", str(port), "shutdown", "nosave"], capture_output=True, check=False
        )


def test_a_policy_change_on_a_redis_that_answers_leaves_the_app_alone(
    redis_server: Any, inventory: Any
) -> None:
    server = redis_server(maxmemory="64mb")  # a cache on noeviction
    app = HealthApp(None, token=TOKEN)
    try:
        inventory(
            f'[redis.cache]\nurl = "{server.url}"\nrole = "cache"\nmaintenance_service = "api"\n'
            + service(app)
        )
        report = redis_health("cache", dry_run=False, approval="auto", params=QUICK)
        assert report.status is RunStatus.fixed, report.findings
        assert [k for k, _ in kinds(report)] == ["set_maxmemory_policy"]
        assert app.switches == [] and not app.maintenance
    finally:
        app.close()


def test_security_incident_revokes_inside_maintenance(
    db: Db, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    make_tables(db)

    def live() -> object:
        with db.admin() as conn:
            row = conn.execute(
                "SELECT count(*) FROM users.session WHERE userid = 'u1' AND revokedat IS NULL"
            ).fetchone()
        return row[0] if row else None

    app = HealthApp(None, token=TOKEN, observe=live)
    try:
        db.write_config(
            '[security.app]\npostgres = "main"\nmaintenance_service = "api"\n'
            '[security.app.sessions]\ntable = "users.session"\n' + service(app)
        )
        caplog.set_level("DEBUG")
        report = security_incident("app", dry_run=False, approval="auto", params={"users": ["u1"]})
        assert report.status is RunStatus.fixed, report.findings
        assert [k for k, _ in kinds(report)] == [
            "enable_maintenance",
            "revoke_sessions",
            "disable_maintenance",
        ]
        assert app.switches == [(True, 2), (False, 0)] and not app.maintenance
        assert TOKEN not in caplog.text + report.model_dump_json()
    finally:
        app.close()
