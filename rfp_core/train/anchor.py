"""The MSE anchor as a relative weight (`velocity.mse_weight_mode: "relative"`).

The saliency term ‖J_h e‖² and the MSE ‖e‖² have scales that move with the image size, the
latent width of h and the data, so an absolute `mse_weight` (the demo's 500) means something
else on every task. The relative anchor sets the MSE's weight each step to

    w_eff = mse_weight · S_sal / S_mse,

S the bias-corrected running means (decay 0.99) of the two terms' batch values, so the anchor's
contribution is `mse_weight` times the saliency term's typical size: 1.0 = as large as it, 0.1
= a tenth. The scales are part of the checkpoint, so a resumed run continues them exactly.
"""

from __future__ import annotations

import torch
from torch import Tensor

DECAY = 0.99


class RelativeAnchor:
    def __init__(self, weight: float, decay: float = DECAY):
        self.weight, self.decay = float(weight), float(decay)
        self.sums: Tensor | None = None  # running (saliency, mse) sums, decayed
        self.norm = 0.0  # sum of the decay weights, for the bias correction
        self.last: Tensor | None = None  # the latest effective weight, for the log

    def __call__(self, sal: Tensor, mse: Tensor) -> Tensor:
        """The effective MSE weight, after adding this batch's detached terms to the scales."""
        terms = torch.stack([sal.detach().float(), mse.detach().float()])
        self.sums = terms if self.sums is None else self.sums.to(terms.device) * self.decay + terms
        self.norm = self.norm * self.decay + 1.0
        scale = self.sums / self.norm
        self.last = self.weight * scale[0] / scale[1].clamp_min(1e-12)
        return self.last

    @property
    def effective(self) -> float | None:
        return None if self.last is None else float(self.last)

    def state_dict(self) -> dict:
        return {"sums": None if self.sums is None else self.sums.cpu(), "norm": self.norm}

    def load_state_dict(self, state: dict) -> None:
        self.sums, self.norm = state["sums"], float(state["norm"])
