"""block-ips: deny abusive addresses or ranges at the reverse proxy, or lift a block, through
an nginx deny file; checked, reloaded, rolled back when the proxy refuses it, and proven by a
403 where it can be tested (seeds 002 "Suspected Security Breach" (Isolate) and "DDoS Attack",
001 "Excessive login lockouts" (brute-force IPs), 004 s4 "block abusive IPs")."""

from __future__ import annotations

from typing import get_args

from prefect import State

from tasks.engine import run_action, runbook_flow
from tasks.gate import APPROVAL_TIMEOUT_SECONDS, ApprovalTimeout
from tasks.models import ActionStatus, AlertInfo, Approval, Finding, Report, problems
from tasks.proxy import change_deny_file, probe_from, read_deny_file
from tasks.proxy_rules import (
    BlockAction,
    BlockParams,
    block_findings,
    entry_text,
    plan_blocks,
    render_deny_file,
    validate_blocks,
    validate_unblocks,
)
from tasks.run import open_run
from tasks.settings import Settings
from tasks.wait import poll

RUNBOOK = "block-ips"
RELOAD_GRACE_SECONDS = 10


@runbook_flow(RUNBOOK, inventory="proxies", actions=get_args(BlockAction))
def block_ips(
    target: str,
    dry_run: bool = True,
    approval: Approval = "ask",
    approval_timeout_seconds: ApprovalTimeout = APPROVAL_TIMEOUT_SECONDS,
    params: BlockParams | None = None,
    alert: AlertInfo | None = None,
) -> State[Report]:
    """Whether the addresses to block (`add`) are in the proxy's deny file and answered 403
    (tested from the addresses this host can send from), whether those to unblock are still
    there, and how many entries the file holds against max_entries.

    May rewrite the deny file (never 0.0.0.0/0, never the allow-list, at most max_entries
    lines), check the proxy's whole configuration and reload it; a failed check or reload
    puts the previous file back and the run fails with the proxy's message.
    """
    run = open_run(Settings.proxy_target, target, BlockParams, params)
    name, proxy, p = run.name, run.target, run.p
    where = f"{RUNBOOK} on {name}"
    add = validate_blocks(p.add, proxy.allow, f"{where}: add")
    unblock = validate_unblocks(p.unblock, f"{where}: unblock")
    single = [entry_text(n) for n in [*add, *unblock] if n.num_addresses == 1]

    def diagnose() -> list[Finding]:
        text = read_deny_file(name, proxy)
        return block_findings(name, proxy, text, add, unblock, probe_from(name, proxy, single))

    # 1. diagnose
    before = diagnose()
    # 2. plan
    actions = plan_blocks(name, proxy, read_deny_file(name, proxy), add, unblock)
    # 3. gate
    approved = run.gate(actions, before)
    # 4. act: each change is its own write, check and reload (rolled back if refused)
    service = run.settings.service(proxy.service) if proxy.service else None
    for action in approved:
        nets = add if action.kind == "block_addresses" else unblock
        chosen = [n for n in nets if entry_text(n) in action.args.entries]
        current = read_deny_file(name, proxy)
        text = (
            render_deny_file(current, chosen, [])
            if action.kind == "block_addresses"
            else render_deny_file(current, [], chosen)
        )
        run_action(action, change_deny_file, name, proxy, text, service)
    # 5. verify: a reload is asynchronous (old workers finish their connections)
    if not approved:
        return run.finish(before, before, actions)
    settled = all(a.status is ActionStatus.done for a in approved) and proxy.probe_url and single
    after = poll(
        diagnose,
        what="the proxy to answer the new deny file",
        timeout_seconds=RELOAD_GRACE_SECONDS if settled else 0,
        done=lambda found: not [f for f in problems(found) if f.check != "deny_entries"],
        first_delay_seconds=0.5,
        max_delay_seconds=0.5,
    ).value
    return run.finish(before, after, actions)
