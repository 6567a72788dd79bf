"""The alert receiver: Alertmanager, Grafana and generic webhooks in, remediation runs out.

    POST /alerts/alertmanager | /alerts/grafana | /alerts/generic   -> 202 {"alerts": [...]}
    GET  /healthz

Per request: credentials (bearer token or HMAC signature, constant-time), the size limit
(counted while the body streams in), the content type, then the payload model; anything
malformed is a 4xx and never reaches routing. Per alert: route, target and typed parameters
(tasks.alert_routes), storm control (deployments.alert_store), then the start of a run, a
Prefect event, and one line on stdout.

How a run starts (receiver.dispatch):
- direct, in `runbook serve`: the run is created from its deployment in Pending, which the
  served runner never picks up (it polls Scheduled runs), and runs on a thread of this process,
  where the flows are already imported: no poll interval, no subprocess spawn.
- direct, in `runbook receiver`: run_deployment(timeout=0); the served runner or a worker picks
  it up on its next poll.
- trigger: a runbook.alert.dispatch event; the deployment's trigger creates the run.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack, suppress
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, cast
from uuid import UUID

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, SecretStr, ValidationError
from starlette.concurrency import run_in_threadpool

from deployments.alert_store import AlertStore
from flows.catalog import RUNBOOKS
from tasks.alert_routes import (
    DEFAULT_ROUTES,
    PAYLOADS,
    Alert,
    Dispatch,
    GenericPayload,
    Outcome,
    ReceiverSettings,
    Route,
    Source,
    load_routes,
    plan_dispatch,
    route_for,
    split_alerts,
)
from tasks.errors import ConfigError, TargetError
from tasks.models import utcnow
from tasks.settings import Settings, config_path

if TYPE_CHECKING:
    import uvicorn
    from prefect import Flow
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.schemas.objects import FlowRun

    from deployments.runner import InProcessRunner

DEPLOYMENT_WAIT_SECONDS = 15  # a deployment `runbook serve` is still registering
SERVER_START_TIMEOUT_SECONDS = 15
JSON_TYPES = ("application/json", "application/vnd.json")
UNAUTHORIZED = (
    "missing or invalid credentials: send 'Authorization: Bearer <receiver.token>' or "
    "'X-Runbook-Signature: sha256=<hex HMAC-SHA256 of the body with receiver.hmac_secret>'"
)


@dataclass(frozen=True)
class AlertResult:
    fingerprint: str
    alert: str
    outcome: Outcome
    runbook: str | None
    target: str | None
    flow_run_id: str | None
    detail: str


# -- starting runs -------------------------------------------------------------------------


class Starter(Protocol):
    name: str

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
        deadline = time.monotonic() + DEPLOYMENT_WAIT_SECONDS
        while True:
            try:
                found = client.read_deployment_by_name(name).id
            except ObjectNotFound:
                if time.monotonic() > deadline:
                    raise TargetError(
                        f"deployment {name} does not exist: is `runbook serve` serving it?"
                    ) from None
                time.sleep(0.5)
                continue
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
        flow = RUNBOOKS[dispatch.runbook].load()
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


class DeploymentStarter:
    """For `runbook receiver` alone: the served runner or a worker runs it on its next poll."""

    name = "deployment"

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


# -- the receiver --------------------------------------------------------------------------


class Receiver:
    def __init__(
        self,
        config: ReceiverSettings,
        routes: list[Route],
        targets: dict[str, list[str]],
        store: AlertStore,
        starter: Starter,
        secrets: tuple[str, ...] = (),
    ) -> None:
        self.config = config
        self.routes = routes
        self.targets = targets
        self.store = store
        self.starter = starter
        self.secrets = secrets  # never printed: see redact()

    def handle(self, alert: Alert) -> AlertResult:
        route = route_for(alert, self.routes)
        dispatch: Dispatch | None = None
        rejected: str | None = None
        if route is not None:
            try:
                rb = RUNBOOKS[route.runbook]
                dispatch = plan_dispatch(
                    alert,
                    route,
                    self.targets.get(route.runbook, []),
                    rb.params,
                    (rb.default_target, rb.narrowed_by)
                    if rb.default_target and rb.narrowed_by
                    else None,
                    received_at=utcnow(),
                )
            except ConfigError as exc:
                rejected = str(exc)
        decision = self.store.record(
            alert, utcnow(), dispatch=dispatch, unrouted=route is None, rejected=rejected
        )
        outcome, detail, flow_run_id = decision.outcome, decision.detail, decision.flow_run_id
        if outcome is Outcome.started and dispatch is not None:
            try:
                flow_run_id = self.starter.start(alert, dispatch)
            except Exception as exc:  # one alert's failure must not lose the rest
                outcome = Outcome.rejected
                # The caller and the store get a fixed text: an exception's may carry the API
                # URL and its credentials. The full text goes to the server's log, redacted.
                detail = (
                    f"could not start {dispatch.deployment} ({type(exc).__name__}); "
                    "see the receiver's log"
                )
                print(
                    f"alert start failed fingerprint={json.dumps(alert.fingerprint)} "
                    f"deployment={json.dumps(dispatch.deployment)}: "
                    f"{redact(f'{type(exc).__name__}: {exc}', self.secrets)}",
                    flush=True,
                )
                self.store.not_started(decision, alert.fingerprint, detail)
            else:
                self.store.started(decision, alert.fingerprint, flow_run_id)
        result = AlertResult(
            fingerprint=alert.fingerprint,
            alert=alert.name,
            outcome=outcome,
            runbook=route.runbook if route else None,
            target=dispatch.target if dispatch else None,
            flow_run_id=flow_run_id,
            detail=detail,
        )
        emit_alert_event(alert, result, dispatch)
        log_result(result)
        return result

    def handle_all(self, alerts: list[Alert]) -> list[AlertResult]:
        return [self.handle(alert) for alert in alerts]

    def authorized_by_token(self, authorization: str | None) -> bool:
        token = self.config.token
        if token is None or not authorization:
            return False
        scheme, _, given = authorization.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(
            given.strip().encode(), token.get_secret_value().encode()
        )

    def authorized_by_signature(self, signature: str, body: bytes) -> bool:
        secret = self.config.hmac_secret
        if secret is None:
            return False
        expected = hmac.new(secret.get_secret_value().encode(), body, hashlib.sha256).hexdigest()
        return hmac.compare_digest(signature.strip().encode(), f"sha256={expected}".encode())


URL_CREDENTIALS = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)[^/\s@]+@")


def secret_values(model: BaseModel) -> list[str]:
    """Every SecretStr value in a settings model, however deeply nested."""
    found: list[str] = []

    def walk(value: Any) -> None:
        if isinstance(value, SecretStr):
            found.append(value.get_secret_value())
        elif isinstance(value, BaseModel):
            for name in type(value).model_fields:
                walk(getattr(value, name))
        elif isinstance(value, dict):
            for item in value.values():
                walk(item)
        elif isinstance(value, list | tuple):
            for item in value:
                walk(item)

    walk(model)
    return found


def prefect_secrets() -> list[str]:
    from prefect.settings import get_current_settings

    api = get_current_settings().api
    return [s.get_secret_value() for s in (api.key, api.auth_string) if s is not None]


def redact(text: str, secrets: tuple[str, ...]) -> str:
    """text without the credentials of any URL in it, nor any of `secrets`."""
    text = URL_CREDENTIALS.sub(r"\g<scheme>***@", text)
    for secret in sorted(secrets, key=len, reverse=True):
        if secret:
            text = text.replace(secret, "***")
    return text


def receiver_settings(settings: Settings) -> ReceiverSettings:
    """[receiver], with credentials to check callers by, or the ConfigError saying how."""
    config = settings.receiver
    if config is None or not config.has_credentials:
        raise ConfigError(
            f'no [receiver] token in {config_path()}: add [receiver] with token = "..." '
            "(or RUNBOOK_RECEIVER__TOKEN) to receive alerts (see README, Alerts)"
        )
    return config


def default_state_file() -> Path:
    from prefect.settings import PREFECT_HOME

    return Path(PREFECT_HOME.value()) / "runbook-alerts.sqlite"


def build_receiver(
    settings: Settings, *, in_process: bool, runner: InProcessRunner | None = None
) -> Receiver:
    """The receiver the configuration asks for; in_process: this process serves the flows
    (on runner's threads, when given)."""
    config = receiver_settings(settings)
    routes = list(settings.routes) or load_routes(
        DEFAULT_ROUTES, {name: rb.params for name, rb in RUNBOOKS.items()}
    )
    starter: Starter
    if config.dispatch == "trigger":
        starter = TriggerStarter()
    elif in_process:
        starter = InProcessStarter(config.max_concurrent_runs, runner)
    else:
        starter = DeploymentStarter()
    store = AlertStore(
        config.state_file or default_state_file(),
        window_seconds=config.dedup_window_seconds,
        max_runs_per_hour=config.max_runs_per_hour,
    )
    targets = {name: rb.alert_targets(settings) for name, rb in RUNBOOKS.items()}
    secrets = tuple(secret_values(settings) + prefect_secrets())
    return Receiver(config, routes, targets, store, starter, secrets)


# -- HTTP ----------------------------------------------------------------------------------


def create_app(receiver: Receiver) -> FastAPI:
    app = FastAPI(
        title="runbook alert receiver",
        docs_url=None,
        redoc_url=None,
        description="Alerts in, remediation runs out. See README, Alerts.",
    )
    limit = receiver.config.max_body_bytes

    class TooLarge(Exception):
        pass

    async def read_body(request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise TooLarge
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise TooLarge
        return bytes(body)

    def error(status: int, detail: Any, **headers: str) -> JSONResponse:
        return JSONResponse({"detail": detail}, status_code=status, headers=headers or None)

    async def receive(source: Source, request: Request) -> JSONResponse:
        # Credentials before anything is parsed; a bearer token even before the body is read.
        by_token = receiver.authorized_by_token(request.headers.get("authorization"))
        signature = request.headers.get("x-runbook-signature")
        if not by_token and (signature is None or receiver.config.hmac_secret is None):
            return error(401, UNAUTHORIZED, **{"WWW-Authenticate": "Bearer"})
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type not in JSON_TYPES:
            return error(415, f"send Content-Type: application/json (got {content_type!r})")
        try:
            body = await read_body(request)
        except TooLarge:
            return error(413, f"body over receiver.max_body_bytes = {limit} bytes")
        if not by_token and not receiver.authorized_by_signature(signature or "", body):
            return error(401, UNAUTHORIZED, **{"WWW-Authenticate": "Bearer"})
        try:
            payload = PAYLOADS[source].model_validate_json(body)
        except ValidationError as exc:
            return error(
                422, exc.errors(include_url=False, include_context=False, include_input=False)
            )
        results = await run_in_threadpool(receiver.handle_all, split_alerts(source, payload))
        truncated = 0 if isinstance(payload, GenericPayload) else payload.truncatedAlerts
        if truncated:
            # The sender left these out of the group (its max_alerts): they were never seen.
            print(f"alerts truncated source={source} count={truncated}", flush=True)
        return JSONResponse(
            {"alerts": [asdict(r) for r in results], "truncated": truncated}, status_code=202
        )

    def endpoint(source: Source) -> Callable[[Request], Any]:
        async def post(request: Request) -> JSONResponse:
            return await receive(source, request)

        return post

    for source, model in PAYLOADS.items():
        app.add_api_route(
            f"/alerts/{source}",
            endpoint(source),
            methods=["POST"],
            status_code=202,
            name=f"alerts_{source}",
            summary=f"{source} webhook",
            openapi_extra={
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": model.model_json_schema()}},
                }
            },
        )

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok", "dispatch": receiver.starter.name}

    return app


def http_server(receiver: Receiver) -> uvicorn.Server:
    import uvicorn

    config = uvicorn.Config(
        create_app(receiver),
        host=receiver.config.host,
        port=receiver.config.port,
        log_level="warning",
        access_log=False,  # one line per alert is printed instead
        lifespan="off",
    )
    return uvicorn.Server(config)


def cannot_listen(config: ReceiverSettings) -> ConfigError:
    return ConfigError(
        f"the alert receiver could not listen on {config.listen}: is the port free? "
        "(receiver.listen)"
    )


class ReceiverServer:
    """uvicorn on a thread, next to `serve(...)` in the main thread."""

    def __init__(self, receiver: Receiver) -> None:
        self.receiver = receiver
        self.server = http_server(receiver)
        self.thread = threading.Thread(target=self._run, name="runbook-receiver", daemon=True)

    def _run(self) -> None:
        # uvicorn exits when it cannot bind; start() turns that into a ConfigError.
        with suppress(SystemExit):
            self.server.run()

    @property
    def url(self) -> str:
        return f"http://{self.receiver.config.host}:{self.receiver.config.port}"

    def start(self) -> ReceiverServer:
        self.thread.start()
        deadline = time.monotonic() + SERVER_START_TIMEOUT_SECONDS
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                self.server.should_exit = True
                raise cannot_listen(self.receiver.config)
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.receiver.starter.shutdown()
        self.receiver.store.close()


def run_receiver(settings: Settings, listen: str | None = None) -> None:
    """`runbook receiver`: the receiver alone, in the foreground, until Ctrl-C or SIGTERM."""
    if listen is not None and settings.receiver is not None:
        try:
            config = ReceiverSettings.model_validate(
                {**settings.receiver.model_dump(), "listen": listen}
            )
        except ValidationError:
            raise ConfigError(f"--listen {listen!r}: expected HOST:PORT, port 1-65535") from None
        settings = settings.model_copy(update={"receiver": config})
    receiver = build_receiver(settings, in_process=False)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    print(
        f"Alert receiver at http://{receiver.config.host}:{receiver.config.port} "
        f"(dispatch: {receiver.starter.name})",
        flush=True,
    )
    server = http_server(receiver)
    try:
        # uvicorn exits when it cannot bind: the usual configuration error instead.
        with suppress(SystemExit):
            server.run()
        if not server.started:
            raise cannot_listen(receiver.config)
    finally:
        receiver.starter.shutdown()
        receiver.store.close()


def start_receiver(
    settings: Settings, stack: ExitStack, runner: InProcessRunner | None = None
) -> ReceiverServer | None:
    """For `runbook serve`: the receiver on a thread, running alert runs in this process;
    stopped with the rest. None (and a note) when [receiver] has no token."""
    try:
        receiver_settings(settings)
    except ConfigError:
        print(
            "No [receiver] token configured: serving without the alert receiver "
            "(see README, Alerts)",
            flush=True,
        )
        return None
    server = ReceiverServer(build_receiver(settings, in_process=True, runner=runner)).start()
    stack.callback(server.stop)
    print(f"Alert receiver at {server.url} (dispatch: {server.receiver.starter.name})", flush=True)
    return server
