"""resource-pressure: CPU and memory of the services, OOM kills and restarts, the host's memory
and load (seeds 002 s4, 003 "High CPU/Memory Usage"); a gated restart of a service over its
own memory limit."""

from __future__ import annotations

from typing import get_args

from prefect import State

from tasks.engine import run_action, runbook_flow
from tasks.gate import APPROVAL_TIMEOUT_SECONDS, ApprovalTimeout
from tasks.host import read_host_stats
from tasks.models import AlertInfo, Approval, Finding, Report
from tasks.run import open_each
from tasks.service_rules import (
    ResourceAction,
    ResourceParams,
    by_urgency,
    host_findings,
    plan_resource_restarts,
    resource_findings,
)
from tasks.services import (
    ServiceStats,
    remote_docker_host,
    restart_service,
    service_stats,
    service_status,
)

RUNBOOK = "resource-pressure"


@runbook_flow(RUNBOOK, inventory="services", actions=get_args(ResourceAction))
def resource_pressure(
    target: str = "all",
    dry_run: bool = True,
    approval: Approval = "ask",
    approval_timeout_seconds: ApprovalTimeout = APPROVAL_TIMEOUT_SECONDS,
    params: ResourceParams | None = None,
    alert: AlertInfo | None = None,
) -> State[Report]:
    """CPU and memory of each service, OOM kills and restarts, the host's memory and load; top
    consumers first.

    May restart a service using more than memory_percent of its own memory limit.
    """
    run = open_each(
        lambda settings, _: (
            settings.services if target == "all" else dict([settings.service_target(target)])
        ),
        target,
        ResourceParams,
        params,
    )
    # Each service's own thresholds (per); values given for the run win over them.
    services, p, per = run.targets, run.p, run.per

    def diagnose() -> tuple[list[Finding], dict[str, ServiceStats | None]]:
        host = read_host_stats(remote_docker_host(services))
        found, stats = host_findings(host, p), {}
        for name, svc in services.items():
            stats[name] = service_stats(name, svc)
            found += resource_findings(
                name, service_status(name, svc), stats[name], host, per[name]
            )
        return by_urgency(found), stats

    # 1. diagnose
    before, stats = diagnose()
    # 2. plan: restart only what is over its own limit (not merely large on the host)
    actions = plan_resource_restarts(before, stats)
    # 3. gate
    approved = run.gate(actions, before)
    # 4. act
    for action in approved:
        name = action.args.service
        run_action(action, restart_service, name, services[name])
    # 5. verify and report
    after = diagnose()[0] if approved else before
    return run.finish(before, after, actions)
