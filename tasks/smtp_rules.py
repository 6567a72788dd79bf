"""Pure decisions for smtp-check (seed 004 section 7, "SMTP / Email Delivery Failure"): what
each step of an SMTP session says, what to do about a failure of each kind, and what to
switch to when the primary fails and its fallback works (step 4, "Fallback to SMTP")."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import Field

from tasks.models import Finding, Params, Severity

if TYPE_CHECKING:
    from tasks.settings import SmtpTarget
    from tasks.smtp import SmtpProbe, SmtpStep


class SmtpParams(Params):
    """Latency of each step of the SMTP session (connect, TLS, EHLO, AUTH, MAIL, RCPT, ...).
    Servers may delay their greeting on purpose (Postfix's postscreen, 6 s by default):
    raise the limits for such a server in its thresholds."""

    latency_warning_ms: float = Field(
        2000,
        gt=0,
        le=600_000,
        description="milliseconds of one step for a warning; over 0, at most 600000",
    )
    # Not checked against each other: a run may raise one alone, and critical is tested first.
    latency_critical_ms: float = Field(
        10_000,
        gt=0,
        le=600_000,
        description="milliseconds of one step for critical; over 0, at most 600000",
    )


STEPS = {
    "dns": "DNS lookup",
    "connect": "TCP connect",
    "tls": "TLS handshake",
    "greeting": "greeting (220)",
    "ehlo": "EHLO",
    "starttls": "STARTTLS",
    "auth": "AUTH",
    "mail_from": "MAIL FROM",
    "rcpt_to": "RCPT TO",
    "data": "test message (DATA)",
    "rset": "RSET",
}
STATUS_PAGE = "check the provider's status page first (seed 004 s7 step 1)"


def smtp_advice(step: SmtpStep, smtp: SmtpTarget) -> str:
    """What to do next, by the class of the failure (tasks.smtp.classify)."""
    kind, code = step.kind, step.code or 0
    if kind == "dns":
        return f"check the host name {smtp.host!r} and DNS from here (dig {smtp.host})"
    if kind == "connect":
        return (
            f"check host and port ({smtp.port}; 587 is submission with STARTTLS, 465 TLS at "
            "once, 25 relaying, often blocked by cloud providers), that the server runs, and "
            f"the network path from here; {STATUS_PAGE}"
        )
    if kind == "timeout":
        return (
            "the server, or a firewall dropping packets, did not answer in time: check the "
            f"egress path to {smtp.host}:{smtp.port}; {STATUS_PAGE}; raise timeout_seconds "
            "for a slow server"
        )
    if kind == "tls":
        return (
            "the server's certificate is not trusted here or does not name the host: set "
            "ca_file to the CA that signed it (a private relay), check that host is the name on "
            "the certificate, or that nothing intercepts the connection"
        )
    if kind == "tls_protocol":
        return (
            'security = "tls" needs a server that speaks TLS at once (port 465); on port 587 '
            'use security = "starttls"; otherwise the server and this host share no TLS '
            "version (it may only offer TLS 1.0/1.1, which this host refuses)"
        )
    if kind == "closed":
        return (
            "the server hung up: it may limit connections or block this address; "
            f"{STATUS_PAGE}, and its logs"
        )
    if kind == "starttls":
        return 'the server offers no STARTTLS: use security = "tls" on port 465, or another server'
    if kind == "auth":
        if code == 535 or 530 <= code < 540:
            return (
                "the credentials are refused: the SMTP password or API key was rotated or has "
                "expired (seed 004 s7 step 3): set the new one (SMTP_PASS / RESEND_API_KEY) "
                "in the app and here, and redeploy"
            )
        return "authentication failed: check username and the mechanisms the server offers"
    if kind == "sender":
        return (
            f"the server refuses to send as {smtp.sender}: verify the sender or its domain "
            "with the provider (verified senders, SPF/DKIM), or check the account is not "
            "suspended"
        )
    if kind == "recipient":
        if 500 <= code < 600:
            return (
                "a permanent refusal: an unknown mailbox, or relaying denied (authenticate, or "
                "the account is suspended or over its quota); check the provider's dashboard"
            )
        return f"a temporary refusal (4xx: greylisting, a rate limit): retry later; {STATUS_PAGE}"
    if kind == "data":
        return "the message was refused after DATA: a content filter, size or sending quota"
    if kind in ("greeting", "ehlo"):
        return f"the server refuses the session ({code}): it may be overloaded; {STATUS_PAGE}"
    return f"see the reply; {STATUS_PAGE}"


def _failed(step: SmtpStep, probe: SmtpProbe, smtp: SmtpTarget, severity: Severity) -> Finding:
    attempted = [s.step for s in probe.steps]
    later = [STEPS[s] for s in _plan(smtp) if s not in attempted]
    skipped = f" (not attempted: {', '.join(later)})" if later else ""
    code = f" [{step.code}]" if step.code else ""
    return Finding(
        check=step.step,
        target=probe.target,
        severity=severity,
        observed=step.detail if step.code is None else step.code,
        threshold=None,
        message=f"{STEPS[step.step]} with {probe.host}:{probe.port} ({probe.security}) failed "
        f"after {step.ms:.0f} ms, {(step.kind or '').replace('_', ' ')}{code}: {step.detail}. "
        f"{smtp_advice(step, smtp)}{skipped}",
    )


def _plan(smtp: SmtpTarget) -> list[str]:
    """The steps a session with this server goes through, in order (tasks.smtp.probe_smtp)."""
    steps = ["dns", "connect"] + (["tls"] if smtp.security == "tls" else [])
    steps += ["greeting", "ehlo"] + (["starttls"] if smtp.security == "starttls" else [])
    steps += ["auth"] if smtp.username is not None else []
    return [*steps, "mail_from", "rcpt_to", "data" if smtp.send_test else "rset"]


def step_findings(
    probe: SmtpProbe, smtp: SmtpTarget, p: SmtpParams, failure_severity: Severity, prefix: str = ""
) -> list[Finding]:
    """One finding per step attempted (check: prefix + the step's name): a failure at
    failure_severity, a success judged by its milliseconds (observed) against
    latency_warning_ms and latency_critical_ms."""
    found = []
    for step in probe.steps:
        if step.failed:
            failed = _failed(step, probe, smtp, failure_severity)
            found.append(failed.model_copy(update={"check": prefix + step.step}))
            continue
        severity = (
            Severity.critical
            if step.ms > p.latency_critical_ms
            else Severity.warning
            if step.ms > p.latency_warning_ms
            else Severity.ok
        )
        slow = (
            f" (slow: over {p.latency_warning_ms:g} ms; a delayed greeting or a busy server)"
            if severity is not Severity.ok
            else ""
        )
        found.append(
            Finding(
                check=prefix + step.step,
                target=probe.target,
                severity=severity,
                observed=round(step.ms, 1),
                threshold=p.latency_warning_ms,
                message=f"{STEPS[step.step]}: {step.detail}, {step.ms:.0f} ms{slow}",
            )
        )
    return found


def switch_command(smtp: SmtpTarget) -> str:
    """What to set in the app to send through this server (seed 004 s7 step 4); the
    password is never written out."""
    user = f" SMTP_USER={smtp.username} SMTP_PASS=..." if smtp.username else ""
    return f"MAIL_PROVIDER=smtp SMTP_HOST={smtp.host} SMTP_PORT={smtp.port}{user}"


def smtp_findings(
    name: str,
    smtp: SmtpTarget,
    probe: SmtpProbe,
    p: SmtpParams,
    fallback: tuple[SmtpTarget, SmtpProbe] | None = None,
) -> list[Finding]:
    """The findings of smtp-check: the primary's steps (a failure critical), then, with a
    fallback, its steps (checks fallback.STEP, target the fallback's name; a failure critical
    when the primary fails too, else a warning) and
    a `fallback` finding saying whether to switch and how (seed 004 s7 step 4)."""
    found = step_findings(probe, smtp, p, Severity.critical)
    if fallback is None:
        return found
    spare, spare_probe = fallback
    failure, spare_failure = probe.failure, spare_probe.failure
    # The fallback's steps, named fallback.STEP: a report's table may show no target column.
    found += step_findings(
        spare_probe, spare, p, Severity.critical if failure else Severity.warning, "fallback."
    )
    where = f"[smtp.{spare_probe.target}] ({spare.host}:{spare.port})"
    if failure is not None and spare_failure is None:
        severity = Severity.warning
        message = (
            f"{name} fails at {STEPS[failure.step]}; the fallback {where} works: switch "
            f"the app to it with {switch_command(spare)} (the password from your secret "
            "store), e.g. flyctl secrets set ... then flyctl deploy; switch back once "
            f"{name} works again"
        )
    elif failure is not None:
        severity = Severity.critical
        message = (
            f"neither {name} nor its fallback {where} delivers mail: nothing to switch to; "
            f"{STATUS_PAGE}"
        )
    elif spare_failure is not None:
        severity = Severity.warning
        message = (
            f"{name} works, but its fallback {where} fails at "
            f"{STEPS[spare_failure.step]}: there is nothing to switch to if {name} "
            "fails; fix it while nothing is urgent"
        )
    else:
        severity = Severity.ok
        message = (
            f"the fallback {where} works; if {name} fails, switch with {switch_command(spare)}"
        )
    found.append(
        Finding(
            check="fallback",
            target=name,
            severity=severity,
            observed="down" if spare_failure else "works",
            threshold=None,
            message=message,
        )
    )
    return found
