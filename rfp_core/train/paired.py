"""Phase 2 in paired mode: the velocity fitted on true (same-stem) pairs, plain MSE by default.

Writes `<out_dir>/velocity.pt` in phase 2's format (so Translator / `rfp translate` use it),
`<out_dir>/pairs.parquet` (the pairs used) and `<out_dir>/paired_metrics.json` (the per-step
losses, the stems left out). Resume: a rerun with the same pairs and settings continues from
`paired_state.pt` (batches are a function of the step, see `paired_batches`).
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from rfp_core.atomic import atomic_path, atomic_write_text
from rfp_core.checkpoint import save_checkpoint
from rfp_core.config import ModelConfig
from rfp_core.flow.paired import PAIRED_DEFAULT_LOSS, PairedDataset, filename_match, paired_batches, warn_unmatched
from rfp_core.train.codec_io import load_codec
from rfp_core.train.reflow import FitResult, FitSettings, Loss, build_velocity_net, fit
from rfp_core.train.velocity import VelocityResult


@dataclass
class PairedResult(VelocityResult):
    """Phase 2's result plus the pairing."""

    pairs: pa.Table | None = None
    unmatched: tuple[list[str], list[str]] = ([], [])  # stems only in domain 0, only in domain 1: left out


def _pairs_digest(pairs: pa.Table) -> str:
    keys = zip(pairs.column("d0_key").to_pylist(), pairs.column("d1_key").to_pylist())
    return hashlib.sha256(json.dumps(sorted(keys)).encode()).hexdigest()


def _saliency_h(loss: Loss, saliency_checkpoint: Path | None, device):
    if loss != "saliency":
        return None
    if saliency_checkpoint is None:
        raise ValueError("paired mode with loss 'saliency' needs saliency_checkpoint; the paired default is 'mse'")
    from rfp_core.train.saliency import load_saliency

    sal = load_saliency(saliency_checkpoint, device)
    return sal.frozen_h() if hasattr(sal, "frozen_h") else sal.h


def _save(final: Path, result: FitResult, cfg: ModelConfig, codec, pairs: pa.Table, digest: str, loss: Loss) -> None:
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


def fit_paired(
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
) -> PairedResult:
    """Train on the filename pairs of `manifest`: exactly the stems present in both domains."""
    from rfp_core.media.frame_store import FrameStore

    out_dir, device = Path(out_dir), torch.device(device)
    out_dir.mkdir(parents=True, exist_ok=True)
    store = store if store is not None else FrameStore(max_side=cfg.store_max_side)
    pairs, only0, only1 = filename_match(manifest)
    warn_unmatched(only0, only1)
    with atomic_path(out_dir / "pairs.parquet") as tmp:
        pq.write_table(pairs, tmp)
    dataset = PairedDataset(pairs, store, cfg.max_size, split="train", holdout_fraction=cfg.saliency.holdout_fraction)
    codec = load_codec(cfg, codec_checkpoint, device)
    h = _saliency_h(loss, saliency_checkpoint, device)
    torch.manual_seed(cfg.seed)
    net = build_velocity_net(cfg, codec.latent_channels)
    settings = FitSettings.from_config(cfg, steps=steps, loss=loss)
    digest = _pairs_digest(pairs)
    start = time.perf_counter()
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
    seconds = time.perf_counter() - start
    final = out_dir / "velocity.pt"
    _save(final, result, cfg, codec, pairs, digest, loss)
    # steps resumed from a state file took no time here: the rate is of this call's steps only
    rate = len(result.losses) * settings.batch_size / seconds if seconds > 0 else 0.0
    return _report(final, result, pairs, len(dataset), (only0, only1), loss, rate)


def _report(
    final: Path, result: FitResult, pairs: pa.Table, n_train: int, unmatched: tuple, loss: Loss, rate: float
) -> PairedResult:
    """paired_metrics.json beside the checkpoint, a summary line, the result."""
    only0, only1 = unmatched
    metrics = {"losses": result.losses, "pairs": pairs.num_rows, "train_pairs": n_train, "loss": loss}
    metrics_path = atomic_write_text(
        final.parent / "paired_metrics.json",
        json.dumps({**metrics, "only_domain0": only0, "only_domain1": only1}, indent=2) + "\n",
    )
    print(
        f"paired: {pairs.num_rows} pairs ({n_train} train; {len(only0)} domain-0 and {len(only1)} domain-1 "
        f"stem(s) without a partner left out), {result.steps} steps, final loss {result.final_loss:.5f} -> {final}",
        file=sys.stderr,
    )
    return PairedResult(final, result.final_loss, result.steps, rate, None, metrics_path, pairs, (only0, only1))


def train_paired(cfg: ModelConfig, manifest: Path, out_dir: Path, **kwargs) -> Path:
    """`fit_paired` for `rfp train --paired`: the velocity.pt path."""
    return fit_paired(cfg, manifest, out_dir, **kwargs).checkpoint
