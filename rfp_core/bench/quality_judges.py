"""The judges of `rfp bench quality`, trained afresh once per task on its held-out labelled real
images (never on the model's nets), their ceilings, and their verdict on one row's translations.

The reference rows' translations are made here too: "tint" (a flat colour wash: each input's
channels mapped to the target domain's mean and spread) needs only the two domains' statistics.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from rfp_core.bench import quality_tasks as QT

# judge training steps (full, quick)
JUDGE_STEPS = {"domain": (400, 60), "content": (400, 60), "two_sample": (150, 100)}


def train_judges(task: QT.Task, quick: bool, device: torch.device) -> dict[str, Any]:
    """The task's judges, trained on its `judge` pool, and their ceilings on its `eval` pool."""
    from rfp_core.evaluate import train_judge
    from rfp_core.evaluate.judges import train_content_judge
    from rfp_core.evaluate.metrics import frechet_distance, kid

    k = 1 if quick else 0
    j0, _ = task.load("judge", 0)
    j1, y1 = task.load("judge", 1)
    e0, y0 = task.load("eval", 0)
    e1, ye1 = task.load("eval", 1)
    domain = train_judge(j0, j1, steps=JUDGE_STEPS["domain"][k], device=device, seed=0)
    content = train_content_judge(j1, y1, task.n_classes, steps=JUDGE_STEPS["content"][k], device=device, seed=0)
    real_acc = float(torch.cat([domain.predict_proba(e0) < 0.5, domain.predict_proba(e1) >= 0.5]).float().mean())
    f_e1, f_j1 = domain.features(e1).numpy(), domain.features(j1[: len(e1)]).numpy()
    return {
        "domain": domain,
        "content": content,
        "inputs": e0,
        "labels": y0,
        "real": e1,
        "real_features": f_e1,
        "ceilings": {
            "domain_judge_acc": real_acc,  # real eval images of both domains told apart
            "content_judge_acc": content.accuracy(e1, ye1),  # the ceiling of content_kept
            "content_judge_acc_domain0": content.accuracy(e0, y0),  # the same judge on untranslated inputs
            "chance": 1.0 / task.n_classes,
            # real target images (judge pool) against real target images (eval pool): FD/KID's floor
            "fd_floor": frechet_distance(f_j1, f_e1),
            "kid_floor": kid(f_j1, f_e1),
        },
        "n_eval": len(e0),
        "n_judge": len(j0) + len(j1),
    }


def tint(
    x: torch.Tensor, stats0: tuple[torch.Tensor, torch.Tensor], stats1: tuple[torch.Tensor, torch.Tensor]
) -> torch.Tensor:
    """The flat colour wash: every channel mapped from domain 0's mean / spread to domain 1's."""
    (m0, s0), (m1, s1) = stats0, stats1
    return ((x - m0.view(1, 3, 1, 1)) / s0.view(1, 3, 1, 1) * s1.view(1, 3, 1, 1) + m1.view(1, 3, 1, 1)).clamp(-1, 1)


def channel_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x.mean(dim=(0, 2, 3)), x.std(dim=(0, 2, 3)).clamp_min(1e-3)


def score(out: torch.Tensor, judges: dict, quick: bool, seed: int, device: torch.device) -> dict[str, float]:
    """Every judge's verdict on one row's translations of the task's eval inputs."""
    from rfp_core.evaluate.judges import two_sample_accuracy
    from rfp_core.evaluate.metrics import edge_agreements, frechet_distance, kid

    out = out.clamp(-1, 1)
    feats = judges["domain"].features(out).numpy()
    return {
        "content_kept": judges["content"].accuracy(out, judges["labels"]),
        "transfer_rate": float((judges["domain"].predict_proba(out) >= 0.5).float().mean()),
        "two_sample_acc": two_sample_accuracy(
            judges["real"], out, steps=JUDGE_STEPS["two_sample"][int(quick)], device=device, seed=seed
        ),
        "fd": frechet_distance(feats, judges["real_features"]),
        "kid": kid(feats, judges["real_features"]),
        "edge_agreement": float(np.mean(edge_agreements(judges["inputs"], out))),
    }
