"""Stage 2, training: codec (phase 0), saliency classifier (phase 1), velocity flow (phase 2). One MLflow run each.

Each training materialisation writes into `$RFP_HOME/pipeline/<exp>/<stage>/<key>/`, `key` a
digest of what it is built from: a Dagster retry (same inputs) resumes there, new inputs start
afresh. `<stage>/result.json` points at the current one; older keys beyond the last two are pruned.
"""

import contextlib
import sqlite3
from pathlib import Path
from typing import Any, Iterator

import dagster as dg

from rfp_core import experiments as exps
from rfp_core.media.manifest import content_version
from rfp_pipeline.assets.ingest import experiment_config, frame_store, load_spec
from rfp_pipeline.assets.structure import current_pairs
from rfp_pipeline.automation import on_retrain_cron
from rfp_pipeline.checks import (
    SALIENCY_CHECKS,
    VELOCITY_CHECKS,
    non_finite_loss_check,
    saliency_checks,
    velocity_checks,
)
from rfp_pipeline.metadata import (
    markdown_image,
    previous_result,
    prune_stage_dirs,
    run_tags,
    skipped,
    stage_key,
    write_result,
)
from rfp_pipeline.partitions import experiments_partitions
from rfp_pipeline.pipes import TrainingLauncher
from rfp_pipeline.resources import CheckThresholds, MlflowTracking, RfpHome
from rfp_pipeline.stage_records import STAGE, STAGE_RECORDS

GROUP = "training"
CODEC_CODE_VERSION = "1"
SALIENCY_CODE_VERSION = "2"  # 2: saliency_state.json records its lineage (older folders cannot be resumed)
VELOCITY_CODE_VERSION = "2"  # 2: checkpoints carry their lineage; a NaN loss fails loss_finite
IDENTITY = "identity codec: the flow works in pixel space, nothing to train"


def _locked_db(exc: BaseException | None) -> bool:
    # MLflow wraps sqlalchemy, which wraps sqlite3: look down the chain
    while exc is not None:
        if isinstance(exc, sqlite3.OperationalError) or "database is locked" in str(exc):
            return "locked" in str(exc)
        exc = exc.__cause__ or exc.__context__
    return False


@contextlib.contextmanager
def transient_retry() -> Iterator[None]:
    """Out of GPU memory (another process on the card) or a locked sqlite tracking store: retry
    later, resuming from the stage folder. Everything else (bad data, an unreachable threshold)
    fails at once with its own message: retrying would only repeat it."""
    import torch

    try:
        yield
    except torch.OutOfMemoryError as exc:
        raise dg.RetryRequested(max_retries=2, seconds_to_wait=60) from exc
    except Exception as exc:
        if not _locked_db(exc):
            raise
        raise dg.RetryRequested(max_retries=3, seconds_to_wait=10) from exc


def _mlflow_logger(mlflow_mod):
    def log(metrics: dict[str, float], step: int) -> None:
        mlflow_mod.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)

    return log


def _log_config(mlflow_mod, spec: dict, cfg) -> None:
    mlflow_mod.log_params(cfg.flat_params())
    mlflow_mod.log_dict(spec, "config/experiment.json")
    mlflow_mod.log_text(cfg.to_json(), "config/model_config.json")


def _skip_reason(cfg) -> str | None:
    if cfg.generative:
        return (
            "generative mode (domain0 = random): the velocity trains with plain MSE from noise, "
            "no saliency classifier is needed"
        )
    if cfg.velocity.loss != "saliency":
        return f"velocity.loss is '{cfg.velocity.loss}': the velocity loss does not use a saliency classifier"
    return None


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


@dg.asset(
    partitions_def=experiments_partitions,
    deps=[frame_store, experiment_config],
    group_name=GROUP,
    code_version=CODEC_CODE_VERSION,
    kinds={"pytorch", "mlflow"},
    automation_condition=on_retrain_cron(),
    pool="gpu",
    io_manager_key=STAGE_RECORDS,
    metadata={STAGE: "codec"},
    description="Phase 0: the VAE codec (L1 + structure loss + small KL) on frames of both domains; saliency and "
    "velocity then work in its latent space. Materialises at once for the Identity codec (pixel space).",
)
def codec_checkpoint(
    context: dg.AssetExecutionContext,
    rfp: RfpHome,
    mlflow_tracking: MlflowTracking,
    training_launcher: TrainingLauncher,
) -> dg.MaterializeResult:
    name = context.partition_key
    spec = load_spec(rfp, name)
    cfg = exps.model_config(spec)
    stage_dir = rfp.out_dir(name, "codec")
    if cfg.codec.net.type == "Identity":
        context.log.info(IDENTITY)
        return skipped(stage_dir, IDENTITY, version="identity")

    import mlflow

    manifest = rfp.out_dir(name) / "manifest.parquet"
    manifest_version = content_version(manifest)
    key = _codec_key(cfg, manifest_version)
    prev = previous_result(stage_dir)
    if prev.get("key") == key and Path(prev.get("checkpoint") or "").is_file():
        # only settings the codec does not read changed (say the flow's learning rate): keep it
        context.log.info(f"codec {key} is current: same frames and codec settings; not retrained")
        return dg.MaterializeResult(
            data_version=dg.DataVersion(key), metadata={**_codec_metadata(prev), "reused": True}
        )
    out_dir = rfp.out_dir(name, "codec", key)
    tags = run_tags(context, stage="codec", input_data_version=manifest_version, spec_version=exps.spec_digest(spec))
    with (
        transient_retry(),
        mlflow_tracking.start_run(name, f"codec {name}", tags, manifest=(manifest, manifest_version)) as run,
    ):
        _log_config(mlflow, spec, cfg)
        # in this process, or out of it through Dagster Pipes (`training_launcher`, $RFP_TRAINING_LAUNCHER)
        launched = training_launcher.train_codec(
            context,
            cfg,
            manifest,
            out_dir,
            device=rfp.resolve_device(),
            store=rfp.frame_store(cfg.store_max_side),
            log=_mlflow_logger(mlflow),
            mlflow_uri=mlflow_tracking.uri(),
            mlflow_run_id=run.info.run_id,
        )
        res = launched.result
        grid = _recon_grid(rfp, name, cfg, res.checkpoint, out_dir / "reconstructions.png")
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
        "built_from": {"manifest": manifest_version},
    }
    write_result(stage_dir, rec)
    prune_stage_dirs(stage_dir, out_dir)
    return dg.MaterializeResult(
        data_version=dg.DataVersion(key), metadata={**_codec_metadata(rec), "reused": False, **launched.metadata}
    )


def _recon_grid(rfp: RfpHome, name: str, cfg, checkpoint: Path, path: Path) -> Path | None:
    """Held-out frames above their reconstructions: what the latent space keeps."""
    import torch

    from rfp_core.media.datasets import FrameDataset
    from rfp_core.media.images import save_grid
    from rfp_core.train.codec_io import load_codec

    manifest = rfp.out_dir(name) / "manifest.parquet"
    store = rfp.frame_store(cfg.store_max_side)
    frames = []
    for d in (1,) if cfg.generative else (0, 1):
        try:
            ds = FrameDataset(
                manifest, store, d, cfg.max_size, "holdout", cfg.saliency.holdout_fraction, train_crop=False
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


@dg.asset(
    partitions_def=experiments_partitions,
    deps=[frame_store, experiment_config],
    group_name=GROUP,
    code_version=SALIENCY_CODE_VERSION,
    kinds={"pytorch", "mlflow"},
    automation_condition=on_retrain_cron(),
    pool="gpu",
    check_specs=SALIENCY_CHECKS,
    io_manager_key=STAGE_RECORDS,
    metadata={STAGE: "saliency"},
    description="Phase 1: ResNet classifier domain0 vs domain1 (warm-up, then fine-tune) whose latent h(x) "
    "weights the velocity loss; in the codec's latent space when there is one. Skipped in generative mode.",
)
def saliency_checkpoint(
    context: dg.AssetExecutionContext,
    rfp: RfpHome,
    mlflow_tracking: MlflowTracking,
    thresholds: CheckThresholds,
    training_launcher: TrainingLauncher,
    codec_checkpoint: dict,
) -> dg.MaterializeResult:
    name = context.partition_key
    spec = load_spec(rfp, name)
    cfg = exps.model_config(spec)
    stage_dir = rfp.out_dir(name, "saliency")
    reason = _skip_reason(cfg)
    if reason is not None:
        context.log.info(f"saliency skipped: {reason}")
        return skipped(
            stage_dir,
            reason,
            check_results=saliency_checks(None, 0.0, thresholds, skipped_reason=reason, partition=name),
        )

    import mlflow

    manifest = rfp.out_dir(name) / "manifest.parquet"
    manifest_version = content_version(manifest)
    spec_version = exps.spec_digest(spec)
    codec = current_codec(codec_checkpoint, name, cfg)
    codec_key = codec["key"] if codec else None
    key = stage_key(manifest=manifest_version, spec=spec_version, codec=codec_key, code=SALIENCY_CODE_VERSION)
    out_dir = rfp.out_dir(name, "saliency", key)
    store = rfp.frame_store(cfg.store_max_side)
    tags = run_tags(
        context,
        stage="saliency",
        input_data_version=manifest_version,
        spec_version=spec_version,
        codec_run_id=(codec or {}).get("mlflow_run_id", ""),
    )
    with (
        transient_retry(),
        mlflow_tracking.start_run(name, f"saliency {name}", tags, manifest=(manifest, manifest_version)) as run,
    ):
        _log_config(mlflow, spec, cfg)
        # in this process, or out of it through Dagster Pipes (`training_launcher`, $RFP_TRAINING_LAUNCHER)
        launched = training_launcher.train_saliency(
            context,
            cfg,
            manifest,
            out_dir,
            device=rfp.resolve_device(),
            store=store,
            codec_checkpoint=Path(codec["checkpoint"]) if codec else None,
            log=_mlflow_logger(mlflow),
            mlflow_uri=mlflow_tracking.uri(),
            mlflow_run_id=run.info.run_id,
        )
        res = launched.result
        mlflow.log_metrics({"saliency/final_accuracy": res.accuracy, "saliency/steps": res.steps})
        mlflow.log_artifact(str(res.state_path), "saliency")
        grid = _frames_grid(rfp, name, cfg, out_dir / "frames.png")
        if grid is not None:
            mlflow.log_artifact(str(grid), "samples")
        url = mlflow_tracking.run_url(run)
    write_result(
        stage_dir,
        {
            "skipped": False,
            "checkpoint": str(res.checkpoint),
            "state": str(res.state_path),
            "key": key,
            "accuracy": res.accuracy,
            "threshold": cfg.saliency.accuracy_threshold,
            "steps": res.steps,
            "mlflow_run_id": run.info.run_id,
            "built_from": {"manifest": manifest_version, "spec": spec_version, "codec": codec_key},
        },
    )
    prune_stage_dirs(rfp.out_dir(name, "saliency"), out_dir)
    return dg.MaterializeResult(
        check_results=saliency_checks(res.accuracy, cfg.saliency.accuracy_threshold, thresholds, partition=name),
        metadata={
            "accuracy": res.accuracy,
            "accuracy_threshold": cfg.saliency.accuracy_threshold,
            "steps": res.steps,
            "backbone_warmed_up": res.warmed_up,
            # which accuracy met the threshold, the original's smoothed training one, and the held-out
            # figure measured on frames that did not decide the stop (rfp_core/train/saliency_stop.py)
            "stopped_by": res.stopped_by or "",
            **{
                k: v
                for k, v in (("train_accuracy", res.train_accuracy), ("report_accuracy", res.report_accuracy))
                if v is not None
            },
            "checkpoint": dg.MetadataValue.path(str(res.checkpoint)),
            "mlflow_run": dg.MetadataValue.url(url),
            "built_from_manifest": manifest_version,
            "built_from_spec": spec_version,
            "built_from_codec": codec_key or "identity",
            **launched.metadata,
            **({"frames": markdown_image(grid, "training frames: domain 0 above, domain 1 below")} if grid else {}),
        },
    )


def _frames_grid(rfp: RfpHome, name: str, cfg, path: Path) -> Path | None:
    """What the classifier tells apart: a row of domain-0 frames above a row of domain-1 frames."""
    import torch

    from rfp_core.media.datasets import FrameDataset
    from rfp_core.media.images import save_grid

    store = rfp.frame_store(cfg.store_max_side)
    manifest = rfp.out_dir(name) / "manifest.parquet"
    try:
        rows = [FrameDataset(manifest, store, d, cfg.max_size, train_crop=False) for d in (0, 1)]
    except ValueError:
        return None
    n = min(8, *(len(r) for r in rows))
    return save_grid([torch.stack([r[i] for i in range(n)]) for r in rows], path)


@dg.asset(
    partitions_def=experiments_partitions,
    deps=[frame_store, experiment_config],
    group_name=GROUP,
    code_version=VELOCITY_CODE_VERSION,
    kinds={"pytorch", "mlflow"},
    automation_condition=on_retrain_cron(),
    pool="gpu",
    check_specs=VELOCITY_CHECKS,
    io_manager_key=STAGE_RECORDS,
    metadata={STAGE: "velocity"},
    description="Phase 2: the velocity UNet v(x, t), saliency-weighted (plain MSE in generative mode), in the "
    "codec's latent space when there is one, domain-1 partners drawn from the structure pairs when pairing is on. "
    "Logs an MLflow pyfunc translator and registers a model version named after the experiment. Metadata "
    "`final_loss` is the loss of the last optimiser step (one batch: noisy); MLflow's `velocity/loss` is its mean "
    "over each logging window (with the saliency loss also logged apart: `velocity/loss_saliency` + mse_weight x "
    "`velocity/loss_mse`).",
)
def velocity_checkpoint(
    context: dg.AssetExecutionContext,
    rfp: RfpHome,
    mlflow_tracking: MlflowTracking,
    training_launcher: TrainingLauncher,
    codec_checkpoint: dict,
    saliency_checkpoint: dict,
    structure_pairs: dict,
) -> Iterator[dg.AssetCheckResult | dg.MaterializeResult]:
    import math

    import mlflow

    from rfp_core.train.velocity import NonFiniteLoss

    name = context.partition_key
    spec = load_spec(rfp, name)
    cfg = exps.model_config(spec)
    sal = saliency_checkpoint
    saliency_ckpt = None if sal.get("skipped") else Path(sal["checkpoint"])
    manifest = rfp.out_dir(name) / "manifest.parquet"
    manifest_version = content_version(manifest)
    spec_version = exps.spec_digest(spec)
    codec = current_codec(codec_checkpoint, name, cfg)
    codec_key = codec["key"] if codec else None
    paired = current_pairs(structure_pairs, name, cfg)
    pairs_version = paired["version"] if paired else None
    # the pairs' content enters the key: re-pairing trains afresh, not on from the old pairing
    key = stage_key(
        manifest=manifest_version,
        spec=spec_version,
        saliency=sal.get("key"),
        codec=codec_key,
        pairs=pairs_version,
        code=VELOCITY_CODE_VERSION,
    )
    out_dir = rfp.out_dir(name, "velocity", key)
    store = rfp.frame_store(cfg.store_max_side)
    tags = run_tags(
        context,
        stage="velocity",
        input_data_version=manifest_version,
        spec_version=spec_version,
        saliency_run_id=sal.get("mlflow_run_id", ""),
        codec_run_id=(codec or {}).get("mlflow_run_id", ""),
        pairs_version=pairs_version or "",
    )
    try:
        with (
            transient_retry(),
            mlflow_tracking.start_run(name, f"velocity {name}", tags, manifest=(manifest, manifest_version)) as run,
        ):
            _log_config(mlflow, spec, cfg)
            if saliency_ckpt is not None:
                mlflow.log_artifact(str(sal["state"]), "saliency")
            if paired is not None:
                mlflow.log_artifact(paired["proof_sheet"], "structure")
            # in this process, or out of it through Dagster Pipes (`training_launcher`, $RFP_TRAINING_LAUNCHER);
            # either way it resumes from the newest checkpoint in out_dir, so a retry continues a killed run
            launched = training_launcher.train_velocity(
                context,
                cfg,
                manifest,
                out_dir,
                device=rfp.resolve_device(),
                store=store,
                saliency_checkpoint=saliency_ckpt,
                codec_checkpoint=Path(codec["checkpoint"]) if codec else None,
                pairs_path=paired["pairs"] if paired else None,
                log=_mlflow_logger(mlflow),
                mlflow_uri=mlflow_tracking.uri(),
                mlflow_run_id=run.info.run_id,
                paired=spec.get("pairing") == "filenames",  # true pairs by file name (rfp_core/flow/paired.py)
            )
            res = launched.result
            final = {"velocity/steps": res.steps, "velocity/images_per_s_mean": res.images_per_s}
            if math.isfinite(res.final_loss):
                final["velocity/final_loss"] = res.final_loss
            mlflow.log_metrics(final)
            if res.sample_grid is not None:
                mlflow.log_artifact(str(res.sample_grid), "samples")
            mlflow.log_artifact(str(res.metrics_path), "metrics")
            model_uri, model_version = mlflow_tracking.log_translator(
                res.checkpoint,
                registered_name=name,
                tags={
                    "partition": name,
                    "input_data_version": manifest_version,
                    "spec_version": spec_version,
                    "velocity_key": key,
                },
            )
            url = mlflow_tracking.run_url(run)
    except NonFiniteLoss as exc:
        # a NaN/inf loss: the check fails where it can be seen, the step fails, nothing is registered
        yield non_finite_loss_check(str(exc), exc.step, exc.last_checkpoint, name)
        raise dg.Failure(
            description=str(exc),
            metadata={
                "step": exc.step if exc.step is not None else -1,
                "last_good_checkpoint": str(exc.last_checkpoint) if exc.last_checkpoint else "none written yet",
            },
        ) from exc
    write_result(
        rfp.out_dir(name, "velocity"),
        {
            "checkpoint": str(res.checkpoint),
            "key": key,
            "final_loss": res.final_loss,
            "steps": res.steps,
            "images_per_s": res.images_per_s,
            "sample_grid": str(res.sample_grid) if res.sample_grid else None,
            "mlflow_run_id": run.info.run_id,
            "model_uri": model_uri,
            "model_version": model_version,
            "built_from": {
                "manifest": manifest_version,
                "spec": spec_version,
                "saliency": sal.get("key"),
                "codec": codec_key,
                "pairs": pairs_version,
            },
        },
    )
    prune_stage_dirs(rfp.out_dir(name, "velocity"), out_dir)
    metadata: dict[str, Any] = {
        "final_loss": res.final_loss,
        "steps": res.steps,
        "images_per_s": round(res.images_per_s, 2),
        "checkpoint": dg.MetadataValue.path(str(res.checkpoint)),
        "mlflow_run": dg.MetadataValue.url(url),
        "registered_model": f"models:/{name}/{model_version}" if model_version else model_uri,
        "built_from_manifest": manifest_version,
        "built_from_spec": spec_version,
        "built_from_saliency": str(sal.get("key") or "skipped"),
        "built_from_codec": codec_key or "identity",
        "built_from_pairs": pairs_version or "unpaired",
        **launched.metadata,
    }
    if res.sample_grid is not None:
        metadata["samples"] = markdown_image(Path(res.sample_grid), "samples: inputs above, outputs below")
    yield dg.MaterializeResult(metadata=metadata, check_results=velocity_checks(res.final_loss, partition=name))
