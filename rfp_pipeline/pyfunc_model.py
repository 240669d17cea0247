"""The MLflow pyfunc model: images in, translated images out (MLflow "models from code").

Logged by `velocity_checkpoint` with this file as `python_model` and the velocity checkpoint as
its one artifact, so `mlflow.pyfunc.load_model("models:/<experiment>/<version>")` works in
any process that has torch (rfp_core travels with the model as code). No Dagster import here.

Input: uint8 array (N, H, W, 3) of RGB images (any H, W: each is centre-cropped and resized to
the model's size). Output: uint8 array (N, S, S, 3). Params: `steps` (ODE steps, 0 = the
config's), `reverse` (domain 1 -> 0). A generative model (domain0 = random) ignores the pixels
and returns N generated images, `seed` making them reproducible.
"""

from __future__ import annotations

import os

import mlflow
import numpy as np
from mlflow.models import ModelSignature
from mlflow.types.schema import ParamSchema, ParamSpec, Schema, TensorSpec

CHECKPOINT = "checkpoint"
SIGNATURE = ModelSignature(
    inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, -1, 3))]),
    outputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, -1, 3))]),
    params=ParamSchema([ParamSpec("steps", "integer", 0), ParamSpec("reverse", "boolean", False), ParamSpec("seed", "integer", 0)]),
)


class TranslatorModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        from rfp_core.translate import Translator

        self.translator = Translator.from_run(context.artifacts[CHECKPOINT], device=os.environ.get("RFP_DEVICE") or None)

    def predict(self, context, model_input: np.ndarray, params: dict | None = None) -> np.ndarray:
        import torch
        from PIL import Image

        from rfp_core.images import center_square, to_tensor

        params = params or {}
        steps = int(params.get("steps") or 0) or None
        images = np.asarray(model_input)
        if images.ndim == 3:  # a single image
            images = images[None]
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"expected uint8 images shaped (N, H, W, 3), got shape {images.shape}")
        tr = self.translator
        if tr.generative:
            out = tr.generate(len(images), seed=int(params.get("seed") or 0), steps=steps)
        else:
            x = torch.stack([to_tensor(center_square(Image.fromarray(np.ascontiguousarray(im)), tr.size)) for im in images])
            out = torch.cat([tr.translate(b, steps=steps, reverse=bool(params.get("reverse", False))) for b in x.split(32)])
        out = ((out.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        return out.permute(0, 2, 3, 1).numpy()


mlflow.models.set_model(TranslatorModel())
