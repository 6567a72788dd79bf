"""backup-retention: keep N daily, M weekly and K monthly backups and delete the rest, in S3 or
a directory, each with its .sha256 (seed 000 section 4, "prune old backups"; seed 002 "Backup
& Recovery"). Never the newest, never one younger than a day, at most max_deletions a run."""

from __future__ import annotations

from typing import get_args

from prefect import State

from tasks.backup_rules import storage_finding
from tasks.backups import backups_location, list_backups
from tasks.engine import runbook_flow
from tasks.errors import AuthenticationFailed, TargetUnreachable
from tasks.gate import APPROVAL_TIMEOUT_SECONDS, ApprovalTimeout
from tasks.models import Action, ActionStatus, AlertInfo, Approval, Report, utcnow
from tasks.retention import delete_approved
from tasks.retention_rules import (
    BackupKey,
    RetentionAction,
    RetentionParams,
    plan_deletions,
    plan_retention,
    retention_findings,
)
from tasks.run import open_run
from tasks.settings import Settings

RUNBOOK = "backup-retention"
RetentionStep = Action[RetentionAction, BackupKey]


@runbook_flow(RUNBOOK, inventory="backups", actions=get_args(RetentionAction))
def backup_retention(
    target: str,
    dry_run: bool = True,
    approval: Approval = "ask",
    approval_timeout_seconds: ApprovalTimeout = APPROVAL_TIMEOUT_SECONDS,
    params: RetentionParams | None = None,
    alert: AlertInfo | None = None,
) -> State[Report]:
    """The backups of a set against the policy: the newest of the last N days, M ISO weeks and
    K months are kept.

    May delete the others and their .sha256, oldest first, at most max_deletions a run;
    never the newest, nor one younger than 24 h.
    """
    run = open_run(Settings.backup_set, target, RetentionParams, params)
    name, cfg, p = run.name, run.target, run.p
    s3 = run.settings.storage_of(cfg)
    where = backups_location(cfg, s3)

    # 1. diagnose
    try:
        backups = list_backups(name, cfg, s3)
    except (TargetUnreachable, AuthenticationFailed) as exc:
        found = [storage_finding(name, str(exc))]
        return run.finish(found, found, [])
    now = utcnow()
    plan = plan_retention(backups, now, p)
    before = retention_findings(name, where, plan, p)
    # 2. plan
    actions = plan_deletions(name, plan)
    # 3. gate
    approved = run.gate(actions, before)
    # 4. act: one batched call for all of them; each action gets its own outcome
    if approved:
        delete_approved(name, cfg, s3, approved)
    # 5. verify: list again and hold what is left to the same policy and the same `now`
    after = before
    if approved:
        try:
            left = list_backups(name, cfg, s3)
        except (TargetUnreachable, AuthenticationFailed) as exc:
            after = [storage_finding(name, f"listing again after deleting: {exc}")]
        else:
            after = retention_findings(name, where, plan_retention(left, now, p), p)
            _still_listed(approved, {b.key for b in left})
    return run.finish(before, after, actions)


def _still_listed(approved: list[RetentionStep], listed: set[str]) -> None:
    """A store that acknowledges a delete and still lists the key has not deleted it."""
    for action in approved:
        if action.status is ActionStatus.done and action.args.key in listed:
            action.status = ActionStatus.failed
            action.detail = "acknowledged, but still listed afterwards"
