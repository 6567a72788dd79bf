"""redis-health: Redis down, out of memory, evicting, or on the wrong eviction policy for its
role (seeds 000 s1, 001 "Redis unavailable", 004 s4)."""

from __future__ import annotations

from typing import get_args

from prefect import State

from tasks.engine import run_action, runbook_flow
from tasks.gate import APPROVAL_TIMEOUT_SECONDS, ApprovalTimeout
from tasks.maintenance import MaintenancePair
from tasks.models import AlertInfo, Approval, Report, ServiceRef
from tasks.redis import (
    await_redis_ready,
    enable_aof,
    read_redis_health,
    set_maxmemory_policy,
)
from tasks.redis_rules import (
    MaxmemoryPolicy,
    RedisHealthAction,
    RedisHealthParams,
    health_findings,
    plan_health,
)
from tasks.run import open_run
from tasks.services import restart_service
from tasks.settings import Settings

RUNBOOK = "redis-health"


@runbook_flow(RUNBOOK, inventory="redis", actions=get_args(RedisHealthAction))
def redis_health(
    target: str,
    dry_run: bool = True,
    approval: Approval = "ask",
    approval_timeout_seconds: ApprovalTimeout = APPROVAL_TIMEOUT_SECONDS,
    params: RedisHealthParams | None = None,
    alert: AlertInfo | None = None,
) -> State[Report]:
    """PING latency, memory against maxmemory, fragmentation, evictions, the eviction policy
    its role wants, persistence and clients of one Redis.

    May CONFIG SET maxmemory-policy and appendonly (then CONFIG REWRITE), and restart it
    through its service when it is down. With the target's maintenance_service, the
    application is put in maintenance before that restart and taken out once Redis verifies
    (seed 001: "keep the application in maintenance mode until Redis is restored").
    """
    run = open_run(Settings.redis_target, target, RedisHealthParams, params)
    name, rd, p = run.name, run.target, run.p

    # 1. diagnose
    health = read_redis_health(name, rd, p.sample_seconds)
    before = health_findings(name, rd, health, p)
    # Seed 001: the application stays in maintenance while Redis is down, not for a policy
    # change on a Redis that answers.
    down = None if health.reachable else rd.maintenance_service
    maintenance = MaintenancePair.read(run.settings, name, down)
    before += maintenance.findings
    # 2. plan: in maintenance around the restart when Redis is down and it is configured
    actions = maintenance.around(plan_health(name, rd, health))
    # 3. gate
    approved = run.gate(actions, before)
    # 4. act: maintenance on first
    for action in maintenance.enter(approved):
        match action.args:
            case MaxmemoryPolicy(policy=policy):
                run_action(action, set_maxmemory_policy, name, rd, policy)
            case ServiceRef(service=service):
                svc = run.settings.service(service)
                if run_action(action, restart_service, service, svc) is not None:
                    waited = await_redis_ready(name, rd, svc.timeout_seconds)
                    action.detail += "; answering PING" if waited else "; not answering PING"
            case None if action.kind == "enable_aof":
                run_action(action, enable_aof, name, rd)
    # 5. verify and report
    after = before
    if approved:
        after = health_findings(name, rd, read_redis_health(name, rd, p.sample_seconds), p)
        after += maintenance.leave(after)
    return run.finish(before, after, actions)
