"""Action.touches: an action that changes an inventory target other than its run's own is held
to that target's approval, production flag, rate limits and one-mutating-run lock (tasks.gate,
tasks.limits). Shown with the maintenance pair around postgres-down, whose enable/disable
change `[services.api]` while the run's target is `[postgres.main]`: a real PostgreSQL killed
and brought back, a real HTTP admin API (deployments.sandbox.HealthApp) whose flag is read
from the app itself, and the session's real Prefect API keeping the limits."""

from __future__ import annotations

import subprocess
import sys
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
    MUTATING_WAIT_SECONDS,
    RateLimit,
    admit,
    mutating_limit_name,
    rate_limit_name,
)
from tasks.models import Action, ActionStatus, RunStatus, Severity
from tasks.settings import load_settings
from tests.test_limits import CHILD_HOLD, child_env, read_limit, wait_for
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
    on api does): the pair skips saying so, the restart on postgres.main goes on."""
    # Long enough for a busy API to grant a free limit (the run's own), short enough not to
    # wait the minute for the held one.
    monkeypatch.setattr("tasks.limits.MUTATING_WAIT_SECONDS", 10.0)
    inventory(pg_config(victim, pg_app))
    held, release = tmp_path / "held", tmp_path / "release"
    holder = subprocess.Popen(
        [sys.executable, "-c", CHILD_HOLD, str(held), str(release), "services.api"],
        env=child_env(prefect_api),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(held, holder, "hold")
        victim.stop(remove=False)
        report = postgres_down("main", dry_run=False, approval="auto")
    finally:
        release.touch()
        _, err = holder.communicate(timeout=120)
    assert holder.returncode == 0, err
    assert report.status is RunStatus.fixed and victim.is_running()
    assert [s for _, s in kinds(report)] == [
        ActionStatus.skipped,
        ActionStatus.done,
        ActionStatus.skipped,
    ]
    assert "another run is changing services.api" in report.actions[0].detail
    assert mutating_limit_name("services.api") in report.actions[0].detail
    assert pg_app.switches == []
    # This run released what it held: the next one takes the lock and runs the pair.
    assert read_limit(mutating_limit_name("services.api")).active_slots == 0
    monkeypatch.setattr("tasks.limits.MUTATING_WAIT_SECONDS", MUTATING_WAIT_SECONDS)
    victim.stop(remove=False)
    again = postgres_down("main", dry_run=False, approval="auto")
    assert {s for _, s in kinds(again)} == {ActionStatus.done}, again.actions
    assert pg_app.switches == [(True, False), (False, True)]


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
    )
    settings = load_settings()
    assert touched_target(settings, "services.api") is settings.services["api"]
    for wrong in ("services.web", "sevices.api", "api", "limits.x"):
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
