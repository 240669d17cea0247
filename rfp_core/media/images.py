"""Tensor <-> PIL conversion, inference-time loading and PNG / grid writing.

Images are float tensors in [-1, 1], (3, S, S) or (B, 3, S, S)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torchvision.transforms.v2 import functional as TF
from torchvision.utils import make_grid

from rfp_core.atomic import atomic_path

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


# ImageNet statistics (torchvision's pretrained backbones): the saliency net and the structure encoders
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ImageLoadError(ValueError):
    """An input image that cannot be read; the message names the file."""


def to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL RGB -> float (3, H, W) in [-1, 1] (the one image -> tensor rule: loaders, translation, serving).

    Done in numpy: torch's intra-op threads turn this tiny op into ~50 ms of spinning when
    the loader runs in a process whose cores are busy (measured), numpy never spins."""
    arr = np.asarray(image.convert("RGB"), dtype=np.float32)
    arr = arr.transpose(2, 0, 1) * np.float32(1 / 127.5) - np.float32(1.0)
    return torch.from_numpy(np.ascontiguousarray(arr))


def to_pil(x: torch.Tensor) -> Image.Image:
    """(3, H, W) in [-1, 1] -> PIL RGB (values outside the range are clipped)."""
    x = ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return TF.to_pil_image(x)


def center_square(img: Image.Image, size: int) -> Image.Image:
    """The centred square of the short side, Lanczos-resized to `size` (the inference crop)."""
    w, h = img.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    img = img.crop((left, top, left + side, top + side))
    return img if side == size else img.resize((size, size), Image.Resampling.LANCZOS)


def load_image(path: str | Path, size: int) -> torch.Tensor:
    """Read an image file for inference: EXIF orientation, RGB, centred square, resize."""
    path = Path(path)
    try:
        with Image.open(path) as img:
            img = ImageOps.exif_transpose(img).convert("RGB")
    except (UnidentifiedImageError, OSError) as exc:
        raise ImageLoadError(f"{path}: not a readable image ({exc}); remove it or convert it to PNG/JPEG") from None
    return to_tensor(center_square(img, size))


def find_images(inputs: Iterable[str | Path]) -> list[Path]:
    """Files as given, folders searched recursively for image files, in a stable order."""
    found: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found += sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
        elif p.is_file():
            found.append(p)
        else:
            raise FileNotFoundError(f"{p}: no such file or folder")
    return found


def save_png(x: torch.Tensor, path: str | Path) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        to_pil(x).save(tmp, format="PNG")
    return path


def _grid(rows: Sequence[torch.Tensor]) -> torch.Tensor:
    """Each row a (B, 3, S, S) batch of the same B; returns one (3, H, W) image in [-1, 1]."""
    ncol = rows[0].shape[0]
    stacked = torch.cat([r.detach().float().cpu().clamp(-1, 1) for r in rows])
    return make_grid(stacked, nrow=ncol, padding=2, pad_value=1.0)


def grid_png_bytes(rows: Sequence[torch.Tensor]) -> bytes:
    buf = io.BytesIO()
    to_pil(_grid(rows)).save(buf, format="PNG")
    return buf.getvalue()


def paired_rows(top: torch.Tensor, bottom: torch.Tensor, columns: int) -> list[torch.Tensor]:
    """Every image of `top` (B, 3, S, S) above its partner in `bottom`, `columns` to a row: the
    row pairs for `save_grid`. The last pair is filled out with white tiles."""
    if len(top) != len(bottom):
        raise ValueError(f"{len(top)} images above but {len(bottom)} below")
    rows = []
    for i in range(0, len(top), columns):
        for half in (top, bottom):
            chunk = half[i : i + columns].detach().float().cpu()
            if len(chunk) < columns:
                chunk = torch.cat([chunk, torch.ones(columns - len(chunk), *chunk.shape[1:])])
            rows.append(chunk)
    return rows


def save_grid(rows: Sequence[torch.Tensor], path: str | Path) -> Path:
    """Write rows of images (e.g. inputs above outputs) as one PNG, atomically."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_bytes(grid_png_bytes(rows))
    return path
