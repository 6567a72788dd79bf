"""tls-certificates against TLS servers on loopback serving certificates made for the test."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from flows.tls_certificates import tls_certificates
from tasks.errors import ConfigError
from tasks.models import ActionStatus, RunStatus, Severity
from tasks.settings import TlsEndpoint
from tasks.tls import ServedCert
from tasks.tls_rules import (
    Thresholds,
    TlsParams,
    cert_finding,
    declined,
    lifetime_thresholds,
    plan_renewals,
    thresholds,
)
from tests.tls_helpers import CA, Servers

pytestmark = pytest.mark.usefixtures("prefect_api")
ENDPOINT = TlsEndpoint(host="app.test", cert_name="app", reload_command=["true"])


@pytest.fixture
def servers() -> Iterator[Servers]:
    s = Servers()
    yield s
    s.close()


def endpoint(name: str, port: int, ca: CA, server_name: str = "app.test", extra: str = "") -> str:
    return (
        f'[tls.{name}]\nhost = "127.0.0.1"\nport = {port}\nserver_name = "{server_name}"\n'
        f'ca_file = "{ca.pem}"\n{extra}'
    )


def test_every_kind_of_bad_certificate(tmp_path: Path, servers: Servers, inventory: Any) -> None:
    ca = CA(tmp_path)
    ports = {
        "fine": servers.tls(*ca.issue("fine", ["app.test"], days=90)),
        "soon": servers.tls(*ca.issue("soon", ["app.test"], days=20)),
        "days3": servers.tls(*ca.issue("days3", ["app.test"], days=3)),
        "expired": servers.tls(*ca.issue("expired", ["app.test"], days=-2)),
        "wrongname": servers.tls(*ca.issue("wrongname", ["other.test"], days=90)),
        "selfsigned": servers.tls(*ca.issue("selfsigned", ["app.test"], days=90, self_signed=True)),
        "nottls": servers.plain(),
        "silent": servers.never_answers(),
    }
    inventory("".join(endpoint(n, port, ca) for n, port in ports.items()))
    report = tls_certificates(params={"timeout_seconds": 1})
    by_name = {f.target: f for f in report.findings}
    assert by_name["fine"].severity is Severity.ok
    assert by_name["soon"].severity is Severity.warning
    assert by_name["days3"].severity is Severity.critical and 2.9 < by_name["days3"].observed <= 3
    assert "EXPIRED" in by_name["expired"].message
    assert "not valid for this name" in by_name["wrongname"].message
    assert "chain not trusted" in by_name["selfsigned"].message
    assert "does not speak TLS" in by_name["nottls"].message
    assert "no TLS handshake within 1 s" in by_name["silent"].message
    assert all(
        by_name[n].severity is Severity.critical
        for n in ("expired", "wrongname", "selfsigned", "nottls", "silent")
    )
    # Sorted: unreachable endpoints first, then by days left.
    assert {f.target for f in report.findings[:2]} == {"nottls", "silent"}
    left = [f.observed for f in report.findings[2:]]
    assert left == sorted(left) and report.findings[2].target == "expired"
    assert report.status is RunStatus.unhealthy
    # Renewal planned only where it can run: none of these have a renew command.
    assert {a.status for a in report.actions} == {ActionStatus.skipped}


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (None, "cannot be read (No such file or directory); correct the path"),
        ("not a certificate\n", "holds no CA certificate"),
    ],
)
def test_a_ca_file_that_cannot_be_used_is_a_config_error_naming_it(
    tmp_path: Path, servers: Servers, inventory: Any, content: str | None, expected: str
) -> None:
    ca = CA(tmp_path)
    good = servers.tls(*ca.issue("fine", ["app.test"], days=90))
    bad = tmp_path / "bad-ca.pem"
    if content is not None:
        bad.write_text(content)
    # One endpoint's bad ca_file: one clear error for the run, not a traceback from ssl.
    inventory(
        endpoint("fine", good, ca) + endpoint("other", good, ca).replace(str(ca.pem), str(bad))
    )
    with pytest.raises(ConfigError) as caught:
        tls_certificates(params={"timeout_seconds": 1})
    assert str(caught.value).startswith(f"tls.other.ca_file: {bad} ")
    assert expected in str(caught.value)


def test_renewal_that_is_not_served_is_a_failure(
    tmp_path: Path, servers: Servers, inventory: Any
) -> None:
    ca = CA(tmp_path)
    port = servers.tls(*ca.issue("old", ["app.test"], days=3))
    inventory(
        endpoint("app", port, ca, extra='renew_command = ["true"]\nreload_command = ["true"]\n')
    )
    report = tls_certificates(dry_run=False, approval="auto")
    assert report.status is RunStatus.failed
    assert "old certificate is still served" in report.actions[0].detail


def test_failing_renew_command_reports_its_exit_and_stderr(
    tmp_path: Path, servers: Servers, inventory: Any
) -> None:
    ca = CA(tmp_path)
    port = servers.tls(*ca.issue("old", ["app.test"], days=3))
    inventory(
        endpoint(
            "app",
            port,
            ca,
            extra=(
                'renew_command = ["sh", "-c", "echo Challenge failed for app.test >&2; exit 1"]'
                '\nreload_command = ["true"]\n'
            ),
        )
    )
    report = tls_certificates(dry_run=False, approval="auto")
    assert report.actions[0].status is ActionStatus.failed
    assert "exited 1: Challenge failed for app.test" in report.actions[0].detail


def test_each_endpoint_is_judged_by_its_own_thresholds(
    tmp_path: Path, servers: Servers, inventory: Any
) -> None:
    # The same 20-day certificate on two endpoints; one wants a warning 10 days out only, and a
    # renewal 10 days out only.
    ca = CA(tmp_path)
    cert = ca.issue("soon", ["app.test"], days=20)
    renew = 'renew_command = ["true"]\nreload_command = ["true"]\n'
    inventory(
        endpoint("strict", servers.tls(*cert), ca, extra=renew)
        + endpoint("relaxed", servers.tls(*cert), ca, extra=renew)
        + "[tls.relaxed.thresholds]\nwarning_days = 10\nrenew_days = 10\n"
    )
    report = tls_certificates()
    by_name = {f.target: f for f in report.findings}
    assert by_name["strict"].severity is Severity.warning and by_name["strict"].threshold == 30
    assert by_name["relaxed"].severity is Severity.ok and by_name["relaxed"].threshold == 10
    assert [a.target for a in report.actions] == ["strict"]
    # A value given for the run wins over the target's.
    report = tls_certificates(params={"warning_days": 25})
    assert {f.severity for f in report.findings} == {Severity.warning}


# -- renewal timing relative to the certificate's own lifetime (pure rules) ----------------


def served(lifetime: float, left: float, now: datetime) -> ServedCert:
    not_after = now + timedelta(days=left)
    return ServedCert(
        endpoint="app",
        address="app.test:443",
        reachable=True,
        names=["app.test"],
        not_before=not_after - timedelta(days=lifetime),
        not_after=not_after,
        hostname_ok=True,
        chain_ok=True,
    )


@pytest.mark.parametrize(
    ("lifetime", "due", "critical"),
    [(6, 3, 0.5), (45, 15, 3.75), (90, 30, 7.5)],  # Let's Encrypt's short, new and classic
)
def test_renewal_and_warning_at_a_third_of_the_lifetime_half_under_10_days(
    lifetime: float, due: float, critical: float
) -> None:
    now = datetime(2026, 11, 30, 12, tzinfo=UTC)
    assert lifetime_thresholds(lifetime) == Thresholds(warning=due, critical=critical, renew=due)
    p = TlsParams()
    expected = [
        (due + 0.01, Severity.ok, False),
        (due - 0.01, Severity.warning, True),
        (critical + 0.01, Severity.warning, True),
        (critical - 0.01, Severity.critical, True),
    ]
    for left, severity, renew in expected:
        cert = served(lifetime, left, now)
        finding = cert_finding(cert, now, p)
        assert finding.severity is severity, (lifetime, left)
        assert finding.threshold == due
        assert bool(plan_renewals([cert], {"app": ENDPOINT}, now, {"app": p})) is renew, (
            lifetime,
            left,
        )


def test_day_thresholds_override_the_lifetime() -> None:
    now = datetime(2026, 11, 30, 12, tzinfo=UTC)
    cert = served(6, 2.5, now)  # inside half of a 6-day lifetime: a warning, due
    assert cert_finding(cert, now, TlsParams()).severity is Severity.warning
    days = TlsParams(warning_days=2, critical_days=1, renew_days=1)
    assert cert_finding(cert, now, days).severity is Severity.ok
    assert plan_renewals([cert], {"app": ENDPOINT}, now, {"app": days}) == []
    seed = TlsParams(warning_days=30, critical_days=7, renew_days=30)
    assert cert_finding(served(90, 20, now), now, seed).severity is Severity.warning
    assert cert_finding(served(90, 6, now), now, seed).severity is Severity.critical
    unknown = served(90, 20, now).model_copy(update={"not_before": None})
    assert thresholds(unknown, TlsParams()) == lifetime_thresholds(90)  # as a 90-day one


@pytest.mark.parametrize(
    ("output", "words"),
    [
        (  # certbot 2.x, exit 0
            "Processing /etc/letsencrypt/renewal/app.conf\nCertificate not yet due for "
            "renewal\n\nThe following certificates are not due for renewal yet:\n  "
            "/etc/letsencrypt/live/app/fullchain.pem expires on 2026-12-20 (skipped)\n"
            "No renewals were attempted.\n",
            "Certificate not yet due for renewal; The following certificates are not due for "
            "renewal yet:; /etc/letsencrypt/live/app/fullchain.pem expires on 2026-12-20 "
            "(skipped); No renewals were attempted.",
        ),
        ("Cert not yet due for renewal\n", "Cert not yet due for renewal"),  # certbot 0.x
        (  # acme.sh, exit 2
            "[Mon Nov 30 12:00:00 UTC 2026] Renew: 'app.test'\n[Mon Nov 30 12:00:00 UTC "
            "2026] Skip, Next renewal time is: 2026-12-20T12:00:00Z\n[Mon Nov 30 12:00:00 UTC "
            "2026] Add '--force' to force renewal.\n",
            "[Mon Nov 30 12:00:00 UTC 2026] Skip, Next renewal time is: 2026-12-20T12:00:00Z",
        ),
        (  # lego renew
            "2026/11/30 12:00:00 [app.test] The certificate expires in 20 days, the number "
            "of days defined to perform the renewal is 10: no renewal.\n",
            "2026/11/30 12:00:00 [app.test] The certificate expires in 20 days, the number "
            "of days defined to perform the renewal is 10: no renewal.",
        ),
        ("Congratulations, all renewals succeeded:\n  /x/fullchain.pem (success)\n", ""),
    ],
)
def test_what_a_ca_client_says_when_it_declines(output: str, words: str) -> None:
    assert declined(output) == words


def test_a_renewal_of_every_lineage_declined_only_where_it_names_this_one() -> None:
    output = (
        "Processing /etc/letsencrypt/renewal/api.conf\nCertificate not yet due for renewal\n"
        "Processing /etc/letsencrypt/renewal/app.conf\n"
        "Congratulations, all renewals succeeded:\n"
        "  /etc/letsencrypt/live/app/fullchain.pem (success)\n"
        "The following certificates are not due for renewal yet:\n"
        "  /etc/letsencrypt/live/api/fullchain.pem expires on 2026-12-20 (skipped)\n"
    )
    assert declined(output, "app") == ""  # renewed: the reload and the check follow
    skipped = "/etc/letsencrypt/live/api/fullchain.pem expires on 2026-12-20 (skipped)"
    assert declined(output, "api") == skipped
    assert declined(output) == ""
