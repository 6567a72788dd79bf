"""Fleet runs against real PostgreSQL targets, some healthy (databases on the session's server)
and some down (a closed port, a cluster started then stopped): what labels select, where the
error threshold stops the fleet, and the ramp as the Prefect API recorded the targets' runs
(their order and overlap, never their durations)."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from uuid import UUID

import pytest

from deployments.fleet import FLEETS
from deployments.localpg import LocalPostgres, free_port
from tasks.fleet import FleetReport
from tasks.models import RunStatus
from tasks.outcome import state_report
from tests.test_cli import cli, no_traceback


class Waves:
    """Holds the first query of every connection through a WavesProxy until its wave is
    complete, then lets the whole wave go at once: the runs that reached their targets
    together are all running while held, so the Prefect API shows them overlapping however
    slow the machine. The k-th wave is complete when it holds expected[k] connections (the
    last number for any later wave), or when no new one came for `quiet` seconds: a fleet that
    starts fewer at once than expected makes smaller waves, one that starts more makes the
    next wave early. `sizes`: each wave's size, in order."""

    def __init__(self, expected: list[int], quiet: float) -> None:
        self.expected = expected
        self.quiet = quiet
        self.cond = threading.Condition()
        self.held = 0
        self.generation = 0
        self.last = 0.0
        self.sizes: list[int] = []

    def hold(self) -> None:
        with self.cond:
            generation = self.generation
            self.held += 1
            self.last = time.monotonic()
            self.cond.notify_all()
            while self.generation == generation:
                left = self.last + self.quiet - time.monotonic()
                full = self.expected[min(len(self.sizes), len(self.expected) - 1)]
                if left <= 0 or self.held >= full:
                    self.sizes.append(self.held)
                    self.held = 0
                    self.generation += 1
                    self.cond.notify_all()
                    break
                self.cond.wait(left)


class WavesProxy:
    """A TCP proxy on a free loopback port to a PostgreSQL server: the startup passes at once,
    the connection's first query waits for its wave (Waves.hold). sslmode=disable in the DSN:
    the first message the client sends is then its startup packet."""

    def __init__(self, upstream_port: int, waves: Waves) -> None:
        self.upstream_port = upstream_port
        self.waves = waves
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port), timeout=10)
            upstream.settimeout(None)
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, from_client: bool) -> None:
        held = not from_client
        try:
            while chunk := src.recv(65536):
                # A typed message (not the startup packet, whose length starts with 0): the
                # first query.
                if not held and chunk[0] != 0:
                    held = True
                    self.waves.hold()
                dst.sendall(chunk)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.listener.close()


@pytest.fixture(scope="module")
def stopped_cluster() -> Iterator[str]:
    """The DSN of a PostgreSQL cluster that was started, then stopped: down."""
    server = LocalPostgres().start()
    dsn = server.dsn_for("postgres")
    server.stop()
    yield dsn


@dataclass
class Fleet:
    """An inventory of [postgres.NAME] targets: healthy ones on the session's server, down
    ones on a closed port or a stopped cluster; labels on each."""

    pg: LocalPostgres
    stopped: str
    lines: list[str] = field(default_factory=list)
    proxies: list[WavesProxy] = field(default_factory=list)

    def healthy(self, name: str, *, waves: Waves | None = None, **labels: str) -> None:
        """A database on the session's server; with waves, reached through a WavesProxy."""
        db = f"f_{uuid.uuid4().hex[:12]}"
        self.pg.create_database(db)
        if waves is None:
            self.add(name, self.pg.dsn_for(db), labels)
            return
        proxy = WavesProxy(self.pg.port, waves)
        self.proxies.append(proxy)
        self.add(name, f"postgresql://postgres@127.0.0.1:{proxy.port}/{db}?sslmode=disable", labels)

    def down(self, name: str, *, stopped: bool = False, **labels: str) -> None:
        dsn = self.stopped if stopped else f"postgresql://app@127.0.0.1:{free_port()}/app"
        self.add(name, f"{dsn}?connect_timeout=2", labels)

    def add(self, name: str, dsn: str, labels: dict[str, str]) -> None:
        pairs = ", ".join(f'{k} = "{v}"' for k, v in labels.items())
        self.lines.append(f'[postgres.{name}]\ndsn = "{dsn}"\nlabels = {{ {pairs} }}\n')

    def text(self) -> str:
        return "".join(self.lines)


@pytest.fixture
def targets(pg: LocalPostgres, stopped_cluster: str, inventory: Any) -> Iterator[Fleet]:
    made = Fleet(pg, stopped_cluster)
    yield made
    for proxy in made.proxies:
        proxy.close()


def write(made: Fleet, inventory: Any) -> None:
    inventory(made.text())


def run_fleet(selector: str, **kwargs: Any) -> FleetReport:
    fleet = FLEETS["postgres-connections"]
    state = fleet(selector=selector, return_state=True, **kwargs)
    report = state_report(state)
    assert isinstance(report, FleetReport), state
    return report


@dataclass(frozen=True)
class ChildRun:
    target: str
    state: str
    start: datetime
    end: datetime
    parent_task_run_flow_run: UUID | None


def child_runs(parent: str | None) -> list[ChildRun]:
    """The fleet run's subflow runs as the Prefect API has them, in the order they started,
    each with the flow run of the task run it hangs from."""
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    assert parent is not None
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(
                parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[UUID(parent)])
            )
        )
        found = []
        for run in runs:
            assert run.start_time and run.end_time and run.parent_task_run_id, run
            tracking = client.read_task_run(run.parent_task_run_id)
            found.append(
                ChildRun(
                    target=run.parameters["target"],
                    state=run.state_type.value if run.state_type else "",
                    start=run.start_time,
                    end=run.end_time,
                    parent_task_run_flow_run=tracking.flow_run_id,
                )
            )
    return sorted(found, key=lambda r: r.start)


def fleet_artifact(report: FleetReport, kind: str = "markdown") -> Any:
    """The fleet run's artifact of `kind`, from the API: `fleet-<runbook>`'s markdown, or its
    progress artifact (its percent, its description)."""
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    assert report.flow_run_id is not None
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[UUID(report.flow_run_id)])
            )
        )
    if kind == "progress":
        (artifact,) = [a for a in found if a.type == "progress"]
        return artifact.data, artifact.description
    (artifact,) = [a for a in found if a.key == f"fleet-{report.runbook}"]
    return str(artifact.data)


def running_at_each_start(runs: list[ChildRun]) -> list[int]:
    """For each run in start order: how many runs (itself included) were running as it began."""
    return [sum(1 for o in runs if o.start <= r.start < o.end) for r in runs]


def one_child_per_target(report: FleetReport) -> list[ChildRun]:
    runs = child_runs(report.flow_run_id)
    assert sorted(r.target for r in runs) == sorted(t.target for t in report.targets)
    assert {r.parent_task_run_flow_run for r in runs} == {UUID(str(report.flow_run_id))}
    assert {r.state for r in runs} <= {"COMPLETED", "FAILED"}  # every one finished
    ids = {t.flow_run_id for t in report.targets}
    assert None not in ids and len(ids) == len(report.targets)
    return runs


@pytest.mark.usefixtures("prefect_api")
def test_labels_select_exactly_their_targets(targets: Fleet, inventory: Any) -> None:
    targets.healthy("a", env="prod", tier="db")
    targets.healthy("b", env="prod", tier="cache")
    targets.healthy("c", env="stage", tier="db")
    targets.down("d", env="dev", tier="db")
    write(targets, inventory)
    report = run_fleet("env=prod,tier=db")
    assert [t.target for t in report.targets] == ["a"] and report.status is RunStatus.healthy
    report = run_fleet("tier=db", max_concurrency="100%", max_errors="1")
    assert [t.target for t in report.targets] == ["a", "c", "d"]
    assert report.totals.failed == 1 and report.status is RunStatus.failed
    one_child_per_target(report)
    report = run_fleet("c,b")
    assert [t.target for t in report.targets] == ["b", "c"] and report.not_started == []


@pytest.mark.usefixtures("prefect_api")
def test_the_ramp_starts_with_a_canary_and_doubles_to_the_cap(
    targets: Fleet, inventory: Any
) -> None:
    cap = 4
    # The canary, then two; the second of them to finish lifts the limit to 4 while the one
    # started when the first finished is still held: four, then four again.
    waves = Waves(expected=[1, 2, 4, 4], quiet=10)
    for i in range(11):
        targets.healthy(f"db{i:02d}", waves=waves, env="prod")
    write(targets, inventory)
    report = run_fleet("env=prod", max_concurrency=str(cap))
    assert report.status is RunStatus.healthy and report.exit_code == 0
    assert report.totals.healthy == 11 and report.max_concurrency == cap
    # As the targets saw it: the canary alone, then two at once, then up to the cap.
    assert waves.sizes == [1, 2, 4, 4]
    # As the Prefect API recorded the runs:
    runs = one_child_per_target(report)
    canary, *rest = runs
    assert canary.target == "db00"  # targets start in name order
    assert all(r.start >= canary.end for r in rest)  # the canary ran alone
    at_start = running_at_each_start(runs)
    assert at_start[0] == 1
    # then two at once: the two started when the canary ended run side by side
    assert at_start[1] <= 2 and at_start[2] <= 2 and runs[2].start < runs[1].end
    assert max(at_start) == cap  # then up to the cap, never beyond it


class Gate:
    """For a WavesProxy: holds every first query until open() (at most 60 s)."""

    def __init__(self) -> None:
        self.arrived = threading.Semaphore(0)
        self.opened = threading.Event()

    def hold(self) -> None:
        self.arrived.release()
        self.opened.wait(60)

    def open(self) -> None:
        self.opened.set()


@pytest.mark.usefixtures("prefect_api")
def test_a_cancelled_fleet_starts_no_new_target_and_ends_by_abort(
    targets: Fleet, inventory: Any
) -> None:
    """Cancelled (as serve's runner asks, tasks.cancel) while its canary's first query is held:
    no other target starts, the canary ends, and the fleet stops by Abort (the runner then
    sets it Cancelled), saying how many targets it did not start."""
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName
    from prefect.exceptions import Abort

    from tasks.cancel import forget_cancel, request_cancel

    gate = Gate()
    for name in ("c1", "c2", "c3"):
        targets.healthy(name, waves=gate, env="prod")  # type: ignore[arg-type]
    write(targets, inventory)
    fleet = FLEETS["postgres-connections"]
    with ThreadPoolExecutor(1) as pool:
        ran = pool.submit(fleet, selector="c1,c2,c3", max_concurrency="3")
        assert gate.arrived.acquire(timeout=120), "the canary never reached its database"
        with get_client(sync_client=True) as client:
            (run,) = client.read_flow_runs(
                flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=["fleet on c1,c2,c3"]))
            )
        request_cancel(run.id)
        gate.open()
        try:
            with pytest.raises(Abort, match="stopped with 2 target"):
                ran.result(timeout=120)
        finally:
            forget_cancel(run.id)
    runs = child_runs(str(run.id))
    assert [(r.target, r.state) for r in runs] == [("c1", "COMPLETED")]


@pytest.mark.usefixtures("prefect_api")
def test_the_first_error_stops_the_fleet_and_in_flight_targets_finish(
    targets: Fleet, inventory: Any
) -> None:
    # a is the canary; b and c (both down) start together once it is healthy: when the first
    # of them fails, the other is in flight and finishes; d to f never start.
    targets.healthy("a", env="prod")
    targets.down("b", env="prod")
    targets.down("c", env="prod", stopped=True)
    for name in ("d", "e", "f"):
        targets.healthy(name, env="prod")
    write(targets, inventory)
    report = run_fleet("env=prod", max_concurrency="2")
    assert [(t.target, t.status) for t in report.targets] == [
        ("a", RunStatus.healthy),
        ("b", RunStatus.failed),
        ("c", RunStatus.failed),
    ]
    assert [n.target for n in report.not_started] == ["d", "e", "f"]
    reason = report.not_started[0].reason
    assert "2 target(s) erred" in reason and "more than max errors 0 allows" in reason
    assert report.status is RunStatus.failed and report.exit_code == 3
    assert report.totals.model_dump() == {
        "healthy": 1,
        "fixed": 0,
        "unhealthy": 0,
        "failed": 2,
        "not_started": 3,
    }
    # Both ran to their end: the one still in flight when the other failed finished. (Their
    # runs' start times are not compared: the second may reach Running late on a busy server.)
    runs = one_child_per_target(report)
    assert [r.state for r in runs] == ["COMPLETED", "FAILED", "FAILED"]
    assert "Connection refused" in report.targets[1].findings[0].message
    # The fleet's artifact: its targets worst first, then those not started.
    rows = [line.split(" | ") for line in fleet_artifact(report).splitlines()[6:]]
    assert [(row[0], row[1]) for row in rows] == [
        ("| b", "failed"),
        ("| c", "failed"),
        ("| a", "healthy"),
        ("| d", "not started"),
        ("| e", "not started"),
        ("| f", "not started"),
    ]
    # Its progress: where it stopped, three targets of six.
    assert fleet_artifact(report, "progress") == (
        50.0,
        "postgres-connections on env=prod: stopped at 3 of 6 targets",
    )

    # 50% of six: three errors allowed; the two down targets do not stop it.
    report = run_fleet("env=prod", max_concurrency="2", max_errors="50%")
    assert [t.target for t in report.targets] == ["a", "b", "c", "d", "e", "f"]
    assert report.not_started == [] and report.max_errors == 3
    assert report.totals.failed == 2 and report.totals.healthy == 4
    one_child_per_target(report)
    assert fleet_artifact(report, "progress") == (
        100.0,
        "postgres-connections on env=prod: 6 of 6 targets",
    )


def test_a_fleet_from_the_cli_prints_its_json_and_exits_with_the_worst(
    targets: Fleet, inventory: Any, prefect_api: str
) -> None:
    targets.healthy("a", env="prod")
    targets.down("b", env="prod")
    targets.healthy("c", env="prod")
    targets.healthy("x", env="stage")
    write(targets, inventory)
    env = {"PREFECT_API_URL": prefect_api}
    # One at a time: a, then b, which fails; c is never started.
    proc = cli(
        "run", "postgres-connections", "--target", "env=prod", "--max-concurrency", "1", "--json",
        env=env,
    )  # fmt: skip
    assert proc.returncode == 3, proc.stderr
    no_traceback(proc)
    found = json.loads(proc.stdout)
    assert set(found) >= {"runbook", "selector", "status", "targets", "not_started", "totals"}
    assert found["runbook"] == "postgres-connections" and found["selector"] == "env=prod"
    assert found["status"] == "failed"
    assert [(t["target"], t["status"]) for t in found["targets"]] == [
        ("a", "healthy"),
        ("b", "failed"),
    ]
    (left,) = found["not_started"]
    assert left["target"] == "c" and "more than max errors 0 allows" in left["reason"]
    assert found["totals"] == {
        "healthy": 1,
        "fixed": 0,
        "unhealthy": 0,
        "failed": 1,
        "not_started": 1,
    }
    # every target's report is the usual one (DESIGN.md's report contract)
    usual = {"runbook", "target", "dry_run", "status", "findings", "actions", "started_at"}
    assert all(set(t) >= usual | {"finished_at", "flow_run_id"} for t in found["targets"])

    proc = cli("run", "postgres-connections", "--target", "a,c", "--json", env=env)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["totals"]["healthy"] == 2

    # The table: worst first. b fails only after its retries, long after a, c and x ran.
    proc = cli("run", "postgres-connections", "--target", "all", "--max-errors", "1", env=env)
    assert proc.returncode == 3, proc.stderr
    rows = [line.split("│") for line in proc.stdout.splitlines() if line.startswith("│")]
    assert [row[1].strip() for row in rows] == ["b", "a", "c", "x"]
    assert [row[2].strip() for row in rows] == ["failed", "healthy", "healthy", "healthy"]
    assert "; 3 healthy, 0 fixed, 0 unhealthy, 1 failed, 0 not started" in proc.stdout

    # a single plain name keeps the single-target path: the usual report
    proc = cli("run", "postgres-connections", "--target", "a", "--json", env=env)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["target"] == "a"


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("--target", "a,env=prod"), "mixes target names and labels"),
        (("--target", "nope,a"), "unknown postgres target 'nope'; configured for"),
        (("--target", "env=dev"), "labels found: env=prod"),
        (("--target", "all", "--max-concurrency", "0"), "--max-concurrency '0': must be from 1"),
        (("--target", "all", "--max-errors", "x%"), "--max-errors 'x%': expected a whole"),
        (("--target", "a", "--max-errors", "1"), "--max-errors goes with a fleet"),
        (("--target", "all", "--apply"), "--apply on a fleet needs --yes"),
        (("--target", "all", "--set", "long_query_seconds=abc"), "valid integer"),
    ],
)
def test_fleet_usage_errors_exit_2(
    targets: Fleet, inventory: Any, args: tuple[str, ...], expected: str
) -> None:
    targets.healthy("a", env="prod")
    write(targets, inventory)
    proc = cli("run", "postgres-connections", *args)
    assert proc.returncode == 2, proc.stderr
    assert expected in proc.stderr
    no_traceback(proc)


@pytest.mark.usefixtures("prefect_api")
def test_a_fleet_run_with_a_bad_selector_fails_with_one_line(
    targets: Fleet, inventory: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """As from a deployment or an alert route: the run ends Failed, its message says why, and
    nothing is raised (no traceback in serve's console)."""
    targets.healthy("a", env="prod")
    write(targets, inventory)
    state = FLEETS["postgres-connections"](selector="env=nowhere", return_state=True)
    assert state.is_failed() and state.name == "Failed"
    assert state.message == (
        "postgres-connections on env=nowhere: selector 'env=nowhere': no postgres target of "
        "postgres-connections carries env=nowhere; labels found: env=prod"
    )
    assert "Traceback" not in caplog.text


def test_only_a_503_to_a_creating_request_starts_a_subflow_again() -> None:
    import httpx

    from deployments.fleet import refused_to_create

    def error(method: str, path: str, status: int) -> httpx.HTTPStatusError:
        request = httpx.Request(method, f"http://127.0.0.1:4200/api{path}")
        response = httpx.Response(status, request=request)
        return httpx.HTTPStatusError("refused", request=request, response=response)

    assert refused_to_create(error("POST", "/task_runs/", 503))
    assert refused_to_create(error("POST", "/flow_runs/", 503))
    # Once the run exists (its states, its logs) a retry could act twice; other errors are
    # the target's answer.
    assert not refused_to_create(error("POST", "/flow_runs/1234/set_state", 503))
    assert not refused_to_create(error("POST", "/flow_runs/", 500))
    assert not refused_to_create(ValueError("503"))


def test_a_bad_label_is_a_configuration_error_naming_its_section(inventory: Any) -> None:
    inventory('[postgres.a]\ndsn = "host=x"\nlabels = { "env-name" = "prod" }\n')
    proc = cli("run", "postgres-connections", "--target", "all")
    assert proc.returncode == 2, proc.stderr
    assert "postgres.a.labels: label name 'env-name'" in proc.stderr
    no_traceback(proc)
