"""The pure parts of the alert path: payloads split into one alert per fingerprint, routing,
targets picked only among the inventory's names, typed parameters, storm-control decisions,
and the configuration checks."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from deployments.alert_routes import (
    DEFAULT_ROUTES,
    PAYLOADS,
    SETTLE_GRACE,
    AlertmanagerPayload,
    Episode,
    GenericPayload,
    GrafanaPayload,
    Outcome,
    fingerprint_of,
    load_routes,
    pick_target,
    plan_dispatch,
    route_for,
    split_alerts,
    storm_decision,
)
from deployments.catalog import RUNBOOKS
from deployments.config import load_config
from tasks.errors import ConfigError
from tasks.postgres_rules import ConnectionsParams
from tasks.settings import Route, load_settings

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)
PARAMS = {name: rb.params for name, rb in RUNBOOKS.items()}


def am_alert(fp: str, status: str = "firing", **labels: str) -> dict[str, Any]:
    return {"status": status, "labels": {"alertname": "A"} | labels, "fingerprint": fp}


def test_an_alertmanager_group_splits_into_one_alert_per_fingerprint() -> None:
    payload = AlertmanagerPayload.model_validate(
        {
            "version": "4",
            "status": "firing",
            "alerts": [
                am_alert("aaaa", target="main"),
                am_alert("bbbb", target="other"),
                am_alert("aaaa", status="resolved", target="main"),
            ],
            "groupLabels": {"alertname": "A"},
            "extra": "ignored",
        }
    )
    alerts = split_alerts("alertmanager", payload)
    assert [(a.fingerprint, a.status, a.labels["target"]) for a in alerts] == [
        ("aaaa", "resolved", "main"),  # the last entry of a repeated fingerprint wins
        ("bbbb", "firing", "other"),
    ]
    assert all(a.name == "A" and a.source == "alertmanager" for a in alerts)


def test_grafana_and_generic_alerts_without_a_fingerprint_get_a_stable_one() -> None:
    grafana = GrafanaPayload.model_validate(
        {
            "status": "firing",
            "orgId": 1,
            "alerts": [{"status": "firing", "labels": {"alertname": "G", "grafana_folder": "f"}}],
        }
    )
    generic = GenericPayload.model_validate(
        {"alerts": [{"name": "G", "status": "firing", "labels": {"grafana_folder": "f"}}]}
    )
    [g] = split_alerts("grafana", grafana)
    [h] = split_alerts("generic", generic)
    assert g.fingerprint == h.fingerprint == fingerprint_of("G", {"grafana_folder": "f"})
    assert fingerprint_of("G", {"grafana_folder": "other"}) != g.fingerprint


def test_a_label_named_alertname_cannot_give_an_alert_another_alerts_fingerprint() -> None:
    payload = GenericPayload.model_validate(
        {
            "alerts": [
                {"name": "DiskFull", "status": "firing", "labels": {"alertname": "Other"}},
                {"name": "Other", "status": "firing"},
            ]
        }
    )
    disk, other = split_alerts("generic", payload)  # one fingerprint would have left one
    assert (disk.name, other.name) == ("DiskFull", "Other")
    assert disk.fingerprint != other.fingerprint
    # Alertmanager and Grafana alerts carry their name as the label: unchanged by the order.
    assert fingerprint_of("A", {"alertname": "A", "x": "1"}) == fingerprint_of("A", {"x": "1"})


@pytest.mark.parametrize(
    ("labels", "where"),
    [
        ({"alertname": "A" * 600_000}, "'labels', 'alertname'"),
        ({"alertname": "A" * 257}, "labels.alertname is over 256 characters"),
        ({"alertname": "A", "target": "t" * 4097}, "'labels', 'target'"),
        ({"alertname": "A", "k" * 257: "v"}, "'[key]'"),
    ],
)
def test_an_oversized_label_is_a_validation_error_naming_it(
    labels: dict[str, str], where: str
) -> None:
    body = {"version": "4", "status": "firing", "alerts": [am_alert("aaaa") | {"labels": labels}]}
    with pytest.raises(ValidationError) as info:
        AlertmanagerPayload.model_validate(body)
    [error] = info.value.errors(include_url=False, include_input=False)
    assert where in f"{error['loc']} {error['msg']}"
    # At the bounds it is accepted, and long annotations always are.
    fine = am_alert("aaaa") | {
        "labels": {"alertname": "A" * 256, "target": "t" * 4096, "k" * 256: "v"},
        "annotations": {"description": "d" * 100_000},
    }
    AlertmanagerPayload.model_validate(body | {"alerts": [fine]})


@given(
    st.dictionaries(st.text(min_size=1, max_size=8), st.text(max_size=8), max_size=5),
    st.text(min_size=1, max_size=20),
)
def test_fingerprints_are_usable_resource_ids(labels: dict[str, str], name: str) -> None:
    fp = fingerprint_of(name, labels)
    assert len(fp) == 16 and all(c in "0123456789abcdef" for c in fp)
    assert fp == fingerprint_of(name, dict(reversed(labels.items())))


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=10),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=15,
)
ALERT = st.fixed_dictionaries(
    {
        "status": st.sampled_from(["firing", "resolved", "pending"]),
        "labels": st.dictionaries(st.sampled_from(["alertname", "target", "x"]), JSON, max_size=3),
        "name": JSON,
    },
    optional={"fingerprint": st.text(max_size=20) | JSON, "annotations": JSON},
)
PAYLOAD = st.fixed_dictionaries(
    {"alerts": st.lists(ALERT, max_size=3)},
    optional={
        "version": st.sampled_from(["4", 4, "3"]),
        "status": st.sampled_from(["firing", "x"]),
    },
)


@given(st.sampled_from(list(PAYLOADS)), JSON | PAYLOAD)
def test_a_payload_either_validates_into_alerts_or_is_a_validation_error(
    source: Any, value: Any
) -> None:
    try:
        payload = PAYLOADS[source].model_validate(value)
    except ValidationError as exc:
        assert exc.errors()  # a 422 always names what is wrong
        return
    alerts = split_alerts(source, payload)
    assert alerts and len({a.fingerprint for a in alerts}) == len(alerts)
    assert all(a.name and a.status in ("firing", "resolved") for a in alerts)


ROUTES = [
    Route(alert="A", matchers={"severity": "critical"}, runbook="postgres-connections", apply=True),
    Route(alert="A", runbook="postgres-maintenance"),
]


def alert(**labels: str) -> Any:
    [a] = split_alerts(
        "generic",
        GenericPayload.model_validate(
            {"alerts": [{"name": "A", "status": "firing", "labels": labels}]}
        ),
    )
    return a


def test_the_first_matching_route_wins() -> None:
    assert route_for(alert(severity="critical"), ROUTES) is ROUTES[0]
    assert route_for(alert(severity="warning"), ROUTES) is ROUTES[1]
    assert route_for(alert(), ROUTES) is ROUTES[1]
    other = split_alerts(
        "generic", GenericPayload.model_validate({"alerts": [{"name": "B", "status": "firing"}]})
    )[0]
    assert route_for(other, ROUTES) is None


def test_a_target_comes_only_from_the_inventory() -> None:
    route = Route(alert="A", runbook="postgres-connections", target_label="instance")
    assert pick_target(alert(instance="replica"), route, ["main", "replica"]) == "replica"
    for value in ("db1:5432", "main'; DROP TABLE x; --", "{{ event.payload }}", "Main"):
        with pytest.raises(ConfigError, match="names no postgres-connections target"):
            pick_target(alert(instance=value), route, ["main", "replica"])
    # No label: fine when there is only one target to pick.
    assert pick_target(alert(), route, ["main"]) == "main"
    with pytest.raises(ConfigError, match="no 'instance' label"):
        pick_target(alert(), route, ["main", "replica"])
    fixed = Route(alert="A", runbook="postgres-connections", target="main")
    assert pick_target(alert(target="replica"), fixed, ["main", "replica"]) == "main"


def test_parameters_reach_the_flow_typed() -> None:
    route = Route(
        alert="A",
        runbook="postgres-connections",
        apply=True,
        set={"idle_in_transaction_seconds": "60", "max_backends_ended": 5},
    )
    dispatch = plan_dispatch(alert(target="main"), route, ["main"], ConnectionsParams)
    assert dispatch.deployment == "postgres-connections/main"
    sent = dispatch.parameters.pop("alert")
    assert dispatch.parameters == {
        "target": "main",
        "dry_run": False,
        "approval": "ask",  # a route that applies asks a human unless it says otherwise
        "params": {"idle_in_transaction_seconds": 60, "max_backends_ended": 5},
    }
    assert (sent["name"], sent["labels"]) == ("A", {"target": "main"})
    auto = route.model_copy(update={"approval": "auto"})
    assert (
        plan_dispatch(alert(), auto, ["main"], ConnectionsParams).parameters["approval"] == "auto"
    )
    dry = plan_dispatch(
        alert(), Route(alert="A", runbook="postgres-connections"), ["main"], ConnectionsParams
    )
    assert dry.parameters | {"params": None, "alert": None} == {
        "target": "main",
        "dry_run": True,
        "approval": "never",
        "params": None,
        "alert": None,
    }
    assert dry.parameters["params"] == {}


def test_an_alert_naming_one_service_narrows_the_runbook_served_for_all(
    inventory: Any,
) -> None:
    inventory(
        '[services.api]\nkind = "command"\nstatus_command = ["true"]\n'
        'restart_command = ["true"]\nhealth_url = "http://127.0.0.1:9/health"\n'
    )
    rb = RUNBOOKS["service-health"]
    targets = rb.alert_targets(load_settings())
    assert targets == ["all", "api"]
    route = Route(alert="A", runbook="service-health", target_label="target")
    narrow = ("all", "service")
    assert (rb.default_target, rb.narrowed_by) == narrow
    one = plan_dispatch(alert(target="api"), route, targets, rb.params, narrow)
    assert one.deployment == "service-health/all"
    assert one.parameters["params"] == {"service": "api"}
    every = plan_dispatch(alert(target="all"), route, targets, rb.params, narrow)
    assert every.deployment == "service-health/all" and every.parameters["params"] == {}
    with pytest.raises(ConfigError, match="names no service-health target"):
        plan_dispatch(alert(target="web"), route, targets, rb.params, narrow)


@pytest.mark.parametrize(
    ("previous", "runs", "expected"),
    [
        (None, 0, Outcome.started),
        (Episode("firing", NOW - timedelta(seconds=30)), 0, Outcome.deduplicated),
        (Episode("firing", NOW - timedelta(seconds=600)), 0, Outcome.started),  # window passed
        (Episode("firing", None), 0, Outcome.started),  # capped before, never started
        (Episode("resolved", None), 0, Outcome.started),
        (None, 3, Outcome.capped),
        (Episode("firing", NOW - timedelta(seconds=30)), 3, Outcome.deduplicated),
        # A start not settled yet: being started within the grace, lost after it.
        (Episode("firing", NOW - timedelta(seconds=30), settled=False), 0, Outcome.deduplicated),
        (Episode("firing", NOW - SETTLE_GRACE, settled=False), 0, Outcome.started),
        (Episode("firing", NOW - SETTLE_GRACE, settled=False), 3, Outcome.capped),
    ],
)
def test_storm_decision(previous: Episode | None, runs: int, expected: Outcome) -> None:
    assert storm_decision(previous, runs, NOW, window_seconds=600, max_runs_per_hour=3) is expected


def test_the_shipped_default_routes_are_valid() -> None:
    routes = load_routes(DEFAULT_ROUTES, PARAMS)
    assert routes and all(r.runbook in RUNBOOKS for r in routes)


BASE = '[postgres.main]\ndsn = "postgresql://app@127.0.0.1:5432/app"\n'


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            '[[routes]]\nalert = "A"\nrunbook = "nope"\n',
            "routes[0].runbook: unknown runbook 'nope'",
        ),
        (
            '[[routes]]\nalert = "A"\nrunbook = "postgres-connections"\nset = { nope = 1 }\n',
            "routes[0].set: nope: Extra inputs",
        ),
        (
            '[[routes]]\nalert = "A"\nrunbook = "postgres-connections"\n'
            'set = { long_query_seconds = "soon" }\n',
            "routes[0].set: long_query_seconds: Input should be a valid integer",
        ),
        (
            '[[routes]]\nalert = "A"\nrunbook = "postgres-connections"\n'
            "set = { dry_run = false }\n",
            "dry_run cannot be set",
        ),
        (
            '[[routes]]\nalert = "A"\nrunbook = "postgres-connections"\ntarget = "replica"\n',
            "routes[0].target names 'replica', not a postgres-connections target",
        ),
        ('[receiver]\ntoken = "short"\n', "receiver.token must be at least 8 characters"),
        ('[receiver]\nlisten = "8787"\n', "receiver.listen"),
        (
            '[receiver]\nlisten = "127.0.0.1:70000"\n',
            "receiver.listen: '127.0.0.1:70000': the port",
        ),
        ('[receiver]\nlisten = "127.0.0.1:0"\n', "the port must be 1-65535"),
        ('[receiver]\ndispatch = "carrier-pigeon"\n', "receiver.dispatch"),
        ('[receiver]\ntokn = "abcdefghij"\n', "receiver.tokn"),
    ],
)
def test_a_bad_receiver_or_route_config_is_one_clear_error(
    inventory: Any, text: str, expected: str
) -> None:
    inventory(BASE + text)
    with pytest.raises(ConfigError) as info:
        load_config()
    assert expected in str(info.value)


def test_the_token_can_come_from_the_environment(
    inventory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    inventory(BASE + '[receiver]\nlisten = "127.0.0.1:9999"\n')
    monkeypatch.setenv("RUNBOOK_RECEIVER__TOKEN", "from-the-environment")
    settings = load_settings()
    assert settings.receiver is not None and settings.receiver.port == 9999
    assert settings.receiver.token is not None
    assert settings.receiver.token.get_secret_value() == "from-the-environment"
    assert "from-the-environment" not in repr(settings)
