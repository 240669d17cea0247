"""Evaluate a trained run on held-out frames: numbers in metrics.json, pictures in two grids.

Held-out domain-0 frames (never trained on: the split the trainer uses) are translated forward;
the metrics say whether the style changed (`transfer_rate`, by a judge trained afresh here),
whether the outputs look like real domain-1 frames (FD / KID in a named feature space), whether
the content stayed (`structure_similarity`, and `mask_iou` when true masks exist), how straight
and fast the flow is, and how well the reverse flow brings the input back (`cycle_error`).
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image

from rfp_core.atomic import atomic_write_text
from rfp_core.evaluate import metrics as M
from rfp_core.evaluate.judge import Judge, train_judge
from rfp_core.flow.rf import nfe as flow_nfe
from rfp_core.flow.rf import straightness as flow_straightness
from rfp_core.media.datasets import FrameDataset, TrainCrop
from rfp_core.media.frame_store import FrameStore
from rfp_core.media.images import paired_rows, save_grid, to_pil
from rfp_core.media.manifest import read_manifest

# every evaluated image is in the grids, GRID_COLUMNS to a row pair (input row above its output row)
GRID_COLUMNS = 10
# DINOv2 ids as `build_encoder` names a model with the released weights (an injected one gets "-custom")
_REAL_DINO = {"dinov2_vits14", "dinov2_vitb14", "dinov2_vitl14"}


class TranslatorLike(Protocol):
    size: int

    def translate(
        self, x: torch.Tensor, steps: int | None = None, sampler: str | None = None, reverse: bool = False
    ) -> torch.Tensor: ...
    def velocity(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor: ...
    def encode(self, x: torch.Tensor) -> torch.Tensor: ...
    def start(self, x: torch.Tensor) -> torch.Tensor: ...  # the flow's start: encode(x) + any source noise


def _model_config(translator: Any):
    for name in ("cfg", "config"):
        cfg = getattr(translator, name, None)
        if cfg is not None and hasattr(cfg, "velocity"):
            return cfg
    return None


def _stack(ds: FrameDataset, limit: int | None) -> torch.Tensor:
    n = len(ds) if limit is None else min(len(ds), limit)
    return torch.stack([ds[i] for i in range(n)])


def _in_chunks(fn, x: torch.Tensor, batch_size: int, device: torch.device) -> torch.Tensor:
    return torch.cat([fn(x[i : i + batch_size].to(device)).float().cpu() for i in range(0, len(x), batch_size)])


def _source_stems(table, keys: list[str]) -> dict[str, str]:
    """frame_key -> stem of its source image file (images only: videos and zips have no masks)."""
    out: dict[str, str] = {}
    for key, path, media in zip(
        table.column("frame_key").to_pylist(),
        table.column("source_path").to_pylist(),
        table.column("media_type").to_pylist(),
    ):
        if media == "image":
            out.setdefault(key, Path(path).stem)
    return {k: out[k] for k in keys if k in out}


def _true_masks(masks_dir: Path, stems: dict[str, str], keys: list[str], size: int) -> tuple[list[int], np.ndarray]:
    """Indices of the keys that have a mask file, and those masks cropped and resized as the frames are."""
    crop = TrainCrop(size, train=False)
    idx, masks = [], []
    for i, key in enumerate(keys):
        stem = stems.get(key)
        if stem is None:
            continue
        # masks_dir may be the domain-0 mask folder itself or the demo's masks/ root
        path = next((p for p in (masks_dir / f"{stem}.png", masks_dir / "domain0" / f"{stem}.png") if p.exists()), None)
        if path is None:
            continue
        with Image.open(path) as im:
            m = im.convert("L")
        top, left, h, w = crop.box(m.width, m.height)
        # nearest: a mask stays binary
        m = m.crop((left, top, left + w, top + h)).resize((size, size), Image.Resampling.NEAREST)
        idx.append(i)
        masks.append(np.asarray(m) > 127)
    return idx, (np.stack(masks) if masks else np.zeros((0, size, size), bool))


def _realism(name: str, fake: np.ndarray, real: np.ndarray, floor: np.ndarray | None) -> dict[str, float]:
    out = {f"fid_{name}": M.frechet_distance(fake, real), f"kid_{name}": M.kid(fake, real)}
    if floor is not None:
        out.update({f"fid_{name}_floor": M.frechet_distance(floor, real), f"kid_{name}_floor": M.kid(floor, real)})
    return out


def _floor_frames(
    table, store: FrameStore, size: int, holdout_fraction: float, n: int, seed: int
) -> torch.Tensor | None:
    """As many real domain-1 frames from outside the held-out set as there are outputs.

    Their FD / KID to the held-out frames is what a perfect translator would score at this
    sample size: the floor that makes the realism numbers readable.
    """
    try:
        ds = FrameDataset(table, store, 1, size, split="train", holdout_fraction=holdout_fraction, train_crop=False)
    except ValueError:
        return None
    if len(ds) < 2:
        return None
    pick = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[:n].tolist()
    return torch.stack([ds[i] for i in pick])


def evaluate_run(
    translator: TranslatorLike,
    manifest: str | os.PathLike,
    store: FrameStore,
    out_dir: str | os.PathLike,
    masks_dir: str | os.PathLike | None = None,
    steps: int | None = None,
    sampler: str | None = None,
    structure_encoder=None,
    device: str | torch.device = "cpu",
    holdout_fraction: float | None = None,
    judge_steps: int = 200,
    judge: Judge | None = None,
    max_images: int | None = 256,
    background: tuple[float, float, float] | None = None,
    mask_threshold: float = 0.4,
    seed: int = 0,
    batch_size: int = 64,
) -> dict[str, Any]:
    """Translate the held-out domain-0 frames, measure, write metrics.json and the grids; returns the
    metrics and `paths` {"metrics", "grid_translate", "grid_cycle"}. `background`: the colour the shape
    masks are found against (default: the demo's grey); `judge`: one already trained on these frames, to
    grade several runs alike (the ablation), else a fresh one is trained here."""
    device = torch.device(device)
    out_dir = Path(out_dir)
    if masks_dir is not None and not Path(masks_dir).is_dir():
        raise FileNotFoundError(
            f"masks_dir {masks_dir} is not a folder; pass the folder of true masks "
            "(<stem>.png per domain-0 image, as `rfp demo-data` writes) or no masks_dir"
        )
    holdout_fraction, steps, sampler = _settings(translator, holdout_fraction, steps, sampler)
    size = int(translator.size)
    table = read_manifest(manifest)
    torch.manual_seed(seed)
    x0, x1, keys0 = _held_out(table, store, size, holdout_fraction, max_images, manifest)
    out, back, seconds = _translate_both(translator, x0, steps, sampler, batch_size, device)

    if judge is None:  # an independent judge, trained now on real held-out frames of both domains
        judge = train_judge(x0, x1, steps=judge_steps, device=device, seed=seed)
    result: dict[str, Any] = {
        "transfer_rate": float((judge.predict_proba(out) >= 0.5).float().mean()),
        "judge_accuracy": judge.accuracy,
        "judge_real_domain0_as_domain1": float((judge.predict_proba(x0) >= 0.5).float().mean()),
    }
    floor = _floor_frames(table, store, size, holdout_fraction, len(out), seed)
    result.update(_realism_all(judge, structure_encoder, out, x1, floor))
    result.update(_content(structure_encoder, x0, out, masks_dir, table, keys0, size, background, mask_threshold))

    z0 = _in_chunks(translator.start, x0[:batch_size], batch_size, device)
    result.update(
        {
            "straightness": flow_straightness(translator.velocity, z0.to(device), steps, sampler),
            "nfe": flow_nfe(sampler, steps),
            "ms_per_image": 1000.0 * seconds / len(x0),
            "cycle_error": M.cycle_error(x0, back),
            "steps": steps,
            "sampler": sampler,
            "n_eval": len(x0),
            "n_real_domain1": len(x1),
            "judge_n_train": judge.n_train,
            "judge_n_holdout": judge.n_holdout,
        }
    )
    return {**result, "paths": _write(out_dir, result, x0, out, back, keys0)}


def _settings(translator, holdout_fraction: float | None, steps: int | None, sampler: str | None):
    """What was not given comes from the run's config: its held-out split (frames never trained on),
    its inference steps and sampler."""
    cfg = _model_config(translator)
    if holdout_fraction is None:
        holdout_fraction = cfg.saliency.holdout_fraction if cfg is not None else 0.1
    steps = steps or (cfg.velocity.num_inference_steps if cfg is not None else 12)
    sampler = sampler or (cfg.velocity.sampler if cfg is not None else "euler")
    return holdout_fraction, steps, sampler


def _held_out(
    table, store: FrameStore, size: int, holdout_fraction: float, max_images: int | None, manifest
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """The held-out frames of both domains (never trained on) and domain 0's frame keys."""
    ds0 = FrameDataset(table, store, 0, size, split="holdout", holdout_fraction=holdout_fraction, train_crop=False)
    ds1 = FrameDataset(table, store, 1, size, split="holdout", holdout_fraction=holdout_fraction, train_crop=False)
    x0, x1 = _stack(ds0, max_images), _stack(ds1, max_images)
    if len(x0) < 2 or len(x1) < 2:
        raise ValueError(
            f"{manifest}: only {len(x0)} / {len(x1)} held-out frames in domain 0 / 1; the evaluation needs at "
            f"least 2 each: add frames or raise saliency.holdout_fraction ({holdout_fraction})"
        )
    return x0, x1, ds0.frame_keys[: len(x0)]


@torch.no_grad()
def _translate_both(
    translator: TranslatorLike, x0: torch.Tensor, steps: int, sampler: str, batch_size: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Forward (timed, clamped to the image range), then back; and the forward seconds."""
    translator.translate(x0[:2].to(device), steps=1, sampler=sampler)  # warm-up (CUDA context, kernels) untimed
    t_start = time.perf_counter()
    out = _in_chunks(lambda b: translator.translate(b, steps=steps, sampler=sampler), x0, batch_size, device)
    seconds = time.perf_counter() - t_start
    back = _in_chunks(
        lambda b: translator.translate(b, steps=steps, sampler=sampler, reverse=True), out, batch_size, device
    )
    return out.clamp(-1, 1), back, seconds


def _realism_all(judge: Judge, structure_encoder, out: torch.Tensor, x1: torch.Tensor, floor) -> dict[str, Any]:
    """FD / KID in the judge's features always; in DINOv2's when the released weights are loaded;
    each with its floor (real domain-1 frames scored the same way)."""

    def feats(x):
        return None if x is None else judge.features(x).numpy()

    result = _realism("judge", feats(out), feats(x1), feats(floor))
    spaces = ["judge"]
    if getattr(structure_encoder, "encoder_id", None) in _REAL_DINO:

        def embed(x):
            return None if x is None else structure_encoder.embed([to_pil(i) for i in x])

        result.update(_realism("dinov2", embed(out), embed(x1), embed(floor)))
        spaces.insert(0, "dinov2")
    result["realism_feature_space"] = spaces[0]
    return result


def _content(
    structure_encoder,
    x0: torch.Tensor,
    out: torch.Tensor,
    masks_dir,
    table,
    keys0: list[str],
    size: int,
    background,
    mask_threshold: float,
) -> dict[str, Any]:
    """Content kept: structure-embedding similarity (with an encoder), mask IoU (with true masks)."""
    result: dict[str, Any] = {}
    if structure_encoder is not None:
        emb_in = structure_encoder.embed([to_pil(x) for x in x0])
        result["structure_similarity"] = M.cosine_similarity(emb_in, structure_encoder.embed([to_pil(x) for x in out]))
        result["structure_encoder"] = getattr(structure_encoder, "encoder_id", None)
    if masks_dir is not None:
        idx, true = _true_masks(Path(masks_dir), _source_stems(table, keys0), keys0, size)
        result["mask_count"] = len(idx)
        if idx:
            bg = background if background is not None else _demo_background()
            result["mask_iou"] = M.mask_iou(M.foreground_mask(out[idx], bg, mask_threshold), true)
            # the same measurement on the inputs: ~1 says the mask finder itself is right
            result["mask_iou_input"] = M.mask_iou(M.foreground_mask(x0[idx], bg, mask_threshold), true)
    return result


def _write(
    out_dir: Path, result: dict, x0: torch.Tensor, out: torch.Tensor, back: torch.Tensor, keys0: list[str]
) -> dict[str, str]:
    """The grids and metrics.json (non-finite numbers as null); their paths."""
    # still images first: consecutive video frames would fill the grid with one scene
    pick = sorted(range(len(keys0)), key=lambda i: ":" in keys0[i])
    paths = {
        "grid_translate": str(
            save_grid(paired_rows(x0[pick], out[pick], GRID_COLUMNS), out_dir / "grid_translate.png")
        ),
        "grid_cycle": str(
            save_grid(paired_rows(out[pick], back[pick].clamp(-1, 1), GRID_COLUMNS), out_dir / "grid_cycle.png")
        ),
        "metrics": str(out_dir / "metrics.json"),
    }
    clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in result.items()}
    atomic_write_text(out_dir / "metrics.json", json.dumps(clean, indent=2, sort_keys=True) + "\n")
    return paths


def _demo_background() -> tuple[float, float, float]:
    from rfp_core.media.demo_data import background_tensor_value

    return background_tensor_value()
