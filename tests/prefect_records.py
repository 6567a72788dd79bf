"""What the session's Prefect API holds for the flow runs a test started: their log lines and
artifacts. The API is shared by the whole session, so a check that searches it (secret hygiene)
reads exactly these runs (and their subflows), never the first page of everything."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field

from prefect import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    FlowRunFilter,
    FlowRunFilterParentFlowRunId,
    LogFilter,
    LogFilterFlowRunId,
)
from prefect.client.schemas.objects import Artifact, Log, State
from prefect.client.schemas.sorting import ArtifactSort, LogSort
from prefect.logging.handlers import APILogWorker

PAGE = 200  # the API's default page size


@dataclass
class RunRecords:
    """flow_run_ids: the runs asked for and their subflows. logs: their log messages, oldest
    first. artifacts: each artifact's description and JSON data, one text per artifact."""

    flow_run_ids: set[uuid.UUID] = field(default_factory=set)
    logs: list[str] = field(default_factory=list)
    artifacts: list[str] = field(default_factory=list)


def flow_run_id(state: State) -> uuid.UUID:
    """The flow run a final state (a flow called with return_state=True) belongs to."""
    run_id = state.state_details.flow_run_id
    assert run_id is not None, state
    return run_id


def run_records(run_ids: Iterable[uuid.UUID | str | None]) -> RunRecords:
    """Every log line and artifact of these flow runs and of their subflows (at any depth),
    once the logs still queued in this process are sent. Raises AssertionError when a run id
    is missing (a report without its flow_run_id would search nothing)."""
    given = list(run_ids)
    assert given and None not in given, given
    ids = [uuid.UUID(str(run_id)) for run_id in given]
    APILogWorker.drain_all(timeout=30)  # the handler sends logs in background batches
    records = RunRecords()
    with get_client(sync_client=True) as client:
        parents = set(ids)
        while parents:
            records.flow_run_ids |= parents
            children = client.read_flow_runs(
                flow_run_filter=FlowRunFilter(
                    parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=list(parents))
                )
            )
            parents = {run.id for run in children} - records.flow_run_ids
        runs = list(records.flow_run_ids)
        logs: list[Log] = []
        while page := client.read_logs(
            LogFilter(flow_run_id=LogFilterFlowRunId(any_=runs)),
            limit=PAGE,
            offset=len(logs),
            sort=LogSort.TIMESTAMP_ASC,
        ):
            logs += page
        records.logs = [entry.message for entry in logs]
        artifacts: list[Artifact] = []
        while page_ := client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=runs)),
            sort=ArtifactSort.ID_DESC,  # unique: pages neither skip nor repeat
            limit=PAGE,
            offset=len(artifacts),
        ):
            artifacts += page_
        records.artifacts = [f"{a.description}\n{json.dumps(a.data)}" for a in artifacts]
    return records
