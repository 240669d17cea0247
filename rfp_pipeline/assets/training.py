"""Stage 2, training: saliency classifier (phase 1), velocity flow (phase 2). One MLflow run each.

Each training materialisation writes into `$RFP_HOME/pipeline/<exp>/<stage>/<key>/`, `key` a
digest of what it is built from: a Dagster retry (same inputs) resumes there, new inputs start
afresh. `<stage>/result.json` points at the current one; older keys beyond the last two are pruned.
"""

import contextlib
import hashlib
import json
import shutil
import sqlite3
from pathlib import Path
from typing import Any, Iterator

import dagster as dg

from rfp_core.manifest import content_version
from rfp_pipeline import experiments as exps
from rfp_pipeline.assets.ingest import experiment_config, frame_store, load_spec
from rfp_pipeline.automation import on_retrain_cron
from rfp_pipeline.checks import SALIENCY_CHECKS, VELOCITY_CHECKS, saliency_checks, velocity_checks
from rfp_pipeline.metadata import markdown_image, read_result, run_tags, write_result
from rfp_pipeline.partitions import experiments_partitions
from rfp_pipeline.resources import CheckThresholds, MlflowTracking, RfpHome

GROUP = "training"
SALIENCY_CODE_VERSION = "1"
VELOCITY_CODE_VERSION = "1"
KEEP_STAGE_DIRS = 2


def stage_key(**inputs: Any) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()[:16]


def prune_stage_dirs(stage_dir: Path, keep: Path, n: int = KEEP_STAGE_DIRS) -> None:
    dirs = sorted((d for d in stage_dir.iterdir() if d.is_dir()), key=lambda d: d.stat().st_mtime, reverse=True)
    for d in [d for d in dirs if d != keep][n - 1 :]:
        shutil.rmtree(d, ignore_errors=True)


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
        return "generative mode (domain0 = random): the velocity trains with plain MSE from noise, no saliency classifier is needed"
    if cfg.velocity.loss != "saliency":
        return f"velocity.loss is '{cfg.velocity.loss}': the velocity loss does not use a saliency classifier"
    return None


@dg.asset(
    partitions_def=experiments_partitions,
    deps=[frame_store, experiment_config],
    group_name=GROUP,
    code_version=SALIENCY_CODE_VERSION,
    kinds={"pytorch", "mlflow"},
    automation_condition=on_retrain_cron(),
    pool="gpu",
    check_specs=SALIENCY_CHECKS,
    description="Phase 1: ResNet classifier domain0 vs domain1 (warm-up, then fine-tune) whose latent h(x) "
    "weights the velocity loss. Materialises as skipped in generative mode.",
)
def saliency_checkpoint(
    context: dg.AssetExecutionContext, rfp: RfpHome, mlflow_tracking: MlflowTracking, thresholds: CheckThresholds
) -> dg.MaterializeResult:
    from rfp_core.train.saliency import train_saliency

    name = context.partition_key
    spec = load_spec(rfp, name)
    cfg = exps.model_config(spec)
    stage_dir = rfp.out_dir(name, "saliency")
    reason = _skip_reason(cfg)
    if reason is not None:
        write_result(stage_dir, {"skipped": True, "reason": reason, "checkpoint": None})
        context.log.info(f"saliency skipped: {reason}")
        return dg.MaterializeResult(
            data_version=dg.DataVersion("skipped"),
            check_results=saliency_checks(None, 0.0, thresholds, skipped_reason=reason),
            metadata={"skipped": True, "reason": dg.MetadataValue.text(reason)},
        )

    import mlflow

    manifest = rfp.out_dir(name) / "manifest.parquet"
    manifest_version = content_version(manifest)
    spec_version = exps.spec_digest(spec)
    key = stage_key(manifest=manifest_version, spec=spec_version, code=SALIENCY_CODE_VERSION)
    out_dir = rfp.out_dir(name, "saliency", key)
    store = rfp.frame_store(cfg.store_max_side)
    tags = run_tags(context, stage="saliency", input_data_version=manifest_version, spec_version=spec_version)
    with transient_retry(), mlflow_tracking.start_run(name, f"saliency {name}", tags) as run:
        _log_config(mlflow, spec, cfg)
        res = train_saliency(cfg, manifest, out_dir, device=rfp.resolve_device(), store=store,
                             log=_mlflow_logger(mlflow), progress=False)
        mlflow.log_metrics({"saliency/final_accuracy": res.accuracy, "saliency/steps": res.steps})
        mlflow.log_artifact(str(res.state_path), "saliency")
        grid = _frames_grid(rfp, name, cfg, out_dir / "frames.png")
        if grid is not None:
            mlflow.log_artifact(str(grid), "samples")
        url = mlflow_tracking.run_url(run)
    write_result(stage_dir, {
        "skipped": False, "checkpoint": str(res.checkpoint), "state": str(res.state_path), "key": key,
        "accuracy": res.accuracy, "threshold": cfg.saliency.accuracy_threshold, "steps": res.steps,
        "mlflow_run_id": run.info.run_id, "built_from": {"manifest": manifest_version, "spec": spec_version},
    })
    prune_stage_dirs(rfp.out_dir(name, "saliency"), out_dir)
    return dg.MaterializeResult(check_results=saliency_checks(res.accuracy, cfg.saliency.accuracy_threshold, thresholds), metadata={
        "accuracy": res.accuracy,
        "accuracy_threshold": cfg.saliency.accuracy_threshold,
        "steps": res.steps,
        "backbone_warmed_up": res.warmed_up,
        "checkpoint": dg.MetadataValue.path(str(res.checkpoint)),
        "mlflow_run": dg.MetadataValue.url(url),
        "built_from_manifest": manifest_version,
        "built_from_spec": spec_version,
        **({"frames": markdown_image(grid, "training frames: domain 0 above, domain 1 below")} if grid else {}),
    })


def _frames_grid(rfp: RfpHome, name: str, cfg, path: Path) -> Path | None:
    """What the classifier tells apart: a row of domain-0 frames above a row of domain-1 frames."""
    import torch

    from rfp_core.data import FrameDataset
    from rfp_core.images import save_grid

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
    # structure pairing (its own issue) adds its `structure_pairs` asset here and passes the
    # pairs table to train_velocity(pairs=...); codec_checkpoint likewise goes to codec_checkpoint=
    deps=[frame_store, experiment_config, saliency_checkpoint],
    group_name=GROUP,
    code_version=VELOCITY_CODE_VERSION,
    kinds={"pytorch", "mlflow"},
    automation_condition=on_retrain_cron(),
    pool="gpu",
    check_specs=VELOCITY_CHECKS,
    description="Phase 2: the velocity UNet v(x, t), saliency-weighted (plain MSE in generative mode). "
    "Logs an MLflow pyfunc translator and registers a model version named after the experiment.",
)
def velocity_checkpoint(context: dg.AssetExecutionContext, rfp: RfpHome, mlflow_tracking: MlflowTracking) -> dg.MaterializeResult:
    import math

    import mlflow

    from rfp_core.train.velocity import train_velocity

    name = context.partition_key
    spec = load_spec(rfp, name)
    cfg = exps.model_config(spec)
    sal = read_result(rfp.out_dir(name, "saliency"), "saliency_checkpoint", name)
    saliency_ckpt = None if sal.get("skipped") else Path(sal["checkpoint"])
    manifest = rfp.out_dir(name) / "manifest.parquet"
    manifest_version = content_version(manifest)
    spec_version = exps.spec_digest(spec)
    key = stage_key(manifest=manifest_version, spec=spec_version, saliency=sal.get("key"), code=VELOCITY_CODE_VERSION)
    out_dir = rfp.out_dir(name, "velocity", key)
    store = rfp.frame_store(cfg.store_max_side)
    tags = run_tags(context, stage="velocity", input_data_version=manifest_version, spec_version=spec_version,
                    saliency_run_id=sal.get("mlflow_run_id", ""))
    with transient_retry(), mlflow_tracking.start_run(name, f"velocity {name}", tags) as run:
        _log_config(mlflow, spec, cfg)
        if saliency_ckpt is not None:
            mlflow.log_artifact(str(sal["state"]), "saliency")
        res = train_velocity(cfg, manifest, out_dir, device=rfp.resolve_device(), saliency_checkpoint=saliency_ckpt,
                             store=store, log=_mlflow_logger(mlflow), pairs=None, progress=False)
        final = {"velocity/steps": res.steps, "velocity/images_per_s_mean": res.images_per_s}
        if math.isfinite(res.final_loss):
            final["velocity/final_loss"] = res.final_loss
        mlflow.log_metrics(final)
        if res.sample_grid is not None:
            mlflow.log_artifact(str(res.sample_grid), "samples")
        mlflow.log_artifact(str(res.metrics_path), "metrics")
        model_uri, model_version = mlflow_tracking.log_translator(res.checkpoint, registered_name=name)
        url = mlflow_tracking.run_url(run)
    write_result(rfp.out_dir(name, "velocity"), {
        "checkpoint": str(res.checkpoint), "key": key, "final_loss": res.final_loss, "steps": res.steps,
        "images_per_s": res.images_per_s, "sample_grid": str(res.sample_grid) if res.sample_grid else None,
        "mlflow_run_id": run.info.run_id, "model_uri": model_uri, "model_version": model_version,
        "built_from": {"manifest": manifest_version, "spec": spec_version, "saliency": sal.get("key")},
    })
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
    }
    if res.sample_grid is not None:
        metadata["samples"] = markdown_image(Path(res.sample_grid), "samples: inputs above, outputs below")
    return dg.MaterializeResult(metadata=metadata, check_results=velocity_checks(res.final_loss))
