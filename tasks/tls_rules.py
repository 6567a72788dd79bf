"""Pure decisions for tls-certificates (seeds 000 s5, 002 s3 and its thresholds, 003 "SSL
Certificate Issues")."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import TYPE_CHECKING, cast

from pydantic import Field

from tasks.models import Action, ActionStatus, Finding, Params, Severity

if TYPE_CHECKING:
    from tasks.settings import TlsEndpoint
    from tasks.tls import ServedCert


class TlsParams(Params):
    warning_days: float = Field(30, ge=0, le=3650)
    critical_days: float = Field(7, ge=0, le=3650)
    renew_days: float = Field(30, ge=0, le=3650)
    timeout_seconds: float = Field(5, gt=0, le=120)


THRESHOLD_NAMES = frozenset(TlsParams.model_fields)


def days_left(cert: ServedCert, now: datetime) -> float | None:
    return (cert.not_after - now).total_seconds() / 86400 if cert.not_after else None


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
    left = days_left(cert, now)
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
    if problems or (left is not None and left < p.critical_days):
        severity = Severity.critical
    elif left is not None and left < p.warning_days:
        severity = Severity.warning
    else:
        severity = Severity.ok
    facts = (
        f"{left:.1f} days left (until {cert.not_after:%Y-%m-%d %H:%M} UTC), issuer {cert.issuer}"
        if cert.reachable and cert.not_after and left is not None
        else ""
    )
    return Finding(
        check="certificate",
        target=cert.endpoint,
        severity=severity,
        observed=None if left is None else round(left, 2),
        threshold=p.warning_days,
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
) -> list[Action]:
    """A renewal of each reachable endpoint within its own renew_days of expiry."""
    actions = []
    for cert in certs:
        left = days_left(cert, now)
        if not cert.reachable or left is None or left > params[cert.endpoint].renew_days:
            continue
        ep = endpoints[cert.endpoint]
        action = Action(
            kind="renew_certificate",
            target=cert.endpoint,
            destructive=False,
            description=f"renew the certificate of {cert.address} ({left:.1f} days "
            "left), reload its proxy, check the new one is served",
            args={
                "fingerprint": cert.fingerprint,
                "names": cert.names,
                "not_after": cert.not_after,
            },
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


def served_new(old: dict[str, object], new: ServedCert) -> str | None:
    """None when the new certificate is served; otherwise what is wrong."""
    if not new.reachable:
        return f"after the reload the endpoint does not answer: {new.error}"
    if new.fingerprint == old["fingerprint"]:
        return (
            "renewed, but the old certificate is still served: the proxy did not pick it up "
            "(does it point at certbot's live/ symlinks?)"
        )
    if sorted(new.names) != sorted(cast(list[str], old["names"])):
        return f"a certificate for other names is served now: {', '.join(new.names)}"
    return None
