"""Releases of docker services: the images their containers run, the last healthy image
recorded in a Prefect variable by service-health, and the rollback of containers to it with the
same definition (release-rollback; seeds 000 s6, 002 s6, 003 "Deployment Failures", 004 s1).

Recording never fails a run: what cannot be read or written comes back as a warning text."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from contextlib import closing
from datetime import datetime
from typing import Any

import docker.errors
import httpx
from prefect.exceptions import PrefectException
from pydantic import ValidationError

from tasks.engine import io_task
from tasks.errors import ActionFailed, RunbookError, TargetError, TargetUnreachable
from tasks.journal import run_logger
from tasks.release_rules import (
    VARIABLE_TAGS,
    HealthyImage,
    JudgedContainer,
    Release,
    Rollback,
    RunningImage,
    aside_name,
    healthy_image_variable,
    healthy_value,
    one_network_at_create,
    recreate_body,
    short,
)
from tasks.services import _DOCKER_UNREACHABLE, DockerController
from tasks.settings import ServiceTarget
from tasks.wait import poll

# What the Prefect client raises when its API refuses or does not answer, and pydantic's
# refusal of a name or value the API would not take.
_PREFECT_API_ERRORS = (httpx.HTTPError, PrefectException, ValidationError, ValueError)


def _images(c: DockerController) -> list[RunningImage]:
    containers = c.containers()
    return [
        RunningImage(
            container=x.name,
            container_id=x.id,
            image_id=x.attrs["Image"],
            reference=(x.attrs.get("Config") or {}).get("Image") or x.attrs["Image"],
            running=bool(x.attrs["State"].get("Running")),
        )
        for x in containers
    ]


def running_images(name: str, cfg: ServiceTarget) -> list[RunningImage]:
    """The containers of a docker service and the image each runs (by container name).

    Raises:
        TargetUnreachable: the Docker API cannot be reached (transient).
        TargetError: no container of that name, or none carries the compose labels."""
    with closing(DockerController(name, cfg)) as c:
        return _images(c)


@io_task("read-release", timeout_seconds=120, retries=1)
def read_release(name: str, cfg: ServiceTarget) -> Release:
    """What release-rollback needs of a docker service: its containers and their images,
    the last healthy image recorded by service-health (its Prefect variable), and whether
    that image is still on the engine.

    Args:
        name: the [services.NAME] service's name (kind docker).
        cfg: its inventory entry.

    Returns:
        Release; recorded None when no image is recorded, or the variable cannot be read or
        holds something else (record_problem says which).

    Raises:
        TargetUnreachable: the Docker API cannot be reached (transient: retried).
        TargetError: no container of that name, none carries the compose labels, or the
            engine refuses to look up the image."""
    from prefect.variables import Variable

    variable = healthy_image_variable(name)
    recorded, problem = None, ""
    try:
        value = Variable.get(variable)
    except _PREFECT_API_ERRORS as exc:
        problem = f"Prefect variable {variable} cannot be read: {type(exc).__name__}: {exc}"
        value = None
    if value is not None:
        try:
            recorded = HealthyImage.model_validate(value)
        except ValidationError:
            problem = f"Prefect variable {variable} does not hold a recorded image"
    with closing(DockerController(name, cfg)) as c:
        images = _images(c)
        present = None
        if recorded is not None:
            present = _image_exists(c, recorded.image_id)
    return Release(
        containers=images, recorded=recorded, recorded_present=present, record_problem=problem
    )


def _image_exists(c: DockerController, image_id: str) -> bool:
    try:
        c.client.images.get(image_id)
    except docker.errors.ImageNotFound:
        return False
    except docker.errors.APIError as exc:
        raise TargetError(
            f"service {c.name!r}: Docker API: looking up image {short(image_id)}: "
            f"{exc.explanation or exc}"
        ) from exc
    except _DOCKER_UNREACHABLE as exc:
        raise TargetUnreachable(f"service {c.name!r}: Docker API: {exc}", transient=True) from exc
    return True


@io_task("snapshot-images", timeout_seconds=120, retries=0)
def snapshot_images(
    services: Mapping[str, ServiceTarget],
) -> dict[str, list[RunningImage] | str]:
    """The images the docker services among `services` run now, before their health is
    probed (so that a deploy in between is not recorded as healthy).

    Args:
        services: [services.NAME] entries by name; those of another kind are left out.

    Returns:
        By docker service name: its containers' images, or why they cannot be read.

    Raises:
        Nothing: every failure is the service's text."""
    seen: dict[str, list[RunningImage] | str] = {}
    for name, cfg in services.items():
        if cfg.kind != "docker":
            continue
        try:
            seen[name] = running_images(name, cfg)
        except RunbookError as exc:
            seen[name] = str(exc)
    return seen


@io_task("record-healthy-images", timeout_seconds=120, retries=0)
def record_healthy_images(
    services: Mapping[str, ServiceTarget],
    healthy: list[str],
    seen: Mapping[str, list[RunningImage] | str],
    now: datetime,
) -> dict[str, str]:
    """Record, for each healthy docker service, the image it runs as its last healthy one, in
    its Prefect variable (release_rules.healthy_image_variable; JSON: image_id, reference,
    recorded_at, service, containers), overwriting the previous one.

    Args:
        services: [services.NAME] entries by name.
        healthy: the names of the services healthy in this run (those not of kind docker are
            left out).
        seen: snapshot_images from before their health was probed.
        now: when (UTC), for recorded_at.

    Returns:
        By service name, a warning text for each whose image was not recorded: its images
        could not be read, changed since they were probed (a deploy under way), or the
        variable could not be written. Empty when all were recorded (a service whose
        containers run different images, a rollout under way, is left out quietly).

    Raises:
        Nothing: every failure is a warning text."""
    from prefect.variables import Variable

    warnings: dict[str, str] = {}
    for name in healthy:
        cfg = services.get(name)
        if cfg is None or cfg.kind != "docker":
            continue
        variable = healthy_image_variable(name)
        before = seen.get(name)
        try:
            now_running = running_images(name, cfg)
        except RunbookError as exc:
            warnings[name] = f"last healthy image not recorded: {exc}"
            continue
        if isinstance(before, str) or before is None:
            warnings[name] = f"last healthy image not recorded: {before or 'not read'}"
            continue
        if before != now_running:
            warnings[name] = (
                "last healthy image not recorded: its containers changed while its "
                "health was probed (a deploy under way?)"
            )
            continue
        value = healthy_value(name, now_running, now)
        if value is None:
            run_logger(__name__).info(
                "%s: its containers run different images: no last healthy image recorded", name
            )
            continue
        try:
            Variable.set(variable, value, tags=VARIABLE_TAGS, overwrite=True)
        except _PREFECT_API_ERRORS as exc:
            warnings[name] = (
                f"last healthy image not recorded: Prefect variable {variable} cannot "
                f"be written: {type(exc).__name__}: {exc}"
            )
            continue
        run_logger(__name__).info(
            "%s: recorded %s (%s) as its last healthy image in %s",
            name,
            value["reference"],
            short(value["image_id"]),
            variable,
        )
    return warnings


@io_task("rollback-image", timeout_seconds=3600, retries=0)
def rollback_image(
    name: str, cfg: ServiceTarget, rollback: Rollback, start_grace_seconds: float
) -> str:
    """Recreate each container of the service judged bad on rollback.image_id with the same
    definition (release_rules.recreate_body), one at a time: stop it (up to timeout_seconds),
    rename it aside, create and start the new one under its name, and remove the old one only
    once the new one has kept running for start_grace_seconds. If the new one cannot be
    created, does not start or exits within the grace, or the run is cancelled meanwhile, it
    is removed and the old one is put back under its name and started: the service never
    stays without its container. Never pulls: the image must be on the engine.

    Only a container still the one judged bad is recreated: when a name holds another
    container, or the same one on another image (a newer release deployed since the run
    judged it, e.g. while the approval waited), nothing at all is changed when seen before
    the first recreate, and the rest is left when seen after.

    Args:
        name: the [services.NAME] service's name (kind docker).
        cfg: its inventory entry.
        rollback: the image id and the containers (name, id, image id as judged) to recreate.
        start_grace_seconds: how long a new container must keep running.

    Returns:
        What was done, for the action's detail ("api: 3f2a... -> 0b1c... (app:1.4.1)").

    Raises:
        ActionFailed: the image is not on the engine, a container is gone or is no longer the
            one judged bad, a container was made with --rm, a new container did not come up,
            or any other error once a container was touched (a bug, Prefect's task timeout):
            the old one is back, or the message gives the docker commands to finish by hand;
            it says why, and which containers were already rolled back and stay so. A new
            container's output is never copied (it may hold credentials).
        TargetUnreachable: the Docker API cannot be reached before anything changed
            (transient).
        Only what is not an Exception (Abort, TerminationSignal, KeyboardInterrupt) goes on
        as it is, once the old container is back."""
    done: list[str] = []
    with closing(DockerController(name, cfg)) as c:
        if not _image_exists(c, rollback.image_id):
            raise ActionFailed(
                f"service {name!r}: image {rollback.reference} ({short(rollback.image_id)}) is "
                "no longer on the Docker engine: not rolled back (no pulls here)"
            )
        changed: list[str] = []
        for judged in rollback.containers:
            try:
                _still_judged(c, judged)
            except ActionFailed as exc:
                changed.append(str(exc))
        if changed:
            raise ActionFailed(
                f"service {name!r}: not rolled back, nothing changed: {'; '.join(changed)} "
                "since this run judged it bad (a newer release deployed?); run "
                "release-rollback again to judge what runs now"
            )
        # By its reference when that still names the same image (what `docker ps` and
        # compose show), else by id: a tag moved to the bad release must not be followed.
        image = rollback.image_id
        with contextlib.suppress(docker.errors.DockerException, *_DOCKER_UNREACHABLE):
            if c.client.images.get(rollback.reference).id == rollback.image_id:
                image = rollback.reference
        for judged in rollback.containers:
            try:
                done.append(_recreate(c, judged, rollback, image, start_grace_seconds))
            except Exception as exc:
                # A bug or Prefect's task timeout too: the report must say what was done.
                if isinstance(exc, RunbookError) and not done:
                    raise
                what = (
                    str(exc)
                    if isinstance(exc, RunbookError)
                    else f"service {name!r}: rolling back {judged.container!r} failed: "
                    f"{type(exc).__name__}: {exc}"
                )
                so_far = f"; already rolled back before it, and left so: {'; '.join(done)}"
                raise ActionFailed(what + (so_far if done else "")) from exc
    return "; ".join(done)


def _still_judged(c: DockerController, judged: JudgedContainer) -> dict[str, Any]:
    """The container named judged.container (its `docker inspect` attrs) when it is still the
    one judged bad: the same container id on the same image id.

    Raises:
        ActionFailed: it is not, and why, without the service's name ("'api-1' is gone",
            "'api-1' is now container 3f2a... on app:1.5 (...), not ... on ...").
        TargetUnreachable: the Docker API cannot be reached (transient)."""
    try:
        attrs: dict[str, Any] = c.client.api.inspect_container(judged.container)
    except docker.errors.NotFound:
        raise ActionFailed(f"{judged.container!r} is gone") from None
    except _DOCKER_UNREACHABLE as exc:
        raise TargetUnreachable(f"service {c.name!r}: Docker API: {exc}", transient=True) from exc
    if why := _differs(judged, attrs):
        raise ActionFailed(why)
    return attrs


def _differs(judged: JudgedContainer, attrs: Mapping[str, Any]) -> str:
    if attrs.get("Id") == judged.container_id and attrs.get("Image") == judged.image_id:
        return ""
    now = (attrs.get("Config") or {}).get("Image") or short(str(attrs.get("Image")))
    return (
        f"{judged.container!r} is now container {str(attrs.get('Id'))[:12]} on {now} "
        f"({short(str(attrs.get('Image')))}), not {judged.container_id[:12]} on "
        f"{short(judged.image_id)}"
    )


def _recreate(
    c: DockerController, judged: JudgedContainer, rollback: Rollback, image: str, grace: float
) -> str:
    api, timeout, container = c.client.api, int(c.cfg.timeout_seconds), judged.container
    try:
        attrs = _still_judged(c, judged)
    except ActionFailed as why:
        raise ActionFailed(
            f"service {c.name!r}: {container!r} not rolled back: {why} since this run judged "
            "it bad (a newer release deployed?)"
        ) from None
    if (attrs.get("HostConfig") or {}).get("AutoRemove"):
        raise ActionFailed(
            f"service {c.name!r}: container {container!r} was created with --rm: stopping it "
            "would remove it; roll it back by hand"
        )
    old_id, old_image = attrs["Id"], attrs["Image"]
    try:
        image_config = api.inspect_image(old_image).get("Config")
    except docker.errors.NotFound:
        image_config = None  # removed by force: keep all of the container's own
    except docker.errors.APIError as exc:
        raise ActionFailed(
            f"service {c.name!r}: {container!r} not rolled back: Docker API: looking up its "
            f"image {short(old_image)}: {exc.explanation or exc}"
        ) from exc
    except _DOCKER_UNREACHABLE as exc:
        raise TargetUnreachable(f"service {c.name!r}: Docker API: {exc}", transient=True) from exc
    body, networks = one_network_at_create(recreate_body(attrs, image_config, image))
    aside = aside_name(container, old_id)
    # From the stop on, whatever ends this (a Docker error, a cancellation of the run, a bug,
    # Prefect's task timeout) puts the old container back under its name, running, before it
    # goes on. Only what is not an Exception (Abort, TerminationSignal, KeyboardInterrupt,
    # cancellation) goes on as it is; every other error becomes ActionFailed saying so.
    try:
        api.stop(old_id, timeout=timeout)
        api.rename(old_id, aside)
    except BaseException as exc:
        back = _put_back(c, old_id, container, aside)
        if not isinstance(exc, Exception):
            raise
        raise ActionFailed(
            f"service {c.name!r}: stopping {container!r} failed: {_cause(exc)}; {back}"
        ) from exc
    new_id: str | None = None
    try:
        new_id = api.create_container_from_config(body, name=container)["Id"]
        for net, ep in networks.items():
            ipam = ep.get("IPAMConfig") or {}
            api.connect_container_to_network(
                new_id,
                net,
                aliases=ep.get("Aliases"),
                links=dict(link.split(":", 1) for link in ep.get("Links") or []) or None,
                ipv4_address=ipam.get("IPv4Address"),
                ipv6_address=ipam.get("IPv6Address"),
                driver_opt=ep.get("DriverOpts"),
            )
        api.start(new_id)
        exited = poll(
            lambda: api.inspect_container(new_id)["State"],
            what=f"the new {container!r} to keep running",
            timeout_seconds=grace,
            done=lambda state: not state.get("Running"),
            first_delay_seconds=min(0.5, grace),
            max_delay_seconds=min(1.0, grace),
        )
        if exited.done:
            # Its output is not copied: startup logs often print DSNs or tokens.
            # Never started against production again to read it (migrations, consumers).
            raise ActionFailed(
                f"the new container exited with code {exited.value.get('ExitCode')} within "
                f"{grace:g} s (its output is not copied here, it may hold credentials, and it "
                f"went with the container: see the CI/build logs of {rollback.reference}, or "
                "`docker run` it on a machine that is not production, without the service's "
                "environment)"
            )
    except BaseException as exc:
        left = _remove_new(c, new_id, old_id, container)
        back = _put_back(c, old_id, container, aside)
        if not isinstance(exc, Exception):
            raise
        raise ActionFailed(
            f"service {c.name!r}: {container!r} not rolled back to {rollback.reference} "
            f"({short(rollback.image_id)}): {_cause(exc)}; {left}{back}"
        ) from exc
    try:
        api.remove_container(old_id)
    except _DOCKER_UNREACHABLE as exc:
        run_logger(__name__).warning(
            "service %r: the old container %s could not be removed: %s", c.name, aside, exc
        )
    return f"{container}: {short(old_image)} -> {short(rollback.image_id)} ({rollback.reference})"


def _cause(exc: Exception) -> str:
    """An error for a message: a runbook error's own text, the Docker engine's explanation,
    else its type and text (a bug, Prefect's task timeout: TimeoutError)."""
    if isinstance(exc, RunbookError):
        return str(exc)
    if isinstance(exc, docker.errors.APIError):
        return str(exc.explanation or exc)
    return f"{type(exc).__name__}: {exc}"


def _remove_new(c: DockerController, new_id: str | None, old_id: str, name: str) -> str:
    """Remove (by force) the new container made under `name`. new_id None (an interruption
    after Docker made it but before its id came back) looks `name` up: whatever holds it and
    is not old_id is the new one. Returns "" when none is left, else what failed and the
    command to finish by hand ("...; " to go before _put_back's text); what fails is logged,
    as the caller raises the first error."""
    api = c.client.api
    try:
        if new_id is None:
            try:
                new_id = str(api.inspect_container(name)["Id"])
            except docker.errors.NotFound:
                return ""
            if new_id == old_id:
                return ""
        api.remove_container(new_id, force=True)
    except docker.errors.NotFound:
        return ""
    except _DOCKER_UNREACHABLE as exc:
        held = new_id[:12] if new_id else name
        run_logger(__name__).error(
            "service %r: removing the new container %s failed: %s", c.name, held, exc
        )
        return (
            f"removing the new container {held} failed ({type(exc).__name__}: "
            f"{_cause(exc)}): `docker rm -f {held}`, then "
        )
    return ""


def _put_back(c: DockerController, old_id: str, name: str, aside: str) -> str:
    """The old container back under its name, and started. Returns what became of it, for
    the caller's error ("the previous container was put back", or where it is left); what
    fails here is logged, as the caller raises the first error."""
    api = c.client.api
    try:
        attrs = api.inspect_container(old_id)
        if attrs["Name"].lstrip("/") != name:
            api.rename(old_id, name)
        if not attrs["State"].get("Running"):
            api.start(old_id)
    except _DOCKER_UNREACHABLE as exc:
        run_logger(__name__).error(
            "service %r: putting the previous container %s back failed: %s", c.name, name, exc
        )
        return (
            f"putting the previous container back failed ({type(exc).__name__}): it may be "
            f"stopped as {aside}: `docker rename {aside} {name} && docker start {name}`"
        )
    return "the previous container was put back"
