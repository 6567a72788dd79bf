"""A fleet run's aggregated report: one runbook on many targets (deployments.fleet), each
target's own report, the targets never started and why, the totals, and its artifact.

Outcome: the worst of the targets' statuses (tasks.routines.SEVERITY_ORDER); targets left
not started make it at least unhealthy (exit 1: the fleet did not get through). Exit codes as
a runbook's: 0 healthy or fixed, 1 unhealthy, 3 failed."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

from pydantic import BaseModel

from tasks.models import Report, RunStatus, exit_code_of
from tasks.routines import SEVERITY_ORDER


class NotStarted(BaseModel):
    target: str
    reason: str


class FleetTotals(BaseModel):
    healthy: int = 0
    fixed: int = 0
    unhealthy: int = 0
    failed: int = 0
    not_started: int = 0


class FleetReport(BaseModel):
    """The fleet run: `targets` in the order they were started, each the runbook's usual report
    (DESIGN.md's report contract), then the targets that were not started."""

    runbook: str
    selector: str
    status: RunStatus
    targets: list[Report]
    not_started: list[NotStarted]
    totals: FleetTotals
    dry_run: bool
    max_concurrency: int
    max_errors: int
    started_at: datetime
    finished_at: datetime
    flow_run_id: str | None = None

    @property
    def exit_code(self) -> int:
        """0 healthy or fixed, 1 unhealthy (or targets not started), 3 failed."""
        return exit_code_of(self.status)

    def worst_first(self) -> list[Report]:
        """The targets' reports, worst status first, then by target name."""
        return sorted(self.targets, key=lambda r: (-SEVERITY_ORDER.index(r.status), r.target))


def fleet_status(reports: list[Report], not_started: list[NotStarted]) -> RunStatus:
    """The worst of the reports' statuses; at least unhealthy when a target was not started."""
    worst = max((r.status for r in reports), key=SEVERITY_ORDER.index, default=RunStatus.healthy)
    if not_started and SEVERITY_ORDER.index(worst) < SEVERITY_ORDER.index(RunStatus.unhealthy):
        return RunStatus.unhealthy
    return worst


def totals_of(reports: list[Report], not_started: list[NotStarted]) -> FleetTotals:
    counts = {status.value: 0 for status in RunStatus}
    for report in reports:
        counts[report.status.value] += 1
    return FleetTotals(**counts, not_started=len(not_started))


def summary_of(report: Report) -> str:
    """One line for a target's row: the first action that failed, else the first critical
    finding, else the first problem, else the count of checks."""
    failed = [a for a in report.actions if a.status == "failed"]
    if failed:
        return f"{failed[0].description}: {failed[0].detail}"
    bad = sorted(
        (f for f in report.findings if f.severity != "ok"), key=lambda f: f.severity != "critical"
    )
    if bad:
        more = f" (+{len(bad) - 1} more)" if len(bad) > 1 else ""
        return f"{bad[0].message}{more}"
    acted = [a for a in report.actions if a.status == "done"]
    if acted:
        return f"{len(acted)} action(s) done; {len(report.findings)} check(s) ok"
    return f"{len(report.findings)} check(s) ok"


def _cell(value: object) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def render_fleet(
    report: FleetReport, link: Callable[[str], str | None] = lambda run_id: None
) -> str:
    """The fleet's markdown artifact: a table of its targets, worst first (each run's id a
    link where `link` gives its page in the UI), then those not started with the reason. `|`
    and newlines in values escaped."""
    t = report.totals
    lines = [
        f"# {report.runbook} on {report.selector}: **{report.status.value}**",
        "",
        f"dry run: {'yes' if report.dry_run else 'no'}; max concurrency "
        f"{report.max_concurrency}, max errors {report.max_errors}; "
        f"{t.healthy} healthy, {t.fixed} fixed, {t.unhealthy} unhealthy, {t.failed} failed, "
        f"{t.not_started} not started; started {report.started_at:%Y-%m-%d %H:%M:%S} UTC, "
        f"{(report.finished_at - report.started_at).total_seconds():.1f} s",
        "",
        "| target | status | run | summary |",
        "|---|---|---|---|",
    ]
    for r in report.worst_first():
        url = link(r.flow_run_id) if r.flow_run_id else None
        run = f"[{r.flow_run_id}]({url})" if url else r.flow_run_id or ""
        lines.append(f"| {_cell(r.target)} | {r.status.value} | {run} | {_cell(summary_of(r))} |")
    for n in report.not_started:
        lines.append(f"| {_cell(n.target)} | not started | | {_cell(n.reason)} |")
    return "\n".join(lines) + "\n"
