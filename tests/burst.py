"""A burst of Alertmanager notifications for the receiver, and what storm control must make of
it: shared by tests/test_receiver_burst.py (a small burst) and bench/receiver_burst.py (the full
one, 10,000 alerts).

The burst, as Alertmanager sends it: alerts grouped by [alertname, group], GROUP_SIZE
fingerprints to a group; every notification of a group carries all of its alerts with their
current status (firing or resolved), the group's notifications go out one after another (the
next after the answer to the one before, as Alertmanager's per-group pipeline does), and
several senders run at once, each with its own groups, taking them in turns: so repeats and
resolves of one alert are interleaved with everyone else's. In a group's first notification
every alert fires; after that a firing alert resolves with probability RESOLVE and a resolved
one fires again (a new episode) with probability REFIRE. Seeded: the same burst every time.

Expected, per delivery (storm control with a window longer than the burst and no cap): a
resolved alert `resolved` (never a run), a firing one `started` when its fingerprint was
unknown or resolved before (a new episode), else `deduplicated`.
"""

from __future__ import annotations

import hashlib
import json
import random
import statistics
import threading
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import httpx

GROUP_SIZE = 10
# A 503 is answered with Retry-After: the notification is sent again, as Alertmanager does
# (its own backoff is longer; the group's next notification waits for it, here as there).
RESENDS, RESEND_SECONDS = 5, 1.0
RESOLVE, REFIRE = 0.25, 0.5
ALERT = "IdleInTransaction"  # what tests/test_receiver.py's ROUTE matches


@dataclass
class Burst:
    # per group, its notifications in the order they are sent
    groups: list[list[dict[str, Any]]]
    # per fingerprint, the outcome of each of its deliveries, in order
    expected: dict[str, list[str]]

    @property
    def alerts(self) -> int:
        return sum(len(outcomes) for outcomes in self.expected.values())

    @property
    def payloads(self) -> int:
        return sum(len(notifications) for notifications in self.groups)

    @property
    def outcomes(self) -> Counter[str]:
        return Counter(o for outcomes in self.expected.values() for o in outcomes)


def fingerprint(tag: str, group: int, i: int) -> str:
    return hashlib.sha256(f"{tag}/{group}/{i}".encode()).hexdigest()[:16]


def make_burst(alerts: int, fingerprints: int, *, tag: str = "burst", seed: int = 19) -> Burst:
    """alerts / fingerprints deliveries of each fingerprint, GROUP_SIZE fingerprints a group."""
    if fingerprints % GROUP_SIZE or alerts % fingerprints:
        raise ValueError(f"fingerprints a multiple of {GROUP_SIZE}, alerts of fingerprints")
    rng = random.Random(seed)
    rounds = alerts // fingerprints
    groups: list[list[dict[str, Any]]] = []
    expected: dict[str, list[str]] = {}
    for g in range(fingerprints // GROUP_SIZE):
        name = f"{tag}-g{g:05d}"
        prints = [fingerprint(tag, g, i) for i in range(GROUP_SIZE)]
        status: dict[str, str | None] = dict.fromkeys(prints)
        notifications = []
        for n in range(rounds):
            items = []
            for i, fp in enumerate(prints):
                before = status[fp]
                if n == 0:
                    now = "firing"
                elif before == "firing":
                    now = "resolved" if rng.random() < RESOLVE else "firing"
                else:
                    now = "firing" if rng.random() < REFIRE else "resolved"
                status[fp] = now
                if now == "resolved":
                    outcome = "resolved"
                else:
                    outcome = "deduplicated" if before == "firing" else "started"
                expected.setdefault(fp, []).append(outcome)
                items.append(alert(fp, now, group=name, instance=f"db-{g}-{i}"))
            notifications.append(notification(name, items))
        groups.append(notifications)
    return Burst(groups, expected)


def alert(fp: str, status: str, **labels: str) -> dict[str, Any]:
    return {
        "status": status,
        "labels": {"alertname": ALERT, "severity": "critical", "target": "main"} | labels,
        "annotations": {"summary": "sessions idle in transaction"},
        "startsAt": "2026-12-01T12:00:00Z",
        "endsAt": "0001-01-01T00:00:00Z" if status == "firing" else "2026-12-01T12:05:00Z",
        "generatorURL": "http://prometheus.example/graph",
        "fingerprint": fp,
    }


def notification(group: str, alerts: list[dict[str, Any]]) -> dict[str, Any]:
    """An Alertmanager webhook (version 4) of one group."""
    firing = any(a["status"] == "firing" for a in alerts)
    return {
        "version": "4",
        "groupKey": f'{{}}:{{alertname="{ALERT}", group="{group}"}}',
        "truncatedAlerts": 0,
        "status": "firing" if firing else "resolved",
        "receiver": "runbook-receiver",
        "groupLabels": {"alertname": ALERT, "group": group},
        "commonLabels": {"alertname": ALERT, "severity": "critical", "target": "main"},
        "commonAnnotations": {"summary": "sessions idle in transaction"},
        "externalURL": "http://alertmanager.example:9093",
        "alerts": alerts,
    }


@dataclass
class Sent:
    seconds: float  # the request's, sent to answered
    status: int
    body: Any  # the answer, JSON (the receiver's {"alerts": [...]}), or its text
    notification: int = 0  # which of its group's
    attempt: int = 0  # 0, or which re-send of the notification after a 503


@dataclass
class Delivery:
    """What the senders saw: every answer, in each group's order, and the wall time."""

    by_group: list[list[Sent]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def sent(self) -> list[Sent]:
        return [s for group in self.by_group for s in group]

    def latency(self) -> tuple[float, float]:
        """p50 and p99 of the requests' seconds (every attempt)."""
        times = sorted(s.seconds for s in self.sent)
        return statistics.median(times), statistics.quantiles(times, n=100)[98]


def send(url: str, burst: Burst, senders: int, headers: dict[str, str]) -> Delivery:
    """POST every notification of `burst` to url from `senders` threads at once, each with its
    share of the groups (group g to sender g % senders), taking its groups in turns: the first
    notification of each, then the second of each, and so on. Never raises for an answer."""
    delivery = Delivery([[] for _ in burst.groups])
    bodies = [[json.dumps(n).encode() for n in group] for group in burst.groups]
    headers = headers | {"Content-Type": "application/json"}
    errors: list[BaseException] = []

    def sender(mine: list[int]) -> None:
        try:
            # Alertmanager waits up to its group_interval (5 min by default) for an answer.
            with httpx.Client(timeout=300, headers=headers) as client:
                rounds = max(len(bodies[g]) for g in mine)
                for n in range(rounds):
                    for g in mine:
                        if n >= len(bodies[g]):
                            continue
                        for attempt in range(RESENDS + 1):
                            if attempt:
                                time.sleep(RESEND_SECONDS)
                            began = time.perf_counter()
                            response = client.post(url, content=bodies[g][n])
                            seconds = time.perf_counter() - began
                            try:
                                body = response.json()
                            except ValueError:
                                body = response.text
                            sent = Sent(seconds, response.status_code, body, n, attempt)
                            delivery.by_group[g].append(sent)
                            if response.status_code != 503:
                                break
        except BaseException as exc:  # a sender's crash fails the check, not silently
            errors.append(exc)

    threads = [
        threading.Thread(target=sender, args=(list(range(s, len(bodies), senders)),))
        for s in range(senders)
    ]
    began = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    delivery.seconds = time.perf_counter() - began
    if errors:
        raise errors[0]
    return delivery


def problems(
    burst: Burst,
    delivery: Delivery,
    recorded: Iterable[tuple[str, str, str, str | None]],
    api_runs: Iterable[str],
) -> list[str]:
    """What storm control got wrong, [] when nothing. recorded: the store's deliveries
    (fingerprint, status, outcome, flow_run_id), oldest first; api_runs: the ids of the runs
    the Prefect API has for the deployment, created since the burst began.

    Every notification answered 202 in the end (a 503 re-sent); one run per firing episode
    (per fingerprint, as many distinct runs as its expected starts) and the same ids answered,
    recorded and in the API; a resolve always `resolved` and without a run; every delivery,
    re-sends included, a row of the store; without re-sends, each alert's outcomes exactly
    as expected."""
    found: list[str] = []
    last = {(g, s.notification): s for g, group in enumerate(delivery.by_group) for s in group}
    final = list(last.values())  # each notification's last answer
    bad = Counter(s.status for s in final if s.status != 202)
    if bad or len(final) != burst.payloads:
        example = next((s.body for s in final if s.status != 202), "")
        found.append(
            f"{len(final)} of {burst.payloads} notifications answered, in the end not 202: "
            f"{dict(bad)}, e.g. {str(example)[:300]}"
        )
    answered: dict[str, list[str]] = {}  # outcomes of every answered alert, re-sends too
    started: dict[str, list[str]] = {}
    delivered = 0
    for s in delivery.sent:
        if not isinstance(s.body, dict) or "alerts" not in s.body:
            continue
        for a in s.body["alerts"]:
            delivered += 1
            answered.setdefault(a["fingerprint"], []).append(a["outcome"])
            if a["outcome"] == "started":
                started.setdefault(a["fingerprint"], []).append(a["flow_run_id"])
            if a["outcome"] == "resolved" and a["flow_run_id"] is not None:
                found.append(f"a resolve of {a['fingerprint']} answered run {a['flow_run_id']}")
    resent = len(delivery.sent) - len(final)
    due = {fp: outcomes.count("started") for fp, outcomes in burst.expected.items()}
    wrong = [fp for fp, n in due.items() if len(set(started.get(fp, []))) != n]
    if wrong:
        fp = wrong[0]
        found.append(
            f"{len(wrong)} fingerprints started other than one run per episode, e.g. {fp}: "
            f"{answered.get(fp)} (expected {burst.expected[fp]})"
        )
    if not resent:
        wrong = [fp for fp, outcomes in burst.expected.items() if answered.get(fp) != outcomes]
        if wrong:
            fp = wrong[0]
            found.append(
                f"{len(wrong)} fingerprints answered other outcomes than expected, e.g. {fp}: "
                f"{answered.get(fp)} (expected {burst.expected[fp]})"
            )
    rows = list(recorded)
    if len(rows) != delivered:
        found.append(f"{len(rows)} deliveries recorded, {delivered} answered ({burst.alerts} sent)")
    stored: dict[str, list[str]] = {}
    for fp, status, outcome, run_id in rows:
        stored.setdefault(fp, []).append(outcome)
        if status == "resolved" and (outcome != "resolved" or run_id is not None):
            found.append(f"a resolve of {fp} recorded {outcome} with run {run_id}")
    wrong = [fp for fp in burst.expected if stored.get(fp) != answered.get(fp)]
    if wrong:
        fp = wrong[0]
        found.append(
            f"{len(wrong)} fingerprints recorded other outcomes than answered, e.g. {fp}: "
            f"{stored.get(fp)} (answered {answered.get(fp)})"
        )
    ids = sorted(run_id for runs in started.values() for run_id in runs)
    if len(ids) != burst.outcomes["started"] or len(set(ids)) != len(ids):
        found.append(
            f"{len(set(ids))} runs started ({len(ids)} answers), {burst.outcomes['started']} due"
        )
    runs = sorted(api_runs)
    if runs != ids:
        found.append(
            f"the Prefect API has {len(runs)} runs of the deployment ({len(set(runs))} "
            f"distinct), the answers started {len(ids)}"
        )
    stored_runs = sorted(str(run_id) for _, _, outcome, run_id in rows if outcome == "started")
    if stored_runs != ids:
        found.append(f"the store recorded {len(stored_runs)} started runs, answered {len(ids)}")
    return found


def deployment_run_ids(api: str, deployment_id: str, since: datetime) -> list[str]:
    """The ids of the deployment's flow runs created at or after `since`, every page."""
    ids: list[str] = []
    offset = 0
    with httpx.Client(timeout=120) as client:
        while True:
            response = client.post(
                f"{api}/flow_runs/filter",
                json={
                    "deployments": {"id": {"any_": [deployment_id]}},
                    "sort": "ID_DESC",
                    "limit": 200,
                    "offset": offset,
                },
            )
            response.raise_for_status()
            page = response.json()
            offset += len(page)
            ids.extend(r["id"] for r in page if datetime.fromisoformat(r["created"]) >= since)
            if len(page) < 200:
                return ids
