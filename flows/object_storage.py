"""object-storage: can the app still upload and hand out download links? A canary object
goes through head bucket, put, get and compare, a presigned GET over plain HTTP, and delete,
each timed; a failure says whether it is DNS/connect, credentials or the provider (seed 004
section 8, "Object Storage Unreachable")."""

from __future__ import annotations

from prefect import State

from tasks.backup_rules import ObjectStorageParams, canary_findings
from tasks.canary import (
    Probe,
    canary_key,
    delete_canary,
    get_canary,
    head_bucket,
    presigned_get,
    put_canary,
)
from tasks.engine import runbook_flow
from tasks.models import AlertInfo, Approval, Report
from tasks.run import open_run
from tasks.settings import Settings

RUNBOOK = "object-storage"


@runbook_flow(RUNBOOK, inventory="s3", actions=())
def object_storage(
    target: str,
    dry_run: bool = True,
    approval: Approval = "ask",
    params: ObjectStorageParams | None = None,
    alert: AlertInfo | None = None,
) -> State[Report]:
    """A canary object through head bucket, put, get and compare, a presigned GET and delete,
    each timed.

    Writes and deletes one canary object under the prefix; nothing else (no actions to
    gate).
    """
    run = open_run(Settings.s3_target, target, ObjectStorageParams, params)
    name, s3, p = run.name, run.target, run.p
    where = f"s3://{s3.bucket}/{s3.prefix}" + (f" at {s3.endpoint_url}" if s3.endpoint_url else "")

    # 1. diagnose: read-only but for the canary, which is deleted whatever else happens
    probes: list[Probe] = [head_bucket(name, s3)]
    if probes[-1].error is None:
        key = canary_key(s3, run.started_at)
        probes.append(put_canary(name, s3, key))
        if probes[-1].error is None:
            try:
                probes.append(get_canary(name, s3, key))
                probes.append(presigned_get(name, s3, key))
            finally:
                probes.append(delete_canary(name, s3, key))
    findings = canary_findings(name, where, probes, p)
    # 5. report
    return run.finish(findings, findings, [])
