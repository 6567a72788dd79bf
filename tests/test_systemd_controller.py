"""The systemd controller. systemd cannot run here (PID 1 is not systemd), so `systemctl` and
`journalctl` are stand-in scripts on PATH that manage a real process and report its real PID;
what is tested for real is everything the controller does around them: the argv it runs, the
parsing of `systemctl show`, the /proc figures of the unit's main process, restarts."""

from __future__ import annotations

import os
import signal
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from tasks.services import controller
from tasks.settings import ServiceTarget

SYSTEMCTL = r"""#!/bin/bash
# Stand-in for systemctl: one unit, whose main process is a real `sleep`.
d="$FAKE_SYSTEMD"
echo "$*" >> "$d/calls"
case "$1" in
  show)
    if [[ "$*" == *--value* ]]; then cat "$d/pid"; exit 0; fi
    echo "ActiveState=$(cat "$d/state")"; echo "SubState=running"
    echo "NRestarts=$(cat "$d/restarts")"; echo "Result=success"; echo "MainPID=$(cat "$d/pid")";;
  restart)
    pid=$(cat "$d/pid"); [ "$pid" != 0 ] && kill "$pid"
    setsid sleep 600 >/dev/null 2>&1 < /dev/null & echo $! > "$d/pid"
    echo active > "$d/state"; echo $(( $(cat "$d/restarts") + 1 )) > "$d/restarts";;
esac
"""
JOURNALCTL = """#!/bin/bash
echo "$*" >> "$FAKE_SYSTEMD/calls"
printf 'line one\\nline two\\nline three\\n'
"""


@pytest.fixture
def unit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("systemctl", SYSTEMCTL), ("journalctl", JOURNALCTL)):
        (bin_dir / name).write_text(textwrap.dedent(text))
        (bin_dir / name).chmod(0o755)
    (tmp_path / "state").write_text("inactive\n")
    (tmp_path / "restarts").write_text("0\n")
    (tmp_path / "pid").write_text("0\n")
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_SYSTEMD", str(tmp_path))
    yield tmp_path
    pid = int((tmp_path / "pid").read_text())
    if pid:
        os.kill(pid, signal.SIGTERM)


def test_status_restart_logs_and_stats(unit: Path) -> None:
    c = controller(
        "api", ServiceTarget(kind="systemd", unit="saasresto.service", timeout_seconds=5)
    )
    status = c.status()
    assert not status.running and status.state == "inactive/running"
    assert c.stats() is None  # no main process

    assert c.restart() == "restarted"
    status = c.status()
    assert status.running and status.restarts == 1
    pid = int((unit / "pid").read_text())
    assert Path(f"/proc/{pid}").exists()
    stats = c.stats()
    assert stats is not None and stats.memory_bytes and stats.memory_bytes > 0
    assert c.logs(2) == ["line two", "line three"]
    calls = (unit / "calls").read_text().splitlines()
    assert "restart saasresto.service" in calls
    assert "-u saasresto.service -n 2 --no-pager -o cat" in calls


def test_a_command_that_leaves_a_daemon_behind_does_not_hang_the_runbook(tmp_path: Path) -> None:
    pidfile = tmp_path / "daemon.pid"
    cfg = ServiceTarget(
        kind="command",
        status_command=["true"],
        timeout_seconds=5,
        restart_command=["sh", "-c", f"sleep 30 & echo $! > {pidfile}"],
    )
    try:
        assert controller("app", cfg).restart() == "restarted"
        # It returned while the daemon, which holds the command's output open, still runs.
        assert Path(f"/proc/{pidfile.read_text().strip()}").exists()
    finally:
        os.kill(int(pidfile.read_text()), signal.SIGTERM)
