"""Pure decisions for security-incident (seeds 004 s12 "Security Incident (Token Compromise)",
002 "Suspected Security Breach", 001 secrets rotation): findings from what was read, actions
from findings. No I/O here, and never key material: a key is only ever named by its
fingerprint (tasks.security.key_fingerprint)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from tasks.errors import ConfigError
from tasks.models import Action, Finding, Params, ServiceRef, Severity

if TYPE_CHECKING:
    from tasks.settings import SecurityTarget

# The kinds of action security-incident plans (the flow and deployments.catalog read them here).
# enable_/disable_maintenance: the pair around the mending when the target has a
# maintenance_service (tasks.maintenance_rules).
SecurityAction = Literal[
    "revoke_sessions",
    "rotate_jwt_key",
    "restart_service",
    "enable_maintenance",
    "disable_maintenance",
]

# The seed's audit query looks back 24 hours (004 s12, "Audit log review").
AUDIT_WINDOW_HOURS = 24
MAX_USERS = 1000


class Users(BaseModel):
    """The users whose live sessions are revoked."""

    model_config = ConfigDict(frozen=True)

    users: tuple[str, ...]


class KeyRotation(BaseModel):
    """Which Prefect Secret block gets a new key pair, and of which algorithm."""

    model_config = ConfigDict(frozen=True)

    block: str
    algorithm: Literal["RS256", "Ed25519"]


SecurityStep = Action[SecurityAction, Users | KeyRotation | ServiceRef]


class SecurityParams(Params):
    run_only: ClassVar[frozenset[str]] = frozenset({"users", "rotate_jwt"})
    users: list[str] = Field(
        [],
        max_length=MAX_USERS,
        description="ids of the users whose live sessions are revoked, comma-separated on the "
        f"command line; empty: none; at most {MAX_USERS}",
    )
    rotate_jwt: bool = Field(
        False,
        description="treat the JWT signing key as compromised: a new key pair, and a restart "
        "of the services that read it",
    )
    audit_rows: int = Field(
        20, ge=0, le=500, description="newest audit-log rows of the last 24 h shown; 0 to 500"
    )

    @field_validator("users", mode="before")
    @classmethod
    def _comma_separated(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("users")
    @classmethod
    def _not_blank(cls, value: list[str]) -> list[str]:
        if any(not user.strip() for user in value):
            raise ValueError("a user id is empty: list ids, e.g. users=u1,u2")
        return list(dict.fromkeys(value))


class KeyState(BaseModel):
    """What the Secret block holds, said without its content: exists, parses, and the
    fingerprint of its public key (SHA-256 of the SubjectPublicKeyInfo, hex)."""

    block: str
    exists: bool
    fingerprint: str | None = None
    error: str = ""


def check_rotation(name: str, target: SecurityTarget, p: SecurityParams) -> None:
    """rotate_jwt=true on a target with no jwt_secret cannot be done: say where to name it.

    Raises ConfigError naming security.NAME.jwt_secret."""
    if p.rotate_jwt and target.jwt_secret is None:
        raise ConfigError(
            f"security.{name}.jwt_secret is not set, so rotate_jwt=true has no key to rotate: "
            "name the Prefect Secret block that holds the JWT private key"
        )


def session_findings(
    name: str, target: SecurityTarget, p: SecurityParams, live: dict[str, int]
) -> list[Finding]:
    """Live sessions of the named users (live: per user, only those with any): critical while
    any remains; ok when none does or no user is named."""
    total = sum(live.values())
    table = target.sessions.table
    if not p.users:
        message = f"no users named (users=ID,...): no sessions of {table} to revoke"
    elif total:
        per_user = ", ".join(f"{user}: {n}" for user, n in sorted(live.items()))
        message = (
            f"{total} live sessions ({target.sessions.revoked_column} NULL) in {table} of the "
            f"{len(p.users)} named users ({per_user})"
        )
    else:
        message = f"no live sessions in {table} of the {len(p.users)} named users"
    return [
        Finding(
            check="live_sessions",
            target=name,
            severity=Severity.critical if total else Severity.ok,
            observed=total,
            threshold=0,
            message=message,
        )
    ]


def audit_finding(
    name: str, target: SecurityTarget, count: int, rows: list[dict[str, Any]]
) -> list[Finding]:
    """The audit log of the last 24 h: its count in the message, its newest rows (already
    capped) as the observed value; informational (ok). None without an audit_log."""
    table = target.audit_log
    if table is None:
        return []
    return [
        Finding(
            check="audit_log_24h",
            target=name,
            severity=Severity.ok,
            observed=rows or count,
            threshold=None,
            message=f"{count} rows in {table.table} in the last {AUDIT_WINDOW_HOURS} h"
            + (f"; the newest {len(rows)} follow" if rows else ""),
        )
    ]


def key_finding(
    name: str,
    target: SecurityTarget,
    p: SecurityParams,
    key: KeyState | None,
    compromised: str | None,
) -> list[Finding]:
    """The JWT key's state. compromised: the fingerprint of the key taken as compromised (the
    one held before this run rotated it), None when no rotation is asked for. Critical while
    the block still holds that key (or holds nothing readable); ok otherwise."""
    if target.jwt_secret is None or key is None:
        return []
    where = f"Prefect Secret block {target.jwt_secret!r}"
    if not key.exists:
        state = f"{where} does not exist"
        severity = Severity.critical if p.rotate_jwt else Severity.ok
    elif key.fingerprint is None:
        state, severity = f"{where} holds no readable private key: {key.error}", Severity.critical
    elif p.rotate_jwt and key.fingerprint == compromised:
        state = f"{where} still holds the key taken as compromised (fingerprint {key.fingerprint})"
        severity = Severity.critical
    elif p.rotate_jwt:
        state, severity = f"{where} holds a new key (fingerprint {key.fingerprint})", Severity.ok
    else:
        state = f"{where} holds key fingerprint {key.fingerprint}; rotate_jwt=true replaces it"
        severity = Severity.ok
    return [
        Finding(
            check="jwt_key",
            target=name,
            severity=severity,
            observed=key.fingerprint,
            threshold=None,
            message=state,
        )
    ]


def plan_security(
    name: str, target: SecurityTarget, p: SecurityParams, findings: list[Finding]
) -> list[SecurityStep]:
    """Revoke the named users' live sessions when any are found; with rotate_jwt, a new key
    pair in the block and then a restart of each service that reads it (in that order: the
    flow skips the restarts when the rotation did not happen)."""
    actions: list[SecurityStep] = []
    by_check = {f.check: f for f in findings}
    live = by_check.get("live_sessions")
    if live is not None and live.observed:
        actions.append(
            Action(
                kind="revoke_sessions",
                target=name,
                destructive=True,
                description=f"UPDATE {target.sessions.table} SET {target.sessions.revoked_column}"
                f" = now() for the {live.observed} live sessions of {len(p.users)} users",
                args=Users(users=tuple(p.users)),
            )
        )
    key = by_check.get("jwt_key")
    block = target.jwt_secret if p.rotate_jwt else None
    if block is not None and key is not None and key.severity is not Severity.ok:
        actions.append(
            Action(
                kind="rotate_jwt_key",
                target=name,
                destructive=True,
                description=f"generate a new {target.jwt_algorithm} key pair into Prefect "
                f"Secret block {block!r}, keeping the previous key under a dated name "
                "(every token it signed becomes invalid)",
                args=KeyRotation(block=block, algorithm=target.jwt_algorithm),
            )
        )
        for service in target.jwt_services:
            actions.append(
                Action(
                    kind="restart_service",
                    target=name,
                    destructive=True,
                    description=f"restart service {service!r} so it reads the new key",
                    args=ServiceRef(service=service),
                    touches=f"services.{service}",
                )
            )
    return actions
