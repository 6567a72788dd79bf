"""Action.touches: an action that changes an inventory target other than its run's own is held
to that target's approval, production flag, rate limits and one-mutating-run lock (tasks.gate,
tasks.limits). Shown with the maintenance pair around postgres-down, whose enable/disable
change `[services.api]` while the run's target is `[postgres.main]`: a real PostgreSQL killed
and brought back, a real HTTP admin API (deployments.sandbox.HealthApp) whose flag is read
from the app itself, and the session's real Prefect API keeping the limits."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from deployments.localpg import LocalPostgres
from deployments.sandbox import HealthApp
from flows.maintenance_mode import maintenance_mode
from flows.postgres_down import postgres_down
from tasks.gate import approver, touched_target
from tasks.limits import (
    RateLimit,
    admit,
    mutating_limit_name,
    rate_limit_name,
)
from tasks.models import Action, ActionStatus, RunStatus, Severity
from tasks.settings import load_settings
from tests.test_limits import held_elsewhere, read_limit, short_wait_for
from tests.test_maintenance_mode import TOKEN, health, kinds, pg_config

pytestmark = pytest.mark.usefixtures("prefect_api")

ENABLE, RESTART, DISABLE = "enable_maintenance", "restart_service", "disable_maintenance"


@pytest.fixture
def victim() -> Iterator[LocalPostgres]:
    server = LocalPostgres().start()
    yield server
    server.stop()


@pytest.fixture
def pg_app(victim: LocalPostgres) -> Iterator[HealthApp]:
    """The app whose /health checks the database; each switch records whether PostgreSQL
    was running at that moment (tests.test_maintenance_mode)."""
    server = HealthApp(victim.dsn, token=TOKEN, observe=victim.is_running)
    yield server
    server.close()


def with_api(config: str, line: str) -> str:
    """The inventory with one more line in [services.api] (the app's service)."""
    assert "[services.api]\n" in config
    return config.replace("[services.api]\n", f"[services.api]\n{line}\n")


def test_the_pair_names_the_service_it_touches(
    victim: LocalPostgres, pg_app: HealthApp, inventory: Any
) -> None:
    inventory(pg_config(victim, pg_app))
    victim.stop(remove=False)
    plan = postgres_down("main")
    assert [(a.kind, a.touches) for a in plan.actions] == [
        (ENABLE, "services.api"),
        (RESTART, "services.db"),  # the service that runs PostgreSQL
        (DISABLE, "services.api"),
    ]
    # Not in the report (DESIGN.md's report JSON).
    assert "touches" not in plan.model_dump_json()


def test_a_production_service_makes_the_pair_ask(
    victim: LocalPostgres, pg_app: HealthApp, inventory: Any
) -> None:
    """postgres.main is not production, services.api is: the restart is auto-approved, the
    pair that switches services.api asks, and without an approver is skipped."""
    inventory(with_api(pg_config(victim, pg_app), "production = true"))
    victim.stop(remove=False)
    report = postgres_down("main", dry_run=False, approval="auto")
    assert report.status is RunStatus.fixed and victim.is_running()
    assert kinds(report) == [
        (ENABLE, ActionStatus.skipped),
        (RESTART, ActionStatus.done),
        (DISABLE, ActionStatus.skipped),
    ]
    assert "needs approval and no approver is present" in report.actions[0].detail
    assert pg_app.switches == []

    # With an approver (the CLI's --yes) only the pair is asked for, and then runs.
    asked: list[str] = []

    def decide(actions: list[Action]) -> bool:
        asked.extend(a.kind for a in actions)
        return True

    victim.stop(remove=False)
    with approver(decide, who="on-call"):
        report = postgres_down("main", dry_run=False, approval="auto")
    assert report.status is RunStatus.fixed, report.findings
    assert asked == [ENABLE, DISABLE]
    assert {s for _, s in kinds(report)} == {ActionStatus.done}
    assert pg_app.switches == [(True, False), (False, True)] and not pg_app.maintenance


def test_approval_never_on_the_touched_service_skips_the_pair(
    victim: LocalPostgres, pg_app: HealthApp, inventory: Any
) -> None:
    inventory(with_api(pg_config(victim, pg_app), 'approval = "never"'))
    victim.stop(remove=False)
    report = postgres_down("main", dry_run=False, approval="auto")
    assert report.status is RunStatus.fixed and victim.is_running()
    assert [s for _, s in kinds(report)] == [
        ActionStatus.skipped,
        ActionStatus.done,
        ActionStatus.skipped,
    ]
    assert "approval policy is 'never' (target 'services.api')" in report.actions[0].detail
    assert pg_app.switches == [] and not pg_app.maintenance


def test_a_run_changing_the_touched_service_makes_the_pair_skip(
    victim: LocalPostgres,
    pg_app: HealthApp,
    inventory: Any,
    prefect_api: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Another process holds services.api's one-mutating-run lock (as a maintenance-mode run
    on api does): the pair skips saying so and spends none of its rate, the restart on
    postgres.main goes on. Once free, the pair holds that lock while it switches."""
    short_wait_for(monkeypatch, "services.api")
    inventory(pg_config(victim, pg_app))
    slots = {kind: rate_slots(rate_limit_name(kind, "api")) for kind in (ENABLE, DISABLE)}
    with held_elsewhere(prefect_api, tmp_path, "services.api"):
        victim.stop(remove=False)
        report = postgres_down("main", dry_run=False, approval="auto")
    assert report.status is RunStatus.fixed and victim.is_running()
    assert [s for _, s in kinds(report)] == [
        ActionStatus.skipped,
        ActionStatus.done,
        ActionStatus.skipped,
    ]
    assert "another run is changing services.api" in report.actions[0].detail
    assert mutating_limit_name("services.api") in report.actions[0].detail
    assert pg_app.switches == []
    # The skipped pair took no slot of enable/disable_maintenance's rate on api.
    assert {kind: rate_slots(rate_limit_name(kind, "api")) for kind in (ENABLE, DISABLE)} == slots
    # This run released what it held: the next one takes the lock and runs the pair.
    lock = mutating_limit_name("services.api")
    assert read_limit(lock).active_slots == 0
    # Each switch records whether PostgreSQL ran and how many slots services.api's lock had
    # taken at that moment (read from the Prefect API by the app's own request handler).
    pg_app.observe = lambda: (victim.is_running(), read_limit(lock).active_slots)
    victim.stop(remove=False)
    again = postgres_down("main", dry_run=False, approval="auto")
    assert {s for _, s in kinds(again)} == {ActionStatus.done}, again.actions
    assert pg_app.switches == [(True, (False, 1)), (False, (True, 1))]
    assert read_limit(lock).active_slots == 0


def test_a_pair_whose_restart_is_held_spends_no_rate(
    victim: LocalPostgres,
    pg_app: HealthApp,
    inventory: Any,
    prefect_api: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Another process holds services.db, the service postgres-down restarts: the restart
    skips, and the pair around it (services.api is free) is skipped before it takes any
    slot of enable/disable_maintenance's rate on api."""
    short_wait_for(monkeypatch, "services.db")
    inventory(pg_config(victim, pg_app))
    slots = {kind: rate_slots(rate_limit_name(kind, "api")) for kind in (ENABLE, DISABLE)}
    with held_elsewhere(prefect_api, tmp_path, "services.db"):
        victim.stop(remove=False)
        report = postgres_down("main", dry_run=False, approval="auto")
    assert not victim.is_running() and report.status is not RunStatus.fixed
    assert [s for _, s in kinds(report)] == [ActionStatus.skipped] * 3
    assert "another run is changing services.db" in report.actions[1].detail
    assert "no action it was to cover passed the gate" in report.actions[0].detail
    assert pg_app.switches == [] and not pg_app.maintenance
    assert {kind: rate_slots(rate_limit_name(kind, "api")) for kind in (ENABLE, DISABLE)} == slots


def rate_slots(name: str) -> int:
    """The active slots of a rate limit, 0 when no run created it yet."""
    from prefect.exceptions import ObjectNotFound

    try:
        return int(read_limit(name).active_slots)
    except ObjectNotFound:
        return 0


def test_a_subflow_does_not_wait_for_the_lock_its_parent_holds(prefect_api: str) -> None:
    """service-health holds services.X for its restart of X and hands a failing dependency
    over to postgres-down as a subflow, whose restart may touch X: the subflow counts the
    slot as held rather than waiting for its own parent (another process still waits:
    tests.test_limits)."""
    from prefect import flow

    from tasks.journal import journal_scope
    from tasks.limits import mutating_run

    resource = f"services.{uuid.uuid4().hex[:8]}"
    lock = mutating_limit_name(resource)

    @flow
    def child() -> tuple[str | None, int]:
        with journal_scope(), mutating_run(resource, wait_seconds=5) as reason:
            return reason, read_limit(lock).active_slots

    @flow
    def parent() -> tuple[str | None, int]:
        with journal_scope(), mutating_run(resource) as reason:
            assert reason is None
            return child()

    assert parent() == (None, 1)  # granted at once; the one slot is the parent's
    assert read_limit(lock).active_slots == 0


def test_the_touched_service_shares_its_rate_with_maintenance_mode(
    victim: LocalPostgres, pg_app: HealthApp, inventory: Any
) -> None:
    """maintenance-mode on api and postgres-down's pair on services.api take one budget."""
    inventory(
        pg_config(victim, pg_app)
        + "[limits]\nenable_maintenance = { max = 1, per_seconds = 3600 }\n"
    )
    on = maintenance_mode("api", dry_run=False, approval="auto", params={"enable": True})
    off = maintenance_mode("api", dry_run=False, approval="auto", params={"enable": False})
    assert on.status is off.status is RunStatus.fixed
    victim.stop(remove=False)
    report = postgres_down("main", dry_run=False, approval="auto")
    assert report.status is RunStatus.fixed and victim.is_running()
    assert [s for _, s in kinds(report)][::2] == [ActionStatus.skipped] * 2
    name = rate_limit_name(ENABLE, "api")
    assert f"over the rate limit {name} (1 per 3600 s)" in report.actions[0].detail
    assert [on for on, _ in pg_app.switches] == [True, False]  # maintenance-mode's


def test_a_touched_backup_set_shares_backup_retentions_budget() -> None:
    """disk-space's delete_backup touching backups.NAME counts against the limit that
    backup-retention's delete_backup on NAME (its action.target) takes."""
    name = f"set-{uuid.uuid4().hex[:8]}"
    rates = {"delete_backup": RateLimit(max=1, per_seconds=86_400)}

    def delete(target: str, touches: str | None = None) -> Action:
        return Action(
            kind="delete_backup", target=target, description="d", destructive=True, touches=touches
        )

    retention = delete(name)
    assert admit([retention], rates=rates) == [retention]
    from_disk, elsewhere = delete("root", f"backups.{name}"), delete("root", "backups.other")
    assert admit([from_disk, elsewhere], rates=rates) == [elsewhere]
    assert rate_limit_name("delete_backup", name) in from_disk.detail
    assert read_limit(rate_limit_name("delete_backup", name)).active_slots == 1


def test_an_unknown_touched_target_is_a_bug_said_plainly(inventory: Any) -> None:
    inventory(
        '[services.api]\nkind = "command"\nstatus_command = ["true"]\nrestart_command = ["true"]\n'
        "[limits]\nrestart_service = { max = 1, per_seconds = 3600 }\n"
    )
    settings = load_settings()
    assert touched_target(settings, "services.api") is settings.services["api"]
    # limits is a section of the file but no section of targets.
    for wrong in ("services.web", "sevices.api", "api", "limits.x", "limits.restart_service"):
        with pytest.raises(ValueError, match=f"touches '{wrong}', which is no inventory target"):
            touched_target(settings, wrong)


# --- a switch into maintenance that failed after the application applied it ----------------


def test_a_failed_switch_that_was_applied_is_reported_in_maintenance(
    victim: LocalPostgres, pg_app: HealthApp, inventory: Any
) -> None:
    """The admin API saves the flag, then answers 500. PostgreSQL does not come back: the
    report says the application IS in maintenance (not that it was not put in), how to take
    it out, and the run leaves it in."""
    inventory(pg_config(victim, pg_app, restart=["true"], start=False))
    pg_app.failing_puts = 1
    victim.stop(remove=False)
    report = postgres_down(
        "main", dry_run=False, approval="auto", params={"ready_timeout_seconds": 2}
    )
    assert report.status is RunStatus.failed
    assert pg_app.maintenance and health(pg_app) == 503
    enable, _, disable = report.actions
    assert enable.status is ActionStatus.failed and "answered 500" in enable.detail
    assert disable.status is ActionStatus.skipped
    assert "not put in maintenance" not in disable.detail
    assert "api is in maintenance" in disable.detail
    [flag] = [f for f in report.findings if f.check == "maintenance" and f.observed == "on"]
    assert flag.severity is Severity.warning
    assert "api is in maintenance mode" in flag.message
    assert "runbook run maintenance-mode --target api --set enable=false --apply" in flag.message
    assert [on for on, _ in pg_app.switches] == [True]


def test_a_failed_switch_that_was_applied_is_taken_out_once_mended(
    victim: LocalPostgres, pg_app: HealthApp, inventory: Any
) -> None:
    """Same 500 after saving, but the restart mends PostgreSQL: verification passes and the
    run takes the application out as usual."""
    inventory(pg_config(victim, pg_app))
    pg_app.failing_puts = 1
    victim.stop(remove=False)
    report = postgres_down("main", dry_run=False, approval="auto")
    assert victim.is_running()
    assert kinds(report) == [
        (ENABLE, ActionStatus.failed),
        (RESTART, ActionStatus.done),
        (DISABLE, ActionStatus.done),
    ]
    # The failed switch still ends the run failed: someone should look at the admin API.
    assert report.status is RunStatus.failed
    assert pg_app.switches == [(True, False), (False, True)] and not pg_app.maintenance
    assert health(pg_app) == 200
    flag = [f for f in report.findings if f.check == "maintenance"][-1]
    assert flag.severity is Severity.ok and flag.observed == "off"


def test_a_failed_switch_that_was_not_applied_says_so(
    victim: LocalPostgres, pg_app: HealthApp, inventory: Any
) -> None:
    """The admin API refuses the switch (a token rotated since) and the flag, read from the
    app's /health (no token needed), reads off: the disable is skipped as not needed, and
    nothing claims the app is in maintenance."""
    config = pg_config(victim, pg_app)
    inventory("\n".join(line for line in config.splitlines() if "check_" not in line) + "\n")
    pg_app.token = "rotated-" + uuid.uuid4().hex[:8]
    victim.stop(remove=False)
    report = postgres_down("main", dry_run=False, approval="auto")
    assert victim.is_running() and not pg_app.maintenance and pg_app.switches == []
    enable, _, disable = report.actions
    assert enable.status is ActionStatus.failed and "answered 401" in enable.detail
    assert disable.status is ActionStatus.skipped
    assert disable.detail.startswith("the application was not put in maintenance (api reads off")
    assert not [f for f in report.findings if f.check == "maintenance" and f.observed == "on"]


def test_an_action_on_another_section_borrows_no_policy_from_its_runs_section(
    inventory: Any, tmp_path: Path
) -> None:
    """disk-space's delete_backup names the backup set (action.target "local", touches
    "backups.local"): a [disk.local] of the same name does not lend it its `never`."""
    from tasks.gate import _policies
    from tasks.journal import journal_scope

    inventory(
        f'[backups.local]\ndirectory = "{tmp_path}"\npattern = ["*.dump"]\n'
        f'[disk.root]\npaths = ["{tmp_path}"]\nbackups = "local"\n'
        f'[disk.local]\npaths = ["{tmp_path}"]\napproval = "never"\n'
    )

    def delete(touches: str | None) -> Action:
        return Action(
            kind="delete_backup", target="local", description="d", destructive=True, touches=touches
        )

    with journal_scope("disk"):
        policy = _policies("auto", "disk-space", "root")
        assert policy(delete("backups.local")).approval == "auto"
        # Named in its run's own section, the same name is that target's.
        assert policy(delete(None)).approval == "never"
        assert policy(delete("disk.local")).approval == "never"
