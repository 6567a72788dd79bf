"""postgres-connections: pool exhaustion, leaked transactions, runaway queries, lock pile-ups
(seeds 000 s2, 002 s5, 003 "Database Connection Issues", 004 s5)."""

from __future__ import annotations

from typing import get_args

from prefect import State

from tasks.engine import run_action, runbook_flow
from tasks.gate import APPROVAL_TIMEOUT_SECONDS, ApprovalTimeout
from tasks.models import AlertInfo, Approval, Report
from tasks.postgres import (
    CANCELLED,
    await_queries_ended,
    cancel_query,
    read_activity,
    terminate_backend,
)
from tasks.postgres_rules import (
    ConnectionsAction,
    ConnectionsParams,
    connection_findings,
    plan_connections,
)
from tasks.run import open_run
from tasks.settings import Settings

RUNBOOK = "postgres-connections"


@runbook_flow(RUNBOOK, inventory="postgres", actions=get_args(ConnectionsAction))
def postgres_connections(
    target: str,
    dry_run: bool = True,
    approval: Approval = "ask",
    approval_timeout_seconds: ApprovalTimeout = APPROVAL_TIMEOUT_SECONDS,
    params: ConnectionsParams | None = None,
    alert: AlertInfo | None = None,
) -> State[Report]:
    """Connections against max_connections, sessions idle in transaction, long queries and lock
    waits on one PostgreSQL.

    May cancel long queries (terminating those that ignore the cancel) and terminate
    sessions idle in transaction: client backends only, within the allow-lists and
    max_backends_ended a run.
    """
    run = open_run(Settings.postgres_target, target, ConnectionsParams, params)
    name, pg, p = run.name, run.target, run.p

    # 1. diagnose
    activity = read_activity(name, pg)
    before = connection_findings(name, activity, pg, p)
    # 2. plan
    actions = plan_connections(name, activity, pg, p)
    # 3. gate
    approved = run.gate(actions, before)
    # 4. act: cancels first, a terminate only for queries that outlive the grace period
    cancels = [a for a in approved if a.kind == "cancel_query"]
    for action in cancels:
        run_action(action, cancel_query, name, pg, action.args)
    signalled = [a for a in cancels if a.detail == CANCELLED]
    if signalled:
        still = set(
            await_queries_ended(name, pg, [a.args for a in signalled], p.cancel_grace_seconds)
        )
        for action in (a for a in signalled if a.args.pid in still):
            run_action(action, terminate_backend, name, pg, action.args, "active")
            action.detail = f"cancel ignored for {p.cancel_grace_seconds} s; {action.detail}"
    for action in (a for a in approved if a.kind == "terminate_backend"):
        run_action(action, terminate_backend, name, pg, action.args, "idle_in_transaction")
    # 5. verify and report
    after = connection_findings(name, read_activity(name, pg), pg, p) if approved else before
    return run.finish(before, after, actions)
