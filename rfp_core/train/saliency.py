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
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from torchvision.transforms import v2
from tqdm.auto import tqdm

from rfp_core.atomic import atomic_write_text, sweep_temps
from rfp_core.checkpoint import load_checkpoint, save_checkpoint
from rfp_core.config import ModelConfig, SaliencyNetConfig
from rfp_core.media.datasets import (
    MIN_SOURCES_TO_HALVE,
    FrameDataset,
    UnpairedDataset,
    holdout_parts,
)
from rfp_core.media.frame_store import FrameStore
from rfp_core.nets.saliency import SaliencyNet
from rfp_core.tracking import LogFn
from rfp_core.train import distributed
from rfp_core.train.codec_io import load_codec
from rfp_core.train.resume import continue_saved, lineage_record, rng_state, saliency_inputs, set_rng_state
from rfp_core.train.saliency_stop import StopRule

BACKBONE_LR_FACTOR = 0.1
# held-out frames scored per domain at each evaluation (an evenly spaced, fixed subset)
MAX_EVAL_PER_DOMAIN = 256
SAVE_EVERY_S = 300.0
SALIENCY_FILES = ("saliency.pt", "saliency_state.json")
SALT_BLEND, SALT_P, SALT_P_FLIP = 11, 12, 13  # per-step / per-sample draws (train/distributed.py)


class SaliencyThresholdNotReached(RuntimeError):
    """The step limit ran out before the held-out accuracy reached its threshold."""


@dataclass
class SaliencyResult:
    checkpoint: Path
    state_path: Path
    accuracy: float  # the accuracy that met accuracy_threshold (of the criterion `stopped_by` names)
    steps: int
    warmed_up: bool
    stopped_by: str | None = None  # "train_smoothed" | "holdout"
    train_accuracy: float | None = None  # the original's smoothed training accuracy (None: window not full)
    report_accuracy: float | None = None  # on held-out frames that did not decide the stop
    report_separate: bool = True  # False: too few held-out sources to keep stop and report apart


def build_augment(names: list[str]) -> v2.Compose | None:
    """torchvision v2 augmentations by config name, acting on one (3, S, S) image in [0, 1]."""
    table = {
        # mild: a strong hue shift could erase exactly the colour difference between domains
        "color_jitter": v2.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.02),
        "grayscale": v2.RandomGrayscale(p=0.1),
        "hflip": v2.RandomHorizontalFlip(),
        "random_erasing": v2.RandomErasing(p=0.25, scale=(0.02, 0.15), value=0.5),
        "gaussian_blur": v2.RandomApply([v2.GaussianBlur(3, sigma=(0.1, 1.5))], p=0.2),
    }
    ops = [table[n] for n in names]
    return v2.Compose(ops) if ops else None


def augment_batch(x: torch.Tensor, augment: v2.Compose | None) -> torch.Tensor:
    """Per-image random augmentation of a [-1, 1] batch (v2 draws one set of params per call)."""
    if augment is None:
        return x
    x01 = (x + 1) / 2
    return torch.stack([augment(img) for img in x01]).clamp(0, 1) * 2 - 1


def _augment_item(augment: v2.Compose | None) -> Callable[[dict], dict] | None:
    """Augmentation per item, in the loader: its draws are then seeded by the sample's position."""
    if augment is None:
        return None
    return lambda item: {**item, **{k: augment_batch(item[k][None], augment)[0] for k in ("domain_0", "domain_1")}}


@torch.no_grad()
def _holdout_batches(manifest: Path, store, cfg: ModelConfig, split: str = "holdout") -> list[tuple[torch.Tensor, int]]:
    sc = cfg.saliency
    out = []
    for domain in (0, 1):
        try:
            ds = FrameDataset(
                manifest,
                store,
                domain,
                cfg.max_size,
                split=split,
                holdout_fraction=sc.holdout_fraction,
                train_crop=False,
            )
        except ValueError:
            raise ValueError(
                f"{manifest}: domain {domain} has no held-out frames to measure saliency accuracy on; "
                f"add frames to domain {domain} (at least 2 are needed) or raise saliency.holdout_fraction "
                f"({sc.holdout_fraction})"
            ) from None
        n = len(ds)
        step = max(1, n // MAX_EVAL_PER_DOMAIN)
        idx = list(range(0, n, step))[:MAX_EVAL_PER_DOMAIN]
        out.append((torch.stack([ds[i] for i in idx]), domain))
    return out


@torch.no_grad()
def evaluate_accuracy(
    net: SaliencyNet, codec: nn.Module, holdout: list[tuple[torch.Tensor, int]], device, batch: int = 64
) -> float:
    """Mean over the two domains of the held-out accuracy."""
    was_training = net.training
    net.eval()
    accs = []
    for x, label in holdout:
        correct = 0
        for chunk in x.split(batch):
            logits = net(codec.encode(chunk.to(device)))
            correct += int((logits.argmax(1) == label).sum())
        accs.append(correct / len(x))
    net.train(was_training)
    return sum(accs) / len(accs)


def _optimizer(net: SaliencyNet, lr: float, finetune: bool) -> torch.optim.Optimizer:
    groups = [{"params": list(net.head_parameters()), "lr": lr}]
    if finetune:
        groups.append({"params": list(net.backbone_parameters()), "lr": lr * BACKBONE_LR_FACTOR})
    return torch.optim.AdamW(groups, weight_decay=0.0)


def _read_state(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _saved_lineage(state: dict, ckpt_path: Path) -> dict | None:
    """What the saliency work in this folder was built from (None: there is none)."""
    if not ckpt_path.exists():
        return None
    if "lineage" in state:
        return state
    ckpt = load_checkpoint(ckpt_path, mmap=True)  # the state file is gone or older than lineages
    return {k: ckpt[k] for k in ("lineage", "lineage_inputs") if k in ckpt}


def load_saliency(path: str | Path, device: str | torch.device = "cpu") -> SaliencyNet:
    """The trained classifier from `saliency.pt`, in eval mode with every parameter frozen."""
    ckpt = load_checkpoint(Path(path), map_location="cpu")
    net = SaliencyNet(
        SaliencyNetConfig.model_validate({**ckpt["net"], "pretrained": False}), in_channels=int(ckpt["in_channels"])
    )
    net.load_state_dict(ckpt["saliency"])
    return net.to(device).eval().requires_grad_(False)


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
    ckpt_path, state_path = out_dir / "saliency.pt", out_dir / "saliency_state.json"
    world, device = distributed.init(device)  # one process, or this rank of torchrun's world
    sweep_temps(out_dir)  # temp files of a call killed mid-write
    store = store if store is not None else FrameStore(max_side=cfg.store_max_side)
    torch.manual_seed(cfg.seed)

    codec = load_codec(cfg, codec_checkpoint, device)
    latent_input = not codec.is_identity
    net = SaliencyNet(sc.net, in_channels=codec.latent_channels).to(device)

    inputs = saliency_inputs(json.loads(cfg.to_json()), manifest, codec_checkpoint)
    lineage = lineage_record(inputs)

    def saved_state() -> dict:  # rank 0 decides (it may move other work aside); the others get its answer
        state = _read_state(state_path) if ckpt_path.exists() else {}
        return (
            state
            if continue_saved("saliency", out_dir, _saved_lineage(state, ckpt_path), inputs, force, SALIENCY_FILES)
            else {}
        )

    state = world.from_main(saved_state)
    previous: dict = {}
    if state:
        previous = load_checkpoint(ckpt_path, map_location="cpu")
        if (
            previous.get("net") == sc.net.model_dump(mode="json")
            and previous.get("in_channels") == codec.latent_channels
        ):
            net.load_state_dict(previous["saliency"])
            # the checkpoint is the one atomic record: a kill between writing it and the state file
            # leaves the state file a save behind (found by `rfp bench faults`)
            state.update(previous.get("state") or {})
        else:  # a different net was trained here before: its weights and state do not apply
            print(f"saliency: {ckpt_path} was trained with another net config; training afresh", file=sys.stderr)
            state, previous = {}, {}
    accuracy = float(state.get("accuracy", 0.0))
    warmed_up = bool(state.get("backbone_warmed_up", False))
    steps = int(state.get("steps", 0))
    rule = StopRule(sc, state.get("train_window", []))
    report: dict = {k: state.get(k) for k in ("stopped_by", "report_accuracy", "holdout_accuracy")}

    def save() -> None:
        if not world.main:
            return
        record = {
            "accuracy": accuracy,
            "backbone_warmed_up": warmed_up,
            "steps": steps,
            "accuracy_threshold": sc.accuracy_threshold,
            "warmup_threshold": sc.warmup_threshold,
            "stop_on": sc.stop_on,
            "train_accuracy": rule.smoothed,
            "train_window": list(rule.window),
            "report_split": rule.report_split,
            "report_separate": separate,
            **report,
            "checkpoint": ckpt_path.name,
            **lineage,
        }
        save_checkpoint(
            ckpt_path,
            {
                "saliency": net.state_dict(),
                "config": json.loads(cfg.to_json()),
                "net": sc.net.model_dump(mode="json"),
                "in_channels": codec.latent_channels,
                "latent_input": latent_input,
                "accuracy": accuracy,
                "backbone_warmed_up": warmed_up,
                "steps": steps,
                **lineage,
                "optimizer": opt.state_dict(),
                "rng": rng_state(device),
                "state": record,
            },
        )
        atomic_write_text(state_path, json.dumps(record, indent=2))

    def result() -> SaliencyResult:
        return SaliencyResult(
            ckpt_path,
            state_path,
            accuracy,
            steps,
            warmed_up,
            report["stopped_by"],
            rule.smoothed,
            report["report_accuracy"],
            separate,
        )

    separate = _report_separate(manifest, sc) if rule.mode == "holdout" else True
    if report["stopped_by"] is not None or (state and accuracy >= sc.accuracy_threshold and warmed_up):
        return result()  # a finished phase: nothing to do

    holdout = _holdout_batches(manifest, store, cfg, rule.eval_split)
    pairs_per_batch = max(1, sc.batch_size // 2)  # each pair gives one image of each domain
    train = UnpairedDataset(manifest, store, cfg.max_size, split="train", holdout_fraction=sc.holdout_fraction)
    # step-indexed order (a resumed call continues it), this rank's shard of each step's pairs
    shards = distributed.ShardBatches(
        pairs_per_batch, pairs_per_batch, world, start_step=steps, what="saliency.batch_size / 2 (pairs)"
    )
    positions = distributed.Positions(train, cfg.seed, transform=_augment_item(build_augment(list(sc.augmentations))))
    batches = iter(DataLoader(positions, batch_sampler=shards))
    share = shards.count / pairs_per_batch  # of the global batch: DDP's mean over ranks is the batch mean

    net.set_backbone_trainable(warmed_up)
    opt = _optimizer(net, sc.learning_rate, finetune=warmed_up)
    if "optimizer" in previous:  # an intermediate checkpoint: continue exactly where it stopped
        opt.load_state_dict(previous["optimizer"])
        set_rng_state(previous["rng"], device)
        if world.main:
            print(f"saliency: resuming from {ckpt_path} at step {steps}", file=sys.stderr)
    if world.distributed:
        net = distributed.sync_batchnorm(net, device)  # BatchNorm statistics of the global batch
    ddp = world.wrap(net, device)
    # train mode in 1a too: a frozen backbone's BatchNorm statistics still adapt to these domains
    # (a from-scratch backbone has no useful ones yet)
    net.train()
    bar = tqdm(
        total=sc.max_steps,
        initial=min(steps, sc.max_steps),
        desc="saliency",
        disable=not progress or not world.main,
        dynamic_ncols=True,
    )
    last_save, window, held_out = time.monotonic(), [], report["holdout_accuracy"]
    while report["stopped_by"] is None:
        if steps >= sc.max_steps:
            bar.close()
            fallback = rule.fallback(held_out)
            if fallback is None:
                save()
                _not_reached(sc, warmed_up, accuracy, ckpt_path)
            # the other criterion met the threshold (the original's, or held-out frames): the phase is done
            print(
                f"saliency: the {sc.stop_on} accuracy did not reach accuracy_threshold {sc.accuracy_threshold} in "
                f"saliency.max_steps={sc.max_steps}; the {fallback[0]} accuracy did ({fallback[1]:.4f}), so the "
                "phase ends on it",
                file=sys.stderr,
            )
            report["stopped_by"], accuracy = fallback
            break
        loss, batch_acc = _train_step(ddp, codec, opt, next(batches), sc, device, cfg.seed, steps, share, world)
        rule.add_batch(batch_acc)
        steps += 1
        window.append(loss)
        bar.update(1)

        evaluated = steps % sc.eval_every == 0 or steps >= sc.max_steps
        if evaluated:
            # one verdict for all ranks
            held_out = report["holdout_accuracy"] = world.from_main(
                lambda: evaluate_accuracy(net, codec, holdout, device)
            )
        value = rule.value(held_out if evaluated else None)
        if evaluated:
            metrics = {
                "saliency/loss": sum(window) / len(window),
                "saliency/holdout_accuracy": held_out,
                "saliency/warmed_up": float(warmed_up),
            }
            if rule.smoothed is not None:
                metrics["saliency/train_accuracy"] = rule.smoothed
            if value is not None:
                metrics["saliency/accuracy"] = value
            window = []
            bar.set_postfix(
                loss=f"{metrics['saliency/loss']:.4f}", acc=f"{held_out:.3f}", phase="1b" if warmed_up else "1a"
            )
            if log and world.main:
                log(metrics, steps)
        if value is None:
            pass
        elif not warmed_up and value >= sc.warmup_threshold:
            warmed_up, accuracy = True, value  # 1a -> 1b: unfreeze the backbone at a tenth of the head LR
            net.set_backbone_trainable(True)
            opt = _optimizer(net, sc.learning_rate, finetune=True)
            ddp = world.wrap(net, device)  # DDP syncs the parameters that train at its construction
            rule.warmed_up()
            save()
            last_save = time.monotonic()
            value = rule.value(held_out if evaluated else None)
        else:
            accuracy = value
        due_steps = sc.checkpoint_every_steps is not None and steps % sc.checkpoint_every_steps == 0
        if warmed_up and value is not None and value >= sc.accuracy_threshold:
            report["stopped_by"], accuracy = sc.stop_on, value
        elif due_steps or time.monotonic() - last_save > SAVE_EVERY_S:
            save()
            last_save = time.monotonic()
    bar.close()
    report["report_accuracy"] = evaluate_accuracy(
        net, codec, _holdout_batches(manifest, store, cfg, rule.report_split), device
    )
    if log and world.main:
        log(
            {
                "saliency/report_accuracy": report["report_accuracy"],
                **({"saliency/train_accuracy": rule.smoothed} if rule.smoothed is not None else {}),
            },
            steps,
        )
    save()
    world.barrier()  # every rank returns once the checkpoint is on disk
    return result()


def _train_step(
    ddp: nn.Module,
    codec: nn.Module,
    opt: torch.optim.Optimizer,
    batch: dict,
    sc,
    device,
    seed: int,
    step: int,
    share: float,
    world,
) -> tuple[float, float]:
    """One optimizer step on this rank's shard (augmented by the loader); returns the global batch's
    loss and accuracy (label: the majority domain), the same on every rank."""
    pos = batch["position"]
    x0, x1 = codec.encode(batch["domain_0"].to(device)), codec.encode(batch["domain_1"].to(device))
    n = x0.shape[0]
    blend = torch.rand((), generator=torch.Generator().manual_seed(distributed.position_seed(seed, step, SALT_BLEND)))
    if sc.blend_fraction > 0 and blend < sc.blend_fraction:
        # blend training: points on the path x_t, labelled [1 - t, t] by how far along they are
        # (the flipped half pairs frames within a rank's shard: with several ranks, other pairs)
        x0, x1 = torch.cat([x0, x0.flip(0)]), torch.cat([x1, x1])
        p1 = torch.cat(
            [
                distributed.per_sample(lambda g: torch.rand(1, generator=g), seed, pos, salt)
                for salt in (SALT_P, SALT_P_FLIP)
            ]
        ).to(device)
        x = torch.lerp(x0, x1, p1.view(-1, 1, 1, 1))
    else:
        x = torch.cat([x0, x1])
        p1 = torch.cat([torch.zeros(n, device=device), torch.ones(n, device=device)])
    eps = sc.label_smoothing
    target = torch.stack([1 - p1, p1], dim=1) * (1 - eps) + eps / 2  # label smoothing
    logits = ddp(x)
    loss = F.cross_entropy(logits, target)
    opt.zero_grad(set_to_none=True)
    (loss * share * world.size).backward()
    opt.step()
    accuracy = (logits.detach().argmax(1) == (p1 > 0.5).long()).float().mean()
    both = world.sum_(torch.stack([loss.detach(), accuracy]).view(2) * share)
    return float(both[0]), float(both[1])


def _report_separate(manifest: Path, sc) -> bool:
    """Whether every domain has >= 2 held-out sources, so stop and report frames differ."""
    from rfp_core.media.manifest import ok_frames, read_manifest

    table = read_manifest(manifest)
    for domain in (0, 1):
        stop, rep = holdout_parts(ok_frames(table, domain), sc.holdout_fraction)
        if (stop & rep).any():
            print(
                f"saliency: domain {domain} has fewer than {MIN_SOURCES_TO_HALVE} held-out source files, so the "
                "accuracy is reported on the frames that stop training; add files or raise "
                "saliency.holdout_fraction to keep them apart",
                file=sys.stderr,
            )
            return False
    return True


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
