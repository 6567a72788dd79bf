"""block-ips' pure rules: entries validated, the deny file rewritten, findings and plan."""

from __future__ import annotations

from pathlib import Path

import pytest

from tasks.errors import ConfigError
from tasks.models import ActionStatus, Severity
from tasks.proxy_rules import (
    HEADER,
    BlockParams,
    block_findings,
    denied_entries,
    entry_text,
    plan_blocks,
    render_deny_file,
    validate_blocks,
    validate_unblocks,
)
from tasks.settings import ProxyTarget

PROXY = ProxyTarget(deny_file=Path("/etc/nginx/blocked.conf"), allow=["10.0.0.0/8"], max_entries=3)


def test_set_strings_are_split_on_commas_and_spaces() -> None:
    p = BlockParams.model_validate({"add": "203.0.113.7, 198.51.100.0/24", "unblock": "1.2.3.4"})
    assert p.add == ["203.0.113.7", "198.51.100.0/24"] and p.unblock == ["1.2.3.4"]


def test_entries_are_normalised_and_deduplicated() -> None:
    nets = validate_blocks(["203.0.113.7/32", "203.0.113.7", "2001:db8::/32"], [], "here")
    assert [entry_text(n) for n in nets] == ["203.0.113.7", "2001:db8::/32"]


@pytest.mark.parametrize(
    ("entry", "said"),
    [
        ("0.0.0.0/0", "every address"),
        ("::/0", "every address"),
        ("10.1.2.3", "overlaps the allow-list entry '10.0.0.0/8'"),
        ("10.0.0.0/8", "overlaps the allow-list"),  # the allowed range itself
        ("8.0.0.0/6", "wider than a /8"),  # and one holding it
        ("300.1.1.1", "not an address or CIDR range"),
        ("198.51.100.1/24", "host bits set"),
        ("example.com", "not an address or CIDR range"),
    ],
)
def test_refused_entries(entry: str, said: str) -> None:
    with pytest.raises(ConfigError, match="block-ips on edge: add") as exc:
        validate_blocks([entry], PROXY.allow, "block-ips on edge: add")
    assert said in str(exc.value)


def test_an_ipv6_range_never_overlaps_an_ipv4_allow_entry() -> None:
    assert validate_blocks(["2001:db8::/32"], ["10.0.0.0/8"], "x")


def test_render_keeps_other_lines_adds_new_and_removes_named() -> None:
    text = "# by hand\nallow 192.0.2.1;\ndeny 198.51.100.9;\ndeny 203.0.113.0/24;\n"
    add = validate_blocks(["203.0.113.5", "192.0.2.200"], [], "x")  # the first is covered
    out = render_deny_file(text, add, validate_unblocks(["198.51.100.9/32"], "x"))
    assert out == "# by hand\nallow 192.0.2.1;\ndeny 203.0.113.0/24;\ndeny 192.0.2.200;\n"
    assert render_deny_file("", add, []).startswith(HEADER)
    assert denied_entries(out) == ["203.0.113.0/24", "192.0.2.200"]


def test_findings_and_plan() -> None:
    text = "deny 198.51.100.9;\n"
    add = validate_blocks(["203.0.113.7", "198.51.100.9"], PROXY.allow, "x")
    unblock = validate_unblocks(["198.51.100.9", "192.0.2.1"], "x")
    found = block_findings("edge", PROXY, text, add, unblock, {"198.51.100.9": 200})
    assert [(f.check, f.severity) for f in found] == [
        ("blocked", Severity.warning),  # not in the file
        ("blocked", Severity.warning),  # in the file, but answered 200
        ("unblocked", Severity.warning),
        ("unblocked", Severity.ok),
        ("deny_entries", Severity.ok),
    ]
    assert "answers it 200" in found[1].message
    actions = plan_blocks("edge", PROXY, text, add, unblock)
    assert [(a.kind, a.args.entries, a.destructive) for a in actions] == [
        ("unblock_addresses", ["198.51.100.9"], True),
        ("block_addresses", ["203.0.113.7"], True),
    ]


def test_a_block_over_max_entries_is_skipped() -> None:
    text = "deny 198.51.100.1;\ndeny 198.51.100.2;\ndeny 198.51.100.3;\n"
    [action] = plan_blocks("edge", PROXY, text, validate_blocks(["203.0.113.7"], [], "x"), [])
    assert action.status is ActionStatus.skipped
    assert "4 entries, over max_entries = 3" in action.detail


def test_an_unblock_inside_a_denied_range_says_which_range() -> None:
    text = "deny 203.0.113.0/24;\n"
    unblock = validate_unblocks(["203.0.113.5"], "x")
    [finding, _] = block_findings("edge", PROXY, text, [], unblock, {})
    assert finding.severity is Severity.warning
    assert "by the range 203.0.113.0/24: unblock 203.0.113.0/24" in finding.message
    assert plan_blocks("edge", PROXY, text, [], unblock) == []  # never a wider unblock


def test_an_unblocked_address_still_answered_403_is_a_problem() -> None:
    unblock = validate_unblocks(["127.0.0.2"], "x")
    [finding, _] = block_findings("edge", PROXY, "", [], unblock, {"127.0.0.2": 403})
    assert finding.severity is Severity.warning and "still answers it 403" in finding.message


@pytest.mark.parametrize("entry", ["0.0.0.0/1", "10.0.0.0/7", "2000::/3", "2001:db8::/31"])
def test_a_range_wider_than_a_registry_block_is_refused(entry: str) -> None:
    with pytest.raises(ConfigError, match="wider than a /"):
        validate_blocks([entry], [], "block-ips add")
    assert validate_blocks(["10.0.0.0/8", "2001:db8::/32"], [], "block-ips add")
