"""Stage 2, training: codec (phase 0), saliency classifier (phase 1), velocity flow (phase 2). One MLflow run each.

One module per phase; `stage.py` holds what they share (decorator, set-up, MLflow run). Each asset
takes its upstream records first, then its resources.
"""

from rfp_pipeline.assets.training.codec import codec_checkpoint, current_codec
from rfp_pipeline.assets.training.saliency import saliency_checkpoint
from rfp_pipeline.assets.training.velocity import velocity_checkpoint

__all__ = ["codec_checkpoint", "current_codec", "saliency_checkpoint", "velocity_checkpoint"]
