"""Datasets over a real manifest and store: split, crop, unpaired draws, DataLoader workers."""

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
import torch
from media_factory import make_image
from PIL import Image
from torch.utils.data import DataLoader

from rfp_core.media.datasets import FrameDataset, TrainCrop, UnpairedDataset, holdout_split
from rfp_core.media.frame_store import FrameStore
from rfp_core.media.ingest import ingest

D0_COLORS = [(200, 10 + 30 * i, 20) for i in range(6)]
D1_COLORS = [(10, 20 + 25 * j, 220) for j in range(8)]
S = 16


@pytest.fixture
def manifest(tmp_path):
    for i, c in enumerate(D0_COLORS):
        make_image(tmp_path / "d0" / f"a{i}.png", (40, 30), c)
    for j, c in enumerate(D1_COLORS):
        make_image(tmp_path / "d1" / f"b{j}.png", (30, 44), c)
    return ingest([tmp_path / "d0"], [tmp_path / "d1"], out=tmp_path / "m.parquet", progress=False)


def color_id(x: torch.Tensor, colors) -> int:
    """Which solid colour a (3,S,S) tensor in [-1, 1] shows."""
    rgb = ((x.mean(dim=(1, 2)) + 1) * 127.5).numpy()
    d = [np.abs(rgb - np.array(c)).max() for c in colors]
    assert min(d) < 1.5, f"tensor colour {rgb} is none of the expected ones"
    return int(np.argmin(d))


def test_holdout_split_is_deterministic_and_per_key():
    keys = [f"{i:05d}-key" for i in range(3000)]
    mask = holdout_split(keys, 0.1)
    assert mask.dtype == bool and 0.08 < mask.mean() < 0.12
    assert np.array_equal(mask, holdout_split(keys, 0.1))
    # a key's fate does not depend on its neighbours (adding frames keeps the old split)
    rev = holdout_split(keys[::-1], 0.1)[::-1]
    assert np.array_equal(mask, rev)
    assert np.array_equal(holdout_split(keys[:1000] + ["new"], 0.1)[:1000], mask[:1000])
    assert not holdout_split(keys, 0.0).any()
    small = holdout_split(["a", "b", "c"], 0.1)
    assert 0 < small.sum() < 3  # both sides non-empty
    assert not holdout_split(["lone"], 0.99).any()  # a lone key trains
    with pytest.raises(ValueError):
        holdout_split(keys, 1.0)


def test_train_crop_eval_is_centred_full_square():
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8))
    x = TrainCrop(S, train=False)(img)
    ref = img.crop((10, 0, 50, 40)).resize((S, S), Image.Resampling.LANCZOS)
    ref_t = torch.from_numpy(np.asarray(ref, np.float32)).permute(2, 0, 1) / 127.5 - 1
    assert x.shape == (3, S, S) and x.dtype == torch.float32
    assert torch.allclose(x, ref_t, atol=1e-5)


def test_train_crop_random_box_within_bounds():
    crop = TrainCrop(S, train=True)
    torch.manual_seed(0)
    w, h = 200, 100
    boxes = [crop.box(w, h) for _ in range(500)]
    sides = np.array([b[2] for b in boxes])
    assert sides.min() >= 90 and sides.max() <= 100 and sides.max() - sides.min() >= 8
    cx = np.array([b[1] + b[2] / 2 for b in boxes])
    cy = np.array([b[0] + b[2] / 2 for b in boxes])
    assert np.abs(cx - w / 2).max() <= 5.5 and np.abs(cx - w / 2).max() > 3  # jitter +-5% of the short side
    assert all(0 <= t and 0 <= l and t + s <= h and l + s <= w for t, l, s, _ in boxes)
    assert np.abs(cy - h / 2).max() <= 5.5
    torch.manual_seed(0)
    assert [crop.box(w, h) for _ in range(5)] == boxes[:5]  # torch's RNG drives it
    x = crop(Image.new("RGB", (w, h), (255, 0, 0)))
    assert x.shape == (3, S, S) and x.min() >= -1 and x.max() <= 1
    assert torch.allclose(x[0], torch.ones(S, S), atol=1e-3) and torch.allclose(x[1], -torch.ones(S, S), atol=1e-3)


def test_frame_dataset_items_and_splits(manifest):
    store = FrameStore()
    full = FrameDataset(manifest.manifest_path, store, domain=0, size=S)
    assert len(full) == 6 and full.frame_keys == [
        r["frame_key"] for r in manifest.table.to_pylist() if r["domain"] == 0
    ]
    train = FrameDataset(manifest.table, store, 0, S, split="train", holdout_fraction=0.3)
    hold = FrameDataset(manifest.table, store, 0, S, split="holdout", holdout_fraction=0.3)
    assert sorted(train.frame_keys + hold.frame_keys) == sorted(full.frame_keys)
    assert not set(train.frame_keys) & set(hold.frame_keys) and len(hold) >= 1
    for i in range(len(full)):
        x = full[i]
        assert x.shape == (3, S, S) and -1 <= x.min() and x.max() <= 1
        assert color_id(x, D0_COLORS) == i
    with pytest.raises(ValueError, match="no usable frames for domain 0"):
        FrameDataset(manifest.table.filter(pc.equal(manifest.table["domain"], 1)), store, 0, S)


def test_unpaired_dataset_draws_domains_independently(manifest):
    ds = UnpairedDataset(manifest.manifest_path, FrameStore(), S, split="all")
    assert len(ds) == 8
    torch.manual_seed(0)
    d0_ids, d1_ids = [], []
    for k in range(40):
        item = ds[k]
        assert set(item) == {"domain_0", "domain_1"}
        assert item["domain_0"].shape == item["domain_1"].shape == (3, S, S)
        d0_ids.append(color_id(item["domain_0"], D0_COLORS))
        d1_ids.append(color_id(item["domain_1"], D1_COLORS))
    assert d0_ids == [k % 6 for k in range(40)]  # domain 0 walks its frames
    assert len(set(d1_ids)) >= 6  # domain 1 is a fresh random draw per item
    assert d1_ids[:8] != [k % 8 for k in range(8)]
    assert len(UnpairedDataset(manifest.table, FrameStore(), S, split="all", length=100)) == 100


def test_generative_mode_gives_noise(manifest):
    ds = UnpairedDataset(manifest.table, FrameStore(), S, generative=True, split="all")
    assert len(ds) == 8
    x0 = torch.stack([ds[i]["domain_0"] for i in range(8)])
    assert abs(x0.mean().item()) < 0.15 and 0.85 < x0.std().item() < 1.15 and x0.abs().max() > 1  # N(0, I), unclipped
    assert color_id(ds[3]["domain_1"], D1_COLORS) == 3


def test_pairs_restrict_domain1_to_candidates(manifest):
    store = FrameStore()
    d0_keys = FrameDataset(manifest.table, store, 0, S).frame_keys
    d1_keys = FrameDataset(manifest.table, store, 1, S).frame_keys
    # item i's candidates: d1 frames (i) and (i + 1), ranked
    pairs = pa.table(
        {
            "d0_key": [k for k in d0_keys for _ in range(2)],
            "d1_key": [d1_keys[(i + r) % 8] for i in range(6) for r in range(2)],
            "rank": [r for _ in range(6) for r in range(2)],
            "similarity": [0.9, 0.8] * 6,
        }
    )
    ds = UnpairedDataset(manifest.table, store, S, split="all", pairs=pairs)
    torch.manual_seed(1)
    seen = {i: set() for i in range(6)}
    for k in range(60):
        item = ds[k]
        i = color_id(item["domain_0"], D0_COLORS)
        seen[i].add(color_id(item["domain_1"], D1_COLORS))
    for i in range(6):
        assert seen[i] == {i % 8, (i + 1) % 8}


def test_dataloader_with_two_workers(manifest):
    ds = UnpairedDataset(manifest.manifest_path, FrameStore(), S, split="all", length=16)
    loader = DataLoader(ds, batch_size=4, num_workers=2, shuffle=False)
    batches = list(loader)
    assert len(batches) == 4
    for b in batches:
        assert b["domain_0"].shape == b["domain_1"].shape == (4, 3, S, S)
        assert b["domain_1"].min() >= -1 and b["domain_1"].max() <= 1
    draws = [[color_id(x, D1_COLORS) for x in b["domain_1"]] for b in batches]
    # batches 0 and 1 come from different workers, which torch seeds differently
    assert draws[0] != draws[1]
    assert [color_id(x, D0_COLORS) for b in batches for x in b["domain_0"]] == [k % 6 for k in range(16)]
