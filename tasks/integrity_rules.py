"""Pure decisions for data-integrity (seed 003 "Data Corruption" and "Login Problems"): the
order relations are cleaned in, findings from the counts read, actions from the counts.
No I/O here: everything is testable without a server.

An orphan is a row whose reference names no row of its parent table, or names a row that is
itself an orphan (at any level of the configured relations): once an orphan goes, its
children are orphans too, so they are counted and deleted with it, deepest level first."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from tasks.models import Action, ActionStatus, Finding, Params, Severity
from tasks.postgres_rules import listing, quote_ident

if TYPE_CHECKING:
    from tasks.settings import IntegritySet, Relation

# The kinds of action data-integrity plans (the flow and deployments.catalog read them here).
IntegrityAction = Literal["delete_orphans", "delete_expired_sessions"]


class IntegrityParams(Params):
    max_rows_deleted: int = Field(
        1000,
        ge=0,
        le=1_000_000,
        description="most orphan rows deleted per run, all relations together; 0 to 1000000",
    )
    max_sessions_deleted: int = Field(
        10_000,
        ge=0,
        le=10_000_000,
        description="most expired sessions deleted per run; 0 to 10000000",
    )
    batch_size: int = Field(
        500, ge=1, le=50_000, description="rows per DELETE, each its own transaction; 1 to 50000"
    )
    sample_size: int = Field(
        10, ge=1, le=100, description="ids of orphans shown per relation; 1 to 100"
    )


class OrphanRef(BaseModel):
    """The orphans of one relation to delete: its index in [integrity.NAME.relations] and the
    most rows to delete (what the cap left it when planned)."""

    model_config = ConfigDict(frozen=True)

    relation: int
    limit: int


class SessionsRef(BaseModel):
    """Expired sessions to delete: at most `limit` rows."""

    model_config = ConfigDict(frozen=True)

    limit: int


class Orphans(BaseModel):
    """One relation's orphans as read: their number and the first ids (child_id_column)."""

    relation: int
    count: int
    sample: list[Any]


class LiveRows(BaseModel):
    """pg_stat_user_tables.n_live_tup of one configured table (an estimate)."""

    table: str
    live_rows: int


class IntegrityState(BaseModel):
    """What one diagnosis read: orphans per relation (in the configured order), the expired
    sessions (None: no sessions table configured) and live rows per configured table."""

    orphans: list[Orphans]
    expired_sessions: int | None
    live_rows: list[LiveRows]


def table_label(parts: tuple[str, ...]) -> str:
    """A table as SQL would name it, quoted where needed: public."Category"."""
    return ".".join(quote_ident(p) for p in parts)


def depths(relations: list[Relation]) -> dict[tuple[str, ...], int]:
    """Each table's level: 0 for a table that is no child, else one more than its deepest
    parent (Menu 0, Category 1, Item 2). The relations are acyclic (settings check it)."""
    parents: dict[tuple[str, ...], list[tuple[str, ...]]] = {}
    for r in relations:
        parents.setdefault(r.child_parts, []).append(r.parent_parts)
        parents.setdefault(r.parent_parts, [])
    found: dict[tuple[str, ...], int] = {}

    def depth(table: tuple[str, ...]) -> int:
        if table not in found:
            found[table] = 1 + max((depth(p) for p in parents[table]), default=-1)
        return found[table]

    for table in parents:
        depth(table)
    return found


def deletion_order(relations: list[Relation]) -> list[int]:
    """The relations' indices, deepest child table first (configured order among equals):
    Item's orphans go before Category's, so deleting never leaves a child behind that a
    later step would have to come back for."""
    level = depths(relations)
    return sorted(range(len(relations)), key=lambda i: -level[relations[i].child_parts])


def describe_relation(r: Relation) -> str:
    child, parent = table_label(r.child_parts), table_label(r.parent_parts)
    return f"{child}.{quote_ident(r.child_column)} -> {parent}.{quote_ident(r.parent_column)}"


def integrity_findings(
    name: str, cfg: IntegritySet, state: IntegrityState, p: IntegrityParams
) -> list[Finding]:
    """One finding per relation (orphans: observed their count, threshold 0), one for the
    expired sessions when a sessions table is configured, and the live rows per table (ok)."""
    findings = []
    for o in state.orphans:
        r = cfg.relations[o.relation]
        what = describe_relation(r)
        findings.append(
            Finding(
                check="orphans",
                target=name,
                severity=Severity.warning if o.count else Severity.ok,
                observed=o.count,
                threshold=0,
                message=(
                    f"{o.count} orphan rows of {what} (no parent row, or a parent that is "
                    f"itself an orphan): {quote_ident(r.child_id_column)} {listing(o.sample)}"
                    + (f" (first {len(o.sample)})" if o.count > len(o.sample) else "")
                )
                if o.count
                else f"no orphan rows of {what}",
            )
        )
    if state.expired_sessions is not None and cfg.sessions is not None:
        n = state.expired_sessions
        where = f"{cfg.sessions.table}.{quote_ident(cfg.sessions.expires_column)}"
        findings.append(
            Finding(
                check="expired_sessions",
                target=name,
                severity=Severity.warning if n else Severity.ok,
                observed=n,
                threshold=0,
                message=f"{n} expired sessions in {where} before now()"
                if n
                else f"no expired session in {where}",
            )
        )
    findings.append(
        Finding(
            check="live_rows",
            target=name,
            severity=Severity.ok,
            observed=[row.model_dump() for row in state.live_rows],
            message="live rows per configured table (pg_stat_user_tables, an estimate): "
            + (", ".join(f"{r.table} {r.live_rows}" for r in state.live_rows) or "none"),
        )
    )
    return findings


def plan_integrity(
    name: str, cfg: IntegritySet, state: IntegrityState, p: IntegrityParams
) -> list[Action[IntegrityAction, OrphanRef] | Action[IntegrityAction, SessionsRef]]:
    """delete_orphans per relation with orphans, deepest level first, sharing
    max_rows_deleted in that order (a relation past the cap is skipped; one cut short says
    so); then delete_expired_sessions, capped by max_sessions_deleted. All destructive."""
    counts = {o.relation: o.count for o in state.orphans}
    actions: list[Action[IntegrityAction, OrphanRef] | Action[IntegrityAction, SessionsRef]] = []
    budget = p.max_rows_deleted
    for i in deletion_order(cfg.relations):
        count = counts.get(i, 0)
        if not count:
            continue
        limit = min(count, budget)
        budget -= limit
        orphans: Action[IntegrityAction, OrphanRef] = Action(
            kind="delete_orphans",
            target=name,
            destructive=True,
            description=f"delete {limit or count} orphan rows of "
            f"{describe_relation(cfg.relations[i])} "
            f"in batches of {p.batch_size}",
            args=OrphanRef(relation=i, limit=limit),
        )
        if not limit:
            orphans.status = ActionStatus.skipped
            orphans.detail = f"over the cap of {p.max_rows_deleted} rows per run (max_rows_deleted)"
        elif limit < count:
            orphans.detail = f"{limit} of {count} only: cap max_rows_deleted"
        actions.append(orphans)
    expired = state.expired_sessions or 0
    if expired and cfg.sessions is not None:
        limit = min(expired, p.max_sessions_deleted)
        sessions: Action[IntegrityAction, SessionsRef] = Action(
            kind="delete_expired_sessions",
            target=name,
            destructive=True,
            description=f"delete {limit} expired sessions from {cfg.sessions.table} in batches "
            f"of {p.batch_size}",
            args=SessionsRef(limit=limit),
        )
        if not limit:
            sessions.status = ActionStatus.skipped
            sessions.detail = "max_sessions_deleted is 0"
        elif limit < expired:
            sessions.detail = f"{limit} of {expired} only: cap max_sessions_deleted"
        actions.append(sessions)
    return actions
