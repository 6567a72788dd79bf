"""Wall time of the `runbook` command as a process (interpreter start included), against a
plain `python -c` psycopg script doing the same two queries as the diagnose-only run, measured
in the same rounds (interleaved, so a busy machine slows all alike):

  list       `runbook list`, stdout a pipe
  help       `runbook --help` and `runbook run --help`
  warm       `runbook run postgres-connections --json` with a Prefect server running
             (PREFECT_API_URL, as under `runbook serve`)
  cold       the same with no server anywhere: Prefect's API app inside the command, on the
             database already in PREFECT_HOME
  first      cold on a fresh PREFECT_HOME: Prefect creates its database (migrations)
  temporary  for comparison, what the CLI did before: the same flow called from a script
             with no API, so Prefect starts its temporary server process

    .venv/bin/python bench/cli_paths.py [--rounds 5] [--skip-temporary]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import httpx

from deployments.localpg import LocalPostgres, free_port, stop_process

BIN = Path(sys.executable).parent
PLAIN = """
import psycopg, sys
with psycopg.connect(sys.argv[1], connect_timeout=5) as c:
    c.execute("SELECT now(), current_setting('max_connections')::int").fetchone()
    c.execute("SELECT * FROM pg_stat_activity").fetchall()
"""
TEMPORARY = """
from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings
from flows.postgres_connections import postgres_connections
with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
    postgres_connections(target="main", dry_run=True, approval="ask", params={})
"""


# CPU seconds of the commands timed since the last clear().
CPU: list[float] = []


def timed(cmd: list[str], env: dict[str, str], ok: tuple[int, ...] = (0, 1)) -> float:
    """Wall seconds of `cmd`; its CPU seconds (user + system, its waited-for children
    included, such as Prefect's temporary server) are appended to CPU."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    elapsed = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode not in ok:
        raise SystemExit(f"{cmd} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    CPU.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
    return elapsed


@contextmanager
def prefect_server(home: Path, env: dict[str, str]) -> Iterator[str]:
    """`prefect server start` on a free loopback port, its home in `home`."""
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    home.mkdir(parents=True)
    log = (home / "server.log").open("wb")
    proc = subprocess.Popen(
        [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env={**env, "PREFECT_HOME": str(home)},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the Prefect server did not start; see {home / 'server.log'}")
            time.sleep(0.5)
        yield url
    finally:
        stop_process(proc)
        log.close()


def measure(rounds: int = 5, skip_temporary: bool = False) -> dict[str, Any]:
    """Every path timed (module docstring), rounds interleaved: per path, wall seconds
    (median, min, max) and the command's own CPU seconds (median); the load average before
    and after."""
    tmp = Path(tempfile.mkdtemp(prefix="bench-cli-"))
    with ExitStack() as stack:
        stack.callback(shutil.rmtree, tmp, True)
        pg = stack.enter_context(LocalPostgres())
        dsn = pg.create_database("bench")
        config = tmp / "runbook.toml"
        config.write_text(f'[postgres.main]\ndsn = "{dsn}"\n')
        base = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "RUNBOOK_"))}
        base.update(
            RUNBOOK_CONFIG=str(config),
            PREFECT_SERVER_ANALYTICS_ENABLED="false",
            PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL="CRITICAL",
            # nothing answers here: no local server is found for the cold paths
            RUNBOOK_PREFECT_API=f"http://127.0.0.1:{free_port()}/api",
        )
        api = stack.enter_context(prefect_server(tmp / "server-home", base))
        runbook = str(BIN / "runbook")
        run = [runbook, "run", "postgres-connections", "--json"]
        cold_env = {**base, "PREFECT_HOME": str(tmp / "cold-home")}
        warm_env = {**base, "PREFECT_HOME": str(tmp / "warm-home"), "PREFECT_API_URL": api}
        timed(run, warm_env)  # the first run against a server registers the flow
        timed(run, cold_env)  # creates the cold path's database

        def first() -> float:
            return timed(run, {**base, "PREFECT_HOME": str(tmp / f"first-{time.time_ns()}")})

        def temporary() -> float:
            env = {**base, "PREFECT_HOME": str(tmp / "cold-home")}
            return timed([sys.executable, "-c", TEMPORARY], env)

        paths: dict[str, Callable[[], float]] = {
            "plain psycopg script": lambda: timed([sys.executable, "-c", PLAIN, dsn], base),
            "runbook list": lambda: timed([runbook, "list"], base),
            "runbook --help": lambda: timed([runbook, "--help"], base),
            "runbook run --help": lambda: timed([runbook, "run", "--help"], base),
            "run, server running (warm)": lambda: timed(run, warm_env),
            "run, no server (cold)": lambda: timed(run, cold_env),
            "run, fresh PREFECT_HOME (first)": first,
        }
        if not skip_temporary:
            paths["before: Prefect's temporary server"] = temporary
        times: dict[str, list[float]] = {name: [] for name in paths}
        cpu: dict[str, list[float]] = {name: [] for name in paths}
        load = os.getloadavg()[0]
        for _ in range(rounds):
            for name, measure in paths.items():
                CPU.clear()
                times[name].append(measure())
                cpu[name].append(sum(CPU))
    return {
        "rounds": rounds,
        "load": [load, os.getloadavg()[0]],
        "paths": {
            name: {
                "median": statistics.median(values),
                "min": min(values),
                "max": max(values),
                "cpu": statistics.median(cpu[name]),
            }
            for name, values in times.items()
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--skip-temporary", action="store_true")
    parser.add_argument("--json", action="store_true", help="one JSON line of figures")
    args = parser.parse_args()
    figures = measure(args.rounds, args.skip_temporary)
    if args.json:
        print(json.dumps(figures))
        return
    paths = figures["paths"]
    plain = paths["plain psycopg script"]["median"]
    load_before, load_after = figures["load"]
    print(
        f"rounds: {args.rounds}, interleaved; seconds, interpreter start included; "
        f"load average {load_before:.1f} -> {load_after:.1f} on {os.cpu_count()} CPUs"
    )
    print(f"{'':36} {'median':>7} {'min':>6} {'max':>6}  vs plain   CPU s")
    for name, p in paths.items():
        print(
            f"{name:36} {p['median']:7.2f} {p['min']:6.2f} {p['max']:6.2f}  "
            f"{p['median'] / plain:6.1f}x  {p['cpu']:6.2f}"
        )
    print("CPU s: the command's own user + system seconds (median), not those of a server it calls")


if __name__ == "__main__":
    main()
