"""Every performance goal in one table (issue 18, item 6): each figure beside its baseline
measured in the same run, the ratio, the target ratio, OK or MISS, and for a miss what bounds
it, as measured by the row's script.

Each row runs one of the bench scripts (their `measure` functions, through `--json`) in its
own process, one after another: a script sets Prefect's environment at import and starts its
own servers (a real `prefect server start` in a temp home, PostgreSQL, TLS servers), which it
stops when it ends; a row that fails prints its error in the table and the others still run.

    .venv/bin/python bench/harness.py [--quick] [--only ROW[,ROW]]

Rows: fleet-pg, fleet-tls (bench/fleet_paths.py) and the same two on a Prefect server on
PostgreSQL, a bench-only setting labelled in the table (fleet-pg-pgserver,
fleet-tls-pgserver), alert (bench/alert_latency.py), cli
(bench/cli_paths.py), integrity, restore (bench/backup_paths.py), receiver-burst
(bench/receiver_burst.py: no goal set, its result "-").
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROW_TIMEOUT = 3600

# The CLI has no set goal: its targets are the ranges README.md documents for it (11-14x warm,
# 28-38x cold), rounded up, so that a regression shows.
CLI_WARM_TARGET, CLI_COLD_TARGET = 15.0, 40.0


@dataclass
class Line:
    goal: str
    ours: float | None = None
    baseline: float | None = None
    target: float | None = None  # the most ours / baseline may be
    absolute: float | None = None  # and the most ours may be, seconds, when the goal says so
    bound: str = ""  # what bounds it, shown when it misses
    error: str = ""

    @property
    def ratio(self) -> float | None:
        if self.ours is None or not self.baseline:
            return None
        return self.ours / self.baseline

    @property
    def ok(self) -> bool:
        ratio = self.ratio
        if ratio is None or self.target is None or self.ours is None:
            return False
        return ratio <= self.target and (self.absolute is None or self.ours <= self.absolute)


@dataclass
class Row:
    name: str
    argv: list[str]
    lines: Callable[[dict[str, Any]], list[Line]]
    goals: list[str] = field(default_factory=list)  # the lines' goals, shown on an error


def run_script(argv: list[str]) -> dict[str, Any]:
    """The script's figures: the last line of its stdout, JSON. Raises RuntimeError with the
    end of its stderr when it fails."""
    proc = subprocess.run(
        [sys.executable, *argv],
        capture_output=True,
        text=True,
        timeout=ROW_TIMEOUT,
        cwd=BENCH.parent,
        env={k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"},
    )
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip() or proc.stdout.strip() or "no output").splitlines()[-1]
        raise RuntimeError(f"exit {proc.returncode}: {tail[:300]}")
    figures: dict[str, Any] = json.loads(lines[-1])
    return figures


def fleet_lines(kind: str, goal: str) -> Callable[[dict[str, Any]], list[Line]]:
    def lines(figures: dict[str, Any]) -> list[Line]:
        f = figures[kind]
        t = f["fleet"]["totals"]
        return [
            Line(
                goal,
                f["ours"],
                f["baseline"],
                1.5,
                bound=f"{f['bound']}; totals {t}{failed(f['fleet'].get('failed', {}))}",
            )
        ]

    return lines


def failed(messages: dict[str, str]) -> str:
    """Why the failed targets failed: their reports' messages, the same ones counted once."""
    if not messages:
        return ""
    by_message: dict[str, list[str]] = {}
    for target, message in messages.items():
        # httpx's error text: the status and the URL say it; its response and link do not
        message = re.sub(r"http://[^/]+", "", message.split(" - Response:")[0])
        by_message.setdefault(message, []).append(target)
    return "; failed: " + "; ".join(
        f"{', '.join(targets[:4])}{' ...' if len(targets) > 4 else ''}: {message}"
        for message, targets in by_message.items()
    )


def alert_lines(figures: dict[str, Any]) -> list[Line]:
    ours, prefect = figures["ours"], figures["prefect"]
    bound = (
        f"our runs created p50 {ours['created'][0]:.2f} s, Running p50 "
        f"{ours['running'][0]:.2f} s, p99 {ours['running'][1]:.2f} s"
    )
    return [
        Line(
            "alert -> Running p50 (<= 1 s)",
            ours["running"][0],
            prefect["running"][0],
            1.0,
            absolute=1.0,
            bound=bound,
        ),
        Line(
            "alert -> Running p99 (<= 3 s)",
            ours["running"][1],
            prefect["running"][1],
            1.0,
            absolute=3.0,
            bound=bound,
        ),
    ]


def cli_lines(figures: dict[str, Any]) -> list[Line]:
    paths = figures["paths"]
    plain = paths["plain psycopg script"]

    def line(goal: str, name: str, target: float) -> Line:
        p = paths[name]
        return Line(
            goal,
            p["median"],
            plain["median"],
            target,
            bound=(
                f"the command's own CPU {p['cpu']:.2f} s (the script's {plain['cpu']:.2f} s); "
                f"runbook --help {paths['runbook --help']['median']:.2f} s; load "
                f"{figures['load'][0]:.1f} -> {figures['load'][1]:.1f}"
            ),
        )

    return [
        line("CLI run, server running (warm)", "run, server running (warm)", CLI_WARM_TARGET),
        line("CLI run, no server (cold)", "run, no server (cold)", CLI_COLD_TARGET),
    ]


def integrity_lines(figures: dict[str, Any]) -> list[Line]:
    f = figures["integrity"]
    return [
        Line(
            f"backup integrity, {f['mib']:.0f} MiB (>= 0.9x gzip -t throughput)",
            f["ours"],
            f["gzip_t"],
            1 / 0.9,
            bound=(
                f"ours {f['mib'] / f['ours']:.0f} MiB/s (gzip inflate + SHA-256 in one process, "
                f"peak RSS {f['ours_rss']:.0f} MiB) vs gzip -t {f['mib'] / f['gzip_t']:.0f} MiB/s"
            ),
        )
    ]


def restore_lines(figures: dict[str, Any]) -> list[Line]:
    f = figures["restore"]
    return [
        Line(
            f"restore drill, {f['rows']} rows (<= 1.1x pg_restore)",
            f["drill"],
            f["pg_restore"],
            1.1,
            bound=(
                f"createdb + pg_restore + dropdb alone {f['createdb_pg_restore_dropdb']:.2f} s; "
                f"the drill's flow process peak RSS {f['flow_rss_after']:.0f} MiB"
            ),
        )
    ]


def burst_lines(figures: dict[str, Any]) -> list[Line]:
    """No goal set (issue 19 asks for the figures): shown with "-", its note always."""
    ours, base = figures["ours"], figures["baseline"]
    bound = (
        f"{ours['alerts_per_second']:.0f} alerts/s against {base['alerts_per_second']:.0f}; "
        f"{ours['runs']} runs created through the API; receiver CPU {ours['receiver_cpu']:.1f} s, "
        f"Prefect server CPU {ours['prefect_server_cpu']:.1f} s in {ours['seconds']:.1f} s wall; "
        f"peak RSS {ours['peak_rss_mib']:.0f} MiB (baseline {base['peak_rss_mib']:.0f} MiB); "
        "storm control checks passed"
    )
    name = f"receiver burst, {figures['alerts']} alerts ({figures['fingerprints']} fp)"
    return [
        Line(f"{name}, wall", ours["seconds"], base["seconds"], bound=bound),
        Line(f"{name}, response p50", ours["p50"], base["p50"]),
        Line(f"{name}, response p99", ours["p99"], base["p99"]),
    ]


def rows(quick: bool) -> list[Row]:
    databases, endpoints, dead = (40, 100, 6) if quick else (200, 500, 25)
    alerts, interval = (8, 3.0) if quick else (50, 5.0)
    rounds = 2 if quick else 5
    size_mb, rows_, backup_rounds = (128, 300_000, 1) if quick else (1024, 6_000_000, 3)
    burst_alerts, burst_fingerprints = (1000, 200) if quick else (10_000, 2_000)
    fleet = str(BENCH / "fleet_paths.py")
    pg_goal = f"fleet pg, {databases} dbs on 1 server (<= 1.5x script)"
    tls_goal = f"fleet tls, {endpoints} endpoints, {dead} dead (<= 1.5x)"
    # The same fleets with the bench's Prefect server on PostgreSQL, a bench-only setting
    # (--server postgres): what is left of the figure without the SQLite server's 503s.
    pgserver = " [bench: Prefect on PG]"
    pg_args = [fleet, "--only", "postgres", "--databases", str(databases)]
    tls_args = [fleet, "--only", "tls", "--endpoints", str(endpoints), "--dead", str(dead)]
    return [
        Row("fleet-pg", [*pg_args, "--json"], fleet_lines("postgres", pg_goal), [pg_goal]),
        Row(
            "fleet-pg-pgserver",
            [*pg_args, "--server", "postgres", "--json"],
            fleet_lines("postgres", pg_goal + pgserver),
            [pg_goal + pgserver],
        ),
        Row("fleet-tls", [*tls_args, "--json"], fleet_lines("tls", tls_goal), [tls_goal]),
        Row(
            "fleet-tls-pgserver",
            [*tls_args, "--server", "postgres", "--json"],
            fleet_lines("tls", tls_goal + pgserver),
            [tls_goal + pgserver],
        ),
        Row(
            "alert",
            [
                str(BENCH / "alert_latency.py"),
                "--alerts",
                str(alerts),
                "--interval",
                str(interval),
                "--json",
            ],
            alert_lines,
            ["alert -> Running p50", "alert -> Running p99"],
        ),
        Row(
            "cli",
            [str(BENCH / "cli_paths.py"), "--rounds", str(rounds), "--skip-temporary", "--json"],
            cli_lines,
            ["CLI run (warm)", "CLI run (cold)"],
        ),
        Row(
            "integrity",
            [
                str(BENCH / "backup_paths.py"),
                "--only",
                "integrity",
                "--size-mb",
                str(size_mb),
                "--rounds",
                str(backup_rounds),
                "--json",
            ],
            integrity_lines,
            ["backup integrity vs gzip -t"],
        ),
        Row(
            "restore",
            [
                str(BENCH / "backup_paths.py"),
                "--only",
                "restore",
                "--rows",
                str(rows_),
                "--rounds",
                str(backup_rounds),
                "--json",
            ],
            restore_lines,
            ["restore drill vs pg_restore"],
        ),
        Row(
            "receiver-burst",
            [
                str(BENCH / "receiver_burst.py"),
                "--alerts",
                str(burst_alerts),
                "--fingerprints",
                str(burst_fingerprints),
                "--json",
            ],
            burst_lines,
            ["receiver burst, wall", "receiver burst, response p50", "receiver burst, p99"],
        ),
    ]


def fmt(value: float | None, unit: str = "s") -> str:
    return "-" if value is None else f"{value:.2f}{unit}"


def table(lines: list[Line]) -> str:
    width = max(len(line.goal) for line in lines)
    head = f"{'goal':<{width}}  {'ours':>8}  {'baseline':>8}  {'ratio':>7}  {'target':>7}  result"
    out = [head, "-" * len(head)]
    notes = []
    for i, line in enumerate(lines, 1):
        if line.error:
            result = "ERROR"
        elif line.target is None:
            result = "-"  # measured, no goal set
        else:
            result = "OK" if line.ok else "MISS"
        target = "-" if line.target is None else f"<={line.target:.2f}x"
        out.append(
            f"{line.goal:<{width}}  {fmt(line.ours):>8}  {fmt(line.baseline):>8}  "
            f"{fmt(line.ratio, 'x'):>7}  {target:>7}  {result} [{i}]"
        )
        if line.error:
            notes.append(f"[{i}] error: {line.error}")
        elif not line.ok and line.bound:
            notes.append(f"[{i}] bounded by: {line.bound}")
    return "\n".join(out + notes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes, fewer rounds")
    parser.add_argument("--only", help="comma-separated row names")
    args = parser.parse_args()
    chosen = rows(args.quick)
    if args.only:
        wanted = set(args.only.split(","))
        chosen = [row for row in chosen if row.name in wanted]
    started, start = datetime.now(UTC), time.perf_counter()
    lines: list[Line] = []
    for row in chosen:
        row_start = time.perf_counter()
        print(f"{row.name}: {' '.join(Path(a).name for a in row.argv)} ...", flush=True)
        try:
            lines.extend(row.lines(run_script(row.argv)))
        except Exception as exc:
            lines.extend(Line(goal, error=f"{row.name}: {exc}") for goal in row.goals)
        print(f"{row.name}: {time.perf_counter() - row_start:.0f} s", flush=True)
    print()
    print(
        f"bench/harness.py{' --quick' if args.quick else ''}, {started:%Y-%m-%d %H:%M} UTC, "
        f"{os.cpu_count()} CPUs; seconds, medians; ratio = ours / baseline, same run"
    )
    print(table(lines))
    print(f"whole run: {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
