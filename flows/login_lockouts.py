"""login-lockouts: clear the lockouts of one user or IP, or all of them, from Redis (and from a
lockout table in PostgreSQL when one is configured) (seed 001 "Excessive login lockouts")."""

from __future__ import annotations

from typing import get_args

from prefect import State

from tasks.engine import run_action, runbook_flow
from tasks.gate import APPROVAL_TIMEOUT_SECONDS, ApprovalTimeout
from tasks.models import AlertInfo, Approval, Finding, Report
from tasks.postgres import count_lockout_rows, delete_lockout_rows, read_writability
from tasks.redis import clear_lockout_keys, find_lockout_keys
from tasks.redis_rules import (
    LockoutAction,
    LockoutParams,
    lockout_findings,
    plan_lockouts,
    refuse_rows,
)
from tasks.run import open_run
from tasks.settings import Settings

RUNBOOK = "login-lockouts"


@runbook_flow(RUNBOOK, inventory="redis", actions=get_args(LockoutAction))
def login_lockouts(
    target: str,
    dry_run: bool = True,
    approval: Approval = "ask",
    approval_timeout_seconds: ApprovalTimeout = APPROVAL_TIMEOUT_SECONDS,
    params: LockoutParams | None = None,
    alert: AlertInfo | None = None,
) -> State[Report]:
    """The login lockouts of one subject (a user id, email or IP), or of all, in Redis and in
    the lockout table in PostgreSQL when one is configured.

    May UNLINK the lockout keys (found with SCAN) and DELETE the subject's rows from the
    lockout table.
    """
    run = open_run(Settings.redis_target, target, LockoutParams, params)
    name, rd, p = run.name, run.target, run.p
    table = rd.lockout_table
    pg_name, pg = run.settings.postgres_target(table.postgres) if table else (None, None)

    def diagnose() -> list[Finding]:
        keys, sample = find_lockout_keys(name, rd, p.subject)
        rows = None
        if table is not None and pg_name is not None and pg is not None:
            rows = count_lockout_rows(pg_name, pg, name, table, p.subject)
        return lockout_findings(name, rd, p, keys, sample, rows)

    # 1. diagnose
    before = diagnose()
    # 2. plan: one action per place that holds lockouts of this subject
    actions = plan_lockouts(name, p, before)
    if pg_name and pg and any(a.kind == "clear_lockout_rows" for a in actions):
        refuse_rows(actions, pg_name, read_writability(pg_name, pg).refusal)
    # 3. gate
    approved = run.gate(actions, before)
    # 4. act
    for action in approved:
        if action.kind == "clear_lockout_keys":
            removed = run_action(action, clear_lockout_keys, name, rd, p.subject)
        else:
            assert pg_name is not None and pg is not None and table is not None
            removed = run_action(action, delete_lockout_rows, pg_name, pg, name, table, p.subject)
        if removed is not None:
            action.detail = f"removed {removed}"
    # 5. verify and report
    after = diagnose() if approved else before
    return run.finish(before, after, actions)
