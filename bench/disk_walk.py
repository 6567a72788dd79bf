"""What disk-space's largest-entries walk costs against what an engineer runs by hand.

A tree of small files (--dirs directories of --files files each, 1 to 16 KiB of real data,
three levels deep) in a temp dir; disk-space's walk (tasks.disk.walk_largest: sizes as
`du -a -x` counts them, the 10 largest, no time limit) against `du -a -x DIR | sort -n |
tail` on the same tree, warm cache, rounds alternating. Prints the medians, the ratio, and
the walk's entries per second (what a `scan_seconds` budget reads).

    .venv/bin/python bench/disk_walk.py [--dirs 200] [--files 100] [--rounds 5]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from tasks.disk import walk_largest


def make_tree(root: Path, dirs: int, files: int) -> int:
    """dirs directories (spread over three levels) of `files` files; returns the entry count."""
    count = 0
    for d in range(dirs):
        folder = root / f"a{d % 10}" / f"b{d % 7}" / f"c{d}"
        folder.mkdir(parents=True, exist_ok=True)
        for f in range(files):
            (folder / f"f{f}.log").write_bytes(os.urandom(1024 * (1 + (d * files + f) % 16)))
        count += files
    return count + dirs


def walk(root: Path) -> float:
    start = time.perf_counter()
    result = walk_largest(str(root), depth=64, budget_seconds=3600, top=10)
    seconds = time.perf_counter() - start
    assert result.cut_short is None and len(result.entries) == 10, result
    return seconds


def du(root: Path) -> float:
    """`du -a -x ROOT | sort -n`, then its last 10 lines (tail)."""
    start = time.perf_counter()
    sizes = subprocess.Popen(["du", "-a", "-x", str(root)], stdout=subprocess.PIPE)
    ordered = subprocess.run(["sort", "-n"], stdin=sizes.stdout, capture_output=True, check=True)
    assert sizes.wait() == 0
    top = ordered.stdout.splitlines()[-10:]
    seconds = time.perf_counter() - start
    assert len(top) == 10
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dirs", type=int, default=200)
    parser.add_argument("--files", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="runbook-bench-walk-"))
    try:
        entries = make_tree(root, args.dirs, args.files)
        walk(root), du(root)  # warm the cache for both
        ours, theirs = [], []
        for _ in range(args.rounds):
            ours.append(walk(root))
            theirs.append(du(root))
        a, b = statistics.median(ours), statistics.median(theirs)
        print(f"tree: {entries} entries under {root}")
        print(f"du -a -x | sort -n | tail   median {b * 1000:8.1f} ms   x1.00")
        print(f"disk-space walk_largest     median {a * 1000:8.1f} ms   x{a / b:.2f}")
        rate = entries / a
        print(f"walk rate: {rate:,.0f} entries/s (scan_seconds 20: about {20 * rate:,.0f})")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
