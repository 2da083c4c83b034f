"""A real S3-compatible server for tests: moto's standalone server on a free loopback port, stopped by its PID."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class MotoServer:
    """``host``: the address it listens on (loopback; the multi-host cluster's gateway for jobs on its hosts)."""

    def __init__(self, log_dir: Path, host: str = "127.0.0.1"):
        self.port = free_port(host)
        self.endpoint = f"http://{host}:{self.port}"
        self.log_path = log_dir / "moto.log"
        moto_server = Path(sys.executable).with_name("moto_server")
        self._log = open(self.log_path, "wb")
        self.process = subprocess.Popen([str(moto_server), "-H", host, "-p", str(self.port)],
                                        stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(self.endpoint, timeout=1).close()
                break
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"moto_server did not start; log: {self.log_path.read_text()[-2000:]}")
                time.sleep(0.1)

    @property
    def env(self) -> dict[str, str]:
        """What a process needs to reach the server through s3fs/botocore (no storage options in code)."""
        return {**CREDENTIALS, "AWS_ENDPOINT_URL_S3": self.endpoint}

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self._log.close()


@contextlib.contextmanager
def s3_environment(endpoint: str | None = None):
    """For benchmarks: use ``endpoint`` (credentials from the environment) or start moto on loopback for the
    duration, exporting its endpoint and test credentials to this process."""
    if endpoint:
        os.environ["AWS_ENDPOINT_URL_S3"] = endpoint
        yield
        return
    with tempfile.TemporaryDirectory() as log_dir:
        server = MotoServer(Path(log_dir))
        os.environ.update(server.env)
        try:
            yield
        finally:
            server.stop()
