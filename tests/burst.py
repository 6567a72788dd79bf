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


@dataclass
class Delivery:
    """What the senders saw: every answer, in each group's order, and the wall time."""

    by_group: list[list[Sent]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def sent(self) -> list[Sent]:
        return [s for group in self.by_group for s in group]

    def latency(self) -> tuple[float, float]:
        """p50 and p99 of the requests' seconds."""
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
            with httpx.Client(timeout=120, headers=headers) as client:
                rounds = max(len(bodies[g]) for g in mine)
                for n in range(rounds):
                    for g in mine:
                        if n >= len(bodies[g]):
                            continue
                        began = time.perf_counter()
                        response = client.post(url, content=bodies[g][n])
                        seconds = time.perf_counter() - began
                        try:
                            body = response.json()
                        except ValueError:
                            body = response.text
                        delivery.by_group[g].append(Sent(seconds, response.status_code, body))
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
    """What storm control got wrong, [] when nothing: every answer a 202 with each alert's
    expected outcome, every delivery recorded in the store (recorded: its deliveries'
    fingerprint, status, outcome, flow_run_id, oldest first) with that outcome, one run per
    episode (api_runs: the ids of the runs the Prefect API has for the deployment, created
    since the burst began) and none from a resolve."""
    found: list[str] = []
    bad = Counter(s.status for s in delivery.sent if s.status != 202)
    if bad:
        example = next(s.body for s in delivery.sent if s.status != 202)
        found.append(f"answers other than 202: {dict(bad)}, e.g. {str(example)[:300]}")
    answered: dict[str, list[str]] = {}
    started: list[str] = []
    for group in delivery.by_group:
        for s in group:
            if s.status != 202:
                continue
            for a in s.body["alerts"]:
                answered.setdefault(a["fingerprint"], []).append(a["outcome"])
                if a["outcome"] == "started":
                    started.append(a["flow_run_id"])
    if bad == Counter():
        wrong = [fp for fp, outcomes in burst.expected.items() if answered.get(fp) != outcomes]
        if wrong:
            fp = wrong[0]
            found.append(
                f"{len(wrong)} fingerprints answered other outcomes than expected, e.g. {fp}: "
                f"{answered.get(fp)} (expected {burst.expected[fp]})"
            )
    rows = list(recorded)
    if len(rows) != burst.alerts:
        found.append(f"{len(rows)} deliveries recorded, {burst.alerts} sent")
    stored: dict[str, list[str]] = {}
    for fp, status, outcome, run_id in rows:
        stored.setdefault(fp, []).append(outcome)
        if status == "resolved" and (outcome != "resolved" or run_id is not None):
            found.append(f"a resolve of {fp} recorded {outcome} with run {run_id}")
    wrong = [fp for fp, outcomes in burst.expected.items() if stored.get(fp) != outcomes]
    if wrong:
        fp = wrong[0]
        found.append(
            f"{len(wrong)} fingerprints recorded other outcomes than expected, e.g. {fp}: "
            f"{stored.get(fp)} (expected {burst.expected[fp]})"
        )
    episodes = burst.outcomes["started"]
    runs = list(api_runs)
    if len(started) != episodes or len(set(started)) != episodes:
        found.append(f"{len(set(started))} runs started ({len(started)} answers), {episodes} due")
    if sorted(runs) != sorted(started):
        found.append(
            f"the Prefect API has {len(runs)} runs of the deployment ({len(set(runs))} "
            f"distinct), the answers started {len(started)}"
        )
    stored_runs = [run_id for _, _, outcome, run_id in rows if outcome == "started"]
    if sorted(str(r) for r in stored_runs) != sorted(started):
        found.append(f"the store recorded {len(stored_runs)} started runs, answered {len(started)}")
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
