"""Phase 1: the saliency classifier whose latent layer h(x) weights the velocity loss.

1a warm-up: backbone frozen, only `latent_proj` and `classifier` train, until the held-out
accuracy reaches `warmup_threshold` (random heads must not wreck pretrained features).
1b fine-tune: every layer trains, the backbone at 0.1x the head learning rate, until
`accuracy_threshold`. Accuracy is the mean per-domain accuracy on held-out frames (centred
crop), so a domain with many more frames (a video) cannot hide a failing one.
`saliency_state.json` beside the checkpoint lets a resumed call skip finished sub-phases; it
records what the phase was built from (its lineage: the frames, the codec, the net), and state of
another lineage is never continued or taken as finished (`train/resume.py`).
Resume is exact on CPU, as for the velocity: the checkpoint (every 5 minutes, at the 1a -> 1b
switch and every `checkpoint_every_steps`) holds the optimizer and RNG state, and the data order
is a function of the step (`StepSampler`).
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from torchvision.transforms import v2
from tqdm.auto import tqdm

from rfp_core.atomic import atomic_write_text, sweep_temps
from rfp_core.checkpoint import load_checkpoint, save_checkpoint
from rfp_core.config import ModelConfig, SaliencyNetConfig
from rfp_core.data import FrameDataset, UnpairedDataset
from rfp_core.frame_store import FrameStore
from rfp_core.nets.saliency import SaliencyNet
from rfp_core.train.codec_io import load_codec
from rfp_core.train.resume import StepSampler, continue_saved, lineage_record, rng_state, saliency_inputs, set_rng_state

LogFn = Callable[[dict, int], None]
BACKBONE_LR_FACTOR = 0.1
# held-out frames scored per domain at each evaluation (an evenly spaced, fixed subset)
MAX_EVAL_PER_DOMAIN = 256
SAVE_EVERY_S = 300.0
SALIENCY_FILES = ("saliency.pt", "saliency_state.json")


class SaliencyThresholdNotReached(RuntimeError):
    """The step limit ran out before the held-out accuracy reached its threshold."""


@dataclass
class SaliencyResult:
    checkpoint: Path
    state_path: Path
    accuracy: float
    steps: int
    warmed_up: bool


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


def _cycle(loader: DataLoader) -> Iterator[dict]:
    while True:
        yield from loader


@torch.no_grad()
def _holdout_batches(manifest: Path, store, cfg: ModelConfig) -> list[tuple[torch.Tensor, int]]:
    sc = cfg.saliency
    out = []
    for domain in (0, 1):
        try:
            ds = FrameDataset(manifest, store, domain, cfg.max_size, split="holdout",
                              holdout_fraction=sc.holdout_fraction, train_crop=False)
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
def evaluate_accuracy(net: SaliencyNet, codec: nn.Module, holdout: list[tuple[torch.Tensor, int]], device, batch: int = 64) -> float:
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
    net = SaliencyNet(SaliencyNetConfig.model_validate({**ckpt["net"], "pretrained": False}),
                      in_channels=int(ckpt["in_channels"]))
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
    sweep_temps(out_dir)  # temp files of a call killed mid-write
    ckpt_path, state_path = out_dir / "saliency.pt", out_dir / "saliency_state.json"
    device = torch.device(device)
    store = store if store is not None else FrameStore(max_side=cfg.store_max_side)
    torch.manual_seed(cfg.seed)

    codec = load_codec(cfg, codec_checkpoint, device)
    latent_input = not codec.is_identity
    net = SaliencyNet(sc.net, in_channels=codec.latent_channels).to(device)

    inputs = saliency_inputs(json.loads(cfg.to_json()), manifest, codec_checkpoint)
    lineage = lineage_record(inputs)
    state = _read_state(state_path) if ckpt_path.exists() else {}
    if not continue_saved("saliency", out_dir, _saved_lineage(state, ckpt_path), inputs, force, SALIENCY_FILES):
        state = {}
    previous: dict = {}
    if state:
        previous = load_checkpoint(ckpt_path, map_location="cpu")
        if previous.get("net") == sc.net.model_dump(mode="json") and previous.get("in_channels") == codec.latent_channels:
            net.load_state_dict(previous["saliency"])
            # the checkpoint is the one atomic record: a kill between writing it and the state file
            # leaves the state file a checkpoint behind (found by `rfp bench faults`)
            state.update({k: previous[k] for k in ("accuracy", "backbone_warmed_up", "steps") if k in previous})
        else:  # a different net was trained here before: its weights and state do not apply
            print(f"saliency: {ckpt_path} was trained with another net config; training afresh", file=sys.stderr)
            state, previous = {}, {}
    accuracy = float(state.get("accuracy", 0.0))
    warmed_up = bool(state.get("backbone_warmed_up", False))
    steps = int(state.get("steps", 0))

    def save() -> None:
        save_checkpoint(ckpt_path, {
            "saliency": net.state_dict(), "config": json.loads(cfg.to_json()), "net": sc.net.model_dump(mode="json"),
            "in_channels": codec.latent_channels, "latent_input": latent_input,
            "accuracy": accuracy, "backbone_warmed_up": warmed_up, "steps": steps, **lineage,
            "optimizer": opt.state_dict(), "rng": rng_state(device),
        })
        atomic_write_text(state_path, json.dumps({
            "accuracy": accuracy, "backbone_warmed_up": warmed_up, "steps": steps,
            "accuracy_threshold": sc.accuracy_threshold, "warmup_threshold": sc.warmup_threshold,
            "checkpoint": ckpt_path.name, **lineage,
        }, indent=2))

    def result() -> SaliencyResult:
        return SaliencyResult(ckpt_path, state_path, accuracy, steps, warmed_up)

    if accuracy >= sc.accuracy_threshold:
        return result()  # a finished phase: nothing to do

    holdout = _holdout_batches(manifest, store, cfg)
    pairs_per_batch = max(1, sc.batch_size // 2)  # each pair gives one image of each domain
    train = UnpairedDataset(manifest, store, cfg.max_size, split="train", holdout_fraction=sc.holdout_fraction)
    # the k-th pair drawn depends only on (seed, k), and the loader has its own generator: making
    # it does not draw from the global RNG that a resume restores below
    loader = DataLoader(train, batch_size=pairs_per_batch, sampler=StepSampler(len(train), cfg.seed, start=steps * pairs_per_batch),
                        generator=torch.Generator().manual_seed(cfg.seed))
    batches = _cycle(loader)
    augment = build_augment(list(sc.augmentations))
    eps = sc.label_smoothing

    net.set_backbone_trainable(warmed_up)
    opt = _optimizer(net, sc.learning_rate, finetune=warmed_up)
    if "optimizer" in previous:  # an intermediate checkpoint: continue exactly where it stopped
        opt.load_state_dict(previous["optimizer"])
        set_rng_state(previous["rng"], device)
        print(f"saliency: resuming from {ckpt_path} at step {steps}", file=sys.stderr)
    # train mode in 1a too: a frozen backbone's BatchNorm statistics still adapt to these domains
    # (a from-scratch backbone has no useful ones yet)
    net.train()
    bar = tqdm(total=sc.max_steps, initial=min(steps, sc.max_steps), desc="saliency", disable=not progress, dynamic_ncols=True)
    last_save, window = time.monotonic(), []
    while accuracy < sc.accuracy_threshold:
        if steps >= sc.max_steps:
            save()
            bar.close()
            phase = "1b fine-tune" if warmed_up else "1a warm-up"
            target = sc.accuracy_threshold if warmed_up else sc.warmup_threshold
            raise SaliencyThresholdNotReached(
                f"saliency phase {phase} stopped at saliency.max_steps={sc.max_steps}: held-out accuracy "
                f"{accuracy:.4f} < {'accuracy_threshold' if warmed_up else 'warmup_threshold'} {target}. "
                "The domains may be too alike (or too few frames to tell apart). Raise saliency.max_steps "
                f"(training resumes from {ckpt_path}), lower the threshold, or raise saliency.learning_rate "
                f"({sc.learning_rate})."
            )
        batch = next(batches)
        x0, x1 = augment_batch(batch["domain_0"], augment), augment_batch(batch["domain_1"], augment)
        x0, x1 = codec.encode(x0.to(device)), codec.encode(x1.to(device))
        n = x0.shape[0]
        if sc.blend_fraction > 0 and torch.rand(()) < sc.blend_fraction:
            # blend training: points on the path x_t, labelled [1 - t, t] by how far along they are
            x0, x1 = torch.cat([x0, x0.flip(0)]), torch.cat([x1, x1])
            p1 = torch.rand(2 * n, device=device)
            x = torch.lerp(x0, x1, p1.view(-1, 1, 1, 1))
        else:
            x = torch.cat([x0, x1])
            p1 = torch.cat([torch.zeros(n, device=device), torch.ones(n, device=device)])
        p1 = p1 * (1 - eps) + eps / 2  # label smoothing
        target = torch.stack([1 - p1, p1], dim=1)
        loss = F.cross_entropy(net(x), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        steps += 1
        window.append(loss.item())
        bar.update(1)

        if steps % sc.eval_every == 0 or steps >= sc.max_steps:
            accuracy = evaluate_accuracy(net, codec, holdout, device)
            metrics = {"saliency/loss": sum(window) / len(window), "saliency/accuracy": accuracy, "saliency/warmed_up": float(warmed_up)}
            window = []
            bar.set_postfix(loss=f"{metrics['saliency/loss']:.4f}", acc=f"{accuracy:.3f}", phase="1b" if warmed_up else "1a")
            if log:
                log(metrics, steps)
            if not warmed_up and accuracy >= sc.warmup_threshold:
                warmed_up = True  # 1a -> 1b: unfreeze the backbone at a tenth of the head LR
                net.set_backbone_trainable(True)
                opt = _optimizer(net, sc.learning_rate, finetune=True)
                save()
                last_save = time.monotonic()
                continue
        due_steps = sc.checkpoint_every_steps is not None and steps % sc.checkpoint_every_steps == 0
        if accuracy < sc.accuracy_threshold and (due_steps or time.monotonic() - last_save > SAVE_EVERY_S):
            save()
            last_save = time.monotonic()
    bar.close()
    save()
    return result()
