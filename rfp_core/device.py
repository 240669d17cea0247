"""The one device rule: the device asked for (refused with the fix when it is not there), else CUDA,
then MPS, then CPU. The CLI, the benchmarks and the pipeline's resource all ask here."""

from __future__ import annotations

import torch

from rfp_core.config import ConfigError


def pick_device(requested: str | torch.device | None = None) -> torch.device:
    """`requested` if given (and usable), else CUDA, then MPS, then CPU."""
    if requested is not None and str(requested) != "":
        device = torch.device(requested)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"--device {requested}: CUDA is not available on this machine; use --device cpu")
        if device.type == "mps" and not torch.backends.mps.is_available():
            raise ConfigError(f"--device {requested}: MPS is not available on this machine; use --device cpu")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")
