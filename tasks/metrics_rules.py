"""Pure decisions for metrics-guard (seed 001, "Metrics endpoint failing authentication", and
its variables METRICS_ENABLED, METRICS_GUARD, METRICS_GUARD_SECRET, METRICS_GUARD_ALLOWLIST):
what each request's answer says about the guard."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import Field

from tasks.models import Finding, Params, Severity

if TYPE_CHECKING:
    from tasks.metrics import MetricsProbe
    from tasks.settings import MetricsTarget


class MetricsParams(Params):
    """What an admitted scrape must hold."""

    min_metric_families: int = Field(
        1,
        ge=0,
        le=100_000,
        description="metric families the admitted scrape must hold (fewer: a warning); 0 to 100000",
    )


REFUSED = (401, 403)
# The requests the guard must refuse; the others (with_secret, allowed_source) it must admit.
MUST_REFUSE = frozenset({"without_secret", "wrong_secret", "denied_source"})
WHAT = {
    "without_secret": "a request without the secret header",
    "wrong_secret": "a request with a wrong secret",
    "with_secret": "a request with the secret",
    "denied_source": "a request from the denied source",
    "allowed_source": "a request from the allowed source",
}
LOGS = "the app's logs show metrics_guard warnings (seed 001)"


def _who(probe: MetricsProbe) -> str:
    what = WHAT[probe.probe]
    return f"{what} {probe.source}" if probe.source else what


def _refusal(probe: MetricsProbe, target: MetricsTarget, open_: bool) -> tuple[Severity, str]:
    """A request the guard must refuse; open_: one without the secret was let in already."""
    code = probe.status_code
    if code in REFUSED:
        return Severity.ok, f"{_who(probe)} is refused ({code}), as it should be"
    if code is not None and 200 <= code < 300:
        if open_:
            why = "no guard at all (see without_secret)"
        elif probe.probe == "without_secret":
            why = (
                "the endpoint is open to anyone: set METRICS_GUARD=secret and "
                "METRICS_GUARD_SECRET in the app (or METRICS_GUARD=cidr with "
                "METRICS_GUARD_ALLOWLIST) and restart it"
            )
        elif probe.probe == "wrong_secret":
            why = (
                f"the guard takes any value of {target.header}: it checks that the header is "
                "there, not that it equals METRICS_GUARD_SECRET; fix the app's guard"
            )
        else:
            why = (
                f"{probe.source} is let in: it is inside METRICS_GUARD_ALLOWLIST (narrow it), "
                "METRICS_GUARD is not cidr, or the app sees a proxy's address instead of the "
                "caller's (check the trusted proxy setting)"
            )
        return Severity.critical, f"{_who(probe)} got {code}: {why}"
    return Severity.critical, (
        f"{_who(probe)} got {code}, not 401/403: the guard does not answer as seed 001's does; "
        f"{LOGS}"
    )


def _admission(
    probe: MetricsProbe, target: MetricsTarget, p: MetricsParams
) -> tuple[Severity, str]:
    """The request the guard must admit, with a Prometheus body."""
    code = probe.status_code
    if code == 200:
        if probe.parse_error is not None:
            kind = probe.content_type or "no content type"
            return Severity.critical, (
                f"{_who(probe)} got 200 but not Prometheus text ({kind}): {probe.parse_error}. "
                "The URL may point at another page (a login page, a health check): check url "
                "and the app's metrics path"
            )
        families = probe.families or 0
        if families < p.min_metric_families:
            return Severity.warning, (
                f"{_who(probe)} got 200 and Prometheus text with {families} metric families, "
                f"under {p.min_metric_families}: the app registers no metrics"
            )
        return Severity.ok, (
            f"{_who(probe)} got 200 and Prometheus text: {families} metric families, "
            f"{probe.ms:.0f} ms"
        )
    if code in REFUSED:
        if probe.probe == "with_secret":
            why = (
                "the guard refuses the right secret: the app's METRICS_GUARD_SECRET differs from "
                f"[metrics.*].secret (rotated on one side only), or the app reads another header "
                f"than {target.header}; {LOGS}"
            )
        else:
            why = (
                f"the guard refuses the allowed source: add {probe.source} (or its range) to "
                f"METRICS_GUARD_ALLOWLIST, or check that the app sees the caller's address and "
                f"not a proxy's; {LOGS}"
            )
        return Severity.critical, f"{_who(probe)} got {code}: {why}"
    if code is not None and 300 <= code < 400:
        return Severity.critical, (
            f"{_who(probe)} got {code} (a redirect to {probe.location}): Prometheus does not "
            "follow it with the header; point url at the final address"
        )
    return Severity.critical, f"{_who(probe)} got {code}: the endpoint fails; {LOGS}"


def metrics_findings(
    name: str, target: MetricsTarget, probes: list[MetricsProbe], p: MetricsParams
) -> list[Finding]:
    """One finding per request (check: its name, observed: the status code or why nothing
    answered, threshold: what the guard must answer); a 404 instead becomes one `enabled`
    finding: metrics are off (METRICS_ENABLED) or at another path. Everything but a refused
    request that must be refused and an admitted Prometheus scrape is critical, but too few
    metric families, a warning. An endpoint open to anyone is critical."""
    found: list[Finding] = []
    open_ = any(
        probe.probe == "without_secret" and 200 <= (probe.status_code or 0) < 300
        for probe in probes
    )
    disabled = [probe for probe in probes if probe.status_code == 404]
    if disabled:
        found.append(
            Finding(
                check="enabled",
                target=name,
                severity=Severity.critical,
                observed=404,
                threshold=200,
                message=f"GET {target.url} answered 404 to "
                f"{', '.join(_who(probe) for probe in disabled)}: metrics are disabled or at "
                "another path: set METRICS_ENABLED=true in the app and restart it, or correct "
                "url",
            )
        )
    for probe in probes:
        if probe.status_code == 404:
            continue
        expected = "401/403" if probe.probe in MUST_REFUSE else 200
        if probe.error is not None:
            severity, message = (
                Severity.critical,
                (
                    f"{_who(probe)} to {target.url} had no answer after {probe.ms:.0f} ms: "
                    f"{probe.error}. Check that the app runs and url, and the network path"
                ),
            )
            observed: object = probe.error
        elif expected == 200:
            severity, message = _admission(probe, target, p)
            observed = probe.status_code
        else:
            severity, message = _refusal(probe, target, open_ and probe.probe == "wrong_secret")
            observed = probe.status_code
        found.append(
            Finding(
                check=probe.probe,
                target=name,
                severity=severity,
                observed=observed,
                threshold=expected,
                message=message,
            )
        )
    return found
