"""tls-certificates against TLS servers on loopback serving certificates made for the test."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from flows.tls_certificates import tls_certificates
from tasks.models import ActionStatus, RunStatus, Severity
from tests.tls_helpers import CA, Servers

pytestmark = pytest.mark.usefixtures("prefect_api")


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
