"""release-rollback: a docker service failing its health check after its image changed goes back
to the image it last ran healthy, recorded by service-health (seeds 000 s6 "Rollback image to
previous version", 002 s6 "Rollback to previous version", 003 "Deployment Failures", 004 s1
step 3 "rollback")."""

from __future__ import annotations

from functools import partial
from typing import get_args

from prefect import State

from tasks.engine import run_action, runbook_flow
from tasks.errors import ConfigError
from tasks.gate import APPROVAL_TIMEOUT_SECONDS, ApprovalTimeout
from tasks.http import is_answering, probe_services
from tasks.models import AlertInfo, Approval, Finding, Report, Severity
from tasks.release_rules import (
    ReleaseAction,
    ReleaseParams,
    Rollback,
    plan_rollback,
    release_findings,
)
from tasks.releases import read_release, rollback_image
from tasks.run import open_run
from tasks.service_rules import dependency_for, http_findings, status_finding
from tasks.services import service_status
from tasks.settings import Settings
from tasks.wait import poll

RUNBOOK = "release-rollback"


@runbook_flow(RUNBOOK, inventory="services", actions=get_args(ReleaseAction))
def release_rollback(
    target: str,
    dry_run: bool = True,
    approval: Approval = "ask",
    approval_timeout_seconds: ApprovalTimeout = APPROVAL_TIMEOUT_SECONDS,
    params: ReleaseParams | None = None,
    alert: AlertInfo | None = None,
) -> State[Report]:
    """A docker service's health (its health and ready URLs, its containers' state), the image
    its containers run, and the image service-health last recorded it healthy on (a Prefect
    variable); whether it fails because its image changed.

    May recreate its containers on that last healthy image with the same definition, one at a
    time (the old one is removed only once the new one runs, and put back if it does not), and
    only those still the containers judged bad on their image (a release deployed while the
    approval waited is left alone: the action fails saying so), then waits for it to answer.
    Refuses when no healthy image is known, when the image did not change, when a dependency
    is to blame, or when the image is no longer on the engine.
    """
    run = open_run(Settings.service_target, target, ReleaseParams, params)
    name, svc, p = run.name, run.target, run.p
    if svc.kind != "docker" or not (svc.health_url or svc.ready_url):
        raise ConfigError(
            f"{RUNBOOK}: [services.{name}] is kind {svc.kind}"
            + ("" if svc.health_url or svc.ready_url else " without a health_url or ready_url")
            + ': it needs kind = "docker" (container, or compose_project and compose_service) '
            'and health_url = "http://..."'
        )

    def diagnose() -> tuple[list[Finding], Rollback | None]:
        release = read_release(name, svc)
        probes = probe_services({name: svc})[name]
        health = http_findings({name: probes})
        status = status_finding(name, name, service_status(name, svc))
        # An app that says it is in maintenance was put there on purpose: no bad release.
        failing = any(not probe.ok and not probe.in_maintenance for probe in probes)
        failing = failing or status.severity is not Severity.ok
        blamed = sorted(
            f"{component} ({ref})"
            for probe in probes
            for component in probe.failing
            if (ref := dependency_for(component, svc, run.settings))
        )
        found, rollback = release_findings(name, release, failing, blamed)
        return [*health, status, *found], rollback

    # 1. diagnose
    before, rollback = diagnose()
    # 2. plan
    actions = plan_rollback(name, rollback, p)
    # 3. gate
    approved = run.gate(actions, before)
    # 4. act
    for action in approved:
        if run_action(action, rollback_image, name, svc, action.args, p.start_grace_seconds):
            waited = poll(
                partial(is_answering, name, svc),
                what=f"service {name!r} to answer",
                timeout_seconds=p.ready_timeout_seconds,
                first_delay_seconds=1,
                max_delay_seconds=1,
            )
            action.detail += (
                "; answering again"
                if waited.done
                else f"; not answering within {p.ready_timeout_seconds:g} s"
            )
    # 5. verify and report
    after = diagnose()[0] if approved else before
    return run.finish(before, after, actions)
