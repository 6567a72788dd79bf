"""What our backup checks cost against the tools an engineer would run by hand.

1. Integrity of a ~1 GB gzip backup: backup-verification's streamed check (gzip inflate plus
   SHA-256 of every byte) against `gzip -t` on the same file. Throughput and peak memory
   (RSS) of each, each in its own process. The file is base64 of random bytes, compressed with
   `gzip -1`: about 1.3 bytes of text per byte of file, so the time is spent reading and
   inflating, as with any backup.
2. A restore-drill flow run (create a scratch database, stream the dump into pg_restore, a
   check, the table comparison, drop it, the report) against a bare `pg_restore` of the same
   custom-format dump into an empty database, on one local PostgreSQL.

Rounds alternate between the two sides; medians are printed with their ratio.

    .venv/bin/python bench/backup_paths.py [--size-mb 1024] [--rows 6000000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import suppress
from pathlib import Path
from typing import Any

os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="runbook-bench-"))
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL"] = "CRITICAL"

import psycopg

from deployments.localpg import LocalPostgres

ROOT = Path(__file__).resolve().parent.parent
RESTORE = ["pg_restore", "--no-owner", "--no-privileges", "--exit-on-error"]

OUR_CHECK = """
import json, resource, sys, time
from tasks.settings import BackupSet
from tasks.backups import verify_backup
path = sys.argv[1]
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
result = verify_backup.fn("bench", BackupSet(directory="."), None, path)
seconds = time.perf_counter() - start
assert result.ok, result.detail
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"seconds": seconds, "rss_before_kib": before, "rss_peak_kib": peak}))
"""


def make_gzip(path: Path, size_mb: int) -> None:
    """About size_mb MiB of gzip: base64 of random bytes, `gzip -1`."""
    with path.open("wb") as out:
        gz = subprocess.Popen(["gzip", "-1", "-c"], stdin=subprocess.PIPE, stdout=out)
        assert gz.stdin is not None
        block = 1 << 20  # small: the parent's RSS is counted again in each child it forks
        for _ in range(int(size_mb * 1.33 * 2**20 / block) + 1):
            gz.stdin.write(base64.encodebytes(os.urandom(block * 3 // 4)))
        gz.stdin.close()
        assert gz.wait() == 0


def timed_child(argv: list[str]) -> tuple[float, int, str]:
    """Wall seconds, peak RSS (KiB) and stdout of one child process. The peak is VmHWM read
    while it runs: the rusage of a forked child also counts its parent's pages."""
    start = time.perf_counter()
    with tempfile.TemporaryFile() as out:
        proc = subprocess.Popen(argv, stdout=out, cwd=ROOT)
        peak = 0
        while proc.poll() is None:
            with suppress(OSError):
                status = Path(f"/proc/{proc.pid}/status").read_text()
                hwm = [int(x.split()[1]) for x in status.splitlines() if x.startswith("VmHWM")]
                peak = max([peak, *hwm])  # none once it has exited
            time.sleep(0.02)
        seconds = time.perf_counter() - start
        assert proc.returncode == 0, f"{argv[0]} exited {proc.returncode}"
        out.seek(0)
        return seconds, peak, out.read().decode()


def integrity(size_mb: int, rounds: int, workdir: Path) -> dict[str, Any]:
    """Part 1 (module docstring): medians in seconds, peak RSS in MiB, the file's MiB."""
    path = workdir / "big.sql.gz"
    print(f"making a {size_mb} MiB gzip file ...", flush=True)
    make_gzip(path, size_mb)
    mib = path.stat().st_size / 2**20
    ours, theirs, ours_rss, theirs_rss, imports_rss = [], [], [], [], []
    for _ in range(rounds):
        seconds, rss, _ = timed_child(["gzip", "-t", str(path)])
        theirs.append(seconds)
        theirs_rss.append(rss)
        _, _, out = timed_child([sys.executable, "-c", OUR_CHECK, str(path)])
        result = json.loads(out)
        ours.append(result["seconds"])
        ours_rss.append(result["rss_peak_kib"])
        imports_rss.append(result["rss_before_kib"])
    path.unlink()
    return {
        "mib": mib,
        "rounds": rounds,
        "gzip_t": statistics.median(theirs),
        "ours": statistics.median(ours),
        "gzip_t_rss": max(theirs_rss) / 1024,
        "ours_rss": max(ours_rss) / 1024,
        "ours_rss_after_imports": max(imports_rss) / 1024,
    }


def print_integrity(f: dict[str, Any]) -> None:
    mib, t_ours, t_theirs = f["mib"], f["ours"], f["gzip_t"]
    print(f"\nintegrity check of a {mib:.0f} MiB gzip backup, median of {f['rounds']}")
    print(
        f"  gzip -t            {t_theirs:6.2f} s  {mib / t_theirs:6.0f} MiB/s  "
        f"peak RSS {f['gzip_t_rss']:.0f} MiB"
    )
    print(
        f"  ours (+ sha256)    {t_ours:6.2f} s  {mib / t_ours:6.0f} MiB/s  "
        f"peak RSS {f['ours_rss']:.0f} MiB ({f['ours_rss_after_imports']:.0f} MiB "
        "after imports, before the check)"
    )
    print(f"  throughput ratio (ours / gzip -t): {t_theirs / t_ours:.2f}x  (target >= 0.9x)")


def restore(rows: int, rounds: int, workdir: Path) -> dict[str, Any]:
    """Part 2 (module docstring): medians in seconds, peak RSS in MiB, the dump's MiB."""
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    from flows.restore_drill import restore_drill

    with LocalPostgres() as pg:
        pg.create_database("source")
        print(f"filling a database with {rows} rows ...", flush=True)
        with psycopg.connect(pg.dsn_for("source"), autocommit=True) as conn:
            conn.execute(
                "CREATE TABLE orders (id bigint PRIMARY KEY, customer int, total numeric, "
                "note text, created timestamptz)"
            )
            conn.execute(
                "INSERT INTO orders SELECT i, i %% 9973, i * 0.37, md5(i::text), "
                "now() - i * interval '1 second' FROM generate_series(1, %s) i",
                [rows],
            )
            conn.execute("CREATE INDEX ON orders (customer)")
            conn.execute("CREATE TABLE customers AS SELECT DISTINCT customer AS id FROM orders")
        dumps = workdir / "dumps"
        dumps.mkdir()
        dump = dumps / "source.dump"
        subprocess.run(["pg_dump", "-Fc", "-f", str(dump), pg.dsn_for("source")], check=True)
        config = workdir / "runbook.toml"
        config.write_text(
            f'[postgres.main]\ndsn = "{pg.dsn_for("source")}"\n'
            f'[postgres.scratch]\ndsn = "{pg.dsn_for("postgres")}"\n'
            f'[backups.app]\ndirectory = "{dumps}"\ndatabase = "main"\nscratch = "scratch"\n'
            f'checks = ["SELECT count(*) = {rows} FROM orders"]\n'
        )
        os.environ["RUNBOOK_CONFIG"] = str(config)
        bare, bare_full, drill, bare_rss = [], [], [], []
        with (
            prefect_test_harness(server_startup_timeout=120),
            temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}),
        ):
            rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            for i in range(rounds):
                start = time.perf_counter()
                pg.create_database(f"bare{i}")
                seconds, rss, _ = timed_child([*RESTORE, "-d", pg.dsn_for(f"bare{i}"), str(dump)])
                with psycopg.connect(pg.dsn, autocommit=True) as conn:
                    conn.execute(f"DROP DATABASE bare{i}")
                bare.append(seconds)
                bare_full.append(time.perf_counter() - start)
                bare_rss.append(rss)
                start = time.perf_counter()
                report = restore_drill("app", dry_run=False, approval="auto")
                drill.append(time.perf_counter() - start)
                assert report.status.value == "healthy", report.findings
            rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "mib": dump.stat().st_size / 2**20,
        "rows": rows,
        "rounds": rounds,
        "pg_restore": statistics.median(bare),
        "createdb_pg_restore_dropdb": statistics.median(bare_full),
        "drill": statistics.median(drill),
        "pg_restore_rss": max(bare_rss) / 1024,
        "flow_rss_before": rss_before / 1024,
        "flow_rss_after": rss_after / 1024,
    }


def print_restore(f: dict[str, Any]) -> None:
    t_bare, t_drill, full = f["pg_restore"], f["drill"], f["createdb_pg_restore_dropdb"]
    print(
        f"\nrestore of a {f['mib']:.0f} MiB custom-format dump ({f['rows']} rows), "
        f"median of {f['rounds']}"
    )
    print(f"  bare pg_restore     {t_bare:6.2f} s  peak RSS {f['pg_restore_rss']:.0f} MiB")
    print(f"  restore-drill flow  {t_drill:6.2f} s  (create, restore, check, tables, drop, report)")
    print(f"  createdb + pg_restore + dropdb {full:6.2f} s (drill / this: {t_drill / full:.2f}x)")
    print(
        f"  the flow's process: peak RSS {f['flow_rss_before']:.0f} MiB before the drills, "
        f"{f['flow_rss_after']:.0f} MiB after (the dump streams through it)"
    )
    print(f"  time ratio (drill / bare pg_restore): {t_drill / t_bare:.2f}x  (target <= 1.1x)")


def measure(size_mb: int, rows: int, rounds: int, only: str | None = None) -> dict[str, Any]:
    """Both parts (or `only` one): {"integrity": ..., "restore": ...}."""
    workdir = Path(tempfile.mkdtemp(prefix="runbook-bench-backups-"))
    figures: dict[str, Any] = {}
    try:
        if only in (None, "integrity"):
            figures["integrity"] = integrity(size_mb, rounds, workdir)
        if only in (None, "restore"):
            figures["restore"] = restore(rows, rounds, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=1024)
    parser.add_argument("--rows", type=int, default=6_000_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", choices=["integrity", "restore"])
    parser.add_argument("--json", action="store_true", help="one JSON line of figures")
    args = parser.parse_args()
    figures = measure(args.size_mb, args.rows, args.rounds, args.only)
    if args.json:
        print(json.dumps(figures))
        return
    if "integrity" in figures:
        print_integrity(figures["integrity"])
    if "restore" in figures:
        print_restore(figures["restore"])


if __name__ == "__main__":
    main()
