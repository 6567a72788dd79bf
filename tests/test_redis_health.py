"""redis-health against real redis-servers: wrong policies, evictions, AOF, down, bad auth."""

from __future__ import annotations

import json
import subprocess
import threading
from typing import Any

import pytest

from deployments.localpg import free_port
from flows.redis_health import redis_health
from tasks.errors import AuthenticationFailed, ConfigError, TargetUnreachable
from tasks.models import ActionStatus, RunStatus, Severity
from tasks.redis import connect
from tasks.settings import RedisTarget

pytestmark = pytest.mark.usefixtures("prefect_api")
# A busy machine can take over 100 ms to answer PING: latency is tested on its own below, with
# a limit every real PING is over.
QUICK = {"sample_seconds": 0, "latency_warning_ms": 60_000}


def severities(report: Any) -> dict[str, Severity]:
    return {f.check: f.severity for f in report.findings}


def test_cache_on_noeviction_gets_allkeys_lru(redis_server: Any, inventory: Any) -> None:
    # Redis's default policy is noeviction: wrong for a cache.
    server = redis_server(maxmemory="64mb")
    inventory(f'[redis.cache]\nurl = "{server.url}"\nrole = "cache"\n')

    plan = redis_health("cache", params=QUICK)
    assert plan.status is RunStatus.unhealthy
    assert severities(plan)["maxmemory_policy"] is Severity.warning
    assert server.client().config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}

    report = redis_health("cache", dry_run=False, approval="auto", params=QUICK)
    assert report.status is RunStatus.fixed
    assert server.client().config_get("maxmemory-policy") == {"maxmemory-policy": "allkeys-lru"}
    # Started without a config file: the report must say the change is not durable.
    assert "will not survive a restart" in report.actions[0].detail


def test_queue_on_allkeys_lru_is_critical_and_is_fixed_durably(
    redis_server: Any, inventory: Any
) -> None:
    server = redis_server(
        password="s3cret-pw", appendonly=True, config_file=True, policy="allkeys-lru"
    )
    inventory(
        f'[redis.queue]\nurl = "redis://127.0.0.1:{server.port}/0"\n'
        f'password = "s3cret-pw"\nrole = "queue"\n'
    )

    plan = redis_health("queue", params=QUICK)
    assert severities(plan)["maxmemory_policy"] is Severity.critical
    assert severities(plan)["persistence"] is Severity.ok  # AOF on

    report = redis_health("queue", dry_run=False, approval="never", params=QUICK)
    # Going to noeviction deletes nothing, so it is not held back by the approval policy.
    assert report.status is RunStatus.fixed
    assert report.actions[0].status is ActionStatus.done
    assert server.config is not None
    assert "maxmemory-policy noeviction" in server.config.read_text()
    assert "s3cret-pw" not in report.model_dump_json()


def test_slow_ping_is_a_warning(redis_server: Any, inventory: Any) -> None:
    server = redis_server(maxmemory="64mb", policy="allkeys-lru")
    inventory(
        f'[redis.cache]\nurl = "{server.url}"\n'
        "[redis.cache.thresholds]\nlatency_warning_ms = 0.001\n"
    )
    report = redis_health("cache", params={"sample_seconds": 0})
    ping = next(f for f in report.findings if f.check == "ping")
    assert ping.severity is Severity.warning and ping.observed > 0.001
    assert report.status is RunStatus.unhealthy
    report = redis_health("cache", params=QUICK)  # the run's value wins over the target's
    assert report.status is RunStatus.healthy, report.findings


def test_queue_without_aof_is_warned_and_aof_is_enabled_durably(
    redis_server: Any, inventory: Any
) -> None:
    server = redis_server(policy="noeviction", config_file=True)
    inventory(f'[redis.queue]\nurl = "{server.url}"\nrole = "queue"\n')
    report = redis_health("queue", params=QUICK)
    assert severities(report)["persistence"] is Severity.warning
    assert severities(report)["maxmemory_policy"] is Severity.ok
    assert [(a.kind, a.destructive) for a in report.actions] == [("enable_aof", True)]

    refused = redis_health("queue", dry_run=False, approval="never", params=QUICK)
    assert refused.actions[0].status is ActionStatus.skipped
    with server.client() as r:
        assert r.info("persistence")["aof_enabled"] == 0

    fixed = redis_health("queue", dry_run=False, approval="auto", params=QUICK)
    assert fixed.status is RunStatus.fixed
    assert severities(fixed)["persistence"] is Severity.ok
    with server.client() as r:
        assert r.info("persistence")["aof_enabled"] == 1
    assert server.config is not None
    assert "appendonly yes" in server.config.read_text()


def test_evictions_under_a_small_maxmemory(redis_server: Any, inventory: Any) -> None:
    server = redis_server(maxmemory="2mb", policy="allkeys-lru")
    inventory(f'[redis.cache]\nurl = "{server.url}"\nrole = "cache"\n')
    stop = threading.Event()

    def cache_workload() -> None:
        with server.client() as r:
            i = 0
            while not stop.is_set():
                r.set(f"page:{i}", "x" * 2048)
                i += 1

    writer = threading.Thread(target=cache_workload, daemon=True)
    writer.start()
    try:
        report = redis_health("cache", params={"sample_seconds": 1})
    finally:
        stop.set()
        writer.join(5)
    evictions = next(f for f in report.findings if f.check == "evictions")
    assert evictions.severity is Severity.warning and evictions.observed > 0
    memory = next(f for f in report.findings if f.check == "memory")
    assert memory.severity is not Severity.ok  # at its 2 MiB limit


def test_unreachable_is_a_critical_finding_and_a_restart_it_cannot_do(inventory: Any) -> None:
    inventory(f'[redis.cache]\nurl = "redis://127.0.0.1:{free_port()}/0"\n')
    report = redis_health("cache", dry_run=False, approval="auto", params=QUICK)
    assert report.status is RunStatus.unhealthy
    assert report.findings[0].check == "reachable"
    assert report.findings[0].severity is Severity.critical
    assert "Connection refused" in report.findings[0].message
    assert report.actions[0].kind == "restart_service"
    assert report.actions[0].status is ActionStatus.skipped


def test_wrong_password_is_a_clear_critical_finding(redis_server: Any, inventory: Any) -> None:
    server = redis_server(password="right-one")
    inventory(f'[redis.cache]\nurl = "redis://:wrong-one@127.0.0.1:{server.port}/0"\n')
    report = redis_health("cache", params=QUICK)
    finding = report.findings[0]
    assert finding.severity is Severity.critical and "authentication failed" in finding.message
    assert "wrong-one" not in report.model_dump_json()


def test_refused_credentials_are_their_own_error(redis_server: Any) -> None:
    server = redis_server(password="right-one")
    url = f"redis://:wrong-one@127.0.0.1:{server.port}/0"
    with pytest.raises(AuthenticationFailed) as caught, connect("cache", RedisTarget(url=url)) as r:
        r.ping()
    assert "authentication failed" in str(caught.value) and "wrong-one" not in str(caught.value)
    assert not isinstance(caught.value, TargetUnreachable)  # never retried as a connection


def test_a_url_that_is_not_redis_is_a_configuration_error() -> None:
    target = RedisTarget(url="http://:pw@127.0.0.1:6379/0")
    with pytest.raises(ConfigError) as caught, connect("cache", target):
        pass
    assert caught.value.exit_code == 2
    assert "redis.cache.url is not a Redis URL" in str(caught.value)
    assert "redis://" in str(caught.value) and ":pw@" not in str(caught.value)


def test_down_redis_is_restarted_through_its_service(tmp_path: Any, inventory: Any) -> None:
    port = free_port()
    server = [
        "redis-server",
        "--bind",
        "127.0.0.1",
        "--port",
        str(port),
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
        str(tmp_path),
        "--daemonize",
        "yes",
        "--maxmemory",
        "64mb",
        "--maxmemory-policy",
        "allkeys-lru",
    ]
    ping = ["redis-cli", "-p", str(port), "ping"]
    inventory(
        f'[redis.cache]\nurl = "redis://127.0.0.1:{port}/0"\nservice = "cache"\n'
        f'[services.cache]\nkind = "command"\ntimeout_seconds = 10\n'
        f"status_command = {json.dumps(ping)}\nstart_command = {json.dumps(server)}\n"
        f"restart_command = {json.dumps(server)}\n"
    )
    plan = redis_health("cache", params=QUICK)
    assert plan.findings[0].check == "reachable" and plan.actions[0].status is ActionStatus.planned
    try:
        report = redis_health("cache", dry_run=False, approval="auto", params=QUICK)
        assert report.status is RunStatus.fixed, report.findings
        assert report.actions[0].detail == "started; answering PING"
    finally:
        subprocess.run(
            ["redis-cli", "-p", str(port), "shutdown", "nosave"], capture_output=True, check=False
        )
