"""`runbook serve`: one process that serves every runbook as a Prefect deployment.

Uses the Prefect API in PREFECT_API_URL, or one already answering on host:port, or starts an
embedded one (SQLite, UI at http://host:port, its log in a temp file named at start and removed
after a clean stop). With no inventory configured it brings up the sandbox, whose inventory
is also written to $PREFECT_HOME/runbook-sandbox.toml for `runbook run` while it runs. Runs
execute in this process (deployments.runner). Ctrl-C or SIGTERM stops everything it started."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from contextlib import ExitStack, suppress
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

import httpx
import psycopg

from deployments import sandbox
from deployments.catalog import ROUTINES, RUNBOOKS, SECTIONS
from deployments.config import load_config
from deployments.localpg import stop_process
from deployments.prefect_api import require_prefect_api
from tasks.errors import ConfigError, TargetError
from tasks.fleet_rules import ALL, FLEET
from tasks.settings import ENV_PREFIX, Settings, sandbox_config_path
from tasks.wait import poll

if TYPE_CHECKING:
    from prefect import Flow
    from prefect.deployments.runner import RunnerDeployment

SERVER_START_TIMEOUT = 120
# Threads for runs: a burst of 60 due runs drained p99 28 s late with 4, 20 s with 8, 16 s with
# 16 (bench/serve_capacity.py): past 8 the CPU, not the threads, is the limit.
DEFAULT_MAX_RUNS = 8


def api_healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def start_server(host: str, port: int, stack: ExitStack) -> str:
    url = f"http://{host}:{port}/api"
    if api_healthy(url):
        print(f"Using the Prefect server already at {url}", flush=True)
        return url
    prefect = shutil.which("prefect", path=str(Path(sys.executable).parent)) or "prefect"
    env = {
        **os.environ,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        # The UI asks the server where its API is; without this it says 127.0.0.1:4200.
        "PREFECT_UI_API_URL": url,
        "PREFECT_API_URL": url,
    }
    # A file, not a pipe: an unread pipe fills up and stalls the server's scheduler.
    log_dir = Path(tempfile.mkdtemp(prefix="runbook-prefect-server-"))
    log = log_dir / "server.log"
    with log.open("wb") as sink:
        proc = subprocess.Popen(
            [prefect, "server", "start", "--host", host, "--port", str(port)],
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    print(f"Prefect server starting; its log: {log}", flush=True)
    healthy = poll(
        lambda: api_healthy(url) or proc.poll() is not None,
        what=f"the Prefect server to answer at {url}",
        timeout_seconds=SERVER_START_TIMEOUT,
        first_delay_seconds=0.5,
        max_delay_seconds=0.5,
    )
    if not healthy.done:
        stop_process(proc)
        raise TargetError(
            f"the Prefect server did not answer at {url} within "
            f"{SERVER_START_TIMEOUT} s; its log: {log}"
        )
    if proc.poll() is not None and not api_healthy(url):
        detail = log.read_text(errors="replace")[-2000:].strip()
        raise TargetError(
            f"the Prefect server did not start (exit {proc.returncode}): "
            f"{detail}; is port {port} free? (--port)"
        )

    def stop() -> None:
        stop_process(proc)
        if proc.returncode in (0, -signal.SIGTERM):
            shutil.rmtree(log_dir, ignore_errors=True)
        else:
            print(f"The Prefect server exited with {proc.returncode}; its log: {log}")

    stack.callback(stop)
    print(f"Prefect server and UI at http://{host}:{port}", flush=True)
    return url


# What the receiver emits, in trigger mode, for an alert routed to a runbook and target.
ALERT_DISPATCH_EVENT = "runbook.alert.dispatch"


def _from_event(field: str, default: str = "") -> dict[str, Any]:
    """A parameter taken from the dispatch event's payload with its JSON type: a bare
    template renders to a string, and a plain {"__prefect_kind": "json", "value": "{{ ... }}"}
    is parsed before it is rendered (InvalidJSON), so the JSON kind wraps a Jinja kind.
    default: a Jinja `default(...)` filter for a field an older receiver did not send."""
    fallback = f" | default({default})" if default else ""
    template = "{{ event.payload.parameters." + field + fallback + " | tojson }}"
    return {"__prefect_kind": "json", "value": {"__prefect_kind": "jinja", "template": template}}


def fleet_trigger_spec(runbook: str) -> dict[str, Any]:
    """The trigger of a runbook's fleet deployment (NAME/fleet), as prefect.yaml spells it: a
    dispatch event of a route with a selector names target FLEET and carries the selector."""
    spec = alert_trigger_spec(runbook, FLEET)
    del spec["parameters"]["target"]
    return {**spec, "parameters": {"selector": _from_event("selector"), **spec["parameters"]}}


def alert_trigger_spec(runbook: str, target: str) -> dict[str, Any]:
    """The deployment trigger of one runbook on one target, as prefect.yaml spells it.

    The target is the deployment's own, not a template: the match already requires the
    event's runbook.target to be it, and nothing from an alert's labels is rendered into it."""
    return {
        "name": f"{runbook}/{target}: alert",
        "expect": [ALERT_DISPATCH_EVENT],
        "match": {"runbook.runbook": runbook, "runbook.target": target},
        "parameters": {
            "target": target,
            "dry_run": _from_event("dry_run"),
            "approval": _from_event("approval"),
            "params": _from_event("params"),
            "alert": _from_event("alert", default="None"),
        },
    }


def build_deployments(
    settings: Settings, *, in_sandbox: bool
) -> list[tuple[RunnerDeployment, Flow[..., Any]]]:
    """One deployment per runbook and target, and its fleet's (`NAME/fleet`, unscheduled) for a
    runbook with targets, each with the flow it runs."""
    from prefect.events import DeploymentEventTrigger
    from prefect.schedules import Cron, RRule

    now = datetime.now(UTC)

    deployments: list[tuple[RunnerDeployment, Flow[..., Any]]] = []
    for rb in RUNBOOKS.values():
        flow = rb.load()
        for target in rb.targets(settings):
            deployment: RunnerDeployment = flow.to_deployment(  # type: ignore[assignment]
                name=target,
                schedule=None
                if rb.cron is None
                else (
                    RRule(sandbox.schedule_rrule(now), timezone="UTC")
                    if in_sandbox
                    else Cron(rb.cron, timezone="UTC")
                ),
                parameters={
                    "target": target,
                    **(sandbox.PARAMETERS if in_sandbox else rb.scheduled),
                },
                description=rb.purpose,
                tags=["runbook", rb.inventory] + (["sandbox"] if in_sandbox else []),
                # Always served: only the receiver's trigger mode emits the event.
                triggers=[
                    DeploymentEventTrigger.model_validate(alert_trigger_spec(rb.name, target))
                ],
            )
            deployments.append((deployment, flow))
        if rb.accepted(settings):
            deployments.append(fleet_deployment(rb.name, in_sandbox=in_sandbox))
    if deployments:
        deployments += routine_deployments(settings, in_sandbox=in_sandbox, now=now)
    return deployments


def fleet_deployment(runbook: str, *, in_sandbox: bool) -> tuple[RunnerDeployment, Flow[..., Any]]:
    """A runbook's fleet deployment (deployments.fleet): run by hand or by an alert route with
    a selector; every target, a dry run, unless a run's parameters say otherwise."""
    from prefect.events import DeploymentEventTrigger

    from deployments.fleet import FLEETS

    rb, flow = RUNBOOKS[runbook], FLEETS[runbook]
    deployment: RunnerDeployment = flow.to_deployment(  # type: ignore[assignment]
        name=FLEET,
        # A dry run, in the sandbox too: a fleet acts on many targets at once.
        parameters={"selector": ALL, "dry_run": True},
        description=f"{rb.name} on many targets, with rate control.",
        tags=["runbook", "fleet", rb.inventory] + (["sandbox"] if in_sandbox else []),
        triggers=[DeploymentEventTrigger.model_validate(fleet_trigger_spec(runbook))],
    )
    return deployment, flow


def routine_deployments(
    settings: Settings, *, in_sandbox: bool, now: datetime
) -> list[tuple[RunnerDeployment, Flow[..., Any]]]:
    """One deployment ("all") per routine (deployments.routines) with a runbook that has a
    target: its cron and the parameters of its scheduled runs (Routine.scheduled). No alert
    trigger: an alert names one runbook and target, which its own deployment serves."""
    from prefect.schedules import Cron, RRule

    found: list[tuple[RunnerDeployment, Flow[..., Any]]] = []
    for routine in ROUTINES.values():
        if not any(RUNBOOKS[s.runbook].targets(settings) for s in routine.runbooks):
            continue
        flow = routine.load()
        deployment: RunnerDeployment = flow.to_deployment(  # type: ignore[assignment]
            name="all",
            schedule=RRule(sandbox.routine_rrule(now), timezone="UTC")
            if in_sandbox
            else Cron(routine.cron, timezone="UTC"),
            parameters=dict(sandbox.PARAMETERS if in_sandbox else routine.scheduled),
            description=routine.purpose,
            tags=["runbook", "routine"] + (["sandbox"] if in_sandbox else []),
        )
        found.append((deployment, flow))
    return found


def has_inventory(settings: Settings) -> bool:
    """Any configured target of any runbook's section means a real inventory: the sandbox only
    starts with none."""
    return any(settings.targets(kind) for kind in SECTIONS)


def flush_to_api(timeout_seconds: float = 15) -> None:
    """Send the run logs and events still queued in this process to the Prefect API, waiting
    at most timeout_seconds for each kind."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=timeout_seconds)
    EventsWorker.drain_all(timeout=timeout_seconds)


class Stop(Exception):
    """SIGTERM or SIGINT asked `runbook serve` to stop."""


def serve_all(host: str, port: int, max_runs: int = DEFAULT_MAX_RUNS) -> None:
    """Serve every runbook until SIGTERM or Ctrl-C; everything started here is stopped."""
    runner_ref: list[Any] = [None]

    def on_signal(signum: int, frame: FrameType | None) -> None:
        if runner_ref[0] is not None:
            runner_ref[0].request_stop()  # the poll loop ends; clean-up follows
        else:
            raise Stop  # still starting: unwind what has started

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        with ExitStack() as stack:
            with suppress(Stop):
                _serve(host, port, max_runs, stack, runner_ref)
            print("Stopping: everything started here is being shut down", flush=True)
            # A second signal during the clean-up changes nothing: the clean-up is bounded.
            for sig in previous:
                signal.signal(sig, signal.SIG_IGN)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print("Stopped", flush=True)


def _serve(host: str, port: int, max_runs: int, stack: ExitStack, runner_ref: list[Any]) -> None:
    from deployments.runner import InProcessRunner

    settings = load_config()
    in_sandbox = not has_inventory(settings)
    api = os.environ.get("PREFECT_API_URL")
    if api:
        require_prefect_api(api)
    if in_sandbox:
        print(
            "No inventory configured: starting the sandbox (a local PostgreSQL, two Redis "
            "servers and more, with planted incidents)",
            flush=True,
        )
        box = sandbox.Sandbox()
        stack.callback(box.stop)
        try:
            box.start()
        except (subprocess.SubprocessError, OSError, psycopg.Error) as exc:
            detail = getattr(exc, "stderr", b"") or b""
            raise TargetError(
                f"the sandbox could not start: {exc}"
                + (f": {detail.decode(errors='replace').strip()}" if detail else "")
            ) from None
        os.environ[f"{ENV_PREFIX}CONFIG"] = str(box.config)
        settings = load_config(box.config)
        stable = sandbox_config_path()
        stable.parent.mkdir(parents=True, exist_ok=True)
        stable.write_text(box.config.read_text())
        stack.callback(stable.unlink, missing_ok=True)
        print(f"Sandbox inventory: {stable} (`runbook run` finds it while this runs)", flush=True)
        for name, why in sandbox.NOT_SERVED.items():
            print(f"Not in the sandbox: {name} ({why})", flush=True)
    if not api:
        os.environ["PREFECT_API_URL"] = start_server(host, port, stack)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    deployments = build_deployments(settings, in_sandbox=in_sandbox)
    if not deployments:
        raise ConfigError("no runbook has a target in the inventory: see README, Configuration")
    from prefect import get_client
    from prefect.settings import (
        PREFECT_API_URL,
        PREFECT_FLOWS_HEARTBEAT_FREQUENCY,
        temporary_settings,
    )

    from deployments.receiver import start_receiver

    # Heartbeats tell a server that a run's process still lives; here every run lives in
    # this process, and runs it leaves in flight are marked Crashed at the next start.
    stack.enter_context(
        temporary_settings(
            updates={
                PREFECT_API_URL: os.environ["PREFECT_API_URL"],
                PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None,
            }
        )
    )
    client = stack.enter_context(get_client(sync_client=True))
    # Runs into after runner.stop (a stack unwinds last in, first out): the logs and events the
    # stopping runs left queued reach the API while it still answers; queued for a server
    # already stopped, Prefect's exit-time drain of them would wait without end.
    stack.callback(flush_to_api)
    runner = InProcessRunner(deployments, max_runs=max_runs)
    stack.callback(runner.stop, client)
    runner.register(client)
    runner_ref[0] = runner
    start_receiver(settings, stack, runner)
    print(
        f"Serving {len(deployments)} deployments in this process (at most {max_runs} runs "
        "at once); Ctrl-C stops",
        flush=True,
    )
    runner.serve(client)
