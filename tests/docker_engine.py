"""A real Docker Engine for the tests: dockerd without systemd, in a temp dir, no bridge
network, and a busybox image built offline from Debian's busybox-static."""

from __future__ import annotations

import io
import shutil
import subprocess
import tarfile
import tempfile
import time
from pathlib import Path

import docker
import requests

from deployments.localpg import stop_process

IMAGE = "runbook-busybox:local"
APPLETS = ("sh", "sleep", "httpd", "echo", "cat", "rm", "mkdir", "head", "tr", "dd", "cp")


class DockerEngine:
    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="runbook-docker-"))
        self.socket = f"unix://{self.dir}/docker.sock"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> DockerEngine:
        dockerd = shutil.which("dockerd")
        if dockerd is None:
            raise RuntimeError("no dockerd: apt-get install docker.io busybox-static")
        argv = [
            dockerd,
            "--data-root",
            f"{self.dir}/data",
            "--exec-root",
            f"{self.dir}/exec",
            "-H",
            self.socket,
            "--pidfile",
            f"{self.dir}/dockerd.pid",
            "--iptables=false",
            "--ip6tables=false",
            "--ip-masq=false",
            "--bridge=none",
            "--userland-proxy=false",
        ]
        with (self.dir / "dockerd.log").open("wb") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while True:
            # docker-py leaks the socket of a connect to a path that does not exist yet.
            if not (self.dir / "docker.sock").exists():
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        "dockerd did not start: " + (self.dir / "dockerd.log").read_text()[-2000:]
                    )
                time.sleep(0.1)
                continue
            try:
                client = docker.APIClient(base_url=self.socket, timeout=5, version="1.41")
                try:
                    client.ping()
                finally:
                    client.close()
                break
            except (docker.errors.DockerException, requests.RequestException):
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        "dockerd did not start: " + (self.dir / "dockerd.log").read_text()[-2000:]
                    ) from None
                time.sleep(0.2)
        self.build_image()
        return self

    def client(self) -> docker.DockerClient:
        return docker.DockerClient(base_url=self.socket, timeout=30)

    def build_image(self) -> None:
        """A root filesystem of busybox and its applets, imported as an image: no registry."""
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w") as tar:
            tar.add("/bin/busybox", arcname="bin/busybox")
            for name in APPLETS:
                link = tarfile.TarInfo(f"bin/{name}")
                link.type, link.linkname = tarfile.SYMTYPE, "busybox"
                tar.addfile(link)
            for folder in ("tmp", "www"):
                info = tarfile.TarInfo(folder)
                info.type, info.mode = tarfile.DIRTYPE, 0o1777
                tar.addfile(info)
        client = self.client()
        client.api.import_image_from_data(
            buffer.getvalue(),
            repository=IMAGE.split(":")[0],
            tag="local",
            changes=['CMD ["/bin/sh"]'],
        )
        client.close()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            client = self.client()
            for c in client.containers.list(all=True):
                c.remove(force=True)
            client.close()
            stop_process(self.proc)
        netns = self.dir / "exec" / "netns" / "default"
        if netns.exists():
            subprocess.run(["umount", str(netns)], capture_output=True, check=False)
        shutil.rmtree(self.dir, ignore_errors=True)
