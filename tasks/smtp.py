"""smtp-check: one SMTP session as the application has it (DNS, connect, TLS, greeting, EHLO,
STARTTLS, AUTH, MAIL FROM, RCPT TO, then RSET or a test message), each step timed and its
failure classified. The stdlib's smtplib, every call bounded by the target's timeout."""

from __future__ import annotations

import concurrent.futures
import contextlib
import errno
import smtplib
import socket
import ssl
import time
from collections.abc import Callable
from datetime import UTC, datetime
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid
from typing import Literal

from pydantic import BaseModel

from tasks.engine import io_task
from tasks.redact import redact
from tasks.settings import SmtpTarget

# The class of a step's failure: what smtp_rules gives advice for.
FailureKind = Literal[
    "dns",
    "connect",
    "timeout",
    "tls",
    "tls_protocol",
    "closed",
    "greeting",
    "ehlo",
    "starttls",
    "auth",
    "sender",
    "recipient",
    "data",
    "protocol",
]
# smtplib's order of preference (SMTP.login).
AUTH_MECHANISMS = ("CRAM-MD5", "PLAIN", "LOGIN")
_TLS_PROTOCOL = ("WRONG_VERSION_NUMBER", "UNSUPPORTED_PROTOCOL", "PROTOCOL_VERSION", "NO_PROTOCOLS")


class SmtpStep(BaseModel):
    """One step of the session: how long it took; when it failed, the class of the failure,
    the SMTP reply code when there was one, and what was seen."""

    step: str
    ms: float
    kind: FailureKind | None = None
    code: int | None = None
    detail: str = ""

    @property
    def failed(self) -> bool:
        return self.kind is not None


class SmtpProbe(BaseModel):
    """One server's session: its steps in order; the last one failed when any did."""

    target: str
    host: str
    port: int
    security: str
    steps: list[SmtpStep]

    @property
    def failure(self) -> SmtpStep | None:
        return next((s for s in self.steps if s.failed), None)


class _Refused(Exception):
    """A reply code other than the one the step needs."""

    def __init__(self, kind: FailureKind, code: int | None, text: str) -> None:
        super().__init__(text)
        self.kind, self.code, self.text = kind, code, text


def _text(reply: bytes | str) -> str:
    text = reply.decode("utf-8", "replace") if isinstance(reply, bytes) else reply
    return " ".join(text.split())


def _expect(kind: FailureKind, reply: tuple[int, bytes], *codes: int) -> str:
    code, text = reply
    if code not in codes:
        raise _Refused(kind, code, f"{code} {_text(text)}")
    return f"{code} {_text(text)}"


def classify(exc: BaseException, timeout: float) -> tuple[FailureKind, int | None, str]:
    """(kind, SMTP code, what happened) of an exception of a step. smtplib's exceptions are
    OSErrors, and so are ssl's: the most specific are tested first."""
    if isinstance(exc, _Refused):
        return exc.kind, exc.code, exc.text
    # smtplib turns a read that timed out into "Connection unexpectedly closed: timed out",
    # keeping the timeout as the exception's context.
    if isinstance(exc, smtplib.SMTPServerDisconnected) and isinstance(
        exc.__context__, TimeoutError
    ):
        return "timeout", None, f"no answer within {timeout:g} s"
    if isinstance(exc, smtplib.SMTPServerDisconnected | ConnectionResetError | BrokenPipeError):
        return "closed", None, f"the server closed the connection ({exc or type(exc).__name__})"
    if isinstance(exc, smtplib.SMTPAuthenticationError):
        return "auth", exc.smtp_code, f"{exc.smtp_code} {_text(exc.smtp_error)}"
    if isinstance(exc, smtplib.SMTPResponseException):
        return "protocol", exc.smtp_code, f"{exc.smtp_code} {_text(exc.smtp_error)}"
    if isinstance(exc, smtplib.SMTPException):
        return "protocol", None, str(exc)
    if isinstance(exc, TimeoutError | concurrent.futures.TimeoutError):
        return "timeout", None, f"no answer within {timeout:g} s"
    if isinstance(exc, socket.gaierror):
        return "dns", None, f"the name does not resolve ({exc.strerror})"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return "tls", None, f"certificate verify failed: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        reason = exc.reason or exc.strerror or str(exc)
        if any(p in str(reason) for p in _TLS_PROTOCOL):
            return "tls_protocol", None, f"TLS protocol version or mode mismatch ({reason})"
        return "tls", None, f"TLS handshake failed ({reason})"
    if isinstance(exc, ConnectionRefusedError):
        return "connect", None, "connection refused: nothing listens there"
    if isinstance(exc, OSError) and exc.errno in (errno.ENETUNREACH, errno.EHOSTUNREACH):
        return "connect", None, f"unreachable ({exc.strerror})"
    if isinstance(exc, OSError):
        return "connect", None, exc.strerror or str(exc) or type(exc).__name__
    return "protocol", None, f"{type(exc).__name__}: {exc}"


def _resolve(host: str, port: int, timeout: float) -> list[tuple[str, int]]:
    """getaddrinfo has no timeout of its own: it runs in a thread waited for `timeout`."""
    pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="smtp-dns")
    try:
        found = pool.submit(socket.getaddrinfo, host, port, 0, socket.SOCK_STREAM)
        infos = found.result(timeout=timeout)
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
    return list(dict.fromkeys((str(info[4][0]), int(info[4][1])) for info in infos))


def _connect(addresses: list[tuple[str, int]], timeout: float) -> socket.socket:
    """The first address that accepts a TCP connection; the last failure when none does."""
    failure: OSError = OSError("no address to connect to")
    for address in addresses:
        try:
            return socket.create_connection(address, timeout=timeout)
        except OSError as exc:
            failure = exc
    raise failure


def tls_context(smtp: SmtpTarget) -> ssl.SSLContext:
    """Certificate and host name verified, against ca_file or the system's CAs."""
    return ssl.create_default_context(cafile=smtp.ca_file)


def test_message(name: str, smtp: SmtpTarget, now: datetime) -> bytes:
    """The small message send_test sends: who sent it and why, nothing else."""
    msg = EmailMessage()
    msg["From"] = smtp.sender
    msg["To"] = ", ".join(smtp.to)
    msg["Subject"] = f"runbook smtp-check test message ({name})"
    msg["Date"] = format_datetime(now)
    msg["Message-ID"] = make_msgid(domain=smtp.sender.rsplit("@", 1)[1])
    msg.set_content(
        f"Sent by the smtp-check runbook through [smtp.{name}] ({smtp.host}:{smtp.port}) at "
        f"{now:%Y-%m-%d %H:%M:%S} UTC to check mail delivery. No action is needed.\n"
    )
    return msg.as_bytes()


def _scrub(text: str, smtp: SmtpTarget) -> str:
    """A server's reply never quotes the password; if one ever did, it would not go further."""
    return redact(text, [smtp.password])


# No Prefect retries: a probe reports what one session saw. Every smtplib call is bounded by
# the target's timeout_seconds; the task's own timeout is a backstop over a dozen of them.
@io_task("probe-smtp", timeout_seconds=1800, retries=0)
def probe_smtp(name: str, smtp: SmtpTarget) -> SmtpProbe:
    """One SMTP session with an [smtp.NAME] server, step by step, stopping at the first that
    fails: dns (getaddrinfo), connect (TCP), tls (security = "tls": the handshake), greeting
    (220), ehlo (250), starttls (security = "starttls": STARTTLS, the handshake and EHLO
    again), auth (with a username: AUTH, 235), mail_from (250), rcpt_to (250/251 for each
    address), then data (send_test: the test message, 250) or rset (250), and QUIT.

    Args:
        name: the [smtp.NAME] entry's name.
        smtp: its inventory entry (timeout_seconds bounds each call, in seconds).

    Returns:
        SmtpProbe: each step attempted with its milliseconds; a failed step (the last) with the
        class of its failure (dns, connect, timeout, tls, tls_protocol, closed, greeting, ehlo,
        starttls, auth, sender, recipient, data, protocol), the SMTP code and reply.

    Raises:
        Nothing of its own: network, TLS and SMTP failures are in the SmtpProbe."""
    t = smtp.timeout_seconds
    steps: list[SmtpStep] = []

    def step(label: str, call: Callable[[], str]) -> bool:
        start = time.perf_counter()
        try:
            detail = call()
        except (OSError, smtplib.SMTPException, concurrent.futures.TimeoutError, _Refused) as exc:
            kind, code, text = classify(exc, t)
            ms = (time.perf_counter() - start) * 1000
            detail = _scrub(text, smtp)
            steps.append(SmtpStep(step=label, ms=ms, kind=kind, code=code, detail=detail))
            return False
        ms = (time.perf_counter() - start) * 1000
        steps.append(SmtpStep(step=label, ms=ms, detail=_scrub(detail, smtp)))
        return True

    addresses: list[tuple[str, int]] = []
    sock: list[socket.socket] = []
    # No host given: smtplib does not connect; the socket made below is handed to it.
    session = smtplib.SMTP(timeout=t)
    # smtplib takes the name STARTTLS verifies the certificate against from here.
    session._host = smtp.host  # type: ignore[attr-defined]

    def dns() -> str:
        addresses.extend(_resolve(smtp.host, smtp.port, t))
        return ", ".join(a for a, _ in addresses)

    def connect() -> str:
        sock.append(_connect(addresses, t))
        return f"connected to {sock[0].getpeername()[0]}:{smtp.port}"

    def implicit_tls() -> str:
        wrapped = tls_context(smtp).wrap_socket(sock[0], server_hostname=smtp.host)
        sock[0] = wrapped
        return f"{wrapped.version()}, certificate verified for {smtp.host}"

    def greeting() -> str:
        session.sock = sock[0]
        return _expect("greeting", session.getreply(), 220)

    def ehlo() -> str:
        return _expect("ehlo", session.ehlo(), 250).split(" ", 2)[0] + " EHLO accepted"

    def starttls() -> str:
        if not session.has_extn("starttls"):
            raise _Refused("starttls", None, "the server does not offer STARTTLS after EHLO")
        _expect("starttls", session.starttls(context=tls_context(smtp)), 220)
        _expect("ehlo", session.ehlo(), 250)
        version = session.sock.version() if isinstance(session.sock, ssl.SSLSocket) else "?"
        return f"{version}, certificate verified for {smtp.host}"

    def auth() -> str:
        assert smtp.username is not None and smtp.password is not None  # the settings pair them
        if not session.has_extn("auth"):
            raise _Refused("auth", None, "the server offers no AUTH (after EHLO)")
        offered = session.esmtp_features["auth"].upper().split()
        mechanism = next((m for m in AUTH_MECHANISMS if m in offered), None)
        if mechanism is None:
            raise _Refused("auth", None, f"no mechanism this check speaks ({' '.join(offered)})")
        # One mechanism, one attempt: smtplib's login() would retry a refused password with
        # each other mechanism offered, and count against the account's lockout as many times.
        session.user, session.password = smtp.username, smtp.password.get_secret_value()
        method = getattr(session, "auth_" + mechanism.lower().replace("-", "_"))
        code, text = session.auth(mechanism, method, initial_response_ok=True)
        return f"{code} {_text(text)} ({mechanism} as {smtp.username})"

    def mail_from() -> str:
        return _expect("sender", session.mail(smtp.sender), 250)

    def rcpt_to() -> str:
        refused = []
        for address in smtp.to:
            code, reply = session.rcpt(address)
            if code not in (250, 251):
                refused.append((address, code, f"{code} {_text(reply)}"))
        if refused:
            first, code, said = refused[0]
            more = f" (and {len(refused) - 1} more)" if len(refused) > 1 else ""
            raise _Refused("recipient", code, f"{first}: {said}{more}")
        return f"{len(smtp.to)} recipient(s) accepted"

    def data() -> str:
        message = test_message(name, smtp, datetime.now(UTC))
        try:
            reply = session.data(message)
        except smtplib.SMTPDataError as exc:  # DATA itself refused (not 354)
            text = f"{exc.smtp_code} {_text(exc.smtp_error)}"
            raise _Refused("data", exc.smtp_code, text) from exc
        return "test message accepted: " + _expect("data", reply, 250)

    def rset() -> str:
        return "no message sent: " + _expect("protocol", session.rset(), 250)

    try:
        plan: list[tuple[str, Callable[[], str]]] = [("dns", dns), ("connect", connect)]
        if smtp.security == "tls":
            plan.append(("tls", implicit_tls))
        plan += [("greeting", greeting), ("ehlo", ehlo)]
        if smtp.security == "starttls":
            plan.append(("starttls", starttls))
        if smtp.username is not None:
            plan.append(("auth", auth))
        plan += [("mail_from", mail_from), ("rcpt_to", rcpt_to)]
        plan.append(("data", data) if smtp.send_test else ("rset", rset))
        for label, call in plan:
            if not step(label, call):
                break
        else:
            # The check is over: a server slow to say goodbye changes nothing.
            with contextlib.suppress(OSError, smtplib.SMTPException):
                session.quit()
    finally:
        session.close()
        for opened in sock:
            opened.close()  # closing twice is harmless; one never handed over is closed here
    return SmtpProbe(
        target=name, host=smtp.host, port=smtp.port, security=smtp.security, steps=steps
    )
