"""`dagster dev` really serves the graph: start it headless, query GraphQL, stop it cleanly."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from stages import STAGES

ROOT = Path(__file__).resolve().parents[1]
EXPECTED = set(STAGES)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def graphql(port: int, query: str) -> dict:
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/graphql",
        data=json.dumps({"query": query}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


@pytest.mark.slow
def test_dagster_dev_serves_the_asset_graph(tmp_path):
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(ROOT / "dagster_home" / "dagster.yaml", home / "dagster.yaml")
    (tmp_path / "experiments").mkdir()  # no experiments: the running sensors find nothing to launch
    port = free_port()
    env = {**os.environ, "DAGSTER_HOME": str(home), "RFP_EXPERIMENTS_DIR": str(tmp_path / "experiments")}
    dagster = Path(sys.executable).parent / "dagster"
    log = open(tmp_path / "dev.log", "w")
    proc = subprocess.Popen(
        [str(dagster), "dev", "-w", "workspace.yaml", "-h", "127.0.0.1", "-p", str(port)],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline, keys, last = time.monotonic() + 240, set(), None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                data = graphql(port, "{ assetNodes { assetKey { path } } }")
                keys = {"/".join(n["assetKey"]["path"]) for n in data["data"]["assetNodes"]}
                if keys:
                    break
            except Exception as exc:  # noqa: BLE001 - not up yet
                last = exc
            time.sleep(2)
        assert proc.poll() is None, f"dagster dev exited early:\n{(tmp_path / 'dev.log').read_text()[-3000:]}"
        assert keys == EXPECTED, f"served {keys} (last error {last})"
        sensors = graphql(
            port,
            '{ sensorsOrError(repositorySelector: {repositoryName: "__repository__", '
            'repositoryLocationName: "rfp_pipeline.definitions"}) { ... on Sensors { results { name '
            "sensorState { status } } } } }",
        )
        states = {s["name"]: s["sensorState"]["status"] for s in sensors["data"]["sensorsOrError"]["results"]}
        assert states == {
            "experiments_sensor": "RUNNING",
            "domain_folders_sensor": "RUNNING",
            "rfp_automation": "RUNNING",
        }
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            code = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            pytest.fail("dagster dev did not stop within 60 s of SIGINT")
        log.close()
    assert code in (0, -signal.SIGINT, 130), (tmp_path / "dev.log").read_text()[-3000:]
    with pytest.raises(OSError):  # nothing listens any more
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:  # webserver, daemon and code server exit with it
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.5)
    else:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("processes of dagster dev outlived it")
