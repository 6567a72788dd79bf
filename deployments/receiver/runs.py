"""Starting the runs alerts ask for (how, per receiver.dispatch: see deployments.receiver), and
what each alert's handling leaves behind: a Prefect event and one line on stdout."""

from __future__ import annotations

import json
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, cast
from uuid import UUID

from deployments.alert_routes import Alert, Dispatch, Outcome
from deployments.catalog import RUNBOOKS
from tasks.errors import TargetError
from tasks.fleet_rules import FLEET
from tasks.wait import poll

if TYPE_CHECKING:
    from prefect import Flow
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.schemas.objects import FlowRun

    from deployments.runner import InProcessRunner

DEPLOYMENT_WAIT_SECONDS = 15  # a deployment `runbook serve` is still registering


@dataclass(frozen=True)
class AlertResult:
    fingerprint: str
    alert: str
    outcome: Outcome
    runbook: str | None
    target: str | None
    flow_run_id: str | None
    detail: str


class Starter(Protocol):
    name: str
    description: str  # how runs start, for the receiver's first lines

    def start(self, alert: Alert, dispatch: Dispatch) -> str | None:
        """Start the run; its flow run id, or None when something else creates it."""

    def shutdown(self) -> None: ...


def _sync_client() -> SyncPrefectClient:
    from prefect import get_client

    return get_client(sync_client=True)


class InProcessStarter:
    """Creates the run from its deployment (the UI shows it there, with its parameters) in
    Pending, and runs it on one of a few threads of this process, which has the flows imported.

    The served runner only polls Scheduled runs, so it never starts this one too. Inside
    `runbook serve` the run goes to serve's own runner (its threads, its cancellation from the
    UI, its stop); alone, to a pool of max_workers threads here."""

    name = "in-process"
    description = "runs start in this process, on its threads"

    def __init__(self, max_workers: int, runner: InProcessRunner | None = None) -> None:
        self._runner = runner
        self._pool = ThreadPoolExecutor(max_workers, thread_name_prefix="runbook-alert-run")
        self._deployments: dict[str, UUID] = {}
        self._queued: dict[Future[None], UUID] = {}
        self._lock = threading.Lock()
        self._closed = False

    def _deployment_id(self, client: SyncPrefectClient, name: str) -> UUID:
        from prefect.exceptions import ObjectNotFound

        if name in self._deployments:
            return self._deployments[name]

        def lookup() -> UUID | None:
            try:
                return client.read_deployment_by_name(name).id
            except ObjectNotFound:
                return None

        found = poll(
            lookup,
            what=f"deployment {name} to be registered",
            timeout_seconds=DEPLOYMENT_WAIT_SECONDS,
            first_delay_seconds=0.5,
            max_delay_seconds=0.5,
        ).value
        if found is None:
            raise TargetError(f"deployment {name} does not exist: is `runbook serve` serving it?")
        self._deployments[name] = found
        return found

    def _refuse_if_closed(self) -> None:
        if self._closed:
            raise TargetError("the receiver is stopping: no new alert runs")

    def start(self, alert: Alert, dispatch: Dispatch) -> str:
        from prefect.exceptions import PrefectHTTPStatusError
        from prefect.states import Cancelled, Pending

        with self._lock:
            self._refuse_if_closed()
        flow = dispatch_flow(dispatch)
        with _sync_client() as client:

            def create() -> FlowRun:
                return client.create_flow_run_from_deployment(
                    self._deployment_id(client, dispatch.deployment),
                    parameters=dispatch.parameters,
                    state=Pending(message="started by the alert receiver in its own process"),
                    tags=["alert"],
                )

            try:
                flow_run = create()
            except PrefectHTTPStatusError as exc:
                if exc.response.status_code != 404:
                    raise
                # Deleted and registered again since it was looked up: it has a new id.
                self._deployments.pop(dispatch.deployment, None)
                flow_run = create()
            try:
                # Under the lock: shutdown() either sees this run queued or refused it here.
                with self._lock:
                    self._refuse_if_closed()
                    if self._runner is not None:
                        self._runner.submit(flow, flow_run, f"{dispatch.deployment} (alert)")
                        return str(flow_run.id)
                    future = self._pool.submit(self._run, flow, flow_run)
                    self._queued[future] = flow_run.id
            except BaseException:
                # Created but never to run: not left Pending forever.
                client.set_flow_run_state(
                    flow_run.id, Cancelled(message="the receiver stopped before it began")
                )
                raise
        future.add_done_callback(self._forget)
        return str(flow_run.id)

    def _forget(self, future: Future[None]) -> None:
        with self._lock:
            self._queued.pop(future, None)

    @staticmethod
    def _run(flow: Flow[..., Any], flow_run: FlowRun) -> None:
        from prefect.flow_engine import run_flow

        try:
            run_flow(flow, flow_run=flow_run, return_type="state")
        except BaseException as exc:  # the run's own state says what failed; keep the thread
            print(f"alert run {flow_run.id} ended with {type(exc).__name__}: {exc}", flush=True)

    def shutdown(self) -> None:
        """Runs not begun yet are cancelled; those running finish (each has its timeouts)."""
        from prefect.states import Cancelled

        with self._lock:
            self._closed = True
            queued = list(self._queued.items())
        if self._runner is not None:
            return  # serve's runner stops the runs it was given
        # Outside the lock: cancel() runs the done callback (_forget, which takes it) here.
        waiting = [(f, run_id) for f, run_id in queued if f.cancel()]
        running = len(queued) - len(waiting)
        if waiting:
            with _sync_client() as client:
                for _, run_id in waiting:
                    client.set_flow_run_state(
                        run_id, Cancelled(message="the receiver stopped before it began")
                    )
        if running:
            print(f"Waiting for {running} alert runs in flight to finish", flush=True)
        self._pool.shutdown(wait=True, cancel_futures=True)


def dispatch_flow(dispatch: Dispatch) -> Flow[..., Any]:
    """The flow a dispatch's deployment runs: the runbook's, or its fleet's (deployments.fleet)."""
    if dispatch.target == FLEET:
        from deployments.fleet import FLEETS

        return FLEETS[dispatch.runbook]
    return RUNBOOKS[dispatch.runbook].load()


class DeploymentStarter:
    """For `runbook receiver` alone: the served runner or a worker runs it on its next poll."""

    name = "deployment"
    description = "runs are created through their deployments, for a worker or `runbook serve`"

    def start(self, alert: Alert, dispatch: Dispatch) -> str:
        from prefect.deployments import run_deployment

        # Called from a worker thread, outside any event loop: the sync flavour runs.
        flow_run = cast(
            "FlowRun",
            run_deployment(
                dispatch.deployment,
                parameters=dispatch.parameters,
                timeout=0,
                tags=["alert"],
                as_subflow=False,
            ),
        )
        return str(flow_run.id)

    def shutdown(self) -> None:
        pass


class TriggerStarter:
    """Prefect's automation path: the deployment's trigger matches runbook.alert.dispatch."""

    name = "trigger"
    description = "runbook.alert.dispatch events; the deployments' triggers create the runs"

    def start(self, alert: Alert, dispatch: Dispatch) -> None:
        from prefect.events import emit_event

        event = emit_event(
            event="runbook.alert.dispatch",
            resource=alert_resource(alert, dispatch.runbook, dispatch.target),
            payload={"parameters": dispatch.parameters},
        )
        if event is None:
            raise TargetError("the dispatch event could not be emitted: no Prefect API?")

    def shutdown(self) -> None:
        pass


# -- events and logs -----------------------------------------------------------------------


def alert_resource(alert: Alert, runbook: str | None, target: str | None) -> dict[str, str]:
    return {
        "prefect.resource.id": f"runbook.alert.{alert.fingerprint}",
        "prefect.resource.name": alert.name,
        "runbook.alert": alert.name,
        "runbook.runbook": runbook or "",
        "runbook.target": target or "",
    }


def emit_alert_event(alert: Alert, result: AlertResult, dispatch: Dispatch | None) -> None:
    from prefect.events import emit_event
    from prefect.exceptions import EventTooLarge

    payload: dict[str, Any] = {
        "source": alert.source,
        "labels": alert.labels,
        "annotations": alert.annotations,
        "outcome": result.outcome.value,
        "flow_run_id": result.flow_run_id,
        "parameters": dispatch.parameters if dispatch else None,
    }
    related = (
        [
            {
                "prefect.resource.id": f"prefect.flow-run.{result.flow_run_id}",
                "prefect.resource.role": "flow-run",
            }
        ]
        if result.flow_run_id
        else None
    )
    resource = alert_resource(alert, result.runbook, result.target)
    # Too large: the record of the alert matters more than the text of its annotations, then
    # of its labels (bounded each, but many); the alert is handled whatever becomes of this.
    for drop in (None, "annotations", "labels"):
        if drop is not None:
            payload[drop] = {"truncated": "over Prefect's event size limit"}
        try:
            emit_event(f"runbook.alert.{alert.status}", resource, payload=payload, related=related)
        except EventTooLarge:
            continue
        return
    print(
        f"alert event not emitted fingerprint={json.dumps(alert.fingerprint)}: over Prefect's "
        "event size limit even without labels and annotations",
        flush=True,
    )


def log_result(result: AlertResult) -> None:
    """One line per alert; values from the payload are JSON-quoted, so a label cannot forge a
    line."""
    fields = {
        "alert": result.alert,
        "fingerprint": result.fingerprint,
        "runbook": result.runbook,
        "target": result.target,
        "flow_run": result.flow_run_id,
        "detail": result.detail or None,
    }
    text = " ".join(f"{k}={json.dumps(v)}" for k, v in fields.items() if v is not None)
    print(f"alert {result.outcome.value} {text}", flush=True)
