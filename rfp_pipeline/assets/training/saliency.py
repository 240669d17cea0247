"""Phase 1, the saliency classifier: domain 0 vs domain 1, whose latent h(x) weights the velocity loss."""

from pathlib import Path
from typing import Any

import dagster as dg

from rfp_pipeline.assets.training.codec import current_codec
from rfp_pipeline.assets.training.stage import Manifest, TrainingStage, training_asset
from rfp_pipeline.checks import SALIENCY_CHECKS, saliency_checks
from rfp_pipeline.metadata import markdown_image, prune_stage_dirs, skipped, stage_key, write_result
from rfp_pipeline.pipes import TrainingLauncher
from rfp_pipeline.pipes_worker import saliency_stop_figures
from rfp_pipeline.resources import CheckThresholds, MlflowTracking, RfpHome

SALIENCY_CODE_VERSION = "2"  # 2: saliency_state.json records its lineage (older folders cannot be resumed)


def _skip_reason(cfg) -> str | None:
    if cfg.generative:
        return (
            "generative mode (domain0 = random): the velocity trains with plain MSE from noise, "
            "no saliency classifier is needed"
        )
    if not cfg.needs_saliency:
        return (
            f"velocity.loss is '{cfg.velocity.loss}' and velocity.translate_retry_noise is empty: "
            "neither the loss nor the translation uses a saliency classifier"
        )
    return None


@training_asset(
    "saliency",
    SALIENCY_CODE_VERSION,
    "Phase 1: ResNet classifier domain0 vs domain1 (warm-up, then fine-tune) whose latent h(x) "
    "weights the velocity loss; in the codec's latent space when there is one. Skipped in generative mode.",
    check_specs=SALIENCY_CHECKS,
)
def saliency_checkpoint(
    context: dg.AssetExecutionContext,
    experiment_config: dict,
    frame_store: dict,
    codec_checkpoint: dict,
    thresholds: CheckThresholds,
    rfp: RfpHome,
    mlflow_tracking: MlflowTracking,
    training_launcher: TrainingLauncher,
) -> dg.MaterializeResult:
    st = TrainingStage(context, rfp, "saliency", experiment_config)
    cfg, name = st.cfg, st.name
    reason = _skip_reason(cfg)
    if reason is not None:
        context.log.info(f"saliency skipped: {reason}")
        return skipped(
            st.stage_dir,
            reason,
            check_results=saliency_checks(None, 0.0, thresholds, skipped_reason=reason, partition=name),
        )

    import mlflow

    manifest = st.manifest(frame_store)
    codec = current_codec(codec_checkpoint, name, cfg)
    codec_key = codec["key"] if codec else None
    key = stage_key(manifest=manifest.version, spec=st.spec_version, codec=codec_key, code=SALIENCY_CODE_VERSION)
    out_dir = st.out_dir(key)
    with st.mlflow_run(mlflow_tracking, manifest, codec_run_id=(codec or {}).get("mlflow_run_id", "")) as run:
        launched = training_launcher.train_saliency(
            context,
            cfg,
            manifest.path,
            out_dir,
            codec_checkpoint=Path(codec["checkpoint"]) if codec else None,
            **st.launch_args(mlflow_tracking, run),
        )
        res = launched.result
        mlflow.log_metrics({"saliency/final_accuracy": res.accuracy, "saliency/steps": res.steps})
        mlflow.log_artifact(str(res.state_path), "saliency")
        grid = _frames_grid(st, manifest, out_dir / "frames.png")
        if grid is not None:
            mlflow.log_artifact(str(grid), "samples")
        url = mlflow_tracking.run_url(run)
    built_from = {"manifest": manifest.version, "spec": st.spec_version, "codec": codec_key}
    write_result(st.stage_dir, _record(res, key, cfg, run.info.run_id, built_from))
    prune_stage_dirs(st.stage_dir, out_dir)
    return dg.MaterializeResult(
        check_results=saliency_checks(res.accuracy, cfg.saliency.accuracy_threshold, thresholds, partition=name),
        metadata=_metadata(res, cfg, built_from, url, grid, launched.metadata),
    )


def _record(res, key: str, cfg, run_id: str, built_from: dict) -> dict[str, Any]:
    return {
        "skipped": False,
        "checkpoint": str(res.checkpoint),
        "state": str(res.state_path),
        "key": key,
        "accuracy": res.accuracy,
        "threshold": cfg.saliency.accuracy_threshold,
        "steps": res.steps,
        "mlflow_run_id": run_id,
        "built_from": built_from,
    }


def _metadata(res, cfg, built_from: dict, url: str, grid: Path | None, launched: dict) -> dict[str, Any]:
    md = {
        "accuracy": res.accuracy,
        "accuracy_threshold": cfg.saliency.accuracy_threshold,
        "steps": res.steps,
        "backbone_warmed_up": res.warmed_up,
        **saliency_stop_figures(res),
        "checkpoint": dg.MetadataValue.path(str(res.checkpoint)),
        "mlflow_run": dg.MetadataValue.url(url),
        "built_from_manifest": built_from["manifest"],
        "built_from_spec": built_from["spec"],
        "built_from_codec": built_from["codec"] or "identity",
        **launched,
    }
    if grid:
        md["frames"] = markdown_image(grid, "training frames: domain 0 above, domain 1 below")
    return md


def _frames_grid(st: TrainingStage, manifest: Manifest, path: Path) -> Path | None:
    """What the classifier tells apart: a row of domain-0 frames above a row of domain-1 frames."""
    import torch

    from rfp_core.media.datasets import FrameDataset
    from rfp_core.media.images import save_grid

    store = st.rfp.frame_store(st.cfg.store_max_side)
    try:
        rows = [FrameDataset(manifest.path, store, d, st.cfg.max_size, train_crop=False) for d in (0, 1)]
    except ValueError:
        return None
    n = min(8, *(len(r) for r in rows))
    return save_grid([torch.stack([r[i] for i in range(n)]) for r in rows], path)
