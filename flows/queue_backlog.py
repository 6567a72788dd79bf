"""queue-backlog: BullMQ queues backing up or stalled (seed 000 s3: waiting > 1000)."""

from __future__ import annotations

import time
from typing import get_args

from prefect import State

from tasks.cancel import pause
from tasks.engine import run_action, runbook_flow
from tasks.errors import ConfigError
from tasks.gate import APPROVAL_TIMEOUT_SECONDS, ApprovalTimeout
from tasks.models import AlertInfo, Approval, Report
from tasks.redis import read_queue_counts
from tasks.redis_rules import QueueBacklogAction, QueueBacklogParams, plan_backlog, queue_findings
from tasks.run import open_run
from tasks.services import scale_service
from tasks.settings import Settings

RUNBOOK = "queue-backlog"


@runbook_flow(RUNBOOK, inventory="redis", actions=get_args(QueueBacklogAction))
def queue_backlog(
    target: str,
    dry_run: bool = True,
    approval: Approval = "ask",
    approval_timeout_seconds: ApprovalTimeout = APPROVAL_TIMEOUT_SECONDS,
    params: QueueBacklogParams | None = None,
    alert: AlertInfo | None = None,
) -> State[Report]:
    """BullMQ counts of each queue, sampled twice for the drain rate; backlogs over the
    threshold and stalled workers.

    May scale the worker service (a docker compose service) to scale_workers_to replicas.
    """
    run = open_run(Settings.redis_target, target, QueueBacklogParams, params)
    name, rd, p = run.name, run.target, run.p
    if not rd.queues:
        raise ConfigError(
            f'redis target {name!r} lists no queues: add queues = ["NAME", ...] '
            f"to [redis.{name}] (BullMQ queue names)"
        )

    # 1. diagnose: two samples, for the drain rate and whether workers make progress
    first = read_queue_counts(name, rd, rd.queues)
    begun = time.monotonic()
    pause(p.sample_seconds)
    second = read_queue_counts(name, rd, rd.queues)
    seconds = time.monotonic() - begun
    findings = [
        f for q in rd.queues for f in queue_findings(name, q, first[q], second[q], seconds, p)
    ]
    # 2. plan
    actions = plan_backlog(name, rd, findings, p)
    # 3. gate
    approved = run.gate(actions, findings)
    # 4. act: more workers through the service controller
    for action in approved:
        assert rd.worker_service is not None
        run_action(
            action,
            scale_service,
            rd.worker_service,
            run.settings.service(rd.worker_service),
            action.args.replicas,
        )
    # 5. report: new workers need time to drain a backlog; the next scheduled run verifies
    return run.finish(findings, findings, actions)
