"""The receiver under a burst of Alertmanager notifications (issue 19, item 5), small enough for
the suite: 1,000 alerts of 200 fingerprints, repeats and resolves interleaved, from several
senders at once, against a real Prefect API, storm control on. Every delivery answered and
recorded, one run per firing episode, none from a resolve. The full burst (10,000 alerts) and
its figures: bench/receiver_burst.py. No timing here."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from tests import test_receiver
from tests.burst import deployment_run_ids, make_burst, problems, send
from tests.test_receiver import StoreAt, auth

# test_receiver's fixtures, found by their names here
make_receiver = test_receiver.make_receiver
served_deployment = test_receiver.served_deployment


@pytest.mark.timeout(240)
def test_a_burst_of_1000_alerts_starts_one_run_per_episode_and_records_every_delivery(
    prefect_api: str, served_deployment: str, make_receiver: Any, tmp_path: Path
) -> None:
    # Runs created through the deployment (no worker here: they stay Scheduled); a window
    # longer than the burst and no cap: every firing episode starts exactly one run. The
    # SQLite store only: on PostgreSQL it takes as long again (the time is the Prefect API's);
    # test_receiver's burst of 500 and bench/receiver_burst.py --store postgres cover it.
    store_at = StoreAt(tmp_path / "burst.sqlite")
    server = make_receiver(in_process=False, window=3600, cap=100_000, store=store_at)
    burst = make_burst(1000, 200, tag=uuid.uuid4().hex[:8])
    since = datetime.now(UTC)
    delivery = send(f"{server.url}/alerts/alertmanager", burst, senders=8, headers=auth())
    recorded = store_at.rows(
        "SELECT fingerprint, status, outcome, flow_run_id FROM deliveries ORDER BY id"
    )
    runs = deployment_run_ids(prefect_api, served_deployment, since)
    assert problems(burst, delivery, recorded, runs) == []
