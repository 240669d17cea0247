"""Stage 2b, straight and fast: reflow couplings -> k-RF -> one-step distillation (opt-in).

Opt-in per experiment: `"reflow": {"rounds": 1, "pairs": N, "distill": true}` in the experiment
file (read from the resolved spec); without it every asset here is *skipped*. Products live in
`$RFP_HOME/pipeline/<exp>/reflow/<key>/` (`reflow_k/velocity.pt`, `distilled/velocity.pt`,
`reflow_report.md`); the couplings themselves in the content-addressed `$RFP_HOME/reflow/` store,
so a retry or a second experiment on the same velocity reuses them.
"""

from pathlib import Path
from typing import Any

import dagster as dg

from rfp_core import experiments as exps
from rfp_pipeline.assets.ingest import experiment_config, frame_store, load_spec
from rfp_pipeline.automation import on_retrain_cron
from rfp_pipeline.metadata import skipped, stage_key, write_result
from rfp_pipeline.partitions import experiments_partitions
from rfp_pipeline.resources import RfpHome

GROUP = "training"
REFLOW_CODE_VERSION = "1"
NOT_ON = 'reflow is off for this experiment: add "reflow": {"rounds": 1, "pairs": N, "distill": true} to opt in'


def reflow_spec(spec: dict[str, Any]) -> dict[str, Any] | None:
    """The experiment's `reflow` settings with defaults, or None when it is off."""
    raw = spec.get("reflow")
    if not raw:
        return None
    known = {"rounds", "pairs", "distill", "solver", "steps_solver", "train_steps", "loss"}
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
        **raw,
    }


def _setup(rfp: RfpHome, name: str, vel: dict, sal: dict | None = None):
    """(reflow settings, run paths, stage key) from the velocity and saliency records, or None when off.

    The couplings need no saliency (`sal` None): only a k-RF trained with the saliency loss reads it.
    """
    from rfp_core.train.reflow_run import RunPaths

    spec = load_spec(rfp, name)
    settings = reflow_spec(spec)
    if settings is None:
        return None
    cfg = exps.model_config(spec)
    key = stage_key(velocity=vel.get("key"), reflow=settings, code=REFLOW_CODE_VERSION)
    paths = RunPaths(
        base=Path(vel["checkpoint"]),
        manifest=rfp.out_dir(name) / "manifest.parquet",
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
    deps=[frame_store, experiment_config],
    **_COMMON,
    description="(z0, ODE_1RF(z0)) for the training inputs, solved accurately, stored content-addressed "
    "(parquet index + tensor shards; a retry solves only missing shards).",
)
def reflow_couplings(
    context: dg.AssetExecutionContext, rfp: RfpHome, velocity_checkpoint: dict
) -> dg.MaterializeResult:
    from rfp_core.flow.reflow import Solver
    from rfp_core.train.reflow_run import couplings_of

    name = context.partition_key
    setup = _setup(rfp, name, velocity_checkpoint)
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
    context: dg.AssetExecutionContext, rfp: RfpHome, velocity_checkpoint: dict, saliency_checkpoint: dict
) -> dg.MaterializeResult:
    name = context.partition_key
    stage = rfp.out_dir(name, "reflow_checkpoint")
    setup = _setup(rfp, name, velocity_checkpoint, saliency_checkpoint)
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


@dg.asset(
    deps=[reflow_checkpoint],
    **_COMMON,
    pool="gpu",
    description="One-step map z0 -> z1 fitted to the newest flow's couplings, plus the steps table "
    "(straightness, N = 1, 2, 4, 12) of 1-RF, k-RF and distilled.",
)
def distilled_checkpoint(
    context: dg.AssetExecutionContext, rfp: RfpHome, velocity_checkpoint: dict, saliency_checkpoint: dict
) -> dg.MaterializeResult:
    from rfp_core.flow.reflow import Solver
    from rfp_core.train.reflow_report import write_report

    name = context.partition_key
    stage = rfp.out_dir(name, "distilled_checkpoint")
    setup = _setup(rfp, name, velocity_checkpoint, saliency_checkpoint)
    if setup is None or not setup[0]["distill"]:
        return skipped(stage, NOT_ON if setup is None else "reflow.distill is false for this experiment")
    s, paths, key, res = _run(rfp, setup, distill=True)
    md = write_report(paths, device=rfp.resolve_device(), solver=Solver(s["solver"], s["steps_solver"]))
    write_result(stage, {"checkpoint": str(res.distilled), "key": key, "report": str(paths.out / "reflow_report.md")})
    return dg.MaterializeResult(
        data_version=dg.DataVersion(key),
        metadata={"checkpoint": dg.MetadataValue.path(str(res.distilled)), "steps_table": dg.MetadataValue.md(md)},
    )
