"""Pure decisions: no server needed."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from pydantic import SecretStr

from tasks.approval import approval_form
from tasks.gate import action_policy, approver, gate
from tasks.models import (
    Action,
    ActionStatus,
    Approval,
    Finding,
    RunStatus,
    Severity,
    final_status,
)
from tasks.postgres import Activity, Backend, TableStats, TopQueries
from tasks.postgres_rules import (
    ConnectionsParams,
    MaintenanceParams,
    connection_findings,
    ineligible,
    maintenance_findings,
    plan_connections,
)
from tasks.settings import PostgresTarget

NOW = datetime(2026, 11, 23, 3, 0, tzinfo=UTC)


def backend(pid: int, state: str = "idle in transaction", age: int = 3600, **kw: object) -> Backend:
    values: dict[str, object] = {
        "pid": pid,
        "backend_type": "client backend",
        "usename": "app",
        "datname": "app",
        "application_name": "web",
        "state": state,
        "wait_event_type": None,
        "wait_event": None,
        "backend_start": NOW - timedelta(days=1),
        "xact_start": NOW - timedelta(seconds=age),
        "query_start": NOW - timedelta(seconds=age),
        "state_change": NOW - timedelta(seconds=age),
        "blocked_by": [],
        "superuser": False,
        "ours": False,
        "hidden": False,
    }
    values.update(kw)
    return Backend.model_validate(values)


TARGET = PostgresTarget(dsn=SecretStr("postgresql://x@h/d"))


def test_only_plain_client_backends_are_eligible() -> None:
    assert ineligible(backend(1), TARGET) is None
    assert "own" in (ineligible(backend(1, ours=True), TARGET) or "")
    assert "walsender" in (ineligible(backend(1, backend_type="walsender"), TARGET) or "")
    assert "autovacuum" in (ineligible(backend(1, backend_type="autovacuum worker"), TARGET) or "")
    assert "superuser" in (ineligible(backend(1, superuser=True), TARGET) or "")


@pytest.mark.parametrize(
    ("field", "value", "attr"),
    [
        ("allow_roles", ["other"], "usename"),
        ("allow_databases", ["other"], "datname"),
        ("allow_applications", ["other"], "application_name"),
    ],
)
def test_allow_lists_narrow(field: str, value: list[str], attr: str) -> None:
    narrowed = TARGET.model_copy(update={field: value})
    assert ineligible(backend(1), narrowed) is not None
    assert ineligible(backend(1).model_copy(update={attr: "other"}), narrowed) is None


def test_plan_cancels_before_terminating_and_respects_the_cap() -> None:
    activity = Activity(
        now=NOW,
        role="runbook",
        max_connections=100,
        backends=[
            backend(1),
            backend(2),
            backend(3, state="active"),
            backend(4, superuser=True),
            backend(5, state="active", blocked_by=[1]),  # a victim of pid 1: never cancelled
            backend(6, age=5),  # under the threshold
        ],
    )
    actions = plan_connections("main", activity, TARGET, ConnectionsParams(max_backends_ended=2))
    assert [(a.kind, a.args.pid, a.status) for a in actions] == [
        ("cancel_query", 3, ActionStatus.planned),
        ("terminate_backend", 1, ActionStatus.planned),
        ("terminate_backend", 2, ActionStatus.skipped),
    ]
    assert all(a.destructive for a in actions)


def test_connection_findings_name_blockers_and_usage() -> None:
    activity = Activity(
        now=NOW,
        role="runbook",
        max_connections=4,
        backends=[
            backend(1),
            backend(
                2,
                state="active",
                blocked_by=[1],
                wait_event_type="Lock",
                wait_event="transactionid",
            ),
            backend(3, state="idle", age=1),
            backend(4, state="idle", age=1),
        ],
    )
    findings = {
        (f.check, f.severity)
        for f in connection_findings("main", activity, TARGET, ConnectionsParams())
    }
    assert ("connections", Severity.critical) in findings  # 4 of 4
    assert ("idle_in_transaction", Severity.warning) in findings
    assert ("blocked", Severity.warning) in findings
    blocked = next(
        f
        for f in connection_findings("main", activity, TARGET, ConnectionsParams())
        if f.check == "blocked"
    )
    assert blocked.observed == [1] and "pid 1" in blocked.message


@pytest.mark.parametrize(
    "backend_type",
    [
        "walsender",
        "logical replication worker",
        "parallel worker",
        "autovacuum worker",
        "background worker",
    ],
)
def test_backends_that_are_not_client_sessions_are_never_long_queries(backend_type: str) -> None:
    old = backend(1, state="active", age=86400 * 3, backend_type=backend_type)
    idle = backend(2, age=86400 * 3, backend_type=backend_type)
    activity = Activity(now=NOW, role="runbook", max_connections=2, backends=[old, idle])
    findings = connection_findings("main", activity, TARGET, ConnectionsParams())
    assert {f.check: f.severity for f in findings} == {
        "connections": Severity.ok,
        "other_backends": Severity.ok,
        "idle_in_transaction": Severity.ok,
        "long_query": Severity.ok,
        "blocked": Severity.ok,
    }
    assert next(f for f in findings if f.check == "other_backends").observed == {backend_type: 2}
    assert plan_connections("main", activity, TARGET, ConnectionsParams()) == []


def test_hidden_rows_are_a_warning_naming_the_grant() -> None:
    hidden = {
        k: None for k in ("backend_type", "state", "backend_start", "xact_start", "query_start")
    }
    activity = Activity(
        now=NOW,
        role="Ops Bot",
        max_connections=10,
        backends=[
            backend(1, state="idle in transaction (aborted)"),
            backend(2, hidden=True, state_change=None).model_copy(update=hidden),
            backend(3, hidden=True, datname=None, usename=None, state_change=None).model_copy(
                update=hidden
            ),
        ],
    )
    findings = {
        f.check: f for f in connection_findings("main", activity, TARGET, ConnectionsParams())
    }
    assert findings["stats_privilege"].severity is Severity.warning
    assert findings["stats_privilege"].observed == 2
    assert 'GRANT pg_read_all_stats TO "Ops Bot"' in findings["stats_privilege"].message
    assert findings["connections"].observed == 2  # pid 1, and pid 2 on a database
    actions = plan_connections("main", activity, TARGET, ConnectionsParams())
    assert [(a.kind, a.args.pid) for a in actions] == [("terminate_backend", 1)]


def action(destructive: bool = True) -> Action:
    return Action(kind="k", target="t", description="d", destructive=destructive)


def test_gate_dry_run_stops_everything() -> None:
    actions = [action(), action(False)]
    assert gate(actions, [], dry_run=True, approval="auto") == []
    assert all(a.status is ActionStatus.planned for a in actions)


def test_gate_policy_and_approver() -> None:
    actions = [action(), action(False)]
    assert gate(actions, [], dry_run=False, approval="never") == [actions[1]]
    assert actions[0].status is ActionStatus.skipped
    actions = [action(), action(False)]
    assert gate(actions, [], dry_run=False, approval="ask") == [actions[1]]
    assert "no approver" in actions[0].detail
    actions = [action()]
    with approver(lambda a: False, who="tester"):
        assert gate(actions, [], dry_run=False, approval="ask") == []
    assert actions[0].detail == "rejected by tester"
    actions = [action()]
    with approver(lambda a: True):
        assert gate(actions, [], dry_run=False, approval="ask") == actions


@dataclass(frozen=True)
class _Policy:
    approval: Approval = "auto"
    production: bool = False


@pytest.mark.parametrize(
    ("requested", "kind", "targets", "expected"),
    [
        ("auto", None, {}, "auto"),
        ("auto", "ask", {}, "ask"),
        ("auto", None, {"main": _Policy("never")}, "never"),
        ("ask", "auto", {"main": _Policy()}, "ask"),  # a policy only ever restricts
        ("never", None, {"main": _Policy(production=True)}, "never"),
        ("auto", None, {"main": _Policy(production=True)}, "ask"),
        ("auto", None, {"main": _Policy(), "api": _Policy("ask")}, "ask"),
    ],
)
def test_action_policy_is_the_strictest_and_production_asks(
    requested: Approval, kind: Approval | None, targets: dict[str, _Policy], expected: str
) -> None:
    kinds = {"rb": {"k": kind}} if kind else {}
    policy = action_policy(requested, action(), runbook="rb", kind_policies=kinds, targets=targets)
    assert policy.approval == expected


def test_approval_form_shows_evidence_actions_and_blast_radius() -> None:
    found = [
        Finding(check="idle", target="main", severity=Severity.critical, message="3 idle"),
        Finding(check="ok", target="main", severity=Severity.ok, message="fine"),
    ]
    acts = [
        Action(
            kind="terminate_backend", target="main", description=f"end pid {p}", destructive=True
        )
        for p in (1, 2)
    ]
    form = approval_form("postgres-connections", "main", acts, found, 900, why="W")
    assert "Approval needed: postgres-connections on `main`" in form
    assert "**critical** idle on `main`: 3 idle" in form and "fine" not in form
    assert "1. end pid 1 on `main`; why: 3 idle" in form
    assert "- 2 x terminate_backend on `main`" in form
    assert "within 15 min" in form and "A human is asked because W." in form


def finding(severity: Severity) -> Finding:
    return Finding(check="c", target="t", severity=severity, message="m")


def test_final_status() -> None:
    ok, bad = [finding(Severity.ok)], [finding(Severity.warning)]
    done = action()
    done.status = ActionStatus.done
    failed = action()
    failed.status = ActionStatus.failed
    assert final_status(ok, ok, []) is RunStatus.healthy
    assert final_status(bad, ok, [done]) is RunStatus.fixed
    assert final_status(bad, bad, [done]) is RunStatus.unhealthy
    assert final_status(bad, bad, [action()]) is RunStatus.unhealthy
    assert final_status(bad, ok, [done, failed]) is RunStatus.failed


def test_vacuum_times_are_shown_in_utc_whatever_the_session_time_zone() -> None:
    # psycopg returns timestamptz in the session's TimeZone: the server's setting.
    kolkata = datetime(2026, 11, 23, 8, 30, tzinfo=ZoneInfo("Asia/Kolkata"))
    table = TableStats(
        schema_name="public",
        table="event",
        live_tuples=10,
        dead_tuples=5000,
        last_vacuum=kolkata,
        last_autovacuum=None,
        last_analyze=None,
        last_autoanalyze=None,
        table_bytes=1,
        index_bytes=1,
        total_bytes=2,
    )
    findings = maintenance_findings(
        "main", [table], TopQueries(available=False), MaintenanceParams()
    )
    dead = next(f for f in findings if f.check == "dead_tuples")
    assert "last vacuum 2026-11-23 03:00 UTC" in dead.message
