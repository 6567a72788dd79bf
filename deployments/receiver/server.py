"""The receiver's life cycle: built from the settings (its routes checked against the registry
here), served by uvicorn in the foreground (`runbook receiver`) or on a thread next to
`runbook serve`, and stopped with its starter and store."""

from __future__ import annotations

import os
import threading
from contextlib import ExitStack, suppress
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import ValidationError

from deployments.alert_routes import DEFAULT_ROUTES, check_routes, load_routes
from deployments.alert_store import AlertStore, PostgresAlertStore, SqliteAlertStore
from deployments.catalog import RUNBOOKS
from deployments.receiver.app import Receiver, create_app, secret_values
from deployments.receiver.runs import (
    DeploymentStarter,
    InProcessStarter,
    Starter,
    TriggerStarter,
)
from tasks.errors import ConfigError
from tasks.redact import prefect_secrets
from tasks.settings import ReceiverSettings, Settings, config_path, dsn_keywords
from tasks.wait import poll

if TYPE_CHECKING:
    import uvicorn

    from deployments.runner import InProcessRunner

SERVER_START_TIMEOUT_SECONDS = 15


def receiver_settings(settings: Settings) -> ReceiverSettings:
    """[receiver], with credentials to check callers by, or the ConfigError saying how."""
    config = settings.receiver
    if config is None or not config.has_credentials:
        raise ConfigError(
            f'no [receiver] token in {config_path()}: add [receiver] with token = "..." '
            "(or RUNBOOK_RECEIVER__TOKEN) to receive alerts (see README, Alerts)"
        )
    return config


def default_state_file() -> Path:
    from prefect.settings import PREFECT_HOME

    return Path(PREFECT_HOME.value()) / "runbook-alerts.sqlite"


def open_store(config: ReceiverSettings) -> AlertStore:
    """Storm control's store: PostgreSQL with state_dsn, else the SQLite state_file.

    Raises StoreUnavailable (exit 3) when PostgreSQL cannot be reached, AuthenticationFailed
    (exit 3) when it refuses the login, ConfigError (exit 2) when the role may not create the
    schema."""
    window, cap = config.dedup_window_seconds, config.max_runs_per_hour
    if config.state_dsn is not None:
        return PostgresAlertStore(config.state_dsn, window_seconds=window, max_runs_per_hour=cap)
    return SqliteAlertStore(
        config.state_file or default_state_file(), window_seconds=window, max_runs_per_hour=cap
    )


def build_receiver(
    settings: Settings, *, in_process: bool, runner: InProcessRunner | None = None
) -> Receiver:
    """The receiver the configuration asks for; in_process: this process serves the flows
    (on runner's threads, when given).

    Raises ConfigError when [receiver] has no credentials or a [[routes]] entry names what the
    registry does not know (check_routes); what open_store raises when the store cannot be
    opened."""
    config = receiver_settings(settings)
    check_routes(settings)
    routes = list(settings.routes) or load_routes(
        DEFAULT_ROUTES, {name: rb.params for name, rb in RUNBOOKS.items()}
    )
    store = open_store(config)  # first: an unreachable store starts nothing
    starter: Starter
    if config.dispatch == "trigger":
        starter = TriggerStarter()
    elif in_process:
        starter = InProcessStarter(config.max_concurrent_runs, runner)
    else:
        starter = DeploymentStarter()
    targets = {name: rb.alert_targets(settings) for name, rb in RUNBOOKS.items()}
    secrets = secret_values(settings) + prefect_secrets()
    if config.state_dsn is not None:
        # Also alone: libpq never quotes it, but a text built from the DSN's pieces might.
        secrets.append(dsn_keywords(config.state_dsn).get("password") or "")
    return Receiver(config, routes, targets, store, starter, tuple(secrets))


def banner(receiver: Receiver) -> str:
    """How the receiver starts runs and where storm control keeps its record, for the line
    printed at start ([receiver] dispatch names the first, state_file or state_dsn the second)."""
    return (
        f"  dispatch = {receiver.config.dispatch!r}: {receiver.starter.description}; "
        f"storm control: {receiver.store.description}"
    )


def http_server(receiver: Receiver) -> uvicorn.Server:
    import uvicorn

    config = uvicorn.Config(
        create_app(receiver),
        host=receiver.config.host,
        port=receiver.config.port,
        log_level="warning",
        access_log=False,  # one line per alert is printed instead
        lifespan="off",
    )
    return uvicorn.Server(config)


def cannot_listen(config: ReceiverSettings) -> ConfigError:
    return ConfigError(
        f"the alert receiver could not listen on {config.listen}: is the port free? "
        "(receiver.listen)"
    )


class ReceiverServer:
    """uvicorn on a thread, next to `serve(...)` in the main thread."""

    def __init__(self, receiver: Receiver) -> None:
        self.receiver = receiver
        self.server = http_server(receiver)
        self.thread = threading.Thread(target=self._run, name="runbook-receiver", daemon=True)

    def _run(self) -> None:
        # uvicorn exits when it cannot bind; start() turns that into a ConfigError.
        with suppress(SystemExit):
            self.server.run()

    @property
    def url(self) -> str:
        return f"http://{self.receiver.config.host}:{self.receiver.config.port}"

    def start(self) -> ReceiverServer:
        self.thread.start()
        poll(
            lambda: self.server.started or not self.thread.is_alive(),
            what="the receiver to listen",
            timeout_seconds=SERVER_START_TIMEOUT_SECONDS,
            first_delay_seconds=0.05,
            max_delay_seconds=0.05,
        )
        if not self.server.started:
            self.server.should_exit = True
            raise cannot_listen(self.receiver.config)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.receiver.starter.shutdown()
        self.receiver.store.close()


def run_receiver(settings: Settings, listen: str | None = None) -> None:
    """`runbook receiver`: the receiver alone, in the foreground, until Ctrl-C or SIGTERM."""
    if listen is not None and settings.receiver is not None:
        try:
            config = ReceiverSettings.model_validate(
                {**settings.receiver.model_dump(), "listen": listen}
            )
        except ValidationError:
            raise ConfigError(f"--listen {listen!r}: expected HOST:PORT, port 1-65535") from None
        settings = settings.model_copy(update={"receiver": config})
    receiver = build_receiver(settings, in_process=False)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    print(f"Alert receiver at http://{receiver.config.host}:{receiver.config.port}", flush=True)
    print(banner(receiver), flush=True)
    server = http_server(receiver)
    try:
        # uvicorn exits when it cannot bind: the usual configuration error instead.
        with suppress(SystemExit):
            server.run()
        if not server.started:
            raise cannot_listen(receiver.config)
    finally:
        receiver.starter.shutdown()
        receiver.store.close()


def start_receiver(
    settings: Settings, stack: ExitStack, runner: InProcessRunner | None = None
) -> ReceiverServer | None:
    """For `runbook serve`: the receiver on a thread, running alert runs in this process;
    stopped with the rest. None (and a note) when [receiver] has no token."""
    try:
        receiver_settings(settings)
    except ConfigError:
        print(
            "No [receiver] token configured: serving without the alert receiver "
            "(see README, Alerts)",
            flush=True,
        )
        return None
    server = ReceiverServer(build_receiver(settings, in_process=True, runner=runner)).start()
    stack.callback(server.stop)
    print(f"Alert receiver at {server.url}", flush=True)
    print(banner(server.receiver), flush=True)
    return server
