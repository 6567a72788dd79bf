"""Secrets out of text: the one way an answer, an error or a log line that may quote a
configured secret (a token, a password, a notification URL's pieces) is cleaned before it goes
into a report, a log, an artifact, an event or an exception message."""

from __future__ import annotations

import re
from collections.abc import Iterable

from pydantic import SecretStr

MASK = "***"
URL_CREDENTIALS = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)[^/\s@]+@")


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


def redact_urls(text: str, secrets: Iterable[str | SecretStr | None]) -> str:
    """text without the credentials of any URL in it (USER:PASSWORD@ becomes ***@), nor any
    of `secrets` (redact)."""
    return redact(URL_CREDENTIALS.sub(r"\g<scheme>***@", text), secrets)


def prefect_secrets() -> list[str]:
    """The Prefect API's key and basic-auth string, when configured (PREFECT_API_KEY,
    PREFECT_API_AUTH_STRING): what a Prefect client's error may quote."""
    from prefect.settings import get_current_settings

    api = get_current_settings().api
    return [s.get_secret_value() for s in (api.key, api.auth_string) if s is not None]
