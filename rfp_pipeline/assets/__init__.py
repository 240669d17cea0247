"""Assets by stage: ingest -> structure pairing / training -> evaluation (one partition per experiment)."""

from rfp_pipeline.assets.evaluation import evaluation_samples
from rfp_pipeline.assets.ingest import experiment_config, frame_store, media_manifest
from rfp_pipeline.assets.reflow import distilled_checkpoint, reflow_checkpoint, reflow_couplings
from rfp_pipeline.assets.structure import structure_embeddings, structure_pairs
from rfp_pipeline.assets.training import codec_checkpoint, saliency_checkpoint, velocity_checkpoint
from rfp_pipeline.assets.translated import translated_media

assets = [
    experiment_config,
    media_manifest,
    frame_store,
    structure_embeddings,
    structure_pairs,
    codec_checkpoint,
    saliency_checkpoint,
    velocity_checkpoint,
    evaluation_samples,
    translated_media,
    # opt-in per experiment ("reflow": {...}); skipped, with the reason, otherwise
    reflow_couplings,
    reflow_checkpoint,
    distilled_checkpoint,
]

__all__ = [
    "assets",
    "codec_checkpoint",
    "distilled_checkpoint",
    "reflow_checkpoint",
    "reflow_couplings",
    "evaluation_samples",
    "experiment_config",
    "frame_store",
    "media_manifest",
    "saliency_checkpoint",
    "structure_embeddings",
    "structure_pairs",
    "translated_media",
    "velocity_checkpoint",
]
