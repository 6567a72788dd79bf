"""The receiver's HTTP side: the FastAPI app (credentials, size and type limits, payload models),
the Receiver that handles each alert (route, storm control, start), and keeping secrets out of
what it prints."""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, SecretStr, ValidationError
from starlette.concurrency import run_in_threadpool

from deployments.alert_routes import (
    PAYLOADS,
    Alert,
    Dispatch,
    GenericPayload,
    Outcome,
    Source,
    plan_dispatch,
    route_for,
    split_alerts,
)
from deployments.alert_store import AlertStore, StoreError, StoreUnavailable
from deployments.catalog import RUNBOOKS
from deployments.receiver.runs import AlertResult, Starter, emit_alert_event, log_result
from tasks.errors import AuthenticationFailed, ConfigError
from tasks.models import utcnow
from tasks.redact import redact_urls
from tasks.settings import ReceiverSettings, Route

JSON_TYPES = ("application/json", "application/vnd.json")
# Fixed: the store's own error names its host and database, which callers need not see.
STORE_UNAVAILABLE = (
    "the alert store is unavailable: the alerts not yet decided were not recorded; "
    "send them again (Alertmanager does)"
)
START_UNAVAILABLE = (
    "the Prefect API could not take a run now: what was decided is recorded (a re-send of it "
    "is deduplicated), the runs not started start on the re-send (Alertmanager re-sends)"
)
UNAUTHORIZED = (
    "missing or invalid credentials: send 'Authorization: Bearer <receiver.token>' or "
    "'X-Runbook-Signature: sha256=<hex HMAC-SHA256 of the body with receiver.hmac_secret>'"
)


class StartsUnavailable(Exception):
    """A run of the group could not start for a reason a re-send may not meet (the Prefect API
    overloaded or away); every alert of the group was handled and recorded first."""

    def __init__(self, results: list[AlertResult]) -> None:
        super().__init__("runs not started: the Prefect API is unavailable")
        self.results = results


def start_unavailable(exc: Exception) -> bool:
    """The Prefect API could not take the run now: a 5xx or 429 after its client's own retries
    (SQLite's "database is locked" under a burst is a 503), a timeout, a connection cut."""
    if isinstance(exc, httpx.HTTPStatusError):
        code = exc.response.status_code
        return code >= 500 or code == 429
    return isinstance(exc, httpx.TransportError)


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
        self.secrets = secrets  # never printed: see tasks.redact.redact_urls

    def handle(self, alert: Alert) -> tuple[AlertResult, bool]:
        """The alert's result, and whether its run failed to start for a reason a re-send may
        not meet (start_unavailable)."""
        route = route_for(alert, self.routes)
        retry = False
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
                retry = start_unavailable(exc)
                # The caller and the store get a fixed text: an exception's may carry the API
                # URL and its credentials. The full text goes to the server's log, redacted.
                detail = (
                    f"could not start {dispatch.deployment} ({type(exc).__name__}); "
                    "see the receiver's log"
                )
                print(
                    f"alert start failed fingerprint={json.dumps(alert.fingerprint)} "
                    f"deployment={json.dumps(dispatch.deployment)}: "
                    f"{redact_urls(f'{type(exc).__name__}: {exc}', self.secrets)}",
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
        return result, retry

    def handle_all(self, alerts: list[Alert]) -> list[AlertResult]:
        """Every alert's result. Raises StartsUnavailable, after handling them all, when a run
        could not start because the Prefect API could not take it now: the caller answers 503
        so that the group is sent again (a 202 would leave the episode without its run until
        Alertmanager's next notification of the group, up to its repeat_interval)."""
        handled = [self.handle(alert) for alert in alerts]
        results = [result for result, _ in handled]
        if any(retry for _, retry in handled):
            raise StartsUnavailable(results)
        return results

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
        try:
            results = await run_in_threadpool(receiver.handle_all, split_alerts(source, payload))
        except (StoreError, AuthenticationFailed) as exc:
            # 503: Alertmanager re-sends the group. What was decided before stays decided,
            # and a re-send of it is deduplicated; the failing alert's transaction rolled back.
            # Also for what a retry cannot fix by itself (a privilege revoked, a read-only
            # standby): nothing was recorded, and the re-send succeeds once it is fixed.
            state = "unavailable" if isinstance(exc, StoreUnavailable) else "failed"
            print(
                f"alert store {state} source={source}: {redact_urls(str(exc), receiver.secrets)}",
                flush=True,
            )
            return error(503, STORE_UNAVAILABLE, **{"Retry-After": "10"})
        except StartsUnavailable as exc:
            failed = sum(r.outcome is Outcome.rejected for r in exc.results)
            print(f"alert runs not started source={source} count={failed}: 503", flush=True)
            return JSONResponse(
                {"detail": START_UNAVAILABLE, "alerts": [asdict(r) for r in exc.results]},
                status_code=503,
                headers={"Retry-After": "10"},
            )
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
