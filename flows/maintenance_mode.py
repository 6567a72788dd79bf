"""maintenance-mode: put an application in maintenance mode or take it out, through its own
admin API, and read the flag back (seeds 004 s2 step 5 "Enable maintenance mode
temporarily", s3 step 6, s12 step 3; 001 "keep the application in maintenance mode until
Redis is restored")."""

from __future__ import annotations

from typing import get_args

from prefect import State

from tasks.engine import run_action, runbook_flow
from tasks.gate import APPROVAL_TIMEOUT_SECONDS, ApprovalTimeout
from tasks.maintenance import maintained_service, read_flag, set_maintenance
from tasks.maintenance_rules import (
    MaintenanceAction,
    MaintenanceParams,
    MaintenanceReading,
    MaintenanceStep,
    maintenance_finding,
    plan_maintenance,
)
from tasks.models import AlertInfo, Approval, Finding, Report
from tasks.run import open_run

RUNBOOK = "maintenance-mode"


@runbook_flow(RUNBOOK, inventory="services", actions=get_args(MaintenanceAction))
def maintenance_mode(
    target: str,
    dry_run: bool = True,
    approval: Approval = "ask",
    approval_timeout_seconds: ApprovalTimeout = APPROVAL_TIMEOUT_SECONDS,
    params: MaintenanceParams | None = None,
    alert: AlertInfo | None = None,
) -> State[Report]:
    """Whether the application of a [services.NAME] with `maintenance` is in maintenance mode,
    read from its admin API's check_url (or its health_url), against `enable`.

    May switch the flag with the admin API's configured request (PUT body_on or body_off with
    its bearer token), then reads it back.
    """
    run = open_run(maintained_service, target, MaintenanceParams, params)
    name, svc, p = run.name, run.target, run.p
    enable = bool(p.enable)  # MaintenanceParams refuses a run that leaves it unset

    def diagnose() -> tuple[MaintenanceReading, list[Finding]]:
        reading = read_flag(name, svc)
        return reading, [maintenance_finding(name, reading, enable)]

    # 1. diagnose
    reading, before = diagnose()
    # 2. plan: one switch, when the flag is not as wanted
    actions: list[MaintenanceStep] = plan_maintenance(name, reading, enable)
    # 3. gate
    approved = run.gate(actions, before)
    # 4. act
    for action in approved:
        run_action(action, set_maintenance, name, svc, action.kind == "enable_maintenance")
    # 5. verify and report: read it back
    after = diagnose()[1] if approved else before
    return run.finish(before, after, actions)
