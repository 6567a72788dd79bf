"""The receiver under a burst of Alertmanager notifications (issue 19, item 5), small enough for
the suite: 1,000 alerts of 200 fingerprints, repeats and resolves interleaved, from several
senders at once, against a real Prefect API, storm control on. Every delivery answered and
recorded, one run per firing episode, none from a resolve. The full burst (10,000 alerts) and
its figures: bench/receiver_burst.py. No timing here."""

from __future__ import annotations

import socket
import subprocess
import threading
import uuid
from contextlib import suppress
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from deployments.localpg import free_port, stop_process
from tasks.wait import poll
from tests import test_receiver
from tests.burst import deployment_run_ids, make_burst, problems, send
from tests.conftest import Db
from tests.test_receiver import (
    RUNBOOK_CLI,
    StoreAt,
    am_alert,
    am_payload,
    auth,
    cli_env,
    flow_run,
    post,
    receiver_config,
)

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


class CutProxy:
    """A TCP proxy on loopback to the Prefect API: forwards while `open`, else takes each
    connection and closes it at once (the API's connections cut, as under a crash)."""

    def __init__(self, upstream: str) -> None:
        url = httpx.URL(upstream)
        self.upstream = (url.host, url.port or 80)
        self.path = url.path
        self.open = False
        self.sockets: list[socket.socket] = []  # every one made, closed by close()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.port}{self.path}"

    def _accept(self) -> None:
        with suppress(OSError):  # closed
            while True:
                client, _ = self.listener.accept()
                self.sockets.append(client)
                if not self.open:
                    client.close()
                    continue
                server = socket.create_connection(self.upstream, timeout=30)
                self.sockets.append(server)
                for a, b in ((client, server), (server, client)):
                    threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        with suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        with suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self.listener.close()
        for sock in self.sockets:
            sock.close()


@pytest.mark.timeout(180)
def test_a_run_the_prefect_api_cannot_take_is_a_503_and_starts_when_sent_again(
    db: Db, tmp_path: Path, prefect_api: str, served_deployment: str
) -> None:
    # Under a burst the Prefect API (SQLite) answers 503 "database is locked" until its
    # client gives up: a 202 then left the episode without its run until Alertmanager's next
    # notification of the group. Here the API's connections are cut, and its client does not
    # retry (PREFECT_CLIENT_MAX_RETRIES=0): the same failure, at once.
    proxy = CutProxy(prefect_api)
    port = free_port()
    state = tmp_path / "alerts.sqlite"
    db.write_config(receiver_config(state, port=port))
    log = tmp_path / "receiver.log"
    env = cli_env(proxy.api, db.config) | {"PREFECT_CLIENT_MAX_RETRIES": "0"}
    with log.open("wb") as sink:
        proc = subprocess.Popen(
            [RUNBOOK_CLI, "receiver"], stdout=sink, stderr=subprocess.STDOUT, env=env
        )
    url = f"http://127.0.0.1:{port}"
    first, second = uuid.uuid4().hex[:16], uuid.uuid4().hex[:16]
    group = am_payload(am_alert(first), am_alert(second))

    def up() -> bool:
        assert proc.poll() is None, log.read_text()
        with suppress(httpx.HTTPError):
            return httpx.get(f"{url}/healthz", timeout=1).status_code == 200
        return False

    try:
        proxy.open = True  # `runbook receiver` checks the API as it starts
        assert poll(up, what="the receiver to answer", timeout_seconds=60).done
        proxy.open = False
        cut = post(url, "/alerts/alertmanager", group)
        assert cut.status_code == 503 and cut.headers["retry-after"] == "10", cut.text
        assert [a["outcome"] for a in cut.json()["alerts"]] == ["rejected", "rejected"]
        proxy.open = True
        again = post(url, "/alerts/alertmanager", group)
        assert again.status_code == 202, again.text
        results = again.json()["alerts"]
        assert [a["outcome"] for a in results] == ["started", "started"]
    finally:
        stop_process(proc)
        proxy.close()
    for result in results:
        assert flow_run(prefect_api, result["flow_run_id"])["deployment_id"] == served_deployment
    outcomes = StoreAt(state).rows("SELECT fingerprint, outcome FROM deliveries ORDER BY id")
    assert outcomes == [
        (first, "rejected"),
        (second, "rejected"),
        (first, "started"),
        (second, "started"),
    ]
    assert "alert runs not started source=alertmanager count=2: 503" in log.read_text()
