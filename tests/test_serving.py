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
import torch
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


def _uint8(y) -> np.ndarray:
    return ((y.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def test_a_version_logged_with_a_distilled_map_serves_steps_1_with_it_and_says_so(tmp_path, capfd):
    import mlflow
    from test_translate import _run

    from rfp_core.checkpoint import load_checkpoint, save_checkpoint
    from rfp_core.flow.reflow import Solver
    from rfp_core.inference.translate import Translator
    from rfp_core.media.frame_store import FrameStore
    from rfp_core.train.reflow_run import RunPaths, reflow_run
    from rfp_pipeline.resources import MlflowTracking

    run = _run(tmp_path / "train", generative=False)
    paths = RunPaths(run / "velocity.pt", tmp_path / "train" / "m.parquet", run, store=FrameStore(max_side=64))
    res = reflow_run(paths, rounds=0, pairs=4, distill=True, solver=Solver("euler", 2), train_steps=2, progress=False)
    # two training steps barely move the map: shift its output so which model answered is plain to see
    ckpt = load_checkpoint(res.distilled)
    last_bias = [k for k in ckpt["velocity"] if k.endswith("bias")][-1]
    ckpt["velocity"][last_bias] += 0.5
    save_checkpoint(res.distilled, ckpt)
    tracking = MlflowTracking()
    with tracking.start_run("tiny", "velocity tiny", {}):
        _, plain = tracking.log_translator(run / "velocity.pt", registered_name="tiny")
        _, both = tracking.log_translator(run / "velocity.pt", registered_name="tiny", distilled=res.distilled)
    imgs = _images(2, 32, 32)
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 127.5 - 1
    flow = Translator.from_run(run, device="cpu")
    one_step = _uint8(Translator.from_run(res.distilled, device="cpu").translate(x, steps=1))
    close = lambda a, b: np.abs(a.astype(int) - b.astype(int)).max() <= 1  # noqa: E731 - resampling rounding
    assert not close(one_step, _uint8(flow.translate(x, steps=1)))

    model = mlflow.pyfunc.load_model(f"models:/tiny/{both}")
    capfd.readouterr()
    assert close(model.predict(imgs, params={"steps": 1}), one_step)
    assert "model: distilled (one-step map), steps 1" in capfd.readouterr().err
    assert model.unwrap_python_model().last_model.startswith("distilled")
    # reverse, and more steps: the flow (the map was fitted z0 -> z1 only)
    assert close(model.predict(imgs, params={"steps": 1, "reverse": True}), _uint8(flow.translate(x, 1, reverse=True)))
    assert close(model.predict(imgs, params={"steps": 3}), _uint8(flow.translate(x, steps=3)))
    assert capfd.readouterr().err.count("model: velocity (1-RF flow)") == 2
    # a version without the distilled artifact answers steps 1 with the flow
    assert close(
        mlflow.pyfunc.load_model(f"models:/tiny/{plain}").predict(imgs, params={"steps": 1}),
        _uint8(flow.translate(x, 1)),
    )


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
