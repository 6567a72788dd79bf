"""The Prefect API a command records its runs in: the one configured, a local one that answers,
or Prefect's own API app served inside the command's process.

Nothing here imports Prefect at module level: `runbook list` and `--help` import this module's
callers without paying Prefect's import (about 1.6 s)."""

from __future__ import annotations

import contextvars
import logging
import os
import re
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from tasks.errors import ConfigError, TargetError
from tasks.wait import poll

if TYPE_CHECKING:
    import uvicorn

# Where `runbook serve` puts its embedded server by default.
LOCAL_PREFECT_API = "http://127.0.0.1:4200/api"
# A health check answers in milliseconds; 5 s allows for a server busy with a SQLite write.
HEALTH_TIMEOUT = 5.0


def unreachable(url: str, timeout: float = HEALTH_TIMEOUT) -> str | None:
    """Why the Prefect API `url` (ending in /api) cannot be used, or None when its
    `GET /health` answers within `timeout` seconds with 200, or with 401/403 (it wants the
    credentials Prefect's client sends: PREFECT_API_KEY, PREFECT_API_AUTH_STRING).
    Certificate trust is left to Prefect's client too (PREFECT_API_SSL_CERT_FILE): this
    probe sends nothing but the GET."""
    import httpx

    try:
        # Not verified: a reachability probe carrying no credentials and no data.
        response = httpx.get(f"{url.rstrip('/')}/health", timeout=timeout, verify=False)  # noqa: S501
    except (httpx.InvalidURL, httpx.UnsupportedProtocol):
        return "not an http:// or https:// URL"
    except httpx.TimeoutException:
        return f"no answer within {timeout:g} s"
    except httpx.HTTPError as exc:
        return str(exc) or type(exc).__name__
    if response.status_code not in (200, 401, 403):
        return f"GET /health answered HTTP {response.status_code}: is it a Prefect API URL?"
    return None


def require_prefect_api(url: str, timeout: float = HEALTH_TIMEOUT) -> None:
    """Raise TargetError (exit 3) naming `url`, what happened and the fix when nothing
    answers there (see `unreachable`). For every command that needs the API in
    PREFECT_API_URL (run, receiver, serve), before it starts: Prefect's own client would
    otherwise fail later with a traceback."""
    problem = unreachable(url, timeout)
    if problem is not None:
        raise TargetError(
            f"the Prefect API in PREFECT_API_URL ({url}) cannot be reached: {problem}; "
            "start that server, or point PREFECT_API_URL at a running one "
            "(or unset it to use a local one)"
        )


def local_prefect_api() -> str | None:
    """The URL of a local Prefect server whose health check answers 200 (RUNBOOK_PREFECT_API,
    default `runbook serve`'s http://127.0.0.1:4200/api), or None. Half a second at most:
    nothing listening is refused at once."""
    import httpx

    url = os.environ.get("RUNBOOK_PREFECT_API", LOCAL_PREFECT_API)
    try:
        answered = httpx.get(f"{url}/health", timeout=0.5).status_code == 200
    except httpx.HTTPError:
        return None
    return url if answered else None


@contextmanager
def in_process_api(startup_timeout: float) -> Iterator[str]:
    """Prefect's API app (`create_app(ephemeral=True)`, what Prefect's temporary server runs:
    no UI, the services of ephemeral mode) served by uvicorn on a thread of this process, on a
    free loopback port, with its database where Prefect keeps it (PREFECT_HOME). Yields the
    API URL to set as PREFECT_API_URL.

    Prefect's own temporary server is the same app in a new interpreter: that costs a second
    import of Prefect and its server per call. On exit the client's queued logs and events are
    sent first, then the server stops, and its services write what they hold. TargetError
    when it does not start within `startup_timeout` seconds."""
    import uvicorn
    from prefect.server.api.server import create_app
    from prefect.settings import (
        PREFECT_SERVER_SERVICES_TRIGGERS_ENABLED,
        get_current_settings,
        temporary_settings,
    )

    database = get_current_settings().server.database.connection_url
    # Automations (triggers and their actions) cost 0.3-0.4 s of CPU a call to start and
    # run; with none to evaluate they are left off.
    updates = (
        {}
        if database is None or automations_possible(database.get_secret_value())
        else {PREFECT_SERVER_SERVICES_TRIGGERS_ENABLED: False}
    )
    with temporary_settings(updates=updates):
        app = create_app(ephemeral=True)
        # A thread starts with empty context variables: the server's gets these settings.
        settings_context = contextvars.copy_context()
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host="127.0.0.1",
            port=0,
            lifespan="on",
            log_config=None,
            log_level="error",
            access_log=False,
        )
    )
    errors = ErrorRecords()
    logging.getLogger("uvicorn.error").addHandler(errors)
    thread = threading.Thread(
        target=settings_context.run, args=(server.run,), name="prefect-api", daemon=True
    )
    thread.start()
    try:
        poll(
            lambda: server.started or not thread.is_alive(),
            what="the in-process Prefect API to start",
            timeout_seconds=startup_timeout,
            first_delay_seconds=0.01,
            max_delay_seconds=0.01,
        )
        if not server.started and not thread.is_alive():
            raise TargetError(
                f"the in-process Prefect API did not start: {errors.reason()}; check "
                "Prefect's database (PREFECT_HOME/prefect.db unless "
                "PREFECT_API_DATABASE_CONNECTION_URL says otherwise), or start "
                "`runbook serve` or set PREFECT_API_URL"
            )
        if not server.started:
            server.should_exit = True
            raise TargetError(
                f"the in-process Prefect API did not start within {startup_timeout:g} s "
                "(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS); start `runbook serve` "
                "or set PREFECT_API_URL"
            )
    finally:
        logging.getLogger("uvicorn.error").removeHandler(errors)
    try:
        yield f"http://127.0.0.1:{bound_port(server)}/api"
    finally:
        flush_client_workers()
        server.should_exit = True
        thread.join(timeout=30)


# "sqlalchemy.exc.OperationalError: (sqlite3.OperationalError) ...": a traceback's last word.
EXCEPTION_LINE = re.compile(r"[A-Za-z_][\w.]*(Error|Exception)\b")


def automations_possible(connection_url: str) -> bool:
    """Whether Prefect's database (its SQLAlchemy URL) may hold an enabled automation. False
    only when it is a SQLite file that does not exist yet, or whose `automation` table has no
    enabled row; any other database, or a file that cannot be read, True."""
    from sqlalchemy.engine import make_url

    url = make_url(connection_url)
    if not url.drivername.startswith("sqlite"):
        return True
    if url.database in (None, "", ":memory:"):
        return False
    path = Path(url.database).resolve()
    if not path.exists():
        return False
    try:
        with closing(sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True, timeout=1)) as conn:
            found = conn.execute("SELECT 1 FROM automation WHERE enabled LIMIT 1").fetchone()
    except sqlite3.OperationalError as exc:
        return "no such table" not in str(exc)
    except sqlite3.Error:
        return True
    return found is not None


class ErrorRecords(logging.Handler):
    """uvicorn's error records while the server starts: why it did not (uvicorn logs a failed
    startup, it does not raise it)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def reason(self) -> str:
        """The exception's own line: Starlette hands uvicorn a failed startup as traceback
        text, a crash comes with exc_info."""
        for record in self.records:
            if record.exc_info and record.exc_info[1] is not None:
                exc = record.exc_info[1]
                return f"{type(exc).__name__}: {exc}"
            text = record.getMessage()
            if text.startswith("Traceback"):
                raised = [line for line in text.splitlines() if EXCEPTION_LINE.match(line)]
                return raised[-1] if raised else text.strip().splitlines()[-1]
        return self.records[-1].getMessage() if self.records else "no reason logged"


def bound_port(server: uvicorn.Server) -> int:
    """The port the OS gave uvicorn's listening socket (it was asked for port 0)."""
    return int(server.servers[0].sockets[0].getsockname()[1])


def flush_client_workers(timeout: float = 30) -> None:
    """Send what Prefect's client still queues (run logs, then events such as task run
    states) while the API is up: Prefect drains them at interpreter exit, after our server
    would be gone."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=timeout, at_exit=False)
    EventsWorker.drain_all(timeout=timeout, at_exit=False)


def no_api_configured() -> ConfigError:
    return ConfigError(
        "no Prefect API: PREFECT_API_URL is unset, nothing answers on "
        f"{os.environ.get('RUNBOOK_PREFECT_API', LOCAL_PREFECT_API)} and Prefect's ephemeral "
        "mode is off (PREFECT_SERVER_EPHEMERAL_ENABLED); set PREFECT_API_URL or start "
        "`runbook serve`"
    )
