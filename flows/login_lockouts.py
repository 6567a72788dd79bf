"""login-lockouts: clear the lockouts of one user or IP, or all of them, from Redis (and from a
lockout table in PostgreSQL when one is configured) (seed 001 "Excessive login lockouts")."""

from __future__ import annotations

from prefect import State

from tasks.engine import finish, run_action, runbook_flow
from tasks.gate import APPROVAL_TIMEOUT_SECONDS, ApprovalTimeout, gate
from tasks.journal import begin
from tasks.models import Action, ActionStatus, AlertInfo, Approval, Finding, Report, Severity
from tasks.postgres import count_lockout_rows, delete_lockout_rows, read_writability
from tasks.redis import clear_lockout_keys, find_lockout_keys
from tasks.redis_rules import LockoutParams
from tasks.settings import load_settings

RUNBOOK = "login-lockouts"


@runbook_flow(RUNBOOK, inventory="redis", actions=("clear_lockout_keys", "clear_lockout_rows"))
def login_lockouts(
    target: str,
    dry_run: bool = True,
    approval: Approval = "ask",
    approval_timeout_seconds: ApprovalTimeout = APPROVAL_TIMEOUT_SECONDS,
    params: LockoutParams | None = None,
    alert: AlertInfo | None = None,
) -> State[Report]:
    started = begin(alert)
    settings = load_settings()
    name, rd = settings.redis_target(target)
    p = LockoutParams.resolve(params, {}, f"{RUNBOOK} on {name}")
    who = "all subjects" if p.all else repr(p.subject)
    table = rd.lockout_table
    pg_name, pg = settings.postgres_target(table.postgres) if table else (None, None)

    def diagnose() -> list[Finding]:
        keys, sample = find_lockout_keys(name, rd, p.subject)
        found = [
            Finding(
                check="lockout_keys",
                target=name,
                severity=Severity.warning if keys else Severity.ok,
                observed=keys,
                threshold=0,
                message=f"{keys} lockout keys for {who} under {rd.lockout_prefix}:"
                + (f"; e.g. {', '.join(sample)}" if sample else ""),
            )
        ]
        if table is not None and pg_name is not None and pg is not None:
            rows = count_lockout_rows(pg_name, pg, name, table, p.subject)
            found.append(
                Finding(
                    check="lockout_rows",
                    target=name,
                    severity=Severity.warning if rows else Severity.ok,
                    observed=rows,
                    threshold=0,
                    message=f"{rows} rows for {who} in {table.table} on postgres {table.postgres}",
                )
            )
        return found

    # 1. diagnose
    before = diagnose()
    # 2. plan: one action per place that holds lockouts of this subject
    described = {"lockout_keys": "UNLINK the lockout keys", "lockout_rows": "DELETE the rows"}
    actions = [
        Action(
            kind=f"clear_{f.check}",
            target=name,
            destructive=True,
            description=f"{described[f.check]} of {who} ({f.observed} now)",
        )
        for f in before
        if f.observed
    ]
    rows = [a for a in actions if a.kind == "clear_lockout_rows"]
    refusal = read_writability(pg_name, pg).refusal if rows and pg_name and pg else None
    for action in rows if refusal else []:
        action.status = ActionStatus.skipped
        action.detail = f"postgres {pg_name} refuses writes: {refusal}; delete them on the primary"
    # 3. gate
    approved = gate(
        actions,
        before,
        dry_run=dry_run,
        approval=approval,
        timeout_seconds=approval_timeout_seconds,
    )
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
    return finish(
        RUNBOOK,
        name,
        dry_run=dry_run,
        started_at=started,
        before=before,
        after=after,
        actions=actions,
    )
