"""metrics-guard: is the app's Prometheus endpoint guarded, and does the guard let the scraper
in? Requests it must refuse and one it must admit, by secret header or by source address
(seed 001, "Metrics endpoint failing authentication": METRICS_ENABLED, METRICS_GUARD,
METRICS_GUARD_SECRET, METRICS_GUARD_ALLOWLIST)."""

from __future__ import annotations

from prefect import State

from tasks.engine import runbook_flow
from tasks.metrics import probe_metrics
from tasks.metrics_rules import MetricsParams, metrics_findings
from tasks.models import AlertInfo, Approval, Report
from tasks.run import open_run
from tasks.settings import Settings

RUNBOOK = "metrics-guard"


@runbook_flow(RUNBOOK, inventory="metrics", actions=())
def metrics_guard(
    target: str,
    dry_run: bool = True,
    approval: Approval = "ask",
    params: MetricsParams | None = None,
    alert: AlertInfo | None = None,
) -> State[Report]:
    """guard = "secret": a request without the secret header and one with a wrong value must
    be refused (401/403), one with the secret must get 200 and Prometheus text. guard =
    "cidr": a request from denied_source must be refused, one from allowed_source admitted.
    Anything else is a finding saying which: open to anyone (critical), the guard refusing
    the right secret or the allowed source, metrics disabled (404: METRICS_ENABLED), not
    Prometheus text, no answer.

    Reads only; the secret goes into one request's header and nowhere else. No actions.
    """
    run = open_run(Settings.metrics_target, target, MetricsParams, params)
    # 1. diagnose
    probes = probe_metrics(run.name, run.target)
    findings = metrics_findings(run.name, run.target, probes, run.p)
    # 5. report
    return run.finish(findings, findings, [])
