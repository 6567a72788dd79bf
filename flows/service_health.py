"""service-health: an app not responding, or answering that a dependency is down (seeds 001,
002 s2, 003 "Application Not Responding", 004 s1 and s10, 000 s7). A failing dependency is
handed to its own runbook as a subflow instead of restarting the app; a failing app gets a
gated restart, then readiness is awaited."""

from __future__ import annotations

from functools import partial
from typing import get_args

from prefect import State

from flows.postgres_down import postgres_down
from flows.redis_health import redis_health
from tasks.engine import RunbookFlow, run_action, runbook_flow
from tasks.errors import ConfigError
from tasks.gate import APPROVAL_TIMEOUT_SECONDS, ApprovalTimeout
from tasks.http import is_answering, probe_services
from tasks.models import (
    ActionStatus,
    AlertInfo,
    Approval,
    Finding,
    Report,
    ServiceRef,
    Severity,
    problems,
)
from tasks.releases import record_healthy_images, snapshot_images
from tasks.run import open_each
from tasks.service_rules import (
    DependencyKind,
    Handoff,
    ServiceHealthAction,
    ServiceHealthParams,
    http_findings,
    plan_services,
)
from tasks.services import restart_service
from tasks.settings import ServiceTarget, Settings
from tasks.wait import poll

RUNBOOK = "service-health"
HANDOFF: dict[DependencyKind, RunbookFlow[...]] = {
    "postgres": postgres_down,
    "redis": redis_health,
}


@runbook_flow(RUNBOOK, inventory="services", actions=get_args(ServiceHealthAction))
def service_health(
    target: str = "all",
    dry_run: bool = True,
    approval: Approval = "ask",
    approval_timeout_seconds: ApprovalTimeout = APPROVAL_TIMEOUT_SECONDS,
    params: ServiceHealthParams | None = None,
    alert: AlertInfo | None = None,
) -> State[Report]:
    """The health and ready URLs of each service (or of one), and the components their bodies
    report.

    Hands a failing dependency to its runbook (postgres-down, redis-health), with this run's
    dry_run and approval; may restart an app failing on its own, then waits for it to
    answer.
    """

    def probed(settings: Settings, p: ServiceHealthParams) -> dict[str, ServiceTarget]:
        chosen = p.service or target
        if chosen == "all":
            found = {n: s for n, s in settings.services.items() if s.health_url or s.ready_url}
        else:
            found = dict([settings.service_target(chosen)])
        if not found or not any(s.health_url or s.ready_url for s in found.values()):
            raise ConfigError(
                f"{RUNBOOK}: no service with a health_url or ready_url in "
                f'{chosen!r}: add health_url = "http://..." to [services.NAME]'
            )
        return found

    run = open_each(probed, lambda p: p.service or target, ServiceHealthParams, params)
    # Each service's own ready_timeout_seconds (per); a value given for the run wins over them.
    services, per = run.targets, run.per

    # 1. diagnose (the docker services' images first: a deploy during the probes is not
    # recorded as healthy below)
    images = snapshot_images(services)
    probes = probe_services(services)
    before = http_findings(probes)
    # 2. plan: dependencies go to their runbook; only an app failing on its own is restarted
    actions = plan_services(probes, services, run.settings, per)
    # 3. gate: hand-offs run either way; the runbook they start has its own dry run and gate
    handoffs = [a for a in actions if a.kind == "handoff"]
    approved = run.gate([a for a in actions if a.kind != "handoff"], before)
    # 4. act
    for action in handoffs:
        assert isinstance(action.args, Handoff)
        sub = HANDOFF[action.args.section](
            target=action.args.target,
            dry_run=dry_run,
            approval=approval,
            approval_timeout_seconds=approval_timeout_seconds,
        )
        action.status = ActionStatus.done
        action.detail = f"{sub.runbook} on {sub.target}: {sub.status.value}"
    for action in approved:
        assert isinstance(action.args, ServiceRef)
        name = action.args.service
        if run_action(action, restart_service, name, services[name]) is not None:
            ready_timeout = per[name].ready_timeout_seconds
            waited = poll(
                partial(is_answering, name, services[name]),
                what=f"service {name!r} to answer",
                timeout_seconds=ready_timeout,
                first_delay_seconds=1,
                max_delay_seconds=1,
            )
            action.detail += (
                "; answering again"
                if waited.done
                else f"; not answering within {ready_timeout:g} s"
            )
    # 5. verify and report
    after = http_findings(probe_services(services)) if handoffs or approved else before
    # The image each healthy docker service runs is its last healthy one (release-rollback).
    # One not recorded (a deploy under way, the Prefect API away) is said, but leaves the
    # service's health as it is: release-rollback keeps the record before it.
    failing = {f.target for f in problems(after)}
    healthy = [n for n in images if n not in failing]
    unrecorded = record_healthy_images(services, healthy, images, run.started_at)
    after = [
        *after,
        *(
            Finding(
                check="healthy_image",
                target=n,
                severity=Severity.ok,
                message=f"{text}; release-rollback keeps the one recorded before",
            )
            for n, text in unrecorded.items()
        ),
    ]
    return run.finish(before, after, actions)
