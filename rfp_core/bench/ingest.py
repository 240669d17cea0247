"""`rfp bench ingest`: (a) ingest frames/s over a folder of videos, (b) training samples/s from the
frame store against seeking into the video for every sample (the original trainer's way),
(c) the re-scan time of an unchanged folder of 10,000 small files.

Everything runs in a temporary $RFP_HOME, so the numbers start from a cold store and the
user's store is left alone. CPU only: `device` is accepted for the common interface.
"""

from __future__ import annotations

import os
import platform
import shutil
import tempfile
import time
from contextlib import contextmanager
from fractions import Fraction
from pathlib import Path
from typing import Iterator

import av
import numpy as np
import torch
from PIL import Image

from rfp_core.media.datasets import FrameDataset, TrainCrop
from rfp_core.media.decode import discover
from rfp_core.media.frame_store import FrameStore
from rfp_core.media.hashing import HashCache
from rfp_core.media.ingest import ingest


def log(msg: str) -> None:
    print(f"[bench ingest] {msg}", flush=True)


@contextmanager
def _temp_home() -> Iterator[Path]:
    old = os.environ.get("RFP_HOME")
    root = Path(tempfile.mkdtemp(prefix="rfp-bench-ingest-"))
    os.environ["RFP_HOME"] = str(root / "home")
    try:
        yield root
    finally:
        if old is None:
            os.environ.pop("RFP_HOME", None)
        else:
            os.environ["RFP_HOME"] = old
        shutil.rmtree(root, ignore_errors=True)


def _texture(h: int, w: int, seed: int) -> np.ndarray:
    """Clouds plus fine grain: something a codec has to spend bits on, like a real scene."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 255, (h // 16 + 2, w // 16 + 2, 3), dtype=np.uint8))
    base = np.asarray(coarse.resize((w, h), Image.Resampling.BICUBIC), np.int16)
    grain = rng.integers(-12, 12, (h, w, 1), dtype=np.int16)
    return np.clip(base + grain, 0, 255).astype(np.uint8)


def make_bench_video(
    path: Path, n_frames: int, width: int, height: int, fps: int = 30, gop: int = 60, seed: int = 0
) -> Path:
    """H.264 video of a camera panning over a textured scene, keyframe every `gop` frames."""
    pan = 2
    scene = _texture(height + pan * n_frames // 4 + 8, width + pan * n_frames + 8, seed)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {
            "crf": "23",
            "preset": "veryfast",
            "keyint": str(gop),
            "min-keyint": str(gop),
            "scenecut": "0",
        }
        stream.codec_context.gop_size = gop
        for i in range(n_frames):
            x, y = pan * i, (pan * i) // 4
            frame = av.VideoFrame.from_ndarray(
                np.ascontiguousarray(scene[y : y + height, x : x + width]), format="rgb24"
            )
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


class SeekDecoder:
    """The original trainer's loader: seek to the keyframe before the frame, decode forward to it.

    `reopen=True` opens the file for every sample, as a Dataset does that keeps no handles
    (containers do not pickle into DataLoader workers); `reopen=False` keeps them open."""

    def __init__(self, paths: list[Path], reopen: bool = False):
        self.reopen = reopen
        self.containers = {p: av.open(str(p)) for p in paths}
        self.pts: dict[Path, list[int]] = {}
        for p, c in self.containers.items():  # frame index -> pts, measured once, outside the timing
            self.pts[p] = [f.pts for f in c.decode(video=0)]

    def frame(self, path: Path, index: int) -> Image.Image:
        container = av.open(str(path)) if self.reopen else self.containers[path]
        try:
            stream = container.streams.video[0]
            target = self.pts[path][index]
            container.seek(target, stream=stream, backward=True, any_frame=False)
            for frame in container.decode(stream):
                if frame.pts is not None and frame.pts >= target:
                    return frame.to_image()
            raise RuntimeError(f"frame {index} of {path} not reached after seeking")
        finally:
            if self.reopen:
                container.close()

    def close(self) -> None:
        for c in self.containers.values():
            c.close()


def run(quick: bool = False, device: str | None = None) -> dict:
    # full: 1080p, the common camera / phone format; GOP 60 (2 s at 30 fps)
    n_videos, n_frames, (vw, vh) = (2, 90, (320, 240)) if quick else (2, 300, (1920, 1080))
    torch.manual_seed(0)
    result: dict = {
        "quick": quick,
        "device": "cpu",
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "torch_threads": torch.get_num_threads(),
    }
    with _temp_home() as root:
        store = FrameStore(max_side=512)
        empty = root / "empty"
        empty.mkdir()
        report, paths = _ingest_videos(root, store, empty, n_videos, n_frames, vw, vh, result)
        _loader_vs_seek(report, store, paths, 60 if quick else 150, result)
        _rescan(root, store, empty, 1000 if quick else 10_000, result)
    return result


def _ingest_videos(
    root: Path,
    store: FrameStore,
    empty: Path,
    n_videos: int,
    n_frames: int,
    vw: int,
    vh: int,
    result: dict,
    gop: int = 60,
):
    """(a) ingest frames/s over a folder of videos, cold store."""
    videos = root / "videos"
    videos.mkdir()
    log(f"making {n_videos} videos of {n_frames} frames at {vw}x{vh}, GOP {gop}")
    paths = [make_bench_video(videos / f"clip{i}.mp4", n_frames, vw, vh, gop=gop, seed=i) for i in range(n_videos)]
    report = ingest([videos], [empty], out=root / "videos.parquet", store=store, progress=False)
    frames = report.n_ok
    result.update(
        ingest_frames=frames,
        ingest_s=round(report.seconds, 3),
        ingest_frames_per_s=round(frames / report.seconds, 2),
        video_size=f"{vw}x{vh}",
        gop=gop,
    )
    log(f"(a) ingested {frames} frames in {report.seconds:.2f} s: {frames / report.seconds:.1f} frames/s")
    return report, paths


def _loader_vs_seek(
    report, store: FrameStore, paths: list[Path], n_samples: int, result: dict, crop_size: int = 128
) -> None:
    """(b) samples/s: FrameDataset from the store vs seek-and-decode, same random frames, same crop."""
    ds = FrameDataset(report.table, store, domain=0, size=crop_size, split="all")
    picks = torch.randint(len(ds), (n_samples,)).tolist()
    crop = TrainCrop(crop_size, train=True)
    by_key = {r["frame_key"]: r for r in report.table.to_pylist()}
    targets = [(Path(by_key[ds.frame_keys[p]]["source_path"]), by_key[ds.frame_keys[p]]["frame_index"]) for p in picks]
    n_seek = max(10, n_samples // 5)  # it is slow; fewer samples give the same rate
    per_seek = n_samples // n_seek
    kept, reopened = SeekDecoder(paths), SeekDecoder(paths, reopen=True)
    # interleaved, so a shared machine's load changes hit all three alike; wall and process CPU time
    variants = {
        "seek": lambda i: crop(kept.frame(*targets[i])),
        "reopen": lambda i: crop(reopened.frame(*targets[i])),
        "store": lambda i: [ds[picks[i * per_seek + j]] for j in range(per_seek)],
    }
    spent = {k: [0.0, 0.0] for k in variants}
    for i in range(n_seek):
        for name, fn in variants.items():
            w0, c0 = time.perf_counter(), time.process_time()
            fn(i)
            spent[name][0] += time.perf_counter() - w0
            spent[name][1] += time.process_time() - c0
    kept.close()
    reopened.close()
    store_rate, cpu_rate = n_seek * per_seek / spent["store"][0], n_seek * per_seek / spent["store"][1]
    seek_rate, reopen_rate = n_seek / spent["seek"][0], n_seek / spent["reopen"][0]
    result.update(
        store_samples_per_s=round(store_rate, 2),
        seek_samples_per_s=round(seek_rate, 2),
        seek_reopen_samples_per_s=round(reopen_rate, 2),
        loader_speedup_vs_seek=round(store_rate / seek_rate, 2),
        loader_speedup_vs_seek_reopen=round(store_rate / reopen_rate, 2),
        loader_speedup_vs_seek_cpu=round(cpu_rate / (n_seek / spent["seek"][1]), 2),
        store_cpu_ms_per_sample=round(1e3 / cpu_rate, 2),
        seek_cpu_ms_per_sample=round(1e3 * spent["seek"][1] / n_seek, 1),
        crop_size=crop_size,
        store_min_side=ds.min_side,
        **_store_disk(store),
    )
    log(
        f"(b) store {store_rate:.1f} samples/s, seek-decode {seek_rate:.1f} samples/s (containers kept open): "
        f"x{store_rate / seek_rate:.1f}; opening the file per sample {reopen_rate:.1f}/s: "
        f"x{store_rate / reopen_rate:.1f}"
    )


def _store_disk(store: FrameStore) -> dict:
    """Bytes of the stored frames and of their smaller copies (uncompressed: frame_store.py)."""
    sizes = {True: 0, False: 0}  # is a smaller copy -> bytes
    for path in store.frames_dir.rglob("*"):
        if path.is_file():
            sizes["@" in path.name] += path.stat().st_size
    full, copies = sizes[False], sizes[True]
    return {"store_frames_mb": round(full / 1e6, 1), "store_copies_mb": round(copies / 1e6, 1)}


def _rescan(root: Path, store: FrameStore, empty: Path, n_small: int, result: dict) -> None:
    """(c) re-scan of an unchanged folder of small files."""
    small = root / "small"
    log(f"making {n_small} small images")
    for i in range(n_small):
        sub = small / f"{i // 100:03d}"
        if i % 100 == 0:
            sub.mkdir(parents=True)
        Image.new("RGB", (8, 8), (i % 256, (i // 256) % 256, 7)).save(sub / f"{i:05d}.png", compress_level=1)
    first = ingest([small], [empty], out=root / "small.parquet", store=store, progress=False)
    log(f"first ingest of {n_small} files: {first.seconds:.2f} s")
    cpu0 = time.process_time()
    again = ingest([small], [empty], out=root / "small.parquet", store=store, progress=False)
    again_cpu = time.process_time() - cpu0  # on a loaded machine, the part of the wall time that was this work
    if again.files_hashed != 0 or again.frames_decoded != 0:
        raise RuntimeError("an unchanged folder was hashed or decoded again on re-scan")
    start = time.perf_counter()
    cache = HashCache()
    for media in discover([small]):
        cache.md5(media.path)
    hash_only = time.perf_counter() - start
    scale = 10_000 / n_small
    result.update(
        rescan_files=n_small,
        rescan_s=round(again.seconds, 3),
        rescan_10k_s=round(again.seconds * scale, 3),
        rescan_10k_cpu_s=round(again_cpu * scale, 3),
        rescan_discover_hash_10k_s=round(hash_only * scale, 3),
        first_ingest_small_s=round(first.seconds, 3),
        rescan_files_hashed=again.files_hashed,
        rescan_frames_decoded=again.frames_decoded,
    )
    log(f"(c) re-scan of {n_small} unchanged files: {again.seconds:.3f} s (discover + hash lookups {hash_only:.3f} s)")
