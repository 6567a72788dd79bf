"""An application's maintenance flag through its own admin API (seed 004 s2 step 5: PUT
/admin/settings {"key": "site.maintenance_mode", "value": "true"} with a bearer token), with
httpx and an explicit timeout on every call; and the pair of actions that keeps an application
in maintenance while another runbook mends what it depends on (tasks.maintenance_rules says
when the pair is planned and when it is taken out).

The token is unwrapped only into the Authorization header; no message, detail or finding
quotes it, nor an answer's body that echoes it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

import httpx

from tasks.engine import io_task, run_action
from tasks.errors import ActionFailed, AuthenticationFailed, ConfigError, TargetUnreachable
from tasks.http import probe_http
from tasks.journal import journal
from tasks.maintenance_rules import (
    MaintenanceReading,
    MaintenanceStep,
    at_path,
    flag_of,
    maintenance_finding,
    plan_pair,
    says_maintenance,
    verification_passed,
)
from tasks.models import Action, ActionStatus, Finding, Severity
from tasks.redact import redact
from tasks.settings import MaintenanceApi, ServiceTarget, Settings, config_path

# How much of a refusing answer's body the report quotes.
BODY_CHARS = 200


def _headers(api: MaintenanceApi) -> dict[str, str]:
    headers = {"Accept": "application/json"}
    if api.token is not None:
        headers["Authorization"] = f"Bearer {api.token.get_secret_value()}"
    return headers


def _quote(api: MaintenanceApi, text: str) -> str:
    """An answer's body for a message: cut short, and never the token (an API may echo it)."""
    return redact(text.strip()[:BODY_CHARS], [api.token])


def _refused(service: str, api: MaintenanceApi, url: str, response: httpx.Response) -> None:
    """Raise AuthenticationFailed for 401/403, ActionFailed for any other non-2xx answer."""
    where = f"services.{service}.maintenance"
    if response.status_code in (401, 403):
        given = "the token" if api.token is not None else "no token"
        raise AuthenticationFailed(
            f"{url} answered {response.status_code} to {given}: the admin API refuses it; "
            f"check {where}.token (sent as Authorization: Bearer)"
        )
    if not response.is_success:
        raise ActionFailed(
            f"{url} answered {response.status_code}: {_quote(api, response.text) or 'no body'}"
        )


def _call(service: str, api: MaintenanceApi, method: str, url: str, body: Any = None) -> Any:
    """One request to the admin API; its JSON answer (None when it has no JSON body).

    Raises TargetUnreachable (transient) when it does not answer in time or at all,
    AuthenticationFailed on 401/403, ActionFailed on any other non-2xx answer."""
    try:
        response = httpx.request(
            method,
            url,
            json=body,
            headers=_headers(api),
            timeout=api.timeout_seconds,
            follow_redirects=False,
        )
    except httpx.TimeoutException:
        raise TargetUnreachable(
            f"{url} did not answer within {api.timeout_seconds:g} s "
            f"(services.{service}.maintenance.timeout_seconds)",
            transient=True,
        ) from None
    except httpx.HTTPError as exc:
        raise TargetUnreachable(f"{url}: {type(exc).__name__}: {exc}", transient=True) from None
    _refused(service, api, url, response)
    try:
        return response.json()
    except json.JSONDecodeError:
        return None


@io_task("read-maintenance", timeout_seconds=150, retries=1)
def read_maintenance(service: str, svc: ServiceTarget) -> MaintenanceReading:
    """Read an application's maintenance flag: GET check_url (with the token) and the value at
    check_path; else its health_url, whose answer says `maintenance` when it is on.

    Args:
        service: the [services.NAME] name.
        svc: its entry; svc.maintenance must be set.

    Returns:
        MaintenanceReading: on True/False, or None with the error when the answer cannot be
        read as on or off (a value that is no flag, a health URL that does not answer).

    Raises:
        AuthenticationFailed: check_url answered 401/403 (never retried).
        TargetUnreachable: check_url did not answer (transient: retried once).
        ActionFailed: check_url answered another non-2xx status."""
    api = svc.maintenance
    assert api is not None, "read_maintenance of a service without maintenance"
    if api.check_url is not None:
        body = _call(service, api, "GET", api.check_url)
        source = f"GET {api.check_url} at {api.check_path}"
        found, value = at_path(body, api.check_path)
        if not found:
            return MaintenanceReading(
                service=service,
                on=None,
                source=source,
                error=f"its answer has no {api.check_path!r}: correct "
                f"services.{service}.maintenance.check_path",
            )
        on = flag_of(value)
        shown = value if isinstance(value, bool | int | float | str) or value is None else "?"
        return MaintenanceReading(
            service=service,
            on=on,
            source=source,
            observed=shown,
            error="" if on is not None else f"{shown!r} is no on/off value",
        )
    assert svc.health_url is not None  # settings: check_url or health_url
    probe = probe_http.fn(svc.health_url, api.timeout_seconds)
    source = f"GET {svc.health_url}"
    if probe.status_code is None:
        return MaintenanceReading(service=service, on=None, source=source, error=probe.error)
    on = says_maintenance(probe.status, probe.components)
    return MaintenanceReading(
        service=service, on=on, source=source, observed=f"{probe.status_code} {probe.status or ''}"
    )


@io_task("set-maintenance", timeout_seconds=150, retries=2)
def set_maintenance(service: str, svc: ServiceTarget, on: bool) -> str:
    """Switch an application's maintenance flag: `method` url with body_on or body_off as JSON
    and the bearer token (idempotent: the seed's PUT of a setting).

    Args:
        service: the [services.NAME] name.
        svc: its entry; svc.maintenance must be set.
        on: True to put it in maintenance, False to take it out.

    Returns:
        str: what was sent, for the action's detail (never the token).

    Raises:
        AuthenticationFailed: 401/403 (never retried).
        TargetUnreachable: no answer within timeout_seconds (retried twice).
        ActionFailed: any other non-2xx answer."""
    api = svc.maintenance
    assert api is not None, "set_maintenance of a service without maintenance"
    _call(service, api, api.method, api.url, api.body_on if on else api.body_off)
    return f"{api.method} {api.url}: maintenance {'on' if on else 'off'}"


def read_flag(service: str, svc: ServiceTarget) -> MaintenanceReading:
    """read_maintenance, with an answer that refuses the token, a refusing status or no
    answer at all as a reading of unknown (on None) saying why: a finding, not the end of
    the run."""
    try:
        return read_maintenance(service, svc)
    except (AuthenticationFailed, TargetUnreachable, ActionFailed) as exc:
        return MaintenanceReading(service=service, on=None, source="its admin API", error=str(exc))


def maintained_service(settings: Settings, name: str | None) -> tuple[str, ServiceTarget]:
    """A [services.NAME] that has `maintenance` (maintenance-mode's targets).

    Raises ConfigError: unknown, or without a maintenance API (naming those that have one)."""
    found_name, svc = settings.service_target(name)
    if svc.maintenance is None:
        having = ", ".join(sorted(n for n, s in settings.services.items() if s.maintenance))
        raise ConfigError(
            f"{config_path()}: services.{found_name} has no maintenance API: add "
            f"[services.{found_name}.maintenance] (url, body_on, body_off, token, check_url) "
            f"or pass a service that has one ({having or 'none is configured'})"
        )
    return found_name, svc


AnyAction = TypeVar("AnyAction", bound=Action[Any, Any])


@dataclass
class MaintenancePair:
    """A run's maintenance around its mending actions (tasks.maintenance_rules's docstring).
    In a flow, one line per step:

        maintenance = MaintenancePair.read(run.settings, name, pg.maintenance_service)  # 1.
        actions = maintenance.around(plan_...(...))                                     # 2.
        approved = run.gate(actions, before + maintenance.findings)                     # 3.
        for action in maintenance.enter(approved): ...                                  # 4.
        after += maintenance.leave(after)                                               # 5.
    """

    name: str
    service: str | None = None
    svc: ServiceTarget | None = None
    reading: MaintenanceReading | None = None
    findings: list[Finding] = field(default_factory=list)
    pair: tuple[MaintenanceStep, MaintenanceStep] | None = None
    mending: list[Action[Any, Any]] = field(default_factory=list)

    @classmethod
    def read(cls, settings: Settings, name: str, service: str | None) -> MaintenancePair:
        """Diagnose: the flag of the run target's maintenance_service (nothing when unset).
        A flag that cannot be read (no answer, a refused token) is a warning finding, and no
        pair is planned."""
        if service is None:
            return cls(name=name)
        svc = settings.service(service)
        reading = read_flag(service, svc)
        return cls(
            name=name,
            service=service,
            svc=svc,
            reading=reading,
            findings=[maintenance_finding(name, reading, None)],
        )

    def around(self, actions: list[AnyAction]) -> list[AnyAction]:
        """Plan: the actions with enable_maintenance first and disable_maintenance last, when
        the pair is planned (plan_pair); else the actions as they are. Pure."""
        self.mending = list(actions)
        self.pair = plan_pair(self.name, self.reading, self.mending)
        if self.pair is None:
            return actions
        journal().before_admit.append(self._drop_if_pointless)
        enable, disable = (cast(AnyAction, a) for a in self.pair)
        return [enable, *actions, disable]

    def _drop_if_pointless(self) -> None:
        """The gate's check before rate slots are taken (Journal.before_admit): when a lock or
        the approval policy skipped every mending action, or one half of the pair, the pair
        would be skipped by enter() anyway: skip it now, so that it spends no
        enable/disable_maintenance budget."""
        if self.pair is None:
            return
        planned = [a for a in self.pair if a.status is ActionStatus.planned]
        if not planned:
            return
        if not any(a.status is ActionStatus.planned for a in self.mending):
            said = "; ".join(f"{a.kind}: {a.detail}" for a in self.mending if a.detail)
            why = "no action it was to cover passed the gate" + (f": {said}" if said else "")
        elif len(planned) < 2:
            why = "the pair did not pass the gate together: " + "; ".join(
                f"{a.kind}: {a.detail}" for a in self.pair if all(a is not b for b in planned)
            )
        else:
            return
        for action in planned:
            action.status, action.detail = ActionStatus.skipped, why

    def enter(self, approved: list[AnyAction]) -> list[AnyAction]:
        """Act, first: put the application in maintenance when the whole pair passed the gate
        and some mending action did; returns the mending actions that passed, in order.
        A failed switch does not hold the mending back (the run then ends failed)."""
        if self.pair is None:
            return approved
        enable, disable = self.pair
        mending = [a for a in approved if a is not enable and a is not disable]
        passed = [a for a in self.pair if any(a is b for b in approved)]
        if len(passed) < 2 or not mending:
            why = (
                "no action it was to cover passed the gate"
                if not mending
                else "the pair did not pass the gate together: "
                + "; ".join(f"{a.kind}: {a.detail}" for a in self.pair if a not in passed)
            )
            for action in passed:
                action.status, action.detail = ActionStatus.skipped, why
            return mending
        assert self.service is not None and self.svc is not None
        run_action(enable, set_maintenance, self.service, self.svc, True)
        return mending

    def leave(self, after: list[Finding]) -> list[Finding]:
        """Verify and report: take the application out of maintenance when this run put it in
        and verification passed (verification_passed over `after` and the mending actions),
        and read the flag back; otherwise leave it in and say so. When the switch in failed
        (a request that timed out or was refused after the application applied it), the flag
        is read again: on, it is taken out as usual when verification passed, else the
        report says it is in maintenance and how to take it out; unreadable, the report says
        so. Returns the findings to add to `after`."""
        if self.pair is None:
            return []
        enable, disable = self.pair
        if enable.status is ActionStatus.failed and disable.status is ActionStatus.planned:
            return self._after_failed_enable(after)
        if enable.status is not ActionStatus.done:
            if disable.status is ActionStatus.planned:
                disable.status = ActionStatus.skipped
                disable.detail = disable.detail or "the application was not put in maintenance"
            return []
        assert self.service is not None and self.svc is not None
        failed = verification_passed(after, self.mending)
        if failed is not None:
            disable.status = ActionStatus.skipped
            disable.detail = f"{failed}: {self.service} stays in maintenance"
            return [self._stays(f"{self.service} stays in maintenance mode ({failed})")]
        run_action(disable, set_maintenance, self.service, self.svc, False)
        return [maintenance_finding(self.name, read_flag(self.service, self.svc), False)]

    def _after_failed_enable(self, after: list[Finding]) -> list[Finding]:
        """leave() when enable_maintenance failed: what the flag reads now decides."""
        assert self.pair is not None and self.service is not None and self.svc is not None
        _, disable = self.pair
        reading = read_flag(self.service, self.svc)
        if reading.on is False:
            disable.status = ActionStatus.skipped
            disable.detail = (
                f"the application was not put in maintenance ({self.service} reads off "
                f"after the failed switch, {reading.source})"
            )
            return []
        if reading.on is None:
            disable.status = ActionStatus.skipped
            disable.detail = (
                f"the switch into maintenance failed and {self.service}'s flag cannot be read "
                "again: it may be in maintenance"
            )
            return [
                self._stays(
                    f"the switch of {self.service} into maintenance failed and its flag cannot "
                    f"be read ({reading.source}: {reading.error}): it may be in maintenance; "
                    "check it, and if it is",
                    observed=None,
                )
            ]
        failed = verification_passed(after, self.mending)
        if failed is not None:
            disable.status = ActionStatus.skipped
            disable.detail = (
                f"{failed}: {self.service} is in maintenance (the switch reported a failure "
                "but was applied) and stays in"
            )
            return [
                self._stays(
                    f"{self.service} is in maintenance mode ({reading.source}) although the "
                    f"switch into it reported a failure, and stays in ({failed})"
                )
            ]
        run_action(disable, set_maintenance, self.service, self.svc, False)
        return [maintenance_finding(self.name, read_flag(self.service, self.svc), False)]

    def _stays(self, why: str, observed: str | None = "on") -> Finding:
        """The warning that the application is (or may be) left in maintenance, with the
        command that takes it out."""
        return Finding(
            check="maintenance",
            target=self.name,
            severity=Severity.warning,
            observed=observed,
            threshold="off",
            message=f"{why}; take it out once mended: runbook run maintenance-mode --target "
            f"{self.service} --set enable=false --apply",
        )
