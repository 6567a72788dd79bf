"""The whole renewal, for real and offline: certbot gets a certificate with 3 days left from
one Pebble, nginx serves it from certbot's live/ symlinks, and the runbook renews it (from a
second Pebble that issues 90-day certificates, as a CA would), reloads nginx and checks that
the new certificate is the one served."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from deployments.localpg import free_port
from tasks.models import ActionStatus, RunStatus, Severity
from tests.test_cli import cli
from tests.tls_helpers import CA, NGINX_CONF, Pebble

NAME = "app.test"


def certbot(d: Path, ca: CA, *args: str) -> list[str]:
    return [
        "env",
        f"REQUESTS_CA_BUNDLE={ca.pem}",
        "certbot",
        *args,
        "--non-interactive",
        "--agree-tos",
        "--register-unsafely-without-email",
        "--no-random-sleep-on-renew",
        "--http-01-address",
        "127.0.0.1",
        "--http-01-port",
        str(free_port()),
        "--config-dir",
        str(d / "certbot"),
        "--work-dir",
        str(d / "work"),
        "--logs-dir",
        str(d / "logs"),
    ]


@pytest.fixture
def site(tmp_path: Path, inventory: Any) -> Iterator[dict[str, Any]]:
    ca = CA(tmp_path)
    nginx_dir = tmp_path / "nginx"
    (nginx_dir / "tmp").mkdir(parents=True)
    nginx = [
        "nginx",
        "-p",
        str(nginx_dir),
        "-c",
        str(nginx_dir / "nginx.conf"),
        "-e",
        str(nginx_dir / "e.log"),
    ]
    short = Pebble(tmp_path, ca, 3 * 86400)
    long = Pebble(tmp_path, ca, 90 * 86400)
    try:
        roots = tmp_path / "roots.pem"
        roots.write_bytes(short.root() + long.root())
        subprocess.run(
            certbot(
                tmp_path,
                ca,
                "certonly",
                "--standalone",
                "--server",
                short.directory,
                "-d",
                NAME,
                "--cert-name",
                "app",
            ),
            check=True,
            capture_output=True,
            timeout=120,
        )
        port = free_port()
        conf = nginx_dir / "nginx.conf"
        conf.write_text(
            NGINX_CONF.format(
                d=nginx_dir, port=port, name=NAME, live=tmp_path / "certbot" / "live" / "app"
            )
        )
        subprocess.run(nginx, check=True, capture_output=True, timeout=30)  # starts it
        renew = certbot(tmp_path, ca, "renew", "--cert-name", "app", "--server", long.directory)
        inventory(
            f'[tls.app]\nhost = "127.0.0.1"\nport = {port}\nserver_name = "{NAME}"\n'
            f'ca_file = "{roots}"\nrenew_command = {json.dumps(renew)}\n'
            f"reload_command = {json.dumps([*nginx, '-s', 'reload'])}\n"
        )
        yield {"nginx": nginx, "renew_server": long.directory}
    finally:
        subprocess.run([*nginx, "-s", "stop"], capture_output=True, timeout=30, check=False)
        short.stop()
        long.stop()


@pytest.mark.timeout(300)
def test_nginx_certificate_with_3_days_left_is_renewed_and_served(
    site: dict[str, Any], prefect_api: str
) -> None:
    env = {"PREFECT_API_URL": prefect_api}
    proc = cli("run", "tls-certificates", "--json", env=env)
    assert proc.returncode == 1, proc.stderr
    report = json.loads(proc.stdout)
    finding = report["findings"][0]
    assert finding["severity"] == Severity.critical and 2.9 < finding["observed"] <= 3
    assert report["actions"][0]["status"] == ActionStatus.planned

    proc = cli("run", "tls-certificates", "--apply", "--yes", "--json", env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(proc.stdout)
    assert report["status"] == RunStatus.fixed
    assert report["actions"][0]["detail"].startswith("renewed and served: now valid until")
    assert report["findings"][0]["severity"] == Severity.ok
    assert report["findings"][0]["observed"] > 89


@pytest.mark.timeout(300)
def test_certbot_failing_puts_its_exit_code_and_stderr_in_the_report(
    site: dict[str, Any], prefect_api: str
) -> None:
    config = Path(os.environ["RUNBOOK_CONFIG"])
    # An ACME server that is not there: certbot itself fails, as when the CA is unreachable.
    config.write_text(
        config.read_text().replace(site["renew_server"], f"https://127.0.0.1:{free_port()}/dir")
    )
    proc = cli(
        "run",
        "tls-certificates",
        "--apply",
        "--yes",
        "--json",
        env={"PREFECT_API_URL": prefect_api},
    )
    assert proc.returncode == 3, proc.stderr
    action = json.loads(proc.stdout)["actions"][0]
    assert action["status"] == ActionStatus.failed
    assert "renew command exited 1" in action["detail"]
