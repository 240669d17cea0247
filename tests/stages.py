"""The pipeline's assets in graph order, as the tests expect them (kept apart from the product's own list,
so a test that compares the two can fail)."""

STAGES = [
    "experiment_config",
    "media_manifest",
    "frame_store",
    "structure_embeddings",
    "structure_pairs",
    "codec_checkpoint",
    "saliency_checkpoint",
    "velocity_checkpoint",
    "evaluation_samples",
    "translated_media",
    "reflow_couplings",  # the reflow stages: skipped unless an experiment opts in
    "reflow_checkpoint",
    "distilled_checkpoint",
]
