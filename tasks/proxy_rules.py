"""Pure decisions for block-ips (seeds 002 "Suspected Security Breach" and "DDoS Attack", 001
"Excessive login lockouts", 004 s4 "block abusive IPs"): which entries are valid, what the
nginx deny file holds and what it should hold, the findings and the plan."""

from __future__ import annotations

import ipaddress
import re
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from tasks.errors import ConfigError
from tasks.models import Action, ActionStatus, Finding, Params, Severity

if TYPE_CHECKING:
    from tasks.settings import ProxyTarget

# The kinds of action block-ips plans (the flow and deployments.catalog read them from here).
BlockAction = Literal["block_addresses", "unblock_addresses"]

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

HEADER = "# Managed by the block-ips runbook: one `deny ADDRESS;` line per blocked entry.\n"
_DENY = re.compile(r"^\s*deny\s+([^;\s]+)\s*;")


def _split(value: object) -> object:
    """`--set add=1.2.3.4,10.0.0.0/8` arrives as one string: split it on commas and spaces."""
    if isinstance(value, str):
        return [part for part in re.split(r"[,\s]+", value) if part]
    return value


class BlockParams(Params):
    """What to block and unblock in this run (both the run's own choice)."""

    run_only = frozenset({"add", "unblock"})

    add: list[str] = Field(
        default=[],
        max_length=1000,
        description="addresses or CIDR ranges to deny (comma-separated with --set); at most 1000",
    )
    unblock: list[str] = Field(
        default=[],
        max_length=1000,
        description="addresses or CIDR ranges to remove from the deny file; at most 1000",
    )

    _split_add = field_validator("add", "unblock", mode="before")(_split)


class DenyChange(BaseModel):
    """The entries one action adds to or removes from the deny file (normalised: a single
    address without its /32 or /128)."""

    model_config = ConfigDict(frozen=True)

    entries: list[str]


def entry_text(net: Network) -> str:
    """A network as the deny file writes it: 203.0.113.7 for a single address, else CIDR."""
    return str(net.network_address) if net.num_addresses == 1 else str(net)


def parse_entry(value: str, where: str) -> Network:
    """An address or CIDR range (ipaddress, strict: no host bits set).

    Raises ConfigError naming the entry, where it came from and what to write instead."""
    try:
        return ipaddress.ip_network(value.strip(), strict=True)
    except ValueError as exc:
        raise ConfigError(
            f"{where}: {value!r} is not an address or CIDR range ({exc}); write e.g. "
            "203.0.113.7, 198.51.100.0/24 or 2001:db8::/32"
        ) from None


# The widest range block-ips denies: an IPv4 /8 (IANA's unit of allocation to the regional
# registries) and an IPv6 /32 (a registry's usual allocation to one network, RFC 6177).
WIDEST_PREFIX = {4: 8, 6: 32}


def validate_blocks(entries: list[str], allow: list[str], where: str) -> list[Network]:
    """The entries to block, parsed and checked: never a /0 (every address) nor a range wider
    than WIDEST_PREFIX, never one that overlaps the allow-list. Duplicates are dropped, the
    order kept.

    Raises ConfigError naming the refused entry and why."""
    allowed = [ipaddress.ip_network(a, strict=False) for a in allow]
    found: list[Network] = []
    for value in entries:
        net = parse_entry(value, where)
        if net.prefixlen == 0:
            raise ConfigError(
                f"{where}: {value!r} is every address: block-ips never denies the whole "
                "internet; name the abusive addresses or ranges"
            )
        if net.prefixlen < WIDEST_PREFIX[net.version]:
            raise ConfigError(
                f"{where}: {value!r} is wider than a /{WIDEST_PREFIX[net.version]}, a large "
                "part of the internet (and likely of your users): name narrower ranges"
            )
        for ok in allowed:
            if net.version == ok.version and net.overlaps(ok):
                raise ConfigError(
                    f"{where}: {value!r} overlaps the allow-list entry {str(ok)!r}: it is "
                    "never blocked; remove it from the run, or from `allow` if it is wrong"
                )
        if net not in found:
            found.append(net)
    return found


def validate_unblocks(entries: list[str], where: str) -> list[Network]:
    """The entries to remove, parsed (ConfigError as parse_entry); duplicates dropped."""
    found: list[Network] = []
    for value in entries:
        net = parse_entry(value, where)
        if net not in found:
            found.append(net)
    return found


def denied_entries(text: str) -> list[str]:
    """The entries of the `deny X;` lines of an nginx file, in order ("all" included)."""
    return [m.group(1) for line in text.splitlines() if (m := _DENY.match(line))]


def _as_network(entry: str) -> Network | None:
    try:
        return ipaddress.ip_network(entry, strict=False)
    except ValueError:
        return None  # "all", or a line written by hand that is no address


def covered(net: Network, entries: list[str]) -> str | None:
    """The deny entry that already blocks every address of net, if any."""
    for entry in entries:
        held = _as_network(entry)
        if held is not None and held.version == net.version and net.subnet_of(held):  # type: ignore[arg-type]
            return entry
    return None


def render_deny_file(text: str, add: list[Network], remove: list[Network]) -> str:
    """The deny file with the `deny` lines of remove taken out and those of add appended (one
    per entry not already blocked); every other line (comments, `allow` lines written by hand)
    is kept as it was. An empty or missing file (text "") starts with HEADER."""
    gone = set(remove)
    kept = [
        line
        for line in text.splitlines(keepends=True)
        if not ((m := _DENY.match(line)) and _as_network(m.group(1)) in gone)
    ]
    out = "".join(kept) or HEADER
    if not out.endswith("\n"):
        out += "\n"
    held = denied_entries(out)
    for net in add:
        if covered(net, held) is None:
            out += f"deny {entry_text(net)};\n"
            held.append(entry_text(net))
    return out


def block_findings(
    name: str,
    proxy: ProxyTarget,
    text: str,
    add: list[Network],
    unblock: list[Network],
    probes: dict[str, int | str],
) -> list[Finding]:
    """One finding per entry to block (a warning while the deny file does not hold it, or
    holds it but the proxy does not answer 403 to it), per entry to unblock (a warning while
    the file holds it), and the file's size against max_entries.

    probes: per entry the status the proxy answered when asked from that address (or why it
    could not be asked); entries absent were not testable from this host."""
    held = denied_entries(text)
    findings: list[Finding] = []
    for net in add:
        entry, by = entry_text(net), covered(net, held)
        probe = probes.get(entry)
        if by is None:
            severity, message = Severity.warning, f"{entry} is not in {proxy.deny_file}"
        elif probe is not None and probe != 403:
            severity = Severity.warning
            message = (
                f"{entry} is denied in {proxy.deny_file} (by {by}) but {proxy.probe_url} "
                f"answers it {probe}: is the file included by the proxy, and reloaded?"
            )
        else:
            severity = Severity.ok
            seen = f"; {proxy.probe_url} answers it 403" if probe == 403 else ""
            message = f"{entry} is denied in {proxy.deny_file} (by {by}){seen}"
        findings.append(
            Finding(
                check="blocked", target=name, severity=severity, observed=probe, message=message
            )
        )
    for net in unblock:
        entry, by, probe = entry_text(net), covered(net, held), probes.get(entry_text(net))
        if by == entry:
            message = f"{entry} is still denied in {proxy.deny_file}"
        elif by is not None:
            message = (
                f"{entry} is denied in {proxy.deny_file} by the range {by}: unblock {by}, "
                "or block its other addresses and ranges instead"
            )
        elif probe == 403:
            message = (
                f"{entry} is not in {proxy.deny_file}, but {proxy.probe_url} still answers it "
                "403: another deny rule, or the proxy was not reloaded"
            )
        else:
            message = f"{entry} is not in {proxy.deny_file}"
        findings.append(
            Finding(
                check="unblocked",
                target=name,
                severity=Severity.warning if by is not None or probe == 403 else Severity.ok,
                observed=probe,
                message=message,
            )
        )
    over = len(held) > proxy.max_entries
    findings.append(
        Finding(
            check="deny_entries",
            target=name,
            severity=Severity.warning if over else Severity.ok,
            observed=len(held),
            threshold=proxy.max_entries,
            message=f"{proxy.deny_file} holds {len(held)} deny line(s) of at most "
            f"{proxy.max_entries}",
        )
    )
    return findings


def plan_blocks(
    name: str,
    proxy: ProxyTarget,
    text: str,
    add: list[Network],
    unblock: list[Network],
) -> list[Action[BlockAction, DenyChange]]:
    """An unblock of the entries the file holds, then a block of those it does not cover;
    the block is skipped when the file would then hold more than max_entries lines."""
    held = denied_entries(text)
    actions: list[Action[BlockAction, DenyChange]] = []
    # Without a reload command the change restarts the proxy's service (tasks.proxy).
    touches = f"services.{proxy.service}" if proxy.reload_argv() is None else None
    removing = [e for e in (entry_text(n) for n in unblock) if e in held]
    if removing:
        actions.append(
            Action(
                kind="unblock_addresses",
                target=name,
                destructive=True,
                description=f"remove {', '.join(removing)} from {proxy.deny_file}, check the "
                "configuration, reload",
                args=DenyChange(entries=removing),
                touches=touches,
            )
        )
    adding = [entry_text(n) for n in add if covered(n, held) is None]
    if adding:
        action: Action[BlockAction, DenyChange] = Action(
            kind="block_addresses",
            target=name,
            destructive=True,
            description=f"deny {', '.join(adding)} in {proxy.deny_file}, check the "
            "configuration, reload",
            args=DenyChange(entries=adding),
            touches=touches,
        )
        total = len(held) - len(removing) + len(adding)
        if total > proxy.max_entries:
            action.status = ActionStatus.skipped
            action.detail = (
                f"the deny file would hold {total} entries, over max_entries = "
                f"{proxy.max_entries} of [proxies.{name}]: block a range instead of its "
                "addresses, unblock stale entries, or raise max_entries"
            )
        actions.append(action)
    return actions
