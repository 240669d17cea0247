"""Phase 2 in paired mode: the velocity fitted on true (same-stem) pairs, plain MSE by default.

Writes `<out_dir>/velocity.pt` in phase 2's format (so Translator / `rfp translate` use it) and
`<out_dir>/pairs.parquet`. Resume: a rerun with the same pairs and settings continues from
`paired_state.pt` (batches are a function of the step, see `paired_batches`).
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pyarrow.parquet as pq
import torch

from rfp_core.atomic import atomic_path
from rfp_core.checkpoint import save_checkpoint
from rfp_core.config import ModelConfig
from rfp_core.flow.paired import PAIRED_DEFAULT_LOSS, PairedDataset, paired_batches, pairing_from_filenames
from rfp_core.train.codec_io import load_codec
from rfp_core.train.reflow import FitSettings, Loss, build_velocity_net, fit


def train_paired(
    cfg: ModelConfig,
    manifest: Path,
    out_dir: Path,
    store=None,
    device: str | torch.device = "cpu",
    steps: int | None = None,
    loss: Loss = PAIRED_DEFAULT_LOSS,
    saliency_checkpoint: Path | None = None,
    codec_checkpoint: Path | None = None,
    progress: bool = True,
) -> Path:
    """Train on the filename pairs of `manifest`; returns the velocity.pt path."""
    from rfp_core.media.frame_store import FrameStore

    out_dir, device = Path(out_dir), torch.device(device)
    out_dir.mkdir(parents=True, exist_ok=True)
    store = store if store is not None else FrameStore(max_side=cfg.store_max_side)
    pairs = pairing_from_filenames(manifest)
    with atomic_path(out_dir / "pairs.parquet") as tmp:
        pq.write_table(pairs, tmp)
    dataset = PairedDataset(pairs, store, cfg.max_size, split="train", holdout_fraction=cfg.saliency.holdout_fraction)
    codec = load_codec(cfg, codec_checkpoint, device)
    h = None
    if loss == "saliency":
        if saliency_checkpoint is None:
            raise ValueError("paired mode with loss 'saliency' needs saliency_checkpoint; the paired default is 'mse'")
        from rfp_core.train.saliency import load_saliency

        sal = load_saliency(saliency_checkpoint, device)
        h = sal.frozen_h() if hasattr(sal, "frozen_h") else sal.h
    torch.manual_seed(cfg.seed)
    net = build_velocity_net(cfg, codec.latent_channels)
    settings = FitSettings.from_config(cfg, steps=steps, loss=loss)
    digest = hashlib.sha256(
        json.dumps(sorted(zip(pairs.column("d0_key").to_pylist(), pairs.column("d1_key").to_pylist()))).encode()
    ).hexdigest()
    result = fit(
        net,
        paired_batches(dataset, lambda x: codec.encode(x.to(device)), settings.batch_size, cfg.seed),
        settings,
        device=device,
        h=h,
        state_path=out_dir / "paired_state.pt",
        fingerprint={"pairs": digest, "config": cfg.to_json()},
        checkpoint_every=max(1, settings.steps // 10),
        progress=progress,
        desc="velocity (paired)",
    )
    final = out_dir / "velocity.pt"
    save_checkpoint(
        final,
        {
            "velocity": result.model.state_dict(),
            "config": json.loads(cfg.to_json()),
            "in_channels": codec.latent_channels,
            "step": result.steps,
            "final_loss": result.final_loss,
            "codec": codec.state_dict(),
            "paired": {"pairs": pairs.num_rows, "digest": digest, "loss": loss},
        },
    )
    print(
        f"paired: {pairs.num_rows} pairs ({len(dataset)} train), {result.steps} steps, "
        f"final loss {result.final_loss:.5f} -> {final}",
        file=sys.stderr,
    )
    return final
