"""Minibatch optimal-transport coupling (`velocity.coupling: "minibatch_ot"`).

Independent pairs (X0, X1) make crossing straight lines: the velocity field at a point averages
the directions of every pair that passes it, and what a domain-0 image shows is lost in that
average. Within each minibatch, the OT coupling re-pairs the drawn X1 with the drawn X0 by an
exact assignment (`scipy.optimize.linear_sum_assignment`) that minimises the batch's total pair
cost (Tong et al. 2023; Pooladian et al. 2023), so each X0 goes to the X1 nearest to it among
those drawn, and every drawn X1 is still used once. The cost is measured
- "pixel": in the space the flow runs in (pixels with the Identity codec, else the codec's
  latent): the mean squared difference of the pair;
- "structure": in the structure encoder's embedding space (`structure.encoder`, as structure
  pairing uses): 1 - cosine similarity, which pairs by layout rather than colour.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from rfp_core.config import ConfigError, ModelConfig


def pixel_cost(x0: Tensor, x1: Tensor) -> Tensor:
    """(B, B): mean squared difference of x0[i] and x1[j]."""
    a, b = x0.flatten(1).double(), x1.flatten(1).double()
    return (torch.cdist(a, b) ** 2 / a.shape[1]).float()


def embedding_cost(e0: Tensor, e1: Tensor) -> Tensor:
    """(B, B): 1 - cosine similarity of the embeddings."""
    e0, e1 = torch.nn.functional.normalize(e0.float(), dim=1), torch.nn.functional.normalize(e1.float(), dim=1)
    return 1.0 - e0 @ e1.T


def ot_permutation(cost: Tensor) -> Tensor:
    """The permutation p minimising sum_i cost[i, p[i]] (exact, Hungarian-type)."""
    rows, cols = linear_sum_assignment(cost.detach().cpu().double().numpy())
    perm = np.empty(len(rows), np.int64)
    perm[rows] = cols
    return torch.from_numpy(perm)


def _pil(x: Tensor) -> list[Image.Image]:
    arr = ((x.detach().cpu().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(a) for a in arr]


class Coupler:
    """Re-pairs a minibatch: `x1[perm]`, perm the OT assignment of x0 to the drawn x1."""

    def __init__(self, cfg: ModelConfig, device: str | torch.device = "cpu", encoder=None):
        self.space = cfg.velocity.coupling_space
        self.encoder = None
        if self.space == "structure":
            if cfg.generative:
                raise ConfigError(
                    "velocity.coupling_space 'structure' needs domain-0 images; in generative mode "
                    "(domain0 = random) set it to 'pixel'"
                )
            from rfp_core.structure.encoders import build_encoder

            self.encoder = encoder if encoder is not None else build_encoder(cfg.structure, device)

    def cost(self, batch: dict, x0: Tensor, x1: Tensor) -> Tensor:
        if self.encoder is None:
            return pixel_cost(x0, x1)
        e0 = torch.from_numpy(self.encoder.embed(_pil(batch["domain_0"])))
        e1 = torch.from_numpy(self.encoder.embed(_pil(batch["domain_1"])))
        return embedding_cost(e0, e1)

    def __call__(self, batch: dict, x0: Tensor, x1: Tensor) -> Tensor:
        perm = ot_permutation(self.cost(batch, x0, x1)).to(x1.device)
        return x1[perm]
