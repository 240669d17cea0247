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

import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from rfp_core.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from rfp_core.config import ConfigError
from rfp_core.config_files import config_from_dict
from rfp_core.flow.reflow import Couplings, Solver, file_digest, frame_source, generate_couplings, noise_source
from rfp_core.train.reflow import FitSettings, Loss, build_velocity_net, coupling_batches, fit

DEFAULT_GENERATIVE_PAIRS = 1024


@dataclass
class ReflowResult:
    flows: list[Path] = field(default_factory=list)  # reflow_1/velocity.pt, ...
    distilled: Path | None = None
    couplings: list[Couplings] = field(default_factory=list)
    trained: list[Path] = field(default_factory=list)  # products (re)trained by this call


@dataclass
class RunPaths:
    """Where a run's inputs are and where reflow writes (a run folder, or a pipeline partition)."""

    base: Path  # the 1-RF velocity checkpoint
    manifest: Path
    out: Path  # reflow_k/ and distilled/ go here
    saliency: Path | None = None
    store: object | None = None  # a FrameStore; default: $RFP_HOME/store at the config's max side

    @classmethod
    def of_run(cls, run_dir: str | Path) -> "RunPaths":
        run_dir = Path(run_dir)
        return cls(run_dir / "velocity.pt", run_dir / "manifest.parquet", run_dir, run_dir / "saliency.pt")


def _translator(path: Path, device):
    from rfp_core.inference.translate import Translator

    return Translator.from_run(path, device=device)


def _source(paths: RunPaths, tr, pairs: int | None):
    cfg = tr.cfg
    if cfg.generative:
        side = cfg.max_size // tr.codec.downsample
        return noise_source(pairs or DEFAULT_GENERATIVE_PAIRS, (tr.codec.latent_channels, side, side), cfg.seed)
    from rfp_core.media.frame_store import FrameStore

    if not paths.manifest.is_file():
        raise ConfigError(
            f"{paths.manifest} does not exist; reflow needs the run's training frames (rfp train writes it)"
        )
    store = paths.store if paths.store is not None else FrameStore(max_side=cfg.store_max_side)
    return frame_source(
        paths.manifest, store, cfg.max_size, tr.start, cfg.saliency.holdout_fraction, split="train", limit=pairs
    )


def _saliency_h(paths: RunPaths, loss: Loss, device):
    if loss != "saliency":
        return None
    from rfp_core.train.saliency import load_saliency

    if paths.saliency is None or not paths.saliency.is_file():
        raise ConfigError(f"{paths.saliency}: loss 'saliency' needs the run's saliency checkpoint; use --loss mse")
    net = load_saliency(paths.saliency, device)
    return net.frozen_h() if hasattr(net, "frozen_h") else net.h


def _is_current(path: Path, meta: dict) -> bool:
    try:
        return path.is_file() and load_checkpoint(path).get("reflow") == meta
    except CheckpointError:
        return False


def _shown(path: Path, root: Path) -> str:
    return str(path.relative_to(root)) if path.is_relative_to(root) else str(path)


def _save_product(out: Path, src: dict, result, meta: dict) -> None:
    """A product in phase 2's checkpoint format. The distilled map was fitted as z0 + v(z0, 0), which
    is one Euler step: its config says so, so a Translator samples it that way by default (the
    source's sampler, say Heun, would evaluate v at t = 1 too, where nothing was fitted)."""
    config = src["config"]
    if meta["kind"] == "distilled":
        config = {**config, "velocity": {**config["velocity"], "sampler": "euler", "num_inference_steps": 1}}
    save_checkpoint(
        out,
        {
            "velocity": result.model.state_dict(),
            "config": config,
            "in_channels": src["in_channels"],
            "step": result.steps,
            "final_loss": result.final_loss,
            "codec": src.get("codec") or {},
            "reflow": meta,
        },
    )


def train_product(
    paths: RunPaths,
    source_ckpt: Path,
    couplings: Couplings,
    out: Path,
    settings: FitSettings,
    *,
    kind: str,
    round_: int,
    device,
    h=None,
    from_scratch: bool = False,
    progress: bool = True,
) -> bool:
    """Train one k-RF or distilled checkpoint at `out` from `couplings`; False when it was current."""
    meta = {
        "kind": kind,
        "round": round_,
        "couplings": couplings.digest,
        "source": _shown(source_ckpt, paths.out),
        "source_digest": file_digest(source_ckpt),
        "settings": settings.as_dict(),
        "from_scratch": from_scratch,
    }
    if _is_current(out, meta):
        print(f"reflow: {out} is current (same couplings and settings); kept", file=sys.stderr)
        return False
    src = load_checkpoint(source_ckpt)
    cfg = config_from_dict(src["config"], source=str(source_ckpt))
    torch.manual_seed(settings.seed)
    net = build_velocity_net(cfg, int(src["in_channels"]))
    if not from_scratch:  # start from the flow that made the couplings (reflow fine-tunes it)
        net.load_state_dict(src["velocity"] if "velocity" in src else src["ema"]["model"])
    z0, z1 = couplings.load()
    result = fit(
        net,
        coupling_batches(z0, z1, settings.batch_size, settings.seed),
        settings,
        device=device,
        h=h,
        state_path=out.parent / "state.pt",
        fingerprint={"meta": meta},
        checkpoint_every=max(1, settings.steps // 10),
        progress=progress,
        desc=kind if kind == "distilled" else f"reflow {round_}",
    )
    _save_product(out, src, result, meta)
    (out.parent / "state.pt").unlink(missing_ok=True)
    print(f"reflow: {kind} {out} ({result.steps} steps, final loss {result.final_loss:.5f})", file=sys.stderr)
    return True


def couplings_of(
    paths: RunPaths,
    flow_ckpt: Path,
    pairs: int | None = None,
    solver: Solver | None = None,
    shard_size: int = 64,
    device=None,
    progress: bool = True,
) -> Couplings:
    """The couplings (z0, ODE_flow(z0)) of the training inputs under the flow in `flow_ckpt`."""
    tr = _translator(flow_ckpt, device)
    c = generate_couplings(
        tr.velocity,
        _source(paths, tr, pairs),
        file_digest(flow_ckpt),
        solver or Solver(),
        shard_size=shard_size,
        device=tr.device,
        progress=progress,
    )
    print(
        f"reflow: {len(c)} couplings from {flow_ckpt} in {c.root} ({c.computed} shard(s) solved, {c.reused} reused)",
        file=sys.stderr,
    )
    return c


def reflow_run(
    run: str | Path | RunPaths,
    rounds: int = 1,
    pairs: int | None = None,
    distill: bool = False,
    solver: Solver | None = None,
    train_steps: int | None = None,
    loss: Loss = "mse",
    from_scratch: bool = False,
    shard_size: int = 64,
    device=None,
    progress: bool = True,
) -> ReflowResult:
    """`rounds` reflow rounds on top of the 1-RF checkpoint, then (with `distill`) a one-step map."""
    from rfp_core.device import pick_device

    paths = run if isinstance(run, RunPaths) else RunPaths.of_run(run)
    device = pick_device(device)
    if rounds < 0:
        raise ConfigError(f"--rounds must be >= 0, got {rounds}")
    if not paths.base.is_file():
        raise ConfigError(f"{paths.base} does not exist: train the run first (rfp train), then reflow it")
    h = _saliency_h(paths, loss, device)
    result, current = ReflowResult(), paths.base
    jobs = [("reflow", k, paths.out / f"reflow_{k}" / "velocity.pt") for k in range(1, rounds + 1)]
    jobs += [("distilled", rounds, paths.out / "distilled" / "velocity.pt")] if distill else []
    for kind, k, out in jobs:
        couplings = couplings_of(paths, current, pairs, solver, shard_size, device, progress)
        result.couplings.append(couplings)
        cfg = config_from_dict(load_checkpoint(current)["config"], source=str(current))
        settings = FitSettings.from_config(
            cfg, steps=train_steps, loss="mse" if kind == "distilled" else loss, distill=kind == "distilled"
        )
        if train_product(
            paths,
            current,
            couplings,
            out,
            settings,
            kind=kind,
            round_=k,
            device=device,
            h=h if kind == "reflow" else None,
            from_scratch=from_scratch,
            progress=progress,
        ):
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
    flows = sorted(
        (p for p in run.glob("reflow_*/velocity.pt") if p.parent.name.split("_")[-1].isdigit()),
        key=lambda p: int(p.parent.name.split("_")[-1]),
    )
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
