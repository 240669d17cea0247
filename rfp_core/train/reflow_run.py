"""`rfp reflow`: k-RF rounds and one-step distillation inside a trained run folder.

    <run>/velocity.pt            1-RF (phase 2)
    <run>/reflow_1/velocity.pt   2-RF, trained on (z0, ODE_1RF(z0))
    <run>/reflow_2/velocity.pt   3-RF, on (z0, ODE_2RF(z0)), ...
    <run>/distilled/velocity.pt  one-step map fitted to the newest flow's couplings
    <run>/reflow_report.{md,json} straightness and steps table on held-out inputs

Every product is a velocity checkpoint in phase 2's format (plus a "reflow" entry), so
`Translator.from_run(<that file>)` and `rfp translate --run <that file>` use it as is. A product
whose checkpoint was made from the same couplings and settings is kept, not retrained.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from rfp_core.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from rfp_core.config import ConfigError
from rfp_core.reflow import Couplings, Solver, file_digest, frame_source, generate_couplings, noise_source
from rfp_core.train.reflow import FitSettings, Loss, build_velocity_net, coupling_batches, fit

DEFAULT_GENERATIVE_PAIRS = 1024


@dataclass
class ReflowResult:
    flows: list[Path] = field(default_factory=list)  # reflow_1/velocity.pt, ...
    distilled: Path | None = None
    couplings: list[Couplings] = field(default_factory=list)
    trained: list[Path] = field(default_factory=list)  # products (re)trained by this call


def _translator(path: Path, device):
    from rfp_core.translate import Translator

    return Translator.from_run(path, device=device)


def _source(run_dir: Path, tr, pairs: int | None):
    cfg = tr.cfg
    if cfg.generative:
        side = cfg.max_size // tr.codec.downsample
        return noise_source(pairs or DEFAULT_GENERATIVE_PAIRS, (tr.codec.latent_channels, side, side), cfg.seed)
    from rfp_core.frame_store import FrameStore

    manifest = run_dir / "manifest.parquet"
    if not manifest.is_file():
        raise ConfigError(f"{run_dir}: no manifest.parquet; reflow needs the run's training frames (rfp train writes it)")
    return frame_source(manifest, FrameStore(max_side=cfg.store_max_side), cfg.max_size, tr.encode,
                        cfg.saliency.holdout_fraction, split="train", limit=pairs)


def _saliency_h(run_dir: Path, loss: Loss, device):
    if loss != "saliency":
        return None
    from rfp_core.train.saliency import load_saliency

    path = run_dir / "saliency.pt"
    if not path.is_file():
        raise ConfigError(f"{path} does not exist: loss 'saliency' needs the run's saliency checkpoint; use --loss mse")
    net = load_saliency(path, device)
    return net.frozen_h() if hasattr(net, "frozen_h") else net.h


def _is_current(path: Path, meta: dict) -> bool:
    try:
        return path.is_file() and load_checkpoint(path).get("reflow") == meta
    except CheckpointError:
        return False


def train_product(run_dir: Path, source_ckpt: Path, couplings: Couplings, out: Path, settings: FitSettings, *,
                  kind: str, round_: int, device, h=None, from_scratch: bool = False, progress: bool = True) -> bool:
    """Train one k-RF or distilled checkpoint at `out` from `couplings`; False when it was current."""
    meta = {"kind": kind, "round": round_, "couplings": couplings.digest, "source": str(source_ckpt.relative_to(run_dir))
            if source_ckpt.is_relative_to(run_dir) else str(source_ckpt), "source_digest": file_digest(source_ckpt),
            "settings": settings.as_dict(), "from_scratch": from_scratch}
    if _is_current(out, meta):
        print(f"reflow: {out} is current (same couplings and settings); kept", file=sys.stderr)
        return False
    src = load_checkpoint(source_ckpt)
    from rfp_core.config import config_from_dict

    cfg = config_from_dict(src["config"], source=str(source_ckpt))
    torch.manual_seed(settings.seed)
    net = build_velocity_net(cfg, int(src["in_channels"]))
    if not from_scratch:  # start from the flow that made the couplings (reflow fine-tunes it)
        net.load_state_dict(src["velocity"] if "velocity" in src else src["ema"]["model"])
    z0, z1 = couplings.load()
    result = fit(net, coupling_batches(z0, z1, settings.batch_size, settings.seed), settings, device=device, h=h,
                 state_path=out.parent / "state.pt", fingerprint={"meta": meta}, checkpoint_every=max(1, settings.steps // 10),
                 progress=progress, desc=kind if kind == "distilled" else f"reflow {round_}")
    save_checkpoint(out, {"velocity": result.model.state_dict(), "config": src["config"], "in_channels": src["in_channels"],
                          "step": result.steps, "final_loss": result.final_loss, "codec": src.get("codec") or {},
                          "reflow": meta})
    (out.parent / "state.pt").unlink(missing_ok=True)
    print(f"reflow: {kind} {out} ({result.steps} steps, final loss {result.final_loss:.5f})", file=sys.stderr)
    return True


def reflow_run(run_dir: str | Path, rounds: int = 1, pairs: int | None = None, distill: bool = False,
               solver: Solver | None = None, train_steps: int | None = None, loss: Loss = "mse",
               from_scratch: bool = False, shard_size: int = 64, device=None, progress: bool = True) -> ReflowResult:
    """`rounds` reflow rounds on top of `<run_dir>/velocity.pt`, then (with `distill`) a one-step map."""
    from rfp_core.train.run import pick_device

    run_dir, device, solver = Path(run_dir), pick_device(device), solver or Solver()
    if rounds < 0:
        raise ConfigError(f"--rounds must be >= 0, got {rounds}")
    current = run_dir / "velocity.pt"
    if not current.is_file():
        raise ConfigError(f"{current} does not exist: train the run first (rfp train), then reflow it")
    h = _saliency_h(run_dir, loss, device)
    result = ReflowResult()
    jobs = [("reflow", k, run_dir / f"reflow_{k}" / "velocity.pt") for k in range(1, rounds + 1)]
    jobs += [("distilled", rounds, run_dir / "distilled" / "velocity.pt")] if distill else []
    for kind, k, out in jobs:
        tr = _translator(current, device)
        couplings = generate_couplings(tr.velocity, _source(run_dir, tr, pairs), file_digest(current), solver,
                                       shard_size=shard_size, device=device, progress=progress)
        result.couplings.append(couplings)
        print(f"reflow: {len(couplings)} couplings from {current} in {couplings.root} "
              f"({couplings.computed} shard(s) solved, {couplings.reused} reused)", file=sys.stderr)
        settings = FitSettings.from_config(tr.cfg, steps=train_steps, loss="mse" if kind == "distilled" else loss,
                                           distill=kind == "distilled")
        if train_product(run_dir, current, couplings, out, settings, kind=kind, round_=k, device=device,
                         h=h if kind == "reflow" else None, from_scratch=from_scratch, progress=progress):
            result.trained.append(out)
        if kind == "reflow":
            result.flows.append(out)
            current = out
        else:
            result.distilled = out
    return result


def pick_model(run: str | Path, steps: int) -> tuple[Path, str]:
    """Which checkpoint of a run to sample with at `steps` steps, and its label.

    N = 1: the distilled map, else the newest k-RF, else 1-RF; N = 2: the newest k-RF, else 1-RF;
    more steps: 1-RF. A checkpoint file (not a folder) is used as given."""
    run = Path(run)
    if run.is_file():
        return run, run.parent.name
    flows = sorted((p for p in run.glob("reflow_*/velocity.pt") if p.parent.name.split("_")[-1].isdigit()),
                   key=lambda p: int(p.parent.name.split("_")[-1]))
    candidates = []
    if steps == 1:
        candidates.append((run / "distilled" / "velocity.pt", "distilled"))
    if steps <= 2 and flows:
        candidates.append((flows[-1], f"{int(flows[-1].parent.name.split('_')[-1]) + 1}-RF"))
    for path, label in candidates:
        if path.is_file():
            return path, label
    return run / "velocity.pt", "1-RF"


def translator_for_steps(run: str | Path, steps: int, device=None):
    """(Translator, label, checkpoint) for sampling `run` with `steps` steps; prints which model it uses."""
    path, label = pick_model(run, steps)
    print(f"model: {label} ({path})", file=sys.stderr)
    return _translator(path, device), label, path


def cli_reflow(args: argparse.Namespace) -> int:
    from rfp_core.train.reflow_report import write_report

    run = Path(args.run)
    if not run.is_dir():
        raise ConfigError(f"--run {run}: not a run folder (expected $RFP_HOME/runs/<run_id>/ with velocity.pt)")
    res = reflow_run(run, rounds=args.rounds, pairs=args.pairs, distill=args.distill,
                     solver=Solver(args.solver, args.steps_solver), train_steps=args.train_steps, loss=args.loss,
                     from_scratch=args.from_scratch, shard_size=args.shard_size, device=args.device)
    if not args.no_report:
        md = write_report(run, device=args.device, n=args.report_inputs, solver=Solver(args.solver, args.steps_solver))
        print(md)
    print(json.dumps({"flows": [str(p) for p in res.flows], "distilled": str(res.distilled) if res.distilled else None,
                      "couplings": [str(c.root) for c in res.couplings]}))
    return 0
