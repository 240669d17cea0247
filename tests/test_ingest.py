"""Ingest real media into the store and a manifest; check it row by row and re-run it."""

import hashlib
import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from media_factory import decode_video, frame_array, make_image, make_video, make_zip

from rfp_core.cli import main
from rfp_core.media.frame_store import FrameStore
from rfp_core.media.ingest import IngestError, ingest
from rfp_core.media.manifest import MANIFEST_SCHEMA, content_version, ok_frames, read_manifest, summarize

N_FRAMES, FPS, VSIZE = 26, 12, (48, 32)


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.fixture
def domains(tmp_path):
    d0, d1 = tmp_path / "d0", tmp_path / "d1"
    make_image(d0 / "red.png", 40, (220, 30, 30))
    make_image(d0 / "photo.jpg", (48, 32), (30, 200, 60), quality=95)
    make_video(d0 / "clips" / "walk.mp4", n_frames=N_FRAMES, size=VSIZE, fps=FPS)
    make_image(d1 / "blue.png", 32, (20, 40, 230))
    make_zip(d1 / "pack.zip", {"b.png": (16, (5, 6, 7)), "a/c.jpg": ((20, 12), (200, 100, 0)), "readme.txt": b"hi"})
    make_image(d1 / "more" / "green.jpeg", (24, 36), (10, 220, 10), format="JPEG")
    return d0, d1


def expected_rows(d0: Path, d1: Path) -> list[dict]:
    """The manifest written independently of the code under test: sorted paths, frame keys of docs/METHOD.md."""
    v = d0 / "clips" / "walk.mp4"
    z = d1 / "pack.zip"
    img = lambda domain, p, w, h: dict(  # noqa: E731
        frame_key=md5(p),
        domain=domain,
        source_path=str(p),
        source_md5=md5(p),
        media_type="image",
        frame_index=0,
        timestamp=None,
        width=w,
        height=h,
        status="ok",
        error=None,
    )
    video = [
        dict(
            frame_key=f"{md5(v)}:frame:{i}",
            domain=0,
            source_path=str(v),
            source_md5=md5(v),
            media_type="video",
            frame_index=i,
            timestamp=i / FPS,
            width=VSIZE[0],
            height=VSIZE[1],
            status="ok",
            error=None,
        )
        for i in range(N_FRAMES)
    ]
    zipped = [
        dict(
            frame_key=f"{md5(z)}:member:{name}",
            domain=1,
            source_path=str(z),
            source_md5=md5(z),
            media_type="zip_image",
            frame_index=i,
            timestamp=None,
            width=w,
            height=h,
            status="ok",
            error=None,
        )
        for i, (name, w, h) in enumerate([("a/c.jpg", 20, 12), ("b.png", 16, 16)])
    ]
    return [
        *video,
        img(0, d0 / "photo.jpg", 48, 32),
        img(0, d0 / "red.png", 40, 40),
        img(1, d1 / "blue.png", 32, 32),
        *[img(1, d1 / "more" / "green.jpeg", 24, 36)],
        *zipped,
    ]


def assert_rows_equal(got: list[dict], want: list[dict]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        ts_g, ts_w = g.pop("timestamp"), w.pop("timestamp")
        assert g == w
        assert (ts_g is None) == (ts_w is None) and (ts_g is None or abs(ts_g - ts_w) < 1e-6), (g, ts_g, ts_w)


def test_manifest_row_by_row_and_store_matches_independent_decode(domains, tmp_path):
    d0, d1 = domains
    out = tmp_path / "m.parquet"
    report = ingest([d0], [d1], out=out, progress=False)
    assert report.manifest_path == out and out.exists()
    assert pq.read_schema(out).remove_metadata() == MANIFEST_SCHEMA
    table = read_manifest(out)
    assert_rows_equal(table.to_pylist(), expected_rows(d0, d1))
    assert (report.n_ok, report.n_skipped) == (N_FRAMES + 2 + 4, 0)
    assert report.per_domain == {0: {"ok": N_FRAMES + 2, "skipped": 0}, 1: {"ok": 4, "skipped": 0}}
    assert report.frames_decoded == N_FRAMES + 6 and report.frames_reused == 0 and report.files_hashed == 6
    assert report.content_version == content_version(out) == content_version(table)

    store = FrameStore()
    vmd5 = md5(d0 / "clips" / "walk.mp4")
    reference = decode_video(d0 / "clips" / "walk.mp4")
    assert len(reference) == N_FRAMES
    for i, (_ts, ref) in enumerate(reference):
        got = np.asarray(store.load(f"{vmd5}:frame:{i}"), np.float32)
        assert got.shape == ref.shape
        assert np.abs(got - ref).mean() < 0.5, f"stored frame {i} differs from an independent PyAV decode"
        # and the content is what was encoded (within H.264 tolerance)
        assert np.abs(got - frame_array(i, VSIZE)).mean() < 6
    red = np.asarray(store.load(md5(d0 / "red.png")))
    assert (red == (220, 30, 30)).all()
    zmd5 = md5(d1 / "pack.zip")
    assert np.abs(np.asarray(store.load(f"{zmd5}:member:b.png"), np.int16) - (5, 6, 7)).max() == 0


def test_store_cap_applies_to_ingested_frames(domains, tmp_path):
    d0, d1 = domains
    store = FrameStore(max_side=16)
    report = ingest([d0], [d1], out=tmp_path / "m.parquet", store=store, progress=False)
    key = ok_frames(report.table, 0)[0]
    assert store.load(key).size == (24, 16)  # 48x32 video frame, short side capped at 16
    # the manifest keeps the source size
    assert report.table.to_pylist()[0]["width"] == 48
    assert store.path_for(key).parent.parent.name == "s16"


def test_reingest_decodes_nothing_and_rescan_hashes_nothing(domains, tmp_path):
    d0, d1 = domains
    first = ingest([d0], [d1], out=tmp_path / "a.parquet", progress=False)
    second = ingest([d0], [d1], out=tmp_path / "b.parquet", progress=False)
    assert second.frames_decoded == 0 and second.files_hashed == 0
    assert second.frames_reused == first.n_ok
    assert second.table.equals(first.table)
    assert second.content_version == first.content_version

    # the same bytes under another path (a copy) are not decoded again either
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "walk-copy.mp4").write_bytes((d0 / "clips" / "walk.mp4").read_bytes())
    third = ingest([copy], [d1], out=tmp_path / "c.parquet", progress=False)
    assert third.frames_decoded == 0 and third.files_hashed == 1

    # videos and zips keep their rows in their own file too; the pack holds everything
    sources = FrameStore().root / "sources"
    assert (sources / f"{md5(d0 / 'clips' / 'walk.mp4')}.parquet").exists()
    assert (sources / f"{md5(d1 / 'pack.zip')}.parquet").exists()
    assert not (sources / f"{md5(d0 / 'red.png')}.parquet").exists()
    (sources / "_pack.parquet").unlink()
    unpacked = ingest([d0], [d1], out=tmp_path / "e.parquet", progress=False)
    assert unpacked.frames_decoded == 4  # the four single images; the video and the zip come from their files
    assert unpacked.table.equals(first.table) and (sources / "_pack.parquet").exists()

    # a frame lost from the store is decoded again (only its source)
    store = FrameStore()
    store.path_for(md5(d0 / "red.png")).unlink()
    fourth = ingest([d0], [d1], out=tmp_path / "d.parquet", progress=False)
    assert fourth.frames_decoded == 1 and store.has(md5(d0 / "red.png"))


def test_content_version_ignores_touch_changes_on_new_image(domains, tmp_path):
    d0, d1 = domains
    base = ingest([d0], [d1], out=tmp_path / "m.parquet", progress=False)
    st = os.stat(d0 / "red.png")
    os.utime(d0 / "red.png", ns=(st.st_atime_ns, st.st_mtime_ns + 10_000_000_000))
    touched = ingest([d0], [d1], out=tmp_path / "m.parquet", progress=False)
    assert touched.files_hashed == 1 and touched.frames_decoded == 0
    assert touched.content_version == base.content_version

    make_image(d1 / "new.png", 20, (1, 250, 3))
    grown = ingest([d0], [d1], out=tmp_path / "m.parquet", progress=False)
    assert grown.content_version != base.content_version
    assert grown.frames_decoded == 1 and grown.files_hashed == 1
    assert content_version(tmp_path / "m.parquet") == grown.content_version

    # the version depends on content, not on where the folders are
    moved = tmp_path / "moved1"
    (d1).rename(moved)
    relocated = ingest([d0], [moved], out=tmp_path / "m2.parquet", progress=False)
    assert relocated.content_version == grown.content_version


def test_random_domain0_contributes_no_rows(domains, tmp_path):
    _, d1 = domains
    report = ingest("random", [d1], out=tmp_path / "m.parquet", progress=False)
    assert set(report.table.column("domain").to_pylist()) == {1}
    assert report.per_domain[0] == {"ok": 0, "skipped": 0}
    assert ok_frames(report.table, 0) == []


def test_missing_folder_is_a_clear_error(domains, tmp_path):
    _, d1 = domains
    with pytest.raises(IngestError, match="nope"):
        ingest([tmp_path / "nope"], [d1], out=tmp_path / "m.parquet", progress=False)
    assert not (tmp_path / "m.parquet").exists()


def test_summary_with_duckdb(domains, tmp_path):
    d0, d1 = domains
    make_image(d1 / "broken.png", 8).write_bytes(b"not a png")
    out = tmp_path / "m.parquet"
    ingest([d0], [d1], out=out, progress=False)
    assert summarize(out) == [
        {"domain": 0, "media_type": "image", "status": "ok", "count": 2},
        {"domain": 0, "media_type": "video", "status": "ok", "count": N_FRAMES},
        {"domain": 1, "media_type": "image", "status": "ok", "count": 2},
        {"domain": 1, "media_type": "image", "status": "skipped", "count": 1},
        {"domain": 1, "media_type": "zip_image", "status": "ok", "count": 2},
    ]


def test_cli_ingest_and_summary(domains, tmp_path, capsys):
    d0, d1 = domains
    (d1 / "bad.jpg").write_bytes(b"")
    out = tmp_path / "cli.parquet"
    assert (
        main(["ingest", "--domain0", str(d0), "--domain1", str(d1), "--out", str(out), "--store-max-side", "64"]) == 0
    )
    text = capsys.readouterr().out
    assert f"domain0: {N_FRAMES + 2} ok, 0 skipped" in text and "domain1: 4 ok, 1 skipped" in text
    assert "skipped 1 row(s)" in text
    assert FrameStore(max_side=64).has(md5(d0 / "red.png"))

    assert main(["manifest", "summary", str(out)]) == 0
    text = capsys.readouterr().out
    assert "zip_image" in text and "empty file (0 bytes)" in text and str(d1 / "bad.jpg") in text

    assert main(["ingest", "-d0", str(tmp_path / "absent"), "-d1", str(d1), "--out", str(out)]) == 2
    assert str(tmp_path / "absent") in capsys.readouterr().err

    assert main(["ingest", "-d0", "random", "-d1", str(d1), "--out", str(out)]) == 0
    assert "random" in capsys.readouterr().out
    assert set(read_manifest(out).column("domain").to_pylist()) == {1}

    assert main(["manifest", "summary", str(tmp_path / "none.parquet")]) == 2


def test_store_write_failure_stops_ingest_instead_of_skipping(domains, tmp_path):
    d0, d1 = domains
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("a file where the store should be")
    with pytest.raises(RuntimeError, match="cannot write frame"):
        ingest([d0], [d1], out=tmp_path / "m.parquet", store=FrameStore(blocker / "store"), progress=False)
    assert not (tmp_path / "m.parquet").exists()
