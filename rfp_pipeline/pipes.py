"""Training out of process through Dagster Pipes, behind a resource switch (default: in process).

`TrainingLauncher.train_codec(...)` / `.train_saliency(...)` / `.train_velocity(...)` are drop-ins
for `rfp_core.train.{codec,saliency,velocity}.train_*` inside the three training assets: in process
they call them; with mode "pipes" they start
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
            raise ValueError(
                f"training launcher mode '{mode}' is not one of {MODES}: fix the resource config "
                "or $RFP_TRAINING_LAUNCHER"
            )
        return mode

    def train_codec(
        self,
        context: dg.AssetExecutionContext,
        cfg,
        manifest: Path,
        out_dir: Path,
        *,
        device: str,
        store,
        log: Callable[[dict, int], None],
        mlflow_uri: str,
        mlflow_run_id: str,
    ) -> Launched:
        """Train the codec (phase 0); an unfinished codec.pt in `out_dir` is continued wherever it runs."""
        from rfp_core.train.codec import CodecResult, train_codec

        if self.resolved_mode() == "in_process":
            return Launched(train_codec(cfg, manifest, out_dir, device=device, store=store, log=log, progress=False))
        invocation = self._run(
            context, _extras("codec", cfg, manifest, out_dir, device, store, None, mlflow_uri, mlflow_run_id)
        )
        md = {k: v.value for k, v in invocation.get_materialize_result().metadata.items()}
        result = CodecResult(
            checkpoint=Path(md["checkpoint"]),
            recon_l1=float(md["recon_l1"]),
            steps=int(md["steps"]),
            recon_l1_init=float(md["recon_l1_init"]),
        )
        return _launched(result, invocation, md)

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

            return Launched(
                train_saliency(
                    cfg,
                    manifest,
                    out_dir,
                    device=device,
                    store=store,
                    log=log,
                    codec_checkpoint=codec_checkpoint,
                    progress=False,
                )
            )
        extras = _extras("saliency", cfg, manifest, out_dir, device, store, codec_checkpoint, mlflow_uri, mlflow_run_id)
        invocation = self._run(context, extras)
        metadata = {k: v.value for k, v in invocation.get_materialize_result().metadata.items()}
        from rfp_core.train.saliency import SaliencyResult

        result = SaliencyResult(
            checkpoint=Path(metadata["checkpoint"]),
            state_path=Path(metadata["state"]),
            accuracy=float(metadata["accuracy"]),
            steps=int(metadata["steps"]),
            warmed_up=bool(metadata["warmed_up"]),
            stopped_by=metadata.get("stopped_by") or None,
            train_accuracy=_number(metadata.get("train_accuracy")),
            report_accuracy=_number(metadata.get("report_accuracy")),
        )
        return _launched(result, invocation, metadata)

    def train_velocity(
        self,
        context: dg.AssetExecutionContext,
        cfg,
        manifest: Path,
        out_dir: Path,
        *,
        device: str,
        store,
        saliency_checkpoint: Path | None,
        codec_checkpoint: Path | None,
        pairs_path: str | None,
        log: Callable[[dict, int], None],
        mlflow_uri: str,
        mlflow_run_id: str,
        paired: bool = False,
    ) -> Launched:
        """Train the velocity net; it resumes from the newest checkpoint of its lineage in `out_dir`
        wherever it runs, so a retry after a killed worker continues. A NaN loss in the worker is
        raised here as the same NonFiniteLoss an in-process run raises. `paired`: on the experiment's
        filename pairs (`"pairing": "filenames"`), in this process whatever the mode."""
        from rfp_core.train.velocity import NonFiniteLoss, VelocityResult, train_velocity

        if paired:
            return train_on_filename_pairs(cfg, manifest, out_dir, device, store, saliency_checkpoint, codec_checkpoint)
        if self.resolved_mode() == "in_process":
            from rfp_core.structure import read_pairs

            return Launched(
                train_velocity(
                    cfg,
                    manifest,
                    out_dir,
                    device=device,
                    saliency_checkpoint=saliency_checkpoint,
                    store=store,
                    log=log,
                    progress=False,
                    pairs=read_pairs(pairs_path) if pairs_path else None,
                    codec_checkpoint=codec_checkpoint,
                )
            )
        extras = _extras("velocity", cfg, manifest, out_dir, device, store, codec_checkpoint, mlflow_uri, mlflow_run_id)
        extras.update(saliency_checkpoint=str(saliency_checkpoint) if saliency_checkpoint else None, pairs=pairs_path)
        invocation = self._run(context, extras)
        md = {k: v.value for k, v in invocation.get_materialize_result().metadata.items()}
        if md.get("non_finite_loss"):
            last = md.get("last_checkpoint") or None
            raise NonFiniteLoss(
                md["non_finite_loss"], step=int(md["step"]), last_checkpoint=Path(last) if last else None
            )
        result = VelocityResult(
            checkpoint=Path(md["checkpoint"]),
            final_loss=float(md["final_loss"]),
            steps=int(md["steps"]),
            images_per_s=float(md["images_per_s"]),
            sample_grid=Path(md["sample_grid"]) if md.get("sample_grid") else None,
            metrics_path=Path(md["metrics"]),
        )
        return _launched(result, invocation, md)

    def _run(self, context: dg.AssetExecutionContext, extras: dict[str, Any]) -> dg.PipesClientCompletedInvocation:
        path = os.environ.get("PYTHONPATH", "")
        env = {"PYTHONPATH": os.pathsep.join([str(PACKAGE_ROOT), *([path] if path else [])])}
        client = dg.PipesSubprocessClient(env=env, cwd=str(PACKAGE_ROOT))
        command = [self.python or sys.executable, "-m", WORKER_MODULE]
        context.log.info(
            f"training {extras['phase']} out of process: {' '.join(command)} ({json.dumps(extras['device'])})"
        )
        return client.run(context=context, command=command, extras=extras)


def train_on_filename_pairs(
    cfg, manifest: Path, out_dir: Path, device: str, store, saliency_checkpoint, codec_checkpoint
) -> Launched:
    """Paired mode (rfp_core/train/paired.py): the velocity fitted on the same-stem pairs, and the
    materialisation metadata that says which pairs those were and which files were left out."""
    from rfp_core.train.paired import fit_paired

    res = fit_paired(
        cfg,
        manifest,
        out_dir,
        store=store,
        device=device,
        loss=cfg.velocity.loss,
        saliency_checkpoint=saliency_checkpoint,
        codec_checkpoint=codec_checkpoint,
        progress=False,
    )
    only0, only1 = res.unmatched
    shown = lambda stems: ", ".join(stems[:20]) + (f" (+{len(stems) - 20})" if len(stems) > 20 else "")  # noqa: E731
    metadata = {
        "pairing": "filenames",
        "pairs": res.pairs.num_rows,
        "pairs_file": dg.MetadataValue.path(str(Path(out_dir) / "pairs.parquet")),
        "velocity_loss": cfg.velocity.loss,
        "unmatched_domain0": len(only0),
        "unmatched_domain1": len(only1),
    }
    if only0 or only1:
        metadata["left_out"] = dg.MetadataValue.text(
            f"domain 0: {shown(only0) or '-'}; domain 1: {shown(only1) or '-'}"
        )
    return Launched(res, metadata)


def _extras(
    phase: str,
    cfg,
    manifest: Path,
    out_dir: Path,
    device: str,
    store,
    codec_checkpoint: Path | None,
    mlflow_uri: str,
    mlflow_run_id: str,
) -> dict[str, Any]:
    """What every phase's worker needs, as Pipes extras (the config travels as a file beside its work)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config_path = atomic_write_text(out_dir / "pipes_config.json", cfg.to_json())
    return {
        "phase": phase,
        "config": str(config_path),
        "manifest": str(manifest),
        "out_dir": str(out_dir),
        "device": device,
        "store_root": str(store.root),
        "store_max_side": store.max_side,
        "codec_checkpoint": str(codec_checkpoint) if codec_checkpoint else None,
        "mlflow_uri": mlflow_uri,
        "mlflow_run_id": mlflow_run_id,
    }


def _launched(result: Any, invocation: dg.PipesClientCompletedInvocation, metadata: dict[str, Any]) -> Launched:
    steps = [m for m in invocation.get_custom_messages() if isinstance(m, dict) and "step" in m]
    return Launched(
        result,
        {"launcher": "pipes", "pipes_steps_streamed": len(steps), "worker_pid": int(metadata["worker_pid"])},
        steps,
    )


def _number(value) -> float | None:
    """A float metadata value that is left out when there is none."""
    return None if value is None else float(value)
