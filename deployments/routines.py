"""The routine schedules of seed 002 "Routine Maintenance": `routine-daily`, `routine-weekly`
and `routine-monthly`, each a Prefect flow that runs its runbooks (deployments.catalog.ROUTINES)
as subflows, on every target each has in the inventory (Runbook.targets), one after another.

They live here, not in flows/: a routine is a way of running runbooks, like a schedule, and it
looks them up in the registry (their flows, their targets, which of them may act on schedule),
which flows/ may not import (tests/test_layers.py).

Each subflow is a tracked child run of the routine's run. It gets the routine's `dry_run`
(always True for a diagnose-only step), `approval` and `approval_timeout_seconds`, and goes
through its own gate: the inventory's [approval] policies, production targets and limits apply
to it as to any run of that runbook. One that fails or crashes does not stop the others. The
routine publishes one summary artifact (tasks.routines.render_summary, key `routine-<name>`)
and ends with the worst of their statuses, in a runbook's final states (tasks.engine)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, cast

from prefect import State, flow
from prefect.artifacts import create_markdown_artifact
from prefect.logging import get_run_logger
from prefect.runtime import flow_run

from deployments.catalog import ROUTINES, RUNBOOKS
from deployments.config import load_config
from tasks.cancel import raise_if_cancel_requested
from tasks.engine import final_state
from tasks.gate import APPROVAL_TIMEOUT_SECONDS, ApprovalTimeout
from tasks.journal import journal_scope
from tasks.models import Approval, RunStatus, utcnow
from tasks.notify import run_link
from tasks.routines import RoutineReport, RoutineRow, render_summary, row_of, worst_status


def _run_name() -> str:
    return f"{datetime.now(UTC):%Y-%m-%d}"


def run_routine(
    name: str, *, dry_run: bool, approval: Approval, approval_timeout_seconds: int
) -> State[RoutineReport]:
    """Run routine `name` (a key of ROUTINES) in the current flow run: every step's runbook on
    each of its targets, then the summary artifact; returns the routine's final state, with
    the RoutineReport as its data.

    Raises ConfigError (before any subflow runs) when the inventory is invalid."""
    routine = ROUTINES[name]
    started = utcnow()
    settings = load_config()
    logger = get_run_logger()
    rows: list[RoutineRow] = []
    # The subflows' journals inherit from this one whether the run is a deployment's: a
    # served routine's subflow that needs a human pauses for the Prefect UI's form.
    with journal_scope(runbook=name):
        for step in routine.steps:
            rb = RUNBOOKS[step.runbook]
            targets = rb.targets(settings)
            if not targets:
                needs = f" with {rb.requires}" if rb.requires else ""
                rows.append(
                    RoutineRow(
                        runbook=rb.name,
                        target=None,
                        status=None,
                        detail=f"no configured target: add a [{rb.inventory}.NAME]{needs}",
                    )
                )
                continue
            sub = rb.load()
            step_dry_run = dry_run or step.diagnose_only
            # What the routine passes down, as far as the runbook takes it (a read-only one
            # has no approval_timeout_seconds).
            options = {
                k: v
                for k, v in (
                    ("dry_run", step_dry_run),
                    ("approval", approval),
                    ("approval_timeout_seconds", approval_timeout_seconds),
                )
                if k in sub.parameters.properties
            }
            for target in targets:
                # A cancelled routine stops between runbooks (tasks.cancel).
                raise_if_cancel_requested("before the next runbook")
                try:
                    state = cast("State[Any]", sub(target=target, **options, return_state=True))
                except Exception as exc:  # it could not even start: the others still run
                    logger.error("%s on %s could not start: %s", rb.name, target, exc)
                    rows.append(
                        RoutineRow(
                            runbook=rb.name,
                            target=target,
                            status=RunStatus.failed,
                            dry_run=step_dry_run,
                            detail=f"could not start: {type(exc).__name__}: {exc}"[:500],
                        )
                    )
                    continue
                flow_run_id = state.state_details.flow_run_id
                row = row_of(
                    rb.name,
                    target,
                    state,
                    dry_run=step_dry_run,
                    link=run_link(
                        None if flow_run_id is None else str(flow_run_id), settings.notify
                    ),
                )
                logger.info("%s on %s: %s", rb.name, target, row.status)
                rows.append(row)
    status = worst_status(rows)
    report = RoutineReport(
        routine=name,
        dry_run=dry_run,
        status=status,
        rows=rows,
        started_at=started,
        finished_at=utcnow(),
        flow_run_id=flow_run.get_id(),
    )
    create_markdown_artifact(
        markdown=render_summary(report), key=name, description=f"{name}: {status.value}"
    )
    ran = [r for r in rows if r.status is not None]
    worse = [r for r in ran if r.status == status]
    message = f"{name}: {status.value}; {len(ran)} run(s)"
    if worse and status.value in ("unhealthy", "failed"):
        message += f"; {worse[0].detail}"
    return final_state(status, report, message)


@flow(name="routine-daily", flow_run_name=_run_name)
def routine_daily(
    dry_run: bool = True,
    approval: Approval = "ask",
    approval_timeout_seconds: ApprovalTimeout = APPROVAL_TIMEOUT_SECONDS,
) -> State[RoutineReport]:
    """Seed 002's daily checklist: service-health (health endpoints), backup-verification (the
    last backup) and disk-space, on every target each has.

    Args:
        dry_run: True (the default): every runbook diagnoses and plans only; False: each acts
            on what its own gate lets through.
        approval: passed to every runbook: "auto", "ask" (the default) or "never"; the
            inventory's [approval] and its targets may be stricter.
        approval_timeout_seconds: how long a runbook paused for approval waits, in seconds.
    """
    return run_routine(
        "routine-daily",
        dry_run=dry_run,
        approval=approval,
        approval_timeout_seconds=approval_timeout_seconds,
    )


@flow(name="routine-weekly", flow_run_name=_run_name)
def routine_weekly(
    dry_run: bool = True,
    approval: Approval = "ask",
    approval_timeout_seconds: ApprovalTimeout = APPROVAL_TIMEOUT_SECONDS,
) -> State[RoutineReport]:
    """Seed 002's weekly checklist, as reviews (dry runs whatever dry_run says): slow queries
    and bloat from postgres-maintenance's diagnosis, and tls-certificates' expiry dates.

    Args:
        dry_run: kept for a uniform form; both runbooks always run as dry runs here.
        approval: passed to every runbook: "auto", "ask" (the default) or "never".
        approval_timeout_seconds: how long a runbook paused for approval waits, in seconds.
    """
    return run_routine(
        "routine-weekly",
        dry_run=dry_run,
        approval=approval,
        approval_timeout_seconds=approval_timeout_seconds,
    )


@flow(name="routine-monthly", flow_run_name=_run_name)
def routine_monthly(
    dry_run: bool = True,
    approval: Approval = "ask",
    approval_timeout_seconds: ApprovalTimeout = APPROVAL_TIMEOUT_SECONDS,
) -> State[RoutineReport]:
    """Seed 002's monthly checklist: VACUUM ANALYZE through postgres-maintenance, and the
    disaster recovery drill (restore-drill), on every target each has.

    Args:
        dry_run: True (the default): plan only; False: each runbook acts on what its own gate
            lets through (scheduled runs: as the registry's ROUTINES derive it).
        approval: passed to every runbook: "auto", "ask" (the default) or "never"; the
            inventory's [approval] and its targets may be stricter.
        approval_timeout_seconds: how long a runbook paused for approval waits, in seconds.
    """
    return run_routine(
        "routine-monthly",
        dry_run=dry_run,
        approval=approval,
        approval_timeout_seconds=approval_timeout_seconds,
    )
