"""security-incident against a real PostgreSQL (the seed's users.session and system.auditlog),
a real Prefect Secret block and a real restart command, through the CLI as on-call runs it."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from prefect.blocks.system import Secret

from flows.security_incident import security_incident
from tasks.errors import ConfigError
from tasks.limits import rate_limit_name
from tasks.models import ActionStatus, RunStatus
from tasks.security import key_fingerprint, new_private_key
from tasks.security_rules import SecurityParams
from tests.conftest import Db
from tests.test_cli import cli, no_traceback

pytestmark = pytest.mark.usefixtures("prefect_api")

OLD_REVOKED = datetime(2026, 1, 2, 3, 4, 5)
# (id, userid, revokedat): u1 and u2 are the compromised users; u3 must keep its sessions.
SESSIONS: list[tuple[str, str, datetime | None]] = [
    ("s1", "u1", None),
    ("s2", "u1", None),
    ("s3", "u1", OLD_REVOKED),
    ("s4", "u2", None),
    ("s5", "u3", None),
    ("s6", "u3", None),
    ("s7", "u10", None),  # a user id that starts like u1's
]


def make_tables(db: Db) -> None:
    """The seed's tables (004 s12): users.session with Prisma's timestamp(3) (without time
    zone), and system.auditlog with rows inside and outside the last 24 h."""
    with db.admin() as conn:
        conn.execute("CREATE SCHEMA users")
        conn.execute("CREATE SCHEMA system")
        conn.execute(
            "CREATE TABLE users.session (id text PRIMARY KEY, userid text NOT NULL, "
            "revokedat timestamp(3))"
        )
        for row in SESSIONS:
            conn.execute("INSERT INTO users.session VALUES (%s, %s, %s)", row)
        conn.execute(
            "CREATE TABLE system.auditlog (id serial PRIMARY KEY, action text, "
            "createdat timestamptz NOT NULL)"
        )
        for hours, action in [(1, "login u1"), (2, "token reuse u1"), (30, "login u3")]:
            conn.execute(
                "INSERT INTO system.auditlog (action, createdat) "
                "VALUES (%s, now() - make_interval(hours => %s))",
                (action, hours),
            )


def sessions(db: Db) -> dict[str, datetime | None]:
    with db.admin() as conn:
        rows = conn.execute("SELECT id, revokedat FROM users.session ORDER BY id").fetchall()
    return {r[0]: r[1] for r in rows}


def config(db: Db, tmp_path: Path, algorithm: str = "RS256", services: bool = True) -> Path:
    marker = tmp_path / "restarted"
    extra = (
        '[security.app]\npostgres = "main"\njwt_secret = "jwt-signing-key"\n'
        f'jwt_algorithm = "{algorithm}"\n'
        + ('jwt_services = ["api"]\n' if services else "")
        + '[security.app.sessions]\ntable = "users.session"\n'
        '[security.app.audit_log]\ntable = "system.auditlog"\n'
        + (
            f'[services.api]\nkind = "command"\nstatus_command = ["true"]\n'
            f'restart_command = ["touch", "{marker}"]\n'
            if services
            else ""
        )
    )
    db.write_config(extra)
    return marker


def stored_key() -> str:
    value = Secret.load("jwt-signing-key").get()  # type: ignore[union-attr]
    assert isinstance(value, str)
    return value


def test_compromise_is_reported_then_fixed_through_the_cli(
    db: Db, tmp_path: Path, prefect_api: str
) -> None:
    make_tables(db)
    marker = config(db, tmp_path)
    old_pem = new_private_key("RS256")
    Secret(value=old_pem).save("jwt-signing-key", overwrite=True)
    old = key_fingerprint(old_pem)
    env = {"PREFECT_API_URL": prefect_api}
    sets = ["--set", "users=u1,u2", "--set", "rotate_jwt=true"]

    proc = cli("run", "security-incident", "--target", "app", *sets, "--json", env=env)
    assert proc.returncode == 1, proc.stderr
    report = json.loads(proc.stdout)
    assert report["dry_run"] is True and report["status"] == "unhealthy"
    assert [(a["kind"], a["status"]) for a in report["actions"]] == [
        ("revoke_sessions", "planned"),
        ("rotate_jwt_key", "planned"),
        ("restart_service", "planned"),
    ]
    live = next(f for f in report["findings"] if f["check"] == "live_sessions")
    assert live["observed"] == 3 and live["severity"] == "critical"
    assert sessions(db) == {i: r for i, _, r in SESSIONS}
    assert key_fingerprint(stored_key()) == old and not marker.exists()

    started = datetime.now(UTC).replace(tzinfo=None)
    proc = cli("run", "security-incident", "--target", "app", *sets, "--apply", "--yes", "--json",
               env=env)  # fmt: skip
    assert proc.returncode == 0, proc.stderr + proc.stdout
    report = json.loads(proc.stdout)
    assert report["status"] == "fixed", report
    assert [a["status"] for a in report["actions"]] == ["done"] * 3
    assert report["actions"][0]["detail"] == "revoked 3 sessions"
    no_traceback(proc)

    # Row by row: only the named users' live sessions, at now() as UTC wall-clock time.
    after = sessions(db)
    for sid in ("s1", "s2", "s4"):
        revoked = after[sid]
        assert revoked is not None
        assert started - timedelta(seconds=1) <= revoked <= datetime.now(UTC).replace(tzinfo=None)
    assert after["s3"] == OLD_REVOKED
    assert after["s5"] is None and after["s6"] is None and after["s7"] is None

    # A new RSA 2048 key; the old one kept under a dated name; the service restarted.
    new_pem = stored_key()
    new_key = serialization.load_pem_private_key(new_pem.encode(), password=None)
    assert isinstance(new_key, rsa.RSAPrivateKey) and new_key.key_size == 2048
    assert key_fingerprint(new_pem) != old
    kept = report["actions"][1]["detail"].split("kept as block ")[1].strip("'")
    assert kept.startswith("jwt-signing-key-2") and Secret.load(kept).get() == old_pem  # type: ignore[union-attr]
    assert marker.exists()
    key = next(f for f in report["findings"] if f["check"] == "jwt_key")
    assert key["severity"] == "ok" and key["observed"] == key_fingerprint(new_pem)

    # The audit log of the last 24 h: two rows, newest first; the 30-hour-old one left out.
    audit = next(f for f in report["findings"] if f["check"] == "audit_log_24h")
    assert audit["message"].startswith("2 rows in system.auditlog in the last 24 h")
    assert [r["action"] for r in audit["observed"]] == ["login u1", "token reuse u1"]
    for pem in (old_pem, new_pem):
        body = pem.splitlines()[1]
        assert body not in proc.stdout + proc.stderr
    assert "PRIVATE KEY" not in proc.stdout + proc.stderr

    # Re-diagnosis: the sessions are gone; nothing left to do.
    proc = cli("run", "security-incident", "--target", "app", "--set", "users=u1,u2", "--json",
               env=env)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["status"] == "healthy"


def test_ed25519_rotation_without_a_previous_key_and_a_dry_run_changes_nothing(
    db: Db, tmp_path: Path
) -> None:
    make_tables(db)
    config(db, tmp_path, algorithm="Ed25519", services=False)
    from prefect import get_client

    with get_client(sync_client=True) as client:
        try:
            doc = client.read_block_document_by_name("jwt-signing-key", "secret")
        except Exception:
            doc = None
        if doc is not None:
            client.delete_block_document(doc.id)

    dry = security_incident("app", params=SecurityParams(rotate_jwt=True))
    assert dry.status is RunStatus.unhealthy
    assert [a.kind for a in dry.actions] == ["rotate_jwt_key"]
    assert dry.actions[0].status is ActionStatus.planned

    fixed = security_incident(
        "app", dry_run=False, approval="auto", params=SecurityParams(rotate_jwt=True)
    )
    assert fixed.status is RunStatus.fixed, fixed
    assert "previous" not in fixed.actions[0].detail  # there was none to keep
    key = serialization.load_pem_private_key(stored_key().encode(), password=None)
    assert isinstance(key, ed25519.Ed25519PrivateKey)
    assert sessions(db) == {i: r for i, _, r in SESSIONS}  # no users named: none revoked


def test_no_users_and_no_rotation_is_healthy(db: Db, tmp_path: Path) -> None:
    make_tables(db)
    config(db, tmp_path, services=False)
    report = security_incident("app")
    assert report.status is RunStatus.healthy and report.actions == []


def test_bad_configuration_is_a_config_error(db: Db, tmp_path: Path, prefect_api: str) -> None:
    make_tables(db)
    db.write_config('[security.app]\npostgres = "nope"\n[security.app.sessions]\ntable = "x"\n')
    proc = cli("run", "security-incident", "--target", "app", env={"PREFECT_API_URL": prefect_api})
    assert proc.returncode == 2
    assert "security.app.postgres names 'nope'" in proc.stdout + proc.stderr
    no_traceback(proc)

    db.write_config(
        '[security.app]\npostgres = "main"\n[security.app.sessions]\ntable = "users.sessions"\n'
    )
    with pytest.raises(ConfigError, match=r"security\.app\.sessions"):
        security_incident("app", params=SecurityParams(users=["u1"]))


@pytest.mark.parametrize(
    ("given", "users"),
    [("u1,u2", ["u1", "u2"]), (" u1 , u1,u2 ", ["u1", "u2"]), ("", []), (["a"], ["a"])],
)
def test_users_parameter_takes_a_comma_separated_list(given: Any, users: list[str]) -> None:
    assert SecurityParams.model_validate({"users": given}).users == users


def test_no_rotation_when_a_service_reading_the_key_may_not_be_restarted(
    db: Db, tmp_path: Path
) -> None:
    """[services.api] approval = "never": its restart is skipped by the policy, so the key is
    not rotated either (api would go on trusting the compromised one while the report said
    rotated), and the rotation spends none of its rate; the sessions are still revoked."""
    from tests.test_touches import rate_slots

    make_tables(db)
    marker = config(db, tmp_path)
    db.config.write_text(
        db.config.read_text().replace("[services.api]\n", '[services.api]\napproval = "never"\n')
    )
    old_pem = new_private_key("RS256")
    Secret(value=old_pem).save("jwt-signing-key", overwrite=True)
    rate = rate_limit_name("rotate_jwt_key", "app")
    slots = rate_slots(rate)

    report = security_incident(
        "app", dry_run=False, approval="auto", params=SecurityParams(users=["u1"], rotate_jwt=True)
    )
    revoke, rotate, restart = report.actions
    assert revoke.status is ActionStatus.done
    assert restart.status is ActionStatus.skipped and "'never'" in restart.detail
    assert rotate.status is ActionStatus.skipped
    assert rotate.detail.startswith("not rotated: the restart of api did not pass the gate")
    assert stored_key() == old_pem and not marker.exists()
    assert rate_slots(rate) == slots
    assert report.status is not RunStatus.fixed  # the key is still the compromised one
