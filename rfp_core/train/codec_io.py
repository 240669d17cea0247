"""The frozen phase-0 codec that the later phases work through."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from rfp_core.checkpoint import load_checkpoint
from rfp_core.config import ModelConfig
from rfp_core.config_files import config_from_dict
from rfp_core.nets.autoencoder import build_codec


def load_codec(
    cfg: ModelConfig | None, checkpoint: Path | None, device: str | torch.device = "cpu", state: dict | None = None
) -> nn.Module:
    """`build_codec(cfg.codec.net)` with weights from `checkpoint` (key "codec") or `state`; frozen, eval.
    With `cfg` None the config comes from the checkpoint (a codec.pt carries its own)."""
    if state is None and checkpoint is not None:
        ckpt = load_checkpoint(Path(checkpoint), map_location="cpu")
        state = ckpt["codec"]
        if cfg is None:
            cfg = config_from_dict(ckpt["config"], source=str(checkpoint))
    if cfg is None:
        raise ValueError("load_codec needs a config or a checkpoint that carries one")
    codec = build_codec(cfg.codec.net)
    if state:
        codec.load_state_dict(state)
    elif not codec.is_identity:
        raise ValueError(
            f"codec type {cfg.codec.net.type!r} needs trained weights: pass the codec checkpoint "
            "(codec_checkpoint=...) or set codec.net.type to 'Identity' to work in pixel space"
        )
    return codec.to(device).eval().requires_grad_(False)
