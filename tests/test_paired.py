"""Paired mode: same-stem files are true pairs, cropped with one box, trained with plain MSE."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from rfp_core.checkpoint import load_checkpoint
from rfp_core.config import ConfigError
from rfp_core.config_files import config_from_dict
from rfp_core.flow.paired import PairedDataset, paired_batches, pairing_from_filenames, pairing_mode
from rfp_core.inference.translate import Translator
from rfp_core.media.frame_store import FrameStore
from rfp_core.media.ingest import ingest
from rfp_core.train.paired import train_paired

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.json"


def _image(i: int, domain: int, w: int = 44, h: int = 36) -> Image.Image:
    """R, G: the same gradient texture in both domains; B: the pair id (domain 1 mirrored)."""
    yy, xx = np.mgrid[0:h, 0:w]
    arr = np.zeros((h, w, 3), np.uint8)
    arr[..., 0] = (xx * 5 + yy * 2) % 256
    arr[..., 1] = (yy * 7 + (xx // 3) * 11) % 256
    arr[..., 2] = 20 * i if domain == 0 else 255 - 20 * i
    return Image.fromarray(arr)


def _data(root: Path, n: int = 6) -> tuple[Path, Path]:
    d0, d1 = root / "a", root / "b"
    (d1 / "nested").mkdir(parents=True)
    d0.mkdir()
    for i in range(n):
        _image(i, 0).save(d0 / f"p{i:02d}.png")
        # domain 1 names alike but stored elsewhere in its tree: stems, not paths, pair
        _image(i, 1).save((d1 / "nested" if i % 2 else d1) / f"p{i:02d}.png")
    _image(9, 0).save(d0 / "lonely.png")
    _image(11, 1).save(d1 / "extra.png")
    return d0, d1


@pytest.fixture
def paired(tmp_path):
    d0, d1 = _data(tmp_path / "data")
    store = FrameStore(max_side=64)
    report = ingest([d0], [d1], out=tmp_path / "m.parquet", store=store, progress=False)
    return report.manifest_path, store, d0, d1


def _pair_id(x: torch.Tensor, domain: int) -> int:
    blue = (float(x[2].mean()) + 1) * 127.5
    return round(blue / 20) if domain == 0 else round((255 - blue) / 20)


def test_pairing_from_filenames_uses_exactly_the_matching_file(paired):
    manifest, store, _, _ = paired
    with pytest.warns(UserWarning, match="1 domain-0 and 1 domain-1"):
        pairs = pairing_from_filenames(manifest)
    assert pairs.column("stem").to_pylist() == [f"p{i:02d}" for i in range(6)]
    ds = PairedDataset(pairs, store, 32, split="all", train_crop=True)
    assert len(ds) == 6
    torch.manual_seed(0)
    for k in range(len(ds)):
        item = ds[k]
        i = int(item["stem"][1:])
        assert _pair_id(item["domain_0"], 0) == i and _pair_id(item["domain_1"], 1) == i
        # one crop box for both: the shared texture channels are identical despite the jitter
        assert torch.equal(item["domain_0"][:2], item["domain_1"][:2])
    # the jitter is real: two draws of one item differ
    assert not torch.equal(ds[0]["domain_0"], ds[0]["domain_0"])


def test_paired_batches_are_true_pairs_and_reproducible(paired):
    manifest, store, _, _ = paired
    with pytest.warns(UserWarning):
        ds = PairedDataset(pairing_from_filenames(manifest), store, 32, split="all")
    batch = paired_batches(ds, lambda x: x, batch_size=8, seed=1)
    x0, x1 = batch(3)
    assert [_pair_id(a, 0) for a in x0] == [_pair_id(b, 1) for b in x1]
    again = batch(3)
    assert torch.equal(again[0], x0) and torch.equal(again[1], x1)
    assert not torch.equal(batch(4)[0], x0)


def test_pairing_errors_name_the_files(tmp_path):
    d0, d1 = _data(tmp_path / "data")
    _image(3, 1).rotate(90).save(d1 / "p01.jpg")  # a second, different domain-1 file with stem p01
    store = FrameStore(max_side=64)
    report = ingest([d0], [d1], out=tmp_path / "m.parquet", store=store, progress=False)
    with pytest.raises(ValueError, match=r"stem 'p01'.*p01\.(png|jpg).*p01\.(png|jpg)"):
        pairing_from_filenames(report.manifest_path)
    other = tmp_path / "other"
    other.mkdir()
    _image(0, 1).save(other / "zzz.png")
    report = ingest([d0], [other], out=tmp_path / "m2.parquet", store=store, progress=False)
    with pytest.raises(ValueError, match="no file stem is in both domains"):
        pairing_from_filenames(report.manifest_path)


def test_pairing_mode_key():
    assert pairing_mode({}) == "unpaired"
    assert pairing_mode({"pairing": "filenames"}) == "filenames"
    with pytest.raises(ConfigError, match="x.json: 'pairing' must be one of unpaired, filenames"):
        pairing_mode({"pairing": "names"}, source="x.json")


def test_train_paired_writes_a_usable_velocity(paired, tmp_path):
    manifest, store, d0, _ = paired
    raw = {
        **json.loads(TINY.read_text()),
        "train_batch_size": 4,
        "train_minibatch_size": 2,
        "train_images": 12,
        "domain0": [str(d0)],
    }
    cfg = config_from_dict(raw)
    with pytest.warns(UserWarning):
        path = train_paired(cfg, manifest, tmp_path / "run", store=store, progress=False)
    ckpt = load_checkpoint(path)
    assert ckpt["paired"]["pairs"] == 6 and ckpt["paired"]["loss"] == "mse" and ckpt["step"] == 3
    out = Translator.from_run(path).translate(torch.zeros(2, 3, 32, 32), steps=2)
    assert out.shape == (2, 3, 32, 32) and torch.isfinite(out).all()
    assert (tmp_path / "run" / "pairs.parquet").is_file()


def test_rfp_train_paired_trains_on_the_filename_pairs(tmp_path):
    """`rfp train --paired`: no saliency phase, the velocity fitted on the same-stem pairs only."""
    from rfp_core.cli import main

    d0, d1 = _data(tmp_path / "data")
    cfg = {**json.loads(TINY.read_text()), "train_batch_size": 4, "train_minibatch_size": 2, "train_images": 8}
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    with pytest.warns(UserWarning):  # the unpaired files are named in a warning
        rc = main(
            [
                "train",
                "-c",
                str(tmp_path / "cfg.json"),
                "-d0",
                str(d0),
                "-d1",
                str(d1),
                "--paired",
                "--dev",
                "--run-id",
                "paired-cli",
                "--device",
                "cpu",
            ]
        )
    assert rc == 0
    from rfp_core.paths import runs_dir

    run = runs_dir() / "paired-cli"
    assert not (run / "saliency.pt").exists()
    ckpt = load_checkpoint(run / "velocity.pt")
    assert ckpt["paired"]["pairs"] == 6 and ckpt["step"] == 2
    stems = set(pq.read_table(run / "pairs.parquet").column("stem").to_pylist())
    assert stems == {f"p{i:02d}" for i in range(6)}
