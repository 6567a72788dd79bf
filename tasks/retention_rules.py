"""Pure decisions for backup-retention (seed 000 section 4, "prune old backups"; seed 002
"Backup & Recovery"): grandfather-father-son by UTC day, ISO week and month. No I/O here.

The policy, as restic and borg count it: `keep_daily` keeps the newest backup of each of the
N most recent UTC days that have a backup (days without one are not counted), `keep_weekly`
the same by ISO week, `keep_monthly` by month. The rules are independent: a backup kept by
one may also fill a slot of another. Whatever the counts, the newest backup and every backup
younger than a day are kept, and one run deletes at most `max_deletions`, oldest first.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field

from tasks.models import Action, Finding, Params, Severity

if TYPE_CHECKING:
    from tasks.backups import Backup

# The kinds of action backup-retention plans (the flow and deployments.catalog read them from here).
RetentionAction = Literal["delete_backup"]


class BackupKey(BaseModel):
    """A backup to delete: its key (an S3 key, or a path in the backups directory)."""

    model_config = ConfigDict(frozen=True)

    key: str


MIN_AGE = timedelta(hours=24)
ROWS_SHOWN = 200  # rows of the per-backup table in the report; the counts cover the rest


class RetentionParams(Params):
    keep_daily: int = Field(
        7, ge=0, le=3660, description="days whose newest backup is kept; 0 to 3660"
    )
    keep_weekly: int = Field(
        4, ge=0, le=520, description="ISO weeks whose newest backup is kept; 0 to 520"
    )
    keep_monthly: int = Field(
        6, ge=0, le=1200, description="months whose newest backup is kept; 0 to 1200"
    )
    max_deletions: int = Field(
        50, ge=1, le=10_000, description="most backups deleted per run; 1 to 10000"
    )


class Decision(BaseModel):
    key: str
    modified: datetime
    size: int
    verdict: Literal["keep", "delete", "deferred"]  # deferred: past the policy, over the cap
    why: list[str]


class RetentionPlan(BaseModel):
    decisions: list[Decision]  # newest first

    @property
    def delete(self) -> list[Decision]:
        """This run's deletions, oldest first."""
        return [d for d in reversed(self.decisions) if d.verdict == "delete"]

    @property
    def deferred(self) -> list[Decision]:
        return [d for d in self.decisions if d.verdict == "deferred"]

    @property
    def kept(self) -> list[Decision]:
        return [d for d in self.decisions if d.verdict == "keep"]


def day(at: datetime) -> str:
    return at.astimezone(UTC).strftime("%Y-%m-%d")


def iso_week(at: datetime) -> str:
    year, week, _ = at.astimezone(UTC).isocalendar()
    return f"{year}-W{week:02d}"


def month(at: datetime) -> str:
    return at.astimezone(UTC).strftime("%Y-%m")


def plan_retention(backups: Sequence[Backup], now: datetime, p: RetentionParams) -> RetentionPlan:
    # Ties on the timestamp are broken by key so that a plan never depends on listing order.
    ordered = sorted(backups, key=lambda b: (b.modified, b.key), reverse=True)
    why: dict[str, list[str]] = {b.key: [] for b in ordered}
    if ordered:
        why[ordered[0].key].append("newest")
    for backup in ordered:
        if now - backup.modified < MIN_AGE:
            why[backup.key].append("younger than 24 h")
    rules: list[tuple[str, int, Callable[[datetime], str]]] = [
        ("daily", p.keep_daily, day),
        ("weekly", p.keep_weekly, iso_week),
        ("monthly", p.keep_monthly, month),
    ]
    for rule, count, period_of in rules:
        periods: set[str] = set()
        for backup in ordered:  # newest first: the first seen of a period is its newest
            period = period_of(backup.modified)
            if period in periods:
                continue
            if len(periods) >= count:
                break
            periods.add(period)
            why[backup.key].append(f"{rule} {period}")
    eligible = [b.key for b in reversed(ordered) if not why[b.key]]  # oldest first
    now_deleted = set(eligible[: p.max_deletions])
    decisions = []
    for backup in ordered:
        reasons = why[backup.key]
        if reasons:
            verdict: Literal["keep", "delete", "deferred"] = "keep"
        elif backup.key in now_deleted:
            verdict, reasons = "delete", ["past the policy"]
        else:
            verdict, reasons = "deferred", ["past the policy; over max_deletions: a later run"]
        decisions.append(
            Decision(
                key=backup.key,
                modified=backup.modified,
                size=backup.size,
                verdict=verdict,
                why=reasons,
            )
        )
    return RetentionPlan(decisions=decisions)


def _kept_summary(plan: RetentionPlan) -> str:
    counts = {"newest": 0, "younger than 24 h": 0, "daily": 0, "weekly": 0, "monthly": 0}
    for decision in plan.kept:
        for reason in decision.why:
            for label in counts:
                if reason.startswith(label):
                    counts[label] += 1
    return ", ".join(f"{n} {label}" for label, n in counts.items() if n)


def retention_findings(
    name: str, where: str, plan: RetentionPlan, p: RetentionParams
) -> list[Finding]:
    policy = (
        f"keep_daily={p.keep_daily}, keep_weekly={p.keep_weekly}, keep_monthly={p.keep_monthly}"
    )
    if not plan.decisions:
        return [
            Finding(
                check="retention",
                target=name,
                severity=Severity.ok,
                observed=0,
                threshold=p.max_deletions,
                message=f"no backups in {where}: nothing to prune (backup-verification says "
                "whether one is missing)",
            )
        ]
    delete, deferred = plan.delete, plan.deferred
    past = len(delete) + len(deferred)
    found = [
        Finding(
            check="retention",
            target=name,
            severity=Severity.warning if past else Severity.ok,
            observed=past,
            threshold=p.max_deletions,
            message=f"{len(plan.decisions)} backups in {where}; {len(plan.kept)} kept "
            f"({_kept_summary(plan)}; a backup may count for several rules); "
            + (
                f"{past} past the policy ({policy}): delete the oldest first"
                if past
                else f"none past the policy ({policy})"
            ),
        )
    ]
    if deferred:
        found.append(
            Finding(
                check="max_deletions",
                target=name,
                severity=Severity.warning,
                observed=past,
                threshold=p.max_deletions,
                message=f"{past} backups are past the policy, more than max_deletions="
                f"{p.max_deletions}: this run deletes the {len(delete)} oldest, later runs "
                "the rest (or raise max_deletions for one run)",
            )
        )
    shown = plan.decisions[:ROWS_SHOWN]
    found.append(
        Finding(
            check="backups",
            target=name,
            severity=Severity.ok,
            observed=[
                {
                    "key": d.key,
                    "modified": f"{d.modified.astimezone(UTC):%Y-%m-%d %H:%M} UTC",
                    "MiB": round(d.size / 2**20, 1),
                    "verdict": d.verdict,
                    "why": "; ".join(d.why),
                }
                for d in shown
            ],
            message="each backup, newest first, and why it is kept or deleted"
            + (
                f" (the newest {ROWS_SHOWN} of {len(plan.decisions)})"
                if len(plan.decisions) > ROWS_SHOWN
                else ""
            ),
        )
    )
    return found


def plan_deletions(name: str, plan: RetentionPlan) -> list[Action[RetentionAction, BackupKey]]:
    """A delete of each backup the plan does not keep, with its .sha256."""
    return [
        Action(
            kind="delete_backup",
            target=name,
            description=f"delete {d.key} ({d.modified.astimezone(UTC):%Y-%m-%d %H:%M} UTC, "
            f"{d.size / 2**20:.1f} MiB) and its .sha256",
            destructive=True,
            args=BackupKey(key=d.key),
        )
        for d in plan.delete
    ]
