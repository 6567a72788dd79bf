"""A finished run's report as Prefect artifacts: a markdown page and a table, under a key stable
per runbook and target so the UI shows their history; and as a `runbook.report` event about
its flow run (resource `prefect.flow-run.ID`, labels runbook.runbook, runbook.target and
runbook.status, payload {"report": the report's JSON}), which a fleet reads back for a run
that ended on another worker, and an automation may match. tasks.engine.finish publishes
them."""

from __future__ import annotations

import re
from typing import Any

from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.events import emit_event
from prefect.exceptions import EventTooLarge

from tasks.models import Finding, Report


def artifact_key(runbook: str, target: str) -> str:
    """Stable per runbook and target, so the UI shows a history; keys allow [a-z0-9-]."""
    return re.sub(r"[^a-z0-9-]+", "-", f"runbook-{runbook}-{target}".lower()).strip("-")


REPORT_EVENT = "runbook.report"


def publish(report: Report, before: list[Finding]) -> None:
    """Create the report's markdown artifact (render_markdown) and its table artifact (one row
    per finding and action), keyed artifact_key and artifact_key-table, and emit its
    REPORT_EVENT (the module docstring) when it has a flow run."""
    key = artifact_key(report.runbook, report.target)
    create_markdown_artifact(
        markdown=render_markdown(report, before),
        key=key,
        description=f"{report.runbook} on {report.target}: {report.status.value}",
    )
    rows: list[dict[str, Any]] = [
        {
            "step": "finding",
            "name": f.check,
            "state": f.severity.value,
            "observed": str(f.observed_brief),
            "threshold": str(f.threshold or ""),
            "message": f.message,
        }
        for f in report.findings
    ] + [
        {
            "step": "action",
            "name": a.kind,
            "state": a.status.value,
            "observed": "",
            "threshold": "",
            "message": f"{a.description}. {a.detail}".strip(),
        }
        for a in report.actions
    ]
    create_table_artifact(table=rows, key=f"{key}-table", description=report.status.value)
    if report.flow_run_id is not None:
        emit_report_event(report)


def emit_report_event(report: Report) -> None:
    """The REPORT_EVENT of a run's report; a report over Prefect's event size limit
    (PREFECT_SERVER_EVENTS_MAXIMUM_SIZE_BYTES, 1.5 MB) goes without its payload, so that a
    large report never fails the run that made it (a fleet then reads its final state)."""
    resource = {
        "prefect.resource.id": f"prefect.flow-run.{report.flow_run_id}",
        "runbook.runbook": report.runbook,
        "runbook.target": report.target,
        "runbook.status": report.status.value,
    }
    try:
        emit_event(
            REPORT_EVENT, resource=resource, payload={"report": report.model_dump(mode="json")}
        )
    except EventTooLarge:
        emit_event(REPORT_EVENT, resource=resource, payload={"report": None, "too_large": True})


def _cell(value: object) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def render_markdown(report: Report, before: list[Finding]) -> str:
    """The report as markdown: findings (before and after acting, when they differ), their
    rows, the approval, the actions and the timeline; `|` and newlines in values escaped."""
    lines = [
        f"# {report.runbook} on `{report.target}`: **{report.status.value}**",
        "",
        f"dry run: {'yes' if report.dry_run else 'no'}; "
        f"started {report.started_at:%Y-%m-%d %H:%M:%S} UTC, "
        f"{(report.finished_at - report.started_at).total_seconds():.1f} s",
        "",
    ]
    sections: list[tuple[str, list[Finding]]] = [("Findings", report.findings)]
    if before != report.findings:
        sections.insert(0, ("Found before acting", before))
        sections[1] = ("After acting", report.findings)
    for title, findings in sections:
        lines += [
            f"## {title}",
            "",
            "| check | severity | observed | threshold | message |",
            "|---|---|---|---|---|",
        ]
        lines += [
            f"| {_cell(f.check)} | {f.severity.value} | {_cell(f.observed_brief)} | "
            f"{_cell(f.threshold)} | {_cell(f.message)} |"
            for f in findings
        ]
        lines.append("")
    for f in report.findings:
        if f.rows:
            keys = list(f.rows[0])
            lines += [
                f"### {f.check}",
                "",
                "| " + " | ".join(keys) + " |",
                "|" + "---|" * len(keys),
            ]
            lines += ["| " + " | ".join(_cell(row.get(k)) for k in keys) + " |" for row in f.rows]
            lines.append("")
    if report.approval is not None:
        a = report.approval
        lines += [
            "## Approval",
            "",
            f"{a.decision.value} by {a.approver or 'nobody'} at {a.answered_at:%Y-%m-%d %H:%M:%S} "
            f"UTC (asked {a.requested_at:%H:%M:%S} UTC){': ' + a.comment if a.comment else ''}",
            "",
        ]
    lines += ["## Actions", ""]
    if report.actions:
        lines += ["| action | target | destructive | status | detail |", "|---|---|---|---|---|"]
        lines += [
            f"| {_cell(a.description)} | {_cell(a.target)} | {'yes' if a.destructive else 'no'} "
            f"| {a.status.value} | {_cell(a.detail)} |"
            for a in report.actions
        ]
    else:
        lines.append("none needed")
    if report.timeline:
        lines += ["", "## Timeline (UTC)", ""]
        lines += [
            f"- {e.at:%Y-%m-%d %H:%M:%S} **{e.event.replace('_', ' ')}** {_cell(e.detail)}"
            for e in report.timeline
        ]
    return "\n".join(lines) + "\n"
