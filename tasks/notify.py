"""Notifications and escalation: who is told when a run needs approval, failed, did not fix
what it found, or fixed it (issue "notifications and escalation"; seed 002 "Escalation
Procedures"; seed 004's severities: Critical -> PagerDuty, Warning -> Slack).

Configured in the inventory as `[[notify.routes]]` (tasks.settings.Settings.notify), each a
list of apprise URLs (https://github.com/caronc/apprise/wiki: slack://, pagerduty://,
mailto://, json://, ...) and the events, severities and runbooks it takes. A route with
`after_minutes > 0` is an escalation level: it is told of an approval request only when the
run is still waiting for an answer after that long (Escalation), and of nothing else.

Every message carries the run's link in the Prefect UI (`ui_url`, else Prefect's
PREFECT_UI_URL). The URLs are secrets (they hold tokens and passwords): they are SecretStr,
unwrapped only to hand them to apprise, and every piece of them is redacted from apprise's
log records and from the failure messages `send` returns.

Sending never raises and is bounded in time (SEND_TIMEOUT_SECONDS per call, and
SOCKET_TIMEOUT_SECONDS per connection): a notification that cannot be delivered must not
change a run's outcome; its failure is returned, and logged by the caller.
"""

from __future__ import annotations

import contextvars
import logging
import re
import threading
import time
from typing import Literal, get_args
from urllib.parse import parse_qsl, unquote, urlsplit

import apprise
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from tasks.journal import run_logger
from tasks.models import ActionStatus, Finding, Report, RunStatus, Severity, problems
from tasks.redact import redact

NotifyEvent = Literal["approval_needed", "remediation_failed", "verification_failed", "fixed"]
NOTIFY_EVENTS: tuple[NotifyEvent, ...] = get_args(NotifyEvent)
RouteSeverity = Literal["warning", "critical"]
ROUTE_SEVERITIES: tuple[RouteSeverity, ...] = get_args(RouteSeverity)

# Whole call, every URL of it at once (apprise sends them in parallel); then per connection.
# An approval request waits for a human for an hour: half a minute of trying is plenty, and
# short enough that finishing a run is never held up for long by a dead endpoint.
SEND_TIMEOUT_SECONDS = 30.0
SOCKET_TIMEOUT_SECONDS = 10.0

_NOTIFY_TYPE = {
    "approval_needed": apprise.NotifyType.WARNING,
    "remediation_failed": apprise.NotifyType.FAILURE,
    "verification_failed": apprise.NotifyType.FAILURE,
    "fixed": apprise.NotifyType.SUCCESS,
}
_HEADLINE = {
    "approval_needed": "approval needed",
    "remediation_failed": "remediation failed",
    "verification_failed": "still unhealthy after remediation",
    "fixed": "fixed",
}
_MIN_REDACTED = 4  # shorter URL pieces (ports, "to") would blank out ordinary words


class NotifyRoute(BaseModel):
    """Where one kind of news goes. `urls`: apprise URLs (secrets); `events` and `severities`
    it takes (default: all); `runbooks` (default: all); `after_minutes`: 0 tells at once, more
    makes it an escalation level for approval requests unanswered that long (seed 002)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    urls: list[SecretStr] = Field(min_length=1)
    events: list[NotifyEvent] = Field(default_factory=lambda: list(NOTIFY_EVENTS), min_length=1)
    severities: list[RouteSeverity] = Field(
        default_factory=lambda: list(ROUTE_SEVERITIES), min_length=1
    )
    runbooks: list[str] | None = None
    after_minutes: float = Field(0, ge=0, le=7 * 24 * 60, description="minutes")

    @model_validator(mode="after")
    def _escalation_takes_approvals(self) -> NotifyRoute:
        if self.after_minutes > 0 and "approval_needed" not in self.events:
            raise ValueError(
                "after_minutes escalates unanswered approval requests only: add "
                '"approval_needed" to events, or set after_minutes = 0'
            )
        return self

    def takes(
        self, event: NotifyEvent, severity: Severity, runbook: str, escalation_level: float = 0
    ) -> bool:
        """Whether this route gets `event` of a run of `runbook` at `severity` (ok: none do);
        at escalation_level 0 (at once) or, for approval_needed, after that many minutes."""
        return (
            event in self.events
            and severity.value in self.severities
            and (self.runbooks is None or runbook in self.runbooks)
            and self.after_minutes == escalation_level
        )


class NotifySettings(BaseModel):
    """The inventory's [notify]: `routes` ([[notify.routes]]) and `ui_url`, the Prefect UI's
    address for links (default: Prefect's PREFECT_UI_URL)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    routes: list[NotifyRoute] = Field(default_factory=list)
    ui_url: str | None = Field(None, description="http(s)://host:port of the Prefect UI")

    @field_validator("ui_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"https?://[^\s/]+(/\S*)?", value):
            raise ValueError("must be the Prefect UI's http(s):// address, e.g. http://host:4200")
        return value.rstrip("/") if value else value

    @model_validator(mode="after")
    def _urls_resolve(self) -> NotifySettings:
        # The runbooks each route names are checked against the registry by the entry points
        # (deployments.config); a route naming none that runs gets nothing, as one filtered out.
        for i, route in enumerate(self.routes):
            for j, url in enumerate(route.urls):
                if _service(url) is None:
                    # Never the URL itself: it holds tokens.
                    raise ValueError(
                        f"routes[{i}].urls[{j}]: apprise does not accept this URL (an unknown "
                        "scheme, or a part its service needs is missing); see the URL forms "
                        "at https://github.com/caronc/apprise/wiki"
                    )
        return self


def run_severity(before: list[Finding]) -> Severity:
    """The severity of a run: the worst finding before acting (seed 004: critical ->
    PagerDuty-like routes, warning -> Slack-like routes). ok when nothing was wrong."""
    order = [Severity.ok, Severity.warning, Severity.critical]
    return max((f.severity for f in before), key=order.index, default=Severity.ok)


def report_event(report: Report, before: list[Finding]) -> NotifyEvent | None:
    """What a finished run tells people. Pure: failed -> remediation_failed; unhealthy after
    actions ran (done or failed) -> verification_failed; fixed -> fixed; otherwise None
    (healthy, a dry run, or nothing was acted on, e.g. a rejected approval)."""
    if report.status is RunStatus.failed:
        return "remediation_failed"
    if report.dry_run:
        return None
    acted = any(a.status in (ActionStatus.done, ActionStatus.failed) for a in report.actions)
    if report.status is RunStatus.unhealthy and acted and problems(before):
        return "verification_failed"
    if report.status is RunStatus.fixed:
        return "fixed"
    return None


def report_message(report: Report, before: list[Finding]) -> tuple[str, str]:
    """(title, body) of a finished run's notification: the outcome, the problems found before
    acting, the actions and what became of them, what remains. Plain text; no secret (findings
    and actions never carry one)."""
    title = f"{report.runbook} on {report.target}: {report.status.value}"
    lines = [f"Runbook {report.runbook} on {report.target} ended {report.status.value}."]
    found = problems(before)
    if found:
        lines += ["", "Found:"] + [f"- [{f.severity.value}] {f.check}: {f.message}" for f in found]
    if report.actions:
        lines += ["", "Actions:"]
        for a in report.actions:
            detail = f" ({a.detail})" if a.detail else ""
            lines.append(f"- {a.status.value}: {a.kind} on {a.target}: {a.description}{detail}")
    remaining = problems(report.findings)
    if remaining:
        lines += ["", "Still wrong:"]
        lines += [f"- [{f.severity.value}] {f.check}: {f.message}" for f in remaining]
    if report.approval is not None:
        who = report.approval.approver or "nobody"
        lines += ["", f"Approval: {report.approval.decision.value} by {who}"]
    return title, "\n".join(lines)


def notify_report(
    report: Report, before: list[Finding], settings: NotifySettings | None
) -> list[str]:
    """Send a finished run's news (report_event, report_message) to its routes; the
    severity is the run's (run_severity), at least warning for a failed run. Returns
    failures as `send` does; [] when there is nothing to tell."""
    event = report_event(report, before)
    if event is None or settings is None:
        return []
    severity = run_severity(before)
    if event == "remediation_failed" and severity is Severity.ok:
        severity = Severity.warning
    title, body = report_message(report, before)
    return send(
        event,
        runbook=report.runbook,
        target=report.target,
        severity=severity,
        title=title,
        body=body,
        flow_run_id=report.flow_run_id,
        settings=settings,
    )


def run_link(flow_run_id: str | None, settings: NotifySettings | None) -> str | None:
    """<ui>/runs/flow-run/<id>: the run's page in the Prefect UI (a paused run shows its
    approval form behind Resume there). ui is settings.ui_url, else PREFECT_UI_URL; None
    when there is no run id or no UI address."""
    if flow_run_id is None:
        return None
    ui = settings.ui_url if settings is not None else None
    if ui is None:
        from prefect.settings import PREFECT_UI_URL

        ui = PREFECT_UI_URL.value()
    if not ui:
        return None
    return f"{ui.rstrip('/')}/runs/flow-run/{flow_run_id}"


def send(
    event: NotifyEvent,
    *,
    runbook: str,
    target: str,
    severity: Severity,
    title: str,
    body: str,
    flow_run_id: str | None,
    settings: NotifySettings | None,
    escalation_level: float = 0,
) -> list[str]:
    """Send title and body, with the run's link appended, to every URL of every route that
    takes this event, severity and runbook at this escalation level (minutes; 0: at once).

    Returns one message per URL that failed, naming it as routes[i].urls[j] and its service,
    with every piece of the URL redacted; [] when all were delivered or none applied. Never
    raises; takes at most about SEND_TIMEOUT_SECONDS."""
    if settings is None:
        return []
    chosen = [
        (f"routes[{i}].urls[{j}]", url)
        for i, route in enumerate(settings.routes)
        if route.takes(event, severity, runbook, escalation_level)
        for j, url in enumerate(route.urls)
    ]
    if not chosen:
        return []
    full_body = _with_link(event, body, run_link(flow_run_id, settings))
    if escalation_level:
        title = f"Escalation: unanswered for {escalation_level:g} min: {title}"
    full_title = f"[{severity.value}] {_HEADLINE[event]}: {title}"
    try:
        return _deliver(chosen, event, full_title, full_body)
    except Exception as exc:  # a notification must never change a run's outcome
        secrets = [url for _, url in chosen]
        return [f"notify: {event} not delivered: {_redact(repr(exc), secrets)}"]


def _with_link(event: NotifyEvent, body: str, link: str | None) -> str:
    if link is None:
        return body
    if event == "approval_needed":
        return (
            f"{body}\n\nApprove or reject: {link} (the run is Paused: press Resume and "
            "fill in the form)"
        )
    return f"{body}\n\nFlow run: {link}"


def _deliver(
    chosen: list[tuple[str, SecretStr]], event: NotifyEvent, title: str, body: str
) -> list[str]:
    secrets = [url for _, url in chosen]
    _register(secrets)
    failures: list[str] = []
    sender = apprise.Apprise(asset=_asset())
    names: dict[str, tuple[str, str]] = {}
    for n, (where, url) in enumerate(chosen):
        # A tag per URL: apprise's results name services by masked URL, tags map them back.
        tag = f"route-url-{n}"
        service = _service(url, tag)
        if service is None:
            failures.append(f"notify {where}: apprise does not accept this URL")
            continue
        service.socket_connect_timeout = min(service.socket_connect_timeout, SOCKET_TIMEOUT_SECONDS)
        service.socket_read_timeout = min(service.socket_read_timeout, SOCKET_TIMEOUT_SECONDS)
        names[tag] = (where, str(service.service_name or "apprise"))
        sender.add(service)
    if not names:
        return failures
    result = sender.notify(
        body=body,
        title=title,
        notify_type=_NOTIFY_TYPE[event],
        body_format=apprise.NotifyFormat.TEXT,
        timeout=SEND_TIMEOUT_SECONDS,
    )
    delivered: set[str] = set()
    for service_result in result:
        known = [t for t in service_result.tag if t in names]
        if not known:
            continue
        tag = known[0]
        delivered.add(tag)
        if service_result:
            continue
        where, name = names[tag]
        said = [
            entry.message
            for entry in service_result.logs()
            if entry.level in ("WARNING", "ERROR", "CRITICAL")
        ]
        reason = service_result.status.name.lower()
        if said:
            # apprise's own words: they may quote the URL, so only they are redacted
            reason += ": " + _redact(" ".join(said[-2:]), secrets)
        failures.append(f"notify {where} ({name}): {event} not delivered: {reason}")
    for tag, (where, name) in names.items():
        if tag not in delivered:
            failures.append(f"notify {where} ({name}): {event} not attempted: {result.status.name}")
    return failures


def _asset() -> apprise.AppriseAsset:
    # Memory only: apprise's persistent store would write service state beside the process.
    return apprise.AppriseAsset(
        app_id="Runbook automation",
        app_desc="Runbook automation on Prefect",
        storage_mode="memory",
        service_timeout=SEND_TIMEOUT_SECONDS,
    )


def _service(url: SecretStr, tag: str | None = None) -> apprise.NotifyBase | None:
    _register([url])
    return apprise.Apprise.instantiate(url.get_secret_value(), asset=_asset(), tag=tag)


# Apprise logs through one logger ("apprise"), some records with a service's URL in them
# (privacy masking hides passwords, not tokens in a path). Every configured URL's pieces are
# redacted from its records before any handler (or apprise's own result capture) sees them;
# a URL is registered before apprise first parses it.
_secret_pieces: set[str] = set()
_secret_lock = threading.Lock()


def _pieces(url: str) -> set[str]:
    parts = urlsplit(url)
    found = {url, unquote(url)}
    rest = url.split("://", 1)[-1].split("?", 1)[0].split("#", 1)[0]
    found.update(p for p in re.split(r"[/:@]+", rest) if p)
    found.update(v for _, v in parse_qsl(parts.query) if v)
    found.update(unquote(p) for p in list(found))
    return {p for p in found if len(p) >= _MIN_REDACTED}


def _register(urls: list[SecretStr]) -> None:
    with _secret_lock:
        for url in urls:
            _secret_pieces.update(_pieces(url.get_secret_value()))


def _redact(text: str, urls: list[SecretStr] | None = None) -> str:
    pieces = set(_secret_pieces)
    for url in urls or []:
        pieces |= _pieces(url.get_secret_value())
    return redact(text, pieces)


class _RedactSecrets(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if _secret_pieces:
            record.msg = _redact(record.getMessage())
            record.args = None
        return True


# urllib3 logs each request's path (where webhook tokens live) at DEBUG.
for _name in (apprise.logger.name, "urllib3.connectionpool"):
    logging.getLogger(_name).addFilter(_RedactSecrets())


class Escalation:
    """Seed 002's escalation levels for one approval request: for each distinct after_minutes
    of the routes taking it, a timer that sends approval_needed at that level unless the
    request was answered (cancel) first. Started by the gate when a run pauses for approval;
    the timers are daemon threads of the run's process and carry its context (its logger)."""

    def __init__(
        self,
        settings: NotifySettings | None,
        *,
        runbook: str,
        target: str,
        severity: Severity,
        title: str,
        body: str,
        flow_run_id: str | None,
    ) -> None:
        self._settings = settings
        self._runbook, self._target, self._severity = runbook, target, severity
        self._title, self._body, self._flow_run_id = title, body, flow_run_id
        self._timers: list[threading.Timer] = []
        self._lock = threading.Lock()
        self._cancelled = False
        # Levels sent, in minutes, and their failures: for the caller's log and the tests.
        self.sent: list[float] = []
        self.failures: list[str] = []

    @property
    def levels(self) -> list[float]:
        """The after_minutes of every route this request escalates to, ascending."""
        if self._settings is None:
            return []
        return sorted(
            {
                r.after_minutes
                for r in self._settings.routes
                if r.after_minutes > 0
                and r.takes("approval_needed", self._severity, self._runbook, r.after_minutes)
            }
        )

    def start(self) -> None:
        """Start one timer per escalation level; idempotent per instance."""
        with self._lock:
            if self._timers or self._cancelled:
                return
            for minutes in self.levels:
                context = contextvars.copy_context()  # one per thread: a context runs once
                timer = threading.Timer(minutes * 60, context.run, args=(self._fire, minutes))
                timer.daemon = True
                timer.name = f"runbook-escalation-{minutes:g}min"
                self._timers.append(timer)
                timer.start()

    def cancel(self) -> None:
        """The request was answered (or the run ended): no level not yet sent will be."""
        with self._lock:
            self._cancelled = True
            for timer in self._timers:
                timer.cancel()

    def join(self, timeout: float) -> None:
        """Wait up to timeout seconds in all for the timers to end (sent, or cancelled)."""
        deadline = time.monotonic() + timeout
        for timer in list(self._timers):
            timer.join(max(0.0, deadline - time.monotonic()))

    def _fire(self, minutes: float) -> None:
        with self._lock:
            if self._cancelled:
                return
        failures = send(
            "approval_needed",
            runbook=self._runbook,
            target=self._target,
            severity=self._severity,
            title=self._title,
            body=self._body,
            flow_run_id=self._flow_run_id,
            settings=self._settings,
            escalation_level=minutes,
        )
        with self._lock:
            self.sent.append(minutes)
            self.failures.extend(failures)
        for failure in failures:
            run_logger(__name__).warning("%s", failure)
