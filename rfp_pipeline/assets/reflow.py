"""Stage 2b, straight and fast: reflow couplings -> k-RF -> one-step distillation (opt-in).

Opt-in per experiment: `"reflow": {"rounds": 1, "pairs": N, "distill": true}` in the experiment
file (read from the resolved spec); without it every asset here is *skipped*. Products live in
`$RFP_HOME/pipeline/<exp>/reflow/<key>/` (`reflow_k/velocity.pt`, `distilled/velocity.pt`,
`reflow_report.md`); the couplings themselves in the content-addressed `$RFP_HOME/reflow/` store,
so a retry or a second experiment on the same velocity reuses them.

`"rounds": 0` with `"distill": true` distils the 1-RF flow's own couplings (no k-RF). With
`"evaluate": true` the distilled map is also scored at N = 1 by the evaluation stage's measures and
judge (same held-out frames, seed and judge steps, so the same judge), in
`reflow/<key>/distilled_eval/metrics.json`. When the velocity has an MLflow run, the distilled
stage logs a pyfunc translator carrying both checkpoints into it and registers it as a new
version of the experiment's model: that version serves `steps` 1 with the distilled map.
"""

from pathlib import Path
from typing import Any

import dagster as dg

from rfp_core import experiments as exps
from rfp_pipeline.assets.ingest import manifest_path
from rfp_pipeline.automation import on_retrain_cron
from rfp_pipeline.metadata import markdown_image, skipped, stage_key, write_result
from rfp_pipeline.partitions import experiments_partitions
from rfp_pipeline.resources import MlflowTracking, RfpHome

GROUP = "training"
REFLOW_CODE_VERSION = "1"
NOT_ON = 'reflow is off for this experiment: add "reflow": {"rounds": 1, "pairs": N, "distill": true} to opt in'


def reflow_spec(spec: dict[str, Any]) -> dict[str, Any] | None:
    """The experiment's `reflow` settings with defaults, or None when it is off."""
    raw = spec.get("reflow")
    if not raw:
        return None
    known = {"rounds", "pairs", "distill", "solver", "steps_solver", "train_steps", "loss", "evaluate"}
    unknown = set(raw) - known
    if unknown:
        raise ValueError(
            f"experiment {spec.get('name')}: unknown reflow key(s) {sorted(unknown)}; known: {sorted(known)}"
        )
    return {
        "rounds": 1,
        "pairs": None,
        "distill": False,
        "solver": "rk4",
        "steps_solver": 16,
        "train_steps": None,
        "loss": "mse",
        "evaluate": False,
        **raw,
    }


def _setup(rfp: RfpHome, name: str, spec: dict, frames: dict, vel: dict, sal: dict | None = None):
    """(reflow settings, run paths, stage key) from the spec and the frame-store, velocity and saliency
    records (all inputs of the asset), or None when off.

    The couplings need no saliency (`sal` None): only a k-RF trained with the saliency loss reads it.
    """
    from rfp_core.train.reflow_run import RunPaths

    settings = reflow_spec(spec)
    if settings is None:
        return None
    cfg = exps.model_config(spec)
    # scoring the products changes none of them: `evaluate` stays out of their folder's key
    products = {k: v for k, v in settings.items() if k != "evaluate"}
    key = stage_key(velocity=vel.get("key"), reflow=products, code=REFLOW_CODE_VERSION)
    paths = RunPaths(
        base=Path(vel["checkpoint"]),
        manifest=manifest_path(frames),
        out=rfp.out_dir(name, "reflow", key),
        store=rfp.frame_store(cfg.store_max_side),
        saliency=None if sal is None or sal.get("skipped") else Path(sal["checkpoint"]),
    )
    return settings, paths, key


_COMMON = dict(
    partitions_def=experiments_partitions,
    group_name=GROUP,
    code_version=REFLOW_CODE_VERSION,
    kinds={"pytorch"},
    automation_condition=on_retrain_cron(),
)


@dg.asset(
    **_COMMON,
    description="(z0, ODE_1RF(z0)) for the training inputs, solved accurately, stored content-addressed "
    "(parquet index + tensor shards; a retry solves only missing shards).",
)
def reflow_couplings(
    context: dg.AssetExecutionContext,
    experiment_config: dict,
    frame_store: dict,
    velocity_checkpoint: dict,
    rfp: RfpHome,
) -> dg.MaterializeResult:
    from rfp_core.flow.reflow import Solver
    from rfp_core.train.reflow_run import couplings_of

    name = context.partition_key
    setup = _setup(rfp, name, experiment_config, frame_store, velocity_checkpoint)
    stage = rfp.out_dir(name, "reflow_couplings")
    if setup is None:
        return skipped(stage, NOT_ON)
    s, paths, _ = setup
    c = couplings_of(
        paths,
        paths.base,
        s["pairs"],
        Solver(s["solver"], s["steps_solver"]),
        device=rfp.resolve_device(),
        progress=False,
    )
    write_result(stage, {"couplings": str(c.root), "key": c.digest, "pairs": len(c), "built_from": str(paths.base)})
    return dg.MaterializeResult(
        data_version=dg.DataVersion(c.digest),
        metadata={
            "pairs": len(c),
            "shards_solved": c.computed,
            "shards_reused": c.reused,
            "couplings": dg.MetadataValue.path(str(c.root)),
            "solver": f"{s['solver']} x {s['steps_solver']}",
        },
    )


def _run(rfp: RfpHome, setup, distill: bool):
    from rfp_core.flow.reflow import Solver
    from rfp_core.train.reflow_run import reflow_run

    s, paths, key = setup
    res = reflow_run(
        paths,
        rounds=s["rounds"],
        pairs=s["pairs"],
        distill=distill,
        solver=Solver(s["solver"], s["steps_solver"]),
        train_steps=s["train_steps"],
        loss=s["loss"],
        device=rfp.resolve_device(),
        progress=False,
    )
    return s, paths, key, res


@dg.asset(
    deps=[reflow_couplings],
    **_COMMON,
    pool="gpu",
    description="k-RF: a velocity trained on the couplings of the previous flow, `rounds` times.",
)
def reflow_checkpoint(
    context: dg.AssetExecutionContext,
    experiment_config: dict,
    frame_store: dict,
    velocity_checkpoint: dict,
    saliency_checkpoint: dict,
    rfp: RfpHome,
) -> dg.MaterializeResult:
    name = context.partition_key
    stage = rfp.out_dir(name, "reflow_checkpoint")
    setup = _setup(rfp, name, experiment_config, frame_store, velocity_checkpoint, saliency_checkpoint)
    if setup is None:
        return skipped(stage, NOT_ON)
    _, paths, key, res = _run(rfp, setup, distill=False)
    write_result(
        stage,
        {
            "checkpoint": str(res.flows[-1]) if res.flows else None,
            "flows": [str(p) for p in res.flows],
            "key": key,
            "built_from": str(paths.base),
        },
    )
    return dg.MaterializeResult(
        data_version=dg.DataVersion(key),
        metadata={
            "rounds": len(res.flows),
            "retrained": len(res.trained),
            "checkpoint": dg.MetadataValue.path(str(res.flows[-1]) if res.flows else "none"),
        },
    )


# what the demo prints of the one-step evaluation (all of it is in metrics.json)
ONE_STEP_SHOWN = ("transfer_rate", "mask_iou", "ms_per_image", "nfe", "steps", "sampler", "n_eval", "judge_accuracy")


def evaluate_one_step(rfp: RfpHome, spec: dict, frames: dict, checkpoint: Path, out_dir: Path) -> dict[str, Any] | None:
    """The distilled map at N = 1 (one Euler step) measured as `evaluation_samples` measures the flow:
    its held-out frames, masks, structure encoder, seed and default judge steps, so the judge it trains
    is the same one. None in generative mode (there is nothing to translate)."""
    from rfp_core.inference.translate import Translator
    from rfp_pipeline.assets.evaluation import EvaluationSettings, evaluate_translation

    if exps.model_config(spec).generative:
        return None
    device = rfp.resolve_device()
    translator = Translator.from_run(checkpoint, device=device)
    result = evaluate_translation(EvaluationSettings(), rfp, spec, frames, translator, device, out_dir, 1, "euler")
    paths = result.pop("paths")
    shown = {k: result[k] for k in ONE_STEP_SHOWN if k in result}
    return {"metrics": paths["metrics"], "grid": paths["grid_translate"], **shown}


def log_one_step(
    tracking: MlflowTracking, name: str, vel: dict, distilled: Path, key: str, evaluation: dict | None
) -> dict[str, Any]:
    """Into the velocity's MLflow run: the one-step scores and a pyfunc translator with both checkpoints,
    registered as a new version of the experiment's model. {} when the velocity has no run."""
    if not vel.get("mlflow_run_id"):
        return {}
    import mlflow

    with tracking.resume_run(vel["mlflow_run_id"]) as run:
        if evaluation is not None:
            numbers = {k: v for k, v in evaluation.items() if isinstance(v, float)}
            mlflow.log_metrics({f"eval_1step/{k}": v for k, v in numbers.items()})
            mlflow.log_artifact(evaluation["metrics"], "evaluation_1step")
        uri, version = tracking.log_translator(
            Path(vel["checkpoint"]),
            registered_name=name,
            tags={
                "partition": name,
                "velocity_key": str(vel.get("key")),
                "distilled_key": key,
                "one_step": "distilled",
            },
            distilled=distilled,
        )
        url = tracking.run_url(run)
    return {"model_uri": uri, "model_version": version, "mlflow_run_id": vel["mlflow_run_id"], "mlflow_url": url}


def _distilled_metadata(rec: dict[str, Any], steps_table: str) -> dict[str, Any]:
    md: dict[str, Any] = {
        "checkpoint": dg.MetadataValue.path(rec["checkpoint"]),
        "steps_table": dg.MetadataValue.md(steps_table),
    }
    ev = rec.get("evaluation")
    if ev:
        md.update({f"one_step_{k}": ev[k] for k in ("transfer_rate", "mask_iou", "ms_per_image") if k in ev})
        md["one_step_grid"] = markdown_image(Path(ev["grid"]), "held-out inputs above, one-step translations below")
    if rec.get("model_version"):
        md["registered_model"] = f"models:/{rec['name']}/{rec['model_version']} (steps 1: the distilled map)"
        md["mlflow_run"] = dg.MetadataValue.url(rec["mlflow_url"])
    return md


@dg.asset(
    deps=[reflow_checkpoint],
    **_COMMON,
    pool="gpu",
    description="One-step map z0 -> z1 fitted to the newest flow's couplings, plus the steps table "
    "(straightness, N = 1, 2, 4, 12) of 1-RF, k-RF and distilled; with `evaluate`, its N = 1 scores by the "
    "evaluation's judge; a pyfunc version that serves steps 1 with it.",
)
def distilled_checkpoint(
    context: dg.AssetExecutionContext,
    experiment_config: dict,
    frame_store: dict,
    velocity_checkpoint: dict,
    saliency_checkpoint: dict,
    rfp: RfpHome,
    mlflow_tracking: MlflowTracking,
) -> dg.MaterializeResult:
    from rfp_core.flow.reflow import Solver
    from rfp_core.train.reflow_report import write_report

    name = context.partition_key
    stage = rfp.out_dir(name, "distilled_checkpoint")
    setup = _setup(rfp, name, experiment_config, frame_store, velocity_checkpoint, saliency_checkpoint)
    if setup is None or not setup[0]["distill"]:
        return skipped(stage, NOT_ON if setup is None else "reflow.distill is false for this experiment")
    s, paths, key, res = _run(rfp, setup, distill=True)
    md = write_report(paths, device=rfp.resolve_device(), solver=Solver(s["solver"], s["steps_solver"]))
    evaluation = (
        evaluate_one_step(rfp, experiment_config, frame_store, res.distilled, paths.out / "distilled_eval")
        if s["evaluate"]
        else None
    )
    rec = {
        "name": name,
        "checkpoint": str(res.distilled),
        "key": key,
        "report": str(paths.out / "reflow_report.md"),
        "evaluation": evaluation,
        **log_one_step(mlflow_tracking, name, velocity_checkpoint, res.distilled, key, evaluation),
    }
    write_result(stage, rec)
    return dg.MaterializeResult(data_version=dg.DataVersion(key), metadata=_distilled_metadata(rec, md))
