"""security-incident's pure rules: findings and plans from what was read, no server."""

from __future__ import annotations

import pytest

from tasks.errors import ConfigError
from tasks.models import ServiceRef, Severity
from tasks.security_rules import (
    MAX_USERS,
    KeyRotation,
    KeyState,
    SecurityParams,
    Users,
    check_rotation,
    key_finding,
    plan_security,
    session_findings,
)
from tasks.settings import SecurityTarget

TARGET = SecurityTarget.model_validate(
    {
        "postgres": "main",
        "sessions": {"table": "users.session"},
        "jwt_secret": "jwt-key",
        "jwt_services": ["api", "worker"],
    }
)


def test_live_sessions_of_named_users_plan_one_revoke_with_the_users() -> None:
    p = SecurityParams(users=["u1", "u2"])
    found = session_findings("app", TARGET, p, {"u1": 2, "u2": 1})
    assert found[0].severity is Severity.critical and found[0].observed == 3
    assert "u1: 2, u2: 1" in found[0].message
    [action] = plan_security("app", TARGET, p, found)
    assert action.kind == "revoke_sessions" and action.destructive
    assert action.args == Users(users=("u1", "u2"))


def test_no_live_sessions_or_no_users_plan_nothing() -> None:
    for p in (SecurityParams(users=["u1"]), SecurityParams()):
        found = session_findings("app", TARGET, p, {})
        assert found[0].severity is Severity.ok
        assert plan_security("app", TARGET, p, found) == []


def test_rotation_plans_the_key_then_a_restart_per_reader() -> None:
    p = SecurityParams(rotate_jwt=True)
    key = KeyState(block="jwt-key", exists=True, fingerprint="ab" * 16)
    found = key_finding("app", TARGET, p, key, compromised="ab" * 16)
    assert found[0].severity is Severity.critical and "ab" * 16 in found[0].message
    actions = plan_security("app", TARGET, p, found)
    assert [a.kind for a in actions] == ["rotate_jwt_key", "restart_service", "restart_service"]
    assert actions[0].args == KeyRotation(block="jwt-key", algorithm="RS256")
    assert [a.args for a in actions[1:]] == [
        ServiceRef(service="api"),
        ServiceRef(service="worker"),
    ]


def test_a_rotated_key_is_ok_and_plans_nothing() -> None:
    p = SecurityParams(rotate_jwt=True)
    key = KeyState(block="jwt-key", exists=True, fingerprint="cd" * 16)
    found = key_finding("app", TARGET, p, key, compromised="ab" * 16)
    assert found[0].severity is Severity.ok
    assert plan_security("app", TARGET, p, found) == []


def test_a_key_is_only_reported_without_rotate_jwt() -> None:
    key = KeyState(block="jwt-key", exists=True, fingerprint="ab" * 16)
    found = key_finding("app", TARGET, SecurityParams(), key, compromised=None)
    assert found[0].severity is Severity.ok
    assert plan_security("app", TARGET, SecurityParams(), found) == []


def test_an_unreadable_or_missing_key_under_rotation_is_critical() -> None:
    p = SecurityParams(rotate_jwt=True)
    for key in (
        KeyState(block="jwt-key", exists=False),
        KeyState(block="jwt-key", exists=True, error="not an unencrypted PEM private key"),
    ):
        [finding] = key_finding("app", TARGET, p, key, compromised=None)
        assert finding.severity is Severity.critical
        assert plan_security("app", TARGET, p, [finding])[0].kind == "rotate_jwt_key"


def test_rotation_without_a_secret_block_is_a_config_error() -> None:
    bare = TARGET.model_copy(update={"jwt_secret": None, "jwt_services": []})
    with pytest.raises(ConfigError, match=r"security\.app\.jwt_secret"):
        check_rotation("app", bare, SecurityParams(rotate_jwt=True))
    check_rotation("app", bare, SecurityParams())


def test_users_are_bounded() -> None:
    with pytest.raises(ValueError, match="at most"):
        SecurityParams(users=[f"u{n}" for n in range(MAX_USERS + 1)])
