"""Alerts in, remediations out: the checks of the [[routes]] configuration against the registry
(its shape, and the [receiver]'s, is tasks.settings'), the default routes, the webhook payloads
we accept (Alertmanager v4, Grafana unified alerting, our generic schema), one Alert per
fingerprint, and the pure decisions (which route, which target, which parameters, and whether
storm control lets a run start). No I/O here.

Label values only ever select a target among the inventory's names by exact equality; they are
never interpolated into anything (a template, a query, a tag, a run name)."""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)

from tasks.errors import ConfigError
from tasks.fleet_rules import FLEET
from tasks.models import AlertInfo, Params, explain_params
from tasks.settings import Route, Settings

DEFAULT_ROUTES = Path(__file__).resolve().parent / "alerts" / "routes.toml"
# Flow parameters the route sets itself (target from labels, dry_run from apply): never `set`.
RESERVED = ("target", "dry_run", "approval", "alert")
CAP_PERIOD = timedelta(hours=1)
# A started run's reservation is settled (run created, or released) within this: longer than
# a start takes (a Prefect API call, its 60 s request timeout by default, or a wait of
# DEPLOYMENT_WAIT_SECONDS for a registering deployment), shorter than Alertmanager's
# group_interval (5 min), so that its next re-send of an alert whose settling was lost (the
# store went away in between) starts the run instead of being deduplicated for the window.
SETTLE_GRACE = timedelta(seconds=120)

Source = Literal["alertmanager", "grafana", "generic"]
Status = Literal["firing", "resolved"]
# Alertmanager's fingerprints are 16 hex digits; ours and Grafana's fit the same shape. The
# fingerprint names an event resource, so it is kept to characters that need no escaping.
Fingerprint = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")]
# Absent or empty (some relays send ""): computed from the labels (fingerprint_of).
SentFingerprint = Annotated[Fingerprint | None, BeforeValidator(lambda v: None if v == "" else v)]
# Bounded so that one alert's Prefect event (labels twice: resource and payload) stays far
# under Prefect's event size limit; Prometheus's own labels are short. Annotations are free
# text (descriptions, runbook links): their values are bounded only by max_body_bytes.
MAX_NAME = 256
MAX_LABEL_VALUE = 4096
LabelName = Annotated[str, Field(min_length=1, max_length=MAX_NAME)]
LabelSet = dict[LabelName, Annotated[str, Field(max_length=MAX_LABEL_VALUE)]]
Annotations = dict[LabelName, str]


# -- configuration --------------------------------------------------------------------------


def check_route(where: str, route: Route, params: Mapping[str, type[Params]]) -> None:
    """A route names a known runbook and only that runbook's parameters, with valid values."""
    if route.runbook not in params:
        raise ConfigError(
            f"{where}.runbook: unknown runbook {route.runbook!r}; known: {', '.join(params)}"
        )
    reserved = sorted(set(route.set) & set(RESERVED))
    if reserved:
        raise ConfigError(
            f"{where}.set: {', '.join(reserved)} cannot be set: the target comes from "
            "target/target_label and the dry run from apply"
        )
    try:
        params[route.runbook].model_validate(route.set)
    except ValidationError as exc:
        raise ConfigError(
            f"{where}.set: {explain_params(params[route.runbook], exc)}; fix the value or "
            "remove the key"
        ) from None


def check_routes(settings: Settings) -> None:
    """The configured [[routes]] against the registry: each names a runbook, only its
    parameters (check_route), and a fixed target only among the targets an alert may name for
    it (Runbook.alert_targets). Run where the receiver is built, and by load_config.

    Raises ConfigError naming routes[i] and the fix."""
    from deployments.catalog import RUNBOOKS

    params = {name: rb.params for name, rb in RUNBOOKS.items()}
    for i, route in enumerate(settings.routes):
        check_route(f"routes[{i}]", route, params)
        if route.selector is not None:
            try:
                RUNBOOKS[route.runbook].select(settings, route.selector)
            except ConfigError as exc:
                raise ConfigError(f"routes[{i}].selector: {exc}") from None
            continue
        targets = RUNBOOKS[route.runbook].alert_targets(settings)
        if route.target is not None and route.target not in targets:
            raise ConfigError(
                f"routes[{i}].target names {route.target!r}, not a {route.runbook} target "
                f"(configured: {', '.join(targets) or 'none'}); fix it or use target_label"
            )


def load_routes(path: Path, params: Mapping[str, type[Params]]) -> list[Route]:
    """The [[routes]] of a TOML file (the shipped defaults), checked like configured ones."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the default alert routes: {exc}") from None
    routes: list[Route] = []
    for i, raw in enumerate(data.get("routes", [])):
        try:
            route = Route.model_validate(raw)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}"
                for e in exc.errors(include_url=False, include_input=False)
            )
            raise ConfigError(f"{path}: routes[{i}]: {problems}") from None
        check_route(f"{path}: routes[{i}]", route, params)
        routes.append(route)
    return routes


# -- payloads ------------------------------------------------------------------------------


class _Payload(BaseModel):
    # Senders add fields over time; what we use is typed and required, the rest is ignored
    # (not declared: a field we never read cannot turn a sender's payload into a 422).
    model_config = ConfigDict(extra="ignore", frozen=True)


def _alertname(labels: Mapping[str, str]) -> None:
    name = labels.get("alertname")
    if not name:
        raise ValueError("labels.alertname is missing or empty")
    if len(name) > MAX_NAME:
        raise ValueError(f"labels.alertname is over {MAX_NAME} characters")


class AlertmanagerAlert(_Payload):
    status: Status
    labels: LabelSet
    annotations: Annotations = Field(default_factory=dict)
    # Alertmanager sends it from 0.19 on; before, it is computed from the labels as
    # Alertmanager computes it (fingerprint_of), so an upgrade does not change an alert's.
    fingerprint: SentFingerprint = None

    @model_validator(mode="after")
    def _named(self) -> AlertmanagerAlert:
        _alertname(self.labels)
        return self


class AlertmanagerPayload(_Payload):
    """Alertmanager's webhook_config payload, version 4: one group of alerts."""

    version: Literal["4"]
    status: Status
    # Alerts of the group Alertmanager left out (its max_alerts; the field from 0.21 on):
    # reported, never received.
    truncatedAlerts: int = Field(0, ge=0)
    alerts: list[AlertmanagerAlert] = Field(min_length=1)


class GrafanaAlert(_Payload):
    status: Status
    labels: LabelSet
    annotations: Annotations = Field(default_factory=dict)
    fingerprint: SentFingerprint = None

    @model_validator(mode="after")
    def _named(self) -> GrafanaAlert:
        _alertname(self.labels)
        return self


class GrafanaPayload(_Payload):
    """Grafana unified alerting's webhook contact point payload."""

    status: Status
    # Alerts Grafana left out of the notification (the contact point's max_alerts), as
    # Alertmanager's field of the same name: reported, never received.
    truncatedAlerts: int = Field(0, ge=0)
    alerts: list[GrafanaAlert] = Field(min_length=1)


class GenericAlert(_Payload):
    name: str = Field(min_length=1, max_length=MAX_NAME)
    status: Status
    labels: LabelSet = Field(default_factory=dict)
    annotations: Annotations = Field(default_factory=dict)
    fingerprint: SentFingerprint = None


class GenericPayload(_Payload):
    """Our own small schema, for anything that can POST JSON."""

    alerts: list[GenericAlert] = Field(min_length=1)


PAYLOADS: dict[Source, type[AlertmanagerPayload | GrafanaPayload | GenericPayload]] = {
    "alertmanager": AlertmanagerPayload,
    "grafana": GrafanaPayload,
    "generic": GenericPayload,
}


@dataclass(frozen=True)
class Alert:
    """One alert, whatever sent it."""

    source: Source
    name: str
    status: Status
    labels: dict[str, str]
    annotations: dict[str, str]
    fingerprint: str


FNV64_OFFSET, FNV64_PRIME = 14695981039346656037, 1099511628211
LABEL_SEPARATOR = 0xFF


def fingerprint_of(name: str, labels: Mapping[str, str]) -> str:
    """The fingerprint of an alert that came without one, for every source: Prometheus's
    LabelSet.Fingerprint (prometheus/common model/signature.go), the one Alertmanager 0.19+
    and Grafana send: FNV-1a 64 over each label name and value in name order, each followed
    by the byte 0xFF, as 16 hex digits. The same labels always give the same fingerprint, so
    a re-send dedups, and an Alertmanager upgraded past 0.19 keeps its alerts' fingerprints.
    `name` is the alertname label (a generic alert's name wins over a label of that name);
    a label with an empty value is no label, as in Prometheus."""
    digest = FNV64_OFFSET
    present = {k: v for k, v in labels.items() if v}
    for key, value in sorted({**present, "alertname": name}.items()):
        for byte in (*key.encode(), LABEL_SEPARATOR, *value.encode(), LABEL_SEPARATOR):
            digest = ((digest ^ byte) * FNV64_PRIME) & 0xFFFF_FFFF_FFFF_FFFF
    return f"{digest:016x}"


def split_alerts(
    source: Source, payload: AlertmanagerPayload | GrafanaPayload | GenericPayload
) -> list[Alert]:
    """One Alert per fingerprint: a group that repeats a fingerprint keeps its last entry."""
    alerts: dict[str, Alert] = {}
    for item in payload.alerts:
        name = item.name if isinstance(item, GenericAlert) else item.labels["alertname"]
        fp = item.fingerprint or fingerprint_of(name, item.labels)
        alerts[fp] = Alert(
            source=source,
            name=name,
            status=item.status,
            labels=dict(item.labels),
            annotations=dict(item.annotations),
            fingerprint=fp,
        )
    return list(alerts.values())


# -- decisions -----------------------------------------------------------------------------


class Outcome(StrEnum):
    started = "started"
    deduplicated = "deduplicated"
    unrouted = "unrouted"
    resolved = "resolved"
    capped = "capped"
    rejected = "rejected"


def matches(route: Route, alert: Alert) -> bool:
    """Whether the route takes the alert: its name, and every matcher's label equal."""
    return alert.name == route.alert and all(
        alert.labels.get(label) == value for label, value in route.matchers.items()
    )


def route_for(alert: Alert, routes: list[Route]) -> Route | None:
    """The first route that matches, in configuration order."""
    return next((r for r in routes if matches(r, alert)), None)


@dataclass(frozen=True)
class Dispatch:
    """A run to start: deployment <runbook>/<target> with these flow parameters; target FLEET:
    the runbook's fleet deployment, whose parameters name the selector."""

    runbook: str
    target: str
    parameters: dict[str, Any]

    @property
    def deployment(self) -> str:
        return f"{self.runbook}/{self.target}"


def pick_target(alert: Alert, route: Route, targets: list[str]) -> str:
    """The target among the runbook's inventory targets; ConfigError says why there is none.

    A label can only select one of `targets` by exact equality."""
    if route.target is not None:
        wanted, whence = route.target, "the route's target"
    else:
        label = route.target_label or "target"
        value = alert.labels.get(label)
        if value is None:
            if len(targets) == 1:
                return targets[0]
            raise ConfigError(
                f"the alert has no {label!r} label to pick one of {len(targets)} targets of "
                f"{route.runbook}: add it to the alert rule, or set target in the route"
            )
        wanted, whence = value, f"label {label!r}"
    if wanted not in targets:
        raise ConfigError(
            f"{whence} names no {route.runbook} target in the inventory "
            f"(targets: {', '.join(targets) or 'none'})"
        )
    return wanted


def plan_dispatch(
    alert: Alert,
    route: Route,
    targets: list[str],
    params: type[Params],
    narrow: tuple[str, str] | None = None,
    received_at: datetime | None = None,
) -> Dispatch:
    """The run the route asks for; parameters typed by the runbook's Params class, so numbers
    and lists reach the flow as numbers and lists. narrow: (the one target a runbook is served
    as, the parameter that narrows it to another of `targets`). A route with a selector: a
    fleet run (target FLEET), its targets chosen by the fleet when it runs."""
    values = dict(route.set)
    if route.selector is not None:
        target, where = FLEET, {"selector": route.selector}
    else:
        target = pick_target(alert, route, targets)
        if narrow is not None and target != narrow[0]:
            target, values[narrow[1]] = narrow[0], target
        where = {"target": target}
    try:
        typed = params.model_validate(values).model_dump(mode="json", exclude_unset=True)
    except ValidationError as exc:
        raise ConfigError(f"route set: {explain_params(params, exc)}") from None
    return Dispatch(
        runbook=route.runbook,
        target=target,
        parameters={
            **where,
            "dry_run": not route.apply,
            "approval": route.approval if route.apply else "never",
            "params": typed,
            "alert": AlertInfo(
                name=alert.name,
                source=alert.source,
                fingerprint=alert.fingerprint,
                labels=alert.labels,
                received_at=received_at,
            ).model_dump(mode="json"),
        },
    )


@dataclass(frozen=True)
class Episode:
    """What storm control remembers of one fingerprint."""

    status: Status
    started_at: datetime | None  # the run started for the current firing episode, if any
    flow_run_id: str | None = None
    # Whether that start was settled: the run created, or its reservation released.
    settled: bool = True


def storm_decision(
    previous: Episode | None,
    runs_in_last_hour: int,
    now: datetime,
    *,
    window_seconds: int,
    max_runs_per_hour: int,
) -> Outcome:
    """For a firing alert that routes to a run: start it, or not.

    One run per fingerprint until it resolves or the window passes; at most max_runs_per_hour
    per runbook. A start never settled within SETTLE_GRACE is taken as not started: its
    settling was lost (the store failed after the reservation), and a lost alert is worse than
    a second run."""
    if previous is not None and previous.status == "firing" and previous.started_at is not None:
        age = now - previous.started_at
        if age < timedelta(seconds=window_seconds) and (previous.settled or age < SETTLE_GRACE):
            return Outcome.deduplicated
    if runs_in_last_hour >= max_runs_per_hour:
        return Outcome.capped
    return Outcome.started
