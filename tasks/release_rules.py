"""Pure decisions for release-rollback: a docker service failing its health check after its
image changed goes back to the image it last ran healthy (seeds 000 s6 "Rollback image to
previous version", 002 s6 "Rollback to previous version", 003 "Deployment Failures", 004 s1
step 3 "rollback"), and the definition its container is recreated with.

The last healthy image of each docker service is recorded by service-health's healthy runs in a
Prefect variable (healthy_image_variable); nothing here pulls from a registry: the image must
still be on the engine."""

from __future__ import annotations

import hashlib
import re
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from tasks.models import Action, ActionStatus, Finding, Params, ServiceRef, Severity

ReleaseAction = Literal["rollback_image"]

# Prefect variable names: lowercase letters, digits, "-" and "_", at most 255 characters
# (prefect.types.names.VariableName); values at most 5000 characters of JSON
# (prefect.types.MAX_VARIABLE_VALUE_LENGTH).
VARIABLE_PREFIX = "runbook-healthy-image-"
VARIABLE_NAME_MAX = 255
MAX_RECORDED_CONTAINERS = 20
MAX_REFERENCE_CHARS = 1000
VARIABLE_TAGS = ["runbook", "release-rollback"]


class ReleaseParams(Params):
    ready_timeout_seconds: float = Field(
        60,
        gt=0,
        le=3600,
        description="seconds to wait for health after a rollback; over 0, at most 3600",
    )
    start_grace_seconds: float = Field(
        5,
        gt=0,
        le=300,
        description="seconds a new container must keep running before the old one is "
        "removed; over 0, at most 300",
    )
    max_containers: int = Field(
        10,
        ge=1,
        le=100,
        description="containers one run may recreate (a compose service's replicas); 1 to 100",
    )


class RunningImage(BaseModel):
    """One container of a service and the image it runs: image_id is the engine's id
    (sha256:...), reference what the container was created from (Config.Image: a tag such
    as ghcr.io/org/api:1.4.2, or an id)."""

    model_config = ConfigDict(frozen=True)

    container: str
    container_id: str
    image_id: str
    reference: str
    running: bool


class HealthyImage(BaseModel):
    """The value of a service's healthy-image variable: the image it last ran healthy."""

    image_id: str
    reference: str
    recorded_at: datetime
    service: str = ""
    containers: list[str] = Field(default_factory=list)


class Release(BaseModel):
    """What release-rollback reads of a service: its containers and their images, the image
    recorded as last healthy (None: none recorded), whether that image is still on the engine
    (None: not looked for), and why the record could not be read, if it could not."""

    containers: list[RunningImage]
    recorded: HealthyImage | None = None
    recorded_present: bool | None = None
    record_problem: str = ""


class JudgedContainer(BaseModel):
    """A container as diagnose judged it bad: its name, its id and the image id it ran. The
    rollback recreates it only while the name still holds that container on that image (a
    release deployed since, e.g. while the approval waited, is not reverted)."""

    model_config = ConfigDict(frozen=True)

    container: str
    container_id: str
    image_id: str


class Rollback(ServiceRef):
    """The rollback of a service's containers (as judged bad) to one image id; its rate limit
    counts against the service (a ServiceRef)."""

    image_id: str
    reference: str
    containers: tuple[JudgedContainer, ...]

    @property
    def names(self) -> list[str]:
        """The containers' names, in rollback order."""
        return [c.container for c in self.containers]


RollbackStep = Action[ReleaseAction, Rollback]


def healthy_image_variable(service: str) -> str:
    """The Prefect variable holding a service's last healthy image:
    `runbook-healthy-image-<service>`. A service name with characters Prefect refuses in a
    variable name (anything but lowercase letters, digits, "-" and "_") has them lowercased
    or turned into "-", and a short hash of the name appended, so two services never share
    one; at most 255 characters."""
    clean = re.sub(r"[^a-z0-9_-]", "-", service.lower())
    digest = hashlib.sha256(service.encode()).hexdigest()[:8]
    if clean != service:
        clean += "-" + digest
    name = VARIABLE_PREFIX + clean
    if len(name) > VARIABLE_NAME_MAX:
        name = name[: VARIABLE_NAME_MAX - 9] + "-" + digest
    return name


def healthy_value(
    service: str, containers: list[RunningImage], now: datetime
) -> dict[str, Any] | None:
    """The variable's value (JSON) for a healthy service: its one image id and reference,
    when it was seen healthy (UTC) and its containers (at most 20 named). None when its
    containers run different images (a rollout under way): nothing is recorded then."""
    images = {(c.image_id, c.reference) for c in containers}
    if len(images) != 1:
        return None
    ((image_id, reference),) = images
    return HealthyImage(
        image_id=image_id,
        reference=reference[:MAX_REFERENCE_CHARS],
        recorded_at=now,
        service=service,
        containers=[c.container for c in containers][:MAX_RECORDED_CONTAINERS],
    ).model_dump(mode="json")


def short(image_id: str) -> str:
    """sha256:0123456789ab... as Docker prints it: the first 12 hex digits."""
    return image_id.removeprefix("sha256:")[:12]


def describe_images(containers: list[RunningImage]) -> str:
    by_image: dict[tuple[str, str], list[str]] = {}
    for c in containers:
        by_image.setdefault((c.reference, c.image_id), []).append(c.container)
    return "; ".join(
        f"{ref} ({short(image)}) in {', '.join(names)}" for (ref, image), names in by_image.items()
    )


def release_findings(
    name: str, release: Release, failing: bool, blamed: list[str]
) -> tuple[list[Finding], Rollback | None]:
    """The images the service runs (an ok finding) and the decision (check `release`), with
    the rollback to plan, if any.

    failing: the service fails its health check or its containers are not running (or
    Docker says unhealthy); blamed: the failing health components that name another inventory
    target (a database, a cache), which a rollback would not fix. The decision:

    - healthy: ok, nothing to do;
    - a failing dependency: warning, not a bad release (service-health hands it over);
    - no healthy image recorded: warning, refused (service-health records one on its
      healthy runs; roll back by hand);
    - the containers run the recorded image: warning, not a bad release (service-health
      restarts it; read its logs);
    - the recorded image is gone from the engine: warning, refused (no pulls here);
    - else critical, and the Rollback of the containers that run another image."""
    running = Finding(
        check="image",
        target=name,
        severity=Severity.ok,
        observed=sorted({short(c.image_id) for c in release.containers}),
        message=f"runs {describe_images(release.containers)}",
    )
    rec = release.recorded
    recorded_text = (
        f"{rec.reference} ({short(rec.image_id)}), recorded healthy at "
        f"{rec.recorded_at:%Y-%m-%d %H:%M:%S} UTC"
        if rec
        else "none"
    )

    def decision(severity: Severity, message: str) -> Finding:
        return Finding(
            check="release",
            target=name,
            severity=severity,
            observed=short(rec.image_id) if rec else None,
            threshold="last healthy image",
            message=message,
        )

    if not failing:
        return [
            running,
            decision(Severity.ok, f"healthy; last healthy image {recorded_text}"),
        ], None
    if blamed:
        return [
            running,
            decision(
                Severity.warning,
                f"failing because of {', '.join(blamed)}: not a bad release, a rollback "
                "would not fix it; service-health hands it to that dependency's runbook",
            ),
        ], None
    if rec is None:
        why = f" ({release.record_problem})" if release.record_problem else ""
        return [
            running,
            decision(
                Severity.warning,
                f"no earlier healthy image is known{why}: refused. service-health records the "
                f"image on each healthy run (Prefect variable {healthy_image_variable(name)}); "
                "roll back by hand (docker compose up -d with the previous tag)",
            ),
        ], None
    changed = [c for c in release.containers if c.image_id != rec.image_id]
    if not changed:
        return [
            running,
            decision(
                Severity.warning,
                f"runs the last healthy image {recorded_text}: not a bad release; "
                "see service-health (restart) and the service's logs",
            ),
        ], None
    if release.recorded_present is False:
        return [
            running,
            decision(
                Severity.warning,
                f"the last healthy image {recorded_text} is no longer on the Docker engine: "
                f"refused (no pulls from registries here); `docker pull {rec.reference}` and "
                "check its id, or roll back by hand",
            ),
        ], None
    rollback = Rollback(
        service=name,
        image_id=rec.image_id,
        reference=rec.reference,
        containers=tuple(
            JudgedContainer(container=c.container, container_id=c.container_id, image_id=c.image_id)
            for c in changed
        ),
    )
    return [
        running,
        decision(
            Severity.critical,
            f"failing since its image changed: {describe_images(changed)}; "
            f"last healthy image {recorded_text}",
        ),
    ], rollback


def plan_rollback(name: str, rollback: Rollback | None, p: ReleaseParams) -> list[RollbackStep]:
    """One rollback_image of the containers that run another image than the last healthy
    one; skipped when there are more than max_containers of them."""
    if rollback is None:
        return []
    step: RollbackStep = Action(
        kind="rollback_image",
        target=name,
        destructive=True,
        description=f"recreate {', '.join(rollback.names)} on {rollback.reference} "
        f"({short(rollback.image_id)}) with the same definition, one at a time, each only "
        "while it is still the container judged bad on its image; each old "
        f"container is removed once its new one has run {p.start_grace_seconds:g} s, "
        f"then wait up to {p.ready_timeout_seconds:g} s for health",
        args=rollback,
    )
    if len(rollback.containers) > p.max_containers:
        step.status = ActionStatus.skipped
        step.detail = (
            f"{len(rollback.containers)} containers, over max_containers = {p.max_containers}: "
            "raise it for this run (--set max_containers=N) or roll back by hand"
        )
    return [step]


# --- the definition a container is recreated with --------------------------------------------

# Config keys an image gives a container when its definition does not set them: kept only
# when the container's value differs from its current image's (then the definition set it),
# so that the other image's own defaults apply, as `docker compose up` would do.
IMAGE_DEFAULTS = ("Cmd", "Entrypoint", "WorkingDir", "User", "Healthcheck", "StopSignal", "Shell")
# Not MacAddress: the one inspect shows is the assigned one, not one the definition set.
ENDPOINT_KEYS = ("IPAMConfig", "Links", "Aliases", "DriverOpts")


def recreate_body(
    container: dict[str, Any], image_config: dict[str, Any] | None, image: str
) -> dict[str, Any]:
    """The Docker API create body (Config with HostConfig and NetworkingConfig) that recreates
    `container` (its inspect) on `image` (an id, or a reference naming it) with the same
    definition: env, command,
    entrypoint, labels (compose's included), exposed ports, healthcheck, network mode and
    networks with their aliases, binds, mounts, port bindings, restart policy and the rest of
    its HostConfig. image_config: the Config of the image it runs now (None: unknown); what
    the container only inherited from it (its ENV, LABELs, CMD, ENTRYPOINT, WORKDIR, USER,
    HEALTHCHECK, EXPOSE and VOLUME) is left out, so the other image's own apply. Anonymous
    volumes (data at an image's VOLUME path) are mounted by name, as compose keeps them.

    The container's own hostname is kept only when it was set (not its id's first 12
    characters, Docker's default)."""
    config = dict(container.get("Config") or {})
    inherited = image_config or {}
    body: dict[str, Any] = {k: v for k, v in config.items() if k not in ("Image", "Hostname")}
    hostname = config.get("Hostname")
    if hostname and hostname != container.get("Id", "")[:12]:
        body["Hostname"] = hostname
    for key in IMAGE_DEFAULTS:
        if key in body and body[key] == inherited.get(key):
            del body[key]
    image_env = set(inherited.get("Env") or [])
    body["Env"] = [e for e in config.get("Env") or [] if e not in image_env]
    image_labels = inherited.get("Labels") or {}
    body["Labels"] = {
        k: v for k, v in (config.get("Labels") or {}).items() if image_labels.get(k) != v
    }
    for key in ("ExposedPorts", "Volumes"):
        own = {
            k: v for k, v in (config.get(key) or {}).items() if k not in (inherited.get(key) or {})
        }
        if own:
            body[key] = own
        else:
            body.pop(key, None)
    body["Image"] = image

    host = dict(container.get("HostConfig") or {})
    binds = host.get("Binds") or []
    covered = {b.split(":")[1] for b in binds if ":" in b}
    covered |= {m.get("Target") for m in host.get("Mounts") or []}
    anonymous = [
        {
            "Type": "volume",
            "Source": m["Name"],
            "Target": m["Destination"],
            "ReadOnly": not m.get("RW", True),
        }
        for m in container.get("Mounts") or []
        if m.get("Type") == "volume" and m.get("Name") and m.get("Destination") not in covered
    ]
    if anonymous:
        host["Mounts"] = [*(host.get("Mounts") or []), *anonymous]
    body["HostConfig"] = host

    short_id = container.get("Id", "")[:12]
    networks = (container.get("NetworkSettings") or {}).get("Networks") or {}
    endpoints: dict[str, Any] = {}
    for net, ep in networks.items():
        kept = {k: ep[k] for k in ENDPOINT_KEYS if ep.get(k)}
        if kept.get("Aliases"):
            kept["Aliases"] = [a for a in kept["Aliases"] if a != short_id]
        endpoints[net] = kept
    body["NetworkingConfig"] = {"EndpointsConfig": endpoints}
    return body


def one_network_at_create(body: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The create body with only its primary network (the one its NetworkMode names, else the
    first), and the other networks' endpoint settings, to connect before it starts: the
    Docker API before 1.44 refuses a container created on several networks."""
    endpoints = body["NetworkingConfig"]["EndpointsConfig"]
    mode = (body.get("HostConfig") or {}).get("NetworkMode")
    primary = mode if mode in endpoints else next(iter(endpoints), None)
    first = {k: v for k, v in endpoints.items() if k == primary}
    rest = {k: v for k, v in endpoints.items() if k != primary}
    return {**body, "NetworkingConfig": {"EndpointsConfig": first}}, rest


def aside_name(name: str, container_id: str) -> str:
    """The name an old container is renamed to while its replacement starts."""
    return f"{name}-rollback-{container_id[:12]}"
