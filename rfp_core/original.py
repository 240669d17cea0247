"""Run folders and checkpoints written by the original RF Pix2Pix trainer.

A run folder holds `config.json` (the nested layout) and one `.ckpt` per part and step:
`codec_<run>_<step>.ckpt`, `saliency_<run>_<step>.ckpt`, `velocity_<run>_<step>.ckpt` and
`velocity_<run>_final_ema.ckpt`. Each `.ckpt` is `{"config": <the holder's config>,
"state_dict": {"net.<...>": tensor}}`: the nets here use the same parameter names, so the
state dict loads with `strict=True` once the holder's `net.` prefix is dropped. Files are read
with `weights_only=True` (no pickled code runs).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from rfp_core.checkpoint import CheckpointError, load_checkpoint
from rfp_core.config import ConfigError, ModelConfig
from rfp_core.config_files import load_config

_STEP = re.compile(r"^(?P<part>codec|saliency|velocity)_.+_(?P<step>\d+)\.ckpt$")


@dataclass
class OriginalRun:
    folder: Path
    cfg: ModelConfig
    velocity: Path
    codec: Path | None
    saliency: Path | None


def checkpoint_step(path: str | Path) -> int | None:
    """The step in `<part>_<run>_<step>.ckpt` (None for `_final_ema`), read as the original does."""
    match = _STEP.match(Path(path).name)
    return int(match.group("step")) if match else None


def _newest(folder: Path, part: str) -> Path | None:
    stepped = [(checkpoint_step(p), p) for p in folder.glob(f"{part}_*.ckpt") if checkpoint_step(p) is not None]
    return max(stepped)[1] if stepped else None


def is_original_run(folder: str | Path) -> bool:
    folder = Path(folder)
    return folder.is_dir() and (folder / "config.json").is_file() and any(folder.glob("velocity_*.ckpt"))


def find_original_run(folder: str | Path) -> OriginalRun:
    """The config and the checkpoints to use: the final EMA velocity when there is one, else the
    highest step; the highest-step codec and saliency."""
    folder = Path(folder)
    if not is_original_run(folder):
        raise ConfigError(f"{folder}: not an original run folder (needs config.json and velocity_*.ckpt)")
    finals = sorted(folder.glob("velocity_*_final_ema.ckpt"))
    velocity = finals[-1] if finals else _newest(folder, "velocity")
    if velocity is None:
        raise ConfigError(f"{folder}: no velocity checkpoint (velocity_<run>_<step>.ckpt)")
    return OriginalRun(
        folder, load_config(folder / "config.json"), velocity, _newest(folder, "codec"), _newest(folder, "saliency")
    )


def load_state(path: str | Path) -> tuple[dict, dict]:
    """(holder config, state dict without the holder's `net.` prefix) of an original `.ckpt`."""
    ckpt = load_checkpoint(Path(path), map_location="cpu")
    if "state_dict" not in ckpt or "config" not in ckpt:
        raise CheckpointError(f"{path}: not an original trainer checkpoint (expected 'config' and 'state_dict')")
    state = {k.removeprefix("net."): v for k, v in ckpt["state_dict"].items()}
    return ckpt["config"], state


def load_into(net: nn.Module, path: str | Path) -> nn.Module:
    """Load an original `.ckpt` into `net` with strict=True; a mismatch names the file and keys."""
    _, state = load_state(path)
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{path} does not fit the net its config describes: {str(exc)[:400]}") from None
    return net


def load_original_nets(run: OriginalRun, device: str | torch.device = "cpu") -> tuple[nn.Module, nn.Module]:
    """(velocity net, codec) of an original run, frozen and in eval mode."""
    from rfp_core.nets import build_velocity_net
    from rfp_core.nets.autoencoder import build_codec

    codec = build_codec(run.cfg.codec.net)
    if not codec.is_identity:
        if run.codec is None:
            raise ConfigError(
                f"{run.folder}: the config names a {run.cfg.codec.net.type} codec but no codec_*.ckpt is there"
            )
        load_into(codec, run.codec)
    velocity = load_into(build_velocity_net(run.cfg.velocity.net, in_channels=codec.latent_channels), run.velocity)
    return (velocity.to(device).eval().requires_grad_(False), codec.to(device).eval().requires_grad_(False))


def load_original_saliency(run: OriginalRun, device: str | torch.device = "cpu") -> nn.Module:
    from rfp_core.nets.autoencoder import build_codec
    from rfp_core.nets.saliency import SaliencyNet

    if run.saliency is None:
        raise ConfigError(f"{run.folder}: no saliency_*.ckpt in this run folder")
    net_cfg = run.cfg.saliency.net.model_copy(update={"pretrained": False})
    net = SaliencyNet(net_cfg, in_channels=build_codec(run.cfg.codec.net).latent_channels)
    return load_into(net, run.saliency).to(device).eval().requires_grad_(False)
