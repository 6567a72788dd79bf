"""The audit trail against real servers: Prefect events read back through the Prefect API,
rows in a real PostgreSQL table written by a role that may only INSERT and SELECT, and the
`runbook audit` command as a process."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from prefect import flow
from prefect.runtime import flow_run

from deployments.localpg import free_port
from tasks.audit import AuditSettings, init_table, read_trail, record
from tasks.models import (
    Action,
    ActionStatus,
    ApprovalRecord,
    Decision,
    Report,
    RunStatus,
)
from tasks.wait import poll
from tests.conftest import Db

RUNBOOK = str(Path(sys.executable).parent / "runbook")
# Distinctive: it must appear in no event, row, problem or output.
SECRET = "audit-pw-7Qx9ZkV3"
API_TIMEOUT = 30


@dataclass
class Trail:
    """The audit table on a test database: its owner's settings and a writer's."""

    db: Db
    writer: str
    owner: AuditSettings
    settings: AuditSettings

    def rows(self, target: str) -> list[dict[str, Any]]:
        with (
            self.db.admin() as conn,
            conn.cursor(row_factory=psycopg.rows.dict_row) as cur,
        ):
            return cur.execute(
                "SELECT * FROM runbook_audit WHERE target = %s ORDER BY id", [target]
            ).fetchall()


@pytest.fixture
def trail(db: Db) -> Iterator[Trail]:
    """The table made by its owner (the database's superuser), and a login role granted
    nothing but INSERT and SELECT on it (and USAGE on public), whose DSN has a password."""
    writer = f"w_{uuid.uuid4().hex[:10]}"
    with db.admin() as conn:
        conn.execute(f"CREATE ROLE {writer} LOGIN PASSWORD '{SECRET}'")
    owner = AuditSettings(dsn=db.dsn)
    init_table(owner, grant_to=writer)
    host = db.server.dsn_for(db.name, writer).removeprefix(f"postgresql://{writer}@")
    settings = AuditSettings(dsn=f"postgresql://{writer}:{SECRET}@{host}", timeout_seconds=5)
    yield Trail(db=db, writer=writer, owner=owner, settings=settings)
    with db.admin() as conn:
        conn.execute(f"DROP OWNED BY {writer}")
        conn.execute(f"DROP ROLE {writer}")


def report(
    target: str,
    flow_run_id: str | None,
    *,
    approval: ApprovalRecord | None,
    actions: list[tuple[str, ActionStatus, str]],
    finished_at: datetime | None = None,
) -> Report:
    now = finished_at or datetime.now(UTC)
    return Report(
        runbook="postgres-connections",
        target=target,
        dry_run=False,
        status=RunStatus.failed,
        findings=[],
        actions=[
            Action(
                kind=kind,
                target=target,
                description=f"{kind} on {target}",
                destructive=True,
                status=status,
                detail=detail,
            )
            for kind, status, detail in actions
        ],
        started_at=now - timedelta(seconds=5),
        finished_at=now,
        flow_run_id=flow_run_id,
        approval=approval,
    )


MIXED = [
    ("terminate_backend", ActionStatus.done, "ended pid 101"),
    ("cancel_backend", ActionStatus.skipped, "limit postgres-main-backends is full until 23:00Z"),
    ("vacuum_table", ActionStatus.failed, "lock timeout"),
    ("reindex_table", ActionStatus.planned, ""),
]


def approved() -> ApprovalRecord:
    now = datetime.now(UTC)
    return ApprovalRecord(
        decision=Decision.approved,
        approver="oncall-primary",
        comment="go ahead",
        requested_at=now - timedelta(minutes=1),
        answered_at=now,
    )


def record_in_a_flow_run(target: str, settings: AuditSettings | None) -> tuple[str, list[str]]:
    """record() of a hand-made report inside a real flow run, as a runbook's finish does."""
    found: dict[str, Any] = {}

    @flow(name="audit-probe")
    def probe() -> None:
        run_id = flow_run.get_id()
        assert run_id
        built = report(target, run_id, approval=approved(), actions=MIXED)
        found["run"], found["problems"] = (
            run_id,
            record(built, inventory="postgres", settings=settings),
        )

    probe()
    return found["run"], found["problems"]


def events_of(api: str, target: str, count: int) -> list[dict[str, Any]]:
    """The runbook.action.* events of one target, as the Prefect API returns them (events are
    persisted in batches: polled until `count` are there)."""
    body = {
        "filter": {
            "occurred": {"since": "2020-01-01T00:00:00Z"},
            "event": {"prefix": ["runbook.action."]},
            "resource": {"id": [f"runbook.target.postgres.{target}"]},
        },
        "limit": 50,
    }
    found: list[dict[str, Any]] = []

    def seen() -> bool:
        response = httpx.post(f"{api}/events/filter", json=body, timeout=API_TIMEOUT)
        response.raise_for_status()
        found[:] = response.json()["events"]
        return len(found) >= count

    poll(seen, what="the events of the run", timeout_seconds=60)
    return found


def test_a_finished_run_leaves_one_event_and_one_row_per_action_that_was_not_planned(
    prefect_api: str, trail: Trail
) -> None:
    target = f"main-{uuid.uuid4().hex[:8]}"
    run_id, problems = record_in_a_flow_run(target, trail.settings)
    assert problems == []

    events = events_of(prefect_api, target, 3)
    by_name = {e["event"]: e for e in events}
    assert sorted(by_name) == [
        "runbook.action.done",
        "runbook.action.failed",
        "runbook.action.skipped",
    ]
    for event in events:
        assert event["resource"]["prefect.resource.id"] == f"runbook.target.postgres.{target}"
        assert {
            "prefect.resource.id": f"prefect.flow-run.{run_id}",
            "prefect.resource.role": "flow-run",
        }.items() <= next(
            r for r in event["related"] if r["prefect.resource.role"] == "flow-run"
        ).items()
        payload = event["payload"]
        assert payload["runbook"] == "postgres-connections"
        assert payload["target"] == target
        assert payload["approver"] == "oncall-primary"
        assert payload["comment"] == "go ahead"
        assert payload["destructive"] is True
        assert payload["dry_run"] is False
    assert by_name["runbook.action.skipped"]["payload"]["detail"].startswith("limit ")
    assert by_name["runbook.action.done"]["payload"]["kind"] == "terminate_backend"

    rows = trail.rows(target)
    assert [(r["kind"], r["status"]) for r in rows] == [
        ("terminate_backend", "done"),
        ("cancel_backend", "skipped"),
        ("vacuum_table", "failed"),
    ]
    assert {r["flow_run_id"] for r in rows} == {run_id}
    assert {r["approver"] for r in rows} == {"oncall-primary"}
    assert SECRET not in json.dumps(events) + repr(rows)


def test_a_rejection_is_a_skip_with_the_answer_and_a_dry_run_leaves_nothing(
    prefect_api: str, trail: Trail
) -> None:
    target = f"main-{uuid.uuid4().hex[:8]}"
    now = datetime.now(UTC)
    rejected = ApprovalRecord(
        decision=Decision.rejected,
        approver="oncall-primary",
        comment="not during the sale",
        requested_at=now - timedelta(minutes=2),
        answered_at=now,
    )
    detail = "rejected by oncall-primary: not during the sale"
    assert (
        record(
            report(
                target,
                None,
                approval=rejected,
                actions=[("terminate_backend", ActionStatus.skipped, detail)],
            ),
            inventory="postgres",
            settings=trail.settings,
        )
        == []
    )
    dry = report(
        target, None, approval=None, actions=[("terminate_backend", ActionStatus.planned, "")]
    )
    dry.dry_run = True
    assert record(dry, inventory="postgres", settings=trail.settings) == []

    [event] = events_of(prefect_api, target, 1)
    assert event["event"] == "runbook.action.skipped"
    assert event["payload"]["decision"] == "rejected"
    assert event["payload"]["detail"] == detail
    [row] = trail.rows(target)
    assert (row["status"], row["decision"], row["approver"], row["comment"]) == (
        "skipped",
        "rejected",
        "oncall-primary",
        "not during the sale",
    )


def test_the_table_refuses_update_delete_and_truncate_even_to_its_owner(
    prefect_api: str, trail: Trail
) -> None:
    target = f"main-{uuid.uuid4().hex[:8]}"
    built = report(target, None, approval=None, actions=MIXED[:1])
    assert record(built, inventory="postgres", settings=trail.settings) == []
    assert len(trail.rows(target)) == 1
    for statement in (
        "UPDATE runbook_audit SET detail = 'rewritten'",
        "DELETE FROM runbook_audit",
        "TRUNCATE runbook_audit",
        "UPDATE runbook_audit SET detail = 'x' WHERE false",  # statement-level: no row needed
    ):
        with (
            trail.db.admin() as conn,
            pytest.raises(psycopg.errors.ProhibitedSqlStatementAttempted, match="append-only"),
        ):
            conn.execute(statement)
    [row] = trail.rows(target)
    assert row["detail"] == "ended pid 101"


def test_the_writer_needs_insert_and_select_only(prefect_api: str, trail: Trail) -> None:
    with trail.db.admin() as conn:

        def may(privilege: str) -> bool:
            found = conn.execute(
                "SELECT has_table_privilege(%s, 'runbook_audit', %s)", [trail.writer, privilege]
            ).fetchone()
            assert found
            return bool(found[0])

        assert may("INSERT") and may("SELECT")
        assert not any(may(p) for p in ("UPDATE", "DELETE", "TRUNCATE", "TRIGGER", "REFERENCES"))
        # The identity column's sequence: no grant on it, and none needed.
        sequence = conn.execute(
            "SELECT has_sequence_privilege(%s, pg_get_serial_sequence('runbook_audit', 'id'),"
            " 'USAGE,UPDATE')",
            [trail.writer],
        ).fetchone()
        assert sequence == (False,)
    target = f"main-{uuid.uuid4().hex[:8]}"
    early = report(
        target,
        None,
        approval=None,
        actions=[("cancel_backend", ActionStatus.done, "first")],
        finished_at=datetime.now(UTC) - timedelta(hours=2),
    )
    late = report(
        target, None, approval=None, actions=[("terminate_backend", ActionStatus.done, "second")]
    )
    for built in (early, late):
        assert record(built, inventory="postgres", settings=trail.settings) == []
    trail_back = read_trail(datetime.now(UTC) - timedelta(days=1), target, trail.settings)
    assert [e.detail for e in trail_back] == ["second", "first"]  # newest first
    recent = read_trail(datetime.now(UTC) - timedelta(hours=1), target, trail.settings)
    assert [e.detail for e in recent] == ["second"]
    assert read_trail(datetime.now(UTC) - timedelta(days=1), "other", trail.settings) == []
    # Writing anything else is refused by privileges before the trigger is reached.
    with (
        psycopg.connect(trail.settings.dsn.get_secret_value(), autocommit=True) as conn,
        pytest.raises(psycopg.errors.InsufficientPrivilege),
    ):
        conn.execute("DELETE FROM runbook_audit")


def test_an_unreachable_or_silent_audit_database_is_a_problem_without_the_password(
    prefect_api: str, trail: Trail
) -> None:
    target = f"main-{uuid.uuid4().hex[:8]}"
    closed = free_port()
    refused = AuditSettings(dsn=f"postgresql://writer:{SECRET}@127.0.0.1:{closed}/audit")
    # A listener that never answers: only connect_timeout ends the wait.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        mute = AuditSettings(
            dsn=f"postgresql://writer:{SECRET}@127.0.0.1:{port}/audit", timeout_seconds=1
        )
        built = report(target, None, approval=None, actions=MIXED)
        problems = [
            p
            for settings in (refused, mute)
            for p in record(built, inventory="postgres", settings=settings)
        ]
    assert len(problems) == 2
    assert f"127.0.0.1:{closed}/audit user=writer" in problems[0]
    assert f"127.0.0.1:{port}/audit user=writer" in problems[1]
    assert all("3 rows not recorded" in p for p in problems)
    assert SECRET not in "".join(problems)
    # The events are emitted all the same: the run's trail is not lost with its database.
    assert len(events_of(prefect_api, target, 6)) == 6


def test_a_missing_table_says_how_to_create_it(prefect_api: str, trail: Trail) -> None:
    other = AuditSettings(dsn=trail.settings.dsn, table="public.nowhere")
    built = report("main", None, approval=None, actions=MIXED[:1])
    problems = record(built, inventory="postgres", settings=other)
    assert len(problems) == 1
    assert "audit table public.nowhere on 127.0.0.1:" in problems[0]
    assert "runbook audit --init" in problems[0]
    assert SECRET not in problems[0]


def cli(*args: str, config: Path, env: dict[str, str] | None = None) -> Any:
    base = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_LOGGING")}
    return subprocess.run(
        [RUNBOOK, "audit", *args],
        capture_output=True,
        text=True,
        timeout=180,
        env={**base, "RUNBOOK_CONFIG": str(config), **(env or {})},
    )


def test_runbook_audit_lists_the_table_and_the_events(
    prefect_api: str, trail: Trail, tmp_path: Path
) -> None:
    target = f"main-{uuid.uuid4().hex[:8]}"
    run_id, problems = record_in_a_flow_run(target, trail.settings)
    assert problems == []
    events_of(prefect_api, target, 3)

    with_table = tmp_path / "with-table.toml"
    with_table.write_text(f'[audit]\ndsn = "{trail.settings.dsn.get_secret_value()}"\n')
    without = tmp_path / "events-only.toml"
    without.write_text("")
    env = {"PREFECT_API_URL": prefect_api}
    for config in (with_table, without):
        proc = cli("--json", "--since", "30m", "--target", target, config=config, env=env)
        assert proc.returncode == 0, proc.stderr
        listed = json.loads(proc.stdout)
        assert sorted((e["kind"], e["status"]) for e in listed) == [
            ("cancel_backend", "skipped"),
            ("terminate_backend", "done"),
            ("vacuum_table", "failed"),
        ]
        assert {e["flow_run_id"] for e in listed} == {run_id}
        assert {e["approver"] for e in listed} == {"oncall-primary"}
        assert SECRET not in proc.stdout + proc.stderr

    table = cli("--since", "7d", config=with_table)  # piped: one line per entry
    assert table.returncode == 0, table.stderr
    header, *lines = table.stdout.splitlines()
    assert header.split()[:3] == ["time", "(UTC)", "target"]
    mine = [line for line in lines if f"postgres.{target}" in line]
    assert len(mine) == 3
    cells = [re.split(r"\s{2,}", line) for line in mine]
    assert ["vacuum_table", "failed", "oncall-primary", "lock timeout"] in [c[3:] for c in cells]

    bad = cli("--since", "5 weeks", config=with_table)
    assert bad.returncode == 2
    assert "--since '5 weeks'" in bad.stderr and "24h" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_runbook_audit_init_creates_a_schema_qualified_table_once(
    prefect_api: str, db: Db, tmp_path: Path
) -> None:
    writer = f"w_{uuid.uuid4().hex[:10]}"
    with db.admin() as conn:
        conn.execute("CREATE SCHEMA ops")
        conn.execute(f"CREATE ROLE {writer} LOGIN")
    try:
        config = tmp_path / "runbook.toml"
        config.write_text(f'[audit]\ndsn = "{db.dsn}"\ntable = "ops.trail"\n')
        for _ in range(2):  # idempotent
            proc = cli("--init", "--grant", writer, config=config)
            assert proc.returncode == 0, proc.stderr
        settings = AuditSettings(dsn=db.server.dsn_for(db.name, writer), table="ops.trail")
        built = report("main", None, approval=None, actions=MIXED)
        assert record(built, inventory="postgres", settings=settings) == []
        assert len(read_trail(datetime.now(UTC) - timedelta(hours=1), None, settings)) == 3
        with (
            db.admin() as conn,
            pytest.raises(psycopg.errors.ProhibitedSqlStatementAttempted),
        ):
            conn.execute("DELETE FROM ops.trail")
    finally:
        with db.admin() as conn:
            conn.execute(f"DROP OWNED BY {writer}")
            conn.execute(f"DROP ROLE {writer}")


def test_a_bad_audit_section_is_one_clear_error_without_the_password(tmp_path: Path) -> None:
    config = tmp_path / "runbook.toml"
    config.write_text(
        f'[audit]\ndsn = "postgresql://writer:{SECRET}@127.0.0.1:1/ops"\ntable = "a.b.c"\n'
    )
    proc = cli("--since", "1h", config=config)
    assert proc.returncode == 2
    assert "audit.table: must be TABLE or SCHEMA.TABLE" in proc.stderr
    assert f"{config}" in proc.stderr
    assert SECRET not in proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    config.write_text("")
    alone = cli("--grant", "someone", config=config)
    assert alone.returncode == 2
    assert "--grant goes with --init" in alone.stderr
    no_section = cli("--init", config=config)
    assert no_section.returncode == 2
    assert "--init needs an [audit] section" in no_section.stderr
    config.write_text(
        f'[audit]\ndsn = "postgresql://writer:{SECRET}@127.0.0.1:{free_port()}/ops"\n'
    )
    down = cli("--since", "1h", config=config)
    assert down.returncode == 3
    assert "audit table runbook_audit on 127.0.0.1:" in down.stderr
    assert "cannot connect" in down.stderr
    assert SECRET not in down.stdout + down.stderr
