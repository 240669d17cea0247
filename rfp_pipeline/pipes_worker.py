"""The training process `TrainingLauncher` starts through Dagster Pipes: `python -m rfp_pipeline.pipes_worker`.

It imports `dagster_pipes` (the small protocol package), not `dagster`: the process that trains
needs torch, rfp_core and MLflow's client only. Everything it needs arrives as Pipes extras.
Per evaluation (saliency) or logging (velocity) step it logs the metrics into the asset's MLflow run
(by id: the run stays the asset's, this process never ends it), sends them to Dagster as a log line and a
custom message, and at the end reports the materialisation metadata the asset returns.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Callable

from dagster_pipes import PipesContext, open_dagster_pipes


def saliency_stop_figures(res) -> dict[str, Any]:
    """Which accuracy met the threshold, the original's smoothed training one, and the held-out figure
    measured on frames that did not decide the stop (rfp_core/train/saliency_stop.py); the asset
    reports the same when it trains in process."""
    figures: dict[str, Any] = {"stopped_by": res.stopped_by or ""}
    for k, v in (("train_accuracy", res.train_accuracy), ("report_accuracy", res.report_accuracy)):
        if v is not None:
            figures[k] = v
    return figures


def _step_logger(pipes: PipesContext, extras: dict[str, Any]) -> Callable[[dict, int], None]:
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    client = MlflowClient(extras["mlflow_uri"])
    run_id = extras["mlflow_run_id"]

    def log(metrics: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        client.log_batch(run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])
        values = {k: round(float(v), 6) for k, v in metrics.items()}
        pipes.log.info(f"{extras['phase']} step {step}: {json.dumps(values)}")
        pipes.report_custom_message({"step": step, "metrics": values})

    return log


def _phase_args(pipes: PipesContext, extras: dict[str, Any]) -> tuple[Any, tuple[Path, Path], dict[str, Any]]:
    """The phase's config (a file beside its work), its (manifest, out_dir) and the keywords every
    `train_*` takes here: device, the shared frame store, the step logger, no progress bar."""
    from rfp_core.config_files import config_from_dict
    from rfp_core.media.frame_store import FrameStore

    cfg_path = Path(extras["config"])
    cfg = config_from_dict(json.loads(cfg_path.read_text()), source=str(cfg_path))
    store = FrameStore(root=Path(extras["store_root"]), max_side=int(extras["store_max_side"]))
    keywords = {"device": extras["device"], "store": store, "log": _step_logger(pipes, extras), "progress": False}
    return cfg, (Path(extras["manifest"]), Path(extras["out_dir"])), keywords


def _path(value: Any) -> dict[str, str]:
    return {"raw_value": str(value), "type": "path"}


def _optional_path(value: str | None) -> Path | None:
    return Path(value) if value else None


def _report(pipes: PipesContext, **metadata: Any) -> None:
    pipes.report_asset_materialization(metadata={**metadata, "worker_pid": os.getpid()})


def codec(pipes: PipesContext, extras: dict[str, Any]) -> None:
    from rfp_core.train.codec import train_codec

    cfg, where, keywords = _phase_args(pipes, extras)
    res = train_codec(cfg, *where, **keywords)
    _report(
        pipes, recon_l1=res.recon_l1, recon_l1_init=res.recon_l1_init, steps=res.steps, checkpoint=_path(res.checkpoint)
    )


def saliency(pipes: PipesContext, extras: dict[str, Any]) -> None:
    from rfp_core.train.saliency import train_saliency

    cfg, where, keywords = _phase_args(pipes, extras)
    res = train_saliency(cfg, *where, codec_checkpoint=_optional_path(extras.get("codec_checkpoint")), **keywords)
    _report(
        pipes,
        accuracy=res.accuracy,
        steps=res.steps,
        warmed_up=res.warmed_up,
        **saliency_stop_figures(res),
        checkpoint=_path(res.checkpoint),
        state=_path(res.state_path),
    )


def velocity(pipes: PipesContext, extras: dict[str, Any]) -> None:
    from rfp_core.structure import read_pairs
    from rfp_core.train.velocity import NonFiniteLoss, train_velocity

    cfg, where, keywords = _phase_args(pipes, extras)
    pairs = extras.get("pairs")
    try:
        res = train_velocity(
            cfg,
            *where,
            saliency_checkpoint=_optional_path(extras.get("saliency_checkpoint")),
            codec_checkpoint=_optional_path(extras.get("codec_checkpoint")),
            pairs=read_pairs(pairs) if pairs else None,
            **keywords,
        )
    except NonFiniteLoss as exc:  # the asset fails it as it would in process: its check, its metadata
        last = str(exc.last_checkpoint) if exc.last_checkpoint else ""
        _report(pipes, non_finite_loss=str(exc), step=exc.step if exc.step is not None else -1, last_checkpoint=last)
        return
    _report(
        pipes,
        final_loss=res.final_loss,
        steps=res.steps,
        images_per_s=res.images_per_s,
        checkpoint=_path(res.checkpoint),
        sample_grid=str(res.sample_grid) if res.sample_grid else "",
        metrics=_path(res.metrics_path),
    )


PHASES = {"codec": codec, "saliency": saliency, "velocity": velocity}


def main() -> None:
    with open_dagster_pipes() as pipes:
        extras = dict(pipes.extras)
        phase = extras.get("phase")
        if phase not in PHASES:
            raise ValueError(f"pipes_worker: unknown phase {phase!r}; known: {sorted(PHASES)}")
        PHASES[phase](pipes, extras)


if __name__ == "__main__":
    main()
