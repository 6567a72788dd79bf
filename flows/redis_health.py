"""redis-health: Redis down, out of memory, evicting, or on the wrong eviction policy for its
role (seeds 000 s1, 001 "Redis unavailable", 004 s4)."""

from __future__ import annotations

from prefect import flow

from tasks.engine import finish, run_action
from tasks.gate import Approval, gate
from tasks.models import Report, utcnow
from tasks.redis import read_redis_health, set_maxmemory_policy
from tasks.redis_rules import RedisHealthParams, health_findings, plan_health
from tasks.settings import load_settings

RUNBOOK = "redis-health"


@flow(name=RUNBOOK, flow_run_name="{target}")
def redis_health(
    target: str,
    dry_run: bool = True,
    approval: Approval = "ask",
    params: RedisHealthParams | None = None,
) -> Report:
    started = utcnow()
    name, rd = load_settings().redis_target(target)
    p = RedisHealthParams.resolve(params, rd.thresholds, f"{RUNBOOK} on {name}")

    # 1. diagnose
    health = read_redis_health(name, rd, p.sample_seconds)
    before = health_findings(name, rd, health, p)
    # 2. plan
    actions = plan_health(name, rd, health)
    # 3. gate
    approved = gate(actions, dry_run=dry_run, approval=approval)
    # 4. act
    for action in approved:
        run_action(action, set_maxmemory_policy, name, rd, action.args["policy"])
    # 5. verify and report
    after = before
    if approved:
        after = health_findings(name, rd, read_redis_health(name, rd, p.sample_seconds), p)
    return finish(
        RUNBOOK,
        name,
        dry_run=dry_run,
        started_at=started,
        before=before,
        after=after,
        actions=actions,
    )
