"""Secret hygiene across a whole remediation: distinctive secret values configured in every
place that takes one (DSNs, a Redis password, the audit DSN, a notification URL's token, the
receiver's token), real runs that act, fail to reach a target and notify, and a rotation of a
JWT signing key held in a Prefect Secret block; then no log line, artifact, event, audit row,
notification, report or error message holds any of them, nor any line of either key."""

from __future__ import annotations

import json
import time

import psycopg
import pytest
from prefect import get_client
from prefect.blocks.system import Secret

from deployments.localpg import free_port
from flows.postgres_connections import postgres_connections
from flows.redis_health import redis_health
from flows.security_incident import security_incident
from tasks.audit import AuditSettings, init_table
from tasks.errors import RunbookError
from tasks.models import Report, RunStatus
from tasks.outcome import state_report
from tasks.security import new_private_key
from tests.conftest import Db
from tests.prefect_records import flow_run_id, run_records
from tests.test_notify import Hook, hook  # noqa: F401 (a fixture)

PG_SECRET = "Pg-Secret-7f3a9c"
AUDIT_SECRET = "Audit-Secret-2b8c4e"
REDIS_SECRET = "Redis-Secret-9a4f1d"
NOTIFY_SECRET = "Notify-Secret-5d1e7b"
RECEIVER_SECRET = "Receiver-Secret-3c6a0f"
SECRETS = (PG_SECRET, AUDIT_SECRET, REDIS_SECRET, NOTIFY_SECRET, RECEIVER_SECRET)


def with_password(dsn: str, password: str) -> str:
    # The test server trusts loopback: the password is configured, sent, and never checked.
    return dsn.replace("postgres@", f"postgres:{password}@", 1)


def leaks(text: str, keys: tuple[str, ...] = ()) -> list[str]:
    """The secrets, and the lines of PEM keys, that text holds."""
    lines = tuple(line for key in keys for line in key.splitlines() if "-----" not in line)
    return [s for s in SECRETS + lines if s in text]


@pytest.mark.usefixtures("prefect_api")
def test_no_secret_reaches_a_log_artifact_event_audit_row_or_notification(
    db: Db,
    hook: Hook,  # noqa: F811 (a fixture)
    caplog: pytest.LogCaptureFixture,
) -> None:
    audit = AuditSettings.model_validate(
        {"dsn": with_password(db.dsn, AUDIT_SECRET), "table": "secret_audit"}
    )
    init_table(audit)
    closed = free_port()
    db.config.write_text(
        f'[postgres.main]\ndsn = "{with_password(db.dsn, PG_SECRET)}"\n'
        f'[postgres.gone]\ndsn = "postgresql://app:{PG_SECRET}@127.0.0.1:{closed}/app"\n'
        f'[redis.cache]\nurl = "redis://:{REDIS_SECRET}@127.0.0.1:{closed}/0"\n'
        f'[audit]\ndsn = "{with_password(db.dsn, AUDIT_SECRET)}"\ntable = "secret_audit"\n'
        f'[receiver]\ntoken = "{RECEIVER_SECRET}"\n'
        f"[notify]\n[[notify.routes]]\n"
        f'urls = ["{hook.url(NOTIFY_SECRET)}", "json://127.0.0.1:{closed}/{NOTIFY_SECRET}"]\n'
        '[security.app]\npostgres = "main"\njwt_secret = "hygiene-jwt-key"\n'
        '[security.app.sessions]\ntable = "session"\n'
    )
    with psycopg.connect(db.dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE session (userid text, revokedat timestamptz)")
        conn.execute("INSERT INTO session VALUES ('u1', NULL), ('u2', NULL)")
    old_key = new_private_key("RS256")
    Secret(value=old_key).save("hygiene-jwt-key", overwrite=True)
    pids = db.idle_in_transaction(2)
    time.sleep(1.5)
    caplog.set_level("DEBUG")

    fixed = postgres_connections(
        "main", dry_run=False, approval="auto", params={"idle_in_transaction_seconds": 1}
    )
    assert fixed.status is RunStatus.fixed and db.alive(pids) == set()
    rotated = security_incident(
        "app", dry_run=False, approval="auto", params={"users": ["u1"], "rotate_jwt": True}
    )
    assert rotated.status is RunStatus.fixed
    new_key = Secret.load("hygiene-jwt-key").get()  # type: ignore[union-attr]
    assert isinstance(new_key, str) and new_key != old_key
    keys = (old_key, new_key)
    # Two runs that cannot reach their target: one raises, one reports; their states for their ids.
    gone = postgres_connections("gone", return_state=True)
    with pytest.raises(RunbookError) as unreachable:
        gone.result()
    cache = redis_health("cache", return_state=True)
    report = state_report(cache)
    assert isinstance(report, Report) and report.status is RunStatus.unhealthy
    errors = [str(unreachable.value), report.model_dump_json()]
    run_ids = [fixed.flow_run_id, rotated.flow_run_id, flow_run_id(gone), flow_run_id(cache)]

    # What the session's Prefect API holds of these four runs (logs, artifacts), and every event.
    records = run_records(run_ids)
    logs, artifacts = records.logs, records.artifacts
    # Their own lines were read: the check below cannot pass by reading nothing.
    finals = {"postgres-connections on main: fixed", "security-incident on app: fixed"}
    assert finals | {"redis-health on cache: unhealthy"} <= set(logs)
    assert any(line.startswith("Encountered exception during execution: Target") for line in logs)
    for run in finals:
        assert any(a.startswith(run) for a in artifacts), run
    with get_client(sync_client=True) as client:
        time.sleep(2)  # events are sent in batches
        every = {"filter": {"occurred": {"since": "2020-01-01T00:00:00Z"}}, "limit": 50}
        page = client.request("POST", "/events/filter", json=every).json()
        events = list(page["events"])
        while page.get("next_page") and len(events) < 2000:
            page = client._client.get(page["next_page"]).json()
            events += page["events"]
    with psycopg.connect(db.dsn) as conn:
        rows = [str(r) for r in conn.execute("SELECT * FROM secret_audit").fetchall()]
    assert (
        rows
        and logs
        and artifacts
        and any(e["event"].startswith("runbook.action.") for e in events)
    )
    notified = [json.dumps(payload) for _, payload in hook.drain()]
    assert notified  # the fixed run told the route (its dead second URL failed, redacted)

    places = {
        "report": [fixed.model_dump_json(), rotated.model_dump_json()],
        "errors": errors,
        "logs": logs,
        "captured logs": [caplog.text],
        "artifacts": artifacts,
        "events": [json.dumps(events)],
        "audit rows": rows,
        "notifications": notified,
    }
    found = {where: leaks("\n".join(texts), keys) for where, texts in places.items()}
    assert found == {where: [] for where in places}
