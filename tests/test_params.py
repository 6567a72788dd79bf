"""Every runbook parameter says what it is, in which unit and within which bounds: Prefect
shows these descriptions in the run form of its UI."""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Iterator

import annotated_types
import pytest

import tasks
from deployments.catalog import RUNBOOKS
from tasks.models import Params

UNITS = {
    "_seconds": "seconds",
    "_minutes": "minutes",
    "_hours": "hours",
    "_days": "days",
    "_ms": "milliseconds",
    "_percent": "%",
}


def _subclasses(cls: type[Params]) -> Iterator[type[Params]]:
    for sub in cls.__subclasses__():
        yield sub
        yield from _subclasses(sub)


def _all_params() -> list[type[Params]]:
    for module in pkgutil.iter_modules(tasks.__path__):
        if module.name.endswith("_rules"):
            importlib.import_module(f"tasks.{module.name}")
    return sorted(_subclasses(Params), key=lambda c: c.__name__)


FIELDS = [(cls, name) for cls in _all_params() for name in cls.model_fields]


def _number(value: object) -> str:
    assert isinstance(value, int | float), value
    return f"{value:g}" if isinstance(value, float) and not value.is_integer() else f"{value:.0f}"


def test_every_runbook_has_its_parameters_found() -> None:
    names = {cls.__name__ for cls, _ in FIELDS}
    assert {"ConnectionsParams", "RedisHealthParams", "TlsParams", "ResourceParams"} <= names


@pytest.mark.parametrize(("cls", "name"), FIELDS, ids=[f"{c.__name__}.{n}" for c, n in FIELDS])
def test_a_parameter_has_its_unit_and_bounds_in_its_description(
    cls: type[Params], name: str
) -> None:
    field = cls.model_fields[name]
    description = field.description or ""
    assert description, f"{cls.__name__}.{name} has no Field(description=...)"
    for suffix, unit in UNITS.items():
        if name.endswith(suffix):
            assert unit in description, f"{cls.__name__}.{name}: say {unit!r}"
    for bound in field.metadata:
        if isinstance(bound, annotated_types.Gt):
            assert f"over {_number(bound.gt)}" in description
        elif isinstance(bound, annotated_types.Ge):
            low = _number(bound.ge)
            assert f"{low} to " in description or f"{low} or more" in description
        elif isinstance(bound, annotated_types.Le):
            high = _number(bound.le)
            assert f"to {high}" in description or f"at most {high}" in description


@pytest.mark.parametrize("runbook", sorted(RUNBOOKS))
def test_the_run_form_describes_the_runbook_and_each_parameter(runbook: str) -> None:
    flow = RUNBOOKS[runbook].load()
    assert flow.description and "Args:" in flow.description
    properties = flow.parameters.properties
    assert set(properties) >= {"target", "dry_run", "approval", "alert"}
    for name, schema in properties.items():
        assert schema.get("description"), f"{runbook}: parameter {name} has no description"
    assert RUNBOOKS[runbook].params.__name__ in properties["params"]["description"]


def test_a_rule_across_fields_reads_as_a_sentence() -> None:
    from tasks.errors import ConfigError
    from tasks.redis_rules import LockoutParams

    with pytest.raises(ConfigError) as caught:
        LockoutParams.resolve(None, {}, "login-lockouts --set")
    message = str(caught.value)
    assert message.startswith("login-lockouts --set: set either subject=")
    assert ": :" not in message and "Value error" not in message
