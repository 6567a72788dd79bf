"""Migration tables in PostgreSQL (Prisma's `_prisma_migrations`, golang-migrate's
`schema_migrations`): read them, look up what a failed migration's file creates, and write
what `prisma migrate resolve` and `migrate force` write. One task per verb."""

from __future__ import annotations

import hashlib
import re
import uuid
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from tasks.engine import io_task
from tasks.errors import ActionFailed, ConfigError
from tasks.migration_rules import (
    TABLES,
    TOOLS,
    FailedMigration,
    ForceVersion,
    MigrationTable,
    PrismaResolve,
    SchemaObject,
    Tool,
    created_objects,
    previous_version,
)
from tasks.postgres import connect
from tasks.settings import PostgresTarget

_GOLANG_UP = re.compile(r"^(\d+)_.*\.up\.sql$")
MAX_FILE_BYTES = 10 * 2**20


def _table_id(target: PostgresTarget, tool: Tool) -> sql.Identifier:
    return sql.Identifier(target.migrations_schema, TABLES[tool])


def _migrations_dir(name: str, target: PostgresTarget) -> Path | None:
    if target.migrations_dir is None:
        return None
    folder = Path(target.migrations_dir)
    if not folder.is_dir():
        raise ConfigError(
            f"postgres.{name}.migrations_dir: {folder} is not a directory; point it at the "
            "migration files (prisma/migrations, or golang-migrate's folder of *.up.sql)"
        )
    return folder


def _read_script(path: Path) -> str:
    if path.stat().st_size > MAX_FILE_BYTES:
        raise ConfigError(f"{path}: over {MAX_FILE_BYTES} bytes, not read as a migration")
    return path.read_text(encoding="utf-8", errors="replace")


def _golang_files(folder: Path) -> dict[int, Path]:
    files: dict[int, Path] = {}
    for path in folder.iterdir():
        if m := _GOLANG_UP.match(path.name):
            files[int(m.group(1))] = path
    return files


def _look_up(
    conn: psycopg.Connection[dict[str, Any]], schema: str, objects: list[SchemaObject]
) -> list[SchemaObject]:
    """Each object with `exists` set; an unqualified name is looked up in `schema`."""
    checked = []
    args: dict[str, str]
    for o in objects:
        table = sql.Identifier(o.schema_name or schema, o.table).as_string(conn)
        if o.kind == "table":
            query, args = "SELECT to_regclass(%(t)s) IS NOT NULL AS e", {"t": table}
        elif o.kind == "index":
            index = sql.Identifier(o.schema_name or schema, o.name or "").as_string(conn)
            query, args = "SELECT to_regclass(%(t)s) IS NOT NULL AS e", {"t": index}
        elif o.kind == "column":
            query = (
                "SELECT EXISTS (SELECT FROM pg_attribute WHERE attrelid = to_regclass(%(t)s) "
                "AND attname = %(n)s AND attnum > 0 AND NOT attisdropped) AS e"
            )
            args = {"t": table, "n": o.name or ""}
        else:
            query = (
                "SELECT EXISTS (SELECT FROM pg_constraint WHERE conrelid = to_regclass(%(t)s) "
                "AND conname = %(n)s) AS e"
            )
            args = {"t": table, "n": o.name or ""}
        row = conn.execute(query, args).fetchone()
        checked.append(o.model_copy(update={"exists": bool(row and row["e"])}))
    return checked


def _read_prisma(
    conn: psycopg.Connection[dict[str, Any]], target: PostgresTarget, folder: Path | None
) -> MigrationTable:
    table = _table_id(target, "prisma")
    label = f"{target.migrations_schema}._prisma_migrations"
    applied = conn.execute(
        sql.SQL("SELECT count(*) AS n FROM {} WHERE finished_at IS NOT NULL").format(table)
    ).fetchone()
    rows = conn.execute(
        sql.SQL(
            "SELECT id, checksum, migration_name, logs, started_at FROM {} "
            "WHERE finished_at IS NULL AND rolled_back_at IS NULL ORDER BY started_at"
        ).format(table)
    ).fetchall()
    failed = []
    for r in rows:
        file = folder / r["migration_name"] / "migration.sql" if folder else None
        objects, checksum = None, r["checksum"]
        if file is not None and file.is_file():
            objects = _look_up(conn, target.migrations_schema, created_objects(_read_script(file)))
            checksum = hashlib.sha256(file.read_bytes()).hexdigest()
        failed.append(
            FailedMigration(
                tool="prisma",
                name=r["migration_name"],
                id=r["id"],
                checksum=checksum,
                logs=r["logs"],
                started_at=r["started_at"],
                file=str(file) if objects is not None else None,
                objects=objects,
            )
        )
    return MigrationTable(
        tool="prisma",
        table=label,
        present=True,
        applied=applied["n"] if applied else 0,
        failed=failed,
    )


def _read_golang(
    conn: psycopg.Connection[dict[str, Any]], target: PostgresTarget, folder: Path | None
) -> MigrationTable:
    label = f"{target.migrations_schema}.schema_migrations"
    rows = conn.execute(
        sql.SQL("SELECT version, dirty FROM {} ORDER BY version").format(
            _table_id(target, "golang-migrate")
        )
    ).fetchall()
    failed = []
    files = _golang_files(folder) if folder else {}
    for r in rows:
        if not r["dirty"]:
            continue
        version = int(r["version"])
        file = files.get(version)
        objects = None
        if file is not None:
            objects = _look_up(conn, target.migrations_schema, created_objects(_read_script(file)))
        failed.append(
            FailedMigration(
                tool="golang-migrate",
                name=str(version),
                version=version,
                file=str(file) if file else None,
                objects=objects,
                previous_version=previous_version(list(files), version) if files else None,
            )
        )
    return MigrationTable(
        tool="golang-migrate", table=label, present=True, applied=len(rows), failed=failed
    )


@io_task("read-migrations", timeout_seconds=60)
def read_migrations(name: str, target: PostgresTarget) -> list[MigrationTable]:
    """The target's migration tables (its `migrations` tool, or both when unset) in
    `migrations_schema`: each one's failed (Prisma) or dirty (golang-migrate) migrations, and,
    when `migrations_dir` holds a failed migration's file, what it creates and whether each
    of those objects exists.

    Args:
        name: the [postgres.NAME] target's name, for messages.
        target: its inventory entry.

    Returns:
        One MigrationTable per tool looked at, `present` False when its table is absent.

    Raises:
        ConfigError: `migrations_schema` does not exist, `migrations` names a tool whose
            table is not in it, or `migrations_dir` is not a directory.
        AuthenticationFailed: the server refused the login (password, role, database).
        TargetUnreachable: no connection, or it was lost (transient: retried).
        TargetError: any other error the server answered with."""
    folder = _migrations_dir(name, target)
    tools: tuple[Tool, ...] = (target.migrations,) if target.migrations else TOOLS
    found: list[MigrationTable] = []
    with connect(name, target) as conn:
        schema = conn.execute(
            "SELECT to_regnamespace(%(s)s) IS NOT NULL AS e",
            {"s": sql.Identifier(target.migrations_schema).as_string(conn)},
        ).fetchone()
        if not (schema and schema["e"]):
            raise ConfigError(
                f"postgres.{name}.migrations_schema = {target.migrations_schema!r}: no such "
                "schema in the target database; name the schema the migration table is in "
                '(names are case-sensitive; Prisma and golang-migrate default to "public")'
            )
        for tool in tools:
            label = f"{target.migrations_schema}.{TABLES[tool]}"
            row = conn.execute(
                "SELECT to_regclass(%(t)s) IS NOT NULL AS e",
                {"t": _table_id(target, tool).as_string(conn)},
            ).fetchone()
            if not (row and row["e"]):
                if target.migrations:
                    raise ConfigError(
                        f'postgres.{name}.migrations = "{tool}", but {label} does not exist; '
                        "set migrations_schema to the schema the table is in, or migrations "
                        "to the tool in use"
                    )
                found.append(MigrationTable(tool=tool, table=label, present=False))
                continue
            read = _read_prisma if tool == "prisma" else _read_golang
            found.append(read(conn, target, folder))
    return found


@io_task("resolve-prisma-migration", timeout_seconds=60)
def resolve_prisma_migration(name: str, target: PostgresTarget, args: PrismaResolve) -> str:
    """What `prisma migrate resolve` writes, in one transaction, only while the row is still
    failed (idempotent): --rolled-back sets its rolled_back_at to now(); --applied does that
    and inserts a finished row of the same name and checksum (started_at = finished_at =
    now(), applied_steps_count 0), which `migrate deploy` then counts as applied.

    Args:
        name: the [postgres.NAME] target's name, for messages.
        target: its inventory entry.
        args: the failed row's id, name and checksum, and resolve_as.

    Returns:
        What was written, for the report.

    Raises:
        ActionFailed: the row is no longer a failed migration (resolved meanwhile).
        AuthenticationFailed, TargetUnreachable, TargetError: as connect."""
    table = _table_id(target, "prisma")
    with connect(name, target, autocommit=False) as conn:
        marked = conn.execute(
            sql.SQL(
                "UPDATE {} SET rolled_back_at = now() WHERE id = %(id)s "
                "AND finished_at IS NULL AND rolled_back_at IS NULL RETURNING id"
            ).format(table),
            {"id": args.id},
        ).fetchall()
        if not marked:
            raise ActionFailed(
                f"postgres target {name!r}: migration {args.migration_name!r} (id {args.id}) "
                "is no longer a failed migration; run failed-migration again to see its state"
            )
        if args.resolve_as == "applied":
            conn.execute(
                sql.SQL(
                    "INSERT INTO {} (id, checksum, started_at, finished_at, migration_name, "
                    "applied_steps_count) VALUES (%(id)s, %(checksum)s, now(), now(), "
                    "%(name)s, 0)"
                ).format(table),
                {"id": str(uuid.uuid4()), "checksum": args.checksum, "name": args.migration_name},
            )
    return f"{args.migration_name} marked {args.resolve_as}"


@io_task("force-migration-version", timeout_seconds=60)
def force_migration_version(name: str, target: PostgresTarget, args: ForceVersion) -> str:
    """What `migrate force V` writes (golang-migrate's SetVersion(V, dirty=false)): in one
    transaction, TRUNCATE schema_migrations and, for V of 0 or more, INSERT (V, false); only
    while the table is still dirty at the version planned (the rows are locked first).

    Args:
        name: the [postgres.NAME] target's name, for messages.
        target: its inventory entry.
        args: the dirty version seen and the version to record (-1: none).

    Returns:
        What was written, for the report.

    Raises:
        ActionFailed: the table is no longer dirty at that version.
        AuthenticationFailed, TargetUnreachable, TargetError: as connect."""
    table = _table_id(target, "golang-migrate")
    with connect(name, target, autocommit=False) as conn:
        conn.execute(sql.SQL("LOCK TABLE {} IN ACCESS EXCLUSIVE MODE").format(table))
        rows = conn.execute(sql.SQL("SELECT version, dirty FROM {}").format(table)).fetchall()
        if not any(r["dirty"] and r["version"] == args.dirty_version for r in rows):
            raise ActionFailed(
                f"postgres target {name!r}: schema_migrations is no longer dirty at version "
                f"{args.dirty_version} (now: {[(r['version'], r['dirty']) for r in rows]}); "
                "run failed-migration again to see its state"
            )
        conn.execute(sql.SQL("TRUNCATE {}").format(table))
        if args.version >= 0:
            conn.execute(
                sql.SQL("INSERT INTO {} (version, dirty) VALUES (%(v)s, false)").format(table),
                {"v": args.version},
            )
    recorded = f"version {args.version}" if args.version >= 0 else "no version"
    return f"schema_migrations now at {recorded}, not dirty (was {args.dirty_version}, dirty)"
