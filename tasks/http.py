"""HTTP health probes with httpx: explicit timeouts, and the component states of a JSON
health body (recognised by tasks.service_rules.components: states only, never build
information, times or text)."""

from __future__ import annotations

import json
import time

import httpx
from pydantic import BaseModel

from tasks.engine import io_task
from tasks.models import Severity
from tasks.service_rules import components, severity_of, state_of
from tasks.settings import ServiceTarget


class HttpProbe(BaseModel):
    url: str
    ok: bool  # a 2xx answer whose body, if it has one, does not say it is failing
    status_code: int | None = None
    ms: float | None = None
    error: str = ""
    status: str | None = None  # the body's own top-level state (`status`, `healthy`...)
    components: dict[str, str] = {}
    body_note: str = ""

    @property
    def in_maintenance(self) -> bool:
        """It answered, and its body's own state is `maintenance` (seed 004 s2 step 5: an
        application put there on purpose, by maintenance-mode or by hand), whatever the
        status code (503 as a rule): unavailable to users, but nothing to restart."""
        return self.status_code is not None and (self.status or "").strip().lower() == "maintenance"

    @property
    def severity(self) -> Severity:
        """critical when it did not answer 2xx or its body says it fails; warning when its
        body says it is degraded or in maintenance."""
        if not self.ok and not self.in_maintenance:
            return Severity.critical
        return severity_of(self.status or "ok") or Severity.ok

    @property
    def failing(self) -> dict[str, str]:
        return {k: v for k, v in self.components.items() if severity_of(v) is Severity.critical}


@io_task("probe-http", timeout_seconds=120, retries=0)
def probe_http(url: str, timeout_seconds: float) -> HttpProbe:
    """GET a health URL (no redirects followed) and read a JSON health body when there is one.
    No answer is a result, not an error: it is what the runbooks diagnose.

    Args:
        url: the http(s):// health or readiness URL.
        timeout_seconds: connect and read timeout, in seconds.

    Returns:
        HttpProbe: ok (2xx and no critical component), status code, milliseconds, the body's
        status and components; or the error when nothing answered in time.

    Raises:
        Nothing of its own: connection errors and timeouts are in the HttpProbe."""
    start = time.perf_counter()
    try:
        response = httpx.get(url, timeout=timeout_seconds, follow_redirects=False)
    except httpx.TimeoutException:
        return HttpProbe(url=url, ok=False, error=f"no answer within {timeout_seconds:g} s")
    except httpx.HTTPError as exc:
        return HttpProbe(url=url, ok=False, error=f"{type(exc).__name__}: {exc}")
    ms = (time.perf_counter() - start) * 1000
    probe = HttpProbe(url=url, ok=response.is_success, status_code=response.status_code, ms=ms)
    if "json" in response.headers.get("content-type", "") or response.text.lstrip()[:1] == "{":
        try:
            body = response.json()
        except json.JSONDecodeError:
            probe.body_note = "the body says it is JSON but is not JSON"
            return probe
        probe.components = components(body)
        probe.status = state_of(body)  # a bare "UP" body too
        probe.ok = probe.ok and severity_of(probe.status or "ok") is not Severity.critical
    return probe


def probe_services(services: dict[str, ServiceTarget]) -> dict[str, list[HttpProbe]]:
    """Each service's health_url and ready_url (those it has) probed, by service name; each
    probe bounded by the service's timeout_seconds."""
    return {
        name: [
            probe_http(url, svc.timeout_seconds) for url in (svc.health_url, svc.ready_url) if url
        ]
        for name, svc in services.items()
    }


def is_answering(name: str, svc: ServiceTarget) -> bool:
    """True when every URL of the service answers 2xx and its body does not say it fails."""
    return all(probe.ok for probe in probe_services({name: svc})[name])
