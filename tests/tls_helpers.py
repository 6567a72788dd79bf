"""ACME for the tests: Pebble and an nginx config serving certbot's live/ files."""

from __future__ import annotations

import ssl
from pathlib import Path

from deployments.localtls import CA, Servers

__all__ = ["CA", "NGINX_CONF", "Pebble", "Servers"]


class Pebble:
    """Let's Encrypt's test ACME server on loopback, certificates valid `validity` seconds.
    PEBBLE_VA_ALWAYS_VALID: challenges pass without reaching a web server (no DNS here)."""

    def __init__(self, tmp: Path, listener: CA, validity: int) -> None:
        import json
        import os
        import subprocess

        from deployments.localpg import free_port

        self.port, self.management = free_port(), free_port()
        config = tmp / f"pebble-{self.port}.json"
        cert, key = listener.issue(f"pebble-{self.port}", ["localhost"], days=30)
        config.write_text(
            json.dumps(
                {
                    "pebble": {
                        "listenAddress": f"127.0.0.1:{self.port}",
                        "managementListenAddress": f"127.0.0.1:{self.management}",
                        "certificate": str(cert),
                        "privateKey": str(key),
                        "httpPort": free_port(),
                        "tlsPort": free_port(),
                        "ocspResponderURL": "",
                        "externalAccountBindingRequired": False,
                        "certificateValidityPeriod": validity,
                    }
                }
            )
        )
        env = {
            **os.environ,
            "PEBBLE_VA_ALWAYS_VALID": "1",
            "PEBBLE_WFE_NONCEREJECT": "0",
            "PEBBLE_VA_NOSLEEP": "1",
        }
        self.log = (tmp / f"pebble-{self.port}.log").open("wb")
        self.proc = subprocess.Popen(
            ["pebble", "-config", str(config)], env=env, stdout=self.log, stderr=subprocess.STDOUT
        )
        self.listener = listener
        self.directory = f"https://127.0.0.1:{self.port}/dir"

    def root(self) -> bytes:
        """Pebble makes a new root at every start: fetch it once it answers."""
        import time

        import httpx

        deadline = time.monotonic() + 20
        while True:
            try:
                return httpx.get(
                    f"https://127.0.0.1:{self.management}/roots/0",
                    verify=ssl.create_default_context(cafile=self.listener.pem),
                    timeout=2,
                ).content
            except httpx.HTTPError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise
                time.sleep(0.2)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        self.log.close()


NGINX_CONF = """\
user root;
daemon on;
pid {d}/nginx.pid;
error_log {d}/error.log;
events {{ worker_connections 64; }}
http {{
  access_log off;
  client_body_temp_path {d}/tmp; proxy_temp_path {d}/tmp; fastcgi_temp_path {d}/tmp;
  uwsgi_temp_path {d}/tmp; scgi_temp_path {d}/tmp;
  server {{
    listen 127.0.0.1:{port} ssl;
    server_name {name};
    ssl_certificate {live}/fullchain.pem;
    ssl_certificate_key {live}/privkey.pem;
    location / {{ return 200 "ok"; }}
  }}
}}
"""
