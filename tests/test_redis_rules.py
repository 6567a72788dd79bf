"""Pure decisions of the Redis runbooks (tasks.redis_rules): no server needed."""

from __future__ import annotations

import pytest
from pydantic import SecretStr

from tasks.models import ActionStatus, Finding, ServiceRef, Severity
from tasks.redis_rules import (
    LockoutParams,
    MaxmemoryPolicy,
    QueueBacklogParams,
    QueueCounts,
    RedisHealth,
    RedisHealthParams,
    ScaleTo,
    health_findings,
    lockout_findings,
    plan_backlog,
    plan_health,
    plan_lockouts,
    queue_findings,
    refuse_rows,
)
from tasks.settings import LockoutTable, RedisTarget

URL = SecretStr("redis://127.0.0.1:6379/0")


def target(**kw: object) -> RedisTarget:
    return RedisTarget.model_validate({"url": URL, **kw})


def info(**kw: str) -> dict[str, str]:
    base = {
        "used_memory": str(50 * 2**20),
        "maxmemory": str(100 * 2**20),
        "maxmemory_policy": "allkeys-lru",
        "aof_enabled": "0",
        "connected_clients": "1",
        "maxclients": "100",
    }
    return base | kw


def severity(found: list[Finding], check: str) -> Severity:
    return next(f.severity for f in found if f.check == check)


@pytest.mark.parametrize(
    ("used_mib", "expected"),
    [(79, Severity.ok), (80, Severity.warning), (89.9, Severity.warning), (90, Severity.critical)],
)
def test_memory_thresholds_at_the_boundary(used_mib: float, expected: Severity) -> None:
    health = RedisHealth(reachable=True, ping_ms=1, info=info(used_memory=str(used_mib * 2**20)))
    found = health_findings("cache", target(), health, RedisHealthParams())
    assert severity(found, "memory") is expected


def test_an_unreachable_redis_is_one_critical_finding_and_a_restart_of_its_service() -> None:
    health = RedisHealth(reachable=False, error="connection refused")
    found = health_findings("cache", target(service="redis"), health, RedisHealthParams())
    assert [(f.check, f.severity) for f in found] == [("reachable", Severity.critical)]
    [restart] = plan_health("cache", target(service="redis"), health)
    assert restart.kind == "restart_service" and restart.args == ServiceRef(service="redis")
    assert restart.status is ActionStatus.planned and restart.destructive


def test_a_restart_without_a_service_is_skipped_saying_how_to_do_it() -> None:
    [restart] = plan_health("cache", target(), RedisHealth(reachable=False))
    assert restart.status is ActionStatus.skipped and restart.args is None
    assert 'service = "NAME"' in restart.detail and "docker compose restart redis" in restart.detail


def test_refused_credentials_plan_no_restart() -> None:
    assert (
        plan_health("cache", target(service="redis"), RedisHealth(reachable=False, transient=False))
        == []
    )


def test_a_queue_on_an_evicting_policy_gets_noeviction_and_aof() -> None:
    queue = target(role="queue")
    health = RedisHealth(reachable=True, ping_ms=1, info=info())
    assert severity(
        health_findings("q", queue, health, RedisHealthParams()), "maxmemory_policy"
    ) is (Severity.critical)
    policy, aof = plan_health("q", queue, health)
    assert (policy.kind, policy.args, policy.destructive) == (
        "set_maxmemory_policy",
        MaxmemoryPolicy(policy="noeviction"),
        False,
    )
    assert (aof.kind, aof.args, aof.destructive) == ("enable_aof", None, True)


def test_a_cache_on_its_policy_plans_nothing_and_moving_to_eviction_is_destructive() -> None:
    healthy = RedisHealth(reachable=True, ping_ms=1, info=info())
    assert plan_health("cache", target(), healthy) == []
    wrong = RedisHealth(reachable=True, ping_ms=1, info=info(maxmemory_policy="noeviction"))
    [policy] = plan_health("cache", target(), wrong)
    assert policy.args == MaxmemoryPolicy(policy="allkeys-lru") and policy.destructive


def test_lockout_findings_and_plan_cover_keys_and_rows() -> None:
    table = LockoutTable.model_validate(
        {"postgres": "main", "table": "public.lockout", "column": "subject"}
    )
    rd = target(lockout_table=table)
    p = LockoutParams(subject="alice@example.com")
    found = lockout_findings("cache", rd, p, 3, ["login_attempt:alice@example.com:1"], 2)
    assert [(f.check, f.severity, f.observed) for f in found] == [
        ("lockout_keys", Severity.warning, 3),
        ("lockout_rows", Severity.warning, 2),
    ]
    actions = plan_lockouts("cache", p, found)
    assert [a.kind for a in actions] == ["clear_lockout_keys", "clear_lockout_rows"]
    assert all(a.destructive and "'alice@example.com'" in a.description for a in actions)
    refuse_rows(actions, "main", "a standby in recovery")
    assert [a.status for a in actions] == [ActionStatus.planned, ActionStatus.skipped]
    assert "delete them on the primary" in actions[1].detail


def test_no_lockouts_plan_nothing_and_no_table_means_no_rows_finding() -> None:
    p = LockoutParams(all=True)
    found = lockout_findings("cache", target(), p, 0, [], None)
    assert [(f.check, f.severity) for f in found] == [("lockout_keys", Severity.ok)]
    assert plan_lockouts("cache", p, found) == []
    assert p.who == "all subjects"


def test_refuse_rows_without_a_refusal_changes_nothing() -> None:
    p = LockoutParams(all=True)
    actions = plan_lockouts("cache", p, lockout_findings("cache", target(), p, 1, [], None))
    refuse_rows(actions, "main", None)
    assert [a.status for a in actions] == [ActionStatus.planned]


def counts(waiting: int, completed: int = 0, active: int = 0) -> QueueCounts:
    return QueueCounts(
        exists=True,
        is_paused=False,
        waiting=waiting,
        paused=0,
        active=active,
        delayed=0,
        prioritized=0,
        waiting_children=0,
        failed=0,
        completed=completed,
        active_ids=[str(i) for i in range(active)],
    )


@pytest.mark.parametrize(("waiting", "expected"), [(1000, Severity.ok), (1001, Severity.warning)])
def test_backlog_threshold_at_the_boundary(waiting: int, expected: Severity) -> None:
    p = QueueBacklogParams()
    found = queue_findings("q", "mail", counts(waiting), counts(waiting), 5, p)
    assert severity(found, "mail.backlog") is expected


def test_a_stuck_backlog_plans_a_scale_and_none_without_a_worker_service_is_skipped() -> None:
    p = QueueBacklogParams(scale_workers_to=4)
    found = queue_findings("q", "mail", counts(2000), counts(2000), 5, p)
    [scale] = plan_backlog("q", target(queues=["mail"], worker_service="worker"), found, p)
    assert scale.kind == "scale_workers" and scale.args == ScaleTo(replicas=4)
    assert scale.status is ActionStatus.planned
    [skipped] = plan_backlog("q", target(queues=["mail"]), found, p)
    assert skipped.status is ActionStatus.skipped and "--scale worker=4" in skipped.detail


def test_a_draining_backlog_plans_nothing() -> None:
    p = QueueBacklogParams()
    found = queue_findings("q", "mail", counts(3000), counts(2000, completed=1000), 5, p)
    assert severity(found, "mail.backlog") is Severity.ok
    assert plan_backlog("q", target(queues=["mail"], worker_service="worker"), found, p) == []
