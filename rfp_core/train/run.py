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

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from rfp_core.atomic import atomic_write_text
from rfp_core.config import ConfigError, ModelConfig, config_from_dict, load_config
from rfp_core.paths import resolve_against_root, runs_dir


def pick_device(requested: str | torch.device | None = None) -> torch.device:
    """`requested` if given (and usable), else CUDA, then MPS, then CPU."""
    if requested is not None:
        device = torch.device(requested)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"--device {requested}: CUDA is not available on this machine; use --device cpu")
        if device.type == "mps" and not torch.backends.mps.is_available():
            raise ConfigError(f"--device {requested}: MPS is not available on this machine; use --device cpu")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def dev_config(cfg: ModelConfig) -> ModelConfig:
    """`--dev`: a budget of 20 optimizer steps, frequent samples and capped saliency steps."""
    v, s = cfg.velocity, cfg.saliency
    return config_from_dict(cfg.model_dump(mode="json"), source="--dev", overrides={
        "velocity": {"train_images": 20 * v.train_batch_size, "sample_every_images": 5 * v.train_batch_size,
                     "checkpoint_every_minutes": 1.0},
        "saliency": {"max_steps": min(s.max_steps, 500), "eval_every": min(s.eval_every, 25)},
    })


def _folders(value: list[str] | str | None, flag: str) -> list[Path] | str:
    if value is None or value == []:
        raise ConfigError(f"no {flag}: pass --{flag} DIR... on the command line or set \"{flag}\" in the config")
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


def train_run(
    cfg: ModelConfig,
    domain0: list[Path] | str,
    domain1: list[Path],
    run_id: str | None = None,
    checkpoint: Path | None = None,
    dev: bool = False,
    device: str | torch.device | None = None,
    progress: bool = True,
    force: bool = False,
) -> Path:
    """Run every phase into `$RFP_HOME/runs/<run_id>/` and return that folder.

    `force`: a phase whose saved work is built from other inputs trains afresh (instead of a
    ResumeRefused); phases built from the same inputs still continue."""
    from rfp_core.frame_store import FrameStore
    from rfp_core.ingest import ingest
    from rfp_core.train.saliency import train_saliency
    from rfp_core.train.velocity import train_velocity

    device = pick_device(device)
    run_id = run_id or time.strftime("%Y%m%d-%H%M%S")
    run_dir = runs_dir() / run_id
    run_dir.mkdir(parents=True, exist_ok=True)
    if dev:
        cfg = dev_config(cfg)
    cfg = config_from_dict(cfg.model_dump(mode="json"), source="rfp train", overrides={
        "domain0": "random" if domain0 == "random" else [str(p) for p in domain0],
        "domain1": [str(p) for p in domain1],
    })
    print(f"run {run_id}: {run_dir} (device {device})", file=sys.stderr)

    store = FrameStore(max_side=cfg.store_max_side)
    report = ingest(domain0, list(domain1), out=run_dir / "manifest.parquet", store=store, progress=progress)
    print(f"ingest: {report.n_ok} frames, {report.n_skipped} skipped -> {report.manifest_path}", file=sys.stderr)
    atomic_write_text(run_dir / "config.json", cfg.to_json() + "\n")

    codec_ckpt = None
    if cfg.codec.net.type != "Identity":  # phase 0: the later phases work in its latent space
        from rfp_core.train.codec import train_codec

        codec = _codec_phase(train_codec, cfg, report.manifest_path, run_dir, device, store, progress, force)
        print(f"codec: held-out L1 {codec.recon_l1:.4f} after {codec.steps} steps -> {codec.checkpoint}", file=sys.stderr)
        codec_ckpt = codec.checkpoint
    saliency_ckpt = None
    if not cfg.generative and cfg.velocity.loss == "saliency":
        sal = train_saliency(cfg, report.manifest_path, run_dir, device=device, store=store, progress=progress,
                             codec_checkpoint=codec_ckpt, force=force)
        print(f"saliency: held-out accuracy {sal.accuracy:.4f} after {sal.steps} steps -> {sal.checkpoint}", file=sys.stderr)
        saliency_ckpt = sal.checkpoint
    pairs = _structure_pairs(cfg, report.manifest_path, run_dir, store, device, progress)
    vel = train_velocity(cfg, report.manifest_path, run_dir, device=device, saliency_checkpoint=saliency_ckpt,
                         store=store, resume_from=checkpoint, codec_checkpoint=codec_ckpt, progress=progress,
                         pairs=pairs, force=force)
    print(f"velocity: {vel.steps} steps, final loss {vel.final_loss:.5f}, {vel.images_per_s:.1f} images/s "
          f"-> {vel.checkpoint}", file=sys.stderr)
    return run_dir


CODEC_LINEAGE = "codec_lineage.json"


def _codec_phase(train_codec, cfg: ModelConfig, manifest: Path, run_dir: Path, device, store, progress: bool, force: bool):
    """train_codec reuses a finished codec.pt of the same codec config; this makes sure it was also
    trained on the same frames (recorded in codec_lineage.json beside it)."""
    from rfp_core.train.resume import codec_inputs, continue_saved, lineage_record, saved_json

    inputs = codec_inputs(json.loads(cfg.to_json()), manifest)
    saved = (saved_json(run_dir / CODEC_LINEAGE) or {}) if (run_dir / "codec.pt").exists() else None
    continue_saved("codec", run_dir, saved, inputs, force, ("codec.pt", CODEC_LINEAGE))
    codec = train_codec(cfg, manifest, run_dir, device=device, store=store, progress=progress)
    atomic_write_text(run_dir / CODEC_LINEAGE, json.dumps(lineage_record(inputs), indent=2) + "\n")
    return codec


def _structure_pairs(cfg: ModelConfig, manifest: Path, run_dir: Path, store, device, progress: bool):
    """Structure-aware pairing (optional): top-k domain-1 candidates per domain-0 frame, plus a proof sheet."""
    if not cfg.structure.pairing or cfg.generative:
        return None
    from rfp_core.structure import pair_manifest, proof_sheet, write_pairs

    pairs = pair_manifest(manifest, store, cfg.structure, device=device, progress=progress)
    write_pairs(pairs, run_dir / "pairs.parquet")
    proof_sheet(pairs, store).save(run_dir / "proof_sheet.png")
    print(f"pairing: {pairs.num_rows} candidate pairs ({cfg.structure.encoder}) -> {run_dir / 'pairs.parquet'}",
          file=sys.stderr)
    return pairs


def cli_train(args: argparse.Namespace) -> int:
    from rfp_core.checkpoint import CheckpointError
    from rfp_core.train.resume import ResumeRefused
    from rfp_core.train.saliency import SaliencyThresholdNotReached
    from rfp_core.train.velocity import NonFiniteLoss

    cfg = load_config(args.config)
    domain0 = _folders(args.domain0 if args.domain0 else cfg.domain0, "domain0")
    domain1 = _folders(args.domain1 if args.domain1 else cfg.domain1, "domain1")
    checkpoint = Path(args.checkpoint) if args.checkpoint else None
    if checkpoint is not None and not checkpoint.is_file():
        raise ConfigError(f"--checkpoint {checkpoint}: no such file")
    try:
        run_dir = train_run(cfg, domain0, domain1, run_id=args.run_id, checkpoint=checkpoint, dev=args.dev,
                            device=args.device, force=args.restart)
    except (SaliencyThresholdNotReached, NonFiniteLoss, CheckpointError, ResumeRefused) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(run_dir)
    return 0
