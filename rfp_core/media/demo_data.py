"""A generated two-domain dataset whose content and style can be told apart and checked.

Content is one random shape (disc, square or triangle; position, size, rotation random) and
its true mask is kept. Style is the fill: domain 0 is flat and warm, domain 1 is striped and
cool. Both domains share one plain neutral background, so a translation that keeps the content
keeps the background, and the shape in an output is found by distance from that colour
(`rfp_core.evaluate.metrics.foreground_mask`). The two domains are independent draws with
different file names, so they are unpaired (and never mistaken for the paired mode).

    out/domain0/d0_0000.png ... clip.mp4     out/masks/domain0/d0_0000.png ...
    out/domain1/d1_0000.png ... clip.mp4     out/masks/domain1/d1_0000.png ...
    out/demo_data.json                       parameters; present only when the set is complete
"""

from __future__ import annotations

import colorsys
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import av
import numpy as np
from PIL import Image, ImageDraw

from rfp_core.atomic import atomic_path, atomic_write_text

FORMAT_VERSION = 2
MARKER = "demo_data.json"
# Light neutral grey, identical in both domains; every shape colour is far from it. Not mid-grey:
# a warm colour and a cool one average to about mid-grey, so on the straight path
# X_t = t·X1 + (1 − t)·X0 the inside of a shape would pass through the background colour
# halfway, and the velocity net could not tell it from the background there (outputs came
# out as striped outlines with background-coloured insides).
BACKGROUND = (232, 232, 232)
SHAPES = ("disc", "square", "triangle")
# Minimum RGB distance (0-255 units) of every shape colour from the background.
MIN_COLOUR_DISTANCE = 100.0
# Images per domain: ~10% are held out from training, and the evaluation (judge, FD/KID,
# transfer rate) needs a few dozen of those to say anything; generating them takes a second.
DEFAULT_NUM = 256
DEFAULT_SIZE = 48


@dataclass
class DemoData:
    root: Path
    num: int
    size: int
    seed: int
    video_frames: int
    created: bool = False
    videos: list[Path] = field(default_factory=list)

    @property
    def domain0(self) -> Path:
        return self.root / "domain0"

    @property
    def domain1(self) -> Path:
        return self.root / "domain1"

    def domain_dir(self, domain: int) -> Path:
        return self.root / f"domain{domain}"

    def masks_dir(self, domain: int) -> Path:
        return self.root / "masks" / f"domain{domain}"

    def images(self, domain: int) -> list[Path]:
        return [self.domain_dir(domain) / f"d{domain}_{i:04d}.png" for i in range(self.num)]

    def mask_path(self, domain: int, stem: str) -> Path:
        return self.masks_dir(domain) / f"{stem}.png"


def background_tensor_value() -> tuple[float, float, float]:
    """The background colour in the [-1, 1] units of image tensors."""
    return tuple(c / 127.5 - 1.0 for c in BACKGROUND)  # type: ignore[return-value]


def load_mask(path: str | Path) -> np.ndarray:
    """A stored mask as a bool array (H, W)."""
    return np.asarray(Image.open(path).convert("L")) > 127


# ----------------------------------------------------------------------------------------
# drawing


def _hsv(h_deg: float, s: float, v: float) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb((h_deg % 360) / 360.0, s, v)
    return (round(r * 255), round(g * 255), round(b * 255))


def _distance(a: tuple[int, int, int], b: tuple[int, int, int]) -> float:
    return math.dist(a, b)


def _warm(rng: np.random.Generator) -> tuple[int, int, int]:
    # reds, oranges, yellows; redraw the rare one that comes close to the grey background
    while True:
        c = _hsv(rng.uniform(-10, 50), rng.uniform(0.75, 1.0), rng.uniform(0.85, 1.0))
        if _distance(c, BACKGROUND) >= MIN_COLOUR_DISTANCE:
            return c


def _cool_pair(rng: np.random.Generator) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """A light and a dark cool colour (cyan .. blue .. violet) for the two stripe phases."""
    while True:
        hue = rng.uniform(180, 250)
        light = _hsv(hue + rng.uniform(-10, 10), rng.uniform(0.55, 0.75), rng.uniform(0.9, 1.0))
        dark = _hsv(hue + rng.uniform(-10, 10), rng.uniform(0.85, 1.0), rng.uniform(0.4, 0.55))
        if min(_distance(light, BACKGROUND), _distance(dark, BACKGROUND)) >= MIN_COLOUR_DISTANCE:
            return light, dark


def _stripe_period(size: int) -> int:
    return max(4, round(size / 12))


@dataclass
class _Shape:
    kind: str
    cx: float
    cy: float
    r: float
    angle: float

    def polygon(self) -> list[tuple[float, float]]:
        corners = {"square": 4, "triangle": 3}[self.kind]
        # a square's corners sit at r·√2 would leave the canvas; keep its half-side = 0.8 r
        radius = self.r * (1.13 if self.kind == "square" else 1.0)
        return [
            (
                self.cx + radius * math.cos(self.angle + 2 * math.pi * k / corners),
                self.cy + radius * math.sin(self.angle + 2 * math.pi * k / corners),
            )
            for k in range(corners)
        ]


def _random_shape(rng: np.random.Generator, size: int) -> _Shape:
    r = rng.uniform(0.18, 0.3) * size
    margin = r * 1.15 + 1
    return _Shape(
        kind=SHAPES[rng.integers(len(SHAPES))],
        cx=rng.uniform(margin, size - 1 - margin),
        cy=rng.uniform(margin, size - 1 - margin),
        r=r,
        angle=rng.uniform(0, 2 * math.pi),
    )


def _shape_mask(shape: _Shape, size: int) -> Image.Image:
    # drawn without anti-aliasing so the mask is exactly the set of shape pixels
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    if shape.kind == "disc":
        draw.ellipse([shape.cx - shape.r, shape.cy - shape.r, shape.cx + shape.r, shape.cy + shape.r], fill=255)
    else:
        draw.polygon(shape.polygon(), fill=255)
    return mask


def _fill(domain: int, rng: np.random.Generator, size: int) -> np.ndarray:
    """The style: an (S, S, 3) uint8 texture that the mask cuts the shape out of."""
    if domain == 0:
        return np.broadcast_to(np.array(_warm(rng), np.uint8), (size, size, 3)).copy()
    light, dark = _cool_pair(rng)
    period = _stripe_period(size)
    phase = rng.integers(period)
    rows = ((np.arange(size) + phase) % period) < period // 2
    tex = np.where(rows[:, None, None], np.array(light, np.uint8), np.array(dark, np.uint8))
    return np.broadcast_to(tex, (size, size, 3)).copy()


def _compose(mask: Image.Image, fill: np.ndarray) -> np.ndarray:
    m = np.asarray(mask)[..., None] > 127
    return np.where(m, fill, np.array(BACKGROUND, np.uint8)).astype(np.uint8)


def draw_sample(domain: int, rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """One image (S, S, 3) uint8 and its bool mask (S, S)."""
    mask = _shape_mask(_random_shape(rng, size), size)
    return _compose(mask, _fill(domain, rng, size)), np.asarray(mask) > 127


def _write_video(path: Path, domain: int, rng: np.random.Generator, size: int, frames: int) -> None:
    """A shape of this domain's style sliding across the frame, as H.264 in mp4."""
    side = size + size % 2  # yuv420p needs even dimensions
    shape = _random_shape(rng, side)
    fill = _fill(domain, rng, side)
    margin = shape.r * 1.15 + 1
    x0, x1 = margin, side - 1 - margin
    with atomic_path(path) as tmp:
        with av.open(str(tmp), mode="w", format="mp4") as container:
            stream = container.add_stream("libx264", rate=12)
            stream.width = stream.height = side
            stream.pix_fmt = "yuv420p"
            stream.options = {"crf": "12"}
            for i in range(frames):
                shape.cx = x0 + (x1 - x0) * i / max(1, frames - 1)
                shape.angle += 0.1
                rgb = _compose(_shape_mask(shape, side), fill)
                for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)


# ----------------------------------------------------------------------------------------
# the dataset


def _params(num: int, size: int, seed: int, video_frames: int) -> dict:
    return {"version": FORMAT_VERSION, "num": num, "size": size, "seed": seed, "video_frames": video_frames}


def _complete(data: DemoData) -> bool:
    marker = data.root / MARKER
    try:
        saved = json.loads(marker.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    if saved != _params(data.num, data.size, data.seed, data.video_frames):
        return False
    for domain in (0, 1):
        for img in data.images(domain):
            if not img.exists() or not data.mask_path(domain, img.stem).exists():
                return False
        if not (data.domain_dir(domain) / "clip.mp4").exists():
            return False
    return True


def _clear(data: DemoData) -> None:
    """Remove a previous (other-parameter or partial) set's files; only names this module writes."""
    (data.root / MARKER).unlink(missing_ok=True)
    for domain in (0, 1):
        for pattern_dir, pattern in (
            (data.domain_dir(domain), f"d{domain}_*.png"),
            (data.masks_dir(domain), f"d{domain}_*.png"),
        ):
            for p in pattern_dir.glob(pattern):
                p.unlink()
        (data.domain_dir(domain) / "clip.mp4").unlink(missing_ok=True)


def make_demo_data(
    out: str | Path, num: int = DEFAULT_NUM, size: int = DEFAULT_SIZE, seed: int = 0, video_frames: int = 24
) -> DemoData:
    """Create the demo dataset under `out` (skipped when a complete one with these parameters is there)."""
    if num < 1:
        raise ValueError(f"num must be at least 1 (got {num})")
    if size < 16:
        raise ValueError(f"size must be at least 16 px so shapes and stripes are visible (got {size})")
    if video_frames < 1:
        raise ValueError(f"video_frames must be at least 1 (got {video_frames})")
    data = DemoData(Path(out), num, size, seed, video_frames)
    data.videos = [data.domain_dir(d) / "clip.mp4" for d in (0, 1)]
    if _complete(data):
        return data
    _clear(data)
    for domain in (0, 1):
        data.domain_dir(domain).mkdir(parents=True, exist_ok=True)
        data.masks_dir(domain).mkdir(parents=True, exist_ok=True)
        # each domain its own stream: independent draws, and changing num keeps earlier images
        rng = np.random.default_rng([seed, domain])
        for img_path in data.images(domain):
            rgb, mask = draw_sample(domain, rng, size)
            # plain writes: a crash leaves no marker, and the next call regenerates everything
            Image.fromarray(rgb).save(img_path, format="PNG")
            Image.fromarray((mask * 255).astype(np.uint8)).save(data.mask_path(domain, img_path.stem), format="PNG")
        _write_video(data.videos[domain], domain, np.random.default_rng([seed, domain, 1]), size, video_frames)
    # the marker goes last: its presence means every file above is in place
    atomic_write_text(data.root / MARKER, json.dumps(_params(num, size, seed, video_frames), indent=2))
    data.created = True
    return data
