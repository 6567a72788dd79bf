"""The shipped alert rules, Alertmanager example and default routes (deployments/alerts/):
checked by Prometheus' own promtool and amtool, unit-tested at the seed thresholds with
`promtool test rules`, and the example config run in a real Alertmanager that delivers to a
webhook on loopback."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
import threading
import tomllib
from collections.abc import Iterator
from datetime import datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from deployments.catalog import RUNBOOKS
from deployments.localpg import free_port, stop_process
from tasks.models import utcnow
from tasks.wait import poll

ALERTS = Path(__file__).resolve().parents[1] / "deployments" / "alerts"
RULE_FILES = sorted(ALERTS.glob("*.rules.yml"))
SEVERITIES = {"warning", "critical"}


def binary(name: str) -> str:
    """A Prometheus tool from Debian's packages; missing is a failure (scripts/setup.sh
    installs them), never a skip."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(
            f"{name} is not installed: run scripts/setup.sh (Debian prometheus, "
            "prometheus-alertmanager)"
        )
    return path


def run(argv: list[str], cwd: Path = ALERTS) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=60, check=False)


def rules_of(path: Path) -> list[dict[str, Any]]:
    doc = yaml.safe_load(path.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def all_rules() -> list[dict[str, Any]]:
    return [rule for path in RULE_FILES for rule in rules_of(path)]


def routes() -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = tomllib.loads((ALERTS / "routes.toml").read_text())["routes"]
    return found


# -- promtool and amtool ---------------------------------------------------------------------


def test_there_are_rule_files() -> None:
    assert {p.name for p in RULE_FILES} >= {
        "application.rules.yml",
        "blackbox.rules.yml",
        "postgres.rules.yml",
        "redis.rules.yml",
        "node.rules.yml",
    }


@pytest.mark.parametrize("path", RULE_FILES, ids=lambda p: p.name)
def test_promtool_check_rules(path: Path) -> None:
    done = run([binary("promtool"), "check", "rules", str(path)])
    assert done.returncode == 0, done.stdout + done.stderr
    found = re.search(r"SUCCESS: (\d+) rules found", done.stdout + done.stderr)
    assert found, done.stdout + done.stderr
    assert int(found.group(1)) == len(rules_of(path)) > 0


def test_promtool_unit_tests_pass_at_the_seed_thresholds() -> None:
    done = run([binary("promtool"), "test", "rules", "tests.yml"])
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout + done.stderr


@pytest.mark.parametrize(
    ("path", "old", "new", "alert"),
    [
        # 5xx alerting at 0.1 % would fire on the 0.5 % instance.
        ("application.rules.yml", "> 0.01\n", "> 0.001\n", "HighErrorRate"),
        # A critical at 4 days would miss the certificate with 5 days left.
        ("blackbox.rules.yml", "< 7\n", "< 4\n", "TLSCertificateExpiring"),
        ("postgres.rules.yml", "for: 1m", "for: 5m", "PostgresDown"),
        ("redis.rules.yml", "> 1000\n", "> 2000\n", "QueueBacklog"),
        # The first "> 0.9" is the disk's critical: at 95 % it must fire.
        ("node.rules.yml", "> 0.9\n", "> 0.95\n", "DiskUsageHigh"),
        ("node.rules.yml", "> 86400\n", "> 2 * 86400\n", "BackupTooOld"),
    ],
)
def test_unit_tests_catch_a_wrong_threshold(
    tmp_path: Path, path: str, old: str, new: str, alert: str
) -> None:
    """The unit tests pin the thresholds: the same tests against a mutated rule fail."""
    copy = tmp_path / "alerts"
    shutil.copytree(ALERTS, copy)
    text = (copy / path).read_text()
    assert old in text
    (copy / path).write_text(text.replace(old, new, 1))
    done = run([binary("promtool"), "test", "rules", "tests.yml"], cwd=copy)
    assert done.returncode != 0
    assert f"alertname: {alert}," in done.stdout + done.stderr


def test_unit_tests_fire_every_alert_at_every_severity() -> None:
    tests = yaml.safe_load((ALERTS / "tests.yml").read_text())
    assert sorted(tests["rule_files"]) == sorted(p.name for p in RULE_FILES)
    fired = {
        (case["alertname"], expected["exp_labels"]["severity"])
        for test in tests["tests"]
        for case in test["alert_rule_test"]
        for expected in case["exp_alerts"]
    }
    shipped = {(rule["alert"], rule["labels"]["severity"]) for rule in all_rules()}
    assert shipped - fired == set()


def test_promtool_check_config_loads_every_rule_file() -> None:
    done = run([binary("promtool"), "check", "config", "prometheus.example.yml"])
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    assert f"SUCCESS: {len(RULE_FILES)} rule files found" in out
    # Every scrape job the rules route on names its inventory target.
    config = yaml.safe_load((ALERTS / "prometheus.example.yml").read_text())
    for job in config["scrape_configs"]:
        if job["job_name"] != "blackbox-tls":
            assert all("target" in group["labels"] for group in job["static_configs"]), job


def test_amtool_check_config() -> None:
    done = run([binary("amtool"), "check-config", "alertmanager.yml"])
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout + done.stderr


# -- the rules' contract with the receiver and the runbooks ----------------------------------


@pytest.mark.parametrize(
    "rule", all_rules(), ids=lambda r: f"{r['alert']}-{r['labels']['severity']}"
)
def test_every_rule_names_its_severity_runbook_and_instance(rule: dict[str, Any]) -> None:
    assert re.fullmatch(r"\d+[smh]", rule["for"])
    assert rule["labels"]["severity"] in SEVERITIES
    assert rule["labels"]["runbook"] in RUNBOOKS
    for key in ("summary", "description"):
        assert "{{ $labels.instance }}" in rule["annotations"][key]


def test_every_alert_has_one_route_to_the_runbook_its_rules_name() -> None:
    by_alert: dict[str, set[str]] = {}
    for rule in all_rules():
        by_alert.setdefault(rule["alert"], set()).add(rule["labels"]["runbook"])
    routed = {route["alert"]: route["runbook"] for route in routes()}
    assert len(routed) == len(routes())
    assert set(routed) == set(by_alert)
    for alert, runbooks in by_alert.items():
        assert runbooks == {routed[alert]}, alert


@pytest.mark.parametrize("route", routes(), ids=lambda r: r["alert"])
def test_route_names_a_runbook_and_only_its_parameters(route: dict[str, Any]) -> None:
    assert set(route) <= {"alert", "matchers", "runbook", "target", "target_label", "apply", "set"}
    runbook = RUNBOOKS[route["runbook"]]
    params = route.get("set", {})
    assert set(params) <= set(runbook.params.model_fields)
    runbook.params.model_validate(params)
    assert ("target" in route) != ("target_label" in route)
    if "target" in route:
        # A fixed target only where the runbook looks at every target of its section at once.
        assert route["target"] == runbook.default_target
    else:
        assert route["target_label"] == "target"
    assert route.get("apply", False) is False


# -- the example Alertmanager config, run for real -------------------------------------------


class Webhook:
    """A loopback HTTP server that keeps every POST: where the receiver will listen."""

    def __init__(self) -> None:
        self.posts: list[dict[str, Any]] = []
        posts = self.posts

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                posts.append(
                    {
                        "path": self.path,
                        "authorization": self.headers.get("Authorization"),
                        "body": json.loads(body),
                    }
                )
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def alerts(self) -> list[dict[str, Any]]:
        return [alert for post in list(self.posts) for alert in post["body"]["alerts"]]

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def example_alertmanager() -> Iterator[tuple[str, Webhook, str]]:
    """prometheus-alertmanager on the example config, with only the receiver's address, the
    token file and the waits changed (a test cannot sit out 30 s of group_wait)."""
    token = "example-token-0123456789"
    work = Path(tempfile.mkdtemp(prefix="runbook-alert-rules-"))
    webhook = Webhook()
    proc: subprocess.Popen[bytes] | None = None
    try:
        (work / "token").write_text(token)
        config = yaml.safe_load((ALERTS / "alertmanager.yml").read_text())
        for route in (config["route"], *config["route"]["routes"]):
            route.update(group_wait="500ms", group_interval="1s")
        hook = next(r for r in config["receivers"] if r["name"] == "runbook-receiver")
        url = hook["webhook_configs"][0]["url"]
        assert url == "http://127.0.0.1:8787/alerts/alertmanager"
        hook["webhook_configs"][0]["url"] = url.replace("8787", str(webhook.port))
        hook["webhook_configs"][0]["http_config"]["authorization"]["credentials_file"] = str(
            work / "token"
        )
        (work / "alertmanager.yml").write_text(yaml.safe_dump(config))
        port = free_port()
        with (work / "log").open("wb") as sink:
            proc = subprocess.Popen(
                [
                    binary("prometheus-alertmanager"),
                    f"--config.file={work / 'alertmanager.yml'}",
                    f"--storage.path={work / 'data'}",
                    f"--web.listen-address=127.0.0.1:{port}",
                    "--cluster.listen-address=",
                ],
                stdout=sink,
                stderr=subprocess.STDOUT,
            )
        api = f"http://127.0.0.1:{port}"

        def ready() -> bool:
            assert proc is not None and proc.poll() is None, (work / "log").read_text()
            try:
                return httpx.get(f"{api}/-/ready", timeout=1).status_code == 200
            except httpx.TransportError:
                return False

        assert poll(
            ready,
            what="Alertmanager to be ready",
            timeout_seconds=30,
            first_delay_seconds=0.1,
            max_delay_seconds=0.5,
        ).done
        yield api, webhook, token
    finally:
        stop_process(proc)
        webhook.stop()
        shutil.rmtree(work, ignore_errors=True)


def post_alerts(api: str, alerts: list[dict[str, Any]]) -> None:
    response = httpx.post(f"{api}/api/v2/alerts", json=alerts, timeout=5)
    assert response.status_code == 200, response.text


def firing(labels: dict[str, str], started: datetime) -> dict[str, Any]:
    return {"labels": labels, "annotations": {"summary": "x"}, "startsAt": started.isoformat()}


def inhibited_by(api: str, labels: dict[str, str]) -> list[str]:
    """What Alertmanager's API says inhibits the alert with exactly these labels."""
    alerts = httpx.get(f"{api}/api/v2/alerts", timeout=5).json()
    return [fp for a in alerts if a["labels"] == labels for fp in a["status"]["inhibitedBy"]]


def test_example_config_routes_runbook_alerts_to_the_receiver(
    example_alertmanager: tuple[str, Webhook, str],
) -> None:
    api, webhook, token = example_alertmanager
    started = utcnow() - timedelta(minutes=5)
    disk = {
        "alertname": "DiskUsageHigh",
        "runbook": "disk-space",
        "instance": "db:9100",
        "target": "main",
        "mountpoint": "/var/lib/postgresql",
    }
    critical = {**disk, "severity": "critical"}
    warning = {**disk, "severity": "warning"}
    unrelated = {"alertname": "Watchdog", "instance": "prometheus:9090", "severity": "none"}
    post_alerts(api, [firing(critical, started), firing(unrelated, started)])

    assert poll(
        lambda: bool(webhook.posts),
        what="a webhook post",
        timeout_seconds=20,
        first_delay_seconds=0.2,
    ).done
    first = webhook.posts[0]
    assert first["path"] == "/alerts/alertmanager"
    assert first["authorization"] == f"Bearer {token}"
    body = first["body"]
    assert body["version"] == "4"
    assert body["status"] == "firing"
    assert body["groupLabels"] == {"alertname": "DiskUsageHigh", "instance": "db:9100"}
    assert [a["labels"] for a in body["alerts"]] == [critical]

    # The warning of the same incident, arriving while the critical fires, is inhibited.
    # (Sent in the same instant as the critical, Alertmanager may let it through once:
    # prometheus/alertmanager#2229.)
    post_alerts(api, [firing(warning, started)])
    assert poll(
        lambda: bool(inhibited_by(api, warning)),
        what="the warning to be inhibited",
        timeout_seconds=10,
        first_delay_seconds=0.2,
    ).done
    # A few group intervals for anything else Alertmanager would send.
    deadline = utcnow() + timedelta(seconds=3)
    poll(
        lambda: utcnow() > deadline,
        what="a few group intervals",
        timeout_seconds=5,
        first_delay_seconds=0.5,
        max_delay_seconds=0.5,
    )
    delivered = [alert["labels"] for alert in webhook.alerts()]
    assert warning not in delivered
    # Alerts without a runbook label never reach the receiver.
    assert all("runbook" in labels for labels in delivered)

    # Resolved alerts are sent too (send_resolved): the receiver can close what it opened.
    post_alerts(
        api,
        [
            {
                "labels": critical,
                "startsAt": started.isoformat(),
                "endsAt": utcnow().isoformat(),
            }
        ],
    )
    assert poll(
        lambda: any(
            a["labels"] == critical and a["status"] == "resolved" for a in webhook.alerts()
        ),
        what="the resolved alert to be sent",
        timeout_seconds=20,
        first_delay_seconds=0.2,
    ).done
