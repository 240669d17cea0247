"""Assets by stage: ingest -> training -> evaluation (one partition per experiment)."""

from rfp_pipeline.assets.evaluation import evaluation_samples
from rfp_pipeline.assets.ingest import experiment_config, frame_store, media_manifest
from rfp_pipeline.assets.training import saliency_checkpoint, velocity_checkpoint

assets = [experiment_config, media_manifest, frame_store, saliency_checkpoint, velocity_checkpoint, evaluation_samples]

__all__ = ["assets", "evaluation_samples", "experiment_config", "frame_store", "media_manifest",
           "saliency_checkpoint", "velocity_checkpoint"]
