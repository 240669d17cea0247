"""Paired mode (the pix2pix setting): domain-0 and domain-1 files with the same stem are true pairs.

Then the coupling is given, not learnt: the velocity is fitted on the straight line between the
two images of each pair, with plain MSE by default. Turned on by `rfp train --paired` (the
`"pairing": "filenames"` key is parsed by `pairing_mode`); unpaired training stays the default.

Stems: an image `a/b/horse_01.png` has stem `horse_01`; frame i of a video or member i of a zip
`x.mp4` has stem `x#i`, so two videos with the same name pair frame by frame.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Callable, Literal

import pyarrow as pa
import torch
from torch.utils.data import Dataset
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from rfp_core.config import ConfigError
from rfp_core.media.datasets import TrainCrop, holdout_split, to_tensor
from rfp_core.media.manifest import read_manifest

PAIRING_KEY = "pairing"
PAIRING_MODES = ("unpaired", "filenames")
PAIRED_DEFAULT_LOSS = "mse"
PAIRS_SCHEMA = pa.schema(
    [  # the structure-pairs columns (so UnpairedDataset(pairs=...) accepts it) + the stem
        pa.field("d0_key", pa.string(), nullable=False),
        pa.field("d1_key", pa.string(), nullable=False),
        pa.field("rank", pa.int32(), nullable=False),
        pa.field("similarity", pa.float32(), nullable=False),
        pa.field("stem", pa.string(), nullable=False),
    ]
)


def pairing_mode(raw: dict, source: str = "<config>") -> Literal["unpaired", "filenames"]:
    """The `"pairing"` key of an experiment or config dict: "unpaired" (default) or "filenames"."""
    value = raw.get(PAIRING_KEY, "unpaired")
    if value not in PAIRING_MODES:
        raise ConfigError(f"{source}: '{PAIRING_KEY}' must be one of {', '.join(PAIRING_MODES)}, got {value!r}")
    return value


def _stem(source_path: str, media_type: str, frame_index: int) -> str:
    stem = Path(source_path).stem
    return stem if media_type == "image" else f"{stem}#{frame_index}"


def _stems(table: pa.Table, domain: int) -> dict[str, str]:
    """stem -> frame key of the ok frames of `domain`; two different frames with one stem is an error."""
    out: dict[str, tuple[str, str]] = {}
    cols = [
        table.column(c).to_pylist()
        for c in ("frame_key", "domain", "source_path", "media_type", "frame_index", "status")
    ]
    for key, dom, path, media, idx, status in zip(*cols):
        if dom != domain or status != "ok":
            continue
        stem = _stem(path, media, idx)
        if stem in out and out[stem][0] != key:
            raise ValueError(
                f"paired mode: domain {domain} has two different files with the stem {stem!r} "
                f"({out[stem][1]} and {path}); rename one so each stem names one image"
            )
        out.setdefault(stem, (key, path))
    return {s: k for s, (k, _) in out.items()}


def pairing_from_filenames(manifest: str | os.PathLike | pa.Table) -> pa.Table:
    """One row per stem present in both domains: (d0_key, d1_key, rank 0, similarity 1, stem)."""
    table = manifest if isinstance(manifest, pa.Table) else read_manifest(manifest)
    s0, s1 = _stems(table, 0), _stems(table, 1)
    common = sorted(s0.keys() & s1.keys())
    if not common:
        raise ValueError(
            "paired mode: no file stem is in both domains (e.g. domain0/0001.png and domain1/0001.png); "
            "name each pair's two files alike, or train unpaired"
        )
    lonely = len(s0) - len(common), len(s1) - len(common)
    if any(lonely):
        warnings.warn(
            f"paired mode: {lonely[0]} domain-0 and {lonely[1]} domain-1 frame(s) have no partner "
            "of the same name and are left out",
            stacklevel=2,
        )
    rows = [{"d0_key": s0[s], "d1_key": s1[s], "rank": 0, "similarity": 1.0, "stem": s} for s in common]
    return pa.Table.from_pylist(rows, schema=PAIRS_SCHEMA)


class PairedDataset(Dataset):
    """`{"domain_0": x0, "domain_1": x1, "stem": s}` for the true pairs, the same crop box on both.

    The box is drawn once per item (TrainCrop's jitter) in domain 0's frame and mapped onto
    domain 1's by relative position, so pixel (i, j) of x0 and x1 show the same place."""

    def __init__(
        self,
        pairs: pa.Table,
        store,
        size: int,
        split: str = "train",
        holdout_fraction: float = 0.1,
        train_crop: bool = True,
    ):
        d0, d1, stems = (pairs.column(c).to_pylist() for c in ("d0_key", "d1_key", "stem"))
        items = list(zip(d0, d1, stems))
        if split != "all":
            held = holdout_split(d0, holdout_fraction)
            items = [it for it, h in zip(items, held) if h == (split == "holdout")]
        if not items:
            raise ValueError(f"paired mode: no pairs in split {split!r}")
        self.items, self.store, self.size = items, store, int(size)
        self.crop = TrainCrop(size, train=train_crop)
        self.min_side = int(size / 0.9) + 1 if train_crop else int(size)

    def __len__(self) -> int:
        return len(self.items)

    def _cut(self, image, rel: tuple[float, float, float, float]) -> torch.Tensor:
        top, left, h, w = (round(r * s) for r, s in zip(rel, (image.height, image.width, image.height, image.width)))
        image = TF.resized_crop(
            image, top, left, max(1, h), max(1, w), [self.size, self.size], interpolation=InterpolationMode.LANCZOS
        )
        return to_tensor(image)

    def __getitem__(self, index: int) -> dict:
        k0, k1, stem = self.items[index]
        a = self.store.load(k0, min_side=self.min_side)
        b = self.store.load(k1, min_side=self.min_side)
        top, left, h, w = self.crop.box(a.width, a.height)
        rel = (top / a.height, left / a.width, h / a.height, w / a.width)
        return {"domain_0": self._cut(a, rel), "domain_1": self._cut(b, rel), "stem": stem}


def paired_batches(
    dataset: PairedDataset, encode: Callable[[torch.Tensor], torch.Tensor], batch_size: int, seed: int
) -> Callable[[int], tuple[torch.Tensor, torch.Tensor]]:
    """A `rfp_core.train.reflow.fit` batch function over true pairs: the items and their crops are
    a pure function of (seed, step), so training on pairs resumes exactly like reflow."""

    def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(int(seed) * 1_000_003 + step)
        idx = torch.randint(len(dataset), (batch_size,), generator=g).tolist()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed) * 7_919 + step)  # TrainCrop draws from the global RNG
            items = [dataset[i] for i in idx]
        with torch.no_grad():
            x0 = encode(torch.stack([it["domain_0"] for it in items]))
            x1 = encode(torch.stack([it["domain_1"] for it in items]))
        return x0.cpu(), x1.cpu()

    return batch
