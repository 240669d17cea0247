"""Structure encoders: an image -> one L2-normalised vector describing its layout.

`dinov2_vits14` (default; `_vitb14`, `_vitl14` larger): DINOv2's CLS token through timm.
timm rather than transformers: it is already a dependency (nothing new to install), its
DINOv2 class is the same architecture with the same released weights (hub `timm/...lvd142m`,
or Meta's original `.pth`, converted by timm's own `checkpoint_filter_fn`), and it builds a
tiny random model of the real class for tests with two keyword arguments.

`thumbnail`: a small one-channel thumbnail (the classic "tiny image" layout descriptor) of
each pixel's distance from the image's dominant colour. No weights, instant; the demo's default.

`hog`: histograms of oriented gradients (Dalal & Triggs) through scikit-image: where the edges
are and which way they run, normalised over large blocks. No weights; reads shape through texture
that a thumbnail mistakes for layout.

Weights are never downloaded here: `weights_path`, else the HF hub cache, else torch hub's
cache. When none holds them, `WeightsMissingError` says what to put where.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms import v2

from rfp_core.config import ConfigError, StructureConfig
from rfp_core.media.images import IMAGENET_MEAN, IMAGENET_STD

# 16 x 14-pixel patches: DINOv2's pretraining crop; the 518 px position table is resampled.
DINO_INPUT = 224


@dataclass(frozen=True)
class DinoSpec:
    arch: str
    hf_hub_id: str
    dim: int


DINO_SPECS = {
    "dinov2_vits14": DinoSpec("vit_small_patch14_dinov2", "timm/vit_small_patch14_dinov2.lvd142m", 384),
    "dinov2_vitb14": DinoSpec("vit_base_patch14_dinov2", "timm/vit_base_patch14_dinov2.lvd142m", 768),
    "dinov2_vitl14": DinoSpec("vit_large_patch14_dinov2", "timm/vit_large_patch14_dinov2.lvd142m", 1024),
}


class WeightsMissingError(ConfigError):
    """The structure encoder's pretrained weights are not on this machine."""


class StructureEncoder(Protocol):
    encoder_id: str
    dim: int

    def embed(self, images: list[Image.Image]) -> np.ndarray: ...


def _square(img: Image.Image) -> Image.Image:
    """Centre square of the short side: the region training crops are taken from."""
    w, h = img.size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    return img.crop((left, top, left + s, top + s))


class ThumbnailEncoder:
    """`size`x`size` map of each pixel's colour distance from the image's median colour,
    mean-centred then L2-normalised (so cosine similarity = correlation of layouts).

    Not plain luminance: the two domains differ in colour by definition, and an object whose
    luminance matches the background (a red disc on grey) vanishes from a luminance thumbnail.
    Distance from the dominant tone marks *where things are*, whatever their colour or polarity.
    """

    def __init__(self, size: int = 16):
        self.size = size
        self.dim = size * size
        self.encoder_id = f"thumbnail{size}"

    def vector(self, img: Image.Image) -> np.ndarray:
        sq = _square(img.convert("RGB"))
        # distances at up to 4x the thumbnail, then BOX (area mean) down: thin stripes count fully
        work = min(sq.size[0], 4 * self.size)
        rgb = np.asarray(sq.resize((work, work), Image.Resampling.BOX), np.float32)
        dist = np.linalg.norm(rgb - np.median(rgb.reshape(-1, 3), axis=0), axis=2)
        small = Image.fromarray(dist, mode="F").resize((self.size, self.size), Image.Resampling.BOX)
        v = np.asarray(small, np.float32).reshape(-1)
        v = v - v.mean()
        return v / max(float(np.linalg.norm(v)), 1e-6)

    def embed(self, images: list[Image.Image]) -> np.ndarray:
        return _stack(self, images)


class HogEncoder:
    """HOG of the centre square resized to 8 pixels a cell: `cells` x `cells` cells of 9 unsigned
    orientations, each block of half the image's width (cells // 2 a side) L2-Hys normalised.

    Half-image blocks, not Dalal & Triggs' 2 x 2: a texture's strong edges then weigh against the
    whole shape around them rather than swamping the cells next to them (same-digit agreement of the
    nearest neighbour on the bench's digits: 0.77 with 2 x 2 blocks, 0.88 with 4 x 4; BENCHMARKS.md).
    The gradient of each pixel is that of its strongest channel (`channel_axis`), so an edge between
    two colours of equal luminance still counts.
    """

    def __init__(self, cells: int = 8):
        self.cells = cells
        self.block = max(1, cells // 2)
        self.side = 8 * cells
        self.dim = (cells - self.block + 1) ** 2 * self.block**2 * 9
        self.encoder_id = f"hog{cells}"

    def vector(self, img: Image.Image) -> np.ndarray:
        from skimage.feature import hog

        sq = _square(img.convert("RGB")).resize((self.side, self.side), Image.Resampling.BILINEAR)
        v = hog(
            np.asarray(sq, np.float32) / 255.0,
            orientations=9,
            pixels_per_cell=(8, 8),
            cells_per_block=(self.block, self.block),
            channel_axis=-1,
        ).astype(np.float32)
        v = v - v.mean()
        return v / max(float(np.linalg.norm(v)), 1e-6)

    def embed(self, images: list[Image.Image]) -> np.ndarray:
        return _stack(self, images)


def _stack(encoder, images: list[Image.Image]) -> np.ndarray:
    """(N, dim) of a weight-free encoder's per-image `vector`s."""
    out = np.zeros((len(images), encoder.dim), np.float32)
    for i, img in enumerate(images):
        out[i] = encoder.vector(img)
    return out


class DinoEncoder:
    """CLS embedding of a timm DINOv2 model (`num_classes=0`, token pooling)."""

    def __init__(
        self, model: torch.nn.Module, encoder_id: str, device: str | torch.device = "cpu", batch_size: int = 32
    ):
        self.model = model.eval().requires_grad_(False).to(device)
        self.encoder_id = encoder_id
        self.device = torch.device(device)
        self.dim = int(model.num_features)
        self.batch_size = batch_size
        side = model.patch_embed.img_size[0]
        self.transform = v2.Compose(
            [
                v2.ToImage(),
                v2.Resize(side, interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
                v2.CenterCrop(side),
                v2.ToDtype(torch.float32, scale=True),
                v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
            ]
        )

    @torch.inference_mode()
    def embed(self, images: list[Image.Image]) -> np.ndarray:
        chunks = []
        for i in range(0, len(images), self.batch_size):
            x = torch.stack([self.transform(im.convert("RGB")) for im in images[i : i + self.batch_size]])
            feats = self.model(x.to(self.device))
            chunks.append(F.normalize(feats.float(), dim=1).cpu().numpy())
        if not chunks:
            return np.zeros((0, self.dim), np.float32)
        return np.concatenate(chunks).astype(np.float32, copy=False)


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)


def find_dino_weights(name: str, weights_path: Path | None = None) -> Path | None:
    """The weights file for `name`: the configured path, else the HF cache, else torch hub's cache."""
    if weights_path is not None:
        return Path(weights_path) if Path(weights_path).is_file() else None
    from huggingface_hub import try_to_load_from_cache

    spec = DINO_SPECS[name]
    for filename in ("model.safetensors", "pytorch_model.bin"):
        hit = try_to_load_from_cache(spec.hf_hub_id, filename)
        if isinstance(hit, str):  # a path, not None or the "known missing" sentinel
            return Path(hit)
    import timm

    url = timm.models.get_pretrained_cfg(spec.hf_hub_id.split("/", 1)[1]).url
    hub = Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]
    return hub if hub.is_file() else None


def _missing_message(name: str, weights_path: Path | None) -> str:
    spec = DINO_SPECS[name]
    lead = (
        f"structure.weights_path names {weights_path}, which does not exist"
        if weights_path is not None
        else f"no weights for the structure encoder '{name}' on this machine (nothing is downloaded at run time)"
    )
    return (
        f"{lead}. Either place the weights: set structure.weights_path to a timm "
        f"'{spec.arch}' state dict (.safetensors or .pth; Meta's original dinov2 .pth works too), "
        f"or fill the Hugging Face cache ($HF_HOME/hub) on a machine with internet, e.g. "
        f"`python -c \"import timm; timm.create_model('{spec.hf_hub_id.split('/', 1)[1]}', pretrained=True)\"`, "
        f'and copy it here. Or switch to a weight-free encoder: set structure.encoder to "hog" or "thumbnail".'
    )


def load_dino(name: str, weights_path: Path | None = None, img_size: int = DINO_INPUT) -> torch.nn.Module:
    """Build the real timm DINOv2 model for `name` and load its pretrained weights from disk."""
    import timm
    from timm.models.vision_transformer import checkpoint_filter_fn

    if name not in DINO_SPECS:
        raise ConfigError(
            f"unknown structure encoder '{name}'; choose one of {', '.join([*DINO_SPECS, 'thumbnail', 'hog'])}"
        )
    path = find_dino_weights(name, weights_path)
    if path is None:
        raise WeightsMissingError(_missing_message(name, weights_path))
    model = timm.create_model(DINO_SPECS[name].arch, pretrained=False, img_size=img_size, num_classes=0)
    try:
        state = checkpoint_filter_fn(_read_state_dict(path), model)
        model.load_state_dict(state, strict=True)
    except (RuntimeError, KeyError, ValueError) as exc:
        raise ConfigError(f"{path}: not a '{DINO_SPECS[name].arch}' state dict ({str(exc)[:300]})") from None
    return model


def build_encoder(
    cfg: StructureConfig, device: str | torch.device = "cpu", model: torch.nn.Module | None = None
) -> StructureEncoder:
    """The encoder `cfg.encoder` names. `model` injects a DINOv2 module (tests: a tiny random one)."""
    if cfg.encoder == "thumbnail":
        return ThumbnailEncoder(cfg.thumbnail_size)
    if cfg.encoder == "hog":
        return HogEncoder(cfg.hog_cells)
    if model is None:
        model = load_dino(cfg.encoder, cfg.weights_path)
        return DinoEncoder(model, cfg.encoder, device)
    # an injected model is not the released one: never share its cache with the real encoder
    return DinoEncoder(model, f"{cfg.encoder}-custom{int(model.num_features)}", device)
