"""Finding, Action and Report: the typed results of every runbook (DESIGN.md's report JSON)."""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, ClassVar, Generic, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from typing_extensions import TypeVar

from tasks.errors import ConfigError


def utcnow() -> datetime:
    return datetime.now(UTC)


# Who decides on destructive actions: auto (approved), ask (a human, at the CLI's prompt or
# on the paused run's form in the Prefect UI), never (skipped). Strictness: auto < ask < never.
Approval = Literal["auto", "ask", "never"]


class Severity(StrEnum):
    ok = "ok"
    warning = "warning"
    critical = "critical"


class ActionStatus(StrEnum):
    planned = "planned"
    skipped = "skipped"
    done = "done"
    failed = "failed"


class RunStatus(StrEnum):
    healthy = "healthy"
    fixed = "fixed"
    unhealthy = "unhealthy"
    failed = "failed"


class Finding(BaseModel):
    check: str
    target: str
    severity: Severity
    observed: Any = None
    threshold: Any = None
    message: str

    @property
    def rows(self) -> list[dict[str, Any]] | None:
        """The observed value when it is rows of data (top queries, table sizes)."""
        rows = self.observed
        return rows if isinstance(rows, list) and rows and isinstance(rows[0], dict) else None

    @property
    def observed_brief(self) -> object:
        """Rows of data are summarised; the rows follow elsewhere."""
        return f"{len(self.rows)} rows" if self.rows else self.observed


# An action's kind: each runbook's own Literal of snake_case verbs, kept beside its rules
# (tasks/*_rules.py), e.g. ConnectionsAction = Literal["cancel_query", "terminate_backend"].
K = TypeVar("K", bound=str, default=Any)
# What the act step needs to carry an action out: a small model (a backend, a table, a
# service), or None when the target says it all.
A = TypeVar("A", bound="BaseModel | None", default=Any)


class ServiceRef(BaseModel):
    """The [services.NAME] an action restarts; its rate limit counts against the service."""

    model_config = ConfigDict(frozen=True)

    service: str


class Action(BaseModel, Generic[K, A]):
    """One change a runbook plans, typed by its runbook: Action[ConnectionsAction, BackendRef].
    mypy refuses a kind its runbook's Literal does not list, and pydantic refuses it at run
    time. In the report only kind, target, description, destructive, status and detail show:
    `args` is for the act step. `touches`: the inventory target ("section.NAME") the action
    changes when it is not the run's own target (disk-space drops a partition of
    "postgres.main"): the gate then also applies that target's approval, production flag,
    rate limits and one-mutating-run lock."""

    kind: K
    target: str
    description: str
    destructive: bool
    status: ActionStatus = ActionStatus.planned
    detail: str = ""
    args: A = Field(default=None, exclude=True)  # type: ignore[assignment]
    touches: str | None = Field(default=None, exclude=True)

    # Written out so that mypy checks `kind` against the runbook's Literal (the pydantic
    # plugin's own __init__ takes Any).
    def __init__(
        self,
        *,
        kind: K,
        target: str,
        description: str,
        destructive: bool,
        status: ActionStatus = ActionStatus.planned,
        detail: str = "",
        args: A = None,  # type: ignore[assignment]
        touches: str | None = None,
    ) -> None:
        super().__init__(
            kind=kind,
            target=target,
            description=description,
            destructive=destructive,
            status=status,
            detail=detail,
            args=args,
            touches=touches,
        )


def touched_ref(touches: str) -> tuple[str, str] | None:
    """An Action.touches split into (section, NAME): "services.api" -> ("services", "api");
    None when it is not of that shape (no dot, or an empty side). The one parser of touches
    (tasks.limits.acted_on, tasks.gate.touched_target)."""
    section, dot, name = touches.partition(".")
    return (section, name) if dot and section and name else None


# Any runbook's action, for helpers that hand back the actions they were given (the gate).
AnyAction = TypeVar("AnyAction", bound=Action)


class Decision(StrEnum):
    approved = "approved"
    rejected = "rejected"
    timed_out = "timed_out"


class ApprovalRecord(BaseModel):
    """A human's answer to a run's request for approval (the Prefect UI's form, or the CLI's
    prompt): who, when, and what they said. approver is None when nobody answered in time."""

    decision: Decision
    approver: str | None = None
    comment: str = ""
    requested_at: datetime
    answered_at: datetime


class AlertInfo(BaseModel):
    """The alert that started a run: set by the alert receiver as the flow's `alert`
    parameter, so the Prefect UI shows it with the run, and the timeline begins with it."""

    name: str
    source: str
    fingerprint: str
    labels: dict[str, str] = Field(default_factory=dict)
    received_at: datetime | None = None


class TimelineEntry(BaseModel):
    """One step of a run, in the shape of a post-incident timeline (seed 003 "Post-Incident"):
    alert_received, diagnosed, approval_requested, approval_answered, action_started,
    action_ended, verified, finished."""

    at: datetime
    event: str
    detail: str = ""


class Report(BaseModel):
    runbook: str
    target: str
    dry_run: bool
    status: RunStatus
    findings: list[Finding]
    actions: list[Action]
    started_at: datetime
    finished_at: datetime
    flow_run_id: str | None = None
    # Set when a human was asked: the answer, or the timeout.
    approval: ApprovalRecord | None = None
    timeline: list[TimelineEntry] = Field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return exit_code_of(self.status)


def exit_code_of(status: RunStatus) -> int:
    """The CLI's exit code for an outcome: 0 healthy or fixed, 1 unhealthy, 3 failed."""
    return {RunStatus.healthy: 0, RunStatus.fixed: 0, RunStatus.unhealthy: 1}.get(status, 3)


def problems(findings: list[Finding]) -> list[Finding]:
    return [f for f in findings if f.severity is not Severity.ok]


def final_status(before: list[Finding], after: list[Finding], actions: list[Action]) -> RunStatus:
    """healthy: nothing was wrong; fixed: something was, actions ran and now nothing is;
    unhealthy: problems remain; failed: an action failed."""
    if any(a.status is ActionStatus.failed for a in actions):
        return RunStatus.failed
    if problems(after):
        return RunStatus.unhealthy
    if problems(before) and any(a.status is ActionStatus.done for a in actions):
        return RunStatus.fixed
    return RunStatus.healthy


class Params(BaseModel):
    """A runbook's tunable parameters. Set with --set key=value, from the Prefect UI, or per
    target in the inventory's `thresholds`; values given for the run win over the target's."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    # Parameters that are the run's own choice (which subject, which backup) or no target's
    # (the host's limits): never set in a target's `thresholds`.
    run_only: ClassVar[frozenset[str]] = frozenset()

    @classmethod
    def threshold_names(cls) -> frozenset[str]:
        """The parameters a target's `thresholds` may set: every field but run_only."""
        return frozenset(cls.model_fields) - cls.run_only

    @classmethod
    def resolve(cls, given: Params | None, target_values: dict[str, Any], where: str) -> Self:
        """The parameters in force: given (the run's) over target_values (a target's
        `thresholds`, of which only this class's fields that are not run_only count) over the
        defaults. where: the run, for the message.

        Raises ConfigError naming each invalid value and the valid parameters."""
        data = {
            k: v
            for k, v in target_values.items()
            if k in cls.model_fields and k not in cls.run_only
        }
        if given is not None:
            data.update(given.model_dump(exclude_unset=True))
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise ConfigError(f"{where}: {explain_params(cls, exc)}") from None


def explain_params(cls: type[Params], exc: ValidationError) -> str:
    problems = "; ".join(
        # A check across fields has no loc; "Value error, " is pydantic's wrapping of ours.
        (f"{'.'.join(str(p) for p in e['loc'])}: " if e["loc"] else "")
        + e["msg"].removeprefix("Value error, ")
        for e in exc.errors(include_url=False, include_input=False)
    )
    return f"{problems} (valid parameters: {', '.join(cls.model_fields)})"
