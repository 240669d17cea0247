"""A tiny demo state and the two UIs on it, for the screenshot test (tests/test_ui_screens.py).

`build_state` materialises one tiny experiment (16 px, a few steps: a minute on 2 cores, never
the full demo) into a real Dagster instance and MLflow sqlite store; `serve` starts
`dagster-webserver` and `mlflow ui` on free loopback ports (not 3000 / 5000) and waits until both
answer. Headless Chromium comes from the OS (`make ui-browser`) and is driven through its
chromedriver with Selenium.
"""

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
import urllib.request
from pathlib import Path
from typing import Iterator

ROOT = Path(__file__).resolve().parents[1]
NAME = "tiny"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def environment(base: Path, mlflow_port: int) -> dict[str, str]:
    home = base / "rfp_home"
    return {
        "DAGSTER_HOME": str(base / "dagster_home"),
        "RFP_HOME": str(home),
        "RFP_PROJECT_ROOT": str(base / "project"),
        "RFP_EXPERIMENTS_DIR": str(base / "project" / "experiments"),
        "RFP_DEVICE": "cpu",
        "MLFLOW_TRACKING_URI": f"sqlite:///{home}/mlflow.db",
        "MLFLOW_UI_URL": f"http://127.0.0.1:{mlflow_port}",
        "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "0.1",  # 10 s (even 1 s) can miss a tiny training
        "DAGSTER_DISABLE_TELEMETRY": "1",
        "HF_HUB_OFFLINE": "1",
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    }


def build_state(base: Path, env: dict[str, str]):
    """The tiny experiment materialised end to end; returns the run result."""
    import dagster as dg
    from test_pipeline import RUN_CONFIG, TINY, TINY_OVERRIDES

    from rfp_core.media.demo_data import make_demo_data
    from rfp_pipeline.assets import assets
    from rfp_pipeline.definitions import default_resources
    from rfp_pipeline.partitions import EXPERIMENTS
    from rfp_pipeline.resources import CheckThresholds

    # the demo's pictures (shapes on grey, stripes in domain 1) and its layout, few and small
    project = base / "project"
    make_demo_data(project / "demo_data", num=16, size=24, video_frames=4)
    (project / "experiments").mkdir(parents=True, exist_ok=True)
    Path(env["DAGSTER_HOME"]).mkdir(parents=True, exist_ok=True)
    shutil.copy(ROOT / "dagster_home" / "dagster.yaml", Path(env["DAGSTER_HOME"]) / "dagster.yaml")
    os.environ.update(env)  # the resources read their environment fallbacks at run time
    resources = {**default_resources(), "thresholds": CheckThresholds(min_transfer_rate=0.0, min_mask_iou=0.0)}
    instance = dg.DagsterInstance.from_config(env["DAGSTER_HOME"])
    instance.add_dynamic_partitions(EXPERIMENTS, [NAME])
    # trained twice, the second time with another learning rate: two velocity runs to compare
    for lr in (0.001, 0.003):
        overrides = {**TINY_OVERRIDES, "velocity": {**TINY_OVERRIDES["velocity"], "learning_rate": lr}}
        (project / "experiments" / f"{NAME}.json").write_text(
            json.dumps(
                {
                    "domain0": ["demo_data/domain0"],
                    "domain1": ["demo_data/domain1"],
                    "masks": "demo_data/masks/domain0",
                    "config": str(TINY),
                    "overrides": overrides,
                    "translate": ["demo_data/domain0/clip.mp4"],
                }
            )
        )
        result = dg.materialize(
            assets,
            instance=instance,
            resources=resources,
            partition_key=NAME,
            run_config=RUN_CONFIG,
            raise_on_error=False,
        )
        if not result.success:
            break
    instance.dispose()
    return result


def _wait(url: str, proc: subprocess.Popen, log: Path, seconds: float = 240) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5):
                return
        except OSError:
            time.sleep(1)
    raise TimeoutError(f"{url} did not answer within {seconds} s:\n{log.read_text()[-3000:]}")


def _stop(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGINT)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@contextlib.contextmanager
def serve(base: Path, env: dict[str, str], dagster_port: int, mlflow_port: int) -> Iterator[None]:
    """dagster-webserver (the UI without the daemon: no sensor launches runs behind the test's back)
    and `mlflow ui`, both on loopback, stopped on exit."""
    bin_dir = Path(sys.executable).parent
    full_env = {**os.environ, **env}
    logs = {name: base / f"{name}.log" for name in ("dagster", "mlflow")}
    cmds = {
        "dagster": [
            str(bin_dir / "dagster-webserver"),
            "-w",
            str(ROOT / "workspace.yaml"),
            "-h",
            "127.0.0.1",
            "-p",
            str(dagster_port),
        ],
        "mlflow": [
            str(bin_dir / "mlflow"),
            "ui",
            "--backend-store-uri",
            env["MLFLOW_TRACKING_URI"],
            "--host",
            "127.0.0.1",
            "--port",
            str(mlflow_port),
            "--workers",
            "1",
        ],
    }
    procs = {}
    try:
        for name, cmd in cmds.items():
            procs[name] = subprocess.Popen(
                cmd,
                cwd=ROOT,
                env=full_env,
                stdout=logs[name].open("w"),
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        _wait(f"http://127.0.0.1:{dagster_port}/server_info", procs["dagster"], logs["dagster"])
        _wait(f"http://127.0.0.1:{mlflow_port}/health", procs["mlflow"], logs["mlflow"])
        yield
    finally:
        for proc in procs.values():
            _stop(proc)


def graphql(port: int, query: str, variables: dict | None = None) -> dict:
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/graphql",
        data=json.dumps({"query": query, "variables": variables or {}}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=30) as resp:
        out = json.loads(resp.read())
    if out.get("errors"):
        raise AssertionError(f"GraphQL errors: {out['errors']}")
    return out["data"]


def browser(width: int = 1400, height: int = 900):
    """Headless Chromium through the OS's chromedriver (no driver download)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        f"--window-size={width},{height}",
        "--hide-scrollbars",
    ):
        opts.add_argument(arg)
    return webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=opts)


def save_small(png: bytes, path: Path, width: int = 900) -> Path:
    """A screenshot scaled to `width` px (README pictures stay small)."""
    import io

    from PIL import Image

    img = Image.open(io.BytesIO(png)).convert("RGB")
    if img.width > width:
        img = img.resize((width, round(img.height * width / img.width)), Image.Resampling.LANCZOS)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format="PNG", optimize=True)
    return path
