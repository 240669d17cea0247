"""When the saliency phase stops, and on which frames its accuracy is measured and reported.

Two accuracies are tracked and logged: the original trainer's — each training batch's accuracy
(label = the majority domain of the input), smoothed over the last `smoothing_window` batches and
used only once the window is full — and the accuracy on held-out frames. `saliency.stop_on`
says which one the thresholds are compared with. The accuracy reported at the end is measured on
frames that did not decide the stop: with "holdout" the other half of the held-out source files
(`data.holdout_parts`), with "train_smoothed" all held-out frames.

A run is never failed for a threshold the other criterion met: at `max_steps` the phase ends
with a warning if either accuracy reached `accuracy_threshold`, and only fails when neither did.
"""

from __future__ import annotations

import sys
from collections import deque
from pathlib import Path
from typing import Iterable

import torch
from torch import nn

from rfp_core.config import ModelConfig, SaliencyConfig
from rfp_core.media.datasets import MIN_SOURCES_TO_HALVE, FrameDataset, holdout_parts

# held-out frames scored per domain at each evaluation (an evenly spaced, fixed subset)
MAX_EVAL_PER_DOMAIN = 256


class StopRule:
    def __init__(self, sc: SaliencyConfig, window: Iterable[float] = ()):
        self.mode = sc.stop_on
        self.threshold = sc.accuracy_threshold
        self.window: deque[float] = deque(window, maxlen=sc.smoothing_window)

    @property
    def eval_split(self) -> str:
        """The held-out frames scored during training (they stop it in "holdout" mode)."""
        return "stop" if self.mode == "holdout" else "holdout"

    @property
    def report_split(self) -> str:
        return "report" if self.mode == "holdout" else "holdout"

    def add_batch(self, accuracy: float) -> None:
        self.window.append(float(accuracy))

    @property
    def smoothed(self) -> float | None:
        """The original's figure: None until the window is full (it is not stable before)."""
        if len(self.window) < (self.window.maxlen or 0):
            return None
        return sum(self.window) / len(self.window)

    def value(self, held_out: float | None) -> float | None:
        """The accuracy the thresholds are compared with now (None: nothing to compare yet)."""
        return self.smoothed if self.mode == "train_smoothed" else held_out

    def warmed_up(self) -> None:
        # as the original: the smoothed figure starts afresh in the fine-tune phase
        self.window.clear()

    def fallback(self, held_out: float | None) -> tuple[str, float] | None:
        """At the step limit: (criterion, accuracy) of the other criterion if it met the
        threshold, so the phase ends instead of failing; None if it did not."""
        other = ("holdout", held_out) if self.mode == "train_smoothed" else ("train_smoothed", self.smoothed)
        return other if other[1] is not None and other[1] >= self.threshold else None


@torch.no_grad()
def holdout_batches(manifest: Path, store, cfg: ModelConfig, split: str = "holdout") -> list[tuple[torch.Tensor, int]]:
    """(frames, domain) of each domain's held-out `split`, at most MAX_EVAL_PER_DOMAIN evenly spaced."""
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
    net: nn.Module, codec: nn.Module, holdout: list[tuple[torch.Tensor, int]], device, batch: int = 64
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


def report_separate(manifest: Path, sc: SaliencyConfig) -> bool:
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
