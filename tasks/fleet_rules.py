"""A fleet run's decisions, pure (no Prefect, no I/O): which targets a selector names, how many
may run at once and how many may fail (AWS Systems Manager's rate control), and the ramp from
one canary target up to the concurrency cap. deployments.fleet runs what these decide.

Selector (`--target`, the fleet flow's `selector`):
- `all`: every target of the runbook's inventory section that it accepts (Runbook.requires);
- `a,b,c`: those names (at least two, or one with a trailing comma: a single plain name is a
  plain run, not a fleet);
- `env=prod` or `env=prod,tier=db`: the targets carrying every one of those labels.
Names and labels do not mix; an unknown name, a malformed label or an empty result is a
ConfigError saying what is configured.

Rates: `N` (a count) or `P%` (of the selected targets). max-concurrency: at least 1 and at most
MAX_CONCURRENCY (a percentage rounds down, then to at least 1). max-errors: 0 or more (a
percentage rounds down): once more targets than that have erred, no new target starts.

Ramp: one target first (the canary); each time as many targets as the current limit have
finished without error, the limit doubles, up to the cap. An error (is_error) counts towards
max-errors and not towards the ramp."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from tasks.errors import ConfigError
from tasks.models import ActionStatus, Report, RunStatus

ALL = "all"
# A runbook's fleet deployment is NAME/fleet (deployments.fleet), and an alert route's fleet
# dispatch names it as its target. Neither word may name an inventory target (tasks.settings).
FLEET = "fleet"
RESERVED_NAMES = (ALL, FLEET)
# The most target runs a fleet runs at once: each is a thread of the fleet's process and a
# flow run against the Prefect API.
MAX_CONCURRENCY = 50
DEFAULT_MAX_CONCURRENCY = "5"
DEFAULT_MAX_ERRORS = "0"

_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
_RATE = re.compile(r"(\d{1,6})(%?)")


@dataclass(frozen=True)
class Selector:
    """A parsed selector: `names` (in the order given, once each) or `labels` (all must
    match), or neither for `all`."""

    text: str
    names: tuple[str, ...] = ()
    labels: tuple[tuple[str, str], ...] = ()

    @property
    def is_all(self) -> bool:
        return not self.names and not self.labels


def is_fleet(target: str | None) -> bool:
    """Whether --target names a fleet (all, a list, labels) rather than one plain target."""
    if target is None:
        return False
    text = target.strip()
    return text == ALL or "," in text or "=" in text


def parse_selector(text: str) -> Selector:
    """The selector in text (module docstring). Raises ConfigError on an empty item, a
    malformed label, or names mixed with labels."""
    text = text.strip()
    if text == ALL:
        return Selector(text)
    items = [item.strip() for item in text.split(",")]
    items = [item for item in items if item] if text.endswith(",") else items
    if not items or any(not item for item in items):
        raise ConfigError(
            f"selector {text!r}: an empty item; give all, names (a,b,c) or labels "
            "(env=prod,tier=db)"
        )
    with_labels = [item for item in items if "=" in item]
    if with_labels and len(with_labels) != len(items):
        raise ConfigError(
            f"selector {text!r} mixes target names and labels: give names (a,b,c) or labels "
            "(env=prod,tier=db), not both"
        )
    if not with_labels:
        return Selector(text, names=tuple(dict.fromkeys(items)))
    labels: dict[str, str] = {}
    for item in items:
        key, _, value = (part.strip() for part in item.partition("="))
        if not _LABEL_NAME.fullmatch(key) or not value:
            raise ConfigError(
                f"selector {text!r}: {item!r} is not a label: write NAME=VALUE, e.g. env=prod"
            )
        if labels.get(key, value) != value:
            raise ConfigError(
                f"selector {text!r}: label {key} is given twice with different values; no "
                "target can match both"
            )
        labels[key] = value
    return Selector(text, labels=tuple(labels.items()))


def select_targets(
    text: str,
    accepted: Mapping[str, Mapping[str, str]],
    *,
    section: str,
    runbook: str,
    configured: tuple[str, ...] = (),
    requires: str = "",
) -> list[str]:
    """The targets `text` selects among `accepted` (name -> its labels: the runbook's section's
    targets it accepts), in name order, or ConfigError saying what is configured.

    configured: every name of the section (to tell "unknown" from "not one this runbook runs
    on"); requires: what the runbook needs of a target, in words."""
    selector = parse_selector(text)
    needs = f" with {requires}" if requires else ""
    if not accepted:
        raise ConfigError(
            f"{runbook}: no [{section}.NAME] target{needs} is configured; add one (see README, "
            "Configuration)"
        )
    names = ", ".join(sorted(accepted))
    if selector.is_all:
        return sorted(accepted)
    if selector.names:
        for name in selector.names:
            if name in accepted:
                continue
            if name in configured:
                raise ConfigError(
                    f"selector: {section} target {name!r} is not one {runbook} runs on (it "
                    f"needs {requires or 'something it lacks'}); it runs on: {names}"
                )
            fix = (
                f"{name!r} cannot name a target; give `{ALL}` alone, or names"
                if name in RESERVED_NAMES
                else f"Correct the name or add a [{section}.{name}] section"
            )
            raise ConfigError(
                f"selector: unknown {section} target {name!r}; configured for {runbook}: "
                f"{names}. {fix}."
            )
        return sorted(selector.names)
    wanted = dict(selector.labels)
    chosen = sorted(
        name
        for name, labels in accepted.items()
        if all(labels.get(key) == value for key, value in wanted.items())
    )
    if not chosen:
        found = ", ".join(
            sorted({f"{k}={v}" for labels in accepted.values() for k, v in labels.items()})
        )
        hint = 'none: add labels = { env = "prod" } to a [' + section + ".NAME]"
        given = ", ".join(f"{k}={v}" for k, v in wanted.items())
        raise ConfigError(
            f"selector {selector.text!r}: no {section} target of {runbook} carries "
            f"{'all of ' if len(wanted) > 1 else ''}{given}; labels found: {found or hint}"
        )
    return chosen


@dataclass(frozen=True)
class Rate:
    """`N` (percent False) or `P%` (percent True), as given in `text`."""

    text: str
    value: int
    percent: bool

    def of(self, total: int) -> int:
        """The count this rate allows among `total` targets (a percentage rounds down)."""
        return self.value * total // 100 if self.percent else self.value


def parse_rate(text: str | int, option: str, *, minimum: int) -> Rate:
    """`N` or `P%` for `option` (--max-concurrency, --max-errors): N >= minimum, P from
    minimum to 100; for --max-concurrency N <= MAX_CONCURRENCY. Raises ConfigError."""
    given = str(text).strip()
    found = _RATE.fullmatch(given)
    if found is None:
        raise ConfigError(
            f"{option} {given!r}: expected a whole number or a percentage of the selected "
            f"targets, such as {minimum + 2} or 25%"
        )
    value, percent = int(found.group(1)), bool(found.group(2))
    top = 100 if percent else (MAX_CONCURRENCY if option == "--max-concurrency" else None)
    if value < minimum or (top is not None and value > top):
        bounds = f"from {minimum} to {top}" if top is not None else f"at least {minimum}"
        raise ConfigError(f"{option} {given!r}: must be {bounds}{'%' if percent else ''}")
    return Rate(given, value, percent)


def concurrency_of(rate: Rate, total: int) -> int:
    """How many targets may run at once: the rate of `total`, at least 1, at most
    MAX_CONCURRENCY and the number of targets."""
    return max(1, min(rate.of(total), MAX_CONCURRENCY, max(total, 1)))


def is_error(report: Report) -> bool:
    """Whether a target's run counts against max-errors: it failed, or it is unhealthy after
    acting (an action done or failed). Unhealthy in a dry run is a finding, not an error."""
    if report.status is RunStatus.failed:
        return True
    acted = any(a.status in (ActionStatus.done, ActionStatus.failed) for a in report.actions)
    return report.status is RunStatus.unhealthy and acted


@dataclass
class Ramp:
    """The rate control of one fleet run: start() when may_start(), finish(error) as each
    target ends. `limit` starts at 1 (the canary) and doubles, up to `cap`, each time as many
    targets as it allows have finished without error; once `errors` exceed `max_errors`,
    `stopped` and nothing more may start (those in flight finish)."""

    cap: int
    max_errors: int
    limit: int = 1
    in_flight: int = 0
    errors: int = 0
    ok_at_limit: int = 0
    # The limit each start was allowed under, in order: what the ramp looked like.
    history: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.cap < 1 or self.max_errors < 0:
            raise ValueError(f"cap {self.cap} must be >= 1 and max_errors >= 0")
        self.limit = min(self.limit, self.cap)

    @property
    def stopped(self) -> bool:
        return self.errors > self.max_errors

    def may_start(self) -> bool:
        return not self.stopped and self.in_flight < self.limit

    def start(self) -> None:
        if not self.may_start():
            raise RuntimeError(f"no start allowed: {self}")
        self.in_flight += 1
        self.history.append(self.limit)

    def finish(self, error: bool) -> None:
        if self.in_flight < 1:
            raise RuntimeError(f"nothing in flight: {self}")
        self.in_flight -= 1
        if error:
            self.errors += 1
            return
        self.ok_at_limit += 1
        if self.ok_at_limit >= self.limit and self.limit < self.cap:
            self.limit = min(self.limit * 2, self.cap)
            self.ok_at_limit = 0

    def stop_reason(self, errors_rate: Rate, first_error: str | None) -> str:
        """Why the targets left were not started (once stopped)."""
        first = f" (the first: {first_error})" if first_error else ""
        allowed = f" ({self.max_errors})" if errors_rate.percent else ""
        return (
            f"not started: {self.errors} target(s) erred{first}, more than max errors "
            f"{errors_rate.text}{allowed} allows"
        )
