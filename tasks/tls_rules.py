"""Pure decisions for tls-certificates (seeds 000 s5, 002 s3 and its thresholds, 003 "SSL
Certificate Issues")."""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import datetime
from typing import TYPE_CHECKING, Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field

from tasks.models import Action, ActionStatus, Finding, Params, Severity

if TYPE_CHECKING:
    from tasks.settings import TlsEndpoint
    from tasks.tls import ServedCert

# The kinds of action tls-certificates plans (the flow and deployments.catalog read them from here).
TlsAction = Literal["renew_certificate"]


class PlannedCert(BaseModel):
    """The certificate served when a renewal was planned: a renewal is proven when another
    one, for the same names, is served afterwards."""

    model_config = ConfigDict(frozen=True)

    fingerprint: str
    names: list[str]
    not_after: datetime | None


class TlsParams(Params):
    """Renewal timing. Unset, each is relative to the certificate's own lifetime (notAfter -
    notBefore, see lifetime_thresholds); a number of days overrides it for every
    certificate."""

    warning_days: float | None = Field(
        None, ge=0, le=3650, description="days left under which it is a warning; 0 to 3650"
    )
    critical_days: float | None = Field(
        None, ge=0, le=3650, description="days left under which it is critical; 0 to 3650"
    )
    renew_days: float | None = Field(
        None, ge=0, le=3650, description="days left under which it is renewed; 0 to 3650"
    )
    timeout_seconds: float = Field(
        5, gt=0, le=120, description="seconds to connect and handshake; over 0, at most 120"
    )


SHORT_LIFETIME_DAYS = 10
DEFAULT_LIFETIME_DAYS = 90  # when the certificate's own is unknown


class Thresholds(NamedTuple):
    """Days left under which a certificate is a warning, critical, due for renewal."""

    warning: float
    critical: float
    renew: float


def lifetime_days(cert: ServedCert) -> float | None:
    if cert.not_after is None or cert.not_before is None:
        return None
    return (cert.not_after - cert.not_before).total_seconds() / 86400


def lifetime_thresholds(lifetime: float) -> Thresholds:
    """The defaults for a certificate valid `lifetime` days. Renewal is due, and a warning,
    when a third of the lifetime is left, or half under a 10-day lifetime (certbot 4's
    default, which fits Let's Encrypt's 90-day, 45-day and 6-day certificates); critical
    when a twelfth is left (7.5 of 90 days: seed 002's 7 days). 90 days: 30 and 7.5; 45
    days: 15 and 3.75; 6 days: 3 and 0.5."""
    due = lifetime / 2 if lifetime < SHORT_LIFETIME_DAYS else lifetime / 3
    return Thresholds(warning=due, critical=lifetime / 12, renew=due)


def thresholds(cert: ServedCert, p: TlsParams) -> Thresholds:
    """The lifetime's defaults (DEFAULT_LIFETIME_DAYS when unknown), each overridden by a
    day count the run or the target sets."""
    default = lifetime_thresholds(lifetime_days(cert) or DEFAULT_LIFETIME_DAYS)
    return Thresholds(
        warning=default.warning if p.warning_days is None else p.warning_days,
        critical=default.critical if p.critical_days is None else p.critical_days,
        renew=default.renew if p.renew_days is None else p.renew_days,
    )


def days_left(cert: ServedCert, now: datetime) -> float | None:
    return (cert.not_after - now).total_seconds() / 86400 if cert.not_after else None


# What CA clients print when they decline to renew a certificate not due by their own
# settings: certbot ("Cert not yet due for renewal", from 1.x "Certificate not yet due for
# renewal", then "The following certificates are not due for renewal yet: ... (skipped)",
# "No renewals were attempted."), acme.sh ("Skip, Next renewal time is: ...", exit 2) and
# lego ("... the number of days defined to perform the renewal is 30: no renewal.").
DECLINED = re.compile(
    r"not yet due for renewal|not due for renewal yet|\(skipped\)|no renewals were attempted"
    r"|skip, next renewal time is|: no renewal\.",
    re.IGNORECASE,
)


# ... and what they print when they did renew (certbot "(success)", "Congratulations, all
# renewals succeeded"; acme.sh "Cert success."; lego "Server responded with a certificate").
RENEWED = re.compile(
    r"\(success\)|renewals succeeded|cert success|server responded with a certificate",
    re.IGNORECASE,
)


def declined(output: str, cert_name: str | None = None) -> str:
    """The lines in which a renew command's CA client says it did not renew; "" if none.
    When it renewed something too (a renew of every lineage), only a declined line naming
    this certificate's lineage (`live/CERT_NAME/`) counts."""
    lines = [line.strip() for line in output.splitlines() if DECLINED.search(line)]
    if lines and RENEWED.search(output):
        lines = [line for line in lines if cert_name and f"/live/{cert_name}/" in line]
    return "; ".join(lines)[-600:]


def renew_argv(ep: TlsEndpoint) -> list[str] | None:
    if ep.renew_command:
        return ep.renew_command
    if ep.cert_name:
        return [
            "certbot",
            "renew",
            "--cert-name",
            ep.cert_name,
            "--non-interactive",
            "--no-random-sleep-on-renew",
        ]
    return None


def cert_finding(cert: ServedCert, now: datetime, p: TlsParams) -> Finding:
    left, limits, lifetime = days_left(cert, now), thresholds(cert, p), lifetime_days(cert)
    problems = []
    if not cert.reachable:
        problems.append(cert.error)
    else:
        if left is not None and left <= 0:
            problems.append(f"EXPIRED {-left:.1f} days ago")
        if not cert.hostname_ok:
            problems.append(
                f"not valid for this name (valid for {', '.join(cert.names) or cert.subject})"
            )
        if not cert.chain_ok:
            problems.append(f"chain not trusted: {cert.chain_error}")
    if problems or (left is not None and left < limits.critical):
        severity = Severity.critical
    elif left is not None and left < limits.warning:
        severity = Severity.warning
    else:
        severity = Severity.ok
    facts = (
        f"{left:.1f} days left (until {cert.not_after:%Y-%m-%d %H:%M} UTC"
        + (f", of {lifetime:.0f}" if lifetime is not None else "")
        + f"), issuer {cert.issuer}; warning under {limits.warning:.1f} days, critical under "
        f"{limits.critical:.1f}"
        if cert.reachable and cert.not_after and left is not None
        else ""
    )
    return Finding(
        check="certificate",
        target=cert.endpoint,
        severity=severity,
        observed=None if left is None else round(left, 2),
        threshold=round(limits.warning, 2),
        message=f"{cert.address}: " + "; ".join([*problems, facts] if facts else problems),
    )


def tls_findings(
    certs: list[ServedCert], now: datetime, params: Mapping[str, TlsParams]
) -> list[Finding]:
    """Per endpoint, judged by its own parameters (params by endpoint name), the ones closest
    to expiry (or broken) first."""
    ordered = sorted(certs, key=lambda c: (c.reachable, days_left(c, now) or 0.0))
    return [cert_finding(c, now, params[c.endpoint]) for c in ordered]


def plan_renewals(
    certs: list[ServedCert],
    endpoints: dict[str, TlsEndpoint],
    now: datetime,
    params: Mapping[str, TlsParams],
) -> list[Action[TlsAction, PlannedCert]]:
    """A renewal of each reachable endpoint within its own renew_days of expiry."""
    actions: list[Action[TlsAction, PlannedCert]] = []
    for cert in certs:
        left = days_left(cert, now)
        if (
            not cert.reachable
            or left is None
            or left > thresholds(cert, params[cert.endpoint]).renew
        ):
            continue
        ep = endpoints[cert.endpoint]
        action: Action[TlsAction, PlannedCert] = Action(
            kind="renew_certificate",
            target=cert.endpoint,
            destructive=False,
            description=f"renew the certificate of {cert.address} ({left:.1f} days "
            "left), reload its proxy, check the new one is served",
            args=PlannedCert(
                fingerprint=cert.fingerprint, names=cert.names, not_after=cert.not_after
            ),
            # Without a reload command the act step restarts the proxy's service.
            touches=f"services.{ep.service}" if ep.service and not ep.reload_command else None,
        )
        if renew_argv(ep) is None:
            action.status = ActionStatus.skipped
            action.detail = (
                f"no renew_command or cert_name for [tls.{cert.endpoint}]: renew "
                "it by hand (`certbot renew --cert-name NAME`)"
            )
        elif not (ep.reload_command or ep.service):
            action.status = ActionStatus.skipped
            action.detail = (
                f"no reload_command or service for [tls.{cert.endpoint}]: a renewed "
                "certificate would not be served"
            )
        actions.append(action)
    return actions


def served_new(old: PlannedCert, new: ServedCert) -> str | None:
    """None when the new certificate is served; otherwise what is wrong."""
    if not new.reachable:
        return f"after the reload the endpoint does not answer: {new.error}"
    if new.fingerprint == old.fingerprint:
        return (
            "the renew command succeeded, but the old certificate is still served: it wrote "
            "no new one, or the proxy did not pick it up (does it point at certbot's live/ "
            "symlinks?)"
        )
    if sorted(new.names) != sorted(old.names):
        return f"a certificate for other names is served now: {', '.join(new.names)}"
    return None


def declined_finding(action: Action, certificate: Finding) -> Finding:
    """A renew command whose CA client declined (the certificate is not due by its own
    settings): what it said, as severe as the certificate's own finding (a warning inside
    the warning window), never a failure."""
    return Finding(
        check="renewal",
        target=action.target,
        severity=certificate.severity,
        observed="not renewed",
        message=f"the renew command did not renew; its CA client said: {action.detail} (it "
        "renews later than this runbook's window: it will when due by its own settings, e.g. "
        "certbot's renew_before_expiry in renewal/NAME.conf; sooner with --force-renewal)",
    )
