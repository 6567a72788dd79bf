"""Tasks on a reverse proxy's deny file (block-ips): read it, probe the proxy from a given
source address, and change it inside a Prefect transaction whose rollback puts the previous
file back when the proxy's configuration check or reload fails."""

from __future__ import annotations

import os
import socket
import tempfile
from pathlib import Path

import httpx
from prefect.transactions import Transaction, get_transaction, transaction

from tasks.engine import io_task
from tasks.errors import ActionFailed, TargetError
from tasks.host import run_command
from tasks.services import restart_service
from tasks.settings import ProxyTarget, ServiceTarget

COMMAND_TIMEOUT_SECONDS = 60
ABSENT = None  # the deny file's previous content when there was none


@io_task("read-deny-file", timeout_seconds=30, retries=0)
def read_deny_file(name: str, proxy: ProxyTarget) -> str:
    """The deny file's text; "" when it does not exist yet.

    Args:
        name: the [proxies.NAME] entry's name, for messages.
        proxy: its inventory entry.

    Returns:
        The file's text (UTF-8).

    Raises:
        TargetError: it exists but cannot be read (permissions, a directory)."""
    try:
        return proxy.deny_file.read_text(encoding="utf-8")
    except FileNotFoundError:
        return ""
    except (OSError, UnicodeDecodeError) as exc:
        raise TargetError(
            f"proxy {name!r}: deny_file {str(proxy.deny_file)!r} cannot be read: {exc}; "
            "fix its permissions or point deny_file at the included file"
        ) from None


def local_source(address: str) -> bool:
    """Whether this host can send from address (it is one of its own, e.g. 127.0.0.2)."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((address, 0))
        except OSError:
            return False
    return True


@io_task("probe-proxy", timeout_seconds=60, retries=0)
def probe_from(name: str, proxy: ProxyTarget, addresses: list[str]) -> dict[str, int | str]:
    """The status the proxy's probe_url answers to a request sent from each address this
    host can send from (single addresses only; others are left out: not testable here).

    Args:
        name: the [proxies.NAME] entry's name, for messages.
        proxy: its inventory entry (probe_url, timeout_seconds in seconds).
        addresses: the single addresses to try.

    Returns:
        By address: the HTTP status code, or why no answer came (a str). Empty without a
        probe_url."""
    if proxy.probe_url is None:
        return {}
    seen: dict[str, int | str] = {}
    for address in addresses:
        if not local_source(address):
            continue
        transport = httpx.HTTPTransport(local_address=address, retries=0)
        try:
            with httpx.Client(transport=transport, timeout=proxy.timeout_seconds) as client:
                seen[address] = client.get(proxy.probe_url).status_code
        except httpx.HTTPError as exc:
            seen[address] = f"no answer ({type(exc).__name__}: {exc})"
    return seen


def _put_back(txn: Transaction) -> None:
    """The rollback of write_deny_file: the previous content, or no file when there was none."""
    path = Path(txn.get("deny_file"))
    previous = txn.get("previous")
    if previous is ABSENT:
        path.unlink(missing_ok=True)
    else:
        _replace(path, previous)


def previous_copy(path: Path) -> Path:
    """Where write_deny_file keeps the content it replaced: DENY_FILE.previous (not matched by
    an `include conf.d/*.conf`)."""
    return path.with_name(path.name + ".previous")


def _replace(path: Path, text: str) -> None:
    """Write text to path atomically (a temporary file beside it, renamed over it), keeping
    the mode of the file it replaces."""
    mode = path.stat().st_mode & 0o777 if path.exists() else 0o644
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(text)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@io_task("write-deny-file", timeout_seconds=30, retries=0)
def write_deny_file(name: str, proxy: ProxyTarget, text: str) -> str:
    """Replace the deny file with text (atomically), keeping what it held in
    DENY_FILE.previous (previous_copy). Inside a Prefect transaction, its rollback puts the
    previous content back (or removes the file if there was none).

    Args:
        name: the [proxies.NAME] entry's name, for messages.
        proxy: its inventory entry.
        text: the whole new file.

    Returns:
        "written".

    Raises:
        ActionFailed: the file cannot be written."""
    path = proxy.deny_file
    try:
        previous = _current(name, proxy)
        txn = get_transaction()
        if txn is not None:
            txn.set("deny_file", str(path))
            txn.set("previous", previous)
        if previous is not ABSENT:
            # On disk too: what the rollback puts back outlives a killed run.
            _replace(previous_copy(path), previous)
        _replace(path, text)
    except OSError as exc:
        raise ActionFailed(
            f"proxy {name!r}: cannot write deny_file {str(path)!r}: {exc.strerror}"
        ) from None
    return "written"


write_deny_file.on_rollback(_put_back)


def _current(name: str, proxy: ProxyTarget) -> str | None:
    """The deny file's text, ABSENT when there is none; ActionFailed when it cannot be read."""
    try:
        return proxy.deny_file.read_text(encoding="utf-8")
    except FileNotFoundError:
        return ABSENT
    except (OSError, UnicodeDecodeError) as exc:
        raise ActionFailed(f"proxy {name!r}: cannot read {str(proxy.deny_file)!r}: {exc}") from None


def _run(name: str, what: str, argv: list[str]) -> str:
    """The command's output; ActionFailed with its own words when it fails."""
    proc = run_command(f"proxy {name!r}", what, argv, COMMAND_TIMEOUT_SECONDS)
    said = (proc.stderr + proc.stdout).strip()
    if proc.returncode != 0:
        raise ActionFailed(
            f"proxy {name!r}: {what} command exited {proc.returncode}: {said[-800:]}"
        )
    return said


@io_task("check-proxy-config", timeout_seconds=COMMAND_TIMEOUT_SECONDS + 30, retries=0)
def check_proxy_config(name: str, proxy: ProxyTarget) -> str:
    """Run the proxy's test_command (nginx -t): the whole configuration, new file included.

    Args:
        name: the [proxies.NAME] entry's name, for messages.
        proxy: its inventory entry.

    Returns:
        What the command printed.

    Raises:
        ActionFailed: the check failed (with the proxy's message), timed out or cannot run."""
    return _run(name, "test", proxy.test_command)


@io_task("reload-proxy-config", timeout_seconds=COMMAND_TIMEOUT_SECONDS + 30, retries=0)
def reload_proxy_config(name: str, argv: list[str]) -> str:
    """Run the proxy's reload command (nginx -s reload).

    Args:
        name: the [proxies.NAME] entry's name, for messages.
        argv: the command, run without a shell.

    Returns:
        "reloaded".

    Raises:
        ActionFailed: the reload failed (with the proxy's message), timed out or cannot run."""
    _run(name, "reload", argv)
    return "reloaded"


def change_deny_file(
    name: str, proxy: ProxyTarget, text: str, service: ServiceTarget | None
) -> str:
    """Write the new deny file, check the proxy's whole configuration and reload it (or
    restart its service), in one Prefect transaction: when any step fails, the rollback puts
    the previous file back, so the proxy keeps serving the configuration it had.

    Args:
        name: the [proxies.NAME] entry's name.
        proxy: its inventory entry.
        text: the whole new deny file.
        service: the [services.*] entry restarted instead of reload_command, if any.

    Returns:
        What was done, for the action's detail.

    Raises:
        ActionFailed: a step failed; its message is the proxy's (the file is back as it was).
        TargetError: what restart_service raises."""
    before = _current(name, proxy)
    try:
        with transaction():
            write_deny_file(name, proxy, text)
            check_proxy_config(name, proxy)
            argv = proxy.reload_argv()
            if argv is not None:
                done = reload_proxy_config(name, argv)
            else:
                assert proxy.service is not None and service is not None
                done = restart_service(proxy.service, service)
    except TargetError as exc:
        if _current(name, proxy) == before:
            raise ActionFailed(f"{exc} (the previous {proxy.deny_file} was put back)") from exc
        raise ActionFailed(
            f"{exc}; and the previous {proxy.deny_file} could NOT be put back: copy "
            f"{previous_copy(proxy.deny_file)} over it before the proxy is next reloaded"
        ) from exc
    return f"written, checked, {done}"
