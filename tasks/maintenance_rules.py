"""Pure decisions for maintenance mode (seeds 001 "Redis unavailable": "keep the application in
maintenance mode until Redis is restored"; 004 s2 step 5, s3 step 6, s12 step 3): what the
flag's answer means, the findings, the maintenance-mode plan, and the pair of actions that
puts the application in maintenance around another runbook's mending actions.

The pair (postgres-down, redis-health, security-incident with `maintenance_service`): when
the run plans actions, `enable_maintenance` comes first and `disable_maintenance` last, in
the one plan the gate sees, so one approval covers both (they are approved as a pair; the
take-out is not asked for again after the mending). The pair runs only whole: when the gate
lets one half through and not the other (a policy, a rate), or lets no mending action
through, neither runs. `disable_maintenance` runs only when verification passes (no critical
finding, no failed action); otherwise it is skipped and the application stays in
maintenance, which the report says. When the application is already in maintenance before
the run (someone put it there), or its flag cannot be read, no pair is planned: the run never
takes out what it did not put in.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field, model_validator

from tasks.models import Action, ActionStatus, Finding, Params, ServiceRef, Severity

# The kinds of action maintenance-mode plans, and the pair the other runbooks add.
MaintenanceAction = Literal["enable_maintenance", "disable_maintenance"]
MaintenanceStep = Action[MaintenanceAction, ServiceRef]

ON_WORDS = frozenset({"true", "1", "on", "yes", "enabled", "enable", "maintenance"})
OFF_WORDS = frozenset({"false", "0", "off", "no", "disabled", "disable", ""})
STATE_WORD = "maintenance"


class MaintenanceParams(Params):
    """The run's own choice: in or out of maintenance. No default on purpose: a form sent
    without a choice (or a schedule) must not take an application out of maintenance in the
    middle of an incident, nor put it in."""

    run_only = frozenset({"enable"})

    enable: bool | None = Field(
        None,
        description="true: put the application in maintenance; false: take it out. Required "
        "(no default): unset is refused",
    )

    @model_validator(mode="after")
    def _chosen(self) -> MaintenanceParams:
        if self.enable is None:
            raise ValueError(
                "set enable=true (put the application in maintenance) or enable=false (take "
                "it out): there is no default"
            )
        return self


class MaintenanceReading(BaseModel):
    """What the application's flag reads: on (True), off (False) or unknown (None, with why),
    from where (check_url or health_url) and the raw value seen."""

    service: str
    on: bool | None
    source: str
    observed: Any = None
    error: str = ""

    @property
    def word(self) -> str:
        return {True: "on", False: "off", None: "unknown"}[self.on]


def flag_of(value: object) -> bool | None:
    """A setting's value as on/off: booleans, numbers 1/0, and the words of ON_WORDS and
    OFF_WORDS (case-insensitive; the seed's admin API stores "true"); null is off. None when
    it is none of these."""
    if value is None:
        return False
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        word = value.strip().lower()
        if word in ON_WORDS:
            return True
        if word in OFF_WORDS:
            return False
    return None


def at_path(body: object, path: str) -> tuple[bool, object]:
    """(found, value) at a dotted path into a JSON answer (`value`, `data.value`, `items.0`)."""
    here = body
    for part in path.split("."):
        if isinstance(here, dict) and part in here:
            here = here[part]
        elif isinstance(here, list) and part.isdigit() and int(part) < len(here):
            here = here[int(part)]
        else:
            return False, None
    return True, here


def says_maintenance(state: str | None, components: dict[str, str]) -> bool:
    """Whether a health answer says maintenance: its own state or a component's is the word
    `maintenance` (tasks.service_rules.STATES counts it as a warning state)."""
    return any((s or "").strip().lower() == STATE_WORD for s in [state, *components.values()])


def maintenance_finding(name: str, reading: MaintenanceReading, wanted: bool | None) -> Finding:
    """The flag's state as a finding. wanted None (another runbook's view of it): ok when
    read, warning when it cannot be. wanted True/False (maintenance-mode): ok when it is as
    wanted, warning when it differs, critical when it cannot be read (nothing can be planned)."""
    service = reading.service
    if reading.on is None:
        return Finding(
            check="maintenance",
            target=name,
            severity=Severity.warning if wanted is None else Severity.critical,
            observed=reading.observed,
            threshold=None if wanted is None else _word(wanted),
            message=f"the maintenance flag of {service} cannot be read ({reading.source}): "
            f"{reading.error}",
        )
    state = "in maintenance" if reading.on else "not in maintenance"
    if wanted is None or reading.on == wanted:
        return Finding(
            check="maintenance",
            target=name,
            severity=Severity.ok,
            observed=reading.word,
            threshold=None if wanted is None else _word(wanted),
            message=f"{service} is {state} ({reading.source})",
        )
    return Finding(
        check="maintenance",
        target=name,
        severity=Severity.warning,
        observed=reading.word,
        threshold=_word(wanted),
        message=f"{service} is {state} ({reading.source}); wanted {_word(wanted)}",
    )


def _word(on: bool) -> str:
    return "on" if on else "off"


def switch(name: str, service: str, on: bool, why: str = "") -> MaintenanceStep:
    """One switch of the flag, destructive both ways: on takes the application away from its
    users, off lets them back in. It changes "services.<service>" (touches): that service's
    approval, production flag, rate limits and one-mutating-run lock apply (tasks.gate)."""
    return Action(
        kind="enable_maintenance" if on else "disable_maintenance",
        target=name,
        destructive=True,
        touches=f"services.{service}",
        description=(
            f"put {service} in maintenance mode" if on else f"take {service} out of maintenance"
        )
        + (f" {why}" if why else ""),
        args=ServiceRef(service=service),
    )


def plan_maintenance(name: str, reading: MaintenanceReading, enable: bool) -> list[MaintenanceStep]:
    """maintenance-mode's plan: one switch when the flag differs from what is wanted; nothing
    when it is already so, or cannot be read (the finding says why)."""
    if reading.on is None or reading.on == enable:
        return []
    return [switch(name, reading.service, enable)]


def plan_pair(
    name: str, reading: MaintenanceReading | None, mending: list[Action[Any, Any]]
) -> tuple[MaintenanceStep, MaintenanceStep] | None:
    """The pair around a runbook's mending actions (module docstring): (enable, disable), or
    None when there is no maintenance_service (reading None), nothing is planned to run, the
    application is already in maintenance, or its flag cannot be read."""
    if reading is None or reading.on is not False:
        return None
    if not any(a.status is ActionStatus.planned for a in mending):
        return None
    return (
        switch(name, reading.service, True, "before the actions below"),
        switch(name, reading.service, False, "once verification passes"),
    )


def verification_passed(after: list[Finding], mending: list[Action[Any, Any]]) -> str | None:
    """None when the mended system verifies (no critical finding, no mending action failed);
    else why not, for the report."""
    failed = [a for a in mending if a.status is ActionStatus.failed]
    if failed:
        return f"{failed[0].kind} failed"
    critical = [f for f in after if f.severity is Severity.critical]
    if critical:
        return f"verification failed: {critical[0].message}"
    return None
