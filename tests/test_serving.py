"""The pyfunc translator's input handling, its logged signature and example, the `champion`
alias, and (slow) `rfp serve` answering POST /invocations like the in-process model."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from rfp_pipeline.pyfunc_model import TranslatorModel, images_from_input

ROOT = Path(__file__).resolve().parents[1]


def _png_b64(a: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _images(n: int, h: int = 24, w: int = 20) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def _standin_model(size: int = 16) -> TranslatorModel:
    model = TranslatorModel()
    # a deterministic stand-in translator: mirror, darker when reversed
    model.translator = SimpleNamespace(
        size=size, generative=False, translate=lambda x, steps, reverse: x.flip(-1) * (0.5 if reverse else 1.0)
    )
    return model


def test_single_image_batch_and_base64_give_the_same_translation():
    model, imgs = _standin_model(), _images(3)
    batch = model.predict(None, imgs)
    assert batch.shape == (3, 16, 16, 3) and batch.dtype == np.uint8
    single = model.predict(None, imgs[1])  # no batch axis
    assert single.shape == (1, 16, 16, 3) and np.array_equal(single[0], batch[1])
    b64 = model.predict(None, {"images_b64": [_png_b64(im) for im in imgs]})
    assert np.array_equal(b64, batch)
    as_json = model.predict(None, imgs.astype(np.int64))  # what a JSON body's nested list becomes
    assert np.array_equal(as_json, batch)
    assert np.array_equal(model.predict(None, {"images": imgs[:1], "images_b64": [_png_b64(imgs[2])]}), batch[[2, 0]])
    rev = model.predict(None, imgs, params={"reverse": True})
    assert not np.array_equal(rev, batch)
    # the stand-in mirrors: output = mirrored centre crop of the input
    crop = np.asarray(Image.fromarray(imgs[0]).crop((0, 2, 20, 22)).resize((16, 16), Image.Resampling.LANCZOS))
    assert np.abs(batch[0].astype(int) - crop[:, ::-1].astype(int)).max() <= 1


@pytest.mark.parametrize(
    "bad, match",
    [
        (np.zeros((2, 8, 8, 4), np.uint8), r"\(N, H, W, 3\).*shape \(2, 8, 8, 4\)"),
        (np.full((1, 8, 8, 3), 300), r"uint8 pixel values 0\.\.255"),
        ({"pixels": [1]}, r"'pixels'.*images_b64"),
        ({"images_b64": ["bm90IGFuIGltYWdl"]}, r"images_b64\[0\] is not a base64-encoded PNG"),
    ],
)
def test_bad_input_is_refused_in_one_short_line(bad, match):
    with pytest.raises(ValueError, match=match) as err:
        _standin_model().predict(None, bad)
    assert len(str(err.value)) < 300 and "\n" not in str(err.value)


def test_images_from_input_reads_a_dataframe_column():
    import pandas as pd

    imgs = _images(2)
    got = images_from_input(pd.DataFrame({"images_b64": [_png_b64(im) for im in imgs]}))
    assert [g.shape for g in got] == [(24, 20, 3)] * 2 and np.array_equal(got[1], imgs[1])


def _logged_model(tmp_path: Path, name: str = "tiny") -> tuple[str, str]:
    """Train a tiny run and log + register it the way `velocity_checkpoint` does: (uri, version)."""
    from test_translate import _run

    from rfp_pipeline.resources import MlflowTracking

    run = _run(tmp_path / "train", generative=False)
    tracking = MlflowTracking()
    with tracking.start_run(name, f"velocity {name}", {}):
        _, version = tracking.log_translator(run / "velocity.pt", registered_name=name)
    return f"models:/{name}/{version}", version


def test_logged_model_has_example_and_signature_and_champion_alias_follows_checks(tmp_path):
    import dagster as dg
    import mlflow

    from rfp_pipeline.assets.evaluation import promote_champion
    from rfp_pipeline.resources import MlflowTracking

    uri, version = _logged_model(tmp_path)
    local = Path(mlflow.artifacts.download_artifacts(uri))
    example = json.loads((local / "serving_input_example.json").read_text())
    assert set(example) == {"inputs", "params"} and list(example["inputs"]) == ["images_b64"]
    model = mlflow.pyfunc.load_model(uri)
    assert [p.name for p in model.metadata.get_params_schema().params] == ["steps", "reverse", "seed"]
    imgs = _images(2, 40, 32)
    arr = model.predict(imgs, params={"steps": 2})
    assert arr.shape == (2, 32, 32, 3)
    assert np.array_equal(model.predict({"images_b64": [_png_b64(im) for im in imgs]}, params={"steps": 2}), arr)
    assert np.array_equal(model.predict(imgs[0], params={"steps": 2})[0], arr[0])

    tracking, log = MlflowTracking(), SimpleNamespace(info=lambda msg: None)
    ok = [dg.AssetCheckResult(check_name="transfer_rate", passed=True)]
    bad = [
        dg.AssetCheckResult(check_name="transfer_rate", passed=True),
        dg.AssetCheckResult(check_name="mask_iou", passed=False),
    ]
    client = tracking.client()
    assert "mask_iou" in promote_champion(tracking, "tiny", version, bad, log)["champion"]
    assert client.get_registered_model("tiny").aliases == {}
    promote_champion(tracking, "tiny", version, ok, log)
    assert str(client.get_model_version_by_alias("tiny", "champion").version) == version
    with tracking.start_run("tiny", "velocity tiny 2", {}):  # a second version that fails its checks
        v2 = tracking.log_translator(
            Path(mlflow.artifacts.download_artifacts(uri)) / "artifacts" / "velocity.pt", registered_name="tiny"
        )[1]
    promote_champion(tracking, "tiny", v2, bad, log)
    assert v2 != version and str(client.get_model_version_by_alias("tiny", "champion").version) == version


def test_serve_names_a_missing_alias(tmp_path, capsys):
    from rfp_core.cli import main

    assert main(["serve", "--model", "models:/nothing@champion", "--port", "1"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "models:/nothing@champion does not resolve" in errors[0]
    assert "set_registered_model_alias" in errors[0]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(port: int, body: dict) -> np.ndarray:
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/invocations",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=120) as resp:
        return np.asarray(json.loads(resp.read())["predictions"], dtype=np.uint8)


@pytest.mark.slow
def test_rfp_serve_answers_like_the_in_process_model(tmp_path):
    import mlflow

    from rfp_pipeline.assets.evaluation import promote_champion
    from rfp_pipeline.resources import MlflowTracking

    uri, version = _logged_model(tmp_path, "served")
    import dagster as dg

    promote_champion(
        MlflowTracking(),
        "served",
        version,
        [dg.AssetCheckResult(check_name="x", passed=True)],
        SimpleNamespace(info=print),
    )
    port = _free_port()
    # PATH without the venv: `rfp serve` must put it there itself
    env = {**os.environ, "PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "rfp_core.cli", "serve", "--model", "models:/served@champion", "--port", str(port)],
        env=env,
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "server did not come up in 180 s"
            time.sleep(1)
        imgs = _images(3, 40, 32)
        params = {"steps": 2, "reverse": False, "seed": 0}
        single = _post(port, {"inputs": imgs[0].tolist(), "params": params})
        batch = _post(port, {"inputs": {"images_b64": [_png_b64(im) for im in imgs]}, "params": params})
        batch_rev = _post(port, {"instances": imgs.tolist(), "params": {**params, "reverse": True}})
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the server's own process group, started above
        proc.wait(timeout=30)
    model = mlflow.pyfunc.load_model("models:/served@champion")
    expect = model.predict(imgs, params=params)
    assert single.shape == (1, 32, 32, 3) and np.array_equal(single[0], expect[0])
    assert np.array_equal(batch, expect)
    assert np.array_equal(batch_rev, model.predict(imgs, params={**params, "reverse": True}))
    assert not np.array_equal(batch_rev, expect)
