"""stuck-jobs: jobs left 'running' by a dead worker (seed 004 s6) go back to 'pending'."""

from __future__ import annotations

from typing import get_args

from prefect import State

from tasks.engine import run_action, runbook_flow
from tasks.errors import ConfigError
from tasks.gate import APPROVAL_TIMEOUT_SECONDS, ApprovalTimeout
from tasks.models import AlertInfo, Approval, Report
from tasks.postgres import find_stuck_jobs, reset_stuck_jobs, skip_if_read_only
from tasks.postgres_rules import (
    StuckJobsAction,
    StuckJobsParams,
    listing,
    plan_stuck_jobs,
    stuck_findings,
)
from tasks.run import open_run
from tasks.settings import Settings

RUNBOOK = "stuck-jobs"


@runbook_flow(RUNBOOK, inventory="postgres", actions=get_args(StuckJobsAction))
def stuck_jobs(
    target: str,
    dry_run: bool = True,
    approval: Approval = "ask",
    approval_timeout_seconds: ApprovalTimeout = APPROVAL_TIMEOUT_SECONDS,
    params: StuckJobsParams | None = None,
    alert: AlertInfo | None = None,
) -> State[Report]:
    """Jobs left running longer than the threshold in the target's jobs table.

    May reset them to pending in one transaction, only rows still stuck, at most
    max_jobs_reset.
    """
    run = open_run(Settings.postgres_target, target, StuckJobsParams, params)
    name, pg, p = run.name, run.target, run.p
    if pg.jobs is None:
        raise ConfigError(
            f"postgres target {name!r} has no jobs table: add [postgres.{name}.jobs] with "
            'table = "SCHEMA.TABLE" (see README, Configuration)'
        )
    jobs = pg.jobs

    # 1. diagnose
    stuck = find_stuck_jobs(name, pg, jobs, p.stuck_after_minutes)
    before = stuck_findings(name, jobs, stuck, p)
    # 2. plan
    actions = plan_stuck_jobs(name, jobs, stuck, p)
    skip_if_read_only(name, pg, actions, "run stuck-jobs on the primary")
    # 3. gate
    approved = run.gate(actions, before)
    # 4. act: one transaction, only rows still stuck
    for action in approved:
        reset = run_action(
            action, reset_stuck_jobs, name, pg, jobs, action.args.ids, p.stuck_after_minutes
        )
        if reset is not None:
            action.detail = f"reset {len(reset)} jobs: ids {listing(reset)}"
    # 5. verify and report
    after = before
    if approved:
        after = stuck_findings(
            name, jobs, find_stuck_jobs(name, pg, jobs, p.stuck_after_minutes), p
        )
    return run.finish(before, after, actions)
