"""Secrets out of text: the one way an answer, an error or a log line that may quote a
configured secret (a token, a password, a notification URL's pieces) is cleaned before it goes
into a report, a log, an artifact, an event or an exception message."""

from __future__ import annotations

from collections.abc import Iterable

from pydantic import SecretStr

MASK = "***"


def redact(text: str, secrets: Iterable[str | SecretStr | None]) -> str:
    """text with every occurrence of each secret replaced by MASK ("***").

    secrets: plain values or SecretStr (unwrapped here, only to compare); None and empty
    values (an optional secret not configured) are skipped. The longest are replaced first, so
    a secret that contains another is masked whole, not leaving its other characters. Raises
    nothing."""
    values = {s.get_secret_value() if isinstance(s, SecretStr) else s for s in secrets}
    for secret in sorted((v for v in values if v), key=len, reverse=True):
        text = text.replace(secret, MASK)
    return text
