"""When the saliency phase stops, and on which frames its accuracy is reported.

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

from collections import deque
from typing import Iterable

from rfp_core.config import SaliencyConfig


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
