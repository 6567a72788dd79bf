"""A fleet's decisions without any server: selectors, rates, the ramp, the aggregated report."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from tasks.errors import ConfigError
from tasks.fleet import FleetReport, NotStarted, fleet_status, render_fleet, totals_of
from tasks.fleet_rules import (
    MAX_CONCURRENCY,
    Ramp,
    concurrency_of,
    is_error,
    is_fleet,
    parse_rate,
    select_targets,
)
from tasks.models import Action, ActionStatus, Finding, Report, RunStatus, Severity

ACCEPTED = {
    "a": {"env": "prod", "tier": "db"},
    "b": {"env": "prod", "tier": "cache"},
    "c": {"env": "stage", "tier": "db"},
    "d": {},
}


def select(text: str) -> list[str]:
    return select_targets(
        text,
        ACCEPTED,
        section="postgres",
        runbook="stuck-jobs",
        configured=(*ACCEPTED, "nojobs"),
        requires="a jobs table",
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("all", ["a", "b", "c", "d"]),
        (" all ", ["a", "b", "c", "d"]),
        ("c,a", ["a", "c"]),
        ("a,a,b", ["a", "b"]),
        ("b,", ["b"]),
        ("env=prod", ["a", "b"]),
        ("env=prod,tier=db", ["a"]),
        ("tier=db", ["a", "c"]),
        (" env = stage ", ["c"]),
    ],
)
def test_selectors_pick_exactly_their_targets(text: str, expected: list[str]) -> None:
    assert select(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a,env=prod", "mixes target names and labels"),
        ("a,,b", "an empty item"),
        ("x,a", "unknown postgres target 'x'; configured for stuck-jobs: a, b, c, d"),
        ("all,a", "'all' cannot name a target; give `all` alone, or names"),
        ("nojobs,a", "'nojobs' is not one stuck-jobs runs on (it needs a jobs table)"),
        ("env=", "'env=' is not a label"),
        ("1env=x", "is not a label"),
        ("env=prod,env=stage", "label env is given twice"),
        (
            "env=dev",
            "no postgres target of stuck-jobs carries env=dev; labels found: env=prod, "
            "env=stage, tier=cache, tier=db",
        ),
        ("env=stage,tier=cache", "carries all of env=stage, tier=cache"),
    ],
)
def test_bad_selectors_say_what_is_configured(text: str, expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        select(text)
    assert expected in str(caught.value)
    assert caught.value.exit_code == 2


def test_no_target_at_all_and_no_labels_at_all() -> None:
    with pytest.raises(ConfigError, match=r"no \[postgres.NAME\] target with a jobs table"):
        select_targets("all", {}, section="postgres", runbook="stuck-jobs", requires="a jobs table")
    with pytest.raises(ConfigError, match=r"labels found: none: add labels = \{ env = \"prod\" \}"):
        select_targets("env=x", {"a": {}}, section="redis", runbook="redis-health")


@pytest.mark.parametrize(
    ("target", "fleet"),
    [(None, False), ("main", False), ("all", True), ("a,b", True), ("env=prod", True)],
)
def test_a_single_plain_name_is_no_fleet(target: str | None, fleet: bool) -> None:
    assert is_fleet(target) is fleet


@pytest.mark.parametrize(
    ("text", "total", "concurrency", "errors"),
    [
        ("5", 3, 3, 5),  # never more at once than there are targets
        ("5", 20, 5, 5),
        ("10%", 20, 2, 2),
        ("10%", 5, 1, 0),  # concurrency at least 1; errors round down
        ("50%", 7, 3, 3),
        ("100%", 400, MAX_CONCURRENCY, 400),
        ("0%", 10, None, 0),
        ("0", 10, None, 0),
    ],
)
def test_rates_are_counts_or_percentages(
    text: str, total: int, concurrency: int | None, errors: int
) -> None:
    if concurrency is not None:
        assert (
            concurrency_of(parse_rate(text, "--max-concurrency", minimum=1), total) == concurrency
        )
    else:
        with pytest.raises(ConfigError, match="must be from 1"):
            parse_rate(text, "--max-concurrency", minimum=1)
    assert parse_rate(text, "--max-errors", minimum=0).of(total) == errors


@pytest.mark.parametrize(
    ("text", "option", "expected"),
    [
        ("five", "--max-concurrency", "expected a whole number or a percentage"),
        ("-1", "--max-errors", "expected a whole number"),
        ("2.5", "--max-errors", "expected a whole number"),
        ("101%", "--max-errors", "must be from 0 to 100%"),
        ("51", "--max-concurrency", f"must be from 1 to {MAX_CONCURRENCY}"),
        ("", "--max-concurrency", "expected"),
    ],
)
def test_bad_rates_are_config_errors(text: str, option: str, expected: str) -> None:
    minimum = 1 if option == "--max-concurrency" else 0
    with pytest.raises(ConfigError, match=expected):
        parse_rate(text, option, minimum=minimum)


def drive(ramp: Ramp, outcomes: list[bool]) -> list[list[int]]:
    """Run targets through the ramp, finishing the oldest in flight first; outcomes: whether
    each target (in start order) errs. Returns the targets in flight after each wave of
    starts, as target indexes."""
    waves: list[list[int]] = []
    flying: list[int] = []
    nxt = 0
    while True:
        started = False
        while nxt < len(outcomes) and ramp.may_start():
            ramp.start()
            flying.append(nxt)
            nxt += 1
            started = True
        if started:
            waves.append(list(flying))
        if not flying:
            return waves
        done = flying.pop(0)
        ramp.finish(outcomes[done])


def test_the_ramp_starts_with_a_canary_and_doubles_to_the_cap() -> None:
    ramp = Ramp(cap=4, max_errors=0)
    waves = drive(ramp, [False] * 10)
    assert waves[:3] == [[0], [1, 2], [2, 3]]  # the canary alone, then two at once
    assert max(len(w) for w in waves) == 4
    assert ramp.history == [1, 2, 2, 2, 4, 4, 4, 4, 4, 4]
    assert ramp.in_flight == 0 and ramp.errors == 0 and not ramp.stopped


def test_an_erring_canary_stops_the_fleet_at_once() -> None:
    ramp = Ramp(cap=5, max_errors=0)
    waves = drive(ramp, [True] + [False] * 9)
    assert waves == [[0]] and ramp.stopped and ramp.errors == 1


def test_in_flight_targets_finish_after_the_threshold_is_crossed() -> None:
    ramp = Ramp(cap=4, max_errors=1)
    # 0 ok -> limit 2: 1 and 2 start; 1 errs (errors 1, not over); 3 starts; 2 errs: stopped
    outcomes = [False, True, True, False, False, False]
    waves = drive(ramp, outcomes)
    assert waves == [[0], [1, 2], [2, 3]]
    assert ramp.stopped and ramp.in_flight == 0 and len(ramp.history) == 4


def test_errors_do_not_ramp_up() -> None:
    ramp = Ramp(cap=8, max_errors=10)
    ramp.start()
    ramp.finish(True)
    assert ramp.limit == 1 and not ramp.stopped
    ramp.start()
    ramp.finish(False)
    assert ramp.limit == 2


def test_the_ramp_refuses_what_its_state_does_not_allow() -> None:
    ramp = Ramp(cap=1, max_errors=0)
    ramp.start()
    with pytest.raises(RuntimeError):
        ramp.start()
    ramp.finish(False)
    with pytest.raises(RuntimeError):
        ramp.finish(False)
    with pytest.raises(ValueError):
        Ramp(cap=0, max_errors=0)


def report(target: str, status: RunStatus, *action_status: ActionStatus) -> Report:
    now = datetime(2026, 12, 1, tzinfo=UTC)
    return Report(
        runbook="postgres-connections",
        target=target,
        dry_run=not action_status,
        status=status,
        findings=[
            Finding(
                check="idle",
                target=target,
                severity=Severity.ok if status is RunStatus.healthy else Severity.critical,
                message=f"{target} | something",
            )
        ],
        actions=[
            Action(kind="k", target=target, description="d", destructive=True, status=s)
            for s in action_status
        ],
        started_at=now,
        finished_at=now,
    )


def test_what_counts_as_an_error() -> None:
    assert is_error(report("a", RunStatus.failed))
    assert is_error(report("a", RunStatus.unhealthy, ActionStatus.done))
    assert is_error(report("a", RunStatus.unhealthy, ActionStatus.failed))
    assert not is_error(report("a", RunStatus.unhealthy))  # a dry run's findings
    assert not is_error(report("a", RunStatus.unhealthy, ActionStatus.planned))
    assert not is_error(report("a", RunStatus.unhealthy, ActionStatus.skipped))
    assert not is_error(report("a", RunStatus.fixed, ActionStatus.done))


def test_the_fleet_report_is_the_worst_and_lists_worst_first() -> None:
    runs = [
        report("a", RunStatus.healthy),
        report("b", RunStatus.failed),
        report("c", RunStatus.unhealthy),
    ]
    left = [NotStarted(target="d", reason="not started: 1 target(s) erred")]
    assert fleet_status(runs, left) is RunStatus.failed
    assert fleet_status(runs[:1], left) is RunStatus.unhealthy  # not started: exit 1
    assert fleet_status(runs[:1], []) is RunStatus.healthy
    assert fleet_status([], []) is RunStatus.healthy
    now = datetime(2026, 12, 1, tzinfo=UTC)
    fleet = FleetReport(
        runbook="postgres-connections",
        selector="all",
        status=fleet_status(runs, left),
        targets=runs,
        not_started=left,
        totals=totals_of(runs, left),
        dry_run=True,
        max_concurrency=5,
        max_errors=0,
        started_at=now,
        finished_at=now,
    )
    assert fleet.exit_code == 3
    assert [r.target for r in fleet.worst_first()] == ["b", "c", "a"]
    assert fleet.totals.model_dump() == {
        "healthy": 1,
        "fixed": 0,
        "unhealthy": 1,
        "failed": 1,
        "not_started": 1,
    }
    table = [line for line in render_fleet(fleet).splitlines() if line.startswith("| ")]
    assert [line.split(" | ")[0:2] for line in table[1:]] == [
        ["| b", "failed"],
        ["| c", "unhealthy"],
        ["| a", "healthy"],
        ["| d", "not started"],
    ]
    assert "b \\| something" in table[1]
