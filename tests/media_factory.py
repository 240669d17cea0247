"""Real media for tests, made with PyAV and Pillow: images, videos with known frames, zips."""

from __future__ import annotations

import io
import zipfile
from fractions import Fraction
from pathlib import Path
from typing import Mapping

import av
import numpy as np
from PIL import Image

Size = int | tuple[int, int]  # int = square; (width, height)


def _wh(size: Size) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def make_image(path: str | Path, size: Size = 32, color: tuple[int, int, int] = (200, 40, 40), **save_kw) -> Path:
    """A solid-colour RGB image; the format follows the extension (png, jpg)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", _wh(size), tuple(color)).save(path, **save_kw)
    return path


def frame_color(index: int) -> tuple[int, int, int]:
    """The background colour of frame `index` of `make_video` (distinct for the first 24+ frames)."""
    return ((37 * index) % 200 + 30, (255 - 23 * index) % 200 + 30, (11 * index) % 120 + 60)


def frame_array(index: int, size: Size) -> np.ndarray:
    """Frame `index` of `make_video`: a colour that changes per frame and a bright square
    that moves one step per frame, so every frame is different and recognisable."""
    w, h = _wh(size)
    a = np.empty((h, w, 3), np.uint8)
    a[:] = frame_color(index)
    s = max(2, min(w, h) // 4)
    x = (index * 2) % max(1, w - s)
    a[h // 2 - s // 2 : h // 2 + s // 2, x : x + s] = 245
    return a


def make_video(
    path: str | Path,
    n_frames: int = 24,
    size: Size = 32,
    fps: int = 12,
    codec: str = "libx264",
    gop: int | None = None,
    faststart: bool = False,
    crf: int = 12,
    noise: bool = False,
) -> Path:
    """An H.264 (yuv420p) video whose frame i is `frame_array(i, size)`.

    `gop` sets the keyframe interval (seek cost), `faststart` puts the index before the data
    (so a truncated file still opens and yields its first frames), `noise` adds random
    texture (bigger files, realistic decode cost)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    w, h = _wh(size)
    rng = np.random.default_rng(0)
    options = {"movflags": "+faststart"} if faststart else {}
    with av.open(str(path), "w", options=options) as container:
        stream = container.add_stream(codec, rate=Fraction(fps))
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        if codec in ("libx264", "h264"):
            stream.options = {"crf": str(crf), "preset": "veryfast"}
        if gop:
            stream.codec_context.gop_size = gop
        for i in range(n_frames):
            a = frame_array(i, (w, h))
            if noise:
                a = np.clip(a.astype(np.int16) + rng.integers(-40, 40, a.shape), 0, 255).astype(np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(a, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def make_audio_only(path: str | Path, seconds: float = 0.5, rate: int = 16000) -> Path:
    """A media file with one AAC audio stream and no video stream."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=rate)
        n = int(seconds * rate)
        t = np.arange(n) / rate
        samples = (0.2 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)[None, :]
        chunk = 1024
        for start in range(0, n, chunk):
            frame = av.AudioFrame.from_ndarray(samples[:, start : start + chunk].copy(), format="fltp", layout="mono")
            frame.sample_rate = rate
            frame.pts = start
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def image_bytes(size: Size = 16, color: tuple[int, int, int] = (10, 120, 230), fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", _wh(size), tuple(color)).save(buf, format=fmt)
    return buf.getvalue()


def make_zip(path: str | Path, members: Mapping[str, bytes | Image.Image | tuple[Size, tuple[int, int, int]]]) -> Path:
    """A zip whose members are given as raw bytes, a PIL image (saved as PNG) or (size, color).
    Names are written exactly as given (so `../x.png` is possible)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as zf:
        for name, value in members.items():
            if isinstance(value, Image.Image):
                buf = io.BytesIO()
                value.save(buf, format="PNG")
                data = buf.getvalue()
            elif isinstance(value, tuple):
                data = image_bytes(value[0], value[1], "JPEG" if name.lower().endswith((".jpg", ".jpeg")) else "PNG")
            else:
                data = value
            zf.writestr(zipfile.ZipInfo(name, date_time=(2020, 1, 1, 0, 0, 0)), data)
    return path


def decode_video(path: str | Path) -> list[tuple[float, np.ndarray]]:
    """Independent reference decode: (timestamp, RGB array) for every frame."""
    with av.open(str(path)) as container:
        return [(float(f.time), f.to_ndarray(format="rgb24")) for f in container.decode(video=0)]


def make_video_with_audio(
    path: str | Path,
    n_frames: int = 24,
    size: Size = (48, 32),
    fps: int = 12,
    audio_rate: int = 16000,
    audio_codec: str = "aac",
    rotation: int | None = None,
    pts: list[int] | None = None,
    crf: int = 12,
    video_codec: str = "libx264",
) -> Path:
    """An H.264 (or `video_codec`) video of `frame_array` frames plus a 440 Hz audio track as long as the video.
    `pts` (in units of 1/(fps*100)) gives explicit, possibly uneven, timestamps (variable frame
    rate); `rotation` writes a display matrix (degrees counter-clockwise)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    w, h = _wh(size)
    tb = Fraction(1, fps * 100)
    with av.open(str(path), "w") as container:
        v = container.add_stream(video_codec, rate=Fraction(fps))
        v.width, v.height, v.pix_fmt = w, h, "yuv420p"
        v.time_base = tb
        v.codec_context.time_base = tb
        v.options = {"crf": str(crf), "preset": "veryfast"} if video_codec == "libx264" else {}
        if rotation is not None:
            v.set_display_rotation(rotation)
        a = container.add_stream(audio_codec, rate=audio_rate)
        stamps = pts if pts is not None else [i * 100 for i in range(n_frames)]
        for i, p in enumerate(stamps):
            frame = av.VideoFrame.from_ndarray(frame_array(i, (w, h)), format="rgb24")
            frame.pts, frame.time_base = p, tb
            container.mux(v.encode(frame))
        container.mux(v.encode())
        n = int((stamps[-1] + 100) * tb * audio_rate)
        t = np.arange(n) / audio_rate
        fmt = "fltp" if audio_codec == "aac" else "s16"
        samples = 0.2 * np.sin(2 * np.pi * 440 * t)
        samples = samples.astype(np.float32) if fmt == "fltp" else (samples * 32767).astype(np.int16)
        chunk = 1024
        for start in range(0, n, chunk):
            frame = av.AudioFrame.from_ndarray(samples[None, start : start + chunk].copy(), format=fmt, layout="mono")
            frame.sample_rate, frame.pts = audio_rate, start
            container.mux(a.encode(frame))
        container.mux(a.encode())
    return path
