"""block-ips against a real nginx: the deny file it writes is loaded, 127.0.0.2 is answered 403
while 127.0.0.1 still gets 200, an unblock lifts it, and a configuration nginx refuses (or a
reload that fails) puts the previous file back with nginx still serving."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from deployments.localpg import free_port
from flows.block_ips import block_ips
from tasks.models import ActionStatus, RunStatus, Severity
from tasks.wait import poll
from tests.test_cli import cli, no_traceback

BLOCKED, CLIENT = "127.0.0.2", "127.0.0.1"

CONF = """\
user root;
daemon on;
pid {d}/nginx.pid;
error_log {d}/error.log;
events {{ worker_connections 64; }}
http {{
  access_log off;
  client_body_temp_path {d}/tmp; proxy_temp_path {d}/tmp; fastcgi_temp_path {d}/tmp;
  uwsgi_temp_path {d}/tmp; scgi_temp_path {d}/tmp;
  include {d}/extra/*.conf;
  server {{
    listen 127.0.0.1:{port};
    include {d}/blocked-ips.conf;
    # Served from a file: a `return` would answer before the access phase that denies.
    location / {{ root {d}/www; }}
  }}
}}
"""

BEFORE = "# blocked by hand during the last incident\ndeny 198.51.100.9;\n"


def status_from(source: str, url: str) -> int:
    transport = httpx.HTTPTransport(local_address=source)
    with httpx.Client(transport=transport, timeout=5) as client:
        return client.get(url).status_code


@pytest.fixture
def nginx(tmp_path: Path, inventory: Any) -> Iterator[dict[str, Any]]:
    """A real nginx on a free loopback port whose server includes blocked-ips.conf (holding
    one entry written by hand), and the [proxies.edge] entry pointing at it."""
    with socket.socket() as probe:
        try:
            probe.bind((BLOCKED, 0))
        except OSError:
            pytest.skip(f"{BLOCKED} is not a local address here")
    d = tmp_path / "nginx"
    for sub in ("tmp", "extra", "www"):
        (d / sub).mkdir(parents=True)
    (d / "www" / "index.html").write_text("ok\n")
    deny = d / "blocked-ips.conf"
    deny.write_text(BEFORE)
    port = free_port()
    (d / "nginx.conf").write_text(CONF.format(d=d, port=port))
    base = ["nginx", "-p", str(d), "-c", str(d / "nginx.conf"), "-e", str(d / "e.log")]
    subprocess.run(base, check=True, capture_output=True, timeout=30)
    url = f"http://127.0.0.1:{port}/"

    def write(**extra: str) -> Path:
        """The inventory, with the keys given (TOML values) replacing or adding to these."""
        keys = {
            "deny_file": json.dumps(str(deny)),
            "test_command": json.dumps([*base, "-t"]),
            "reload_command": json.dumps([*base, "-s", "reload"]),
            "allow": '["127.0.0.1"]',
            "probe_url": json.dumps(url),
            **extra,
        }
        lines = ["[proxies.edge]", *(f"{k} = {v}" for k, v in keys.items())]
        return inventory("\n".join(lines) + "\n")  # type: ignore[no-any-return]

    write()
    try:
        yield {"dir": d, "deny": deny, "url": url, "write": write, "base": base}
    finally:
        # By its pid, not `nginx -s stop`: that parses the configuration first, which a test
        # may have left broken on purpose.
        master = int((d / "nginx.pid").read_text())
        os.kill(master, signal.SIGTERM)
        if not poll(lambda: not _alive(master), what="nginx to stop", timeout_seconds=10).done:
            os.kill(master, signal.SIGKILL)
            poll(lambda: not _alive(master), what="nginx to die", timeout_seconds=10).result()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def run(*args: str, api: str) -> tuple[int, dict[str, Any]]:
    proc = cli(
        "run", "block-ips", "--target", "edge", "--json", *args, env={"PREFECT_API_URL": api}
    )
    no_traceback(proc)
    return proc.returncode, (
        json.loads(proc.stdout) if proc.stdout.strip() else {"err": proc.stderr}
    )


def test_block_then_unblock_through_the_cli(nginx: dict[str, Any], prefect_api: str) -> None:
    url = nginx["url"]
    assert status_from(BLOCKED, url) == 200 and status_from(CLIENT, url) == 200

    code, report = run("--set", f"add={BLOCKED},203.0.113.0/24", api=prefect_api)
    assert code == 1, report
    blocked = [f for f in report["findings"] if f["check"] == "blocked"]
    assert [f["severity"] for f in blocked] == [Severity.warning, Severity.warning]
    assert blocked[0]["observed"] == 200  # asked from 127.0.0.2 itself
    assert [a["status"] for a in report["actions"]] == [ActionStatus.planned]
    assert nginx["deny"].read_text() == BEFORE  # a dry run changes nothing

    code, report = run(
        "--set", f"add={BLOCKED},203.0.113.0/24", "--apply", "--yes", api=prefect_api
    )
    assert code == 0, report
    assert report["status"] == RunStatus.fixed
    [action] = report["actions"]
    assert action["kind"] == "block_addresses" and action["status"] == ActionStatus.done
    text = nginx["deny"].read_text()
    assert text == BEFORE + f"deny {BLOCKED};\ndeny 203.0.113.0/24;\n"
    assert status_from(BLOCKED, url) == 403
    assert status_from(CLIENT, url) == 200
    # The re-diagnosis: nothing left to do, and the 403 seen.
    code, report = run("--set", f"add={BLOCKED}", api=prefect_api)
    assert code == 0, report
    assert report["actions"] == []
    assert report["findings"][0]["observed"] == 403

    code, report = run("--set", f"unblock={BLOCKED}", api=prefect_api)
    assert code == 1 and report["findings"][0]["severity"] == Severity.warning
    code, report = run("--set", f"unblock={BLOCKED}", "--apply", "--yes", api=prefect_api)
    assert code == 0, report
    assert report["actions"][0]["kind"] == "unblock_addresses"
    assert nginx["deny"].read_text() == BEFORE + "deny 203.0.113.0/24;\n"
    assert status_from(BLOCKED, url) == 200


@pytest.mark.parametrize(
    ("entry", "said"),
    [
        ("0.0.0.0/0", "every address"),
        ("::/0", "every address"),
        ("127.0.0.0/24", "overlaps the allow-list"),
        ("10.0.0.300", "not an address or CIDR range"),
        ("10.0.0.1/8", "host bits set"),
    ],
)
def test_refused_entries_are_bad_usage(
    nginx: dict[str, Any], prefect_api: str, entry: str, said: str
) -> None:
    proc = cli(
        "run", "block-ips", "--target", "edge", "--set", f"add={entry}", "--apply", "--yes",
        env={"PREFECT_API_URL": prefect_api},
    )  # fmt: skip
    no_traceback(proc)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert said in proc.stderr
    assert nginx["deny"].read_text() == BEFORE


def test_a_configuration_nginx_refuses_is_rolled_back(
    nginx: dict[str, Any], prefect_api: str
) -> None:
    # Someone left a broken include beside the deny file: nginx -t now refuses the whole.
    (nginx["dir"] / "extra" / "broken.conf").write_text("this_is_no_directive on;\n")
    code, report = run("--set", f"add={BLOCKED}", "--apply", "--yes", api=prefect_api)
    assert code == 3, report
    assert report["status"] == RunStatus.failed
    [action] = report["actions"]
    assert action["status"] == ActionStatus.failed
    assert 'unknown directive "this_is_no_directive"' in action["detail"]
    assert "was put back" in action["detail"]
    assert nginx["deny"].read_text() == BEFORE
    # and kept on disk, should a run die before its rollback
    assert nginx["deny"].with_name("blocked-ips.conf.previous").read_text() == BEFORE
    # nginx still serves what it had; nothing was blocked.
    assert status_from(CLIENT, nginx["url"]) == 200
    assert status_from(BLOCKED, nginx["url"]) == 200


def test_a_failed_reload_is_rolled_back(nginx: dict[str, Any], prefect_api: str) -> None:
    nginx["write"](reload_command='["sh", "-c", "echo reload refused by the proxy >&2; exit 1"]')
    report = block_ips("edge", dry_run=False, approval="auto", params={"add": [BLOCKED]})
    assert report.status is RunStatus.failed
    [action] = report.actions
    assert action.status is ActionStatus.failed
    assert "reload refused by the proxy" in action.detail
    assert nginx["deny"].read_text() == BEFORE
    assert status_from(BLOCKED, nginx["url"]) == 200


def test_a_file_that_is_not_there_yet_is_removed_again_on_rollback(
    nginx: dict[str, Any], prefect_api: str, tmp_path: Path
) -> None:
    fresh = tmp_path / "fresh.conf"
    nginx["write"](
        deny_file=json.dumps(str(fresh)),
        test_command='["sh", "-c", "echo refused >&2; exit 1"]',
    )
    report = block_ips("edge", dry_run=False, approval="auto", params={"add": [BLOCKED]})
    assert report.actions[0].status is ActionStatus.failed
    assert "refused" in report.actions[0].detail
    assert not fresh.exists()


def test_over_max_entries_the_block_is_skipped(nginx: dict[str, Any], prefect_api: str) -> None:
    nginx["write"](max_entries="2")
    report = block_ips(
        "edge", dry_run=False, approval="auto", params={"add": ["203.0.113.1", "203.0.113.2"]}
    )
    assert report.status is RunStatus.unhealthy
    [action] = report.actions
    assert action.status is ActionStatus.skipped and "max_entries = 2" in action.detail
    assert nginx["deny"].read_text() == BEFORE


@pytest.mark.parametrize(
    ("key", "value", "said"),
    [
        ("allow", '["10.0.0.0/33"]', "proxies.edge.allow"),
        ("service", '"nginx"', "proxies.edge.service names 'nginx'"),
        ("max_entries", "0", "proxies.edge.max_entries"),
        ("probe_url", '"ftp://x/"', "proxies.edge.probe_url"),
    ],
)
def test_a_bad_proxies_entry_is_a_config_error(
    nginx: dict[str, Any], prefect_api: str, key: str, value: str, said: str
) -> None:
    path = nginx["write"](**{key: value})
    code, report = run("--set", f"add={BLOCKED}", api=prefect_api)
    assert code == 2, report
    assert said in report["err"] and str(path) in report["err"]
