"""The `runbook` command as an on-call engineer runs it: a real process, a real database."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

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


def test_list_shows_every_runbook() -> None:
    proc = cli("list")
    assert proc.returncode == 0
    for name in ("postgres-connections", "postgres-maintenance", "stuck-jobs"):
        assert name in proc.stdout


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
    }
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
