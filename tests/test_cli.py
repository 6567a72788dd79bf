"""The `runbook` command as an on-call engineer runs it: a real process, a real database."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from prefect.client.base import PrefectHttpxSyncClient

from deployments.catalog import ROUTINES, RUNBOOKS
from deployments.localpg import free_port, stop_process
from deployments.prefect_api import automations_possible
from tests.conftest import Db

RUNBOOK = str(Path(sys.executable).parent / "runbook")


def cli(
    *args: str,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    # The environment an engineer has: not the test session's Prefect logging settings.
    base = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_LOGGING")}
    return subprocess.run(
        [RUNBOOK, *args],
        capture_output=True,
        text=True,
        timeout=180,
        env={**base, **(env or {})},
        cwd=cwd,
    )


def no_traceback(proc: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in proc.stderr + proc.stdout


def test_list_outside_a_terminal_is_one_unwrapped_line_per_runbook() -> None:
    proc = cli("list")  # stdout is a pipe
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].split() == ["runbook", "triggers", "purpose", "may", "change"]
    entries: list[Any] = [*RUNBOOKS.values(), *ROUTINES.values()]
    assert len(lines) == 1 + len(entries)
    for line, rb in zip(lines[1:], entries, strict=True):
        assert line.split("  ")[0] == rb.name
        for text in (rb.triggers, rb.purpose, rb.changes):
            assert f"  {text}" in line


@pytest.mark.parametrize("args", [("list",), ("--help",), ("run", "--help")])
def test_list_and_help_import_neither_prefect_nor_the_runbooks(args: tuple[str, ...]) -> None:
    code = (
        "import sys\n"
        "from deployments.cli import app\n"
        "try:\n"
        f"    app({list(args)!r})\n"
        "except SystemExit as exc:\n"
        "    assert not exc.code, exc.code\n"
        "heavy = ('prefect', 'psycopg', 'redis', 'httpx', 'tasks.settings', 'tasks.models',\n"
        "         'tasks.postgres_rules', 'flows.postgres_connections')\n"
        "sys.stderr.write(repr(sorted(m for m in heavy if m in sys.modules)))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "[]"


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("run", "nope"), "unknown runbook 'nope'"),
        (("run", "postgres-connections", "--target", "other"), "unknown postgres target 'other'"),
        (("run", "postgres-connections", "--set", "nope=1"), "valid parameters: idle_in_"),
        (("run", "postgres-connections", "--set", "long_query_seconds=abc"), "valid integer"),
        (("run", "postgres-connections", "--set", "long_query_seconds=0"), "greater than or equal"),
        (("run", "postgres-connections", "--set", "dry_run=false"), "use --target, --apply"),
        (("run", "postgres-connections", "--set", "novalue"), "expected key=value"),
        (("run", "stuck-jobs"), "needs a jobs table"),
    ],
)
def test_bad_usage_exits_2_with_a_clear_message(
    db: Db, args: tuple[str, ...], expected: str
) -> None:
    proc = cli(*args)
    assert proc.returncode == 2, proc.stderr
    assert expected in proc.stderr
    no_traceback(proc)


def test_malformed_config_exits_2(db: Db) -> None:
    db.config.write_text("[postgres.main\n")
    proc = cli("run", "postgres-connections")
    assert proc.returncode == 2 and "not valid TOML" in proc.stderr
    no_traceback(proc)


def test_a_malformed_dsn_exits_2_naming_its_key(db: Db) -> None:
    db.config.write_text('[postgres.main]\ndsn = "password=s3cret-pw bogus=1"\n')
    proc = cli("run", "postgres-connections")
    assert proc.returncode == 2, proc.stderr
    assert "postgres.main.dsn: not a PostgreSQL connection string" in proc.stderr
    assert "s3cret-pw" not in proc.stderr + proc.stdout
    no_traceback(proc)


def test_a_malformed_redis_url_exits_2(inventory: Any, prefect_api: str) -> None:
    inventory('[redis.cache]\nurl = "http://:hunter2@127.0.0.1:6379/0"\n')
    proc = cli("run", "redis-health", "--target", "cache", env={"PREFECT_API_URL": prefect_api})
    assert proc.returncode == 2, proc.stderr
    assert "redis.cache.url is not a Redis URL" in proc.stderr
    assert "hunter2" not in proc.stdout + proc.stderr
    no_traceback(proc)


def test_unreachable_target_exits_3_without_leaking_the_password(db: Db, prefect_api: str) -> None:
    db.config.write_text('[postgres.main]\ndsn = "postgresql://app:hunter2@127.0.0.1:1/app"\n')
    proc = cli("run", "postgres-connections", "--json", env={"PREFECT_API_URL": prefect_api})
    assert proc.returncode == 3, proc.stderr
    report = json.loads(proc.stdout)
    assert report["status"] == "failed" and "Connection refused" in report["findings"][0]["message"]
    assert "hunter2" not in proc.stdout + proc.stderr
    no_traceback(proc)


def test_plan_then_apply_idle_in_transaction(db: Db, prefect_api: str) -> None:
    pids = db.idle_in_transaction(2)
    env = {"PREFECT_API_URL": prefect_api}
    sets = ("--set", "idle_in_transaction_seconds=1")
    time.sleep(1.5)

    proc = cli("run", "postgres-connections", "--target", "main", *sets, "--json", env=env)
    assert proc.returncode == 1, proc.stderr
    report = json.loads(proc.stdout)
    assert set(report) == {
        "runbook",
        "target",
        "dry_run",
        "status",
        "findings",
        "actions",
        "started_at",
        "finished_at",
        "flow_run_id",
        "approval",
        "timeline",
    }
    assert report["approval"] is None  # nobody was asked: a dry run
    assert report["status"] == "unhealthy" and report["dry_run"] is True
    assert [a["status"] for a in report["actions"]] == ["planned", "planned"]
    assert db.alive(pids) == set(pids)

    # --apply without --yes and without a terminal: destructive actions are not approved.
    proc = cli("run", "postgres-connections", *sets, "--apply", "--json", env=env)
    assert proc.returncode == 1
    assert {a["status"] for a in json.loads(proc.stdout)["actions"]} == {"skipped"}
    assert db.alive(pids) == set(pids)

    proc = cli("run", "postgres-connections", *sets, "--apply", "--yes", env=env)
    assert proc.returncode == 0, proc.stderr
    assert "fixed" in proc.stdout and "Findings" in proc.stdout
    # Not a terminal: each finding is one line, not wrapped at 80 columns.
    row = next(line for line in proc.stdout.splitlines() if "long_query" in line)
    assert "no session running one query longer than 5 min" in row
    assert db.alive(pids) == set()
    no_traceback(proc)


def test_stuck_jobs_and_maintenance_from_the_cli(db: Db, prefect_api: str) -> None:
    with db.admin() as conn:
        conn.execute("CREATE TABLE job (id int PRIMARY KEY, status text, startedat timestamptz)")
        conn.execute("INSERT INTO job VALUES (1, 'running', now() - interval '1 hour')")
        conn.execute("CREATE TABLE t (id int) WITH (autovacuum_enabled = false)")
        conn.execute("INSERT INTO t SELECT generate_series(1, 5000)")
        conn.execute("DELETE FROM t")
    db.write_config('[postgres.main.jobs]\ntable = "job"\n')
    env = {"PREFECT_API_URL": prefect_api}
    assert cli("run", "stuck-jobs", "--json", env=env).returncode == 1
    proc = cli("run", "stuck-jobs", "--apply", "--yes", "--json", env=env)
    assert proc.returncode == 0 and json.loads(proc.stdout)["status"] == "fixed"
    with db.admin() as conn:
        assert conn.execute("SELECT status FROM job").fetchone() == ("pending",)

    assert cli("run", "postgres-maintenance", "--json", env=env).returncode == 1
    proc = cli("run", "postgres-maintenance", "--apply", "--json", env=env)
    assert proc.returncode == 0 and json.loads(proc.stdout)["status"] == "fixed"


def test_redis_health_plan_then_fix(redis_server: Any, inventory: Any, prefect_api: str) -> None:
    server = redis_server(maxmemory="64mb")
    inventory(
        f'[redis.cache]\nurl = "{server.url}"\nrole = "cache"\n'
        "[redis.cache.thresholds]\nsample_seconds = 0\n"
    )
    env = {"PREFECT_API_URL": prefect_api}
    proc = cli("run", "redis-health", "--target", "cache", "--json", env=env)
    assert proc.returncode == 1, proc.stderr
    policy = next(
        f for f in json.loads(proc.stdout)["findings"] if f["check"] == "maxmemory_policy"
    )
    assert policy["observed"] == "noeviction" and policy["severity"] == "warning"
    proc = cli("run", "redis-health", "--target", "cache", "--apply", "--yes", "--json", env=env)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["status"] == "fixed"
    assert server.client().config_get("maxmemory-policy")["maxmemory-policy"] == "allkeys-lru"


def test_login_lockouts_and_queue_backlog_from_the_cli(
    redis_server: Any, inventory: Any, prefect_api: str
) -> None:
    server = redis_server(policy="noeviction")
    with server.client() as r:
        r.mset({"login_attempt:alice": 1, "login_attempt:bob": 1})
        r.hset("bull:emails:meta", "opts.maxLenEvents", 10000)
        r.rpush("bull:emails:wait", *range(1500))
    inventory(f'[redis.queue]\nurl = "{server.url}"\nrole = "queue"\nqueues = ["emails"]\n')
    env = {"PREFECT_API_URL": prefect_api}
    proc = cli("run", "login-lockouts", "--set", "subject=alice", "--apply", "--yes", env=env)
    assert proc.returncode == 0, proc.stderr
    assert server.client().keys("login_attempt:*") == ["login_attempt:bob"]
    proc = cli("run", "login-lockouts", env=env)
    assert proc.returncode == 2 and "subject=USER_EMAIL_OR_IP or all=true" in proc.stderr

    proc = cli("run", "queue-backlog", "--set", "sample_seconds=0.2", "--json", env=env)
    assert proc.returncode == 1, proc.stderr
    counts = {f["check"]: f["observed"] for f in json.loads(proc.stdout)["findings"]}
    assert counts["emails.waiting"] == 1500 and counts["emails.backlog"] == 1500


def test_postgres_down_dry_run_then_brought_back(inventory: Any, prefect_api: str) -> None:
    from deployments.localpg import LocalPostgres

    pg = LocalPostgres().start()
    try:
        inventory(
            f'[postgres.main]\ndsn = "{pg.dsn}"\nservice = "db"\n'
            f'[services.db]\nkind = "command"\n'
            f"status_command = {json.dumps(pg.ctl_argv('status'))}\n"
            f"start_command = {json.dumps(pg.ctl_argv('start'))}\n"
            f"restart_command = {json.dumps(pg.ctl_argv('restart'))}\n"
        )
        pg.stop(remove=False)
        env = {"PREFECT_API_URL": prefect_api}
        proc = cli("run", "postgres-down", "--json", env=env)
        assert proc.returncode == 1 and json.loads(proc.stdout)["status"] == "unhealthy"
        assert not pg.is_running()
        proc = cli("run", "postgres-down", "--apply", "--yes", "--json", env=env)
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout)["status"] == "fixed" and pg.is_running()
    finally:
        pg.stop()


@pytest.mark.parametrize(
    ("runbook", "expected"),
    [
        ("service-health", "needs at least one [services.NAME] entry with a health_url"),
        ("tls-certificates", "needs at least one [tls.NAME] entry in"),
    ],
)
def test_runbooks_over_a_whole_section_need_one_entry(db: Db, runbook: str, expected: str) -> None:
    proc = cli("run", runbook)
    assert proc.returncode == 2 and expected in proc.stderr


def dead_api() -> str:
    """A loopback URL where nothing listens: connections are refused at once."""
    return f"http://127.0.0.1:{free_port()}/api"


@pytest.mark.parametrize(
    "args",
    [
        ("run", "postgres-connections"),
        ("run", "postgres-connections", "--json"),
        ("receiver",),
        ("serve", "--port", str(free_port())),
    ],
)
def test_an_unreachable_prefect_api_url_is_one_line_and_exit_3(
    db: Db, args: tuple[str, ...]
) -> None:
    listen = f"127.0.0.1:{free_port()}"
    db.write_config(f'[receiver]\ntoken = "a-long-enough-token"\nlisten = "{listen}"\n')
    url = dead_api()
    proc = cli(*args, env={"PREFECT_API_URL": url})
    assert proc.returncode == 3, proc.stderr
    assert proc.stderr.count("\n") == 1
    assert proc.stderr.startswith(f"error: the Prefect API in PREFECT_API_URL ({url})")
    assert "Connection refused" in proc.stderr and "point PREFECT_API_URL at" in proc.stderr
    if "--json" in args:
        report = json.loads(proc.stdout)
        assert report["status"] == "failed" and url in report["findings"][0]["message"]
    no_traceback(proc)


def test_no_api_and_ephemeral_mode_off_is_a_configuration_error(db: Db) -> None:
    env = {"RUNBOOK_PREFECT_API": dead_api(), "PREFECT_SERVER_EPHEMERAL_ENABLED": "false"}
    proc = cli("run", "postgres-connections", env=env)
    assert proc.returncode == 2, proc.stderr
    assert "no Prefect API" in proc.stderr and "PREFECT_SERVER_EPHEMERAL_ENABLED" in proc.stderr
    no_traceback(proc)


def read_run(api: str, flow_run_id: str) -> dict[str, Any]:
    """The flow run as the Prefect API has it, with its task runs, logs and artifacts (through
    Prefect's HTTP client, which retries the 503 of a busy SQLite server)."""
    with PrefectHttpxSyncClient(base_url=api, timeout=60) as client:
        run: dict[str, Any] = client.get(f"/flow_runs/{flow_run_id}").raise_for_status().json()
        by_run = {"flow_runs": {"id": {"any_": [flow_run_id]}}}
        run["task_runs"] = client.post("/task_runs/filter", json=by_run).raise_for_status().json()
        logs = {"logs": {"flow_run_id": {"any_": [flow_run_id]}}}
        run["logs"] = client.post("/logs/filter", json=logs).raise_for_status().json()
        artifacts = {"artifacts": {"flow_run_id": {"any_": [flow_run_id]}}}
        run["artifacts"] = (
            client.post("/artifacts/filter", json=artifacts).raise_for_status().json()
        )
    return run


def assert_tracked(run: dict[str, Any], runbook: str, target: str) -> None:
    assert run["state"]["type"] == "COMPLETED"
    assert run["parameters"]["target"] == target and run["parameters"]["dry_run"] is True
    assert run["task_runs"] and {t["state"]["type"] for t in run["task_runs"]} == {"COMPLETED"}
    assert run["logs"]
    assert f"runbook-{runbook}-{target}" in {a["key"] for a in run["artifacts"]}


def test_a_run_is_recorded_in_the_local_server_it_finds(db: Db, prefect_api: str) -> None:
    # No PREFECT_API_URL: the CLI looks for `runbook serve`'s server (RUNBOOK_PREFECT_API).
    proc = cli("run", "postgres-connections", "--json", env={"RUNBOOK_PREFECT_API": prefect_api})
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert_tracked(read_run(prefect_api, report["flow_run_id"]), "postgres-connections", "main")


def test_a_run_with_no_server_is_recorded_in_prefect_home(db: Db, tmp_path: Path) -> None:
    # No server anywhere: Prefect's API app runs inside the CLI on PREFECT_HOME's database,
    # and everything the run sent is there once the command has returned.
    home = tmp_path / "prefect-home"
    env = {"PREFECT_HOME": str(home), "RUNBOOK_PREFECT_API": dead_api()}
    proc = cli("run", "postgres-connections", "--json", env=env)
    assert proc.returncode == 0, proc.stderr
    flow_run_id = json.loads(proc.stdout)["flow_run_id"]
    proc = cli("run", "postgres-connections", "--json", env=env)  # the database again
    assert proc.returncode == 0, proc.stderr

    port = free_port()
    # The API app as Prefect's temporary server runs it, on the same database.
    argv = [sys.executable, "-m", "uvicorn", "--factory", "prefect.server.api.server:create_app"]
    server = subprocess.Popen(
        [*argv, "--host", "127.0.0.1", "--port", str(port), "--log-level", "error"],
        env={**os.environ, "PREFECT_HOME": str(home), "PREFECT__SERVER_EPHEMERAL": "1"},
    )
    api = f"http://127.0.0.1:{port}/api"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{api}/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert server.poll() is None and time.monotonic() < deadline, "server did not start"
            time.sleep(0.2)
        assert_tracked(read_run(api, flow_run_id), "postgres-connections", "main")
        runs = httpx.post(f"{api}/flow_runs/filter", json={}, timeout=60).json()
        assert len(runs) == 2

        # The in-process API leaves automations off only while the database has none.
        database = f"sqlite+aiosqlite:///{home / 'prefect.db'}"
        assert not automations_possible(database)
        from prefect.events.actions import DoNothing
        from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture

        failed = EventTrigger(expect={"prefect.flow-run.Failed"}, posture=Posture.Reactive)
        automation = AutomationCore(name="on failure", trigger=failed, actions=[DoNothing()])
        httpx.post(
            f"{api}/automations/", json=automation.model_dump(mode="json"), timeout=60
        ).raise_for_status()
        assert automations_possible(database)
    finally:
        stop_process(server)


def test_a_prefect_database_that_cannot_be_opened_is_one_line_and_exit_3(
    db: Db, tmp_path: Path
) -> None:
    home = tmp_path / "prefect-home"
    home.mkdir()
    (home / "prefect.db").write_text("not a database\n")
    env = {"PREFECT_HOME": str(home), "RUNBOOK_PREFECT_API": dead_api()}
    proc = cli("run", "postgres-connections", env=env)
    assert proc.returncode == 3, proc.stderr
    assert proc.stderr.count("\n") == 1
    assert "the in-process Prefect API did not start" in proc.stderr
    assert "file is not a database" in proc.stderr
    no_traceback(proc)


def test_a_prefect_api_url_of_something_else_is_one_line_and_exit_3(db: Db) -> None:
    # A real HTTP server that is not a Prefect API: its /api/health is a 404.
    server = ThreadingHTTPServer(("127.0.0.1", 0), SimpleHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/api"
    try:
        proc = cli("run", "postgres-connections", env={"PREFECT_API_URL": url})
    finally:
        server.shutdown()
        server.server_close()
    assert proc.returncode == 3, proc.stderr
    assert proc.stderr.count("\n") == 1
    assert f"({url}) cannot be reached: GET /health answered HTTP 404" in proc.stderr
    no_traceback(proc)
