"""Two tiny generated domains for training tests: warm flat discs vs cool striped discs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

BACKGROUND = (128, 128, 128)


def disc_image(domain: int, rng: np.random.Generator, size: int = 32) -> Image.Image:
    """A disc at a random place and radius on grey; domain 0 flat warm, domain 1 cool stripes."""
    img = Image.new("RGB", (size, size), BACKGROUND)
    r = rng.uniform(0.2, 0.35) * size
    cx, cy = rng.uniform(r, size - r, 2)
    mask = Image.new("L", (size, size), 0)
    ImageDraw.Draw(mask).ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    if domain == 0:
        fill = np.zeros((size, size, 3), np.uint8)
        fill[:] = (int(rng.integers(200, 256)), int(rng.integers(60, 140)), int(rng.integers(0, 50)))
    else:
        a, b = (0, int(rng.integers(90, 160)), int(rng.integers(200, 256))), (20, 220, int(rng.integers(180, 256)))
        stripes = (np.arange(size) // 3) % 2 == 0
        fill = np.where(stripes[None, :, None], np.array(a, np.uint8), np.array(b, np.uint8))
        fill = np.broadcast_to(fill, (size, size, 3)).astype(np.uint8)
    img.paste(Image.fromarray(fill), (0, 0), mask)
    return img


def make_discs(root: Path, n: int = 24, size: int = 32, seed: int = 0) -> tuple[Path, Path]:
    """`root/domain0` and `root/domain1`, n PNGs each (different names: unpaired)."""
    rng = np.random.default_rng(seed)
    dirs = []
    for domain in (0, 1):
        d = Path(root) / f"domain{domain}"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            disc_image(domain, rng, size).save(d / f"d{domain}_{i:03d}.png")
        dirs.append(d)
    return dirs[0], dirs[1]
