"""release-rollback's pure rules: variable names Prefect accepts, the create body that keeps
the container's own definition and drops what only its image gave, the decision and the cap."""

from __future__ import annotations

import re
from datetime import UTC, datetime

from prefect.client.schemas.actions import VariableCreate

from tasks.models import ActionStatus, Severity
from tasks.release_rules import (
    HealthyImage,
    JudgedContainer,
    Release,
    ReleaseParams,
    RunningImage,
    healthy_image_variable,
    healthy_value,
    one_network_at_create,
    plan_rollback,
    recreate_body,
    release_findings,
)

GOOD, BAD = "sha256:" + "a" * 64, "sha256:" + "b" * 64
NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def test_variable_names_are_ones_prefect_accepts_and_never_shared() -> None:
    assert healthy_image_variable("api") == "runbook-healthy-image-api"
    names = {healthy_image_variable(n) for n in ("My.App", "my-app", "my_app", "x" * 400)}
    assert len(names) == 4
    for name in names:
        assert re.fullmatch(r"[a-z0-9_-]{1,255}", name)
        VariableCreate(name=name, value=healthy_value("s", [running(GOOD)], NOW))  # accepted


def running(image: str, name: str = "api-1") -> RunningImage:
    return RunningImage(
        container=name, container_id="c" * 64, image_id=image, reference="app:1", running=True
    )


def test_a_rollout_under_way_is_not_recorded() -> None:
    assert healthy_value("api", [running(GOOD), running(BAD, "api-2")], NOW) is None


def test_the_body_keeps_the_definition_and_leaves_image_defaults_to_the_other_image() -> None:
    container = {
        "Id": "0123456789abcdef",
        "Config": {
            "Hostname": "0123456789ab",
            "Image": "app:2",
            "Env": ["PORT=80", "APP_VERSION=2", "PATH=/bin"],
            "Cmd": ["serve"],
            "Entrypoint": ["/entry"],
            "Labels": {"com.docker.compose.service": "api", "version": "2"},
            "ExposedPorts": {"80/tcp": {}, "9000/tcp": {}},
            "Volumes": {"/cache": {}},
        },
        "HostConfig": {"NetworkMode": "web", "Binds": ["/srv:/data"], "Mounts": None},
        "Mounts": [
            {"Type": "bind", "Source": "/srv", "Destination": "/data", "RW": True},
            {"Type": "volume", "Name": "v1", "Destination": "/cache", "RW": True},
        ],
        "NetworkSettings": {
            "Networks": {
                "web": {"Aliases": ["api", "0123456789ab"], "MacAddress": "02:42"},
                "db": {"Aliases": ["api"]},
            }
        },
    }
    image = {
        "Env": ["APP_VERSION=2", "PATH=/bin"],
        "Cmd": ["serve"],
        "Entrypoint": ["/other"],
        "Labels": {"version": "2"},
        "ExposedPorts": {"9000/tcp": {}},
        "Volumes": {"/cache": {}},
    }
    body = recreate_body(container, image, GOOD)
    assert body["Image"] == GOOD and "Hostname" not in body
    assert body["Env"] == ["PORT=80"]
    assert "Cmd" not in body and body["Entrypoint"] == ["/entry"]  # the service set this one
    assert body["Labels"] == {"com.docker.compose.service": "api"}
    assert body["ExposedPorts"] == {"80/tcp": {}} and "Volumes" not in body
    assert body["HostConfig"]["Mounts"] == [
        {"Type": "volume", "Source": "v1", "Target": "/cache", "ReadOnly": False}
    ]
    assert body["NetworkingConfig"]["EndpointsConfig"] == {
        "web": {"Aliases": ["api"]},
        "db": {"Aliases": ["api"]},
    }
    first, rest = one_network_at_create(body)
    assert first["NetworkingConfig"]["EndpointsConfig"] == {"web": {"Aliases": ["api"]}}
    assert rest == {"db": {"Aliases": ["api"]}}


def test_decisions() -> None:
    p = ReleaseParams()
    known = HealthyImage(image_id=GOOD, reference="app:1", recorded_at=NOW)
    bad = Release(containers=[running(BAD)], recorded=known, recorded_present=True)

    found, rollback = release_findings("api", bad, failing=False, blamed=[])
    assert rollback is None and found[-1].severity is Severity.ok
    found, rollback = release_findings("api", bad, True, ["database (postgres.main)"])
    assert rollback is None and "not a bad release" in found[-1].message
    found, rollback = release_findings("api", Release(containers=[running(BAD)]), True, [])
    assert rollback is None and "no earlier healthy image" in found[-1].message
    same = Release(containers=[running(GOOD)], recorded=known, recorded_present=True)
    found, rollback = release_findings("api", same, True, [])
    assert rollback is None and "not a bad release" in found[-1].message
    gone = bad.model_copy(update={"recorded_present": False})
    found, rollback = release_findings("api", gone, True, [])
    assert rollback is None and "no longer on the Docker engine" in found[-1].message

    found, rollback = release_findings("api", bad, True, [])
    assert found[-1].severity is Severity.critical and rollback is not None
    # Each container as judged: its id and the bad image id, for act to check it still is.
    assert rollback.image_id == GOOD and rollback.containers == (
        JudgedContainer(container="api-1", container_id="c" * 64, image_id=BAD),
    )
    [step] = plan_rollback("api", rollback, p)
    assert step.destructive and step.status is ActionStatus.planned

    many = Release(
        containers=[running(BAD, f"api-{i}") for i in range(3)],
        recorded=known,
        recorded_present=True,
    )
    _, rollback = release_findings("api", many, True, [])
    [step] = plan_rollback("api", rollback, ReleaseParams(max_containers=2))
    assert step.status is ActionStatus.skipped and "over max_containers = 2" in step.detail
