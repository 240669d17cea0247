"""Discovery, decoding, hashing cache and the frame store, on real files."""

import os
import time

import numpy as np
import pytest
from media_factory import frame_array, make_image, make_video, make_zip
from PIL import Image

from rfp_core import paths
from rfp_core.media.decode import MediaError, MediaFile, discover, iter_frames
from rfp_core.media.frame_store import FrameStore, cap_short_side
from rfp_core.media.hashing import HashCache, md5_file


def test_discover_recursive_case_insensitive_sorted_hidden_skipped(tmp_path):
    d = tmp_path / "dom"
    make_image(d / "b.PNG")
    make_image(d / "sub" / "deeper" / "a.JpEg", format="JPEG")
    make_image(d / "c.jpg")
    make_video(d / "clip.MOV", n_frames=2, size=16)
    make_zip(d / "pack.Zip", {"m.png": (8, (1, 2, 3))})
    (d / "notes.txt").write_text("not media")
    make_image(d / ".hidden.png")
    make_image(d / ".cache" / "inside.png")
    for ext in ["mp4", "mkv", "avi", "webm", "m4v"]:
        (d / "v" / f"x.{ext}").parent.mkdir(parents=True, exist_ok=True)
        (d / "v" / f"x.{ext}").write_bytes(b"")
    found = discover([d])
    rel = [(f.path.relative_to(d).as_posix(), f.kind) for f in found]
    assert rel == sorted(rel)
    assert dict(rel) == {
        "b.PNG": "image",
        "c.jpg": "image",
        "clip.MOV": "video",
        "pack.Zip": "zip",
        "sub/deeper/a.JpEg": "image",
        "v/x.avi": "video",
        "v/x.m4v": "video",
        "v/x.mkv": "video",
        "v/x.mp4": "video",
        "v/x.webm": "video",
    }
    assert all(f.path.is_absolute() for f in found)
    # the same folder twice does not duplicate files
    assert discover([d, d / "sub"]) == found


def test_discover_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        discover([tmp_path / "does-not-exist"])


def test_iter_frames_video_indices_timestamps_content(tmp_path):
    path = make_video(tmp_path / "v.mp4", n_frames=26, size=(40, 24), fps=10)
    frames = list(iter_frames(MediaFile(path, "video")))
    assert [f.index for f in frames] == list(range(26))
    assert [f.timestamp for f in frames] == pytest.approx([i / 10 for i in range(26)], abs=1e-6)
    for f in frames:
        assert f.image.size == (40, 24) and f.image.mode == "RGB"
        diff = np.abs(np.asarray(f.image, np.int16) - frame_array(f.index, (40, 24)).astype(np.int16))
        assert diff.mean() < 6, f"frame {f.index} does not look like what was encoded"


def test_iter_frames_image_applies_exif_orientation(tmp_path):
    img = Image.new("RGB", (30, 20), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    path = tmp_path / "rot.jpg"
    img.save(path, exif=exif)
    (frame,) = iter_frames(MediaFile(path, "image"))
    assert frame.image.size == (20, 30) and frame.timestamp is None and frame.index == 0


def test_iter_frames_text_as_png_raises_media_error(tmp_path):
    p = tmp_path / "x.png"
    p.write_text("hello")
    with pytest.raises(MediaError, match="not an image"):
        list(iter_frames(MediaFile(p, "image")))


# ---------------------------------------------------------------------------- hashing


def test_hash_cache_hashes_once_rehashes_changed(tmp_path):
    a = make_image(tmp_path / "a.png", 16, (1, 2, 3))
    b = make_image(tmp_path / "b.png", 16, (4, 5, 6))
    cache = HashCache()
    assert cache.path == paths.cache_dir() / "hash_cache.parquet"
    assert cache.md5(a) == md5_file(a) and cache.md5(b) == md5_file(b)
    assert cache.hashed == 2
    cache.md5(a)
    assert cache.hashed == 2
    cache.save()

    again = HashCache()
    assert len(again) == 2
    assert again.md5(a) == md5_file(a) and again.md5(b) == md5_file(b)
    assert again.hashed == 0, "an unchanged file was hashed again"

    st = os.stat(a)
    os.utime(a, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))  # touched: same bytes
    assert again.md5(a) == md5_file(a)
    assert again.hashed == 1

    make_image(b, 16, (7, 8, 9))  # rewritten with new content
    os.utime(b, ns=(st.st_atime_ns, st.st_mtime_ns + 9_000_000_000))
    assert again.md5(b) == md5_file(b) != HashCache().md5(a)
    assert again.hashed == 2


def test_hash_cache_survives_a_damaged_file(tmp_path):
    cache_path = tmp_path / "hc.parquet"
    cache_path.write_bytes(b"garbage")
    a = make_image(tmp_path / "a.png")
    cache = HashCache(cache_path)
    assert cache.md5(a) == md5_file(a)
    cache.save()
    assert HashCache(cache_path).md5(a) == md5_file(a)


# ---------------------------------------------------------------------------- frame store


def test_frame_store_put_load_layout_and_cap(tmp_path):
    store = FrameStore(tmp_path / "store", max_side=24)
    img = Image.fromarray(frame_array(3, (64, 40)))
    path = store.put("abc:frame:3", img)
    assert path == store.path_for("abc:frame:3")
    rel = path.relative_to(tmp_path / "store").parts
    assert rel[:2] == ("frames", "s24") and rel[2] == rel[3][:2] and rel[3].endswith(".png") and len(rel[3]) == 44
    assert store.has("abc:frame:3") and not store.has("abc:frame:4")
    out = store.load("abc:frame:3")
    assert out.mode == "RGB" and out.size == (38, 24)  # short side capped, aspect kept
    ref = img.resize((38, 24), Image.Resampling.LANCZOS)
    assert np.array_equal(np.asarray(out), np.asarray(ref)), "PNG must be lossless"
    # a frame under the cap is stored untouched
    small = Image.fromarray(frame_array(1, (20, 12)))
    store.put("small", small)
    assert np.array_equal(np.asarray(store.load("small")), np.asarray(small))
    # another cap lives elsewhere and never mixes
    assert FrameStore(tmp_path / "store", max_side=48).path_for("abc:frame:3") != path
    assert not FrameStore(tmp_path / "store", max_side=48).has("abc:frame:3")
    # no temp files left behind
    assert not [p for p in (tmp_path / "store").rglob("*") if p.name.endswith(".tmp")]


def test_frame_store_smaller_copies_serve_small_loads(tmp_path):
    store = FrameStore(tmp_path / "store", max_side=64, min_level=16)
    assert store.levels == [32, 16]
    big = Image.fromarray(frame_array(5, (100, 80)))
    store.put("big", big)
    full = cap_short_side(big, 64)
    assert store.load("big").size == (80, 64)
    assert store.load("big", min_side=40).size == (80, 64)
    mid = store.load("big", min_side=20)
    assert mid.size == (40, 32)
    assert np.array_equal(np.asarray(mid), np.asarray(cap_short_side(full, 32)))
    assert store.load("big", min_side=10).size == (20, 16)
    # a frame smaller than a level has no copy at that level: loads fall back to the next one up
    store.put("small", Image.fromarray(frame_array(1, (30, 24))))
    assert not store.path_for("small", 32).exists() and store.path_for("small", 16).exists()
    assert store.load("small", min_side=30).size == (30, 24)
    assert store.load("small", min_side=12).size == (20, 16)
    assert FrameStore(tmp_path / "s", max_side=512).levels == [256, 128, 64]


def test_frame_store_put_is_idempotent_and_default_root(tmp_path):
    store = FrameStore()
    assert store.root == paths.store_dir()
    p = store.put("k", Image.new("RGB", (8, 8), (1, 2, 3)))
    mtime = p.stat().st_mtime_ns
    time.sleep(0.01)
    store.put("k", Image.new("RGB", (8, 8), (9, 9, 9)))
    assert p.stat().st_mtime_ns == mtime  # content-addressed: written once
    with pytest.raises(FileNotFoundError, match="rfp ingest"):
        store.load("missing-key")
