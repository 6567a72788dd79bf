"""release-rollback against a real Docker Engine (dockerd started by the tests, images built
offline from busybox) and the test Prefect API: service-health records the good image in a
real Prefect variable, a broken release replaces the container as a deploy would, and the
runbook, run as an engineer runs it (the `runbook` command), puts the good image back with the
same definition."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker.errors
import httpx
import pytest
from prefect.variables import Variable

from deployments.localpg import free_port
from flows.release_rollback import release_rollback
from flows.service_health import service_health
from tasks import releases
from tasks.errors import ActionFailed
from tasks.gate import approver
from tasks.models import ActionStatus, RunStatus, Severity
from tasks.release_rules import JudgedContainer, Rollback, healthy_image_variable
from tasks.releases import rollback_image
from tasks.settings import ServiceTarget
from tests.docker_engine import IMAGE
from tests.test_cli import cli, no_traceback

pytestmark = pytest.mark.usefixtures("prefect_api")

NAME = "shop-api-1"
SERVE = "mkdir -p /www && echo ok > /www/health && exec httpd -f -p 127.0.0.1:$PORT -h /www"
# Seed 000 s6: "App crash on startup, relation X does not exist".
CRASH = "echo 'Error: relation \"Menu\" does not exist' >&2; exit 1"
# An app that prints its DSN at startup, then dies.
LEAKED = "postgresql://app:s3cret-pw@db/app"
LEAKY = f"echo 'connecting to {LEAKED}'; sleep 0.2; exit 3"


def dockerfile(version: str, command: str) -> bytes:
    return (
        f"FROM {IMAGE}\nENV APP_VERSION={version}\n"
        f"LABEL org.opencontainers.image.version={version}\nVOLUME /cache\n"
        f"CMD {json.dumps(['sh', '-c', command])}\n"
    ).encode()


@pytest.fixture(scope="module")
def images(docker_engine: Any) -> dict[str, str]:
    """Two releases of one app, built from the same base: good serves /health, broken exits."""
    client = docker_engine.client()
    built = {}
    versions = (
        ("good", SERVE),
        ("broken", CRASH),
        ("noexec", SERVE),
        ("fixed", SERVE),
        ("leaky", LEAKY),
    )
    for version, command in versions:
        text = dockerfile(version, command)
        if version == "noexec":  # its entrypoint does not exist: the container cannot start
            text += b'ENTRYPOINT ["/bin/no-such-app"]\n'
        image, _ = client.images.build(fileobj=io.BytesIO(text), tag=f"shop-api:{version}", rm=True)
        built[version] = image.id
    client.close()
    return built


@pytest.fixture
def engine(docker_engine: Any) -> Iterator[Any]:
    Variable.unset(healthy_image_variable("api"))
    yield docker_engine
    client = docker_engine.client()
    for c in client.containers.list(all=True):
        c.remove(force=True, v=True)
    client.close()


def deploy(engine: Any, image: str, port: int, data: Path, restart: bool = True) -> str:
    """Create and start NAME on image with the service's definition, as `docker compose up`
    does for a new release: compose labels, env, a bind, exposed and published ports, a
    restart policy and a healthcheck. Host network: the tests' engine has no bridge."""
    client = engine.client()
    for old in client.containers.list(all=True, filters={"name": f"^{NAME}$"}):
        old.remove(force=True)  # the previous release's container goes, its image stays
    body: dict[str, Any] = {
        "Image": image,
        "Env": [f"PORT={port}", "DATABASE_URL=postgresql://app@db/app"],
        "Labels": {
            "com.docker.compose.project": "shop",
            "com.docker.compose.service": "api",
            "com.docker.compose.container-number": "1",
            "team": "payments",
        },
        "ExposedPorts": {f"{port}/tcp": {}},
        "Healthcheck": {"Test": ["CMD", "cat", "/www/health"], "Interval": 1_000_000_000},
        "HostConfig": {
            "NetworkMode": "host",
            "Binds": [f"{data}:/data"],
            "PortBindings": {f"{port}/tcp": [{"HostPort": str(port)}]},
            "RestartPolicy": {"Name": "on-failure", "MaximumRetryCount": 2},
        },
    }
    if not restart:  # Docker would restart a container that exits: its state would flap
        del body["HostConfig"]["RestartPolicy"]
    made = client.api.create_container_from_config(body, name=NAME)["Id"]
    client.api.start(made)
    client.close()
    return str(made)


def inventory_text(engine: Any, port: int) -> str:
    return (
        f'[services.api]\nkind = "docker"\ndocker_host = "{engine.socket}"\n'
        'compose_project = "shop"\ncompose_service = "api"\n'
        f'health_url = "http://127.0.0.1:{port}/health"\ntimeout_seconds = 5\n'
        "[services.api.thresholds]\nstart_grace_seconds = 1\nready_timeout_seconds = 30\n"
    )


def wait_healthy(deadline_seconds: float = 30) -> None:
    deadline = time.monotonic() + deadline_seconds
    while service_health().status is not RunStatus.healthy:
        assert time.monotonic() < deadline, "the good release never answered"
        time.sleep(0.5)


def inspect(engine: Any) -> dict[str, Any]:
    client = engine.client()
    try:
        found: dict[str, Any] = client.api.inspect_container(NAME)
        return found
    finally:
        client.close()


def test_a_bad_release_is_rolled_back_to_the_last_healthy_image(
    engine: Any, images: dict[str, str], inventory: Any, prefect_api: str, tmp_path: Path
) -> None:
    port = free_port()
    config = inventory(inventory_text(engine, port))
    deploy(engine, "shop-api:good", port, tmp_path)
    wait_healthy()
    recorded = Variable.get(healthy_image_variable("api"))
    assert isinstance(recorded, dict)
    assert recorded["image_id"] == images["good"] and recorded["reference"] == "shop-api:good"
    assert recorded["containers"] == [NAME]
    good = inspect(engine)

    deploy(engine, "shop-api:broken", port, tmp_path)  # the new release crashes at start
    env = {"PREFECT_API_URL": prefect_api, "RUNBOOK_CONFIG": str(config)}
    proc = cli("run", "release-rollback", "--target", "api", "--json", env=env)
    assert proc.returncode == 1, proc.stderr
    plan = json.loads(proc.stdout)
    [action] = plan["actions"]
    assert action["kind"] == "rollback_image" and action["status"] == "planned"
    assert f"recreate {NAME} on shop-api:good ({images['good'][7:19]})" in action["description"]
    release = next(f for f in plan["findings"] if f["check"] == "release")
    assert (
        release["severity"] == "critical"
        and "failing since its image changed" in (release["message"])
    )
    assert inspect(engine)["Image"] == images["broken"]  # a dry run changed nothing

    proc = cli("run", "release-rollback", "--target", "api", "--apply", "--yes", "--json", env=env)
    no_traceback(proc)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(proc.stdout)
    assert report["status"] == "fixed"
    assert report["actions"][0]["status"] == "done"
    assert report["actions"][0]["detail"].endswith("answering again")

    now = inspect(engine)
    assert now["Image"] == images["good"] and now["State"]["Running"]
    assert now["Name"] == f"/{NAME}" and now["Config"]["Image"] == "shop-api:good"
    # The same definition: the service's own env and labels, the good image's own ENV and
    # LABEL (not the broken one's), the same ports, bind, anonymous volume, restart policy,
    # healthcheck and network mode.
    assert sorted(now["Config"]["Env"]) == sorted(good["Config"]["Env"])
    assert "APP_VERSION=good" in now["Config"]["Env"]
    assert now["Config"]["Labels"] == good["Config"]["Labels"]
    assert now["Config"]["Labels"]["org.opencontainers.image.version"] == "good"
    assert now["Config"]["Labels"]["team"] == "payments"
    assert now["Config"]["ExposedPorts"] == good["Config"]["ExposedPorts"]
    assert now["Config"]["Healthcheck"] == good["Config"]["Healthcheck"]
    for key in ("PortBindings", "RestartPolicy", "NetworkMode", "Binds"):
        assert now["HostConfig"][key] == good["HostConfig"][key], key
    assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200
    client = engine.client()
    names = [c.name for c in client.containers.list(all=True)]
    client.close()
    assert names == [NAME]  # the broken container was removed once the good one ran

    proc = cli("run", "release-rollback", "--target", "api", "--json", env=env)
    assert proc.returncode == 0, proc.stderr
    again = json.loads(proc.stdout)
    assert again["status"] == "healthy" and again["actions"] == []


def test_the_anonymous_volume_goes_with_the_container(
    engine: Any, images: dict[str, str], inventory: Any, tmp_path: Path
) -> None:
    port = free_port()
    inventory(inventory_text(engine, port))
    deploy(engine, images["good"], port, tmp_path)
    wait_healthy()
    deploy(engine, images["broken"], port, tmp_path)
    volume = next(m["Name"] for m in inspect(engine)["Mounts"] if m["Destination"] == "/cache")
    report = release_rollback(target="api", dry_run=False, approval="auto")
    assert report.status is RunStatus.fixed
    mounts = {m["Destination"]: m for m in inspect(engine)["Mounts"]}
    assert mounts["/cache"]["Name"] == volume
    assert mounts["/data"]["Source"] == str(tmp_path)


def test_no_recorded_image_is_refused_with_a_finding(
    engine: Any, images: dict[str, str], inventory: Any, tmp_path: Path
) -> None:
    port = free_port()
    inventory(inventory_text(engine, port))
    made = deploy(engine, images["broken"], port, tmp_path)  # never seen healthy
    report = release_rollback(target="api", dry_run=False, approval="auto")
    assert report.status is RunStatus.unhealthy and report.exit_code == 1
    assert report.actions == []
    release = next(f for f in report.findings if f.check == "release")
    assert release.severity is Severity.warning
    assert "no earlier healthy image is known" in release.message
    assert healthy_image_variable("api") in release.message
    assert inspect(engine)["Id"] == made  # untouched


def test_an_unchanged_image_is_not_a_rollback(
    engine: Any, images: dict[str, str], inventory: Any, tmp_path: Path
) -> None:
    port = free_port()
    inventory(inventory_text(engine, port))
    made = deploy(engine, images["good"], port, tmp_path)
    wait_healthy()
    client = engine.client()
    client.containers.get(NAME).exec_run(["rm", "/www/health"])  # stuck, same image: 404
    client.close()
    report = release_rollback(target="api", dry_run=False, approval="auto")
    assert report.status is RunStatus.unhealthy and report.actions == []
    release = next(f for f in report.findings if f.check == "release")
    assert "not a bad release" in release.message and "service-health" in release.message
    assert inspect(engine)["Id"] == made


def test_a_recorded_image_gone_from_the_engine_is_refused(
    engine: Any, images: dict[str, str], inventory: Any, tmp_path: Path
) -> None:
    port = free_port()
    inventory(inventory_text(engine, port))
    deploy(engine, images["broken"], port, tmp_path)
    gone = "sha256:" + "0" * 64
    Variable.set(
        healthy_image_variable("api"),
        {"image_id": gone, "reference": "shop-api:1.0", "recorded_at": "2026-01-01T00:00:00Z"},
        overwrite=True,
    )
    report = release_rollback(target="api", dry_run=False, approval="auto")
    assert report.actions == [] and report.status is RunStatus.unhealthy
    release = next(f for f in report.findings if f.check == "release")
    assert "no longer on the Docker engine" in release.message
    assert "docker pull shop-api:1.0" in release.message


def docker_cfg(engine: Any) -> ServiceTarget:
    return ServiceTarget(
        kind="docker",
        docker_host=engine.socket,
        compose_project="shop",
        compose_service="api",
        timeout_seconds=5,
    )


def judged(made: str, image_id: str, name: str = NAME) -> JudgedContainer:
    return JudgedContainer(container=name, container_id=made, image_id=image_id)


def names(engine: Any) -> list[str]:
    client = engine.client()
    try:
        return sorted(c.name for c in client.containers.list(all=True))
    finally:
        client.close()


def good_and_rollback_to(
    engine: Any,
    images: dict[str, str],
    inventory: Any,
    tmp_path: Path,
    release: str,
    restart: bool = True,
) -> tuple[str, Rollback]:
    """The service on the good image (its container id), and a rollback of it to `release`
    (an image of `images`) as the plan would carry it, judged on the good image."""
    port = free_port()
    inventory(inventory_text(engine, port))
    made = deploy(engine, images["good"], port, tmp_path, restart=restart)
    return made, Rollback(
        service="api",
        image_id=images[release],
        reference=f"shop-api:{release}",
        containers=(judged(made, images["good"]),),
    )


def test_a_new_container_that_cannot_start_puts_the_old_one_back(
    engine: Any, images: dict[str, str], inventory: Any, tmp_path: Path
) -> None:
    made, target = good_and_rollback_to(engine, images, inventory, tmp_path, "noexec")
    with pytest.raises(ActionFailed, match="the previous container was put back") as failed:
        rollback_image.fn("api", cfg=docker_cfg(engine), rollback=target, start_grace_seconds=1)
    assert "already rolled back" not in str(failed.value)
    back = inspect(engine)
    assert back["Id"] == made and back["State"]["Running"] and back["Image"] == images["good"]
    assert names(engine) == [NAME]


def test_a_release_deployed_while_the_approval_waited_is_not_reverted(
    engine: Any, images: dict[str, str], inventory: Any, tmp_path: Path
) -> None:
    port = free_port()
    inventory(inventory_text(engine, port))
    deploy(engine, "shop-api:good", port, tmp_path)
    wait_healthy()
    broken = deploy(engine, "shop-api:broken", port, tmp_path)
    fixed: list[str] = []

    def deploy_a_fix_then_approve(actions: list[Any]) -> bool:
        # While the engineer reads the plan, the team deploys a fixed release.
        assert [a.kind for a in actions] == ["rollback_image"]
        fixed.append(deploy(engine, "shop-api:fixed", port, tmp_path))
        return True

    with approver(deploy_a_fix_then_approve):
        report = release_rollback(target="api", dry_run=False, approval="ask")
    [action] = report.actions
    assert action.status is ActionStatus.failed
    assert "not rolled back, nothing changed" in action.detail
    assert f"not {broken[:12]} on {images['broken'][7:19]}" in action.detail
    assert f"now container {fixed[0][:12]} on shop-api:fixed" in action.detail
    now = inspect(engine)
    assert now["Id"] == fixed[0] and now["Image"] == images["fixed"]  # the fix stays
    assert names(engine) == [NAME]


def test_a_failure_after_a_rollback_says_what_was_rolled_back(
    engine: Any, images: dict[str, str], inventory: Any, tmp_path: Path
) -> None:
    """Two replicas: the first goes back, the second is no longer the one judged (a deploy
    replaced it in between): the error names the first as rolled back."""
    port = free_port()
    inventory(inventory_text(engine, port))
    first = deploy(engine, images["broken"], port, tmp_path, restart=False)
    client = engine.client()
    client.api.rename(first, "shop-api-2")
    client.close()
    second = deploy(engine, images["broken"], port, tmp_path, restart=False)
    target = Rollback(
        service="api",
        image_id=images["good"],
        reference="shop-api:good",
        containers=(
            judged(first, images["broken"], "shop-api-2"),
            judged(second, images["broken"]),
        ),
    )
    real_recreate = releases._recreate
    replaced: list[str] = []

    def deploy_between(c: Any, one: JudgedContainer, *args: Any) -> str:
        if one.container == NAME:  # a deploy lands while shop-api-2 is being rolled back
            replaced.append(deploy(engine, images["fixed"], port, tmp_path))
        return real_recreate(c, one, *args)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(releases, "_recreate", deploy_between)
        with pytest.raises(ActionFailed) as failed:
            rollback_image.fn("api", docker_cfg(engine), target, 1)
    message = str(failed.value)
    assert f"{NAME!r} not rolled back: {NAME!r} is now container {replaced[0][:12]}" in message
    assert "already rolled back before it, and left so: shop-api-2: " in message
    assert f"-> {images['good'][7:19]} (shop-api:good)" in message
    client = engine.client()
    assert client.api.inspect_container("shop-api-2")["Image"] == images["good"]
    client.close()
    assert inspect(engine)["Id"] == replaced[0]


def test_a_cancellation_while_the_new_one_starts_puts_the_old_one_back(
    engine: Any, images: dict[str, str], inventory: Any, tmp_path: Path
) -> None:
    made, target = good_and_rollback_to(engine, images, inventory, tmp_path, "fixed")

    def cancelled(*args: Any, **kwargs: Any) -> Any:
        # Stands in for a cancellation of the run (Prefect's Abort, Ctrl-C) arriving during
        # the grace poll: it cannot be timed from outside, so the poll raises it itself.
        raise KeyboardInterrupt

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(releases, "poll", cancelled)
        with pytest.raises(KeyboardInterrupt):
            rollback_image.fn("api", docker_cfg(engine), target, 1)
    back = inspect(engine)
    assert back["Id"] == made and back["Name"] == f"/{NAME}"
    assert back["State"]["Running"] and back["Image"] == images["good"]
    assert names(engine) == [NAME]  # the new one was removed, the old one has its name back


def test_an_error_in_the_grace_puts_the_old_one_back_and_says_so(
    engine: Any, images: dict[str, str], inventory: Any, tmp_path: Path
) -> None:
    made, target = good_and_rollback_to(engine, images, inventory, tmp_path, "fixed")

    def broken_poll(*args: Any, **kwargs: Any) -> Any:
        # Stands in for a bug or Prefect's task timeout (a TimeoutError raised into the task)
        # during the grace poll: neither can be provoked from outside at that moment.
        raise RuntimeError("poll broke")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(releases, "poll", broken_poll)
        with pytest.raises(ActionFailed) as failed:  # what run_action reports as failed
            rollback_image.fn("api", docker_cfg(engine), target, 1)
    message = str(failed.value)
    assert f"{NAME!r} not rolled back to shop-api:fixed" in message
    assert (
        "RuntimeError: poll broke" in message and "the previous container was put back" in message
    )
    back = inspect(engine)
    assert back["Id"] == made and back["Name"] == f"/{NAME}"
    assert back["State"]["Running"] and back["Image"] == images["good"]
    assert names(engine) == [NAME]


def test_an_interruption_before_the_new_id_is_known_removes_the_new_one(
    engine: Any, images: dict[str, str], inventory: Any, tmp_path: Path
) -> None:
    made, target = good_and_rollback_to(engine, images, inventory, tmp_path, "fixed")
    real_create = docker.APIClient.create_container_from_config
    created: list[str] = []

    def create_then_interrupted(self: Any, *args: Any, **kwargs: Any) -> Any:
        # Stands in for Ctrl-C or a cancellation landing after the engine made the container
        # but before its id came back: it cannot be timed from outside.
        created.append(real_create(self, *args, **kwargs)["Id"])
        raise KeyboardInterrupt

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(docker.APIClient, "create_container_from_config", create_then_interrupted)
        with pytest.raises(KeyboardInterrupt):
            rollback_image.fn("api", docker_cfg(engine), target, 1)
    back = inspect(engine)
    assert created and back["Id"] == made and back["Name"] == f"/{NAME}"
    assert back["State"]["Running"] and back["Image"] == images["good"]
    assert names(engine) == [NAME]  # the new one, found by its name, was removed


def test_a_new_container_that_cannot_be_removed_is_named_with_the_commands(
    engine: Any, images: dict[str, str], inventory: Any, tmp_path: Path
) -> None:
    made, target = good_and_rollback_to(engine, images, inventory, tmp_path, "noexec")
    real_remove = docker.APIClient.remove_container

    def refused(self: Any, container: str, *args: Any, **kwargs: Any) -> Any:
        # Stands in for an engine that refuses to remove the new container (a busy mount, a
        # stuck shim): the forced removal of the one that did not start is the only one.
        if kwargs.get("force"):
            raise docker.errors.APIError("removal of container failed: device or resource busy")
        return real_remove(self, container, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(docker.APIClient, "remove_container", refused)
        with pytest.raises(ActionFailed) as failed:
            rollback_image.fn("api", docker_cfg(engine), target, 1)
    message = str(failed.value)
    assert "removing the new container" in message and "device or resource busy" in message
    assert "putting the previous container back failed" in message
    assert inspect(engine)["Id"] != made  # the new one still holds the name
    # The commands the message gives, run by hand as an engineer would, finish the job.
    commands = re.findall(r"`(docker [^`]+)`", message)
    assert [c.split()[1] for c in commands] == ["rm", "rename"]
    for command in commands:
        done = subprocess.run(
            ["sh", "-c", command],  # the rename's `&&` as a shell runs it
            env={**os.environ, "DOCKER_HOST": engine.socket},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
    back = inspect(engine)
    assert back["Id"] == made and back["State"]["Running"] and back["Image"] == images["good"]
    assert names(engine) == [NAME]


def test_the_failed_container_output_is_not_in_the_report(
    engine: Any, images: dict[str, str], inventory: Any, tmp_path: Path
) -> None:
    made, target = good_and_rollback_to(engine, images, inventory, tmp_path, "leaky", restart=False)
    with pytest.raises(ActionFailed, match="exited with code 3") as failed:
        rollback_image.fn("api", docker_cfg(engine), target, 30)  # it exits at once
    assert LEAKED not in str(failed.value)
    # The advice does not start the failing release against production again.
    assert "CI/build logs of shop-api:leaky" in str(failed.value)
    assert "docker run --rm" not in str(failed.value)
    assert inspect(engine)["Id"] == made


def test_a_service_that_is_not_docker_is_a_configuration_error(
    inventory: Any, prefect_api: str
) -> None:
    config = inventory(
        '[services.api]\nkind = "command"\nstatus_command = ["true"]\n'
        'restart_command = ["true"]\nhealth_url = "http://127.0.0.1:9/health"\n'
    )
    env = {"PREFECT_API_URL": prefect_api, "RUNBOOK_CONFIG": str(config)}
    proc = cli("run", "release-rollback", "--target", "api", env=env)
    no_traceback(proc)
    assert proc.returncode == 2
    assert 'kind = "docker"' in proc.stderr + proc.stdout
