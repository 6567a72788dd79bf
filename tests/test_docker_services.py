"""The docker controller against a real Docker Engine (dockerd started by the tests, an image
built offline from busybox): an app restarted by service-health, a compose service scaled by
queue-backlog, a leaking container restarted by resource-pressure."""

from __future__ import annotations

import time
from typing import Any

import pytest

from deployments.localpg import free_port
from flows.queue_backlog import queue_backlog
from flows.resource_pressure import resource_pressure
from flows.service_health import service_health
from tasks.errors import TargetError
from tasks.models import ActionStatus, RunStatus, Severity
from tasks.services import COMPOSE_NUMBER, COMPOSE_PROJECT, COMPOSE_SERVICE, service_status
from tasks.settings import ServiceTarget
from tests.docker_engine import IMAGE

pytestmark = pytest.mark.usefixtures("prefect_api")


@pytest.fixture
def engine(docker_engine: Any) -> Any:
    yield docker_engine
    client = docker_engine.client()
    for c in client.containers.list(all=True):
        c.remove(force=True)
    client.close()


def service(engine: Any, name: str, body: str) -> str:
    return (
        f'[services.{name}]\nkind = "docker"\ndocker_host = "{engine.socket}"\n'
        f"timeout_seconds = 10\n{body}"
    )


def test_app_that_stops_answering_is_restarted(engine: Any, inventory: Any) -> None:
    port = free_port()
    # Writes its health file at every start, serves it with busybox httpd on loopback.
    script = (
        'mkdir -p /www && echo \'{"status": "ok"}\' > /www/health && '
        f"exec httpd -f -p 127.0.0.1:{port} -h /www"
    )
    client = engine.client()
    api = client.containers.run(
        IMAGE, ["sh", "-c", script], name="api", detach=True, network_mode="host"
    )
    inventory(
        service(
            engine, "api", f'container = "api"\nhealth_url = "http://127.0.0.1:{port}/health"\n'
        )
    )
    deadline = time.monotonic() + 10
    while service_health().status is not RunStatus.healthy:
        assert time.monotonic() < deadline
        time.sleep(0.3)

    api.exec_run(["rm", "/www/health"])  # the app is up but answers 404
    first_start = client.api.inspect_container("api")["State"]["StartedAt"]
    plan = service_health()
    assert plan.findings[0].observed == 404 and plan.status is RunStatus.unhealthy
    report = service_health(dry_run=False, approval="auto")
    assert report.status is RunStatus.fixed
    assert report.actions[0].detail == "restarted api; answering again"
    assert client.api.inspect_container("api")["State"]["StartedAt"] != first_start
    client.close()


def test_status_of_a_missing_container_is_a_clear_error(engine: Any) -> None:
    cfg = ServiceTarget(kind="docker", container="nope", docker_host=engine.socket)
    with pytest.raises(TargetError, match="no container 'nope'"):
        service_status.fn("ghost", cfg)


def test_compose_workers_are_scaled_for_a_backlog(
    engine: Any, redis_server: Any, inventory: Any
) -> None:
    client = engine.client()
    labels = {COMPOSE_PROJECT: "shop", COMPOSE_SERVICE: "worker", COMPOSE_NUMBER: "1"}
    client.containers.run(
        IMAGE,
        ["sleep", "600"],
        name="shop-worker-1",
        labels=labels,
        detach=True,
        network_mode="none",
    )
    redis = redis_server(policy="noeviction")
    with redis.client() as r:
        r.hset("bull:emails:meta", "opts.maxLenEvents", 10000)
        r.rpush("bull:emails:wait", *range(2000))
    inventory(
        f'[redis.queue]\nurl = "{redis.url}"\nrole = "queue"\nqueues = ["emails"]\n'
        f'worker_service = "workers"\n'
        + service(engine, "workers", 'compose_project = "shop"\ncompose_service = "worker"\n')
    )
    report = queue_backlog(
        "queue",
        dry_run=False,
        approval="auto",
        params={"sample_seconds": 0.2, "scale_workers_to": 3},
    )
    assert report.actions[0].status is ActionStatus.done
    assert report.actions[0].detail == "1 -> 3 replicas"
    workers = client.containers.list(filters={"label": f"{COMPOSE_SERVICE}=worker"})
    assert sorted(c.name for c in workers) == ["shop-worker-1", "shop-worker-2", "shop-worker-3"]
    assert all(c.status == "running" and c.labels[COMPOSE_PROJECT] == "shop" for c in workers)
    client.close()


# The host is shared with other work: its memory and load limits are kept out of these tests'
# way, so that only the containers decide the outcome.
HOST_OUT_OF_THE_WAY = {"host_memory_percent": 100, "host_load_per_cpu": 1000}


def test_leaking_container_over_its_memory_limit_is_restarted(engine: Any, inventory: Any) -> None:
    # Each holds 40 MB (in its /dev/shm, charged to its memory) after its first start only, as
    # a leak does; a restart gives it a fresh /dev/shm. Only `leaky` has a threshold under it.
    script = (
        "if [ -f /tmp/started ]; then exec sleep 600; fi; touch /tmp/started; "
        "dd if=/dev/zero of=/dev/shm/leak bs=1M count=40; exec sleep 600"
    )
    client = engine.client()
    for name in ("leaky", "twin"):
        client.containers.run(
            IMAGE,
            ["sh", "-c", script],
            name=name,
            detach=True,
            network_mode="none",
            mem_limit="128m",
            shm_size="64m",
        )
    inventory(
        service(engine, "leaky", 'container = "leaky"\n')
        + "[services.leaky.thresholds]\nmemory_percent = 25\n"
        + service(engine, "twin", 'container = "twin"\n')
    )
    time.sleep(3)
    plan = resource_pressure(params=HOST_OUT_OF_THE_WAY)
    memory = {f.target: f for f in plan.findings if f.check == "memory"}
    assert memory["leaky"].severity is Severity.critical and memory["leaky"].observed >= 25
    assert memory["leaky"].threshold == 25
    assert "of its limit 128 MiB" in memory["leaky"].message
    # As large, but under the default 90 % of its limit.
    assert memory["twin"].severity is Severity.ok and memory["twin"].observed >= 25
    assert memory["twin"].threshold == 90
    assert [(a.kind, a.target) for a in plan.actions] == [("restart_service", "leaky")]
    twin_started = client.containers.get("twin").attrs["State"]["StartedAt"]

    report = resource_pressure(dry_run=False, approval="auto", params=HOST_OUT_OF_THE_WAY)
    assert report.actions[0].status is ActionStatus.done
    assert report.status is RunStatus.fixed, report.findings
    assert client.containers.get("twin").attrs["State"]["StartedAt"] == twin_started
    # A value given for the run wins over the target's.
    report = resource_pressure(params={**HOST_OUT_OF_THE_WAY, "memory_percent": 20})
    memory = {f.target: f for f in report.findings if f.check == "memory"}
    assert memory["twin"].severity is Severity.critical and memory["leaky"].threshold == 20
    client.close()
