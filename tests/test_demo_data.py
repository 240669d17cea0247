"""The demo dataset: files, true masks, separable styles, decodable videos, skip when complete."""

import json
import subprocess
import sys

import av
import numpy as np
import pytest
import torch
from PIL import Image

from rfp_core.evaluate.metrics import foreground_mask, mask_ious, stripe_energy
from rfp_core.media.demo_data import BACKGROUND, MARKER, background_tensor_value, load_mask, make_demo_data


def _load(paths):
    return torch.stack(
        [torch.from_numpy(np.array(Image.open(p).convert("RGB"))).permute(2, 0, 1).float() / 127.5 - 1 for p in paths]
    )


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return make_demo_data(tmp_path_factory.mktemp("demo") / "data", num=24, size=32, seed=3)


def test_files_exist_unpaired_with_masks(demo):
    assert demo.created
    for d in (0, 1):
        imgs = sorted(demo.domain_dir(d).glob("*.png"))
        assert len(imgs) == 24
        assert all(demo.mask_path(d, p.stem).exists() for p in imgs)
        assert Image.open(imgs[0]).size == (32, 32) and Image.open(imgs[0]).mode == "RGB"
    # different names in the two domains: never taken for true pairs
    names0 = {p.name for p in demo.domain0.glob("*.png")}
    names1 = {p.name for p in demo.domain1.glob("*.png")}
    assert not names0 & names1
    assert json.loads((demo.root / MARKER).read_text())["num"] == 24


def test_masks_match_the_drawn_shapes(demo):
    for d in (0, 1):
        x = _load(demo.images(d))
        true = np.stack([load_mask(demo.mask_path(d, p.stem)) for p in demo.images(d)])
        found = foreground_mask(x, background_tensor_value())
        ious = mask_ious(found, true)
        assert ious.min() == pytest.approx(1.0), f"domain {d}: the shape is exactly where its mask says"
        # shapes are sizeable but leave background around them
        frac = true.mean(axis=(1, 2))
        assert frac.min() > 0.05 and frac.max() < 0.5


def test_background_is_the_same_plain_colour_in_both_domains(demo):
    for d in (0, 1):
        for p in demo.images(d)[:5]:
            rgb = np.array(Image.open(p))
            bg = rgb[~load_mask(demo.mask_path(d, p.stem))]
            assert (bg == np.array(BACKGROUND)).all()


def test_domains_are_told_apart_by_stripe_energy_and_hue(demo):
    x0, x1 = _load(demo.images(0)), _load(demo.images(1))
    e0, e1 = stripe_energy(x0), stripe_energy(x1)
    assert e0.max() < e1.min(), "every striped image has more vertical energy than any flat one"
    # warm vs cool: red minus blue inside the shape
    for x, d, sign in ((x0, 0, 1), (x1, 1, -1)):
        masks = torch.from_numpy(np.stack([load_mask(demo.mask_path(d, p.stem)) for p in demo.images(d)]))
        rb = ((x[:, 0] - x[:, 2]) * masks).sum((1, 2)) / masks.sum((1, 2))
        assert (sign * rb > 0.2).all()


def test_videos_decode_with_enough_moving_frames(demo):
    for video in demo.videos:
        with av.open(str(video)) as container:
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
        assert len(frames) >= 24
        assert frames[0].shape[:2] == (32, 32)
        assert np.abs(frames[0].astype(int) - frames[-1].astype(int)).mean() > 5, "the shape moves"


def test_complete_set_is_kept_and_other_parameters_regenerate(demo, tmp_path):
    first = Image.open(demo.images(0)[0]).copy()
    again = make_demo_data(demo.root, num=24, size=32, seed=3)
    assert not again.created
    other = make_demo_data(tmp_path / "x", num=4, size=32, seed=3)
    assert np.array_equal(np.array(Image.open(other.images(0)[0])), np.array(first)), "same seed, same images"
    smaller = make_demo_data(tmp_path / "x", num=2, size=32, seed=4)
    assert smaller.created and len(list(smaller.domain0.glob("*.png"))) == 2, "stale images of the old set removed"


def test_a_partial_set_is_regenerated(tmp_path):
    d = make_demo_data(tmp_path / "p", num=3, size=32)
    d.images(1)[2].unlink()
    assert make_demo_data(tmp_path / "p", num=3, size=32).created
    assert d.images(1)[2].exists()


def test_bad_parameters_are_refused(tmp_path):
    with pytest.raises(ValueError, match="size"):
        make_demo_data(tmp_path / "s", size=8)
    with pytest.raises(ValueError, match="num"):
        make_demo_data(tmp_path / "s", num=0)


def test_cli_writes_and_prints_the_path(tmp_path):
    out = tmp_path / "cli"
    proc = subprocess.run(
        [sys.executable, "-m", "rfp_core.cli", "demo-data", str(out), "--num", "3", "--size", "32"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert proc.stdout.strip().splitlines()[-1] == str(out.resolve())
    assert len(list((out / "domain1").glob("*.png"))) == 3
