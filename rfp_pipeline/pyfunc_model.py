"""The MLflow pyfunc model: images in, translated images out (MLflow "models from code").

Logged by `velocity_checkpoint` with this file as `python_model` and the velocity checkpoint as
its one artifact, so `mlflow.pyfunc.load_model("models:/<experiment>@champion")` works in any
process that has torch (rfp_core travels with the model as code), and so does
`rfp serve --model models:/<experiment>@champion` (MLflow's scoring server). No Dagster import.

Input, in process (`model.predict(x, params=...)`) or as the JSON body of POST /invocations:
- base64 images: `{"inputs": {"images_b64": ["<base64 PNG or JPEG>", ...]}}`
  (in process: `{"images_b64": [...]}`, a list of str or bytes);
- uint8 RGB arrays: `{"inputs": <nested list (N, H, W, 3) or one (H, W, 3) image>}` (in
  process: a numpy array); `{"instances": ...}` and `{"inputs": {"images": ...}}` work too.
Any H, W: each image is centre-cropped to a square and resized to the model's size S.
Params (`"params": {...}` beside `"inputs"`): `steps` (ODE steps, 0 = the config's),
`reverse` (domain 1 -> 0), `seed` (a generative model: domain0 = random, ignores the pixels and
returns one generated image per input, reproducibly by seed).
Output: uint8 array (N, S, S, 3), in JSON `{"predictions": <nested list>}`; a single image
comes back as a batch of one.

The signature declares the output and the params but no input schema: MLflow's schema check
would refuse a single image (no batch axis) and base64 strings beside arrays, and would quote
the whole array in its error. `predict` checks the input itself, with short messages.
"""

from __future__ import annotations

import base64
import io
import os

import mlflow
import numpy as np
from mlflow.models import ModelSignature
from mlflow.types.schema import ParamSchema, ParamSpec, Schema, TensorSpec

CHECKPOINT = "checkpoint"
SIGNATURE = ModelSignature(
    inputs=None,
    outputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, -1, 3))]),
    params=ParamSchema(
        [ParamSpec("steps", "integer", 0), ParamSpec("reverse", "boolean", False), ParamSpec("seed", "integer", 0)]
    ),
)
INPUT_KEYS = ("images_b64", "images")


def input_example() -> tuple[dict, dict]:
    """(inputs, params) logged with the model: one 8x8 grey PNG, base64, and the default params."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (128, 128, 128)).save(buf, format="PNG")
    return {"images_b64": [base64.b64encode(buf.getvalue()).decode("ascii")]}, {"steps": 0, "reverse": False, "seed": 0}


def _decode_b64(items) -> list[np.ndarray]:
    from rfp_core.media.decode import MediaError, decode_image

    if isinstance(items, (str, bytes)):
        items = [items]
    out = []
    for i, item in enumerate(np.asarray(items, dtype=object).reshape(-1)):
        try:
            raw = base64.b64decode(item, validate=False)
            out.append(np.asarray(decode_image(io.BytesIO(raw))))
        except (MediaError, ValueError, TypeError) as exc:
            raise ValueError(f"images_b64[{i}] is not a base64-encoded PNG or JPEG ({exc})") from None
    return out


def _as_uint8(images) -> list[np.ndarray]:
    a = np.asarray(images)
    if a.dtype.kind in "OUS":  # strings in an array: base64 images
        return _decode_b64(a)
    if a.ndim == 3:  # a single image
        a = a[None]
    if a.ndim != 4 or a.shape[-1] != 3:
        raise ValueError(f"expected RGB images shaped (N, H, W, 3) or one (H, W, 3), got shape {a.shape}")
    if a.dtype != np.uint8:
        # JSON brings integers as int64: accept whole numbers 0..255, refuse the rest
        if a.dtype.kind not in "iuf" or not np.all((a >= 0) & (a <= 255) & (a == np.round(a))):
            raise ValueError(f"expected uint8 pixel values 0..255, got {a.dtype} values in [{a.min()}, {a.max()}]")
        a = a.astype(np.uint8)
    return list(a)


def images_from_input(model_input) -> list[np.ndarray]:
    """Whatever `predict` was given -> a list of (H, W, 3) uint8 arrays (see the module doc)."""
    try:
        import pandas as pd
    except ImportError:  # pragma: no cover - MLflow depends on pandas
        pd = None
    if pd is not None and isinstance(model_input, pd.DataFrame):
        model_input = {c: model_input[c].tolist() for c in model_input.columns}
    if isinstance(model_input, dict):
        unknown = sorted(set(model_input) - set(INPUT_KEYS))
        if unknown or not model_input:
            raise ValueError(
                f"input keys {unknown or '(none)'} not understood; send 'images_b64' (base64 PNG/JPEG strings) "
                "or 'images' (uint8 arrays (N, H, W, 3))"
            )
        images = _decode_b64(model_input["images_b64"]) if "images_b64" in model_input else []
        return images + (_as_uint8(model_input["images"]) if "images" in model_input else [])
    if isinstance(model_input, (str, bytes)):
        return _decode_b64(model_input)
    return _as_uint8(model_input)


class TranslatorModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        from rfp_core.inference.translate import Translator

        self.translator = Translator.from_run(
            context.artifacts[CHECKPOINT], device=os.environ.get("RFP_DEVICE") or None
        )

    def predict(self, context, model_input, params: dict | None = None) -> np.ndarray:
        import torch
        from PIL import Image

        from rfp_core.media.images import center_square, to_tensor

        params = params or {}
        steps = int(params.get("steps") or 0) or None
        images = images_from_input(model_input)
        if not images:
            raise ValueError("no images in the input")
        tr = self.translator
        if tr.generative:
            out = tr.generate(len(images), seed=int(params.get("seed") or 0), steps=steps)
        else:
            x = torch.stack(
                [to_tensor(center_square(Image.fromarray(np.ascontiguousarray(im)), tr.size)) for im in images]
            )
            out = torch.cat(
                [tr.translate(b, steps=steps, reverse=bool(params.get("reverse", False))) for b in x.split(32)]
            )
        out = ((out.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        return out.permute(0, 2, 3, 1).numpy()


mlflow.models.set_model(TranslatorModel())
