"""Phase 0, the codec: a VAE (or SAE) whose latent space saliency and velocity then work in."""

from pathlib import Path
from typing import Any

import dagster as dg

from rfp_pipeline.assets.training.stage import Manifest, TrainingStage, training_asset
from rfp_pipeline.metadata import markdown_image, previous_result, prune_stage_dirs, skipped, stage_key, write_result
from rfp_pipeline.pipes import TrainingLauncher
from rfp_pipeline.resources import MlflowTracking, RfpHome

CODEC_CODE_VERSION = "1"
IDENTITY = "identity codec: the flow works in pixel space, nothing to train"


def _codec_key(cfg, manifest_version: str) -> str:
    """What the codec is built from: the frames and its own settings, not the flow's."""
    return stage_key(
        manifest=manifest_version,
        codec=cfg.codec.model_dump(mode="json"),
        max_size=cfg.max_size,
        store_max_side=cfg.store_max_side,
        seed=cfg.seed,
        generative=cfg.generative,
        holdout=cfg.saliency.holdout_fraction,
        code=CODEC_CODE_VERSION,
    )


def current_codec(rec: dict, name: str, cfg) -> dict | None:
    """The codec record (the `codec_checkpoint` input) saliency and velocity work through, checked
    against the experiment's codec settings; None in pixel space (Identity)."""
    if cfg.codec.net.type == "Identity":
        return None
    if rec.get("codec_config") != cfg.codec.model_dump(mode="json"):
        raise FileNotFoundError(
            f"the codec of '{name}' was built for another codec config than the experiment now names: "
            f"materialise 'codec_checkpoint' for partition '{name}' first"
        )
    return rec


def _codec_metadata(rec: dict) -> dict[str, Any]:
    md: dict[str, Any] = {
        "codec": rec["codec"],
        "recon_l1": rec["recon_l1"],
        "recon_l1_init": rec["recon_l1_init"],
        "steps": rec["steps"],
        "checkpoint": dg.MetadataValue.path(rec["checkpoint"]),
        "built_from_manifest": rec["built_from"]["manifest"],
    }
    if rec.get("mlflow_url"):
        md["mlflow_run"] = dg.MetadataValue.url(rec["mlflow_url"])
    if rec.get("grid") and Path(rec["grid"]).is_file():
        md["reconstructions"] = markdown_image(Path(rec["grid"]), "held-out frames above, their reconstructions below")
    return md


@training_asset(
    "codec",
    CODEC_CODE_VERSION,
    "Phase 0: the VAE codec (L1 + structure loss + small KL) on frames of both domains; saliency and "
    "velocity then work in its latent space. Materialises at once for the Identity codec (pixel space).",
)
def codec_checkpoint(
    context: dg.AssetExecutionContext,
    experiment_config: dict,
    frame_store: dict,
    rfp: RfpHome,
    mlflow_tracking: MlflowTracking,
    training_launcher: TrainingLauncher,
) -> dg.MaterializeResult:
    st = TrainingStage(context, rfp, "codec", experiment_config)
    cfg = st.cfg
    if cfg.codec.net.type == "Identity":
        context.log.info(IDENTITY)
        return skipped(st.stage_dir, IDENTITY, version="identity")

    import mlflow

    manifest = st.manifest(frame_store)
    key = _codec_key(cfg, manifest.version)
    prev = previous_result(st.stage_dir)
    if prev.get("key") == key and Path(prev.get("checkpoint") or "").is_file():
        # only settings the codec does not read changed (say the flow's learning rate): keep it
        context.log.info(f"codec {key} is current: same frames and codec settings; not retrained")
        return dg.MaterializeResult(
            data_version=dg.DataVersion(key), metadata={**_codec_metadata(prev), "reused": True}
        )
    out_dir = st.out_dir(key)
    with st.mlflow_run(mlflow_tracking, manifest) as run:
        launched = training_launcher.train_codec(
            context, cfg, manifest.path, out_dir, **st.launch_args(mlflow_tracking, run)
        )
        res = launched.result
        grid = _recon_grid(st, manifest, res.checkpoint, out_dir / "reconstructions.png")
        if grid is not None:
            mlflow.log_artifact(str(grid), "samples")
        url = mlflow_tracking.run_url(run)
    rec = {
        "skipped": False,
        "codec": cfg.codec.net.type,
        "codec_config": cfg.codec.model_dump(mode="json"),
        "checkpoint": str(res.checkpoint),
        "key": key,
        "recon_l1": res.recon_l1,
        "recon_l1_init": res.recon_l1_init,
        "steps": res.steps,
        "grid": str(grid) if grid else None,
        "mlflow_run_id": run.info.run_id,
        "mlflow_url": url,
        "built_from": {"manifest": manifest.version},
    }
    write_result(st.stage_dir, rec)
    prune_stage_dirs(st.stage_dir, out_dir)
    return dg.MaterializeResult(
        data_version=dg.DataVersion(key), metadata={**_codec_metadata(rec), "reused": False, **launched.metadata}
    )


def _recon_grid(st: TrainingStage, manifest: Manifest, checkpoint: Path, path: Path) -> Path | None:
    """Held-out frames above their reconstructions: what the latent space keeps."""
    import torch

    from rfp_core.media.datasets import FrameDataset
    from rfp_core.media.images import save_grid
    from rfp_core.train.codec_io import load_codec

    cfg = st.cfg
    store = st.rfp.frame_store(cfg.store_max_side)
    frames = []
    for d in (1,) if cfg.generative else (0, 1):
        try:
            ds = FrameDataset(
                manifest.path, store, d, cfg.max_size, "holdout", cfg.saliency.holdout_fraction, train_crop=False
            )
        except ValueError:
            continue
        frames += [ds[i] for i in range(min(4, len(ds)))]
    if not frames:
        return None
    x = torch.stack(frames)
    codec = load_codec(None, checkpoint)
    with torch.no_grad():
        y = codec.decode(codec.encode(x)).clamp(-1, 1)
    return save_grid([x, y], path)
