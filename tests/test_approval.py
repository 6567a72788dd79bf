"""Human approval through a real Prefect API: a deployed run of postgres-connections with
approval "ask", run by serve's in-process runner, pauses with the plan on its form; an answer
sent to Prefect's resume endpoint (as the UI and other tools send it) decides what happens to
real sessions idle in transaction."""

from __future__ import annotations

import json
import re
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from prefect import get_client
from prefect.client.schemas.objects import StateType
from prefect.client.schemas.responses import SetStateStatus
from prefect.states import Cancelling

from deployments.localpg import free_port
from deployments.receiver import ReceiverServer, build_receiver
from deployments.runner import InProcessRunner
from flows.postgres_connections import postgres_connections
from tasks.settings import load_settings
from tests.conftest import Db, runner_deployment
from tests.test_notify import Hook, hook  # noqa: F401 (a fixture)
from tests.test_receiver import TOKEN, am_alert, am_payload, post, served_deployment  # noqa: F401
from tests.test_runner import wait_for_state as wait_for

pytestmark = pytest.mark.usefixtures("prefect_api")

PARAMETERS = {
    "target": "main",
    "dry_run": False,
    "approval": "ask",
    "params": {"idle_in_transaction_seconds": 1},
}


@pytest.fixture
def served(db: Db) -> Iterator[tuple[Any, uuid.UUID]]:
    """postgres-connections on main served in-process, as `runbook serve` does."""
    deployment = runner_deployment(
        postgres_connections.to_deployment(
            name=f"approval-{uuid.uuid4().hex[:8]}", parameters=PARAMETERS
        )
    )
    runner = InProcessRunner([(deployment, postgres_connections)], max_runs=2, poll_seconds=0.5)
    db.write_config()
    with get_client(sync_client=True) as client:
        runner.register(client)
        thread = threading.Thread(target=runner.serve, args=(client,), daemon=True)
        thread.start()
        try:
            yield client, next(iter(runner.served.values())).id
        finally:
            runner.request_stop()
            thread.join(30)
            runner.stop(client, grace_seconds=30)


def paused_run(
    db: Db, client: Any, deployment: uuid.UUID, **parameters: Any
) -> tuple[Any, list[int]]:
    pids = db.idle_in_transaction(3)
    time.sleep(1.5)  # over idle_in_transaction_seconds = 1
    run = wait_for(
        client,
        client.create_flow_run_from_deployment(deployment, parameters=parameters or None).id,
        StateType.PAUSED,
    )
    # The form is saved just after the pause (Prefect's server clears a pause's inputs).
    deadline = time.monotonic() + 60
    while not client.filter_flow_run_input(
        run.id, key_prefix="paused-", limit=3, exclude_keys=set()
    ):
        assert time.monotonic() < deadline, "no form was saved"
        time.sleep(0.2)
    return run, pids


def resume(run_id: uuid.UUID, run_input: dict[str, Any]) -> SetStateStatus:
    """What the Prefect UI's form sends to Prefect's resume endpoint, through Prefect's client,
    which retries the 503 a busy SQLite server answers ("database is locked") as the UI's user
    would."""
    with get_client(sync_client=True) as client:
        return client.resume_flow_run(run_id, run_input=run_input).status


def report_markdown(client: Any, run_id: uuid.UUID) -> str:
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    artifacts = client.read_artifacts(
        artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run_id]))
    )
    [markdown] = [a.data for a in artifacts if a.type == "markdown"]
    return str(markdown)


def test_an_approved_run_ends_the_sessions_and_says_who_approved(
    db: Db, served: tuple[Any, uuid.UUID]
) -> None:
    client, deployment = served
    run, pids = paused_run(db, client, deployment)
    keyset = run.state.state_details.run_input_keyset
    schema = json.loads(client.read_flow_run_input(run.id, keyset["schema"]))
    assert set(schema["properties"]) == {"approve", "approver", "comment"}
    assert schema["required"] == ["approver"]
    form = json.loads(client.read_flow_run_input(run.id, keyset["description"]))
    assert "Approval needed: postgres-connections on `main`" in form
    assert len(re.findall(r"^\d\. terminate", form, re.M)) == 3
    assert "- 3 x terminate_backend on `main`" in form
    assert db.alive(pids) == set(pids)  # nothing changed while it waits

    refused = resume(run.id, {"approve": True, "approver": "  "})  # no name: refused
    assert refused is SetStateStatus.REJECT
    assert client.read_flow_run(run.id).state.type is StateType.PAUSED

    resume(run.id, {"approve": True, "approver": "oncall-primary", "comment": "pool exhausted"})
    done = wait_for(client, run.id, StateType.COMPLETED, StateType.FAILED)
    assert (done.state.type, done.state.name) == (StateType.COMPLETED, "Fixed")
    assert db.alive(pids) == set()
    markdown = report_markdown(client, run.id)
    assert "approved by oncall-primary" in markdown and "pool exhausted" in markdown
    timeline = markdown.split("## Timeline (UTC)")[1]
    events = ["started", "diagnosed", "approval requested", "approval answered"]
    events += ["action started", "action ended", "verified", "finished"]
    positions = [timeline.index(f"**{e}**") for e in events]
    assert positions == sorted(positions)


def test_a_rejected_run_changes_nothing_and_ends_unhealthy(
    db: Db, served: tuple[Any, uuid.UUID]
) -> None:
    client, deployment = served
    run, pids = paused_run(db, client, deployment)
    resume(run.id, {"approve": False, "approver": "oncall-secondary", "comment": "app deploy"})
    done = wait_for(client, run.id, StateType.COMPLETED, StateType.FAILED)
    assert (done.state.type, done.state.name) == (StateType.FAILED, "Unhealthy")
    assert db.alive(pids) == set(pids)
    markdown = report_markdown(client, run.id)
    assert markdown.count("rejected by oncall-secondary: app deploy") >= 3  # each action


def test_no_answer_in_time_is_a_rejection_not_a_crash(
    db: Db, served: tuple[Any, uuid.UUID]
) -> None:
    client, deployment = served
    run, pids = paused_run(db, client, deployment, **PARAMETERS, approval_timeout_seconds=10)
    done = wait_for(client, run.id, StateType.COMPLETED, StateType.FAILED, StateType.CRASHED)
    assert (done.state.type, done.state.name) == (StateType.FAILED, "Unhealthy")
    assert db.alive(pids) == set(pids)
    assert "no answer to the approval request within 10 s" in report_markdown(client, run.id)


def test_a_paused_run_cancelled_from_the_ui_ends_cancelled(
    db: Db, served: tuple[Any, uuid.UUID]
) -> None:
    client, deployment = served
    run, pids = paused_run(db, client, deployment)
    client.set_flow_run_state(run.id, Cancelling(message="from the UI"))
    done = wait_for(client, run.id, StateType.CANCELLED, StateType.COMPLETED, StateType.FAILED)
    assert done.state.type is StateType.CANCELLED
    assert db.alive(pids) == set(pids)


def test_an_alert_routed_to_ask_pauses_tells_oncall_and_acts_once_approved(
    db: Db,
    tmp_path: Any,
    served_deployment: str,  # noqa: F811 (a fixture)
    hook: Hook,  # noqa: F811 (a fixture)
) -> None:
    """The alert starts the run, it diagnoses and pauses; the on-call endpoint gets the
    request with the link to the paused run; the approval finishes the remediation."""
    ui = "http://ui.example.test:4200"
    db.write_config(
        f'[receiver]\nlisten = "127.0.0.1:{free_port()}"\ntoken = "{TOKEN}"\n'
        f'state_file = "{tmp_path / "alerts.sqlite"}"\n'
        '[[routes]]\nalert = "IdleInTransaction"\nrunbook = "postgres-connections"\n'
        'target_label = "target"\napply = true\nset = { idle_in_transaction_seconds = 1 }\n'
        f'[notify]\nui_url = "{ui}"\n[[notify.routes]]\nurls = ["{hook.url("oncall")}"]\n'
        'events = ["approval_needed", "fixed"]\n'
    )
    pids = db.idle_in_transaction(3)
    time.sleep(1.5)
    server = ReceiverServer(build_receiver(load_settings(), in_process=True)).start()
    try:
        response = post(server.url, "/alerts/alertmanager", am_payload(am_alert()))
        [result] = response.json()["alerts"]
        run_id = uuid.UUID(result["flow_run_id"])
        with get_client(sync_client=True) as client:
            run = wait_for(client, run_id, StateType.PAUSED)
            assert client.read_flow_run(run_id).parameters["approval"] == "ask"
            path, asked = hook.posts.get(timeout=60)
            assert path == "/oncall" and "approval needed" in asked["title"]
            assert f"{ui}/runs/flow-run/{run_id}" in asked["message"]
            assert "terminate" in asked["message"] and db.alive(pids) == set(pids)
            deadline = time.monotonic() + 60
            while not client.filter_flow_run_input(
                run.id, key_prefix="paused-", limit=3, exclude_keys=set()
            ):
                assert time.monotonic() < deadline, "no form was saved"
                time.sleep(0.2)
            resume(run_id, {"approve": True, "approver": "oncall-primary"})
            done = wait_for(client, run_id, StateType.COMPLETED, StateType.FAILED)
            assert (done.state.type, done.state.name) == (StateType.COMPLETED, "Fixed")
            assert db.alive(pids) == set()
            _, fixed = hook.posts.get(timeout=60)
            assert "fixed" in fixed["title"] and f"{ui}/runs/flow-run/{run_id}" in fixed["message"]
            timeline = report_markdown(client, run_id).split("## Timeline (UTC)")[1]
            assert "**alert received** IdleInTransaction from alertmanager" in timeline
    finally:
        server.stop()
