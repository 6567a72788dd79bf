"""security-incident's tasks: the application's sessions and audit log in PostgreSQL, and its
JWT signing key in a Prefect Secret block. One verb on one target each.

Key material never leaves this module's functions: not in a return value, a log line, an
exception message or an action's detail. A key is named by its fingerprint only."""

from __future__ import annotations

import hashlib
from datetime import datetime
from typing import Any, Literal, cast

import cryptography.exceptions
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from prefect.blocks.system import Secret
from psycopg import sql

from tasks.engine import io_task
from tasks.errors import ActionFailed, ConfigError, TargetError
from tasks.postgres import TimeColumn, _configured_table, connect
from tasks.security_rules import AUDIT_WINDOW_HOURS, KeyState
from tasks.settings import PostgresTarget, SecurityTarget

RSA_BITS = 2048
RSA_EXPONENT = 65537


# --- sessions ---------------------------------------------------------------------------------


def _sessions_errors(name: str, target: SecurityTarget) -> Any:
    s = target.sessions
    return _configured_table(
        f"security.{name}.sessions",
        f"table {s.table!r}, columns {s.user_column!r}, {s.revoked_column!r}",
    )


@io_task("count-live-sessions", timeout_seconds=60)
def count_live_sessions(
    pg_name: str, pg: PostgresTarget, name: str, target: SecurityTarget, users: list[str]
) -> dict[str, int]:
    """The live sessions (revoked column NULL) of each named user.

    Args:
        pg_name: the [postgres.NAME] holding the sessions table, for messages.
        pg: its inventory entry.
        name: the [security.NAME] target, for messages.
        target: its inventory entry (sessions table and columns).
        users: user ids, compared as text with the user column; empty: none counted.

    Returns:
        {user id: live sessions} for the users that have any.

    Raises:
        ConfigError: the table or a column does not exist as configured.
        AuthenticationFailed, TargetUnreachable, TargetError: as tasks.postgres.connect."""
    if not users:
        return {}
    s = target.sessions
    query = sql.SQL(
        "SELECT {user}::text AS user_id, count(*) AS n FROM {table} "
        "WHERE {user}::text = ANY(%(users)s) AND {revoked} IS NULL GROUP BY 1"
    ).format(
        user=sql.Identifier(s.user_column),
        table=sql.Identifier(*s.table_parts),
        revoked=sql.Identifier(s.revoked_column),
    )
    with connect(pg_name, pg) as conn, _sessions_errors(name, target):
        rows = conn.execute(query, {"users": users}).fetchall()
    return {str(r["user_id"]): int(r["n"]) for r in rows}


@io_task("revoke-sessions", timeout_seconds=120)
def revoke_sessions(
    pg_name: str, pg: PostgresTarget, name: str, target: SecurityTarget, users: tuple[str, ...]
) -> str:
    """`UPDATE sessions SET revoked = now() WHERE user = ANY(users) AND revoked IS NULL` (seed
    004 s12), in one transaction. For a timestamp (without time zone) column, now() is written
    as the wall-clock time of the table's time_zone. Idempotent: revoked sessions stay as
    they are.

    Args:
        pg_name: the [postgres.NAME] holding the sessions table, for messages.
        pg: its inventory entry.
        name: the [security.NAME] target, for messages.
        target: its inventory entry (sessions table and columns).
        users: user ids, compared as text with the user column.

    Returns:
        "revoked N sessions", for the action's detail.

    Raises:
        ConfigError: the table or a column does not exist as configured, or the revoked
            column is not a timestamp.
        AuthenticationFailed, TargetUnreachable, TargetError: as tasks.postgres.connect (a
            standby refuses writes)."""
    s = target.sessions
    with connect(pg_name, pg, autocommit=False) as conn, _sessions_errors(name, target):
        revoked = TimeColumn.read(conn, s, s.revoked_column)
        moment = sql.SQL("now()" if revoked.with_zone else "now() AT TIME ZONE %(time_zone)s")
        query = sql.SQL(
            "UPDATE {table} SET {revoked} = {moment} "
            "WHERE {user}::text = ANY(%(users)s) AND {revoked} IS NULL"
        ).format(
            table=sql.Identifier(*s.table_parts),
            revoked=sql.Identifier(s.revoked_column),
            moment=moment,
            user=sql.Identifier(s.user_column),
        )
        cur = conn.execute(query, {"users": list(users), "time_zone": s.time_zone})
        return f"revoked {cur.rowcount} sessions"


# --- audit log --------------------------------------------------------------------------------


@io_task("read-audit-log", timeout_seconds=60)
def read_audit_log(
    pg_name: str, pg: PostgresTarget, name: str, target: SecurityTarget, limit: int
) -> tuple[int, list[dict[str, Any]]]:
    """The audit log of the last 24 hours (seed 004 s12: `WHERE createdat > NOW() - INTERVAL
    '24 hours' ORDER BY createdat DESC LIMIT 100`).

    Args:
        pg_name: the [postgres.NAME] holding the audit table, for messages.
        pg: its inventory entry.
        name: the [security.NAME] target, for messages.
        target: its inventory entry (audit_log set).
        limit: how many of the newest rows to return; 0: only the count.

    Returns:
        (rows in the window, the newest `limit` rows with every value as text).

    Raises:
        ConfigError: the table or its time column does not exist, or is not a timestamp.
        AuthenticationFailed, TargetUnreachable, TargetError: as tasks.postgres.connect."""
    table = target.audit_log
    if table is None:
        raise ConfigError(
            f"security.{name}: no audit_log configured; add [security.{name}.audit_log]"
        )
    args = {"hours": AUDIT_WINDOW_HOURS, "time_zone": table.time_zone, "limit": limit}
    described = f"table {table.table!r}, column {table.time_column!r}"
    with connect(pg_name, pg) as conn, _configured_table(f"security.{name}.audit_log", described):
        column = TimeColumn.read(conn, table, table.time_column)
        window = column.compared(">", "now() - make_interval(hours => %(hours)s)")
        ident = sql.Identifier(*table.table_parts)
        count = conn.execute(
            sql.SQL("SELECT count(*) AS n FROM {} WHERE {}").format(ident, window), args
        ).fetchone()
        rows = conn.execute(
            sql.SQL("SELECT * FROM {} WHERE {} ORDER BY {} DESC LIMIT %(limit)s").format(
                ident, window, column.column
            ),
            args,
        ).fetchall()
    shown = [{k: None if v is None else str(v) for k, v in row.items()} for row in rows]
    return (int(count["n"]) if count else 0), shown


# --- the JWT signing key ----------------------------------------------------------------------


def key_fingerprint(private_pem: str) -> str:
    """SHA-256 (hex, first 32 digits) of the public key's SubjectPublicKeyInfo (DER).

    Raises ValueError (with a message that holds none of the input) when it is not a PEM
    private key."""
    try:
        key = serialization.load_pem_private_key(private_pem.encode(), password=None)
    except (ValueError, TypeError, cryptography.exceptions.UnsupportedAlgorithm):
        raise ValueError("not an unencrypted PEM private key") from None
    der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).hexdigest()[:32]


def new_private_key(algorithm: Literal["RS256", "Ed25519"]) -> str:
    """A new private key as unencrypted PKCS#8 PEM: RSA 2048-bit (e 65537) for RS256, else
    Ed25519."""
    key: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey = (
        rsa.generate_private_key(public_exponent=RSA_EXPONENT, key_size=RSA_BITS)
        if algorithm == "RS256"
        else ed25519.Ed25519PrivateKey.generate()
    )
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()


def _load_secret(block: str) -> str | None:
    """The block's value, None when no such block exists."""
    try:
        # Called from a sync task: Prefect's async_dispatch runs it synchronously.
        loaded = cast("Secret[Any]", Secret.load(block))
    except ValueError:  # Prefect: "Unable to find block document named ..."
        return None
    except Exception as exc:  # the Prefect API's client errors (httpx, HTTP status)
        raise TargetError(
            f"Prefect Secret block {block!r} cannot be read: {type(exc).__name__}; check "
            "PREFECT_API_URL and that the Prefect server is up"
        ) from None
    value = loaded.get()
    return value if isinstance(value, str) else None


@io_task("read-jwt-key", timeout_seconds=60)
def read_jwt_key(name: str, target: SecurityTarget) -> KeyState | None:
    """Whether the key's Prefect Secret block exists and holds a private key, and that key's
    fingerprint (key_fingerprint). None when the target names no jwt_secret.

    Raises:
        TargetError: the Prefect API cannot be read (the message names the error's type only:
            Prefect's own messages may quote what was sent)."""
    block = target.jwt_secret
    if block is None:
        return None
    value = _load_secret(block)
    if value is None:
        return KeyState(block=block, exists=False)
    try:
        return KeyState(block=block, exists=True, fingerprint=key_fingerprint(value))
    except ValueError as exc:
        return KeyState(block=block, exists=True, error=str(exc))


@io_task("rotate-jwt-key", timeout_seconds=120, retries=0)
def rotate_jwt_key(
    name: str, block: str, algorithm: Literal["RS256", "Ed25519"], now: datetime
) -> str:
    """Store a new private key (new_private_key) as the block's value, after saving the
    previous value, when there is one, as `BLOCK-YYYYMMDDTHHMMSSZ` (now, UTC): a copy to go
    back to if the new key breaks a service (the grace period), never read by the
    services, which restart on the new key; every token the previous key signed stops
    verifying. Delete the copy by hand once the services run on the new key: it is the
    compromised key.

    Args:
        name: the [security.NAME] target, for messages.
        block: the Prefect Secret block's name.
        algorithm: RS256 (RSA 2048-bit) or Ed25519.
        now: the moment of the rotation, timezone-aware, for the previous key's name.

    Returns:
        What was done, naming the fingerprints and the previous key's block, for the detail.

    Raises:
        ActionFailed: the Prefect API refused to save a block (the error's type only, never
            a key).
        TargetError: the block cannot be read."""
    previous = _load_secret(block)
    kept = f"{block}-{now.strftime('%Y%m%dt%H%M%Sz')}"
    try:
        if previous is not None:
            Secret(value=previous).save(kept, overwrite=True)
        fresh = new_private_key(algorithm)
        Secret(value=fresh).save(block, overwrite=True)
    except Exception as exc:  # Prefect's client errors: httpx, ObjectAlreadyExists, ...
        raise ActionFailed(
            f"security.{name}: saving Prefect Secret block {block!r} failed: "
            f"{type(exc).__name__}; check the Prefect API and the block's name"
        ) from None
    done = f"new {algorithm} key, fingerprint {key_fingerprint(fresh)}, in block {block!r}"
    if previous is not None:
        done += f"; the previous key kept as block {kept!r}"
    return done
