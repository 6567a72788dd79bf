"""Real services for the tests: one PostgreSQL server and one Prefect API per session, a fresh
database and inventory file per test."""

from __future__ import annotations

import os
import tempfile
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import hypothesis
import psycopg
import pytest

from deployments.localpg import LocalPostgres, free_port

if TYPE_CHECKING:
    from prefect.deployments.runner import RunnerDeployment

# Before Prefect is imported anywhere: its home in a temp dir, quiet, offline.
os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="runbook-test-prefect-")
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL"] = "WARNING"
os.environ.pop("PREFECT_API_URL", None)
for key in [k for k in os.environ if k.startswith("RUNBOOK_")]:
    del os.environ[key]
# The CLI looks for `runbook serve` on 127.0.0.1:4200: one the engineer runs beside the tests
# must not take their runs. Tests that want a local server name it themselves.
os.environ["RUNBOOK_PREFECT_API"] = f"http://127.0.0.1:{free_port()}/api"

# Property tests run beside real servers on a busy 2-core machine: no per-example deadline.
hypothesis.settings.register_profile("runbook", deadline=None)
hypothesis.settings.load_profile("runbook")

APP_ROLE = "app"  # a plain role: the sessions that play the incidents log in as it


def runner_deployment(made: object) -> RunnerDeployment:
    """What Flow.to_deployment returns when called from sync code. Prefect types its result as
    that or a coroutine (it dispatches on whether the caller is async); here it is the former."""
    from prefect.deployments.runner import RunnerDeployment

    assert isinstance(made, RunnerDeployment), type(made)
    return made


@pytest.fixture(scope="session")
def pg() -> Iterator[LocalPostgres]:
    server = LocalPostgres().start()
    with psycopg.connect(server.dsn, autocommit=True) as conn:
        conn.execute(f"CREATE ROLE {APP_ROLE} LOGIN")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def prefect_api() -> Iterator[str]:
    from prefect.settings import (
        PREFECT_API_URL,
        PREFECT_FLOWS_HEARTBEAT_FREQUENCY,
        temporary_settings,
    )
    from prefect.testing.utilities import prefect_test_harness

    with (
        prefect_test_harness(server_startup_timeout=120),
        temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}),
    ):
        url = PREFECT_API_URL.value()
        assert url
        yield url


@pytest.fixture(autouse=True)
def fresh_limits(request: pytest.FixtureRequest) -> Iterator[None]:
    """Each test that uses the session's Prefect API starts with a fresh budget of the
    project's limits (tasks.limits), as it starts with a fresh database: a restart counted
    by one test must not refuse the next test's."""
    yield
    if "prefect_api" not in request.fixturenames:
        return
    from prefect import get_client

    with get_client(sync_client=True) as client:
        for limit in client.read_global_concurrency_limits(limit=200, offset=0):
            if limit.name.startswith("runbook-"):
                client.delete_global_concurrency_limit_by_name(limit.name)


@dataclass
class Db:
    """A fresh database, its inventory file, and the incident sessions opened on it."""

    server: LocalPostgres
    name: str
    config: Path
    sessions: list[psycopg.Connection[Any]] = field(default_factory=list)

    @property
    def dsn(self) -> str:
        return self.server.dsn_for(self.name)

    def admin(self) -> psycopg.Connection[Any]:
        return psycopg.connect(self.dsn, autocommit=True)

    def session(
        self, application_name: str = "web", user: str = APP_ROLE, autocommit: bool = False
    ) -> psycopg.Connection[Any]:
        conn = psycopg.connect(
            self.server.dsn_for(self.name, user),
            application_name=application_name,
            autocommit=autocommit,
        )
        self.sessions.append(conn)
        return conn

    def idle_in_transaction(self, n: int = 1, **kwargs: Any) -> list[int]:
        pids = []
        for _ in range(n):
            conn = self.session(**kwargs)
            conn.execute("SELECT 1")  # opens the transaction and leaves it open
            pids.append(conn.info.backend_pid)
        return pids

    def alive(self, pids: list[int]) -> set[int]:
        with self.admin() as conn:
            rows = conn.execute(
                "SELECT pid FROM pg_stat_activity WHERE pid = ANY(%s)", [pids]
            ).fetchall()
        return {r[0] for r in rows}

    def write_config(self, extra: str = "") -> None:
        self.config.write_text(f'[postgres.main]\ndsn = "{self.dsn}"\n{extra}')

    def close(self) -> None:
        for conn in self.sessions:
            conn.close()


@pytest.fixture
def db(pg: LocalPostgres, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Db]:
    name = f"t_{uuid.uuid4().hex[:12]}"
    pg.create_database(name)
    with psycopg.connect(pg.dsn_for(name), autocommit=True) as conn:
        conn.execute(f"GRANT ALL ON SCHEMA public TO {APP_ROLE}")
    database = Db(server=pg, name=name, config=tmp_path / "runbook.toml")
    database.write_config()
    monkeypatch.setenv("RUNBOOK_CONFIG", str(database.config))
    yield database
    database.close()


@pytest.fixture
def role(db: Db) -> Iterator[Callable[[str], str]]:
    """Create login roles for this test (roles are cluster-wide: unique names, dropped after)."""
    made: list[str] = []

    def create(options: str = "") -> str:
        name = f"r_{uuid.uuid4().hex[:10]}"
        with db.admin() as conn:
            conn.execute(f"CREATE ROLE {name} LOGIN {options}")
            conn.execute(f"GRANT ALL ON SCHEMA public TO {name}")
        made.append(name)
        return name

    yield create
    db.close()
    with db.admin() as conn:
        for name in made:
            conn.execute(f"DROP OWNED BY {name}")
            conn.execute(f"DROP ROLE {name}")


@pytest.fixture
def inventory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """Write the inventory file for this test: inventory('[redis.cache]\\nurl = ...')."""
    path = tmp_path / "runbook.toml"
    monkeypatch.setenv("RUNBOOK_CONFIG", str(path))

    def write(text: str) -> Path:
        path.write_text(text)
        return path

    return write


@pytest.fixture
def redis_server() -> Iterator[Any]:
    """Start redis-servers for this test; all are stopped after it."""
    from deployments.localredis import LocalRedis

    started: list[LocalRedis] = []

    def start(**kwargs: Any) -> LocalRedis:
        server = LocalRedis(**kwargs).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture(scope="session")
def docker_engine() -> Iterator[Any]:
    from tests.docker_engine import DockerEngine

    engine = DockerEngine().start()
    yield engine
    engine.stop()


@pytest.fixture(scope="session")
def moto_server() -> Iterator[Any]:
    """An S3 endpoint on loopback (moto's server), talked to over HTTP like any other."""
    from tests.s3_helpers import MotoServer

    server = MotoServer().start()
    yield server
    server.stop()
