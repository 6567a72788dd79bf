"""Beyond one machine, on Prefect's own machinery: a Prefect server whose database is a
PostgreSQL of its own (not a runbook target), the process work pool, `prefect deploy --all` from
this checkout, and two `prefect worker start` processes that run the runbooks on real targets."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import yaml

from deployments.catalog import ROUTINES, RUNBOOKS
from deployments.localpg import LocalPostgres, stop_process
from deployments.pull import HOME_VARIABLE, checkout, set_runbook_home
from tasks.wait import poll
from tests.alertmanager_helpers import PrefectServer, prefect_env
from tests.test_fleet import Fleet, Waves
from tests.test_receiver import TOKEN, am_alert, am_payload
from tests.test_receiver_shared_store import (
    PASSWORD,
    post,
    pw_pg,  # noqa: F401 (a fixture)
    receivers,
    store_database,
)

ROOT = Path(__file__).resolve().parents[1]
PREFECT = str(Path(sys.executable).parent / "prefect")
POOL = "runbooks"
FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


@dataclass
class Cluster:
    """A Prefect server on PostgreSQL with every deployment of prefect.yaml on the pool."""

    api: str
    home: Path
    deploy_output: str

    def env(self, home: Path) -> dict[str, str]:
        return {**prefect_env(home), "PREFECT_API_URL": self.api}

    def get(self, path: str) -> Any:
        answer = httpx.get(f"{self.api}{path}", timeout=60)
        answer.raise_for_status()
        return answer.json()

    def post(self, path: str, body: dict[str, Any]) -> Any:
        answer = httpx.post(f"{self.api}{path}", json=body, timeout=60)
        answer.raise_for_status()
        return answer.json()

    def create_run(self, deployment: str, **parameters: Any) -> str:
        """A run of `deployment` ("flow/deployment"), Scheduled for now: a worker picks it up."""
        found = self.get(f"/deployments/name/{deployment}")
        return str(
            self.post(f"/deployments/{found['id']}/create_flow_run", {"parameters": parameters})[
                "id"
            ]
        )

    def wait_online(self, names: list[str], timeout: float = 120) -> None:
        """Until every worker named has polled the pool (the server lists it ONLINE)."""

        def online() -> bool:
            found = self.post(f"/work_pools/{POOL}/workers/filter", {})
            return set(names) <= {w["name"] for w in found if w["status"] == "ONLINE"}

        assert poll(online, what="the workers", timeout_seconds=timeout, max_delay_seconds=1).done

    def wait_final(self, run_ids: list[str], timeout: float = 600) -> list[dict[str, Any]]:
        def read() -> list[dict[str, Any]]:
            found: list[dict[str, Any]] = self.post(
                "/flow_runs/filter", {"flow_runs": {"id": {"any_": run_ids}}}
            )
            return found

        if not poll(
            lambda: all(r["state_type"] in FINAL for r in read()),
            what="the runs to end",
            timeout_seconds=timeout,
            max_delay_seconds=1,
        ).done:
            raise AssertionError(f"runs not final in {timeout} s: {read()}")
        return read()


class Worker:
    """`prefect worker start` on the pool, in a directory of its own (as on another host),
    `limit` runs at a time, polling every second; its output in a file."""

    def __init__(
        self, cluster: Cluster, name: str, home: Path, env: dict[str, str], limit: int = 1
    ) -> None:
        home.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.log = home / "worker.log"
        self.argv = [PREFECT, "worker", "start", "--pool", POOL, "--name", name]
        self.argv += ["--limit", str(limit)]
        self.env = {**cluster.env(home), "PREFECT_WORKER_QUERY_SECONDS": "1", **env}
        self.cwd = home
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Worker:
        with self.log.open("wb") as sink:
            self.proc = subprocess.Popen(
                self.argv,
                cwd=self.cwd,
                env=self.env,
                stdout=sink,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return self

    def stop(self) -> None:
        stop_process(self.proc)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """Prefect's own database on a PostgreSQL server of its own; the server's scheduler off so
    that the only runs are the test's; the pool created, then `prefect deploy --all`."""
    home = tmp_path_factory.mktemp("prefect")
    database = LocalPostgres().start()
    server: PrefectServer | None = None
    try:
        database.create_database("prefect")
        url = database.dsn_for("prefect").replace("postgresql://", "postgresql+asyncpg://")
        server = PrefectServer(
            home / "server",
            env={
                "PREFECT_API_DATABASE_CONNECTION_URL": url,
                "PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED": "false",
            },
        ).start()
        made = Cluster(api=server.api, home=home, deploy_output="")
        env = made.env(home / "deployer")
        for argv in (
            [PREFECT, "work-pool", "create", POOL, "--type", "process"],
            [PREFECT, "--no-prompt", "deploy", "--all"],
        ):
            done = subprocess.run(
                argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
            )
            assert done.returncode == 0, done.stdout + done.stderr
            made.deploy_output += done.stdout
        yield made
    finally:
        if server is not None:
            server.stop()
        database.stop()


def test_deploy_all_on_postgresql_creates_every_deployment_with_a_portable_pull_step(
    cluster: Cluster,
) -> None:
    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    deployed = cluster.post("/deployments/filter", {})
    flows = {f["id"]: f["name"] for f in cluster.post("/flows/filter", {})}
    assert sorted(f"{flows[d['flow_id']]}/{d['name']}" for d in deployed) == sorted(
        f"{d['entrypoint'].split(':')[1].replace('_', '-')}/{d['name']}"
        for d in spec["deployments"]
    )
    scheduled = {
        flows[d["flow_id"]]: [s["schedule"]["cron"] for s in d["schedules"]]
        for d in deployed
        if d["name"] != "fleet"
    }
    assert sorted(flows[d["flow_id"]] for d in deployed if d["name"] == "fleet") == sorted(RUNBOOKS)
    entries: list[Any] = [*RUNBOOKS.values(), *ROUTINES.values()]
    assert scheduled == {rb.name: [rb.cron] if rb.cron else [] for rb in entries}
    automations = cluster.post("/automations/filter", {})
    assert len(automations) == len([d for d in spec["deployments"] if d.get("triggers")])
    # The pull step is stored as written, to be resolved on each worker: nothing of the
    # deploying machine's checkout is baked into any deployment.
    assert {json.dumps(d["pull_steps"]) for d in deployed} == {json.dumps(spec["pull"])}
    assert not [d["name"] for d in deployed if str(ROOT) in json.dumps(d)]


JOBS_TABLE = """
CREATE SCHEMA crawler;
CREATE TABLE crawler.job (id bigserial PRIMARY KEY, status text NOT NULL, startedat timestamptz);
INSERT INTO crawler.job (status, startedat) VALUES
    ('running', now() - interval '2 hours'), ('running', now() - interval '5 minutes');
"""


def job_states(dsn: str) -> list[str]:
    with psycopg.connect(dsn, connect_timeout=5) as conn:
        return [r[0] for r in conn.execute("SELECT status FROM crawler.job ORDER BY id")]


def test_two_workers_share_the_runs_and_each_mends_its_own_target(
    cluster: Cluster, pg: LocalPostgres, redis_server: Any, tmp_path: Path
) -> None:
    """Seven runs of two runbooks, each on a target of its own: three databases with a stuck
    job (stuck-jobs resets it) and three Redis caches with the wrong eviction policy
    (redis-health sets allkeys-lru), and a dry run on a fourth cache, which ends Unhealthy and
    changes nothing. Both workers run some; each run changed its own target and nothing else.
    The second worker runs the flows from a copy of the checkout named by RUNBOOK_HOME."""
    inventory = tmp_path / "runbook.toml"
    databases, caches, sections = {}, {}, []
    for n in (1, 2, 3):
        name = f"jobs_{n}_{tmp_path.name[-8:]}".lower().replace("-", "_")
        databases[f"jobs{n}"] = dsn = pg.create_database(name)
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(JOBS_TABLE)
        sections.append(f'[postgres.jobs{n}]\ndsn = "{dsn}"\n[postgres.jobs{n}.jobs]\n')
        sections.append('table = "crawler.job"\n')
        caches[f"cache{n}"] = cache = redis_server(
            config_file=True, maxmemory="64mb", policy="noeviction"
        )
        sections.append(f'[redis.cache{n}]\nurl = "{cache.url}"\nrole = "cache"\n')
    untouched = redis_server(config_file=True, maxmemory="64mb", policy="noeviction")
    sections.append(f'[redis.untouched]\nurl = "{untouched.url}"\nrole = "cache"\n')
    inventory.write_text("".join(sections))
    other_host = tmp_path / "other-host" / "runbook-automation"
    for part in ("flows", "tasks", "deployments"):
        shutil.copytree(
            ROOT / part, other_host / part, ignore=shutil.ignore_patterns("__pycache__")
        )
    shutil.copy(ROOT / "prefect.yaml", other_host)
    workers = [
        Worker(cluster, "worker-a", tmp_path / "a", {"RUNBOOK_CONFIG": str(inventory)}),
        Worker(
            cluster,
            "worker-b",
            tmp_path / "b",
            {"RUNBOOK_CONFIG": str(inventory), HOME_VARIABLE: str(other_host)},
        ),
    ]
    try:
        for worker in workers:
            worker.start()
        cluster.wait_online([w.name for w in workers])
        mend = {"dry_run": False, "approval": "auto"}
        run_ids = [
            cluster.create_run(deployment, target=target, **mend)
            for n in (1, 2, 3)
            for deployment, target in (
                ("stuck-jobs/main", f"jobs{n}"),
                ("redis-health/cache", f"cache{n}"),
            )
        ]
        run_ids.append(cluster.create_run("redis-health/cache", target="untouched"))
        runs = cluster.wait_final(run_ids)
    finally:
        for worker in workers:
            worker.stop()
    ended = {r["name"]: (r["state_type"], r["state_name"]) for r in runs}
    logs = "\n".join(w.log.read_text()[-3000:] for w in workers)
    assert ended == {
        **{t: ("COMPLETED", "Fixed") for t in [*databases, *caches]},
        "untouched": ("FAILED", "Unhealthy"),
    }, logs
    # The engine of a worker's run raises a failed state's data at its end: the outcome, with
    # its message, never a TypeError over the report.
    output = "".join(w.log.read_text() for w in workers)
    assert "tasks.outcome.Outcome: redis-health on untouched: unhealthy" in output
    assert "Unexpected result for failed state" not in output
    ran_on = {r["name"]: r["labels"].get("prefect.worker.name") for r in runs}
    assert set(ran_on.values()) == {"worker-a", "worker-b"}, ran_on
    # Each worker's runs started in its own checkout: the installed one, and the copy.
    homes = {w.name: set(re.findall(r"runbook home: (\S+)", w.log.read_text())) for w in workers}
    assert homes == {"worker-a": {str(ROOT)}, "worker-b": {str(other_host)}}
    for dsn in databases.values():
        assert job_states(dsn) == ["pending", "running"]  # the stuck one reset, the other left
    for cache in caches.values():
        assert cache.client().config_get("maxmemory-policy")["maxmemory-policy"] == "allkeys-lru"
    assert untouched.client().config_get("maxmemory-policy")["maxmemory-policy"] == "noeviction"


def test_the_pull_step_goes_to_runbook_home_or_the_installed_checkout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(HOME_VARIABLE, raising=False)
    assert set_runbook_home() == {"directory": str(checkout())}
    assert Path.cwd() == checkout() == ROOT
    (tmp_path / "copy" / "flows").mkdir(parents=True)
    monkeypatch.setenv(HOME_VARIABLE, str(tmp_path / "copy"))
    assert set_runbook_home() == {"directory": str(tmp_path / "copy")}
    assert Path.cwd() == tmp_path / "copy"
    monkeypatch.setenv(HOME_VARIABLE, str(tmp_path))
    with pytest.raises(FileNotFoundError) as raised:
        set_runbook_home()
    assert str(raised.value) == (
        f"{tmp_path} (RUNBOOK_HOME={tmp_path}) has no flows/: set RUNBOOK_HOME in this "
        "worker's environment to the runbook-automation checkout the worker runs from"
    )
    assert Path.cwd() == tmp_path / "copy"


ALERT_ROUTE = """
[receiver]
listen = "127.0.0.1:8787"
token = "{token}"
state_dsn = "{state_dsn}"
dispatch = "direct"

[[routes]]
alert = "RedisEvictionPolicy"
runbook = "redis-health"
target = "cache"
apply = true
approval = "auto"
"""


def test_an_alert_to_two_receivers_runs_once_on_a_worker_and_mends_the_target(
    cluster: Cluster,
    pw_pg: LocalPostgres,  # noqa: F811 (the fixture imported above)
    redis_server: Any,
    tmp_path: Path,
) -> None:
    """Alertmanager's webhook reaching two receivers at the same instant, three times (its
    re-sends), both recording in one PostgreSQL (a password in the DSN): one run of
    redis-health/cache, created through the API, run by a worker of the pool, and the cache's
    eviction policy fixed."""
    cache = redis_server(config_file=True, maxmemory="64mb", policy="noeviction")
    state_dsn = store_database(pw_pg)
    config = tmp_path / "runbook.toml"
    config.write_text(
        f'[redis.cache]\nurl = "{cache.url}"\nrole = "cache"\n'
        + ALERT_ROUTE.format(token=TOKEN, state_dsn=state_dsn)
    )
    worker = Worker(cluster, "worker-alerts", tmp_path / "w", {"RUNBOOK_CONFIG": str(config)})
    fingerprint = uuid.uuid4().hex[:16]
    firing = am_payload(am_alert(fingerprint, alertname="RedisEvictionPolicy", target="cache"))
    deployment = cluster.get("/deployments/name/redis-health/cache")
    try:
        worker.start()
        with receivers(config, cluster.api, 2) as started, ThreadPoolExecutor(2) as pool:
            urls = [url for url, _ in started]
            rounds = [
                [a for answer in pool.map(lambda url: accepted(url, firing), urls) for a in answer]
                for _ in range(3)
            ]
            answers = [a for answered in rounds for a in answered]
            outcomes = sorted(a["outcome"] for a in answers)
            assert outcomes == ["deduplicated"] * 5 + ["started"], answers
            run_id = next(a["flow_run_id"] for a in answers if a["outcome"] == "started")
            # The first round's other receiver may answer before the run's id is recorded.
            assert {a["flow_run_id"] for a in rounds[0]} <= {run_id, None}
            assert {a["flow_run_id"] for a in rounds[1] + rounds[2]} == {run_id}
            (run,) = cluster.wait_final([run_id])
            resolved = am_payload(
                am_alert(fingerprint, "resolved", alertname="RedisEvictionPolicy", target="cache")
            )
            assert [a["outcome"] for a in accepted(urls[1], resolved)] == ["resolved"]
    finally:
        worker.stop()
    assert run["deployment_id"] == deployment["id"]
    assert (run["state_type"], run["state_name"]) == ("COMPLETED", "Fixed"), worker.log.read_text()
    assert run["labels"]["prefect.worker.name"] == "worker-alerts"
    assert cache.client().config_get("maxmemory-policy")["maxmemory-policy"] == "allkeys-lru"
    runs = cluster.post(
        "/flow_runs/filter", {"flow_runs": {"deployment_id": {"any_": [deployment["id"]]}}}
    )
    assert [r["id"] for r in runs if "alert" in r["tags"]] == [run_id]
    output = "".join(proc.output for _, proc in started)  # type: ignore[attr-defined]
    assert "alert started" in output
    # Each says at start how it starts runs and where storm control keeps its record.
    assert output.count("dispatch = 'direct': runs are created through their deployments") == 2
    assert output.count(f"storm control: PostgreSQL 127.0.0.1:{pw_pg.port}/") == 2
    for secret in (PASSWORD, state_dsn, TOKEN):
        assert secret not in output


def accepted(url: str, payload: dict[str, Any]) -> list[dict[str, Any]]:
    """The alerts of a 202 answer to `payload` posted to the receiver at `url`."""
    answer = post(url, payload)
    assert answer.status_code == 202, answer.text
    alerts: list[dict[str, Any]] = answer.json()["alerts"]
    return alerts


def test_a_fleet_deployment_spreads_its_targets_runs_over_two_workers(
    cluster: Cluster, pg: LocalPostgres, tmp_path: Path
) -> None:
    """postgres-connections/fleet on `env=prod` (six databases; a seventh, env=dev, is left
    out), run through the pool: the fleet's run on one worker, each target's run a run of
    postgres-connections/main with its target, a child of the fleet's run, on either worker.
    Each database is reached through a proxy that holds the first query until the ramp's wave
    is complete (1, then 2, then 3 at once): with two slots on each worker and one held by the
    fleet, the wave of three needs both workers. The fleet's report holds every target's own,
    read back from its runbook.report event."""
    waves = Waves([1, 2, 3], quiet=120)
    made = Fleet(pg, stopped="")
    try:
        for n in range(1, 7):
            made.healthy(f"p{n}", waves=waves, env="prod")
        made.healthy("d1", env="dev")
        inventory = tmp_path / "runbook.toml"
        inventory.write_text(made.text())
        env = {"RUNBOOK_CONFIG": str(inventory)}
        workers = [Worker(cluster, name, tmp_path / name, env, limit=2) for name in ("wa", "wb")]
        try:
            for worker in workers:
                worker.start()
            cluster.wait_online([w.name for w in workers])
            fleet_id = cluster.create_run(
                "postgres-connections/fleet", selector="env=prod", max_concurrency="3"
            )
            (fleet,) = cluster.wait_final([fleet_id])
        finally:
            for worker in workers:
                worker.stop()
    finally:
        for proxy in made.proxies:
            proxy.close()
    (artifact,) = cluster.post(
        "/artifacts/filter",
        {
            "artifacts": {"key": {"any_": ["fleet-postgres-connections"]}},
            "flow_runs": {"id": {"any_": [fleet_id]}},
        },
    )
    logs = "\n".join(w.log.read_text()[-4000:] for w in workers)
    assert (fleet["state_type"], fleet["state_name"]) == ("COMPLETED", "Healthy"), (
        artifact["data"] + logs
    )
    assert fleet["name"] == "fleet on env=prod"
    assert waves.sizes == [1, 2, 3]
    tasks = cluster.post("/task_runs/filter", {"flow_runs": {"id": {"any_": [fleet_id]}}})
    children = cluster.post(
        "/flow_runs/filter",
        {"flow_runs": {"parent_task_run_id": {"any_": [t["id"] for t in tasks]}}},
    )
    main = cluster.get("/deployments/name/postgres-connections/main")
    assert sorted(c["name"] for c in children) == [f"p{n}" for n in range(1, 7)]
    assert {c["deployment_id"] for c in children} == {main["id"]}
    assert {(c["state_type"], c["state_name"]) for c in children} == {("COMPLETED", "Healthy")}
    ran_on = {c["name"]: c["labels"].get("prefect.worker.name") for c in children}
    assert set(ran_on.values()) == {"wa", "wb"}, ran_on
    # Every target's report came back as its event, none made up from its state.
    events = cluster.post(
        "/events/filter",
        {"filter": {"event": {"name": ["runbook.report"]}}, "limit": 50},
    )["events"]
    reported = {e["resource"]["runbook.target"] for e in events}
    assert {f"p{n}" for n in range(1, 7)} <= reported
    assert "did not reach the fleet" not in artifact["data"]
    assert all(f"p{n}" in artifact["data"] for n in range(1, 7))
    assert "| d1 |" not in artifact["data"]
