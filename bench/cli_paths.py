"""Wall time of `runbook run postgres-connections --json` (diagnose only), interpreter start
included, against a plain `python -c` psycopg script doing the same two queries:

  warm   the CLI finds a running Prefect server (as under `runbook serve`);
  cold   no server anywhere: Prefect starts a temporary one for the run (one round: slow).

    .venv/bin/python bench/cli_paths.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

from deployments.localpg import LocalPostgres, free_port
from deployments.serve import start_server

BIN = Path(sys.executable).parent
PLAIN = """
import psycopg, sys
with psycopg.connect(sys.argv[1], connect_timeout=5) as c:
    c.execute("SELECT now(), current_setting('max_connections')::int").fetchone()
    c.execute("SELECT * FROM pg_stat_activity").fetchall()
"""


def timed(cmd: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    elapsed = time.perf_counter() - start
    if proc.returncode not in (0, 1):
        raise SystemExit(f"{cmd} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    rounds = parser.parse_args().rounds
    with ExitStack() as stack, tempfile.TemporaryDirectory() as tmp:
        pg = stack.enter_context(LocalPostgres())
        dsn = pg.create_database("bench")
        config = Path(tmp) / "runbook.toml"
        config.write_text(f'[postgres.main]\ndsn = "{dsn}"\n')
        base = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "RUNBOOK_"))}
        base.update(
            RUNBOOK_CONFIG=str(config),
            PREFECT_SERVER_ANALYTICS_ENABLED="false",
            PREFECT_HOME=str(Path(tmp) / "home"),
            # no local server on the default port is probed for the cold path
            RUNBOOK_PREFECT_API=f"http://127.0.0.1:{free_port()}/api",
        )
        os.environ["PREFECT_HOME"] = base["PREFECT_HOME"]
        api = start_server("127.0.0.1", free_port(), stack)
        cli = [str(BIN / "runbook"), "run", "postgres-connections", "--json"]
        plain = [sys.executable, "-c", PLAIN, dsn]
        warm_env = {**base, "PREFECT_API_URL": api}
        timed(cli, warm_env)  # warm-up: first run registers the flow
        runs: dict[str, list[float]] = {"plain": [], "warm": []}
        for _ in range(rounds):
            runs["plain"].append(timed(plain, base))
            runs["warm"].append(timed(cli, warm_env))
        cold = timed(cli, {**base, "PREFECT_HOME": str(Path(tmp) / "cold-home")})
    plain_s = statistics.median(runs["plain"])
    warm_s = statistics.median(runs["warm"])
    print(f"rounds: {rounds} (medians, s; interpreter start included)")
    print(f"plain psycopg script        {plain_s:6.2f}   1.00x")
    print(f"runbook run, server running {warm_s:6.2f}   {warm_s / plain_s:5.1f}x")
    print(f"runbook run, cold (1 run)   {cold:6.2f}   {cold / plain_s:5.1f}x")


if __name__ == "__main__":
    main()
