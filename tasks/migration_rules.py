"""Pure decisions for failed-migration (seeds 000 s6, 002 s6, 003 "Deployment Failures", 004
s11 and the dirty migration of 004 s3): what a migration's SQL creates, findings from the
migration tables as read, and the one action that marks the migration resolved. No I/O here.

Prisma keeps `_prisma_migrations` (a row with finished_at and rolled_back_at NULL is a failed
migration, its `logs` the error); golang-migrate keeps `schema_migrations` (one row, `dirty` at
the version it was applying)."""

from __future__ import annotations

import re
from datetime import datetime
from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from tasks.errors import ConfigError
from tasks.models import Action, ActionStatus, Finding, Params, Severity
from tasks.postgres_rules import listing, quote_ident

Tool = Literal["prisma", "golang-migrate"]
TOOLS: tuple[Tool, ...] = ("prisma", "golang-migrate")
TABLES: dict[Tool, str] = {"prisma": "_prisma_migrations", "golang-migrate": "schema_migrations"}
ObjectKind = Literal["table", "column", "index", "constraint"]
LOG_CHARS = 500  # of a failed migration's logs in a message

# The kinds of action failed-migration plans (the flow and deployments.catalog read them here).
MigrationAction = Literal["resolve_prisma_migration", "force_migration_version"]


class MigrationParams(Params):
    run_only: ClassVar[frozenset[str]] = frozenset({"migration", "resolve_as", "force_version"})

    migration: str | None = Field(
        None,
        min_length=1,
        max_length=255,
        description="Prisma: the failed migration's name (migration_name) to resolve; unset: "
        "the only failed one",
    )
    resolve_as: Literal["rolled-back", "applied"] = Field(
        "rolled-back",
        description="Prisma: what `prisma migrate resolve` records: rolled-back (its changes "
        "are not in the database: deploy runs it again) or applied (they all are)",
    )
    force_version: int | None = Field(
        None,
        ge=-1,
        description="golang-migrate: the version `migrate force` records, -1 or more (-1: "
        "no version); unset: the version before the dirty one, only when none of the dirty "
        "migration's objects exist",
    )


class SchemaObject(BaseModel):
    """A table, column, index or constraint a migration creates, and whether it exists now
    (None: not looked up yet)."""

    model_config = ConfigDict(frozen=True)

    kind: ObjectKind
    schema_name: str | None = Field(description="as written in the SQL; None: unqualified")
    table: str
    name: str | None = Field(None, description="column, index or constraint; None for a table")
    exists: bool | None = None

    @property
    def qualified_table(self) -> str:
        parts = [self.schema_name, self.table] if self.schema_name else [self.table]
        return ".".join(quote_ident(p) for p in parts)

    @property
    def label(self) -> str:
        if self.kind == "table":
            return f"table {self.qualified_table}"
        return f"{self.kind} {quote_ident(self.name or '')} on {self.qualified_table}"

    @property
    def undo(self) -> str:
        """The statement that removes it, for a person to review and run."""
        name = quote_ident(self.name or "")
        if self.kind == "table":
            return f"DROP TABLE {self.qualified_table};"
        if self.kind == "column":
            return f"ALTER TABLE {self.qualified_table} DROP COLUMN {name};"
        if self.kind == "constraint":
            return f"ALTER TABLE {self.qualified_table} DROP CONSTRAINT {name};"
        schema = f"{quote_ident(self.schema_name)}." if self.schema_name else ""
        return f"DROP INDEX {schema}{name};"


class FailedMigration(BaseModel):
    """A Prisma migration that failed, or golang-migrate's dirty version."""

    tool: Tool
    name: str = Field(description="Prisma's migration_name; golang-migrate's version as text")
    id: str | None = Field(None, description="Prisma: the row's id")
    checksum: str | None = Field(
        None,
        description="Prisma: the SHA-256 (hex) of its migration.sql when the file is there (what "
        "`migrate resolve --applied` records), else the failed row's",
    )
    version: int | None = Field(None, description="golang-migrate: the dirty version")
    logs: str | None = None
    started_at: datetime | None = None
    file: str | None = Field(None, description="its SQL file, when migrations_dir has it")
    objects: list[SchemaObject] | None = Field(
        None, description="what its SQL creates, each looked up; None: no file to read"
    )
    previous_version: int | None = Field(
        None, description="golang-migrate: the newest version below it among the files"
    )

    @property
    def existing(self) -> list[SchemaObject]:
        return [o for o in self.objects or [] if o.exists]

    @property
    def missing(self) -> list[SchemaObject]:
        return [o for o in self.objects or [] if o.exists is False]


class MigrationTable(BaseModel):
    """One tool's migration table as read: its rows' count and the failed ones."""

    tool: Tool
    table: str = Field(description="schema-qualified, as the tool names it")
    present: bool
    applied: int = 0
    failed: list[FailedMigration] = Field(default_factory=list)


class PrismaResolve(BaseModel):
    model_config = ConfigDict(frozen=True)

    id: str
    migration_name: str
    checksum: str
    resolve_as: Literal["rolled-back", "applied"]


class ForceVersion(BaseModel):
    model_config = ConfigDict(frozen=True)

    dirty_version: int
    version: int = Field(ge=-1)


# --- what a migration's SQL creates ----------------------------------------------------------

_IDENT = r'(?:"(?:[^"]|"")+"|[A-Za-z_][A-Za-z0-9_$]*)'
_QNAME = rf"({_IDENT})(?:\s*\.\s*({_IDENT}))?"
_CREATE_TABLE = re.compile(
    rf"^CREATE\s+(?:(?:GLOBAL\s+|LOCAL\s+)?(?:TEMPORARY|TEMP)\s+|UNLOGGED\s+)?TABLE\s+"
    rf"(?:IF\s+NOT\s+EXISTS\s+)?{_QNAME}",
    re.IGNORECASE,
)
_CREATE_INDEX = re.compile(
    rf"^CREATE\s+(?:UNIQUE\s+)?INDEX\s+(?:CONCURRENTLY\s+)?(?:IF\s+NOT\s+EXISTS\s+)?({_IDENT})"
    rf"\s+ON\s+(?:ONLY\s+)?{_QNAME}",
    re.IGNORECASE,
)
_ALTER_TABLE = re.compile(
    rf"^ALTER\s+TABLE\s+(?:IF\s+EXISTS\s+)?(?:ONLY\s+)?{_QNAME}\s+(.*)$",
    re.IGNORECASE | re.DOTALL,
)
_ADD = re.compile(
    rf"(?:^|,)\s*ADD\s+(?:(COLUMN|CONSTRAINT)\s+)?(?:IF\s+NOT\s+EXISTS\s+)?({_IDENT})",
    re.IGNORECASE,
)
_NOT_A_COLUMN = {"constraint", "primary", "unique", "foreign", "check", "exclude"}
_COMMENTS = re.compile(r"--[^\n]*|/\*.*?\*/", re.DOTALL)


def _ident(token: str) -> str:
    """An identifier as PostgreSQL stores it: quoted kept as written, unquoted folded."""
    if token.startswith('"'):
        return token[1:-1].replace('""', '"')
    return token.lower()


def _table(first: str, second: str | None) -> tuple[str | None, str]:
    return (_ident(first), _ident(second)) if second else (None, _ident(first))


def created_objects(script: str) -> list[SchemaObject]:
    """The tables, columns (ALTER TABLE ... ADD [COLUMN]), indexes and named constraints
    (ADD CONSTRAINT) a migration script creates, in order, without duplicates. Statements
    are split at semicolons once comments are gone; a statement of another form (or a
    semicolon inside a string or a function body) at worst leaves an object unlisted."""
    found: list[SchemaObject] = []
    for raw in _COMMENTS.sub(" ", script).split(";"):
        stmt = " ".join(raw.split())
        if m := _CREATE_TABLE.match(stmt):
            schema, table = _table(m.group(1), m.group(2))
            found.append(SchemaObject(kind="table", schema_name=schema, table=table))
        elif m := _CREATE_INDEX.match(stmt):
            schema, table = _table(m.group(2), m.group(3))
            found.append(
                SchemaObject(kind="index", schema_name=schema, table=table, name=_ident(m.group(1)))
            )
        elif m := _ALTER_TABLE.match(stmt):
            schema, table = _table(m.group(1), m.group(2))
            for add in _ADD.finditer(m.group(3)):
                keyword, token = (add.group(1) or "").lower(), add.group(2)
                if keyword == "constraint":
                    kind: ObjectKind = "constraint"
                elif keyword == "column" or token.lower() not in _NOT_A_COLUMN:
                    kind = "column"
                else:
                    continue
                found.append(
                    SchemaObject(kind=kind, schema_name=schema, table=table, name=_ident(token))
                )
    unique: dict[tuple[str, str | None, str, str | None], SchemaObject] = {}
    for o in found:
        unique.setdefault((o.kind, o.schema_name, o.table, o.name), o)
    return list(unique.values())


def previous_version(versions: list[int], dirty: int) -> int:
    """The version `migrate force` should record to undo a dirty one: the newest file version
    below it, or -1 (no version) when it is the first."""
    below = [v for v in versions if v < dirty]
    return max(below) if below else -1


# --- findings ------------------------------------------------------------------------------


def _what(m: FailedMigration) -> str:
    return (
        f"prisma migration {m.name!r}"
        if m.tool == "prisma"
        else f"golang-migrate version {m.name} (dirty)"
    )


def _partial(m: FailedMigration) -> str:
    if m.objects is None:
        return (
            "no migration file found to tell whether it partially applied (set "
            "migrations_dir to the migration files)"
        )
    if not m.objects:
        return f"its file {m.file} creates no table, column, index or constraint"
    if not m.existing:
        return f"not applied: none of the {len(m.objects)} objects it creates exists"
    if not m.missing:
        return f"all {len(m.objects)} objects it creates exist: " + listing(
            [o.label for o in m.existing]
        )
    return (
        f"partially applied: {len(m.existing)} of {len(m.objects)} objects exist ("
        + listing([o.label for o in m.existing])
        + "); undo by hand before running it again: "
        + " ".join(o.undo for o in reversed(m.existing))
    )


def migration_findings(target_name: str, tables: list[MigrationTable]) -> list[Finding]:
    """One finding per failed or dirty migration (critical), with its error and whether its
    objects exist; one ok finding per tool table without any; one ok finding when no table of
    either tool is there."""
    findings: list[Finding] = []
    for t in tables:
        if not t.present:
            continue
        for m in t.failed:
            error = (m.logs or "").strip()
            error = error[:LOG_CHARS] + ("..." if len(error) > LOG_CHARS else "")
            started = f", started {m.started_at:%Y-%m-%d %H:%M:%S %Z}" if m.started_at else ""
            findings.append(
                Finding(
                    check="failed_migration",
                    target=target_name,
                    severity=Severity.critical,
                    observed=m.name,
                    threshold=None,
                    message=f"{_what(m)} in {t.table} failed{started}"
                    + (f": {error}" if error else "")
                    + f"; {_partial(m)}",
                )
            )
            if m.objects:
                findings.append(
                    Finding(
                        check="migration_objects",
                        target=target_name,
                        severity=Severity.warning if m.existing else Severity.ok,
                        observed={
                            "exists": [o.label for o in m.existing],
                            "missing": [o.label for o in m.missing],
                        },
                        message=f"{_what(m)}: {_partial(m)}",
                    )
                )
        if not t.failed:
            findings.append(
                Finding(
                    check="failed_migration",
                    target=target_name,
                    severity=Severity.ok,
                    observed=0,
                    message=f"no failed or dirty migration in {t.table} ({t.applied} rows)",
                )
            )
    if not any(t.present for t in tables):
        findings.append(
            Finding(
                check="failed_migration",
                target=target_name,
                severity=Severity.ok,
                observed=0,
                message="no migration table: "
                + (
                    f"neither {' nor '.join(t.table for t in tables)} exists"
                    if len(tables) > 1
                    else f"{tables[0].table if tables else 'none'} does not exist"
                ),
            )
        )
    return findings


# --- plan ----------------------------------------------------------------------------------

MigrationStep = Action[MigrationAction, PrismaResolve | ForceVersion]


def _skipped(action: MigrationStep, why: str) -> MigrationStep:
    action.status = ActionStatus.skipped
    action.detail = why
    return action


def _plan_prisma(target_name: str, t: MigrationTable, p: MigrationParams) -> list[MigrationStep]:
    if not t.failed:
        if p.migration is not None:
            raise ConfigError(
                f"failed-migration: migration={p.migration!r}: no failed migration in {t.table}"
            )
        return []
    if p.migration is not None:
        chosen = [m for m in t.failed if m.name == p.migration]
        if not chosen:
            raise ConfigError(
                f"failed-migration: migration={p.migration!r} is not a failed migration of "
                f"{t.table}; failed: {', '.join(m.name for m in t.failed)}"
            )
    elif len(t.failed) > 1:
        chosen = []
    else:
        chosen = t.failed
    if not chosen:
        names = ", ".join(m.name for m in t.failed)
        return [
            _skipped(
                Action(
                    kind="resolve_prisma_migration",
                    target=target_name,
                    destructive=True,
                    description=f"mark a failed migration of {t.table} {p.resolve_as}",
                ),
                f"{len(t.failed)} failed migrations ({names}): choose one with "
                "--set migration=NAME",
            )
        ]
    m = chosen[0]
    assert m.id is not None and m.checksum is not None
    verb = (
        "UPDATE rolled_back_at = now()"
        if p.resolve_as == "rolled-back"
        else "UPDATE rolled_back_at = now() and INSERT a finished row"
    )
    action: MigrationStep = Action(
        kind="resolve_prisma_migration",
        target=target_name,
        destructive=True,
        description=f"prisma migrate resolve --{p.resolve_as} {m.name}: {verb} in {t.table}",
        args=PrismaResolve(
            id=m.id, migration_name=m.name, checksum=m.checksum, resolve_as=p.resolve_as
        ),
    )
    if not m.objects and "resolve_as" not in p.model_fields_set:
        return [
            _skipped(
                action,
                f"refused: {_partial(m)}, so whether it partially applied cannot be shown; "
                "check the schema by hand, then say how to resolve it: --set "
                "resolve_as=rolled-back (it will run again) or resolve_as=applied",
            )
        ]
    if p.resolve_as == "rolled-back" and m.existing:
        return [
            _skipped(
                action,
                "refused: it partially applied ("
                + listing([o.label for o in m.existing])
                + " exist), so running it again would fail; undo them by hand ("
                + " ".join(o.undo for o in reversed(m.existing))
                + "), or, if the migration is complete, resolve_as=applied",
            )
        ]
    if p.resolve_as == "applied" and m.missing:
        return [
            _skipped(
                action,
                "refused: not all of it is in the database ("
                + listing([o.label for o in m.missing])
                + " missing); complete it by hand first, or resolve_as=rolled-back",
            )
        ]
    return [action]


def _plan_golang(target_name: str, t: MigrationTable, p: MigrationParams) -> list[MigrationStep]:
    if not t.failed:
        return []
    m = t.failed[0]
    assert m.version is not None

    def force(version: int) -> MigrationStep:
        return Action(
            kind="force_migration_version",
            target=target_name,
            destructive=True,
            description=f"migrate force {version}: {t.table} at version "
            + (f"{version}, not dirty" if version >= 0 else "none")
            + f" (was {m.version}, dirty)",
            args=ForceVersion(dirty_version=m.version, version=version),
        )

    if p.force_version is not None:
        return [force(p.force_version)]
    fallback = m.previous_version if m.previous_version is not None else m.version - 1
    if not m.objects:
        # No file, or one whose changes cannot be looked up (data changes, drops, renames):
        # nothing shows it did not partly run, and forcing back would run it again.
        return [
            _skipped(
                force(fallback),
                f"refused: {_partial(m)}, so it cannot be shown that version {m.version} did "
                "not partially apply; check the schema by hand, then give --set "
                "force_version=V once it is at version V",
            )
        ]
    if m.existing:
        return [
            _skipped(
                force(fallback),
                f"refused: version {m.version} partially applied ("
                + listing([o.label for o in m.existing])
                + " exist); undo them by hand ("
                + " ".join(o.undo for o in reversed(m.existing))
                + f") and run again, or complete it and --set force_version={m.version}",
            )
        ]
    return [force(fallback)]


def plan_migrations(
    target_name: str, tables: list[MigrationTable], p: MigrationParams
) -> list[MigrationStep]:
    """At most one action per tool: Prisma's resolve of the failed migration (the one named,
    or the only one), golang-migrate's force of the dirty version. Refused (skipped, with the
    reason and what to undo by hand) when the database contradicts what would be recorded."""
    actions: list[MigrationStep] = []
    for t in tables:
        if t.present:
            plan = _plan_prisma if t.tool == "prisma" else _plan_golang
            actions += plan(target_name, t, p)
    if p.migration is not None and not any(t.tool == "prisma" and t.present for t in tables):
        raise ConfigError(
            f"failed-migration: migration={p.migration!r} names a Prisma migration, but the "
            "target has no _prisma_migrations table"
        )
    return actions
