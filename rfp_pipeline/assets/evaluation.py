"""Stage 3, evaluation: translate held-out frames, measure, show the grid; logged into the velocity's MLflow run."""

import json
import math
from pathlib import Path
from typing import Any

import dagster as dg
from pydantic import Field

from rfp_core import experiments as exps
from rfp_core.evaluate import explain
from rfp_pipeline.assets.ingest import manifest_path
from rfp_pipeline.automation import follows
from rfp_pipeline.checks import EVALUATION_CHECKS, evaluation_checks
from rfp_pipeline.metadata import markdown_image, write_result
from rfp_pipeline.partitions import experiments_partitions
from rfp_pipeline.resources import CheckThresholds, MlflowTracking, RfpHome

GROUP = "evaluation"
CHAMPION = "champion"


class EvaluationSettings(dg.Config):
    """Launchpad knobs; the defaults suit the demo."""

    steps: int = Field(default=0, description="ODE steps for sampling; 0 = the config's num_inference_steps")
    judge_steps: int = Field(default=200, description="training steps of the independent domain judge")
    max_images: int = Field(default=256, description="held-out domain-0 frames translated at most")


def _structure_encoder(cfg, device: str):
    """DINOv2 when its weights are on disk (nothing downloads), else the layout thumbnail."""
    from rfp_core.config import StructureConfig
    from rfp_core.structure.encoders import build_encoder, find_dino_weights

    if cfg.structure.encoder != "thumbnail":
        try:
            if find_dino_weights(cfg.structure.encoder, cfg.structure.weights_path) is not None:
                return build_encoder(cfg.structure, device)
        except Exception:  # noqa: BLE001 - an unusable cache only means the cheaper encoder
            pass
    return build_encoder(StructureConfig(encoder="thumbnail"), device)


def evaluate_translation(
    config: EvaluationSettings,
    rfp: RfpHome,
    spec: dict,
    frame_store: dict,
    translator,
    device,
    out_dir: Path,
    steps,
    sampler: str | None = None,
) -> dict[str, Any]:
    """`evaluate_run` on the experiment's held-out frames, masks, structure encoder and seed: every
    model of one experiment (the flow, its one-step map) is graded by the same judge."""
    from rfp_core.evaluate.report import evaluate_run

    cfg = exps.model_config(spec)
    return evaluate_run(
        translator,
        manifest_path(frame_store),
        rfp.frame_store(cfg.store_max_side),
        out_dir,
        masks_dir=rfp.root_path() / spec["masks"] if spec.get("masks") else None,
        steps=steps,
        sampler=sampler,
        structure_encoder=_structure_encoder(cfg, device),
        device=device,
        judge_steps=config.judge_steps,
        max_images=config.max_images,
        seed=cfg.seed,
    )


def _measure(
    config: EvaluationSettings, rfp: RfpHome, spec: dict, frame_store: dict, translator, device: str, out_dir: Path
):
    """Translate and measure: (metrics, metrics.json, the grids by name, the main grid)."""
    from rfp_core.atomic import atomic_write_text
    from rfp_core.media.images import save_grid

    cfg = exps.model_config(spec)
    steps = config.steps or None
    if translator.generative:
        grid = save_grid([translator.generate(8, seed=cfg.seed, steps=steps)], out_dir / "grid_generate.png")
        metrics: dict[str, Any] = {"steps": steps or cfg.velocity.num_inference_steps, "generated": 8}
        metrics_path = atomic_write_text(out_dir / "metrics.json", json.dumps(metrics, indent=2) + "\n")
        return metrics, metrics_path, {"grid_generate": str(grid)}, grid

    result = evaluate_translation(config, rfp, spec, frame_store, translator, device, out_dir, steps)
    paths = result.pop("paths")
    grids = {k: v for k, v in paths.items() if k.startswith("grid_")}
    return result, Path(paths["metrics"]), grids, Path(grids["grid_translate"])


def _log_into_velocity_run(tracking: MlflowTracking, vel: dict, numbers: dict, metrics_path: Path, grids: dict):
    """The evaluation belongs to the velocity's run: runs compare side by side with their scores;
    the logged model (models:/m-<id>) carries them too, so its page shows how it scored.
    Returns the run (None when the velocity has no MLflow run)."""
    if not vel.get("mlflow_run_id"):
        return None
    import mlflow

    model_id = str(vel.get("model_uri") or "").removeprefix("models:/") or None
    with tracking.resume_run(vel["mlflow_run_id"]) as run:
        mlflow.log_metrics({f"eval/{k}": v for k, v in numbers.items()}, model_id=model_id)
        mlflow.log_artifact(str(metrics_path), "evaluation")
        for g in grids.values():
            mlflow.log_artifact(g, "evaluation")
    return run


@dg.asset(
    partitions_def=experiments_partitions,
    group_name=GROUP,
    code_version="1",
    kinds={"png", "mlflow"},
    # the frames and the spec are read, not followed: a new velocity is what starts an evaluation
    automation_condition=follows("frame_store", "experiment_config"),
    check_specs=EVALUATION_CHECKS,
    description="Held-out domain-0 frames translated by the trained flow (input row above output row), "
    "with transfer rate, realism, content and flow metrics in metrics.json.",
)
def evaluation_samples(
    context: dg.AssetExecutionContext,
    config: EvaluationSettings,
    rfp: RfpHome,
    mlflow_tracking: MlflowTracking,
    thresholds: CheckThresholds,
    experiment_config: dict,
    frame_store: dict,
    velocity_checkpoint: dict,
) -> dg.MaterializeResult:
    from rfp_core.inference.translate import Translator

    name = context.partition_key
    vel = velocity_checkpoint
    device = rfp.resolve_device()
    translator = Translator.from_run(vel["checkpoint"], device=device)
    out_dir = rfp.out_dir(name, "evaluation")
    measured = _measure(config, rfp, experiment_config, frame_store, translator, device, out_dir)
    metrics, metrics_path, grids, grid = measured
    numbers = {
        k: float(v)
        for k, v in metrics.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    }
    run = _log_into_velocity_run(mlflow_tracking, vel, numbers, metrics_path, grids)
    write_result(out_dir, {"metrics": str(metrics_path), "grids": grids, "built_from_velocity": vel.get("key")})
    metadata = _grid_metadata(grids, translator.generative, numbers)
    metadata.update(
        {
            "metrics": dg.MetadataValue.md(explain.markdown_table(numbers)),
            "metrics_json": dg.MetadataValue.path(str(metrics_path)),
            "dagster/uri": dg.MetadataValue.path(str(grid)),
            "built_from_velocity": str(vel.get("key")),
            # rounded for reading (and plotting over materialisations); metrics.json keeps full precision
            **{k: explain.rounded(v) for k, v in numbers.items()},
        }
    )
    if run is not None:
        metadata["mlflow_run"] = dg.MetadataValue.url(mlflow_tracking.run_url(run))
        metadata["mlflow_runs"] = dg.MetadataValue.url(mlflow_tracking.experiment_url(run.info.experiment_id))
    checks = evaluation_checks(metrics, thresholds, partition=name)
    metadata.update(promote_champion(mlflow_tracking, name, vel.get("model_version"), checks, context.log))
    return dg.MaterializeResult(metadata=metadata, check_results=checks)


def _grid_metadata(grids: dict[str, str], generative: bool, numbers: dict[str, float]) -> dict[str, Any]:
    """Every grid as a picture: the translations, and the round trip (translated, then back)."""
    if generative:
        return {"grid": markdown_image(Path(grids["grid_generate"]), "generated from noise")}
    n = int(numbers.get("n_eval", 0))
    return {
        "grid": markdown_image(
            Path(grids["grid_translate"]),
            f"all {n} held-out inputs (upper row of each pair) and their translations (lower row)",
        ),
        "cycle_grid": markdown_image(
            Path(grids["grid_cycle"]),
            "each translation (upper row) and its reverse "
            "translation back to domain 0 (lower row): cycle_error measures the difference",
        ),
    }


def promote_champion(
    tracking: MlflowTracking, name: str, version: str | None, checks: list[dg.AssetCheckResult], log
) -> dict[str, Any]:
    """Point the registered model's `champion` alias (what `rfp serve` serves) at the evaluated
    version when every evaluation check passed; otherwise leave it where it was."""
    if not version:
        return {}
    failed = [c.check_name for c in checks if not c.passed]
    if failed:
        log.info(f"evaluation checks {failed} failed: models:/{name}@{CHAMPION} stays where it was")
        return {"champion": f"unchanged (checks failed: {', '.join(failed)})"}
    tracking.client().set_registered_model_alias(name, CHAMPION, str(version))
    log.info(f"models:/{name}@{CHAMPION} -> version {version}")
    return {"champion": f"models:/{name}@{CHAMPION} = version {version}"}
