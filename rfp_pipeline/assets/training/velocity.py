"""Phase 2, the velocity flow v(x, t): trained, logged as an MLflow pyfunc translator, registered."""

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import dagster as dg

from rfp_pipeline.assets.structure import current_pairs
from rfp_pipeline.assets.training.codec import current_codec
from rfp_pipeline.assets.training.stage import Manifest, TrainingStage, training_asset
from rfp_pipeline.checks import VELOCITY_CHECKS, non_finite_loss_check, velocity_checks
from rfp_pipeline.metadata import markdown_image, prune_stage_dirs, stage_key, write_result
from rfp_pipeline.pipes import TrainingLauncher
from rfp_pipeline.resources import MlflowTracking, RfpHome

VELOCITY_CODE_VERSION = "2"  # 2: checkpoints carry their lineage; a NaN loss fails loss_finite


@dataclass(frozen=True)
class VelocityInputs:
    """What the velocity is built from, each from an input of the asset: the manifest (frame_store),
    the saliency classifier, the codec and the structure pairs (each None when off)."""

    manifest: Manifest
    saliency: dict
    codec: dict | None
    paired: dict | None
    spec_version: str

    @property
    def saliency_checkpoint(self) -> Path | None:
        return None if self.saliency.get("skipped") else Path(self.saliency["checkpoint"])

    @property
    def built_from(self) -> dict[str, Any]:
        return {
            "manifest": self.manifest.version,
            "spec": self.spec_version,
            "saliency": self.saliency.get("key"),
            "codec": self.codec["key"] if self.codec else None,
            "pairs": self.paired["version"] if self.paired else None,
        }

    @property
    def key(self) -> str:
        # the pairs' content enters the key: re-pairing trains afresh, not on from the old pairing
        return stage_key(**self.built_from, code=VELOCITY_CODE_VERSION)


@dataclass(frozen=True)
class Trained:
    result: Any  # rfp_core.train.velocity's result
    metadata: dict[str, Any]  # the launcher's (Pipes) metadata
    run_id: str
    url: str
    model_uri: str
    model_version: str | None


def _inputs(st: TrainingStage, frame_store: dict, codec: dict, saliency: dict, pairs: dict) -> VelocityInputs:
    return VelocityInputs(
        manifest=st.manifest(frame_store),
        saliency=saliency,
        codec=current_codec(codec, st.name, st.cfg),
        paired=current_pairs(pairs, st.name, st.cfg),
        spec_version=st.spec_version,
    )


def _train(st: TrainingStage, up: VelocityInputs, tracking: MlflowTracking, launcher: TrainingLauncher) -> Trained:
    """Train (resuming from the newest checkpoint in the key folder, so a retry continues a killed
    run) inside the stage's MLflow run, then log and register the translator."""
    import mlflow

    tags = {
        "saliency_run_id": up.saliency.get("mlflow_run_id", ""),
        "codec_run_id": (up.codec or {}).get("mlflow_run_id", ""),
        "pairs_version": up.built_from["pairs"] or "",
    }
    with st.mlflow_run(tracking, up.manifest, **tags) as run:
        if up.saliency_checkpoint is not None:
            mlflow.log_artifact(str(up.saliency["state"]), "saliency")
        if up.paired is not None:
            mlflow.log_artifact(up.paired["proof_sheet"], "structure")
        launched = launcher.train_velocity(
            st.context,
            st.cfg,
            up.manifest.path,
            st.out_dir(up.key),
            saliency_checkpoint=up.saliency_checkpoint,
            codec_checkpoint=Path(up.codec["checkpoint"]) if up.codec else None,
            pairs_path=up.paired["pairs"] if up.paired else None,
            paired=st.spec.get("pairing") == "filenames",  # true pairs by file name (rfp_core/flow/paired.py)
            **st.launch_args(tracking, run),
        )
        res = launched.result
        final = {"velocity/steps": res.steps, "velocity/images_per_s_mean": res.images_per_s}
        if math.isfinite(res.final_loss):
            final["velocity/final_loss"] = res.final_loss
        mlflow.log_metrics(final)
        if res.sample_grid is not None:
            mlflow.log_artifact(str(res.sample_grid), "samples")
        mlflow.log_artifact(str(res.metrics_path), "metrics")
        model_tags = {
            "partition": st.name,
            "input_data_version": up.manifest.version,
            "spec_version": up.spec_version,
            "velocity_key": up.key,
        }
        model_uri, model_version = tracking.log_translator(res.checkpoint, registered_name=st.name, tags=model_tags)
        return Trained(res, launched.metadata, run.info.run_id, tracking.run_url(run), model_uri, model_version)


def _record(up: VelocityInputs, t: Trained) -> dict[str, Any]:
    res = t.result
    return {
        "checkpoint": str(res.checkpoint),
        "key": up.key,
        "final_loss": res.final_loss,
        "steps": res.steps,
        "images_per_s": res.images_per_s,
        "sample_grid": str(res.sample_grid) if res.sample_grid else None,
        "mlflow_run_id": t.run_id,
        "model_uri": t.model_uri,
        "model_version": t.model_version,
        "built_from": up.built_from,
    }


def _metadata(name: str, up: VelocityInputs, t: Trained) -> dict[str, Any]:
    res, built = t.result, up.built_from
    metadata: dict[str, Any] = {
        "final_loss": res.final_loss,
        "steps": res.steps,
        "images_per_s": round(res.images_per_s, 2),
        "checkpoint": dg.MetadataValue.path(str(res.checkpoint)),
        "mlflow_run": dg.MetadataValue.url(t.url),
        "registered_model": f"models:/{name}/{t.model_version}" if t.model_version else t.model_uri,
        "built_from_manifest": built["manifest"],
        "built_from_spec": built["spec"],
        "built_from_saliency": str(built["saliency"] or "skipped"),
        "built_from_codec": built["codec"] or "identity",
        "built_from_pairs": built["pairs"] or "unpaired",
        **t.metadata,
    }
    if res.sample_grid is not None:
        metadata["samples"] = markdown_image(Path(res.sample_grid), "samples: inputs above, outputs below")
    return metadata


@training_asset(
    "velocity",
    VELOCITY_CODE_VERSION,
    "Phase 2: the velocity UNet v(x, t), saliency-weighted (plain MSE in generative mode), in the "
    "codec's latent space when there is one, domain-1 partners drawn from the structure pairs when pairing is on. "
    "Logs an MLflow pyfunc translator and registers a model version named after the experiment. Metadata "
    "`final_loss` is the loss of the last optimiser step (one batch: noisy); MLflow's `velocity/loss` is its mean "
    "over each logging window (with the saliency loss also logged apart: `velocity/loss_saliency` + mse_weight x "
    "`velocity/loss_mse`).",
    check_specs=VELOCITY_CHECKS,
)
def velocity_checkpoint(
    context: dg.AssetExecutionContext,
    experiment_config: dict,
    frame_store: dict,
    codec_checkpoint: dict,
    saliency_checkpoint: dict,
    structure_pairs: dict,
    rfp: RfpHome,
    mlflow_tracking: MlflowTracking,
    training_launcher: TrainingLauncher,
) -> Iterator[dg.AssetCheckResult | dg.MaterializeResult]:
    from rfp_core.train.velocity import NonFiniteLoss

    st = TrainingStage(context, rfp, "velocity", experiment_config)
    up = _inputs(st, frame_store, codec_checkpoint, saliency_checkpoint, structure_pairs)
    try:
        trained = _train(st, up, mlflow_tracking, training_launcher)
    except NonFiniteLoss as exc:
        # a NaN/inf loss: the check fails where it can be seen, the step fails, nothing is registered
        yield non_finite_loss_check(str(exc), exc.step, exc.last_checkpoint, st.name)
        raise dg.Failure(
            description=str(exc),
            metadata={
                "step": exc.step if exc.step is not None else -1,
                "last_good_checkpoint": str(exc.last_checkpoint) if exc.last_checkpoint else "none written yet",
            },
        ) from exc
    write_result(st.stage_dir, _record(up, trained))
    prune_stage_dirs(st.stage_dir, st.out_dir(up.key))
    yield dg.MaterializeResult(
        metadata=_metadata(st.name, up, trained),
        check_results=velocity_checks(trained.result.final_loss, partition=st.name),
    )
