"""tasks.redact: the one masking of secrets that notify, the receiver, maintenance-mode and
smtp-check share."""

from __future__ import annotations

from pydantic import SecretStr

from tasks.redact import redact


def test_a_secret_that_contains_another_is_masked_whole() -> None:
    text = "token=abc123xyz and abc123 again"
    assert redact(text, ["abc123", SecretStr("abc123xyz")]) == "token=*** and *** again"


def test_unset_and_empty_secrets_change_nothing() -> None:
    assert redact("nothing to hide", [None, "", SecretStr("")]) == "nothing to hide"
