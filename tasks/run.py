"""A runbook run's opening and closing, one call each, so a flow's body is its five steps:

    run = open_run(Settings.postgres_target, target, ConnectionsParams, params)
    ... 1. diagnose, 2. plan ...
    approved = run.gate(actions, before)          # 3. gate
    ... 4. act ...
    return run.finish(before, after, actions)     # 5. verify and report

The run's own options (dry_run, approval, approval_timeout_seconds) and its start time come
from its flow's parameters, noted in its journal by tasks.engine.runbook_flow; open_run adds
the inventory (tasks.settings.load_settings), the target and the runbook's parameters resolved
against the target's `thresholds` (tasks.models.Params.resolve)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Generic, Protocol, TypeVar

from prefect import State

from tasks.engine import finish
from tasks.gate import APPROVAL_TIMEOUT_SECONDS, gate
from tasks.journal import RunOptions, journal
from tasks.models import AnyAction, Finding, Params, Report
from tasks.settings import Settings, load_settings

OUTSIDE = "a runbook's run is opened inside its flow (tasks.engine.runbook_flow)"
PP = TypeVar("PP", bound=Params)


class Target(Protocol):
    @property
    def thresholds(self) -> dict[str, int | float]: ...


T = TypeVar("T", bound=Target)


@dataclass(frozen=True)
class Run:
    """What a run's gate and finish need: its inventory and the name its report gives the
    target (one target's name, or "all")."""

    settings: Settings
    label: str

    def gate(self, actions: list[AnyAction], before: list[Finding]) -> list[AnyAction]:
        """tasks.gate.gate with the run's dry_run, approval and approval_timeout_seconds."""
        options = _options()
        timeout = options.approval_timeout_seconds
        return gate(
            actions,
            before,
            dry_run=options.dry_run,
            approval=options.approval,
            timeout_seconds=APPROVAL_TIMEOUT_SECONDS if timeout is None else timeout,
        )

    @property
    def started_at(self) -> datetime:
        """When the run started (UTC)."""
        started = journal().started_at
        if started is None:
            raise RuntimeError(OUTSIDE)
        return started

    def finish(
        self, before: list[Finding], after: list[Finding], actions: list[Any]
    ) -> State[Report]:
        """tasks.engine.finish: the report (findings after, actions, status), its artifacts,
        audit and notifications; the run's final state."""
        return finish(
            _runbook(),
            self.label,
            dry_run=_options().dry_run,
            started_at=self.started_at,
            before=before,
            after=after,
            actions=actions,
        )


@dataclass(frozen=True)
class OneTarget(Run, Generic[T, PP]):
    """A run on one inventory target: its name, its entry and the runbook's parameters."""

    target: T
    p: PP

    @property
    def name(self) -> str:
        return self.label


@dataclass(frozen=True)
class EachTarget(Run, Generic[T, PP]):
    """A run over several targets of a section: each with its own parameters (`per`), and the
    parameters of the run itself (`p`, without any target's thresholds)."""

    targets: dict[str, T]
    p: PP
    per: dict[str, PP]


def open_run(
    lookup: Callable[[Settings, str], tuple[str, T]],
    target: str,
    params_class: type[PP],
    params: PP | None,
) -> OneTarget[T, PP]:
    """A run's opening on one target: the inventory, the target found by lookup (e.g.
    Settings.postgres_target) and params resolved against its thresholds.

    Raises ConfigError: an invalid inventory, an unknown target (naming the known ones) or
    parameters out of bounds (naming the valid ones)."""
    settings = load_settings()
    name, found = lookup(settings, target)
    p = params_class.resolve(params, found.thresholds, f"{_runbook()} on {name}")
    return OneTarget(settings=settings, label=name, target=found, p=p)


def open_each(
    select: Callable[[Settings, PP], dict[str, T]],
    label: str | Callable[[PP], str],
    params_class: type[PP],
    params: PP | None,
) -> EachTarget[T, PP]:
    """A run's opening over the targets select picks (given the run's own parameters), each
    with params resolved against its own thresholds; label: the report's target ("all", or the
    one chosen), or how the run's own parameters choose it.

    Raises ConfigError as open_run, and what select raises."""
    settings = load_settings()
    runbook = _runbook()
    p = params_class.resolve(params, {}, runbook)
    targets = select(settings, p)
    per = {
        name: params_class.resolve(params, found.thresholds, f"{runbook} on {name}")
        for name, found in targets.items()
    }
    named = label if isinstance(label, str) else label(p)
    return EachTarget(settings=settings, label=named, targets=targets, p=p, per=per)


def _runbook() -> str:
    return journal().runbook or "runbook"


def _options() -> RunOptions:
    options = journal().options
    if options is None:
        raise RuntimeError(OUTSIDE)
    return options
