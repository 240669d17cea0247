"""The store's smaller copies (uncompressed PPM since the loader speed-up; PNG in older stores):
the loader's samples are the pixels a reference decode of the source gives, in either format."""

import numpy as np
import torch
from PIL import Image

from rfp_core.media.datasets import FrameDataset, TrainCrop
from rfp_core.media.frame_store import FrameStore, cap_short_side
from rfp_core.media.images import to_tensor
from rfp_core.media.ingest import ingest

SIZE = 16  # crop size: the loader reads the 32 px copy (short side >= ceil(16 / 0.9) = 18)


def _noisy(path, size, seed):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)


def _ingested(tmp_path):
    for i in range(4):
        _noisy(tmp_path / "d0" / f"a{i}.png", (100 + 10 * i, 80), i)
    (tmp_path / "d1").mkdir()
    store = FrameStore(tmp_path / "store", max_side=64, min_level=16)
    report = ingest([tmp_path / "d0"], [tmp_path / "d1"], out=tmp_path / "m.parquet", store=store, progress=False)
    return report, store


def _reference(source, seed: int) -> torch.Tensor:
    """The sample by hand: the source PNG, capped to the store's 64 and then to the 32 px copy, cropped."""
    with Image.open(source) as img:
        copy = cap_short_side(cap_short_side(img.convert("RGB"), 64), 32)
    torch.manual_seed(seed)
    return TrainCrop(SIZE, train=True)(copy)


def _samples(ds: FrameDataset) -> list[torch.Tensor]:
    out = []
    for i in range(len(ds)):
        torch.manual_seed(100 + i)
        out.append(ds[i])
    return out


def test_loader_samples_equal_a_reference_decode_in_both_copy_formats(tmp_path):
    report, store = _ingested(tmp_path)
    ds = FrameDataset(report.table, store, domain=0, size=SIZE, split="all")
    source = {r["frame_key"]: r["source_path"] for r in report.table.to_pylist()}
    copies = [store.path_for(k, 32) for k in ds.frame_keys]
    assert all(p.suffix == ".ppm" and p.exists() for p in copies)
    assert not list((tmp_path / "store").rglob("*@*.png"))
    new = _samples(ds)
    for i, key in enumerate(ds.frame_keys):
        assert torch.equal(new[i], _reference(source[key], 100 + i)), key
    # a store written before: PNG copies under the same names; the loader reads them, same samples
    for p in copies:
        with Image.open(p) as img:
            img.save(p.with_suffix(".png"), compress_level=1)
        p.unlink()
    assert all(store.path_for(k, 32, ".png").exists() for k in ds.frame_keys)
    old = _samples(ds)
    assert all(torch.equal(a, b) for a, b in zip(new, old))
    assert min(store.load(ds.frame_keys[0], min_side=20).size) == 32


def test_copy_pixels_are_exact_and_damage_is_reported(tmp_path):
    store = FrameStore(tmp_path / "store", max_side=64, min_level=16)
    img = Image.fromarray(np.random.default_rng(7).integers(0, 256, (80, 100, 3), dtype=np.uint8))
    store.put("k", img)
    full = cap_short_side(img, 64)
    for level in (32, 16):
        got = store.load("k", min_side=level)
        assert got.size == (round(80 * level / 64), level)
        assert np.array_equal(np.asarray(got), np.asarray(cap_short_side(full, level)))
        assert torch.equal(to_tensor(got), to_tensor(cap_short_side(full, level)))
    assert store.verify("k") is None
    torn = store.path_for("k", 32)
    torn.write_bytes(torn.read_bytes()[:-100])
    assert str(torn) in store.verify("k") and "truncated" in store.verify("k")
    # remove takes every copy, in either format
    Image.new("RGB", (40, 32)).save(store.path_for("k", 32, ".png"))
    store.remove("k")
    assert not store.has("k") and not [p for p in (tmp_path / "store").rglob("*") if p.is_file()]
