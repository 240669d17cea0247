"""Bad input beyond broken files, each beside good files: rotated and variable-rate videos, image
modes and odd names, zip bombs and nested zips, links (loops, and links out of the domain
folder), sources and folders that vanish or change while ingest reads them, a full disk.
Every case ends as an 'ok' row, a 'skipped' row with its reason, or a clear error; nothing is
written outside $RFP_HOME and the manifest path."""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import signal
import subprocess
import sys
import uuid
import zipfile
from pathlib import Path

import numpy as np
import pytest
from media_factory import decode_video, make_image, make_video, make_video_with_audio
from PIL import Image

from rfp_core.cli import main
from rfp_core.media import ingest as ingest_mod
from rfp_core.media.frame_store import FrameStore
from rfp_core.media.hashing import HashCache
from rfp_core.media.ingest import IngestError, StoreWriteError, ingest


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def snapshot(root: Path, skip: tuple[Path, ...]) -> dict[str, tuple[int, int]]:
    """(size, mtime_ns) of every file under root outside `skip` (links not followed)."""
    out = {}
    for dirpath, dirs, files in os.walk(root):
        if any(Path(dirpath).is_relative_to(s) for s in skip):
            dirs[:] = []
            continue
        for name in files:
            if Path(dirpath, name) in skip:
                continue
            st = os.lstat(os.path.join(dirpath, name))
            out[os.path.join(dirpath, name)] = (st.st_size, st.st_mtime_ns)
    return out


def rows_by_name(table, domain: int = 0) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for row in table.to_pylist():
        if row["domain"] == domain:
            out.setdefault(Path(row["source_path"]).name, []).append(row)
    return out


def stored(store: FrameStore, key: str) -> np.ndarray:
    return np.asarray(store.load(key))


def noisy(path: Path, size: int, seed: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(path)
    return path


def test_rotated_video_is_stored_upright_and_variable_rate_keeps_true_timestamps(tmp_path, isolated_rfp_home):
    d = tmp_path / "videos"
    make_image(d / "good.png", 16, (9, 9, 200))
    make_video_with_audio(d / "rot90.mp4", n_frames=6, size=(48, 32), rotation=90)
    make_video_with_audio(d / "rot_minus90.mp4", n_frames=6, size=(48, 32), rotation=-90)
    make_video_with_audio(d / "rot180.mp4", n_frames=6, size=(48, 32), rotation=180)
    stamps = [0, 100, 150, 400, 410, 700]  # uneven gaps in 1/1200 s: a variable frame rate
    make_video_with_audio(d / "vfr.mp4", size=(48, 32), fps=12, pts=stamps)
    before = snapshot(tmp_path, (isolated_rfp_home, tmp_path / "m.parquet"))
    store = FrameStore(max_side=64)
    report = ingest([d], [d], out=tmp_path / "m.parquet", store=store, progress=False)
    assert snapshot(tmp_path, (isolated_rfp_home, tmp_path / "m.parquet")) == before
    rows = rows_by_name(report.table)
    assert report.n_skipped == 0

    # display = stored turned by the display matrix's angle counter-clockwise (what ffmpeg's
    # autorotate shows): np.rot90 turns counter-clockwise for k > 0
    for name, k in (("rot90.mp4", 1), ("rot_minus90.mp4", -1), ("rot180.mp4", 2)):
        reference = [np.rot90(a, k) for _, a in decode_video(d / name)]
        got = rows[name]
        assert len(got) == 6 and all(r["status"] == "ok" for r in got)
        assert {(r["width"], r["height"]) for r in got} == ({(32, 48)} if k % 2 else {(48, 32)})
        for r, ref in zip(got, reference):
            assert np.array_equal(stored(store, r["frame_key"]), ref), (name, r["frame_index"])

    vfr = rows["vfr.mp4"]
    assert [r["timestamp"] for r in vfr] == pytest.approx([s / 1200 for s in stamps], abs=1e-6)
    assert [r["timestamp"] for r in vfr] == pytest.approx([t for t, _ in decode_video(d / "vfr.mp4")], abs=1e-9)


def test_image_modes_odd_names_zip_bombs_nested_zips_and_links(tmp_path, isolated_rfp_home, monkeypatch):
    monkeypatch.setattr("rfp_core.media.decode.MAX_ZIP_MEMBER_BYTES", 50_000)
    d = tmp_path / "inbox"
    d.mkdir()
    make_image(d / "good.png", 16, (9, 9, 200))
    Image.new("CMYK", (12, 10), (0, 255, 255, 0)).save(d / "cmyk.jpg", quality=95)  # red in CMYK
    Image.fromarray(np.full((10, 12), 65535, np.uint16)).save(d / "sixteen.png")  # 16-bit white
    pal = Image.new("P", (12, 10), 1)
    pal.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    pal.save(d / "palette.png", transparency=0)
    exif_img = Image.new("RGB", (20, 10), (250, 0, 0))
    exif_img.paste((0, 0, 250), (0, 0, 10, 10))  # blue left half
    exif = Image.Exif()
    exif[0x0112] = 6  # display turned 90 degrees clockwise
    exif_img.save(d / "exif6.jpg", exif=exif, quality=95)
    odd = [
        "with space.png",
        "ünïcödé.png",
        "-dash.png",
        "semi;colon#hash&.png",
        "quote'\".png",
        "new\nline.png",
        "UPPER.PNG",
        "x" * 200 + ".png",
    ]
    for i, name in enumerate(odd):
        make_image(d / name, 8, (10 * i, 100, 50))
    # a zip bomb: a member far bigger unpacked than packed, over the (lowered) member limit
    with zipfile.ZipFile(d / "bomb.zip", "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("huge.png", b"\0" * 2_000_000)
        zf.writestr("ok.png", _png(8, (1, 2, 3)))
    # a zip inside a zip, beside a plain member
    inner = io.BytesIO()
    with zipfile.ZipFile(inner, "w") as zf:
        zf.writestr("deep.png", _png(8, (4, 5, 6)))
    with zipfile.ZipFile(d / "nested.zip", "w") as zf:
        zf.writestr("inner.zip", inner.getvalue())
        zf.writestr("top.png", _png(8, (7, 8, 9)))
    # links: a loop of two file links, a folder link back up (a folder loop), links out of the folder
    os.symlink(d / "loop_b.png", d / "loop_a.png")
    os.symlink(d / "loop_a.png", d / "loop_b.png")
    (d / "sub").mkdir()
    make_image(d / "sub" / "in_sub.png", 8, (3, 3, 3))
    os.symlink(d, d / "sub" / "back_up")
    outside = tmp_path / "library"
    make_image(outside / "far.png", 8, (90, 91, 92))
    make_image(outside / "album" / "a1.png", 8, (93, 94, 95))
    os.symlink(outside / "far.png", d / "link_out.png")
    os.symlink(outside / "album", d / "album_link")

    make_image(tmp_path / "d1" / "b.png", 8)
    before = snapshot(tmp_path, (isolated_rfp_home, tmp_path / "m.parquet"))
    store = FrameStore(max_side=64)
    report = ingest([d], [tmp_path / "d1"], out=tmp_path / "m.parquet", store=store, progress=False)
    assert snapshot(tmp_path, (isolated_rfp_home, tmp_path / "m.parquet")) == before  # links unchanged too
    rows = rows_by_name(report.table)

    def ok(name: str) -> np.ndarray:
        (row,) = rows[name]
        assert row["status"] == "ok" and row["error"] is None, (name, row["error"])
        return stored(store, row["frame_key"])

    assert np.abs(ok("cmyk.jpg").astype(int) - [255, 0, 0]).max() < 8
    assert np.array_equal(ok("sixteen.png"), np.full((10, 12, 3), 255, np.uint8))
    assert np.array_equal(np.unique(ok("palette.png").reshape(-1, 3), axis=0), [[10, 200, 30]])
    turned = ok("exif6.jpg")
    assert turned.shape == (20, 10, 3)  # turned upright: tall
    assert turned[2, 5, 2] > 200 and turned[17, 5, 0] > 200  # blue (the left half) now on top
    for name in odd:
        ok(name)
    assert np.array_equal(ok("link_out.png"), np.full((8, 8, 3), (90, 91, 92), np.uint8))
    a1 = [r for r in report.table.to_pylist() if r["source_path"].endswith("album_link/a1.png")]
    assert len(a1) == 1 and a1[0]["status"] == "ok"  # the linked folder is walked, under the link's path
    in_sub = [r for r in report.table.to_pylist() if r["domain"] == 0 and r["source_path"].endswith("in_sub.png")]
    assert [r["source_path"] for r in in_sub] == [str(d / "sub" / "in_sub.png")]  # the folder loop is walked once

    bomb = {r["frame_key"].split(":member:")[1]: r for r in rows["bomb.zip"]}
    assert bomb["ok.png"]["status"] == "ok"
    assert (
        bomb["huge.png"]["status"] == "skipped"
        and "2000000 bytes uncompressed, over the 50000 limit" in bomb["huge.png"]["error"]
    )
    nested = {r["frame_key"].split(":member:")[1]: r for r in rows["nested.zip"]}
    assert nested["top.png"]["status"] == "ok"
    assert nested["inner.zip"]["status"] == "skipped" and "archive inside an archive" in nested["inner.zip"]["error"]
    for name in ("loop_a.png", "loop_b.png"):
        (row,) = rows[name]
        assert row["status"] == "skipped" and "symbolic links" in row["error"]
    skipped = [r for r in report.table.to_pylist() if r["status"] == "skipped"]
    assert len(skipped) == report.n_skipped == 4 and all(r["error"] for r in skipped)


def _png(size: int, color) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, format="PNG")
    return buf.getvalue()


def test_sources_that_vanish_or_change_while_read_are_skipped_and_leave_no_frames(tmp_path, monkeypatch):
    d = tmp_path / "d0"
    make_image(d / "good.png", 16, (9, 9, 200))
    make_image(d / "gone_after_listing.png", 16, (1, 1, 1))
    make_image(d / "gone_after_hash.png", 16, (2, 2, 2))
    make_image(d / "changed_after_hash.png", 16, (3, 3, 3))
    make_video(d / "video_changed.mp4", n_frames=6, size=24)
    make_image(tmp_path / "d1" / "b.png", 16, (5, 5, 5))
    old = {n: md5(d / n) for n in ("changed_after_hash.png", "video_changed.mp4")}

    real_discover, real_md5 = ingest_mod.discover, HashCache.md5

    def discover_then_delete(dirs):  # the race: a file removed between listing and reading
        found = real_discover(dirs)
        (d / "gone_after_listing.png").unlink(missing_ok=True)
        return found

    def md5_then_touch(self, path):  # the race: a file removed or rewritten between hashing and decoding
        digest = real_md5(self, path)
        name = Path(path).name
        if name == "gone_after_hash.png":
            Path(path).unlink()
        elif name == "changed_after_hash.png":
            make_image(path, 20, (200, 3, 3))
        elif name == "video_changed.mp4":
            make_video(Path(str(path) + ".new.mp4"), n_frames=8, size=24, noise=True)
            os.replace(str(path) + ".new.mp4", path)  # replaced the way editors save: a new inode
        return digest

    monkeypatch.setattr(ingest_mod, "discover", discover_then_delete)
    monkeypatch.setattr(HashCache, "md5", md5_then_touch)
    store = FrameStore(max_side=64)
    report = ingest([d], [tmp_path / "d1"], out=tmp_path / "m.parquet", store=store, progress=False)
    rows = rows_by_name(report.table)
    assert [r["status"] for r in rows["good.png"]] == ["ok"]
    (gone,) = rows["gone_after_listing.png"]
    assert gone["status"] == "skipped" and "No such file" in gone["error"] and gone["source_md5"] is None
    (gone2,) = rows["gone_after_hash.png"]
    assert gone2["status"] == "skipped" and "No such file" in gone2["error"]
    for name in ("changed_after_hash.png", "video_changed.mp4"):
        (row,) = rows[name]
        assert row["status"] == "skipped" and "changed while being ingested" in row["error"], row
        assert row["source_md5"] == old[name]
    # frames keyed by the old md5 but holding the new content were taken out of the store again
    assert not store.has(old["changed_after_hash.png"])
    assert not any(store.has(f"{old['video_changed.mp4']}:frame:{i}") for i in range(8))
    assert report.n_skipped == 4

    # the next ingest sees the files as they are now and reads them
    monkeypatch.setattr(HashCache, "md5", real_md5)
    monkeypatch.setattr(ingest_mod, "discover", real_discover)
    again = rows_by_name(ingest([d], [tmp_path / "d1"], out=tmp_path / "m2.parquet", store=store, progress=False).table)
    assert [r["status"] for r in again["changed_after_hash.png"]] == ["ok"]
    assert [r["status"] for r in again["video_changed.mp4"]] == ["ok"] * 8
    assert np.array_equal(stored(store, md5(d / "changed_after_hash.png")), np.full((20, 20, 3), (200, 3, 3), np.uint8))


def test_a_domain_folder_that_vanishes_during_ingest_is_a_clear_error(tmp_path, monkeypatch, capsys):
    d0, d1 = tmp_path / "d0", tmp_path / "d1"
    make_image(d0 / "a.png", 16)
    make_image(d1 / "sub" / "b.png", 16)
    real_discover = ingest_mod.discover

    def discover_then_remove(dirs):  # domain 1 is deleted while domain 0 is being ingested
        found = real_discover(dirs)
        if Path(dirs[0]) == d0:
            shutil.rmtree(d1)
        return found

    monkeypatch.setattr(ingest_mod, "discover", discover_then_remove)
    out = tmp_path / "m.parquet"
    with pytest.raises(IngestError, match=f"domain folder {d1} does not exist.*no manifest was written"):
        ingest([d0], [d1], out=out, progress=False)
    assert not out.exists()
    make_image(d1 / "sub" / "b.png", 16)
    assert main(["ingest", "--domain0", str(d0), "--domain1", str(d1), "--out", str(out)]) == 2
    assert f"error: domain folder {d1} does not exist" in capsys.readouterr().err and not out.exists()

    # a folder inside a domain that vanishes while it is listed: os.walk would skip it silently
    make_image(d1 / "sub" / "b.png", 16)
    monkeypatch.setattr(ingest_mod, "discover", real_discover)
    real_scandir = os.scandir

    def scandir_racing(path="."):
        if str(path) == str(d1 / "sub"):
            shutil.rmtree(d1 / "sub", ignore_errors=True)
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir_racing)
    with pytest.raises(IngestError, match=f"cannot list folder {d1 / 'sub'} inside domain folder {d1}"):
        ingest([d0], [d1], out=out, progress=False)
    assert not out.exists()


def _mount_tmpfs(where: Path, size: str) -> bool:
    where.mkdir(parents=True, exist_ok=True)
    try:
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


def _assert_store_complete(home: Path) -> None:
    """No temp file left, and every PNG (and smaller PPM copy) in the store decodes in full."""
    leftovers = [p for p in home.rglob("*.tmp")]
    assert not leftovers, leftovers
    pngs = [p for p in (home / "store").rglob("*") if p.suffix in (".png", ".ppm")]
    for p in pngs:
        with Image.open(p) as img:
            img.load()
    return pngs


def test_full_disk_under_rfp_home_is_a_clear_error_and_leaves_only_complete_files(tmp_path, monkeypatch, capsys):
    d0, d1 = tmp_path / "d0", tmp_path / "d1"
    for i in range(24):  # ~50 KB each as PNG: about 1.2 MB of frames per domain
        noisy(d0 / f"a{i:02d}.png", 128, i)
        noisy(d1 / f"b{i:02d}.png", 128, 100 + i)
    home = Path(f"/tmp/rfp-fulldisk-{uuid.uuid4().hex[:8]}")
    if not _mount_tmpfs(home, "1m"):
        pytest.skip("cannot mount a tmpfs here; test_file_size_limit_write_is_a_clear_error covers the error path")
    try:
        monkeypatch.setenv("RFP_HOME", str(home))
        out = tmp_path / "m.parquet"
        with pytest.raises(StoreWriteError, match="No space left on device.*RFP_HOME"):
            ingest([d0], [d1], out=out, store=FrameStore(max_side=512), progress=False)
        assert not out.exists()
        assert len(_assert_store_complete(home)) > 0  # some frames made it, all of them whole
        assert main(["ingest", "--domain0", str(d0), "--domain1", str(d1), "--out", str(out)]) == 1
        err = capsys.readouterr().err
        assert "error: cannot write" in err and "No space left on device" in err and "Traceback" not in err
        assert not out.exists()
        _assert_store_complete(home)
    finally:
        subprocess.run(["umount", "-l", str(home)], capture_output=True)
        shutil.rmtree(home, ignore_errors=True)


FSIZE_SCRIPT = """
import resource, signal, sys
from pathlib import Path
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of killing us
resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))
from rfp_core.cli import main
sys.exit(main(["ingest", "--domain0", sys.argv[1], "--domain1", sys.argv[2], "--out", sys.argv[3]]))
"""


def test_file_size_limit_write_is_a_clear_error(tmp_path):
    """Where no tmpfs can be mounted, a per-file size limit (RLIMIT_FSIZE) makes writes fail the
    same way: a real OSError from the kernel, on the first frame larger than the limit."""
    d0, d1 = tmp_path / "d0", tmp_path / "d1"
    for i in range(4):
        noisy(d0 / f"a{i}.png", 128, i)
        noisy(d1 / f"b{i}.png", 128, 10 + i)
    out = tmp_path / "m.parquet"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", FSIZE_SCRIPT, str(d0), str(d1), str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1, done.stderr[-2000:]
    assert "error: cannot write frame" in done.stderr and "File too large" in done.stderr
    assert "Traceback" not in done.stderr and not out.exists()
    _assert_store_complete(Path(os.environ["RFP_HOME"]))


def test_temp_files_of_killed_writers_are_swept_and_live_ones_kept(tmp_path, isolated_rfp_home):
    from rfp_core.atomic import sweep_temps, temp_prefix

    d0, d1 = tmp_path / "d0", tmp_path / "d1"
    make_image(d0 / "a.png", 16)
    make_image(d1 / "b.png", 16)
    # a writer killed mid-write: a child process that made a temp file in the store and died
    frames = isolated_rfp_home / "store" / "frames" / "s512" / "ab"
    frames.mkdir(parents=True)
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import os,sys,tempfile,time; from rfp_core.atomic import temp_prefix;"
            "tempfile.mkstemp(prefix=temp_prefix('x.png'), suffix='.tmp', dir=sys.argv[1]);"
            "time.sleep(60)",
            str(frames),
        ],
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )
    try:
        for _ in range(200):
            if list(frames.glob("*.tmp")):
                break
            subprocess.run(["sleep", "0.05"])
        (dead,) = frames.glob("*.tmp")
        assert sweep_temps(frames) == []  # its writer still runs: kept
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    live = frames / f"{temp_prefix('y.png')}abc.tmp"  # this process's own: alive, kept
    live.write_bytes(b"partial")
    ingest([d0], [d1], out=tmp_path / "m.parquet", progress=False)
    assert not dead.exists() and live.exists()
