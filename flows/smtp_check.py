"""smtp-check: can the app still send mail? One SMTP session with the [smtp.NAME] server as
the app has it (DNS, connect, TLS, EHLO, STARTTLS, AUTH, MAIL FROM, RCPT TO, then RSET or a
test message), each step timed and a failure classified; and the fallback server's, with what
to switch the app to (seed 004 section 7, "SMTP / Email Delivery Failure", step 4)."""

from __future__ import annotations

from prefect import State

from tasks.engine import runbook_flow
from tasks.models import AlertInfo, Approval, Report
from tasks.run import open_run
from tasks.settings import Settings
from tasks.smtp import probe_smtp
from tasks.smtp_rules import SmtpParams, smtp_findings

RUNBOOK = "smtp-check"


@runbook_flow(RUNBOOK, inventory="smtp", actions=())
def smtp_check(
    target: str,
    dry_run: bool = True,
    approval: Approval = "ask",
    params: SmtpParams | None = None,
    alert: AlertInfo | None = None,
) -> State[Report]:
    """One SMTP session with the server, step by step, each timed: DNS, TCP connect, TLS
    (security = "tls") or STARTTLS, the greeting, EHLO, AUTH (with a username), MAIL FROM,
    RCPT TO for each address, then RSET; a failure says which kind (DNS, connect refused or
    unreachable, timeout, certificate or TLS version, connection closed, EHLO, AUTH refused,
    sender or recipient refused, with the SMTP code and reply). With a fallback, the same with
    the fallback server, and what to switch the app to.

    Sends nothing, unless the target has send_test = true: then one small test message to its
    `to` addresses, which must be accepted (250). No actions to gate.
    """
    run = open_run(Settings.smtp_target, target, SmtpParams, params)
    smtp = run.target
    # 1. diagnose: the primary, then its fallback (the settings checked that it exists)
    probe = probe_smtp(run.name, smtp)
    fallback = None
    if smtp.fallback is not None:
        spare = run.settings.smtp[smtp.fallback]
        fallback = (spare, probe_smtp(smtp.fallback, spare))
    findings = smtp_findings(run.name, smtp, probe, run.p, fallback)
    # 5. report
    return run.finish(findings, findings, [])
