"""A routine's summary (seed 002 "Routine Maintenance"): one row per runbook and target it ran,
the worst of their outcomes as its own, and its markdown artifact. The routine flows themselves
(deployments.routines) look their runbooks up in the registry; this module is the pure part
and the reading of a finished subflow's state.

Outcome of a routine: the worst of its rows' (healthy < fixed < unhealthy < failed), with the
same final-state mapping as a runbook (tasks.engine: COMPLETED Healthy/Fixed, FAILED
Unhealthy/Failed); a runbook with no configured target adds a row that says so and counts as
nothing; no row run at all is healthy."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel

from tasks.models import Report, RunStatus, exit_code_of
from tasks.outcome import state_report

# Worse comes later.
SEVERITY_ORDER: tuple[RunStatus, ...] = (
    RunStatus.healthy,
    RunStatus.fixed,
    RunStatus.unhealthy,
    RunStatus.failed,
)


class RoutineRow(BaseModel):
    """One runbook on one target within a routine. status None: it did not run (no configured
    target), and `detail` says why."""

    runbook: str
    target: str | None
    status: RunStatus | None
    dry_run: bool | None = None
    flow_run_id: str | None = None
    link: str | None = None
    detail: str = ""


class RoutineReport(BaseModel):
    """A routine run: its rows in the order run, and the worst of their statuses."""

    routine: str
    dry_run: bool
    status: RunStatus
    rows: list[RoutineRow]
    started_at: datetime
    finished_at: datetime
    flow_run_id: str | None = None

    @property
    def exit_code(self) -> int:
        """The CLI's exit code, as a runbook's (0 healthy or fixed, 1 unhealthy, 3 failed)."""
        return exit_code_of(self.status)


def worst_status(rows: list[RoutineRow]) -> RunStatus:
    """The worst status of the rows that ran (SEVERITY_ORDER); healthy when none ran."""
    ran = [row.status for row in rows if row.status is not None]
    return max(ran, key=SEVERITY_ORDER.index, default=RunStatus.healthy)


def row_of(runbook: str, target: str, state: Any, *, dry_run: bool, link: str | None) -> RoutineRow:
    """The row of a finished subflow from its final state (a prefect State): the report's
    status when it made one, else failed with the state's message (the runbook raised: a
    target unreachable, bad configuration, a crash, a cancellation)."""
    result = state_report(state)
    flow_run_id = state.state_details.flow_run_id
    status = result.status if isinstance(result, Report) else RunStatus.failed
    return RoutineRow(
        runbook=runbook,
        target=target,
        status=status,
        dry_run=dry_run,
        flow_run_id=None if flow_run_id is None else str(flow_run_id),
        link=link,
        detail=(state.message or state.name or "")[:500],
    )


def _cell(value: object) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def render_summary(report: RoutineReport) -> str:
    """The routine's summary as markdown: one table row per runbook and target (its status, a
    link to its child run in the Prefect UI, or the run's id when no UI address is known), and
    the runbooks that did not run with the reason. `|` and newlines in values escaped."""
    lines = [
        f"# {report.routine}: **{report.status.value}**",
        "",
        f"dry run: {'yes' if report.dry_run else 'no'}; "
        f"started {report.started_at:%Y-%m-%d %H:%M:%S} UTC, "
        f"{(report.finished_at - report.started_at).total_seconds():.1f} s",
        "",
        "| runbook | target | status | run | detail |",
        "|---|---|---|---|---|",
    ]
    for row in report.rows:
        run = f"[{row.flow_run_id}]({row.link})" if row.link else row.flow_run_id or ""
        status = row.status.value if row.status is not None else "not run"
        if row.status is not None and row.dry_run:
            status += " (dry run)"
        lines.append(
            f"| {_cell(row.runbook)} | {_cell(row.target or '-')} | {status} | {run} | "
            f"{_cell(row.detail)} |"
        )
    return "\n".join(lines) + "\n"
