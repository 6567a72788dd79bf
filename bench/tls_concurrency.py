"""tls-certificates' check of many endpoints against a sequential loop over the same ones.

200 local TLS servers (190 answering, 10 that accept connections and never answer) and a
1 s handshake timeout: the concurrent check should take about one timeout, the loop about
the sum of the dead endpoints' timeouts.

    .venv/bin/python bench/tls_concurrency.py [--endpoints 200] [--dead 10] [--timeout 1]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tasks.settings import TlsEndpoint
from tasks.tls import _check, chain_context, read_served_certificates
from tests.tls_helpers import CA, Servers


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--endpoints", type=int, default=200)
    parser.add_argument("--dead", type=int, default=10)
    parser.add_argument("--timeout", type=float, default=1.0)
    args = parser.parse_args()
    servers = Servers()
    with tempfile.TemporaryDirectory() as tmp:
        ca = CA(Path(tmp))
        cert, key = ca.issue("bench", ["app.test"], days=60)
        endpoints = {}
        for i in range(args.endpoints):
            port = servers.never_answers() if i < args.dead else servers.tls(cert, key)
            endpoints[f"e{i}"] = TlsEndpoint(
                host="127.0.0.1", port=port, server_name="app.test", ca_file=str(ca.pem)
            )
        start = time.perf_counter()
        concurrent = read_served_certificates.fn(endpoints, dict.fromkeys(endpoints, args.timeout))
        concurrent_seconds = time.perf_counter() - start
        start = time.perf_counter()
        sequential = [
            asyncio.run(_check(n, ep, chain_context(n, ep), args.timeout))
            for n, ep in endpoints.items()
        ]
        sequential_seconds = time.perf_counter() - start
    servers.close()
    assert sum(c.reachable for c in concurrent) == sum(c.reachable for c in sequential)
    print(f"{args.endpoints} endpoints, {args.dead} dead, handshake timeout {args.timeout:g} s")
    print(f"sequential loop    {sequential_seconds:7.2f} s   1.00x")
    print(
        f"concurrent check   {concurrent_seconds:7.2f} s   "
        f"{concurrent_seconds / sequential_seconds:5.3f}x of "
        f"the loop, {concurrent_seconds / args.timeout:.2f}x one timeout"
    )


if __name__ == "__main__":
    main()
