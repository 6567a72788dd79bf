"""metrics-guard: requests to an application's Prometheus endpoint that its guard must refuse
and one it must admit (seed 001, "Metrics endpoint failing authentication"), with httpx:
explicit timeouts, no redirects followed, a source address per request for the CIDR guard."""

from __future__ import annotations

import secrets
import ssl
import time
from typing import Literal

import httpx
from prometheus_client.parser import text_string_to_metric_families
from pydantic import BaseModel

from tasks.engine import io_task
from tasks.settings import MetricsTarget

# without_secret, wrong_secret, denied_source: the guard must refuse them (401/403);
# with_secret, allowed_source: it must admit them (200, Prometheus text).
ProbeName = Literal[
    "without_secret", "wrong_secret", "with_secret", "denied_source", "allowed_source"
]
# Enough of a body to say what it is when it is not Prometheus text.
_EXCERPT = 60


class MetricsProbe(BaseModel):
    """One request: from where, what it carried, and what came back (or why nothing did)."""

    probe: ProbeName
    source: str | None = None  # the local address it was sent from; None: the default route
    ms: float
    status_code: int | None = None
    error: str | None = None  # no answer: unreachable, timeout, TLS
    location: str | None = None  # of a redirect
    content_type: str = ""
    families: int | None = None  # metric families parsed from a 200's body
    parse_error: str | None = None  # a 200 whose body is not Prometheus text


def parse_exposition(body: str) -> tuple[int | None, str | None]:
    """(metric families, None) when body parses as Prometheus text exposition
    (prometheus_client's parser), else (None, why, with the start of the body)."""
    try:
        names = {family.name for family in text_string_to_metric_families(body)}
    except ValueError as exc:
        start = " ".join(body[:_EXCERPT].split())
        return None, f"{exc}; the body starts {start!r}"
    return len(names), None


def _request(
    target: MetricsTarget, probe: ProbeName, source: str | None, headers: dict[str, str]
) -> MetricsProbe:
    verify: ssl.SSLContext | bool = (
        ssl.create_default_context(cafile=target.ca_file) if target.ca_file else True
    )
    transport = httpx.HTTPTransport(local_address=source, verify=verify, retries=0)
    start = time.perf_counter()
    try:
        with httpx.Client(
            transport=transport, timeout=target.timeout_seconds, follow_redirects=False
        ) as client:
            response = client.get(target.url, headers=headers)
    except httpx.TimeoutException:
        return MetricsProbe(
            probe=probe,
            source=source,
            ms=(time.perf_counter() - start) * 1000,
            error=f"timeout: no answer within {target.timeout_seconds:g} s",
        )
    except httpx.HTTPError as exc:
        why = str(exc) or type(exc).__name__
        if source is not None and "assign requested address" in why:
            why = f"this host cannot send from {source} (not one of its addresses): {why}"
        return MetricsProbe(
            probe=probe,
            source=source,
            ms=(time.perf_counter() - start) * 1000,
            error=f"unreachable ({type(exc).__name__}): {why}",
        )
    ms = (time.perf_counter() - start) * 1000
    found = MetricsProbe(
        probe=probe,
        source=source,
        ms=ms,
        status_code=response.status_code,
        location=response.headers.get("location"),
        content_type=response.headers.get("content-type", ""),
    )
    if response.status_code == 200:
        found.families, found.parse_error = parse_exposition(response.text)
    return found


@io_task("probe-metrics", timeout_seconds=600, retries=0)
def probe_metrics(name: str, target: MetricsTarget) -> list[MetricsProbe]:
    """GET the endpoint as its guard sees callers. guard = "secret": without the header, with
    a wrong value (random, never the secret) and with the secret, in that order. guard =
    "cidr": from denied_source, then from allowed_source (the server judges the address the
    connection comes from). The secret goes into the one request's header only.

    Args:
        name: the [metrics.NAME] entry's name.
        target: its entry (timeout_seconds bounds each request, in seconds).

    Returns:
        One MetricsProbe per request: status, milliseconds and, for a 200, the number of metric
        families parsed (or why the body is not Prometheus text); or why nothing answered.

    Raises:
        Nothing of its own: connection errors and timeouts are in the probes."""
    if target.guard == "cidr":
        return [
            _request(target, "denied_source", target.denied_source, {}),
            _request(target, "allowed_source", target.allowed_source, {}),
        ]
    assert target.secret is not None  # the settings require it for guard = "secret"
    wrong = "runbook-wrong-" + secrets.token_hex(8)
    return [
        _request(target, "without_secret", None, {}),
        _request(target, "wrong_secret", None, {target.header: wrong}),
        _request(target, "with_secret", None, {target.header: target.secret.get_secret_value()}),
    ]
