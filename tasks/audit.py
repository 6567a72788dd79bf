"""The audit trail: what every finished run did to its targets, as Prefect events and, when
`[audit] dsn` is set, as rows of an append-only PostgreSQL table.

One entry per action that ran, was skipped (by the gate, a policy, a limit, or a human's
rejection or an unanswered request: report.approval says which) or failed. Actions still
`planned` are left out: a dry run changes nothing.

    event      runbook.action.<status>        status: done | skipped | failed
    resource   runbook.target.<inventory>.<target>   labels runbook.inventory, runbook.target
    related    prefect.flow-run.<id>          role flow-run
    payload    runbook, kind, target, description, destructive, status, detail, decision,
               approver, comment, dry_run

The table is created once by `runbook audit --init`, run with a DSN of a role that may create
it (its owner); the role in `[audit] dsn` then needs INSERT and SELECT only (README, Audit).
A trigger refuses UPDATE, DELETE and TRUNCATE, so not even a writer can rewrite history; only
the owner could drop the trigger, and the writer is not the owner.

Prefect and its client are imported inside the functions: tasks.settings imports this module,
and the alert receiver loads settings before it may set PREFECT_API_URL.
"""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg import sql
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

from tasks.errors import AuthenticationFailed, ConfigError, TargetError, TargetUnreachable
from tasks.models import ActionStatus, Report

if TYPE_CHECKING:
    from prefect.events.schemas.events import ReceivedEvent

EVENT_PREFIX = "runbook.action."
RESOURCE_PREFIX = "runbook.target."
# Statuses that leave a trace: `planned` is what a dry run (or a run that stopped early)
# leaves behind, and nothing happened to the target.
RECORDED = (ActionStatus.done, ActionStatus.skipped, ActionStatus.failed)
# Prefect's events API answers at most this many events per page.
EVENTS_PAGE = 50


class AuditSettings(BaseModel):
    """The `[audit]` section: where the append-only trail table lives."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    dsn: SecretStr = Field(description="a role with INSERT and SELECT on the table")
    table: str = Field("runbook_audit", description="TABLE or SCHEMA.TABLE")
    # connect_timeout and statement_timeout of every audit connection, in seconds.
    timeout_seconds: float = Field(5, gt=0, le=60)

    @field_validator("dsn")
    @classmethod
    def _parsable(cls, value: SecretStr) -> SecretStr:
        try:
            psycopg.conninfo.conninfo_to_dict(value.get_secret_value())
        except psycopg.ProgrammingError:
            # psycopg's message may quote the DSN: say only what to fix.
            raise ValueError(
                "not a PostgreSQL connection string: use postgresql://USER@HOST:PORT/DBNAME"
            ) from None
        return value

    @field_validator("table")
    @classmethod
    def _one_or_two_parts(cls, value: str) -> str:
        parts = value.split(".")
        if len(parts) > 2 or not all(parts):
            raise ValueError("must be TABLE or SCHEMA.TABLE")
        return value

    @property
    def table_ident(self) -> sql.Identifier:
        return sql.Identifier(*self.table.split("."))

    @property
    def function_ident(self) -> sql.Identifier:
        """The trigger function, beside the table in its schema."""
        *schema, name = self.table.split(".")
        return sql.Identifier(*schema, f"{name}_append_only")


class AuditEntry(BaseModel):
    """One action of one run, as the trail holds it. `at` is when the run finished (UTC);
    decision is approved | rejected | timed_out when a human was asked, else None."""

    at: datetime
    runbook: str
    inventory: str
    target: str
    kind: str
    description: str
    destructive: bool
    status: ActionStatus
    detail: str = ""
    decision: str | None = None
    approver: str | None = None
    comment: str = ""
    dry_run: bool
    flow_run_id: str | None = None


COLUMNS = (
    "at",
    "runbook",
    "inventory",
    "target",
    "kind",
    "description",
    "destructive",
    "status",
    "detail",
    "decision",
    "approver",
    "comment",
    "dry_run",
    "flow_run_id",
)


def entries(report: Report, inventory: str) -> list[AuditEntry]:
    """The trail of one report (pure): one entry per action that is not `planned`, in the
    report's order. inventory is the section of the targets (postgres, redis, services...)."""
    approval = report.approval
    return [
        AuditEntry(
            at=report.finished_at,
            runbook=report.runbook,
            inventory=inventory,
            target=action.target,
            kind=action.kind,
            description=action.description,
            destructive=action.destructive,
            status=action.status,
            detail=action.detail,
            decision=approval.decision.value if approval else None,
            approver=approval.approver if approval else None,
            comment=approval.comment if approval else "",
            dry_run=report.dry_run,
            flow_run_id=report.flow_run_id,
        )
        for action in report.actions
        if action.status in RECORDED
    ]


def record(report: Report, *, inventory: str, settings: AuditSettings | None) -> list[str]:
    """The audit trail of one finished run: one Prefect event per recorded action (module
    docstring), and one row each in the table when settings is set.

    Returns the problems met, as messages with no secret (the DSN appears as host:port/db
    user=...), for the caller to log: no Prefect API to emit to, the audit database
    unreachable or refusing, the table missing. Never raises for those: the run's outcome
    stands whatever becomes of its trail. Connecting and each statement are bounded by
    settings.timeout_seconds (connect_timeout, statement_timeout)."""
    trail = entries(report, inventory)
    if not trail:
        return []
    problems = _emit(trail)
    if settings is not None:
        problem = _insert(trail, settings)
        if problem:
            problems.append(problem)
    return problems


def _emit(trail: list[AuditEntry]) -> list[str]:
    from prefect.events import emit_event
    from prefect.exceptions import EventTooLarge

    problems = []
    for entry in trail:
        payload = entry.model_dump(mode="json", exclude={"at", "inventory", "flow_run_id"})
        related = (
            [
                {
                    "prefect.resource.id": f"prefect.flow-run.{entry.flow_run_id}",
                    "prefect.resource.role": "flow-run",
                }
            ]
            if entry.flow_run_id
            else None
        )
        try:
            event = emit_event(
                f"{EVENT_PREFIX}{entry.status.value}",
                resource=target_resource(entry.inventory, entry.target),
                occurred=entry.at,
                related=related,
                payload=payload,
            )
        except EventTooLarge:
            problems.append(
                f"audit event of {entry.kind} on {entry.target} not emitted: over Prefect's "
                "event size limit"
            )
            continue
        if event is None:
            problems.append(
                f"audit event of {entry.kind} on {entry.target} not emitted: no Prefect API "
                "to send events to"
            )
    return problems


def target_resource(inventory: str, target: str) -> dict[str, str]:
    """The Prefect resource of one inventory target: id runbook.target.<inventory>.<target>."""
    return {
        "prefect.resource.id": f"{RESOURCE_PREFIX}{inventory}.{target}",
        "prefect.resource.name": target,
        "runbook.inventory": inventory,
        "runbook.target": target,
    }


def _connect(settings: AuditSettings) -> psycopg.Connection[Any]:
    timeout = settings.timeout_seconds
    conn = psycopg.connect(
        settings.dsn.get_secret_value(), connect_timeout=max(1, round(timeout)), autocommit=True
    )
    # A session setting, not the DSN's `options`: those may carry the user's own.
    conn.execute(sql.SQL("SET statement_timeout = {}").format(sql.Literal(int(timeout * 1000))))
    return conn


def _where(settings: AuditSettings) -> str:
    from tasks.settings import describe_dsn

    return f"audit table {settings.table} on {describe_dsn(settings.dsn)}"


def _no_secret(exc: BaseException, settings: AuditSettings) -> str:
    """The first line of a psycopg error, with the DSN's password blanked should it appear."""
    text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    password = psycopg.conninfo.conninfo_to_dict(settings.dsn.get_secret_value()).get("password")
    if password:
        text = text.replace(str(password), "********")
    return text


def _not_connected(exc: psycopg.OperationalError, settings: AuditSettings) -> TargetError:
    """AuthenticationFailed when the server refused the login, else TargetUnreachable."""
    from tasks.postgres import credentials_refused  # tasks.postgres imports tasks.settings

    message = f"{_where(settings)}: cannot connect: {_no_secret(exc, settings)}"
    if credentials_refused(exc):
        return AuthenticationFailed(f"{message}; check the credentials in [audit] dsn")
    return TargetUnreachable(message, transient=True)


def _row(entry: AuditEntry) -> tuple[Any, ...]:
    values = entry.model_dump(mode="python")
    values["status"] = entry.status.value
    return tuple(values[c] for c in COLUMNS)


def _insert(trail: list[AuditEntry], settings: AuditSettings) -> str | None:
    statement = sql.SQL("INSERT INTO {} ({}) VALUES ({})").format(
        settings.table_ident,
        sql.SQL(", ").join(map(sql.Identifier, COLUMNS)),
        sql.SQL(", ").join(sql.Placeholder() * len(COLUMNS)),
    )
    rows = [_row(entry) for entry in trail]
    try:
        with _connect(settings) as conn, conn.transaction(), conn.cursor() as cur:
            cur.executemany(statement, rows)
    except psycopg.errors.UndefinedTable:
        return (
            f"{_where(settings)} does not exist: {len(rows)} rows not recorded; create it "
            "with `runbook audit --init` as its owner (README, Audit)"
        )
    except psycopg.errors.InsufficientPrivilege as exc:
        return (
            f"{_where(settings)}: {len(rows)} rows not recorded: {_no_secret(exc, settings)}; "
            "GRANT INSERT, SELECT on it to the role in [audit] dsn (README, Audit)"
        )
    except psycopg.Error as exc:
        return f"{_where(settings)}: {len(rows)} rows not recorded: {_no_secret(exc, settings)}"
    return None


def init_table(settings: AuditSettings, *, grant_to: str | None = None) -> None:
    """Create the trail table, its trigger function and its append-only trigger when missing
    (idempotent), as the role in settings.dsn, which becomes their owner; with grant_to, grant
    that role INSERT and SELECT on it (and USAGE on its schema). Identity values come from
    the column's own sequence, which needs no grant of its own (PostgreSQL, CREATE TABLE:
    GENERATED ALWAYS AS IDENTITY). Raises TargetUnreachable when the server does not answer,
    AuthenticationFailed when it refuses the login, TargetError when it refuses the
    statements (e.g. no CREATE on the schema)."""
    table, function = settings.table_ident, settings.function_ident
    statements = [
        sql.SQL(
            "CREATE TABLE IF NOT EXISTS {} ("
            " id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,"
            " recorded_at timestamptz NOT NULL DEFAULT now(),"
            " at timestamptz NOT NULL,"
            " runbook text NOT NULL,"
            " inventory text NOT NULL,"
            " target text NOT NULL,"
            " kind text NOT NULL,"
            " description text NOT NULL,"
            " destructive boolean NOT NULL,"
            " status text NOT NULL CHECK (status IN ('done', 'skipped', 'failed')),"
            " detail text NOT NULL DEFAULT '',"
            " decision text,"
            " approver text,"
            " comment text NOT NULL DEFAULT '',"
            " dry_run boolean NOT NULL,"
            " flow_run_id text)"
        ).format(table),
        sql.SQL("CREATE INDEX IF NOT EXISTS {} ON {} (at DESC, target)").format(
            sql.Identifier(f"{settings.table.split('.')[-1]}_at_target"), table
        ),
        sql.SQL(
            "CREATE OR REPLACE FUNCTION {}() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN"
            " RAISE EXCEPTION 'the audit trail is append-only: % refused on %',"
            " TG_OP, TG_TABLE_NAME USING ERRCODE = 'prohibited_sql_statement_attempted';"
            " END $$"
        ).format(function),
        # Dropped and made again in the same transaction (CREATE OR REPLACE TRIGGER needs
        # PostgreSQL 14). Statement-level: it fires even when no row matches, and TRUNCATE
        # has no rows.
        sql.SQL("DROP TRIGGER IF EXISTS append_only ON {}").format(table),
        sql.SQL(
            "CREATE TRIGGER append_only BEFORE UPDATE OR DELETE OR TRUNCATE ON {}"
            " FOR EACH STATEMENT EXECUTE FUNCTION {}()"
        ).format(table, function),
    ]
    if grant_to:
        role = sql.Identifier(grant_to)
        *schema, _ = settings.table.split(".")
        statements += [
            sql.SQL("GRANT USAGE ON SCHEMA {} TO {}").format(
                sql.Identifier(schema[0]) if schema else sql.SQL("public"), role
            ),
            sql.SQL("GRANT INSERT, SELECT ON {} TO {}").format(table, role),
        ]
    try:
        with _connect(settings) as conn, conn.transaction():
            for statement in statements:
                conn.execute(statement)
    except psycopg.OperationalError as exc:
        raise _not_connected(exc, settings) from None
    except psycopg.Error as exc:
        raise TargetError(
            f"{_where(settings)}: could not be created: {_no_secret(exc, settings)}; run "
            "`runbook audit --init` with an [audit] dsn (e.g. RUNBOOK_AUDIT__DSN) of a role "
            "that may create it, such as the database's owner"
        ) from None


def read_trail(
    since: datetime,
    target: str | None,
    settings: AuditSettings | None,
    *,
    limit: int = 1000,
) -> list[AuditEntry]:
    """The trail since `since` (timezone-aware), of one target name or all, newest first, at
    most `limit` entries: from the table when settings is set, else from Prefect's events
    (event prefix runbook.action., through the client's events filter API; Prefect keeps
    events for its retention period, PREFECT_SERVER_EVENTS_RETENTION_PERIOD, 7 days by default).

    Raises TargetUnreachable when the audit database or the Prefect API does not answer,
    AuthenticationFailed when the database refuses the login, TargetError when it refuses
    the query (the table missing: run `runbook audit --init`)."""
    if since.tzinfo is None:
        raise ConfigError(f"since={since.isoformat()} has no time zone: pass a UTC time")
    if settings is None:
        return _read_events(since, target, limit)
    query = sql.SQL(
        "SELECT {} FROM {} WHERE at >= %s AND (%s::text IS NULL OR target = %s)"
        " ORDER BY at DESC, id DESC LIMIT %s"
    ).format(sql.SQL(", ").join(map(sql.Identifier, COLUMNS)), settings.table_ident)
    try:
        with _connect(settings) as conn, conn.cursor() as cur:
            rows = cur.execute(query, (since, target, target, limit)).fetchall()
    except psycopg.errors.UndefinedTable:
        raise TargetError(
            f"{_where(settings)} does not exist: create it with `runbook audit --init` as its "
            "owner (README, Audit)"
        ) from None
    except psycopg.OperationalError as exc:
        raise _not_connected(exc, settings) from None
    except psycopg.Error as exc:
        raise TargetError(f"{_where(settings)}: {_no_secret(exc, settings)}") from None
    return [AuditEntry.model_validate(dict(zip(COLUMNS, row, strict=True))) for row in rows]


def _read_events(since: datetime, target: str | None, limit: int) -> list[AuditEntry]:
    from prefect.client.orchestration import get_client
    from prefect.events.filters import (
        EventFilter,
        EventNameFilter,
        EventOccurredFilter,
        EventOrder,
        EventResourceFilter,
    )
    from prefect.events.schemas.events import ResourceSpecification

    event_filter = EventFilter(
        occurred=EventOccurredFilter(since=since),
        event=EventNameFilter(prefix=[EVENT_PREFIX]),
        resource=EventResourceFilter(
            id_prefix=[RESOURCE_PREFIX],
            labels=ResourceSpecification({"runbook.target": target}) if target else None,
        ),
        order=EventOrder.DESC,
    )
    found: list[AuditEntry] = []
    try:
        with get_client(sync_client=True) as client:
            page = client.read_events(filter=event_filter, limit=min(limit, EVENTS_PAGE))
            while True:
                found += [_from_event(e) for e in page.events]
                if len(found) >= limit or page.next_page is None:
                    break
                page = client.read_events_page(str(page.next_page))
    except Exception as exc:
        import httpx

        if isinstance(exc, httpx.TransportError):
            raise TargetUnreachable(
                f"the Prefect API could not be read: {type(exc).__name__}: {exc}", transient=True
            ) from None
        if isinstance(exc, httpx.HTTPStatusError):
            raise TargetError(
                f"the Prefect API refused to list events: HTTP {exc.response.status_code}"
            ) from None
        raise
    return found[:limit]


def _from_event(event: ReceivedEvent) -> AuditEntry:
    flow_run = next(
        (
            r.id.removeprefix("prefect.flow-run.")
            for r in event.related
            if r.role == "flow-run" and r.id.startswith("prefect.flow-run.")
        ),
        None,
    )
    return AuditEntry.model_validate(
        {
            **event.payload,
            "at": event.occurred,
            "inventory": event.resource.get("runbook.inventory", ""),
            "target": event.payload.get("target") or event.resource.get("runbook.target", ""),
            "flow_run_id": flow_run,
        }
    )
