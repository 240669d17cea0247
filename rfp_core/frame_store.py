"""Content-addressed store of decoded frames, shared by every experiment.

Layout: `<root>/frames/s<max_side>/<ab>/<sha1(frame_key)>.png`. Frame keys are derived from
file content (method.md), so a key names the same pixels forever and a frame is written once.
The cap is part of the path, so stores with different caps never mix.
PNG keeps frames lossless; compress level 1 trades a little disk for fast writes and reads.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

from PIL import Image

from rfp_core import paths

PNG_COMPRESS_LEVEL = 1


def cap_short_side(image: Image.Image, max_side: int) -> Image.Image:
    """Scale down (Lanczos, aspect kept) so the short side is at most `max_side`."""
    w, h = image.size
    short = min(w, h)
    if short <= max_side:
        return image
    if w <= h:
        size = (max_side, max(1, round(h * max_side / w)))
    else:
        size = (max(1, round(w * max_side / h)), max_side)
    return image.resize(size, Image.Resampling.LANCZOS)


class FrameStore:
    def __init__(self, root: Path | None = None, max_side: int = 512):
        if max_side < 1:
            raise ValueError(f"max_side must be positive, got {max_side}")
        self.root = Path(root) if root is not None else paths.store_dir()
        self.max_side = int(max_side)
        self.frames_dir = self.root / "frames" / f"s{self.max_side}"

    def __repr__(self) -> str:
        return f"FrameStore({str(self.root)!r}, max_side={self.max_side})"

    def path_for(self, frame_key: str) -> Path:
        digest = hashlib.sha1(frame_key.encode("utf-8")).hexdigest()
        return self.frames_dir / digest[:2] / f"{digest}.png"

    def has(self, frame_key: str) -> bool:
        return self.path_for(frame_key).exists()

    def put(self, frame_key: str, image: Image.Image) -> Path:
        """Store `image` under `frame_key` (no-op when present); returns its path."""
        final = self.path_for(frame_key)
        if final.exists():
            return final
        final.parent.mkdir(parents=True, exist_ok=True)
        image = cap_short_side(image.convert("RGB"), self.max_side)
        # temp + rename in the same folder: readers never see a half-written frame. No fsync:
        # the store is a cache of decodable sources, and fsync per frame would dominate ingest.
        fd, tmp = tempfile.mkstemp(prefix=f".{final.stem}.", suffix=".tmp", dir=final.parent)
        try:
            with os.fdopen(fd, "wb") as fh:
                image.save(fh, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
            os.replace(tmp, final)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return final

    def load(self, frame_key: str) -> Image.Image:
        path = self.path_for(frame_key)
        try:
            with Image.open(path) as img:
                return img.convert("RGB")
        except FileNotFoundError:
            raise FileNotFoundError(
                f"frame {frame_key!r} is not in the store {self.frames_dir} (expected {path}); "
                "run `rfp ingest` for its source with the same --store-max-side"
            ) from None
        except OSError as exc:
            raise OSError(f"stored frame {path} (key {frame_key!r}) is damaged ({exc}); delete it and re-ingest") from None
