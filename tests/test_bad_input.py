"""Every kind of bad input becomes a 'skipped' row with its reason; good files beside it stay 'ok'."""

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
from media_factory import make_audio_only, make_image, make_video, make_zip
from PIL import Image

from rfp_core.cli import main
from rfp_core.media.frame_store import FrameStore
from rfp_core.media.ingest import ingest
from rfp_core.media.manifest import read_manifest


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def noisy_jpeg(path: Path, size: int = 30) -> Path:
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(path, quality=90)
    return path


@pytest.fixture
def bad_folder(tmp_path, monkeypatch):
    # a low decompression-bomb limit so a small file can stand in for a huge one
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    d = tmp_path / "inbox"
    d.mkdir()
    # good files (all under 1000 pixels)
    make_image(d / "good.png", 16, (9, 9, 200))
    make_video(d / "good.mp4", n_frames=24, size=24, fps=8)
    make_zip(d / "good.zip", {"g.png": (12, (1, 200, 1))})
    # bad ones
    (d / "zero.png").write_bytes(b"")
    (d / "text.png").write_text("this is not an image\n")
    jpg = noisy_jpeg(tmp_path / "full.jpg")
    (d / "trunc.jpg").write_bytes(jpg.read_bytes()[: jpg.stat().st_size // 2])
    # index at the end (ffmpeg's default): a truncated file cannot even be opened
    full = make_video(tmp_path / "moov_end.mp4", n_frames=24, size=24, fps=8, noise=True)
    (d / "trunc_moov_end.mp4").write_bytes(full.read_bytes()[: full.stat().st_size * 2 // 3])
    # index first: the frames before the cut decode, then decoding fails
    fast = make_video(tmp_path / "fast.mp4", n_frames=30, size=24, fps=8, noise=True, gop=5, faststart=True)
    (d / "trunc_partial.mp4").write_bytes(fast.read_bytes()[: fast.stat().st_size * 6 // 10])
    make_audio_only(d / "audio_only.mp4")
    make_zip(d / "evil.zip", {"../x.png": (8, (255, 0, 0)), "/abs.png": (8, (0, 255, 0)), "fine.png": (8, (0, 0, 255))})
    (d / "broken.zip").write_bytes(b"PK\x03\x04 not really a zip")
    make_zip(d / "no_images.zip", {"readme.txt": b"hello"})
    make_image(d / "bomb.png", 64, (50, 50, 50))  # 4096 px: over 2x the limit (Pillow's own error)
    make_image(d / "bomb_mild.png", 40, (60, 60, 60))  # 1600 px: between 1x and 2x (Pillow only warns)
    (d / "dangling.png").symlink_to(tmp_path / "gone.png")  # unreadable even by root
    locked = make_image(d / "locked.png", 10, (7, 7, 7))
    os.chmod(locked, 0)
    yield d
    os.chmod(locked, 0o644)


def by_source(table, domain: int) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for row in table.to_pylist():
        if row["domain"] == domain:
            out.setdefault(Path(row["source_path"]).name, []).append(row)
    return out


def test_bad_inputs_are_skipped_rows_with_reasons(bad_folder, tmp_path):
    d = bad_folder
    report = ingest([d], [d], out=tmp_path / "m.parquet", progress=False)
    rows = by_source(report.table, 0)
    # the same folder as domain 1 gives the same rows there
    assert [{**r, "domain": 0} for rs in by_source(report.table, 1).values() for r in rs] == [
        r for rs in rows.values() for r in rs
    ]

    def single_skip(name: str, reason: str) -> dict:
        (row,) = rows[name]
        assert row["status"] == "skipped" and reason in row["error"], (name, row["error"])
        assert row["width"] is None and row["height"] is None
        return row

    # good files beside the bad ones are fine
    assert [r["status"] for r in rows["good.png"]] == ["ok"]
    assert [r["status"] for r in rows["good.mp4"]] == ["ok"] * 24
    assert [(r["frame_key"], r["status"]) for r in rows["good.zip"]] == [(f"{md5(d / 'good.zip')}:member:g.png", "ok")]

    assert single_skip("zero.png", "empty file")["frame_key"] == md5(d / "zero.png")
    single_skip("text.png", "not an image")
    single_skip("trunc.jpg", "truncated")
    single_skip("trunc_moov_end.mp4", "cannot open video")
    single_skip("audio_only.mp4", "no video stream")
    single_skip("broken.zip", "cannot open zip")
    single_skip("no_images.zip", "no image members")
    single_skip("bomb.png", "decompression-bomb")
    single_skip("bomb_mild.png", "decompression-bomb")
    unreadable = single_skip("dangling.png", "cannot read file")
    assert unreadable["source_md5"] is None and unreadable["frame_key"] == f"unreadable:{d / 'dangling.png'}"

    # a video cut part way: its good frames are kept, the failure is one skipped row at the failing frame
    partial = rows["trunc_partial.mp4"]
    vmd5 = md5(d / "trunc_partial.mp4")
    *good, failed = partial
    assert 0 < len(good) < 30
    assert [r["frame_index"] for r in good] == list(range(len(good))) and all(r["status"] == "ok" for r in good)
    assert failed["status"] == "skipped" and failed["frame_index"] == len(good)
    assert failed["frame_key"] == f"{vmd5}:frame:{len(good)}" and "frame" in failed["error"]
    assert all(FrameStore().has(r["frame_key"]) for r in good)

    # unsafe zip members are refused; the safe one beside them is read
    zmd5 = md5(d / "evil.zip")
    evil = {r["frame_key"]: r for r in rows["evil.zip"]}
    assert evil[f"{zmd5}:member:fine.png"]["status"] == "ok"
    assert "escapes the archive" in evil[f"{zmd5}:member:../x.png"]["error"]
    assert "absolute" in evil[f"{zmd5}:member:/abs.png"]["error"]
    # nothing was written under those names: not beside the archive, not in $RFP_HOME (all under
    # tmp_path), not next to the working directory
    assert not list(tmp_path.rglob("x.png")) and not list(tmp_path.rglob("abs.png"))
    assert not (Path.cwd() / "x.png").exists() and not (Path.cwd().parent / "x.png").exists()
    assert not Path("/abs.png").exists()
    # every error row carries a reason, every ok row none
    for rs in rows.values():
        for r in rs:
            assert (r["status"] == "ok") == (r["error"] is None)

    # an unreadable file: root reads through chmod 000, so only assert a skip where the OS refuses
    (locked,) = rows["locked.png"]
    if os.access(d / "locked.png", os.R_OK):
        assert locked["status"] == "ok"
    else:
        assert locked["status"] == "skipped" and "Permission denied" in locked["error"]

    n_skipped_d0 = sum(r["status"] == "skipped" for rs in rows.values() for r in rs)
    assert report.per_domain[0]["skipped"] == n_skipped_d0 == report.n_skipped // 2
    assert n_skipped_d0 >= 13


def test_cli_exits_zero_and_reports_skips(bad_folder, tmp_path, capsys):
    good = tmp_path / "good_only"
    make_image(good / "a.png", 12)
    out = tmp_path / "m.parquet"
    assert main(["ingest", "--domain0", str(bad_folder), "--domain1", str(good), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "domain1: 1 ok, 0 skipped" in text
    assert "skipped" in text and "rfp manifest summary" in text
    # a second run (bad sources are tried again) does not crash and gives the same manifest
    first = read_manifest(out)
    assert main(["ingest", "--domain0", str(bad_folder), "--domain1", str(good), "--out", str(out)]) == 0
    assert read_manifest(out).equals(first)
