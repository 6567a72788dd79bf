"""The docker controller against a real Docker Engine (dockerd started by the tests, an image
built offline from busybox): an app restarted by service-health, a compose service scaled by
queue-backlog, a leaking container restarted by resource-pressure."""

from __future__ import annotations

import gc
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from docker.types import LogConfig

from deployments.localpg import free_port, stop_process
from flows.queue_backlog import queue_backlog
from flows.resource_pressure import resource_pressure
from flows.service_health import service_health
from tasks.errors import TargetError, TargetUnreachable
from tasks.host import read_host_stats
from tasks.models import ActionStatus, RunStatus, Severity
from tasks.service_rules import ResourceParams, host_findings
from tasks.services import (
    COMPOSE_DIR,
    COMPOSE_FILES,
    COMPOSE_NUMBER,
    COMPOSE_PROJECT,
    COMPOSE_SERVICE,
    DEFAULT_DOCKER_HOST,
    DockerController,
    compose_cli,
    compose_scale,
    remote_docker_host,
    service_logs,
    service_status,
)
from tasks.settings import ServiceTarget
from tests.docker_engine import IMAGE, DockerEngine

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


def test_logs_the_log_driver_cannot_give_are_a_line_not_an_error(engine: Any) -> None:
    client = engine.client()
    client.containers.run(
        IMAGE,
        ["sleep", "60"],
        name="quiet",
        detach=True,
        network_mode="none",
        log_config=LogConfig(type="none"),
    )
    client.close()
    cfg = ServiceTarget(kind="docker", container="quiet", docker_host=engine.socket)
    [line] = service_logs.fn("quiet", cfg)
    assert line.startswith("(logs unavailable: service 'quiet': Docker API: reading the logs")
    assert "does not support reading" in line


# docker-py leaks the socket of a connect that fails (tests/docker_engine.py says so too).
@pytest.mark.filterwarnings("ignore::ResourceWarning")
def test_an_engine_that_stops_answering_mid_run(engine: Any) -> None:
    # Its own engine: this one is stopped under a controller that had connected to it.
    second = DockerEngine().start()
    try:
        client = second.client()
        client.containers.run(
            IMAGE, ["sleep", "60"], name="worker", detach=True, network_mode="none"
        )
        client.close()
        cfg = ServiceTarget(kind="docker", container="worker", docker_host=second.socket)
        gone = DockerController("worker", cfg)
        stop_process(second.proc)
        for read in (gone.status, gone.stats, lambda: gone.logs(5)):
            with pytest.raises(TargetUnreachable) as caught:
                read()
            assert caught.value.transient and "service 'worker': Docker API" in str(caught.value)
        gone.close()
        del caught
        gc.collect()  # the leaked sockets go here, where their warnings are ignored
    finally:
        second.stop()


def test_status_of_a_missing_container_is_a_clear_error(engine: Any) -> None:
    cfg = ServiceTarget(kind="docker", container="nope", docker_host=engine.socket)
    with pytest.raises(TargetError, match="no container 'nope'"):
        service_status.fn("ghost", cfg)


# A worker as compose defines it: a volume and a memory limit that every replica must have.
COMPOSE_FILE = f"""\
version: "2.4"
services:
  worker:
    image: {IMAGE}
    command: ["sleep", "600"]
    network_mode: none
    mem_limit: 64m
    volumes:
      - spool:/spool
volumes:
  spool: {{}}
"""


def backlog(redis_server: Any, engine: Any, inventory: Any) -> None:
    redis = redis_server(policy="noeviction")
    with redis.client() as r:
        r.hset("bull:emails:meta", "opts.maxLenEvents", 10000)
        r.rpush("bull:emails:wait", *range(2000))
    inventory(
        f'[redis.queue]\nurl = "{redis.url}"\nrole = "queue"\nqueues = ["emails"]\n'
        f'worker_service = "workers"\n'
        + service(engine, "workers", 'compose_project = "shop"\ncompose_service = "worker"\n')
    )


def test_compose_workers_are_scaled_for_a_backlog(
    engine: Any, redis_server: Any, inventory: Any, tmp_path: Path
) -> None:
    cli = compose_cli()
    assert cli is not None, "no docker compose: bash scripts/setup.sh installs docker-compose"
    (tmp_path / "compose.yml").write_text(COMPOSE_FILE)
    up = [*cli, "-p", "shop", "-f", str(tmp_path / "compose.yml"), "up", "-d"]
    env = {**os.environ, "DOCKER_HOST": engine.socket}
    subprocess.run(up, env=env, check=True, capture_output=True, timeout=120)
    client = engine.client()
    try:
        backlog(redis_server, engine, inventory)
        report = queue_backlog(
            "queue",
            dry_run=False,
            approval="auto",
            params={"sample_seconds": 0.2, "scale_workers_to": 3},
        )
        assert report.actions[0].status is ActionStatus.done, report.actions[0].detail
        assert report.actions[0].detail == "1 -> 3 replicas"
        workers = client.containers.list(filters={"label": f"{COMPOSE_SERVICE}=worker"})
        # docker-compose v1 names them shop_worker_N, the v2 plugin shop-worker-N.
        assert sorted(c.name.replace("_", "-") for c in workers) == [
            "shop-worker-1",
            "shop-worker-2",
            "shop-worker-3",
        ]
        assert all(c.status == "running" and c.labels[COMPOSE_PROJECT] == "shop" for c in workers)
        # Each replica as compose defines it: the volume and the memory limit.
        for c in workers:
            assert c.attrs["HostConfig"]["Memory"] == 64 * 2**20, c.name
            assert [m.get("Name") for m in c.attrs["Mounts"]] == ["shop_spool"], c.name
    finally:
        for c in client.containers.list(all=True):
            c.remove(force=True)
        client.volumes.get("shop_spool").remove(force=True)
        client.close()


def test_a_worker_not_made_by_compose_is_not_copied_but_the_command_given(
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
        mem_limit="64m",
        volumes={"spool": {"bind": "/spool", "mode": "rw"}},
    )
    backlog(redis_server, engine, inventory)
    report = queue_backlog(
        "queue",
        dry_run=False,
        approval="auto",
        params={"sample_seconds": 0.2, "scale_workers_to": 3},
    )
    action = report.actions[0]
    assert action.status is ActionStatus.failed and report.status is RunStatus.failed
    assert "no com.docker.compose.project.config_files label" in action.detail
    assert "lack the volumes, ports and limits" in action.detail
    assert action.detail.endswith(
        f"Run: env DOCKER_HOST={engine.socket} docker compose -p shop -f "
        "'<the project'\"'\"'s compose file>' up -d --scale worker=3 --no-recreate worker"
    )
    workers = client.containers.list(all=True, filters={"label": f"{COMPOSE_SERVICE}=worker"})
    assert [c.name for c in workers] == ["shop-worker-1"]
    client.close()


@pytest.mark.parametrize(
    ("labels", "cli", "missing"),
    [
        ({}, ["docker-compose"], "no com.docker.compose.project.config_files label"),
        ({COMPOSE_FILES: "/nonexistent/compose.yml"}, ["docker-compose"], "is not on this"),
        ({COMPOSE_FILES: __file__}, None, "no docker compose here"),
    ],
)
def test_compose_scale_runs_only_with_a_cli_and_the_project_files(
    labels: dict[str, str], cli: list[str] | None, missing: str
) -> None:
    cfg = ServiceTarget(kind="docker", compose_project="shop", compose_service="worker")
    plan = compose_scale(cfg, labels, 2, DEFAULT_DOCKER_HOST, cli)
    assert plan.argv is None and missing in plan.missing
    assert plan.command[:4] == ["docker", "compose", "-p", "shop"]
    assert plan.command[-6:] == ["up", "-d", "--scale", "worker=2", "--no-recreate", "worker"]


def test_compose_scale_uses_the_labels_of_the_project() -> None:
    cfg = ServiceTarget(kind="docker", compose_project="shop", compose_service="worker")
    labels = {COMPOSE_PROJECT: "shop", COMPOSE_FILES: __file__, COMPOSE_DIR: "/srv/shop"}
    plan = compose_scale(cfg, labels, 4, "tcp://10.0.0.5:2375", ["docker-compose"])
    args = ["-p", "shop", "-f", __file__, "--project-directory", "/srv/shop", "up", "-d"]
    args += ["--scale", "worker=4", "--no-recreate", "worker"]
    assert plan.argv == ["docker-compose", *args]
    assert plan.command == ["env", "DOCKER_HOST=tcp://10.0.0.5:2375", "docker", "compose", *args]


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


def test_host_figures_of_a_docker_host_are_its_engines(engine: Any) -> None:
    client = engine.client()
    info = client.info()
    client.close()
    host = read_host_stats.fn(engine.socket)
    assert host.memory_total == info["MemTotal"] and host.cpus == info["NCPU"]
    assert host.memory_available is None and host.load_1m is None
    memory, load = host_findings(host, ResourceParams())
    assert memory.severity is Severity.ok and memory.observed is None
    assert memory.message.startswith(f"unknown: the Docker host {engine.socket} reports its")
    assert load.observed is None and load.message.startswith("unknown:")


def test_the_host_is_read_from_the_one_remote_engine_the_services_run_on() -> None:
    def docker(host: str | None) -> ServiceTarget:
        return ServiceTarget(kind="docker", container="api", docker_host=host)

    local = ServiceTarget(kind="systemd", unit="api.service")
    remote = "tcp://10.0.0.5:2376"
    assert remote_docker_host({"a": docker(remote), "b": docker(remote)}) == remote
    assert remote_docker_host({"a": docker("unix:///run/podman.sock")}) is None
    assert remote_docker_host({"a": local}) is None
    # On several machines: this one's figures, as before.
    assert remote_docker_host({"a": docker(remote), "b": local}) is None
