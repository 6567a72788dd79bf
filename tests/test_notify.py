"""Notifications through apprise to real local endpoints: an HTTP server taking json:// posts
and an aiosmtpd SMTP server taking mailto:// mail."""

from __future__ import annotations

import json
import logging
import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email import message_from_bytes
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from pydantic import SecretStr

from deployments.config import load_config
from deployments.localpg import free_port
from tasks.errors import ConfigError
from tasks.models import (
    Action,
    ActionStatus,
    Finding,
    Report,
    RunStatus,
    Severity,
)
from tasks.notify import (
    Escalation,
    NotifyRoute,
    NotifySettings,
    notify_report,
    report_event,
    run_link,
    run_severity,
    send,
)
from tasks.settings import load_settings

UI = "http://ui.example.test:4200"
RUN_ID = "0b5e1c9e-3f6a-4d2b-9a57-1c2d3e4f5a6b"
TOKEN = "T0kenInPath-9f8e7d6c"
PASSWORD = "Pw-d1st1nct-5ecret"
SECRETS = (TOKEN, PASSWORD)


@dataclass
class Hook:
    """A local HTTP endpoint; every POST lands in `posts` as (path, JSON payload)."""

    port: int
    posts: queue.Queue[tuple[str, dict[str, Any]]] = field(default_factory=queue.Queue)

    def url(self, path: str) -> str:
        return f"json://127.0.0.1:{self.port}/{path}"

    def drain(self) -> list[tuple[str, dict[str, Any]]]:
        got = []
        while not self.posts.empty():
            got.append(self.posts.get_nowait())
        return got


@pytest.fixture
def hook() -> Iterator[Hook]:
    found = Hook(free_port())

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", "0"))
            found.posts.put((self.path, json.loads(self.rfile.read(length))))
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", found.port), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield found
    server.shutdown()
    server.server_close()
    thread.join(10)


@dataclass
class Mailbox:
    port: int
    mails: queue.Queue[tuple[str, list[str], Message]] = field(default_factory=queue.Queue)

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.mails.put(
            (envelope.mail_from, envelope.rcpt_tos, message_from_bytes(envelope.content))
        )
        return "250 OK"


@pytest.fixture
def smtp() -> Iterator[Mailbox]:
    box = Mailbox(free_port())
    controller = Controller(box, hostname="127.0.0.1", port=box.port)
    controller.start()
    yield box
    controller.stop()


def settings(*routes: dict[str, Any], ui_url: str | None = UI) -> NotifySettings:
    return NotifySettings.model_validate({"routes": list(routes), "ui_url": ui_url})


def send_now(event: Any, notify: NotifySettings, **given: Any) -> list[str]:
    message: dict[str, Any] = {
        "runbook": "postgres-connections",
        "target": "main",
        "severity": Severity.critical,
        "title": "3 sessions idle in transaction",
        "body": "Plan: terminate 3 backends on main.",
        "flow_run_id": RUN_ID,
    }
    message.update(given)
    return send(event, settings=notify, **message)


def test_a_json_route_gets_title_body_and_the_runs_link(hook: Hook) -> None:
    notify = settings({"urls": [hook.url(f"hooks/{TOKEN}")]})

    assert send_now("approval_needed", notify) == []

    [(path, payload)] = hook.drain()
    assert path == f"/hooks/{TOKEN}"
    assert payload["title"] == ("[critical] approval needed: 3 sessions idle in transaction")
    assert payload["message"].startswith("Plan: terminate 3 backends on main.")
    assert f"Approve or reject: {UI}/runs/flow-run/{RUN_ID}" in payload["message"]
    assert payload["type"] == "warning"
    assert not any(s in json.dumps(payload) for s in SECRETS)


def test_a_mailto_route_sends_a_mail(smtp: Mailbox) -> None:
    url = (
        f"mailto://127.0.0.1:{smtp.port}?mode=insecure"
        "&from=runbook@example.test&to=oncall@example.test"
    )
    notify = settings({"urls": [url], "events": ["fixed"]})

    assert send_now("fixed", notify, severity=Severity.warning, title="main: fixed") == []

    sender, recipients, mail = smtp.mails.get(timeout=30)
    assert sender == "runbook@example.test"
    assert recipients == ["oncall@example.test"]
    assert mail["Subject"] == "[warning] fixed: main: fixed"
    payload = mail.get_payload(decode=True)
    assert isinstance(payload, bytes)
    text = payload.decode()
    assert "Plan: terminate 3 backends on main." in text
    assert f"Flow run: {UI}/runs/flow-run/{RUN_ID}" in text


def test_routes_take_their_events_severities_and_runbooks(hook: Hook) -> None:
    notify = settings(
        {"urls": [hook.url("pager")], "severities": ["critical"]},
        {"urls": [hook.url("chat")], "severities": ["warning"]},
        {"urls": [hook.url("db-team")], "runbooks": ["postgres-connections"]},
        {"urls": [hook.url("outcomes")], "events": ["fixed", "remediation_failed"]},
    )

    send_now("verification_failed", notify, runbook="redis-health", severity=Severity.critical)
    assert sorted(p for p, _ in hook.drain()) == ["/pager"]

    send_now("fixed", notify, severity=Severity.warning)
    assert sorted(p for p, _ in hook.drain()) == ["/chat", "/db-team", "/outcomes"]

    # ok: nothing was wrong, nobody is told
    assert send_now("fixed", notify, severity=Severity.ok) == []
    assert hook.drain() == []


def test_without_a_ui_address_the_message_has_no_link(hook: Hook) -> None:
    from prefect.settings import PREFECT_API_URL, PREFECT_UI_URL, temporary_settings

    # As under the session's Prefect API (which sets PREFECT_API_URL), then neither set.
    with (
        temporary_settings(updates={PREFECT_API_URL: "http://127.0.0.1:4200/api"}),
        temporary_settings(restore_defaults={PREFECT_API_URL, PREFECT_UI_URL}),
    ):
        notify = settings({"urls": [hook.url("chat")]}, ui_url=None)
        assert run_link(RUN_ID, notify) is None
        send_now("fixed", notify)
    [(_, payload)] = hook.drain()
    assert payload["message"] == "Plan: terminate 3 backends on main."


def test_the_link_comes_from_prefects_ui_url_unless_set() -> None:
    from prefect.settings import PREFECT_UI_URL, temporary_settings

    with temporary_settings(updates={PREFECT_UI_URL: "http://prefect.example.test:4200/"}):
        assert run_link(RUN_ID, None) == f"http://prefect.example.test:4200/runs/flow-run/{RUN_ID}"
        assert run_link(RUN_ID, settings(ui_url=UI)) == f"{UI}/runs/flow-run/{RUN_ID}"
        assert run_link(None, settings(ui_url=UI)) is None


def test_an_unanswered_request_escalates_after_its_minutes(hook: Hook) -> None:
    notify = settings(
        {"urls": [hook.url("level-1")]},
        {"urls": [hook.url("level-2")], "events": ["approval_needed"], "after_minutes": 0.02},
        {"urls": [hook.url("warning-only")], "severities": ["warning"], "after_minutes": 0.02},
    )
    escalation = Escalation(
        notify,
        runbook="postgres-connections",
        target="main",
        severity=Severity.critical,
        title="approve ending 3 sessions",
        body="Plan: terminate 3 backends on main.",
        flow_run_id=RUN_ID,
    )
    assert escalation.levels == [0.02]
    try:
        escalation.start()
        path, payload = hook.posts.get(timeout=60)  # due after 1.2 s
    finally:
        escalation.cancel()
    assert path == "/level-2"
    assert payload["title"] == (
        "[critical] approval needed: Escalation: unanswered for 0.02 min: approve ending 3 sessions"
    )
    assert f"{UI}/runs/flow-run/{RUN_ID}" in payload["message"]
    escalation.join(30)
    assert escalation.sent == [0.02]
    assert escalation.failures == []
    assert hook.drain() == []


def test_an_answered_request_does_not_escalate(hook: Hook) -> None:
    notify = settings({"urls": [hook.url("level-2")], "after_minutes": 0.02})

    def escalation(title: str) -> Escalation:
        return Escalation(
            notify,
            runbook="postgres-connections",
            target="main",
            severity=Severity.warning,
            title=title,
            body="Plan.",
            flow_run_id=RUN_ID,
        )

    answered, unanswered = escalation("answered"), escalation("unanswered")
    answered.start()
    answered.cancel()
    unanswered.start()
    # The unanswered one is due at the same level: once it arrived, so would have the other.
    _, payload = hook.posts.get(timeout=60)
    assert payload["title"].endswith("unanswered")
    answered.join(30)
    unanswered.join(30)
    assert answered.sent == []
    assert hook.drain() == []


def test_a_dead_endpoint_is_a_failure_without_its_secrets(
    hook: Hook, caplog: pytest.LogCaptureFixture
) -> None:
    dead = f"json://ops:{PASSWORD}@127.0.0.1:{free_port()}/hooks/{TOKEN}"
    notify = settings({"urls": [hook.url("alive"), dead]})
    caplog.set_level(logging.DEBUG)

    failures = send_now("remediation_failed", notify)

    assert [p for p, _ in hook.drain()] == ["/alive"]
    [failure] = failures
    assert failure.startswith("notify routes[0].urls[1] (JSON): remediation_failed not delivered")
    assert not any(s in failure for s in SECRETS)
    assert caplog.records, "apprise logs at DEBUG: the check below must see its records"
    assert not any(s in r.getMessage() for r in caplog.records for s in SECRETS)


def test_nothing_configured_sends_nothing() -> None:
    assert send_now("approval_needed", None) == []  # type: ignore[arg-type]
    assert send_now("approval_needed", settings()) == []


def finding(severity: Severity) -> Finding:
    return Finding(check="idle", target="main", severity=severity, message=f"{severity} idle")


def report(status: RunStatus, *actions: ActionStatus, dry_run: bool = False) -> Report:
    now = datetime.now(UTC)
    return Report(
        runbook="postgres-connections",
        target="main",
        dry_run=dry_run,
        status=status,
        findings=[finding(Severity.ok)],
        actions=[
            Action(
                kind="terminate_backend",
                target="main",
                description="end pid 7",
                destructive=True,
                status=s,
            )
            for s in actions
        ],
        started_at=now,
        finished_at=now,
        flow_run_id=RUN_ID,
    )


def test_report_event_says_what_a_finished_run_tells() -> None:
    found = [finding(Severity.warning), finding(Severity.critical)]
    assert run_severity(found) is Severity.critical
    assert run_severity([]) is Severity.ok
    assert report_event(report(RunStatus.failed, ActionStatus.failed), found) == (
        "remediation_failed"
    )
    assert report_event(report(RunStatus.unhealthy, ActionStatus.done), found) == (
        "verification_failed"
    )
    assert report_event(report(RunStatus.fixed, ActionStatus.done), found) == "fixed"
    assert report_event(report(RunStatus.healthy), []) is None
    # a dry run, a rejection: nothing was acted on
    assert (
        report_event(report(RunStatus.unhealthy, ActionStatus.planned, dry_run=True), found) is None
    )
    assert report_event(report(RunStatus.unhealthy, ActionStatus.skipped), found) is None


def test_notify_report_sends_the_summary(hook: Hook) -> None:
    notify = settings({"urls": [hook.url("chat")], "severities": ["warning"]})
    fixed = report(RunStatus.fixed, ActionStatus.done)

    assert notify_report(fixed, [finding(Severity.warning)], notify) == []

    [(_, payload)] = hook.drain()
    assert payload["title"] == "[warning] fixed: postgres-connections on main: fixed"
    assert "- [warning] idle: warning idle" in payload["message"]
    assert "- done: terminate_backend on main: end pid 7" in payload["message"]
    assert payload["message"].endswith(f"Flow run: {UI}/runs/flow-run/{RUN_ID}")
    assert notify_report(report(RunStatus.healthy), [], notify) == []
    assert hook.drain() == []


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "runbook.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_settings_load_routes(tmp_path: Path) -> None:
    loaded = load_settings(
        write(
            tmp_path,
            f"""
[notify]
ui_url = "{UI}"

[[notify.routes]]
urls = ["pagerduty://integration-key@api-key"]
severities = ["critical"]

[[notify.routes]]
urls = ["slack://TokenA/TokenB/TokenC/#ops"]
severities = ["warning"]
runbooks = ["postgres-connections"]

[[notify.routes]]
urls = ["mailto://user:pass@example.test"]
events = ["approval_needed"]
after_minutes = 15
""",
        )
    )
    assert loaded.notify is not None
    routes = loaded.notify.routes
    assert [r.after_minutes for r in routes] == [0, 0, 15]
    assert routes[0].events == [
        "approval_needed",
        "remediation_failed",
        "verification_failed",
        "fixed",
    ]
    assert isinstance(routes[1].urls[0], SecretStr)
    assert "TokenA" not in repr(loaded)


def test_the_readme_example_loads(tmp_path: Path) -> None:
    readme = (Path(__file__).parent.parent / "README.md").read_text(encoding="utf-8")
    section = readme.split("\n## Notifications\n", 1)[1]
    example = section.split("```toml\n", 1)[1].split("```", 1)[0]
    loaded = load_settings(write(tmp_path, example))
    assert loaded.notify is not None
    assert [r.after_minutes for r in loaded.notify.routes] == [0, 0, 0, 15]


@pytest.mark.parametrize(
    ("route", "said"),
    [
        (
            f'urls = ["json://127.0.0.1/ok", "nosuchscheme://{TOKEN}@host"]',
            "notify: routes[0].urls[1]: apprise does not accept this URL",
        ),
        (
            'urls = ["json://127.0.0.1/ok"]\nrunbooks = ["no-such-book"]',
            "routes[0].runbooks: unknown runbook 'no-such-book'",
        ),
        (
            'urls = ["json://127.0.0.1/ok"]\nevents = ["fixed"]\nafter_minutes = 5',
            'add "approval_needed" to events',
        ),
        ('urls = ["json://127.0.0.1/ok"]\nseverities = ["ok"]', "notify.routes.0.severities.0"),
    ],
)
def test_a_bad_route_is_one_clear_config_error(tmp_path: Path, route: str, said: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, f"[[notify.routes]]\n{route}\n"))
    assert said in str(caught.value)
    assert TOKEN not in str(caught.value)


def test_a_route_is_frozen() -> None:
    route = NotifyRoute(urls=[SecretStr("json://127.0.0.1/x")])
    with pytest.raises(ValueError, match="frozen"):
        route.after_minutes = 3  # type: ignore[misc]  # the assignment mypy refuses is the test
