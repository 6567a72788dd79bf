"""Pure decisions of tls-certificates (tasks.tls_rules): which renewals are planned and how,
whether the renewed certificate is the one served, and the order of the findings. No server
needed (the thresholds at their boundaries are in test_tls.py)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from tasks.models import ActionStatus, Severity
from tasks.settings import TlsEndpoint
from tasks.tls import ServedCert
from tasks.tls_rules import (
    PlannedCert,
    TlsParams,
    declined_finding,
    plan_renewals,
    served_new,
    tls_findings,
)

NOW = datetime(2026, 11, 30, 12, tzinfo=UTC)
P = {"app": TlsParams(), "api": TlsParams()}


def served(left: float, endpoint: str = "app", fingerprint: str = "aa") -> ServedCert:
    not_after = NOW + timedelta(days=left)
    return ServedCert(
        endpoint=endpoint,
        address=f"{endpoint}.test:443",
        reachable=True,
        names=[f"{endpoint}.test"],
        not_before=not_after - timedelta(days=90),
        not_after=not_after,
        fingerprint=fingerprint,
        hostname_ok=True,
        chain_ok=True,
    )


def test_a_due_renewal_carries_the_certificate_it_replaces() -> None:
    ep = TlsEndpoint(host="app.test", cert_name="app", reload_command=["true"])
    [renew] = plan_renewals([served(10)], {"app": ep}, NOW, P)
    assert (renew.kind, renew.status, renew.destructive) == (
        "renew_certificate",
        ActionStatus.planned,
        False,
    )
    assert renew.args == PlannedCert(
        fingerprint="aa", names=["app.test"], not_after=NOW + timedelta(days=10)
    )


@pytest.mark.parametrize(
    ("endpoint", "says"),
    [
        (TlsEndpoint(host="app.test", reload_command=["true"]), "no renew_command or cert_name"),
        (TlsEndpoint(host="app.test", cert_name="app"), "no reload_command or service"),
    ],
)
def test_a_renewal_that_could_not_be_done_or_served_is_skipped(
    endpoint: TlsEndpoint, says: str
) -> None:
    [renew] = plan_renewals([served(10)], {"app": endpoint}, NOW, P)
    assert renew.status is ActionStatus.skipped and says in renew.detail


def test_nothing_is_planned_for_an_unreachable_or_not_yet_due_endpoint_or_none() -> None:
    ep = TlsEndpoint(host="app.test", cert_name="app", reload_command=["true"])
    down = ServedCert(endpoint="app", address="app.test:443", reachable=False, error="refused")
    assert plan_renewals([down, served(31)], {"app": ep}, NOW, P) == []
    assert plan_renewals([], {}, NOW, P) == [] and tls_findings([], NOW, P) == []


def test_served_new_names_each_way_a_renewal_can_fail_to_show() -> None:
    old = PlannedCert(fingerprint="aa", names=["app.test"], not_after=NOW)
    assert served_new(old, served(90, fingerprint="bb")) is None
    down = ServedCert(endpoint="app", address="app.test:443", reachable=False, error="refused")
    assert "does not answer: refused" in (served_new(old, down) or "")
    assert "old certificate is still served" in (served_new(old, served(90)) or "")
    other = served(90, fingerprint="bb").model_copy(update={"names": ["other.test"]})
    assert "other names" in (served_new(old, other) or "")


def test_findings_put_the_unreachable_and_the_closest_to_expiry_first() -> None:
    down = ServedCert(endpoint="api", address="api.test:443", reachable=False, error="refused")
    found = tls_findings([served(60), down, served(5, endpoint="api")], NOW, P)
    assert [(f.target, f.severity) for f in found] == [
        ("api", Severity.critical),
        ("api", Severity.critical),
        ("app", Severity.ok),
    ]
    assert found[0].observed is None and found[1].observed == 5


def test_a_declined_renewal_is_as_severe_as_its_certificate_never_a_failure() -> None:
    ep = TlsEndpoint(host="app.test", cert_name="app", reload_command=["true"])
    [renew] = plan_renewals([served(10)], {"app": ep}, NOW, P)
    renew.detail = "Certificate not yet due for renewal"
    certificate = tls_findings([served(10)], NOW, P)[0]
    declined = declined_finding(renew, certificate)
    assert (declined.check, declined.severity) == ("renewal", certificate.severity)
    assert "not yet due" in declined.message
