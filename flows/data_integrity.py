"""data-integrity: orphan rows along the configured relations, at every level, and expired
sessions (seed 003 "Data Corruption" and "Login Problems")."""

from __future__ import annotations

from typing import get_args

from prefect import State

from tasks.engine import run_action, runbook_flow
from tasks.gate import APPROVAL_TIMEOUT_SECONDS, ApprovalTimeout
from tasks.integrity import delete_expired_sessions, delete_orphans, read_integrity
from tasks.integrity_rules import (
    IntegrityAction,
    IntegrityParams,
    OrphanRef,
    integrity_findings,
    plan_integrity,
)
from tasks.models import AlertInfo, Approval, Report
from tasks.postgres import skip_if_read_only
from tasks.run import open_run
from tasks.settings import Settings

RUNBOOK = "data-integrity"


@runbook_flow(RUNBOOK, inventory="integrity", actions=get_args(IntegrityAction))
def data_integrity(
    target: str,
    dry_run: bool = True,
    approval: Approval = "ask",
    approval_timeout_seconds: ApprovalTimeout = APPROVAL_TIMEOUT_SECONDS,
    params: IntegrityParams | None = None,
    alert: AlertInfo | None = None,
) -> State[Report]:
    """Orphan rows of each configured relation (their parent row is gone, or is an orphan
    itself), with their count and a sample of ids; expired sessions; live rows per table.

    May DELETE the orphans, deepest level first, and the expired sessions, in batches each
    its own transaction, at most max_rows_deleted orphans and max_sessions_deleted sessions.
    """
    run = open_run(Settings.integrity_set, target, IntegrityParams, params)
    name, cfg, p = run.name, run.target, run.p
    pg_name, pg = run.settings.postgres_target(cfg.target)

    # 1. diagnose
    state = read_integrity(pg_name, pg, name, cfg, p.sample_size)
    before = integrity_findings(name, cfg, state, p)
    # 2. plan: deepest level first, within the caps
    actions = plan_integrity(name, cfg, state, p)
    skip_if_read_only(pg_name, pg, actions, "run data-integrity on the primary")
    # 3. gate
    approved = run.gate(actions, before)
    # 4. act: one batch per transaction
    for action in approved:
        if isinstance(action.args, OrphanRef):
            run_action(
                action,
                delete_orphans,
                pg_name,
                pg,
                name,
                cfg.relations,
                action.args.relation,
                action.args.limit,
                p.batch_size,
            )
        elif cfg.sessions is not None:
            run_action(
                action,
                delete_expired_sessions,
                pg_name,
                pg,
                name,
                cfg.sessions,
                action.args.limit,
                p.batch_size,
            )
    # 5. verify and report
    after = before
    if approved:
        after = integrity_findings(
            name, cfg, read_integrity(pg_name, pg, name, cfg, p.sample_size), p
        )
    return run.finish(before, after, actions)
