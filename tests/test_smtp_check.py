"""smtp-check against real SMTP servers (aiosmtpd) on loopback: STARTTLS with a certificate
from a test CA, AUTH that accepts one credential and refuses others (535), a recipient refused
(550), implicit TLS, a certificate from a CA this host does not trust, a server that hangs up,
one that never answers, a port with nothing listening, a name that does not resolve, and a
fallback that works while the primary is down. Through the CLI: exit 1 on each incident, 0
when healthy, 2 on a bad configuration."""

from __future__ import annotations

import json
import queue
import socketserver
import ssl
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from email import message_from_bytes
from email.message import Message
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword

from deployments.localapps import SmtpServer
from deployments.localpg import free_port
from deployments.localtls import CA, Servers
from flows.smtp_check import smtp_check
from tasks.models import RunStatus, Severity
from tasks.settings import SmtpTarget
from tasks.smtp import SmtpProbe, SmtpStep
from tasks.smtp_rules import SmtpParams, smtp_findings, switch_command
from tests.test_cli import cli, no_traceback

pytestmark = pytest.mark.usefixtures("prefect_api")
PASSWORD = "Smtp-Pass-6e2d8a"
USER = "app"
REFUSED = "gone@example.com"
STARTTLS_STEPS = ["dns", "connect", "greeting", "ehlo", "starttls", "auth", "mail_from", "rcpt_to"]
# A busy machine can take a while a step: slow steps have their own test.
PATIENT = "[smtp.mail.thresholds]\nlatency_warning_ms = 60000\nlatency_critical_ms = 120000\n"


@dataclass
class Mailbox:
    """What the server was given: (mail from, recipients, message) per message accepted."""

    mails: queue.Queue[tuple[str, list[str], Message]] = field(default_factory=queue.Queue)

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, options: Any
    ) -> str:
        if address == REFUSED:
            return f"550 5.1.1 <{address}>: Recipient address rejected: User unknown"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.mails.put(
            (envelope.mail_from, envelope.rcpt_tos, message_from_bytes(envelope.content))
        )
        return "250 2.0.0 OK: queued"


def one_credential(
    server: Any, session: Any, envelope: Any, mechanism: str, auth_data: Any
) -> AuthResult:
    ok = (
        isinstance(auth_data, LoginPassword)
        and auth_data.login == USER.encode()
        and auth_data.password == PASSWORD.encode()
    )
    return AuthResult(success=ok, handled=False)  # False: aiosmtpd answers 535 itself


@dataclass
class Smtp:
    port: int
    box: Mailbox
    ca: Path


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> CA:
    return CA(tmp_path_factory.mktemp("smtp-ca"), "SMTP Test CA")


def server_context(ca: CA, label: str) -> ssl.SSLContext:
    cert, key = ca.issue(label, ["mail.test"], days=60)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    return context


@pytest.fixture
def start_smtp(ca: CA) -> Iterator[Callable[..., Smtp]]:
    """An aiosmtpd server on 127.0.0.1: STARTTLS required, AUTH of USER/PASSWORD only;
    implicit=True: TLS at once (port 465 style) instead."""
    controllers: list[Controller] = []

    def start(implicit: bool = False, signed_by: CA | None = None) -> Smtp:
        box, port = Mailbox(), free_port()
        context = server_context(signed_by or ca, f"smtp-{port}")
        # aiosmtpd knows TLS only through STARTTLS: with TLS at once it would offer no AUTH.
        tls: dict[str, Any] = (
            {"ssl_context": context, "auth_require_tls": False}
            if implicit
            else {"tls_context": context, "require_starttls": True, "auth_require_tls": True}
        )
        controller = Controller(
            box,
            hostname="127.0.0.1",
            port=port,
            authenticator=one_credential,
            server_hostname="mail.test",
            **tls,
        )
        controller.start()
        controllers.append(controller)
        return Smtp(port, box, ca.pem)

    yield start
    for controller in controllers:
        controller.stop()


def config(
    port: int,
    *,
    name: str = "mail",
    security: str = "starttls",
    password: str | None = PASSWORD,
    ca_file: Path | None = None,
    to: str = '"signup@example.com"',
    extra: str = "",
    host: str = "127.0.0.1",
) -> str:
    lines = [
        f"[smtp.{name}]",
        f'host = "{host}"',
        f"port = {port}",
        f'security = "{security}"',
        'from = "noreply@example.com"',
        f"to = {to}",
        "timeout_seconds = 5",
    ]
    if password is not None:
        lines += [f'username = "{USER}"', f'password = "{password}"']
    if ca_file is not None:
        lines.append(f'ca_file = "{ca_file}"')
    return "\n".join(lines) + "\n" + extra + "\n"


def by_check(findings: list[Any], target: str = "mail") -> dict[str, Any]:
    return {f.check: f for f in findings if f.target == target}


def run_cli(prefect_api: str, *args: str) -> tuple[Any, dict[str, Any]]:
    proc = cli("run", "smtp-check", *args, "--json", env={"PREFECT_API_URL": prefect_api})
    no_traceback(proc)
    assert PASSWORD not in proc.stdout + proc.stderr
    return proc, json.loads(proc.stdout) if proc.stdout.strip() else {}


def test_a_healthy_starttls_server_with_auth_through_the_cli(
    start_smtp: Callable[..., Smtp], inventory: Any, prefect_api: str
) -> None:
    smtp = start_smtp()
    inventory(config(smtp.port, ca_file=smtp.ca, extra=PATIENT))
    proc, report = run_cli(prefect_api, "--target", "mail")
    assert proc.returncode == 0, proc.stderr
    assert report["status"] == "healthy" and report["actions"] == []
    assert [f["check"] for f in report["findings"]] == [*STARTTLS_STEPS, "rset"]
    for finding in report["findings"]:
        # Each step's time in ms, to 0.1 ms: a quick step on loopback may show 0.0.
        assert finding["severity"] == "ok" and 0 <= finding["observed"] < 60000
    found = {f["check"]: f for f in report["findings"]}
    assert "certificate verified for 127.0.0.1" in found["starttls"]["message"]
    assert f"as {USER}" in found["auth"]["message"]
    assert "no message sent" in found["rset"]["message"]
    assert smtp.box.mails.empty()  # RSET: nothing was sent


def test_send_test_sends_one_message_that_must_be_accepted(
    start_smtp: Callable[..., Smtp], inventory: Any
) -> None:
    smtp = start_smtp()
    inventory(
        config(
            smtp.port,
            ca_file=smtp.ca,
            to='["signup@example.com", "ops@example.com"]',
            extra="send_test = true\n" + PATIENT,
        )
    )
    report = smtp_check("mail")
    assert report.status is RunStatus.healthy
    assert [f.check for f in report.findings] == [*STARTTLS_STEPS, "data"]
    sender, recipients, mail = smtp.box.mails.get(timeout=10)
    assert sender == "noreply@example.com"
    assert recipients == ["signup@example.com", "ops@example.com"]
    assert mail["Subject"] == "runbook smtp-check test message (mail)"
    assert "250 2.0.0 OK: queued" in by_check(report.findings)["data"].message
    assert smtp.box.mails.empty()


def test_a_rotated_password_is_refused_with_535_through_the_cli(
    start_smtp: Callable[..., Smtp], inventory: Any, prefect_api: str
) -> None:
    smtp = start_smtp()
    inventory(config(smtp.port, password="Old-Pass-0000", ca_file=smtp.ca, extra=PATIENT))
    proc, report = run_cli(prefect_api)
    assert proc.returncode == 1, proc.stderr
    auth = report["findings"][-1]
    assert auth["check"] == "auth" and auth["severity"] == "critical" and auth["observed"] == 535
    assert "535 5.7.8 Authentication credentials invalid" in auth["message"]
    assert "rotated or has expired" in auth["message"]
    assert "not attempted: MAIL FROM, RCPT TO, RSET" in auth["message"]
    assert "Old-Pass-0000" not in proc.stdout + proc.stderr


def test_a_recipient_refused_with_550(start_smtp: Callable[..., Smtp], inventory: Any) -> None:
    smtp = start_smtp()
    inventory(
        config(
            smtp.port,
            ca_file=smtp.ca,
            to=f'["signup@example.com", "{REFUSED}"]',
            extra="send_test = true\n" + PATIENT,
        )
    )
    report = smtp_check("mail")
    assert report.status is RunStatus.unhealthy and report.exit_code == 1
    rcpt = by_check(report.findings)["rcpt_to"]
    assert rcpt.severity is Severity.critical and rcpt.observed == 550
    assert f"{REFUSED}: 550 5.1.1 <{REFUSED}>: Recipient address rejected" in rcpt.message
    assert "a permanent refusal" in rcpt.message
    assert "data" not in by_check(report.findings)
    assert smtp.box.mails.empty()  # the session stopped: no test message went out


def test_implicit_tls_and_tls_spoken_to_a_starttls_port(
    start_smtp: Callable[..., Smtp], inventory: Any
) -> None:
    implicit, starttls = start_smtp(implicit=True), start_smtp()
    inventory(
        config(implicit.port, security="tls", ca_file=implicit.ca, extra=PATIENT)
        + config(starttls.port, name="wrong", security="tls", ca_file=starttls.ca)
    )
    report = smtp_check("mail")
    assert report.status is RunStatus.healthy
    assert [f.check for f in report.findings][:3] == ["dns", "connect", "tls"]
    assert "starttls" not in by_check(report.findings)

    [*_, tls] = smtp_check("wrong").findings
    assert tls.check == "tls" and tls.severity is Severity.critical
    assert "TLS protocol version or mode mismatch" in tls.message
    assert 'on port 587 use security = "starttls"' in tls.message


def test_a_certificate_from_a_ca_this_host_does_not_trust(
    start_smtp: Callable[..., Smtp], inventory: Any, tmp_path: Path, ca: CA
) -> None:
    smtp = start_smtp(signed_by=CA(tmp_path, "Intercepting CA"))
    inventory(config(smtp.port, ca_file=ca.pem))  # trusts only the test CA
    report = smtp_check("mail")
    assert report.exit_code == 1
    starttls = by_check(report.findings)["starttls"]
    assert starttls.severity is Severity.critical
    assert "certificate verify failed: unable to get local issuer certificate" in (starttls.message)
    assert "set ca_file to the CA that signed it" in starttls.message
    assert "auth" not in by_check(report.findings)  # no password sent to it


class HangsUp(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        self.request.close()


@pytest.fixture
def hangs_up() -> Iterator[int]:
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), HangsUp)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()
    thread.join(5)


def test_a_server_that_closes_the_connection(hangs_up: int, inventory: Any) -> None:
    inventory(config(hangs_up, password=None, security="none"))
    [*_, greeting] = smtp_check("mail").findings
    assert greeting.check == "greeting" and greeting.severity is Severity.critical
    assert "closed the connection" in greeting.message and "hung up" in greeting.message


def test_nothing_listening_a_silent_server_and_a_name_that_does_not_resolve(
    inventory: Any,
) -> None:
    silent = Servers()
    try:
        inventory(
            config(free_port(), password=None, security="none")
            + config(silent.never_answers(), name="silent", password=None, security="none")
            # Not a host name (a space, RFC 1123 s2.1): the C library's resolver refuses it before
            # any query (glibc res_hnok, musl is_valid_hostname), so the lookup fails the same way
            # on every machine. A .invalid name (RFC 2606) is still sent to the machine's DNS
            # server, which may never answer: then the check rightly says timeout, not dns.
            + config(25, name="typo", host="smtp mail.example.com", password=None)
        )
        [*_, connect] = smtp_check("mail").findings
        [*_, greeting] = smtp_check("silent", params={"latency_critical_ms": 600_000}).findings
        [dns] = smtp_check("typo").findings
    finally:
        silent.close()
    assert connect.check == "connect" and connect.severity is Severity.critical
    assert "connection refused: nothing listens there" in connect.message
    assert "587 is submission with STARTTLS" in connect.message
    assert greeting.check == "greeting" and "timeout" in greeting.message
    assert "no answer within 5 s" in greeting.message
    assert dns.check == "dns" and "the name does not resolve" in dns.message


def test_a_healthy_fallback_while_the_primary_is_down_through_the_cli(
    start_smtp: Callable[..., Smtp], inventory: Any, prefect_api: str
) -> None:
    relay = start_smtp()
    inventory(
        config(free_port(), extra='fallback = "relay"', ca_file=relay.ca)
        + config(relay.port, name="relay", ca_file=relay.ca)
        + "[smtp.relay.thresholds]\nlatency_warning_ms = 60000\nlatency_critical_ms = 120000\n"
    )
    proc, report = run_cli(prefect_api, "--target", "mail")
    assert proc.returncode == 1, proc.stderr
    primary = [f for f in report["findings"] if f["target"] == "mail" and f["check"] != "fallback"]
    spare = [f for f in report["findings"] if f["target"] == "relay"]
    assert [f["check"] for f in primary] == ["dns", "connect"]
    assert primary[-1]["severity"] == "critical"
    assert [f["check"] for f in spare] == [f"fallback.{s}" for s in [*STARTTLS_STEPS, "rset"]]
    assert all(f["severity"] == "ok" for f in spare)
    [fallback] = [f for f in report["findings"] if f["check"] == "fallback"]
    assert fallback["severity"] == "warning"
    assert (
        f"switch the app to it with MAIL_PROVIDER=smtp SMTP_HOST=127.0.0.1 "
        f"SMTP_PORT={relay.port} SMTP_USER={USER} SMTP_PASS=..."
    ) in fallback["message"]


def test_the_sandbox_provider_refuses_the_recipient_and_its_relay_takes_it(
    inventory: Any,
) -> None:
    provider = SmtpServer(rcpt_reply=b"550 5.7.1 <signup@example.com>: Relaying denied")
    relay = SmtpServer()
    try:
        inventory(
            config(provider.port, name="provider", security="none", password=None)
            + 'fallback = "relay"\n'
            + config(relay.port, name="relay", security="none", password=None)
            + "[smtp.provider.thresholds]\nlatency_warning_ms = 60000\n"
            + "latency_critical_ms = 120000\n"
        )
        report = smtp_check("provider")
    finally:
        provider.close()
        relay.close()
    assert report.exit_code == 1
    rcpt = by_check(report.findings, "provider")["rcpt_to"]
    assert rcpt.severity is Severity.critical and "550 5.7.1" in rcpt.message
    fallback = by_check(report.findings, "provider")["fallback"]
    assert fallback.severity is Severity.warning and "SMTP_HOST=127.0.0.1" in fallback.message


def test_slow_steps_by_the_targets_thresholds(
    start_smtp: Callable[..., Smtp], inventory: Any
) -> None:
    smtp = start_smtp()
    # Real latencies are well over a microsecond: every step is over this warning limit.
    inventory(
        config(smtp.port, ca_file=smtp.ca)
        + "[smtp.mail.thresholds]\nlatency_warning_ms = 0.001\nlatency_critical_ms = 120000\n"
    )
    report = smtp_check("mail")
    assert report.status is RunStatus.unhealthy
    assert {f.severity for f in report.findings} == {Severity.warning}
    assert all("slow" in f.message for f in report.findings)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            config(25, password=None, security="none", extra='fallback = "mail"'),
            "smtp.mail.fallback names the server itself",
        ),
        (
            config(25, password=None, security="none", extra='fallback = "spare"'),
            "smtp.mail.fallback names 'spare', which is not an [smtp.*] entry",
        ),
        (config(70000), "smtp.mail.port: Input should be less than or equal to 65535"),
        (config(25).replace(f'password = "{PASSWORD}"\n', ""), "set both username and password"),
        (config(25, security="none"), 'security = "none" with a username would send'),
        (config(25, to='"Ops <ops@example.com>"'), "is not a mail address"),
        (config(25, to="[]"), "smtp.mail.to: List should have at least 1 item"),
        (config(25).replace('from = "noreply@example.com"\n', ""), "smtp.mail.from: Field"),
    ],
)
def test_a_bad_configuration_exits_2_naming_its_key_without_the_password(
    inventory: Any, text: str, expected: str
) -> None:
    inventory(text)
    proc = cli("run", "smtp-check")
    assert proc.returncode == 2, proc.stderr
    assert expected in proc.stderr and PASSWORD not in proc.stderr + proc.stdout
    no_traceback(proc)


# The rules alone: what the fallback finding says in each case.

TARGET = SmtpTarget.model_validate(
    {"host": "smtp.example.com", "from": "a@example.com", "to": "b@example.com"}
)
SPARE = SmtpTarget.model_validate(
    {
        "host": "smtp.fallback.com",
        "from": "a@example.com",
        "to": "b@example.com",
        "username": "u",
        "password": PASSWORD,
    }
)


def probe(target: str, failed_at: str | None) -> SmtpProbe:
    steps = [SmtpStep(step="dns", ms=1.0)]
    if failed_at is not None:
        steps.append(SmtpStep(step=failed_at, ms=2.0, kind="connect", detail="refused"))
    return SmtpProbe(target=target, host="h", port=587, security="starttls", steps=steps)


@pytest.mark.parametrize(
    ("primary", "spare", "severity", "says"),
    [
        (None, None, Severity.ok, "if mail fails, switch with MAIL_PROVIDER=smtp"),
        ("connect", None, Severity.warning, "switch the app to it with"),
        ("connect", "connect", Severity.critical, "nothing to switch to"),
        (None, "connect", Severity.warning, "fix it while nothing is urgent"),
    ],
)
def test_the_fallback_finding(
    primary: str | None, spare: str | None, severity: Severity, says: str
) -> None:
    found = smtp_findings(
        "mail", TARGET, probe("mail", primary), SmtpParams(), (SPARE, probe("relay", spare))
    )
    fallback = found[-1]
    assert fallback.check == "fallback" and fallback.severity is severity
    assert says in fallback.message and PASSWORD not in fallback.message
    relay_failure = [f for f in found if f.target == "relay" and f.check == "fallback.connect"]
    if spare:  # the fallback's own failure: critical only when the primary fails too
        expected = Severity.critical if primary else Severity.warning
        assert relay_failure[0].severity is expected


def test_the_switch_command_never_holds_the_password() -> None:
    assert switch_command(SPARE) == (
        "MAIL_PROVIDER=smtp SMTP_HOST=smtp.fallback.com SMTP_PORT=587 SMTP_USER=u SMTP_PASS=..."
    )
    assert switch_command(TARGET) == "MAIL_PROVIDER=smtp SMTP_HOST=smtp.example.com SMTP_PORT=587"
