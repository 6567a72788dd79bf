"""security-incident: revoke the sessions of compromised users, rotate the JWT signing key
and restart the services that read it, and show the last 24 h of the audit log (seeds 004 s12
"Security Incident (Token Compromise)", 002 "Suspected Security Breach", 001 secrets
rotation)."""

from __future__ import annotations

from functools import partial
from typing import Any, get_args

from prefect import State

from tasks.engine import run_action, runbook_flow
from tasks.gate import APPROVAL_TIMEOUT_SECONDS, ApprovalTimeout
from tasks.journal import journal
from tasks.maintenance import MaintenancePair
from tasks.models import (
    Action,
    ActionStatus,
    AlertInfo,
    Approval,
    Finding,
    Report,
    ServiceRef,
    utcnow,
)
from tasks.run import open_run
from tasks.security import (
    count_live_sessions,
    read_audit_log,
    read_jwt_key,
    revoke_sessions,
    rotate_jwt_key,
)
from tasks.security_rules import (
    KeyRotation,
    SecurityAction,
    SecurityParams,
    Users,
    audit_finding,
    check_rotation,
    key_finding,
    plan_security,
    session_findings,
)
from tasks.services import restart_service
from tasks.settings import Settings

RUNBOOK = "security-incident"


@runbook_flow(RUNBOOK, inventory="security", actions=get_args(SecurityAction))
def security_incident(
    target: str,
    dry_run: bool = True,
    approval: Approval = "ask",
    approval_timeout_seconds: ApprovalTimeout = APPROVAL_TIMEOUT_SECONDS,
    params: SecurityParams | None = None,
    alert: AlertInfo | None = None,
) -> State[Report]:
    """The live sessions of the named users, the JWT signing key's Prefect Secret block (by
    fingerprint only) and the audit log of the last 24 hours.

    May UPDATE the named users' live sessions to revoked, store a new key pair in the Secret
    block (the previous key kept under a dated name) and restart the services that read it.
    With the target's maintenance_service, the application is put in maintenance before those
    and taken out once the sessions and key verify (seed 004 s12 step 3).
    """
    run = open_run(Settings.security_target, target, SecurityParams, params)
    name, sec, p = run.name, run.target, run.p
    check_rotation(name, sec, p)
    pg_name, pg = run.settings.postgres_target(sec.postgres)
    # The key taken as compromised: the one the block holds when the run starts.
    key_before = read_jwt_key(name, sec)
    compromised = key_before.fingerprint if key_before and p.rotate_jwt else None

    def diagnose(first: bool) -> list[Finding]:
        live = count_live_sessions(pg_name, pg, name, sec, p.users)
        key = key_before if first else read_jwt_key(name, sec)
        found = session_findings(name, sec, p, live) + key_finding(name, sec, p, key, compromised)
        if sec.audit_log is not None:
            count, rows = read_audit_log(pg_name, pg, name, sec, p.audit_rows)
            found += audit_finding(name, sec, count, rows)
        return found

    # 1. diagnose
    before = diagnose(first=True)
    maintenance = MaintenancePair.read(run.settings, name, sec.maintenance_service)
    before += maintenance.findings
    # 2. plan: in maintenance around it when configured
    planned = plan_security(name, sec, p, before)
    # A rotation whose restarts did not all pass the gate is held back: before rate slots are
    # taken when a lock or the policy skipped a restart (and before the pair's check), after
    # them when a rate did.
    hold_back = partial(rotation_without_restarts, planned)
    journal().before_admit.append(hold_back)
    actions = maintenance.around(planned)
    # 3. gate
    approved = run.gate(actions, before)
    hold_back()
    approved = [a for a in approved if a.status is ActionStatus.planned]
    # 4. act: maintenance on first, then sessions (they stop the attacker at once), then the
    # key, then restarts
    rotated = False
    for action in maintenance.enter(approved):
        args = action.args
        if isinstance(args, Users):
            run_action(action, revoke_sessions, pg_name, pg, name, sec, args.users)
        elif isinstance(args, KeyRotation):
            done = run_action(action, rotate_jwt_key, name, args.block, args.algorithm, utcnow())
            rotated = done is not None
        elif isinstance(args, ServiceRef):
            if not rotated:
                # Restarting would only reload the key that is taken as compromised.
                action.status = ActionStatus.skipped
                action.detail = "the key was not rotated in this run: no restart"
                continue
            run_action(action, restart_service, args.service, run.settings.service(args.service))
    # 5. verify and report
    after = before
    if approved:
        after = diagnose(first=False)
        after += maintenance.leave(after)
    return run.finish(before, after, actions)


def rotation_without_restarts(actions: list[Action[SecurityAction, Any]]) -> None:
    """Skip a planned rotate_jwt_key when the restart of a service that reads the key did not
    pass the gate (skipped by a lock, the approval policy or a rate): that service would go
    on trusting the compromised key while the report said it was rotated. The reverse of the
    act step's rule (no rotation: no restart). Mutates the actions."""
    unrestarted = [
        a for a in actions if isinstance(a.args, ServiceRef) and a.status is ActionStatus.skipped
    ]
    if not unrestarted:
        return
    for action in actions:
        if isinstance(action.args, KeyRotation) and action.status is ActionStatus.planned:
            action.status = ActionStatus.skipped
            action.detail = (
                "not rotated: "
                + "; ".join(
                    f"the restart of {a.args.service} did not pass the gate ({a.detail})"
                    for a in unrestarted
                    if isinstance(a.args, ServiceRef)
                )
                + "; it would keep trusting the compromised key"
            )
