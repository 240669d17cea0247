"""`rfp train`: one run folder = ingest -> config.json -> [codec (phase 0)] -> saliency (phase 1)
-> velocity (phase 2).

Mirrors the original `train.py --config --domain0 --domain1 [--checkpoint] [--run-id] [--dev]`.
Re-running with the same `--run-id` continues: ingest re-decodes nothing, a finished saliency
phase is skipped, and velocity resumes from `--checkpoint` or the newest intermediate checkpoint -
as long as each phase is built from the same inputs (data, config, the checkpoints it reads; see
`train/resume.py`). Otherwise the call is refused with what changed, unless `--restart` (force)
asks to train those phases afresh in the folder (their old files move to `superseded/`).
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from rfp_core.atomic import atomic_write_text
from rfp_core.config import ConfigError, ModelConfig
from rfp_core.config_files import config_from_dict
from rfp_core.device import pick_device
from rfp_core.paths import resolve_against_root, runs_dir


def smoke_config(cfg: ModelConfig) -> ModelConfig:
    """`--smoke`: a budget of 20 optimizer steps, frequent samples and capped saliency steps."""
    v, s = cfg.velocity, cfg.saliency
    return config_from_dict(
        cfg.model_dump(mode="json"),
        source="--smoke",
        overrides={
            "velocity": {
                "train_images": 20 * v.train_batch_size,
                "sample_every_images": 5 * v.train_batch_size,
                "checkpoint_every_minutes": 1.0,
            },
            "saliency": {"max_steps": min(cfg.saliency_step_limit, 500), "eval_every": min(s.eval_every, 25)},
        },
    )


def default_run_id(dev: bool) -> str:
    """`run_<YYYYmmddHHMM>`, `_dev` appended in dev mode: the original trainer's run names."""
    return time.strftime("run_%Y%m%d%H%M") + ("_dev" if dev else "")


def folders(value: list[str] | str | None, flag: str) -> list[Path] | str:
    if value is None or value == []:
        raise ConfigError(f'no {flag}: pass --{flag} DIR... on the command line or set "{flag}" in the config')
    if value == "random" or value == ["random"]:
        if flag == "domain1":
            raise ConfigError("domain1 cannot be 'random': it names the target image folders")
        return "random"
    out = []
    for item in [value] if isinstance(value, str) else value:
        p = Path(item).expanduser()
        p = p if p.exists() else resolve_against_root(p)
        if not p.exists():
            raise ConfigError(f"{flag}: folder {item} does not exist")
        out.append(p.resolve())
    return out


@dataclass
class Imports:
    """Checkpoints to start from instead of training a phase (the original's --*-ckpt flags)."""

    codec: Path | None = None
    saliency: Path | None = None
    velocity: Path | None = None


def train_run(
    cfg: ModelConfig,
    domain0: list[Path] | str,
    domain1: list[Path],
    run_id: str | None = None,
    checkpoint: Path | None = None,
    dev: bool = False,
    device: str | torch.device | None = None,
    progress: bool = True,
    imports: Imports | None = None,
    only: str | None = None,
    smoke: bool = False,
    track: bool = False,
    force: bool = False,
    paired: bool = False,
) -> Path:
    """Run every phase into `$RFP_HOME/runs/<run_id>/` and return that folder.

    `only`: "codec" or "saliency" stops after that phase (--codec-only, --saliency-only).
    `track`: one MLflow run for the whole training (params, per-phase metrics, artifacts).
    `force`: a phase whose saved work is built from other inputs trains afresh (instead of a
    ResumeRefused); phases built from the same inputs still continue.
    `paired`: domain-0 and domain-1 files with the same stem are true pairs (pix2pix); the velocity
    is fitted on them with plain MSE and no saliency phase (rfp_core/flow/paired.py).
    """
    from rfp_core.media.frame_store import FrameStore
    from rfp_core.media.ingest import ingest
    from rfp_core.train import distributed

    # under torchrun: this rank's device; rank 0 ingests, writes the config and tracks (the others wait)
    world, device = distributed.init(pick_device(device))
    run_id = run_id or default_run_id(dev)
    run_dir = runs_dir() / run_id
    run_dir.mkdir(parents=True, exist_ok=True)
    imports = imports or Imports()
    if smoke:
        cfg = smoke_config(cfg)
    cfg = config_from_dict(
        cfg.model_dump(mode="json"),
        source="rfp train",
        overrides={
            "domain0": "random" if domain0 == "random" else [str(p) for p in domain0],
            "domain1": [str(p) for p in domain1],
        },
    )
    print(f"run {run_id}: {run_dir} (device {device})", file=sys.stderr)
    store = FrameStore(max_side=cfg.store_max_side)
    report = world.from_main(
        lambda: ingest(domain0, list(domain1), out=run_dir / "manifest.parquet", store=store, progress=progress)
    )
    print(f"ingest: {report.n_ok} frames, {report.n_skipped} skipped -> {report.manifest_path}", file=sys.stderr)
    if world.main:
        atomic_write_text(run_dir / "config.json", cfg.to_json() + "\n")
    with _tracked(track and world.main, cfg, run_id, run_dir) as log:
        if paired:
            _paired_phases(cfg, report.manifest_path, run_dir, store, device, progress, imports, only, force, log)
        else:
            _phases(cfg, report.manifest_path, run_dir, store, device, progress, imports, only, checkpoint, log, force)
    return run_dir


@contextlib.contextmanager
def _tracked(track: bool, cfg: ModelConfig, run_id: str, run_dir: Path):
    if not track:
        yield None
        return
    import mlflow

    from rfp_core import tracking

    with tracking.start_run("rfp-train", run_id, {"stage": "train", "run_dir": str(run_dir)}):
        mlflow.log_params(cfg.flat_params())
        mlflow.log_artifact(str(run_dir / "config.json"), "config")
        yield tracking.metric_logger()
        for grid in sorted((run_dir / "samples").glob("*.png"))[-1:]:
            mlflow.log_artifact(str(grid), "samples")


def _phases(cfg, manifest, run_dir, store, device, progress, imports: Imports, only, checkpoint, log, force) -> None:
    from rfp_core.train import distributed
    from rfp_core.train.velocity import train_velocity

    codec_ckpt = _codec_checkpoint(cfg, manifest, run_dir, store, device, progress, imports, force, log)
    if only == "codec":
        return
    saliency_ckpt = None
    if imports.saliency is not None:
        saliency_ckpt = distributed.world().from_main(lambda: import_saliency(imports.saliency, cfg, run_dir))
    elif cfg.needs_saliency:
        saliency_ckpt = _saliency_phase(cfg, manifest, run_dir, store, device, progress, codec_ckpt, log, force)
    if only == "saliency":
        return
    pairs = distributed.world().from_main(lambda: _structure_pairs(cfg, manifest, run_dir, store, device, progress))
    vel = train_velocity(
        cfg,
        manifest,
        run_dir,
        device=device,
        saliency_checkpoint=saliency_ckpt,
        store=store,
        resume_from=imports.velocity or checkpoint,
        codec_checkpoint=codec_ckpt,
        progress=progress,
        pairs=pairs,
        log=log,
        force=force,
    )
    print(
        f"velocity: {vel.steps} steps, final loss {vel.final_loss:.5f}, {vel.images_per_s:.1f} images/s "
        f"-> {vel.checkpoint}",
        file=sys.stderr,
    )


def _codec_checkpoint(cfg, manifest, run_dir, store, device, progress, imports: Imports, force, log) -> Path | None:
    """Phase 0: the imported codec, else a trained one (None for Identity: the later phases work in pixels)."""
    from rfp_core.train import distributed

    if imports.codec is not None:
        return distributed.world().from_main(lambda: import_codec(imports.codec, cfg, run_dir))
    if cfg.codec.net.type == "Identity":
        return None
    from rfp_core.train.codec import train_codec

    # not data-parallel: under torchrun rank 0 trains it while the others wait
    codec = distributed.world().from_main(
        lambda: _codec_phase(train_codec, cfg, manifest, run_dir, device, store, progress, force, log)
    )
    print(f"codec: held-out L1 {codec.recon_l1:.4f} after {codec.steps} steps -> {codec.checkpoint}", file=sys.stderr)
    return codec.checkpoint


def _saliency_phase(cfg, manifest, run_dir, store, device, progress, codec_ckpt, log, force) -> Path:
    from rfp_core.train.saliency import train_saliency

    sal = train_saliency(
        cfg,
        manifest,
        run_dir,
        device=device,
        store=store,
        progress=progress,
        codec_checkpoint=codec_ckpt,
        log=log,
        force=force,
    )
    reported = "" if sal.report_accuracy is None else f", reported held-out accuracy {sal.report_accuracy:.4f}"
    print(
        f"saliency: {sal.stopped_by or cfg.saliency.stop_on} accuracy {sal.accuracy:.4f}{reported} after "
        f"{sal.steps} steps -> {sal.checkpoint}",
        file=sys.stderr,
    )
    return sal.checkpoint


def _paired_phases(cfg, manifest, run_dir, store, device, progress, imports: Imports, only, force, log) -> None:
    """Paired mode: the codec (trained or imported) as in unpaired mode, then the velocity on true pairs."""
    from rfp_core.train.paired import train_paired

    codec_ckpt = _codec_checkpoint(cfg, manifest, run_dir, store, device, progress, imports, force, log)
    if only is not None:
        return
    train_paired(cfg, manifest, run_dir, store=store, device=device, codec_checkpoint=codec_ckpt, progress=progress)


def import_codec(path: Path, cfg: ModelConfig, run_dir: Path) -> Path:
    """A codec checkpoint (the original's codec_*.ckpt or this project's codec.pt) as this run's codec.pt."""
    from rfp_core.checkpoint import save_checkpoint
    from rfp_core.nets.autoencoder import build_codec
    from rfp_core.original import load_into

    if Path(path).suffix != ".ckpt":
        return Path(path)
    codec = load_into(build_codec(cfg.codec.net), path)
    out = run_dir / "codec.pt"
    save_checkpoint(
        out,
        {
            "codec": codec.state_dict(),
            "config": json.loads(cfg.to_json()),
            "finished": True,
            "recon_l1": float("nan"),
            "recon_l1_init": float("nan"),
            "steps": 0,
            "imported_from": str(path),
        },
    )
    return out


def import_saliency(path: Path, cfg: ModelConfig, run_dir: Path) -> Path:
    """A saliency checkpoint (the original's saliency_*.ckpt or this project's saliency.pt) as this run's."""
    from rfp_core.checkpoint import save_checkpoint
    from rfp_core.nets.autoencoder import build_codec
    from rfp_core.nets.saliency import SaliencyNet
    from rfp_core.original import load_into, load_state

    if Path(path).suffix != ".ckpt":
        return Path(path)
    holder, _ = load_state(path)
    in_channels = int(holder.get("in_channels", build_codec(cfg.codec.net).latent_channels))
    net_cfg = cfg.saliency.net.model_copy(update={"pretrained": False})
    net = load_into(SaliencyNet(net_cfg, in_channels=in_channels), path)
    out = run_dir / "saliency_imported.pt"
    save_checkpoint(
        out,
        {
            "saliency": net.state_dict(),
            "config": json.loads(cfg.to_json()),
            "net": net_cfg.model_dump(mode="json"),
            "in_channels": in_channels,
            "latent_input": in_channels != 3,
            "imported_from": str(path),
        },
    )
    return out


CODEC_LINEAGE = "codec_lineage.json"


def _codec_phase(
    train_codec, cfg: ModelConfig, manifest: Path, run_dir: Path, device, store, progress: bool, force: bool, log=None
):
    """train_codec reuses a finished codec.pt of the same codec config; this makes sure it was also
    trained on the same frames (recorded in codec_lineage.json beside it). The record is written
    before training, so a codec.pt checkpointed part way (then killed) is known to belong to it."""
    from rfp_core.train.resume import codec_inputs, continue_saved, lineage_record, saved_json

    inputs = codec_inputs(json.loads(cfg.to_json()), manifest)
    saved = (saved_json(run_dir / CODEC_LINEAGE) or {}) if (run_dir / "codec.pt").exists() else None
    continue_saved("codec", run_dir, saved, inputs, force, ("codec.pt", CODEC_LINEAGE))
    atomic_write_text(run_dir / CODEC_LINEAGE, json.dumps(lineage_record(inputs), indent=2) + "\n")
    return train_codec(cfg, manifest, run_dir, device=device, store=store, progress=progress, log=log)


def _structure_pairs(cfg: ModelConfig, manifest: Path, run_dir: Path, store, device, progress: bool):
    """Structure-aware pairing (optional): top-k domain-1 candidates per domain-0 frame, plus a proof sheet."""
    if not cfg.structure.pairing or cfg.generative:
        return None
    from rfp_core.structure import pair_manifest, proof_sheet, write_pairs

    pairs = pair_manifest(manifest, store, cfg.structure, device=device, progress=progress)
    write_pairs(pairs, run_dir / "pairs.parquet")
    proof_sheet(pairs, store).save(run_dir / "proof_sheet.png")
    print(
        f"pairing: {pairs.num_rows} candidate pairs ({cfg.structure.encoder}) -> {run_dir / 'pairs.parquet'}",
        file=sys.stderr,
    )
    return pairs
