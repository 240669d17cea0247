"""Servers for the scale suite: a private PostgreSQL (scripts/pg_server.sh) and an MLflow tracking
server on it, each started on a free loopback port and always stopped, also when a test fails."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Iterator

ROOT = Path(__file__).resolve().parents[1]
PG_SCRIPT = ROOT / "scripts" / "pg_server.sh"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def postgres(*databases: str) -> Iterator[str]:
    """A private server with `databases`; yields its base URL postgresql://rfp@127.0.0.1:PORT."""
    # not under pytest's tmp_path: as root the server runs as another user, who cannot enter /tmp/pytest-of-root
    folder = tempfile.mkdtemp(prefix="rfp-pg-")
    port = free_port()
    try:
        done = subprocess.run(
            ["bash", str(PG_SCRIPT), "start", folder, str(port), *databases],
            capture_output=True,
            text=True,
            timeout=900,
        )
        if done.returncode != 0:
            raise RuntimeError(f"{PG_SCRIPT.name} start failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
        yield done.stdout.strip().splitlines()[-1]
    finally:
        subprocess.run(["bash", str(PG_SCRIPT), "stop", folder], capture_output=True, timeout=120)
        shutil.rmtree(folder, ignore_errors=True)


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=5) as resp:
            return resp.status == 200
    except OSError:
        return False


@contextlib.contextmanager
def mlflow_server(backend_uri: str, artifacts: Path, log: Path) -> Iterator[str]:
    """`mlflow server` on `backend_uri`, artifacts proxied into `artifacts`; yields http://127.0.0.1:PORT."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    mlflow = Path(sys.executable).parent / "mlflow"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [
                str(mlflow),
                "server",
                "--backend-store-uri",
                backend_uri,
                "--artifacts-destination",
                str(artifacts),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--workers",
                "1",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            # no background job consumer (trace archival and the like): it would only take CPU here
            env={**os.environ, "MLFLOW_TRACKING_URI": "", "MLFLOW_SERVER_JOB_ENABLE_PERIODIC_TASKS": "false"},
        )
    try:
        deadline = time.monotonic() + 300  # the first start migrates the empty database
        while not _healthy(url):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"mlflow server did not come up on {url}:\n{log.read_text()[-3000:]}")
            time.sleep(1)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
