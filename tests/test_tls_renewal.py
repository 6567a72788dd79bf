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
def make_site(tmp_path: Path, inventory: Any) -> Iterator[Any]:
    """make_site(validity_days, renew_before_expiry=None): a certbot lineage for NAME from a
    Pebble issuing `validity_days` certificates, served by nginx from certbot's live/, its
    renew command pointed at a second Pebble issuing 90-day ones; renew_before_expiry (e.g.
    "10 days") goes into the lineage's renewal/app.conf as an operator would set it."""
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
    pebbles: list[Pebble] = []

    def make(validity_days: float, renew_before_expiry: str | None = None) -> dict[str, Any]:
        short = Pebble(tmp_path, ca, int(validity_days * 86400))
        long = Pebble(tmp_path, ca, 90 * 86400)
        pebbles.extend([short, long])
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
        if renew_before_expiry:
            conf = tmp_path / "certbot" / "renewal" / "app.conf"
            conf.write_text(f"renew_before_expiry = {renew_before_expiry}\n" + conf.read_text())
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
        return {"nginx": nginx, "renew_server": long.directory}

    try:
        yield make
    finally:
        subprocess.run([*nginx, "-s", "stop"], capture_output=True, timeout=30, check=False)
        for pebble in pebbles:
            pebble.stop()


@pytest.fixture
def site(make_site: Any) -> dict[str, Any]:
    """A lineage whose certificate has 3 days left, of 3."""
    site: dict[str, Any] = make_site(3)
    return site


# The seed's fixed day thresholds, as overrides: a fresh 3-day certificate is not due by
# the lifetime-relative defaults (half of it: 1.5 days), and Pebble cannot backdate one.
SEED_DAYS = ["--set", "warning_days=30", "--set", "critical_days=7", "--set", "renew_days=30"]


@pytest.mark.timeout(300)
def test_nginx_certificate_with_3_days_left_is_renewed_and_served(
    site: dict[str, Any], prefect_api: str
) -> None:
    env = {"PREFECT_API_URL": prefect_api}
    proc = cli("run", "tls-certificates", "--json", env=env)
    assert proc.returncode == 0, proc.stderr  # half of a 3-day lifetime is still left
    assert json.loads(proc.stdout)["actions"] == []
    proc = cli("run", "tls-certificates", "--json", *SEED_DAYS, env=env)
    assert proc.returncode == 1, proc.stderr
    report = json.loads(proc.stdout)
    finding = report["findings"][0]
    assert finding["severity"] == Severity.critical and 2.9 < finding["observed"] <= 3
    assert report["actions"][0]["status"] == ActionStatus.planned

    proc = cli("run", "tls-certificates", "--apply", "--yes", "--json", *SEED_DAYS, env=env)
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
        *SEED_DAYS,
        env={"PREFECT_API_URL": prefect_api},
    )
    assert proc.returncode == 3, proc.stderr
    action = json.loads(proc.stdout)["actions"][0]
    assert action["status"] == ActionStatus.failed
    assert "renew command exited 1" in action["detail"]


@pytest.mark.timeout(300)
def test_certbot_declining_a_renewal_not_yet_due_is_a_warning_not_a_failure(
    make_site: Any, prefect_api: str
) -> None:
    # The lineage renews 10 days before expiry; its certificate has 20 days left.
    make_site(20, renew_before_expiry="10 days")
    env = {"PREFECT_API_URL": prefect_api}
    proc = cli("run", "tls-certificates", "--json", env=env)
    assert proc.returncode == 0, proc.stderr  # a third of a 20-day lifetime: 6.7 days
    report = json.loads(proc.stdout)
    assert report["actions"] == [] and 19.9 < report["findings"][0]["observed"] <= 20
    assert report["findings"][0]["threshold"] == pytest.approx(20 / 3, abs=0.01)

    # Warning and renewing at 30 days left, as the fixed thresholds did: certbot says no.
    args = ["--set", "warning_days=30", "--set", "renew_days=30"]
    proc = cli("run", "tls-certificates", "--apply", "--yes", "--json", *args, env=env)
    assert proc.returncode == 1, proc.stdout + proc.stderr  # not 3: nothing failed
    report = json.loads(proc.stdout)
    assert report["status"] == RunStatus.unhealthy
    [action] = report["actions"]
    assert action["status"] == ActionStatus.skipped
    assert "not yet due for renewal" in action["detail"]
    assert "No renewals were attempted" in action["detail"]
    found = {f["check"]: f for f in report["findings"]}
    assert found["certificate"]["severity"] == Severity.warning
    assert found["renewal"]["severity"] == Severity.warning
    assert "not yet due for renewal" in found["renewal"]["message"]
    assert "renew_before_expiry" in found["renewal"]["message"]
    assert 19.9 < found["certificate"]["observed"] <= 20  # still the 20-day certificate
