"""Phase 1: the saliency classifier whose latent layer h(x) weights the velocity loss.

1a warm-up: backbone frozen, only `latent_proj` and `classifier` train, until the accuracy
reaches `warmup_threshold` (random heads must not wreck pretrained features).
1b fine-tune: every layer trains, the backbone at 0.1x the head learning rate, until
`accuracy_threshold`. Which accuracy is compared is `saliency.stop_on` (`train/saliency_stop.py`):
the original's training accuracy smoothed over `smoothing_window` batches, or the mean per-domain
accuracy on held-out frames (centred crop), so a domain with many more frames (a video) cannot
hide a failing one. Both are logged; the accuracy reported at the end is measured on held-out
frames that did not decide the stop.
`saliency_state.json` beside the checkpoint lets a resumed call skip finished sub-phases; it
records what the phase was built from (its lineage: the frames, the codec, the net), and state of
another lineage is never continued or taken as finished (`train/resume.py`).
Resume is exact on CPU: the checkpoint (every 5 minutes, at the 1a -> 1b switch and every
`checkpoint_every_steps`) holds the optimizer and RNG state and the whole state record, and the
data order is a function of the step; the checkpoint, not the state file beside it, is what a
resumed call continues (a kill between the two writes leaves the state file one save behind).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from rfp_core.atomic import atomic_write_text, sweep_temps
from rfp_core.checkpoint import load_checkpoint, save_checkpoint
from rfp_core.config import ModelConfig, SaliencyNetConfig
from rfp_core.media.datasets import UnpairedDataset
from rfp_core.media.frame_store import FrameStore
from rfp_core.nets.saliency import SaliencyNet
from rfp_core.tracking import LogFn
from rfp_core.train import distributed
from rfp_core.train.augment import augment_item, build_augment
from rfp_core.train.codec_io import load_codec
from rfp_core.train.resume import continue_saved, lineage_record, restore_exact, rng_state, saliency_inputs, saved_json
from rfp_core.train.saliency_step import SaliencyRun, train_step
from rfp_core.train.saliency_stop import StopRule, evaluate_accuracy, holdout_batches, report_separate
from rfp_core.train.schedule import CheckpointClock

BACKBONE_LR_FACTOR = 0.1
SAVE_EVERY_S = 300.0
SALIENCY_FILES = ("saliency.pt", "saliency_state.json")


class SaliencyThresholdNotReached(RuntimeError):
    """The step limit ran out before the held-out accuracy reached its threshold."""


@dataclass
class SaliencyResult:
    checkpoint: Path
    state_path: Path
    accuracy: float  # the accuracy that met accuracy_threshold (of the criterion `stopped_by` names), or the last
    steps: int
    warmed_up: bool
    stopped_by: str | None = None  # "train_smoothed" | "holdout" | "step_limit" (the original's limit)
    train_accuracy: float | None = None  # the original's smoothed training accuracy (None: window not full)
    report_accuracy: float | None = None  # on held-out frames that did not decide the stop
    report_separate: bool = True  # False: too few held-out sources to keep stop and report apart


def load_saliency(path: str | Path, device: str | torch.device = "cpu") -> SaliencyNet:
    """The trained classifier from `saliency.pt`, in eval mode with every parameter frozen."""
    ckpt = load_checkpoint(Path(path), map_location="cpu")
    net = SaliencyNet(
        SaliencyNetConfig.model_validate({**ckpt["net"], "pretrained": False}), in_channels=int(ckpt["in_channels"])
    )
    net.load_state_dict(ckpt["saliency"])
    return net.to(device).eval().requires_grad_(False)


def load_saliency_h(path: str | Path, device: str | torch.device = "cpu"):
    """The trained classifier's latent layer h(x), what the saliency-weighted loss uses."""
    net = load_saliency(path, device)
    # the BN-folded copy with a batched primal+tangent jvp is the fast path of the loss
    return net.frozen_h() if hasattr(net, "frozen_h") else net.h


def train_saliency(
    cfg: ModelConfig,
    manifest: Path,
    out_dir: Path,
    device: str | torch.device = "cpu",
    store=None,
    log: LogFn | None = None,
    codec_checkpoint: Path | None = None,
    progress: bool = True,
    force: bool = False,
) -> SaliencyResult:
    """Train (or finish training) the saliency classifier; writes saliency.pt + saliency_state.json.

    Saliency work here built from other inputs (frames, codec, net) raises ResumeRefused, or with
    `force` is moved to `superseded/` and the phase trains afresh."""
    sc = cfg.saliency
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    world, device = distributed.init(device)  # one process, or this rank of torchrun's world
    sweep_temps(out_dir)  # temp files of a call killed mid-write
    store = store if store is not None else FrameStore(max_side=cfg.store_max_side)
    torch.manual_seed(cfg.seed)
    codec = load_codec(cfg, codec_checkpoint, device)
    net = SaliencyNet(sc.net, in_channels=codec.latent_channels).to(device)
    inputs = saliency_inputs(json.loads(cfg.to_json()), manifest, codec_checkpoint)
    p = SaliencyRun(
        cfg, world, device, codec, net, out_dir / "saliency.pt", out_dir / "saliency_state.json", lineage_record(inputs)
    )
    previous = _continue(p, inputs, force)
    p.separate = report_separate(manifest, sc) if p.rule.mode == "holdout" else True
    if p.report["stopped_by"] is not None or (previous and p.accuracy >= sc.accuracy_threshold and p.warmed_up):
        return _result(p)  # a finished phase: nothing to do

    holdout = holdout_batches(manifest, store, cfg, p.rule.eval_split)
    batches, share = _batches(p, manifest, store)
    _start(p, previous)
    _train(p, batches, share, holdout, log, progress)
    p.report["report_accuracy"] = evaluate_accuracy(
        p.net, codec, holdout_batches(manifest, store, cfg, p.rule.report_split), device
    )
    if log and world.main:
        log(
            {
                "saliency/accuracy": p.accuracy,
                "saliency/report_accuracy": p.report["report_accuracy"],
                **({"saliency/train_accuracy": p.rule.smoothed} if p.rule.smoothed is not None else {}),
            },
            p.steps,
        )
    _save(p)
    world.barrier()  # every rank returns once the checkpoint is on disk
    return _result(p)


def _continue(p: SaliencyRun, inputs: dict, force: bool) -> dict:
    """Load the saved work of this lineage into `p` (weights, state record); returns its
    checkpoint ({}: training starts afresh)."""
    sc = p.cfg.saliency

    def saved_state() -> dict:  # rank 0 decides (it may move other work aside); the others get its answer
        state = (saved_json(p.state_path) or {}) if p.ckpt_path.exists() else {}
        saved = _saved_lineage(state, p.ckpt_path)
        return state if continue_saved("saliency", p.ckpt_path.parent, saved, inputs, force, SALIENCY_FILES) else {}

    state = p.world.from_main(saved_state)
    previous: dict = {}
    if state:
        previous = load_checkpoint(p.ckpt_path, map_location="cpu")
        if (
            previous.get("net") == sc.net.model_dump(mode="json")
            and previous.get("in_channels") == p.codec.latent_channels
        ):
            p.net.load_state_dict(previous["saliency"])
            # the checkpoint is the one atomic record: a kill between writing it and the state file
            # leaves the state file a save behind (found by `rfp bench faults`)
            state.update(previous.get("state") or {})
        else:  # a different net was trained here before: its weights and state do not apply
            print(f"saliency: {p.ckpt_path} was trained with another net config; training afresh", file=sys.stderr)
            state, previous = {}, {}
    p.accuracy = float(state.get("accuracy", 0.0))
    p.warmed_up = bool(state.get("backbone_warmed_up", False))
    p.steps = int(state.get("steps", 0))
    p.rule = StopRule(sc, state.get("train_window", []))
    p.report = {k: state.get(k) for k in ("stopped_by", "report_accuracy", "holdout_accuracy")}
    return previous


def _saved_lineage(state: dict, ckpt_path: Path) -> dict | None:
    """What the saliency work in this folder was built from (None: there is none)."""
    if not ckpt_path.exists():
        return None
    if "lineage" in state:
        return state
    ckpt = load_checkpoint(ckpt_path, mmap=True)  # the state file is gone or older than lineages
    return {k: ckpt[k] for k in ("lineage", "lineage_inputs") if k in ckpt}


def _batches(p: SaliencyRun, manifest: Path, store):
    """Step-indexed pairs from `p.steps` (a resumed call continues the order), this rank's shard
    of each step's; returns the batches and this rank's share of a step's."""
    sc, cfg = p.cfg.saliency, p.cfg
    pairs_per_batch = max(1, sc.batch_size // 2)  # each pair gives one image of each domain
    train = UnpairedDataset(manifest, store, cfg.max_size, split="train", holdout_fraction=sc.holdout_fraction)
    shards = distributed.ShardBatches(
        pairs_per_batch, pairs_per_batch, p.world, start_step=p.steps, what="saliency.batch_size / 2 (pairs)"
    )
    positions = distributed.Positions(train, cfg.seed, transform=augment_item(build_augment(list(sc.augmentations))))
    # of the global batch: DDP's mean over ranks is the batch mean
    return iter(DataLoader(positions, batch_sampler=shards)), shards.count / pairs_per_batch


def _optimizer(net: SaliencyNet, lr: float, finetune: bool) -> torch.optim.Optimizer:
    groups = [{"params": list(net.head_parameters()), "lr": lr}]
    if finetune:
        groups.append({"params": list(net.backbone_parameters()), "lr": lr * BACKBONE_LR_FACTOR})
    return torch.optim.AdamW(groups, weight_decay=0.0)


def _start(p: SaliencyRun, previous: dict) -> None:
    """The optimizer of the sub-phase (restored from an intermediate checkpoint), DDP, train mode."""
    p.net.set_backbone_trainable(p.warmed_up)
    p.opt = _optimizer(p.net, p.cfg.saliency.learning_rate, finetune=p.warmed_up)
    if "optimizer" in previous:  # an intermediate checkpoint: continue exactly where it stopped
        restore_exact(previous, p.device, optimizer=p.opt)
        if p.world.main:
            print(f"saliency: resuming from {p.ckpt_path} at step {p.steps}", file=sys.stderr)
    if p.world.distributed:
        p.net = distributed.sync_batchnorm(p.net, p.device)  # BatchNorm statistics of the global batch
    p.ddp = p.world.wrap(p.net, p.device)
    # train mode in 1a too: a frozen backbone's BatchNorm statistics still adapt to these domains
    # (a from-scratch backbone has no useful ones yet)
    p.net.train()


def _train(p: SaliencyRun, batches, share: float, holdout, log: LogFn | None, progress: bool) -> None:
    """Steps until the accuracy meets the threshold (or the step limit: fall back, or raise)."""
    sc, limit = p.cfg.saliency, p.cfg.saliency_step_limit
    bar = tqdm(
        total=limit,
        initial=min(p.steps, limit),
        desc="saliency",
        disable=not progress or not p.world.main,
        dynamic_ncols=True,
    )
    clock, window = CheckpointClock(sc.checkpoint_every_steps, SAVE_EVERY_S), []
    while p.report["stopped_by"] is None:
        if p.steps >= limit:
            bar.close()
            _at_step_limit(p)
            break
        loss, batch_acc = train_step(p, next(batches), share)
        p.rule.add_batch(batch_acc)
        p.steps += 1
        window.append(loss)
        bar.update(1)
        evaluated = p.steps % sc.eval_every == 0 or p.steps >= limit
        if evaluated:  # one verdict for all ranks
            p.report["holdout_accuracy"] = p.world.from_main(
                lambda: evaluate_accuracy(p.net, p.codec, holdout, p.device)
            )
        value = p.rule.value(p.report["holdout_accuracy"] if evaluated else None)
        if evaluated:
            _log(p, sum(window) / len(window), value, bar, log)
            window = []
        _advance(p, value, evaluated, clock)
    bar.close()


def _log(p: SaliencyRun, loss: float, value: float | None, bar, log: LogFn | None) -> None:
    metrics = {
        "saliency/loss": loss,
        "saliency/holdout_accuracy": p.report["holdout_accuracy"],
        "saliency/warmed_up": float(p.warmed_up),
    }
    if p.rule.smoothed is not None:
        metrics["saliency/train_accuracy"] = p.rule.smoothed
    if value is not None:
        metrics["saliency/accuracy"] = value
    bar.set_postfix(loss=f"{loss:.4f}", acc=f"{p.report['holdout_accuracy']:.3f}", phase="1b" if p.warmed_up else "1a")
    if log and p.world.main:
        log(metrics, p.steps)


def _advance(p: SaliencyRun, value: float | None, evaluated: bool, clock: CheckpointClock) -> None:
    """After a step: 1a -> 1b, the stop, or a resume checkpoint when one is due."""
    sc = p.cfg.saliency
    if value is None:
        pass
    elif not p.warmed_up and value >= sc.warmup_threshold:
        p.warmed_up, p.accuracy = True, value  # 1a -> 1b: unfreeze the backbone at a tenth of the head LR
        p.net.set_backbone_trainable(True)
        p.opt = _optimizer(p.net, sc.learning_rate, finetune=True)
        p.ddp = p.world.wrap(p.net, p.device)  # DDP syncs the parameters that train at its construction
        p.rule.warmed_up()
        _save(p)
        clock.reset()
        value = p.rule.value(p.report["holdout_accuracy"] if evaluated else None)
    else:
        p.accuracy = value
    if p.warmed_up and value is not None and value >= sc.accuracy_threshold:
        p.report["stopped_by"], p.accuracy = sc.stop_on, value
    elif clock.due(p.steps):
        _save(p)
        clock.reset()


def _at_step_limit(p: SaliencyRun) -> None:
    """At the step limit: the phase ends on the other criterion if it met the threshold; at the original's
    limit (max_steps left out) it ends as there, whatever the accuracy; else it raises."""
    sc = p.cfg.saliency
    fallback = p.rule.fallback(p.report["holdout_accuracy"])
    if fallback is None and sc.max_steps is None:  # the original's limit: it goes on, so does this
        # what the original returns there: the smoothed accuracy once its window is full, else the last batch's
        last = p.rule.value(p.report["holdout_accuracy"])
        p.accuracy = last if last is not None else (p.rule.window[-1] if p.rule.window else 0.0)
        p.report["stopped_by"] = "step_limit"
        print(
            f"saliency: accuracy {p.accuracy:.4f} has not reached {'accuracy' if p.warmed_up else 'warmup'}"
            f"_threshold after {p.steps} steps, the original trainer's limit (velocity.train_images // "
            "velocity.train_batch_size); as there, training goes on to the velocity phase. Set "
            "saliency.max_steps to train the saliency net until it reaches the threshold.",
            file=sys.stderr,
        )
        return
    if fallback is None:
        _save(p)
        _not_reached(sc, p.warmed_up, p.accuracy, p.ckpt_path)
    # the other criterion met the threshold (the original's, or held-out frames): the phase is done
    print(
        f"saliency: the {sc.stop_on} accuracy did not reach accuracy_threshold {sc.accuracy_threshold} in "
        f"saliency.max_steps={sc.max_steps}; the {fallback[0]} accuracy did ({fallback[1]:.4f}), so the "
        "phase ends on it",
        file=sys.stderr,
    )
    p.report["stopped_by"], p.accuracy = fallback


def _save(p: SaliencyRun) -> None:
    """saliency.pt (weights, optimizer, RNG and the state record), then saliency_state.json."""
    if not p.world.main:
        return
    sc = p.cfg.saliency
    record = {
        "accuracy": p.accuracy,
        "backbone_warmed_up": p.warmed_up,
        "steps": p.steps,
        "accuracy_threshold": sc.accuracy_threshold,
        "warmup_threshold": sc.warmup_threshold,
        "stop_on": sc.stop_on,
        "train_accuracy": p.rule.smoothed,
        "train_window": list(p.rule.window),
        "report_split": p.rule.report_split,
        "report_separate": p.separate,
        **p.report,
        "checkpoint": p.ckpt_path.name,
        **p.lineage,
    }
    save_checkpoint(
        p.ckpt_path,
        {
            "saliency": p.net.state_dict(),
            "config": json.loads(p.cfg.to_json()),
            "net": sc.net.model_dump(mode="json"),
            "in_channels": p.codec.latent_channels,
            "latent_input": not p.codec.is_identity,
            "accuracy": p.accuracy,
            "backbone_warmed_up": p.warmed_up,
            "steps": p.steps,
            **p.lineage,
            "optimizer": p.opt.state_dict(),
            "rng": rng_state(p.device),
            "state": record,
        },
    )
    atomic_write_text(p.state_path, json.dumps(record, indent=2))


def _result(p: SaliencyRun) -> SaliencyResult:
    return SaliencyResult(
        p.ckpt_path,
        p.state_path,
        p.accuracy,
        p.steps,
        p.warmed_up,
        p.report["stopped_by"],
        p.rule.smoothed,
        p.report["report_accuracy"],
        p.separate,
    )


def _not_reached(sc, warmed_up: bool, accuracy: float, ckpt_path: Path) -> None:
    phase = "1b fine-tune" if warmed_up else "1a warm-up"
    target = sc.accuracy_threshold if warmed_up else sc.warmup_threshold
    raise SaliencyThresholdNotReached(
        f"saliency phase {phase} stopped at saliency.max_steps={sc.max_steps}: {sc.stop_on} accuracy "
        f"{accuracy:.4f} < {'accuracy_threshold' if warmed_up else 'warmup_threshold'} {target}, and the other "
        "criterion did not reach accuracy_threshold either. The domains may be too alike (or too few frames to tell "
        f"apart). Raise saliency.max_steps (training resumes from {ckpt_path}), lower the threshold, or raise "
        f"saliency.learning_rate ({sc.learning_rate})."
    )
