"""Torch datasets over a manifest and the frame store.

Randomness (crops, the domain-1 draw) comes from torch's global RNG, which the DataLoader
seeds differently in every worker, so workers do not repeat each other.
"""

from __future__ import annotations

import hashlib
import math
import os
from typing import Literal, Sequence

import numpy as np
import pyarrow as pa
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from rfp_core.media.frame_store import FrameStore
from rfp_core.media.images import to_tensor
from rfp_core.media.manifest import ok_frames, read_manifest

# "stop" / "report": the two halves of "holdout" (`holdout_parts`)
Split = Literal["train", "holdout", "stop", "report", "all"]


def _unit_hash(key: str) -> float:
    return int(hashlib.md5(key.encode("utf-8")).hexdigest()[:12], 16) / float(1 << 48)


# a domain that is a single video is cut into this many runs of consecutive frames to be split
VIDEO_RUNS = 10


def source_groups(frame_keys: Sequence[str]) -> list[str]:
    """The unit the held-out split assigns, per frame: its source file. Frames of one video
    (`md5:frame:N`) share their video's md5, so neighbouring frames never straddle the split; an
    image or a zip member is its own unit. When every frame comes from one video, the video's
    frames are cut into VIDEO_RUNS contiguous runs instead (else nothing could be held out)."""
    groups = [k.split(":frame:", 1)[0] for k in frame_keys]
    if len(frame_keys) >= 2 and len(set(groups)) == 1 and ":frame:" in frame_keys[0]:
        index = [int(k.rsplit(":frame:", 1)[1]) for k in frame_keys]
        end = max(index) + 1
        groups = [f"{g}:run:{i * VIDEO_RUNS // end}" for g, i in zip(groups, index)]
    return groups


def _group_mask(groups: list[str], fraction: float, salt: str = "") -> dict[str, bool]:
    """Group -> held out; a group's fate depends on its md5 alone (stable as frames are added).
    The kept side is never empty (a lone group trains), and with fraction > 0 and at least two
    groups the held-out side is not either (the lowest / highest hash moves over)."""
    names = sorted(set(groups))
    u = np.array([_unit_hash(salt + g) for g in names], dtype=np.float64)
    mask = u < fraction
    if len(u) and mask.all():
        mask[np.argmax(u)] = False
    if fraction > 0 and len(u) >= 2 and not mask.any():
        mask[np.argmin(u)] = True
    return dict(zip(names, mask.tolist()))


def holdout_split(frame_keys: Sequence[str], fraction: float) -> np.ndarray:
    """Boolean mask, True = held out, assigned by source file (`source_groups`): every frame of a
    video lands on the same side. See `_group_mask` for what is guaranteed."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"holdout fraction must be in [0, 1), got {fraction}")
    groups = source_groups(frame_keys)
    held = _group_mask(groups, fraction)
    return np.array([held[g] for g in groups], dtype=bool)


# fewer held-out sources than this are not halved: one or two frames cannot decide a stop
MIN_SOURCES_TO_HALVE = 6


def holdout_parts(frame_keys: Sequence[str], fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(stop, report) masks over the held-out frames: the saliency phase stops on one half of the
    held-out source files and reports its accuracy on the other, so the figure it reports was not
    used to end training. With fewer than MIN_SOURCES_TO_HALVE held-out sources both masks are all
    of them (`stop & report` is then non-empty: the caller says so)."""
    held = holdout_split(frame_keys, fraction)
    groups = source_groups(frame_keys)
    held_groups = [g for g, h in zip(groups, held) if h]
    names = sorted(set(held_groups))
    if len(names) < MIN_SOURCES_TO_HALVE:
        return held.copy(), held.copy()
    # halves of equal size (a threshold on the hash could leave one or two sources to stop on),
    # in the order of a second hash of each source
    ranked = sorted(names, key=lambda g: _unit_hash("report:" + g))
    report = {g: i >= (len(ranked) + 1) // 2 for i, g in enumerate(ranked)}
    rep = np.array([h and report[g] for g, h in zip(groups, held)], dtype=bool)
    return held & ~rep, rep


class TrainCrop:
    """docs/METHOD.md's training crop: a square of 90-100% of the short side, centre jittered by
    +-5% of the short side, Lanczos-resized to `size`. `train=False`: the centred full square."""

    def __init__(self, size: int, train: bool = True):
        self.size = int(size)
        self.train = train

    def box(self, width: int, height: int) -> tuple[int, int, int, int]:
        """(top, left, side, side) of the crop inside a width x height image."""
        short = min(width, height)
        if self.train:
            r = torch.rand(3).tolist()
            side = max(1, round(short * (0.9 + 0.1 * r[0])))
            cx = width / 2 + (r[1] * 2 - 1) * 0.05 * short
            cy = height / 2 + (r[2] * 2 - 1) * 0.05 * short
        else:
            side, cx, cy = short, width / 2, height / 2
        left = int(round(min(max(cx - side / 2, 0), width - side)))
        top = int(round(min(max(cy - side / 2, 0), height - side)))
        return top, left, side, side

    def __call__(self, image: Image.Image) -> torch.Tensor:
        top, left, h, w = self.box(image.width, image.height)
        image = TF.resized_crop(image, top, left, h, w, [self.size, self.size], interpolation=InterpolationMode.LANCZOS)
        return to_tensor(image)


def _as_table(manifest: str | os.PathLike | pa.Table) -> pa.Table:
    return manifest if isinstance(manifest, pa.Table) else read_manifest(manifest)


class FrameDataset(Dataset):
    """The ok frames of one domain, as (3, size, size) tensors in [-1, 1]."""

    def __init__(
        self,
        manifest: str | os.PathLike | pa.Table,
        store: FrameStore,
        domain: int,
        size: int,
        split: Split = "all",
        holdout_fraction: float = 0.1,
        train_crop: bool = True,
    ):
        if split not in ("train", "holdout", "stop", "report", "all"):
            raise ValueError(f"split must be 'train', 'holdout', 'stop', 'report' or 'all', got {split!r}")
        keys = ok_frames(_as_table(manifest), domain)
        if split in ("stop", "report"):
            keep = holdout_parts(keys, holdout_fraction)[split == "report"]
            keys = [k for k, h in zip(keys, keep) if h]
        elif split != "all":
            held = holdout_split(keys, holdout_fraction)
            keys = [k for k, h in zip(keys, held) if h == (split == "holdout")]
        if not keys:
            raise ValueError(
                f"no usable frames for domain {domain} (split {split!r}) in the manifest: "
                "check the domain folders and `rfp manifest summary` for skipped files"
            )
        self.frame_keys: list[str] = keys
        self.store = store
        self.domain = domain
        self.crop = TrainCrop(size, train=train_crop)
        # the smallest stored copy that the crop never has to upsample (a crop spans >= 90%)
        self.min_side = math.ceil(size / 0.9) if train_crop else int(size)

    def __len__(self) -> int:
        return len(self.frame_keys)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.crop(self.store.load(self.frame_keys[index], min_side=self.min_side))


class UnpairedDataset(Dataset):
    """`{"domain_0": x0, "domain_1": x1}` with x0 and x1 drawn independently.

    Item i walks domain 0 (or, in generative mode, draws x0 ~ N(0, I)); domain 1 is a random
    frame per item. With `pairs` (d0_key, d1_key, rank, similarity from structure pairing),
    domain 1 is a random one of the item's candidates instead.
    """

    def __init__(
        self,
        manifest: str | os.PathLike | pa.Table,
        store: FrameStore,
        size: int,
        generative: bool = False,
        split: str = "train",
        holdout_fraction: float = 0.1,
        length: int | None = None,
        pairs: pa.Table | None = None,
    ):
        table = _as_table(manifest)
        self.size = int(size)
        self.generative = generative
        self.d1 = FrameDataset(table, store, 1, size, split, holdout_fraction, train_crop=split == "train")
        self.d0 = (
            None
            if generative
            else FrameDataset(table, store, 0, size, split, holdout_fraction, train_crop=split == "train")
        )
        self.length = int(length) if length is not None else max(len(self.d1), 0 if self.d0 is None else len(self.d0))
        self.candidates: list[list[int]] | None = None
        if pairs is not None and self.d0 is not None:
            index1 = {k: i for i, k in enumerate(self.d1.frame_keys)}
            by_d0: dict[str, list[tuple[int, int]]] = {}
            for d0_key, d1_key, rank in zip(
                pairs.column("d0_key").to_pylist(), pairs.column("d1_key").to_pylist(), pairs.column("rank").to_pylist()
            ):
                if d1_key in index1:
                    by_d0.setdefault(d0_key, []).append((rank, index1[d1_key]))
            self.candidates = [[j for _, j in sorted(by_d0.get(k, []))] for k in self.d0.frame_keys]

    def __len__(self) -> int:
        return self.length

    def _domain1_index(self, i0: int | None) -> int:
        if self.candidates is not None and i0 is not None and self.candidates[i0]:
            cands = self.candidates[i0]
            return cands[int(torch.randint(len(cands), ()).item())]
        return int(torch.randint(len(self.d1), ()).item())

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if self.d0 is None:
            x0 = torch.randn(3, self.size, self.size)
            x1 = self.d1[index % len(self.d1)]
        else:
            i0 = index % len(self.d0)
            x0 = self.d0[i0]
            x1 = self.d1[self._domain1_index(i0)]
        return {"domain_0": x0, "domain_1": x1}
