"""tls-certificates: certificates about to expire, expired, for the wrong name or untrusted,
checked on what each endpoint actually serves; renewal (certbot or a given command), a proxy
reload, and proof that the new certificate is served (seeds 000 s5, 002 s3, 003)."""

from __future__ import annotations

from typing import get_args

from prefect import State

from tasks.engine import run_action, runbook_flow
from tasks.gate import APPROVAL_TIMEOUT_SECONDS, ApprovalTimeout
from tasks.models import ActionStatus, AlertInfo, Approval, Report, utcnow
from tasks.run import open_each
from tasks.services import restart_service
from tasks.tls import read_served_certificates, read_until_served, reload_proxy, renew_certificate
from tasks.tls_rules import (
    TlsAction,
    TlsParams,
    declined_finding,
    plan_renewals,
    renew_argv,
    served_new,
    tls_findings,
)

RUNBOOK = "tls-certificates"
RELOAD_GRACE_SECONDS = 10


@runbook_flow(RUNBOOK, inventory="tls", actions=get_args(TlsAction))
def tls_certificates(
    target: str = "all",
    dry_run: bool = True,
    approval: Approval = "ask",
    approval_timeout_seconds: ApprovalTimeout = APPROVAL_TIMEOUT_SECONDS,
    params: TlsParams | None = None,
    alert: AlertInfo | None = None,
) -> State[Report]:
    """The certificate each endpoint serves: days left, names, chain and issuer.

    May run the renew command of the certificates in their renewal window, reload the proxy
    (or restart its service), and checks the new certificate is the one served.
    """
    run = open_each(
        lambda settings, _: (
            settings.tls if target == "all" else dict([settings.tls_target(target)])
        ),
        target,
        TlsParams,
        params,
    )
    # Each endpoint's own thresholds (per); values given for the run win over them.
    endpoints, per = run.targets, run.per
    timeouts = {name: p.timeout_seconds for name, p in per.items()}

    # 1. diagnose: every endpoint at once, each bounded by its timeout_seconds
    certs = read_served_certificates(endpoints, timeouts)
    before = tls_findings(certs, utcnow(), per)
    # 2. plan
    actions = plan_renewals(certs, endpoints, utcnow(), per)
    # 3. gate
    approved = run.gate(actions, before)
    # 4. act: renew, reload what serves it; a CA client that declines has not failed
    declined = []
    for action in approved:
        ep = endpoints[action.target]
        argv = renew_argv(ep)
        assert argv is not None
        renewal = run_action(action, renew_certificate, action.target, argv, ep.cert_name)
        if renewal is None:
            continue
        if not renewal.renewed:
            action.status, action.detail = ActionStatus.skipped, renewal.said
            declined.append(action)
            continue
        action.detail = "renewed"
        if ep.reload_command:
            run_action(action, reload_proxy, action.target, ep.reload_command)
        elif ep.service:
            run_action(action, restart_service, ep.service, run.settings.service(ep.service))
    # 5. verify: the new certificate must be the one served
    if not approved:
        return run.finish(before, before, actions)
    # A reload is asynchronous (old workers finish their connections): give it a few seconds.
    done = [a for a in approved if a.status is ActionStatus.done]
    certs = read_until_served(
        endpoints,
        timeouts,
        lambda served: any(served_new(a.args, served[a.target]) for a in done),
        RELOAD_GRACE_SECONDS,
    )
    served = {c.endpoint: c for c in certs}
    for action in approved:
        if action.status is not ActionStatus.done:
            continue
        problem = served_new(action.args, served[action.target])
        if problem:
            action.status = ActionStatus.failed
            action.detail = problem
        else:
            new = served[action.target]
            action.detail = (
                f"renewed and served: now valid until {new.not_after:%Y-%m-%d %H:%M} UTC"
            )
    after = tls_findings(certs, utcnow(), per)
    for action in declined:
        certificate = next(f for f in after if f.target == action.target)
        after.append(declined_finding(action, certificate))
    return run.finish(before, after, actions)
