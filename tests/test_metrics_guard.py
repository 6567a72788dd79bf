"""metrics-guard against a real HTTP server per guard mode, started by the test on loopback:
guard=secret compares a header with its secret; guard=cidr admits 127.0.0.1 and refuses any
other source by the address the connection comes from (127.0.0.2 here). Misconfigurations are
served for real: no guard at all, the app's secret rotated, a guard that only checks the
header is there, metrics disabled (404), a login page instead of metrics. Through the CLI:
exit 1 on each incident, 0 when healthy, 2 on a bad configuration; no secret in any output."""

from __future__ import annotations

import hmac
import json
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from deployments.localapps import METRICS_BODY, MetricsApp
from deployments.localpg import free_port
from flows.metrics_guard import metrics_guard
from flows.smtp_check import smtp_check
from tasks.models import RunStatus, Severity
from tests.prefect_records import run_records
from tests.test_cli import cli, no_traceback
from tests.test_smtp_check import PASSWORD, Smtp, start_smtp  # noqa: F401 (a fixture)
from tests.test_smtp_check import ca as ca
from tests.test_smtp_check import config as smtp_config

pytestmark = pytest.mark.usefixtures("prefect_api")
SECRET = "Metrics-Secret-4b7e1f"
HEADER = "x-metrics-secret"


def guarded_app(
    guard: str | None, secret: str = SECRET, enabled: bool = True, body: bytes = METRICS_BODY
) -> type[BaseHTTPRequestHandler]:
    """The app's /metrics as seed 001 describes it: METRICS_ENABLED, METRICS_GUARD (secret:
    the x-metrics-secret header equals METRICS_GUARD_SECRET; cidr: the caller's address is in
    the allowlist, here 127.0.0.1/32; presence: the broken guard that only checks the header
    is sent), METRICS_GUARD_SECRET."""

    class App(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            given = self.headers.get(HEADER)
            if not enabled:
                code, data = 404, b"Not Found"
            elif (
                guard == "secret"
                and not (given and hmac.compare_digest(given.encode(), secret.encode()))
            ) or (guard == "presence" and not given):
                code, data = 401, b"Unauthorized"
            elif guard == "cidr" and self.client_address[0] != "127.0.0.1":
                code, data = 403, b"Forbidden"
            else:
                code, data = 200, body
            self.send_response(code)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: Any) -> None:
            pass

    return App


@pytest.fixture
def serve() -> Iterator[Callable[[type[BaseHTTPRequestHandler]], str]]:
    servers: list[tuple[ThreadingHTTPServer, threading.Thread]] = []

    def start(handler: type[BaseHTTPRequestHandler]) -> str:
        server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        servers.append((server, thread))
        return f"http://127.0.0.1:{server.server_address[1]}/metrics"

    yield start
    for server, thread in servers:
        server.shutdown()
        server.server_close()
        thread.join(5)


def secret_config(url: str, secret: str = SECRET, name: str = "api") -> str:
    return f'[metrics.{name}]\nurl = "{url}"\nguard = "secret"\nsecret = "{secret}"\n'


def cidr_config(url: str, allowed: str = "127.0.0.1", denied: str = "127.0.0.2") -> str:
    return (
        f'[metrics.api]\nurl = "{url}"\nguard = "cidr"\nallowed_source = "{allowed}"\n'
        f'denied_source = "{denied}"\n'
    )


def by_check(report: Any) -> dict[str, Any]:
    return {f.check: f for f in report.findings}


def test_a_guarded_endpoint_through_the_cli(
    serve: Callable[..., str], inventory: Any, prefect_api: str
) -> None:
    inventory(secret_config(serve(guarded_app("secret"))))
    proc = cli("run", "metrics-guard", "--json", env={"PREFECT_API_URL": prefect_api})
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["status"] == "healthy"
    found = {f["check"]: f for f in report["findings"]}
    assert list(found) == ["without_secret", "wrong_secret", "with_secret"]
    assert found["without_secret"]["observed"] == 401 and found["wrong_secret"]["observed"] == 401
    assert found["with_secret"]["observed"] == 200
    assert "Prometheus text: 2 metric families" in found["with_secret"]["message"]
    assert SECRET not in proc.stdout + proc.stderr
    no_traceback(proc)


def test_an_endpoint_open_to_anyone_through_the_cli(
    serve: Callable[..., str], inventory: Any, prefect_api: str
) -> None:
    inventory(secret_config(serve(guarded_app(None))))
    proc = cli("run", "metrics-guard", "--json", env={"PREFECT_API_URL": prefect_api})
    assert proc.returncode == 1, proc.stderr
    found = {f["check"]: f for f in json.loads(proc.stdout)["findings"]}
    assert found["without_secret"]["severity"] == "critical"
    assert "the endpoint is open to anyone" in found["without_secret"]["message"]
    assert "METRICS_GUARD=secret" in found["without_secret"]["message"]
    assert "no guard at all" in found["wrong_secret"]["message"]
    assert found["with_secret"]["severity"] == "ok"
    assert SECRET not in proc.stdout + proc.stderr


def test_the_guard_refusing_the_right_secret(serve: Callable[..., str], inventory: Any) -> None:
    # The app's METRICS_GUARD_SECRET was rotated; the scraper's (the inventory's) was not.
    inventory(secret_config(serve(guarded_app("secret", secret="Rotated-0000"))))
    report = metrics_guard("api")
    assert report.status is RunStatus.unhealthy and report.exit_code == 1
    found = by_check(report)
    assert found["without_secret"].severity is Severity.ok
    assert found["with_secret"].severity is Severity.critical
    assert found["with_secret"].observed == 401
    assert "the guard refuses the right secret" in found["with_secret"].message
    assert "METRICS_GUARD_SECRET differs" in found["with_secret"].message


def test_a_guard_that_only_checks_the_header_is_there(
    serve: Callable[..., str], inventory: Any
) -> None:
    inventory(secret_config(serve(guarded_app("presence"))))
    found = by_check(metrics_guard("api"))
    assert found["without_secret"].severity is Severity.ok
    assert found["wrong_secret"].severity is Severity.critical
    assert "takes any value of x-metrics-secret" in found["wrong_secret"].message


def test_metrics_disabled(serve: Callable[..., str], inventory: Any) -> None:
    inventory(secret_config(serve(guarded_app("secret", enabled=False))))
    report = metrics_guard("api")
    assert report.exit_code == 1
    [disabled] = report.findings
    assert disabled.check == "enabled" and disabled.severity is Severity.critical
    assert "set METRICS_ENABLED=true" in disabled.message


def test_a_body_that_is_not_prometheus_text(serve: Callable[..., str], inventory: Any) -> None:
    login = b"<!doctype html><html><body><form>Sign in</form></body></html>"
    inventory(secret_config(serve(guarded_app("secret", body=login))))
    found = by_check(metrics_guard("api"))
    assert found["with_secret"].severity is Severity.critical
    assert "got 200 but not Prometheus text" in found["with_secret"].message
    assert "<!doctype html>" in found["with_secret"].message


def test_empty_metrics_and_an_endpoint_that_is_down(
    serve: Callable[..., str], inventory: Any
) -> None:
    inventory(
        secret_config(serve(guarded_app("secret", body=b"")))
        + secret_config(f"http://127.0.0.1:{free_port()}/metrics", name="down")
    )
    found = by_check(metrics_guard("api"))
    assert found["with_secret"].severity is Severity.warning
    assert "0 metric families, under 1" in found["with_secret"].message
    assert metrics_guard("api", params={"min_metric_families": 0}).status is RunStatus.healthy
    report = metrics_guard("down")
    assert report.exit_code == 1
    assert all(f.severity is Severity.critical for f in report.findings)
    assert "had no answer" in report.findings[0].message
    assert "ConnectError" in report.findings[0].message


def test_cidr_guard_by_source_address(serve: Callable[..., str], inventory: Any) -> None:
    url = serve(guarded_app("cidr"))
    inventory(cidr_config(url))
    report = metrics_guard("api")
    assert report.status is RunStatus.healthy
    found = by_check(report)
    assert found["denied_source"].observed == 403 and "127.0.0.2" in found["denied_source"].message
    assert found["allowed_source"].observed == 200

    # The inventory's allowed source is outside the app's allowlist (or the app sees a proxy).
    inventory(cidr_config(url, allowed="127.0.0.3"))
    found = by_check(metrics_guard("api"))
    assert found["allowed_source"].severity is Severity.critical
    assert "add 127.0.0.3 (or its range) to METRICS_GUARD_ALLOWLIST" in (
        found["allowed_source"].message
    )


def test_cidr_guard_that_lets_everyone_in(serve: Callable[..., str], inventory: Any) -> None:
    inventory(cidr_config(serve(guarded_app(None))))
    found = by_check(metrics_guard("api"))
    assert found["denied_source"].severity is Severity.critical
    assert "127.0.0.2 is let in" in found["denied_source"].message


def test_the_sandbox_metrics_are_open_to_anyone(inventory: Any) -> None:
    app = MetricsApp()
    try:
        inventory(secret_config(app.url, secret="sandbox-metrics-secret"))
        found = by_check(metrics_guard("api"))
    finally:
        app.close()
    assert found["without_secret"].severity is Severity.critical
    assert "open to anyone" in found["without_secret"].message


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('[metrics.api]\nurl = "http://127.0.0.1/metrics"\nguard = "secret"\n', "needs secret"),
        (
            '[metrics.api]\nurl = "http://127.0.0.1/metrics"\nguard = "cidr"\n'
            'allowed_source = "127.0.0.1"\n',
            "guard cidr needs allowed_source and denied_source",
        ),
        (cidr_config("http://127.0.0.1/m", denied="10.0.0.0/8"), "is not an IP address"),
        (secret_config("127.0.0.1:9100/metrics"), "metrics.api.url: url: use http(s)://"),
        (secret_config("http://127.0.0.1/m").replace('secret"\n', 'ip"\n'), "metrics.api.guard"),
    ],
)
def test_a_bad_configuration_exits_2(inventory: Any, text: str, expected: str) -> None:
    inventory(text)
    proc = cli("run", "metrics-guard")
    assert proc.returncode == 2, proc.stderr
    assert expected in proc.stderr and SECRET not in proc.stderr + proc.stdout
    no_traceback(proc)


def test_neither_the_smtp_password_nor_the_metrics_secret_reaches_a_log_or_report(
    serve: Callable[..., str],
    start_smtp: Callable[..., Smtp],  # noqa: F811 (a fixture)
    inventory: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level("DEBUG")
    smtp = start_smtp()
    url = serve(guarded_app("secret", secret="Rotated-0000"))
    inventory(
        secret_config(url)
        + smtp_config(smtp.port, ca_file=smtp.ca, extra='send_test = true\nfallback = "old"')
        + smtp_config(smtp.port, name="old", password="Old-Pass-0000", ca_file=smtp.ca)
    )
    reports = [metrics_guard("api"), smtp_check("mail")]
    assert all(r.status is RunStatus.unhealthy for r in reports)
    assert by_check(reports[1])["fallback"].observed == "down"  # its AUTH refused: 535
    records = run_records(r.flow_run_id for r in reports)
    # Their own lines and reports were read: the check below cannot pass by reading nothing.
    assert {"metrics-guard on api: unhealthy", "smtp-check on mail: unhealthy"} <= set(records.logs)
    assert len(records.artifacts) == 4  # each run's report: markdown and table
    for run in ("metrics-guard on api: unhealthy", "smtp-check on mail: unhealthy"):
        assert any(a.startswith(run) for a in records.artifacts), run
    texts = [r.model_dump_json() for r in reports] + [caplog.text]
    texts += records.logs + records.artifacts
    for secret in (SECRET, PASSWORD, "Old-Pass-0000"):
        assert not [t for t in texts if secret in t], secret
