"""Training out of process through Dagster Pipes, behind a resource switch (default: in process).

`TrainingLauncher.train_saliency(...)` is a drop-in for `rfp_core.train.saliency.train_saliency`
inside the saliency asset: in process it calls it; with mode "pipes" it starts
`python -m rfp_pipeline.pipes_worker` through `dg.PipesSubprocessClient`. The worker trains there
(its own interpreter: another CUDA context, another environment, a crash that does not take the
run worker down), logs per-step metrics into the asset's open MLflow run and streams them back as
Pipes log lines and custom messages, then reports the materialisation metadata the asset returns.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import dagster as dg
from pydantic import Field

from rfp_core.atomic import atomic_write_text

MODES = ("in_process", "pipes")
WORKER_MODULE = "rfp_pipeline.pipes_worker"
# the folder holding rfp_core/ and rfp_pipeline/: the worker imports this checkout, not another install
PACKAGE_ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Launched:
    """What a training phase returned, wherever it ran; `metadata` holds what the worker reported."""

    result: Any
    metadata: dict[str, Any] = field(default_factory=dict)
    step_messages: list[dict] = field(default_factory=list)


class TrainingLauncher(dg.ConfigurableResource):
    """Where training phases run: in the Dagster step's process (default) or a Pipes subprocess."""

    mode: str = Field(default="", description="in_process or pipes; empty = $RFP_TRAINING_LAUNCHER or in_process")
    python: str = Field(default="", description="interpreter of the Pipes training process; empty = this one")

    def resolved_mode(self) -> str:
        mode = self.mode or os.environ.get("RFP_TRAINING_LAUNCHER", "") or "in_process"
        if mode not in MODES:
            raise ValueError(f"training launcher mode '{mode}' is not one of {MODES}: fix the resource config "
                             "or $RFP_TRAINING_LAUNCHER")
        return mode

    def train_saliency(
        self,
        context: dg.AssetExecutionContext,
        cfg,
        manifest: Path,
        out_dir: Path,
        *,
        device: str,
        store,
        codec_checkpoint: Path | None,
        log: Callable[[dict, int], None],
        mlflow_uri: str,
        mlflow_run_id: str,
    ) -> Launched:
        """Train the saliency classifier; `log` is the in-process metric logger, the worker logs to
        `mlflow_run_id` at `mlflow_uri` itself."""
        if self.resolved_mode() == "in_process":
            from rfp_core.train.saliency import train_saliency

            return Launched(train_saliency(cfg, manifest, out_dir, device=device, store=store, log=log,
                                           codec_checkpoint=codec_checkpoint, progress=False))
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        config_path = atomic_write_text(out_dir / "pipes_config.json", cfg.to_json())
        extras = {
            "phase": "saliency", "config": str(config_path), "manifest": str(manifest), "out_dir": str(out_dir),
            "device": device, "store_root": str(store.root), "store_max_side": store.max_side,
            "codec_checkpoint": str(codec_checkpoint) if codec_checkpoint else None,
            "mlflow_uri": mlflow_uri, "mlflow_run_id": mlflow_run_id,
        }
        invocation = self._run(context, extras)
        metadata = {k: v.value for k, v in invocation.get_materialize_result().metadata.items()}
        from rfp_core.train.saliency import SaliencyResult

        result = SaliencyResult(checkpoint=Path(metadata["checkpoint"]), state_path=Path(metadata["state"]),
                                accuracy=float(metadata["accuracy"]), steps=int(metadata["steps"]),
                                warmed_up=bool(metadata["warmed_up"]), stopped_by=metadata.get("stopped_by") or None,
                                train_accuracy=_number(metadata.get("train_accuracy")),
                                report_accuracy=_number(metadata.get("report_accuracy")))
        steps = [m for m in invocation.get_custom_messages() if isinstance(m, dict) and "step" in m]
        return Launched(result, {"launcher": "pipes", "pipes_steps_streamed": len(steps),
                                 "worker_pid": int(metadata["worker_pid"])}, steps)

    def _run(self, context: dg.AssetExecutionContext, extras: dict[str, Any]) -> dg.PipesClientCompletedInvocation:
        path = os.environ.get("PYTHONPATH", "")
        env = {"PYTHONPATH": os.pathsep.join([str(PACKAGE_ROOT), *([path] if path else [])])}
        client = dg.PipesSubprocessClient(env=env, cwd=str(PACKAGE_ROOT))
        command = [self.python or sys.executable, "-m", WORKER_MODULE]
        context.log.info(f"training {extras['phase']} out of process: {' '.join(command)} ({json.dumps(extras['device'])})")
        return client.run(context=context, command=command, extras=extras)


def _number(value) -> float | None:
    """A float metadata value that is left out when there is none."""
    return None if value is None else float(value)
