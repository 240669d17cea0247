"""Content-addressed store of decoded frames, shared by every experiment.

Layout: `<root>/frames/s<max_side>/<ab>/<sha1(frame_key)>.png`. Frame keys are derived from
file content (docs/METHOD.md), so a key names the same pixels forever and a frame is written once.
The cap is part of the path, so stores with different caps never mix.
PNG keeps frames lossless; compress level 1 trades a little disk for fast writes and reads.

Beside each frame, smaller copies (`<sha1>@256.ppm`, `@128`, `@64` for a 512 cap: short side
halved while >= 64, only where the frame is larger) let a loader that trains at 128 px read a
256 px frame instead of a 512 px one. The copies are uncompressed (binary PPM, the same pixels):
the loader reads one for every sample, and inflating a PNG copy was most of its time (with PNG
copies the loader beat per-sample seeking 28x, with PPM copies 66-94x: docs/BENCHMARKS.md,
`rfp bench ingest`). They cost a third of the frame's pixels at 3 bytes each (+47% on the
benchmark's 1080p frames). Stores written before hold PNG copies (`@256.png`); those are read too.
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
from pathlib import Path

from PIL import Image

from rfp_core import paths
from rfp_core.atomic import temp_prefix

PNG_COMPRESS_LEVEL = 1
MIN_LEVEL = 64
LEVEL_SUFFIXES = (".ppm", ".png")  # smaller copies: written as the first, the second read too (older stores)


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


def _save(image: Image.Image, final: Path) -> None:
    # temp + rename in the same folder: readers never see a half-written frame. No fsync:
    # the store is a cache of decodable sources, and fsync per frame would dominate ingest.
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(final.name), suffix=".tmp", dir=final.parent)
    try:
        with os.fdopen(fd, "wb") as fh:  # a real file: Pillow encodes with the GIL released
            if final.suffix == ".ppm":
                # through Python's write, which raises on a short write: Pillow's raw encoder writes to
                # the file descriptor itself and took a short write on a full disk as done (a torn copy)
                buffer = io.BytesIO()
                image.save(buffer, format="PPM")
                fh.write(buffer.getbuffer())
            else:
                image.save(fh, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
        os.replace(tmp, final)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class FrameStore:
    def __init__(self, root: Path | None = None, max_side: int = 512, min_level: int = MIN_LEVEL):
        if max_side < 1:
            raise ValueError(f"max_side must be positive, got {max_side}")
        self.root = Path(root) if root is not None else paths.store_dir()
        self.max_side = int(max_side)
        self.frames_dir = self.root / "frames" / f"s{self.max_side}"
        self._frames_str = str(self.frames_dir)
        self.levels: list[int] = []  # short sides of the smaller copies, largest first
        side = self.max_side // 2
        while side >= max(1, min_level):
            self.levels.append(side)
            side //= 2

    def __repr__(self) -> str:
        return f"FrameStore({str(self.root)!r}, max_side={self.max_side})"

    def _path_str(self, frame_key: str, level: int | None = None, suffix: str = LEVEL_SUFFIXES[0]) -> str:
        digest = hashlib.sha1(frame_key.encode("utf-8")).hexdigest()
        name = f"{digest}.png" if level is None else f"{digest}@{level}{suffix}"
        return os.path.join(self._frames_str, digest[:2], name)

    def path_for(self, frame_key: str, level: int | None = None, suffix: str = LEVEL_SUFFIXES[0]) -> Path:
        """The frame's PNG, or (with `level`) where that smaller copy is written (`suffix`: an older store's)."""
        return Path(self._path_str(frame_key, level, suffix))

    def _copies(self, frame_key: str) -> list[Path]:
        """The frame and every smaller copy it may have, in either format (present or not)."""
        return [self.path_for(frame_key)] + [
            self.path_for(frame_key, level, suffix) for level in self.levels for suffix in LEVEL_SUFFIXES
        ]

    def has(self, frame_key: str) -> bool:
        return os.path.exists(self._path_str(frame_key))  # strings, not Paths: called per frame on re-scans

    def put(self, frame_key: str, image: Image.Image) -> Path:
        """Store `image` under `frame_key` (no-op when present); returns its path."""
        final = self.path_for(frame_key)
        if final.exists():
            return final
        final.parent.mkdir(parents=True, exist_ok=True)
        image = cap_short_side(image.convert("RGB"), self.max_side)
        for level in self.levels:
            if min(image.size) > level:
                _save(cap_short_side(image, level), self.path_for(frame_key, level))
        _save(image, final)  # last: `has` is true only once the smaller copies are there too
        return final

    def remove(self, frame_key: str) -> None:
        """Delete the frame (first, so `has` turns false at once) and its smaller copies."""
        for path in self._copies(frame_key):
            path.unlink(missing_ok=True)

    def verify(self, frame_key: str) -> str | None:
        """Why the stored frame (and its smaller copies) cannot be read back in full, or None when
        every file decodes completely. A torn PNG (its CRCs, end chunk) or PPM (short data) fails here."""
        for i, path in enumerate(self._copies(frame_key)):
            if i > 0 and not path.exists():
                continue  # no copy at this level (the frame is smaller than it) or not in this format
            try:
                with Image.open(path) as img:
                    img.load()
            except (OSError, SyntaxError, ValueError) as exc:
                return f"{path}: {exc}"
        return None

    def load(self, frame_key: str, min_side: int | None = None) -> Image.Image:
        """The frame as RGB. With `min_side`, the smallest stored copy whose short side is at
        least that (the full frame when none is, or when the frame itself is smaller)."""
        if min_side is not None:
            for level in reversed(self.levels):
                if level < min_side:
                    continue
                for suffix in LEVEL_SUFFIXES:
                    try:
                        return self._open(self.path_for(frame_key, level, suffix), frame_key)
                    except FileNotFoundError:
                        continue
        return self._open(self.path_for(frame_key), frame_key)

    def _open(self, path: Path, frame_key: str) -> Image.Image:
        try:
            with Image.open(path) as img:
                return img.convert("RGB")
        except FileNotFoundError:
            raise FileNotFoundError(
                f"frame {frame_key!r} is not in the store {self.frames_dir} (expected {path}); "
                "run `rfp ingest` for its source with the same --store-max-side"
            ) from None
        except OSError as exc:
            raise OSError(
                f"stored frame {path} (key {frame_key!r}) is damaged ({exc}); delete it and re-ingest"
            ) from None
