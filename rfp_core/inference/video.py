"""Video in, video out: every frame translated by a trained run, the container's timing, audio
and rotation carried over (PyAV for all of it).

What the output is:
- **Frames**: each decoded frame's centred square (the short side), resized to the model's
  size S, translated -- exactly the crop `rfp translate` applies to a still, so frame i of the
  output is the still translation of frame i of the input (up to the codec). The output is
  S x S: a flow net trained on S x S squares has no meaning outside them, and padding or
  stretching a square back to the input's aspect ratio would invent pixels. A rotated input
  (display matrix, in quarter turns) is translated upright, as ingest stores it for training,
  and turned back before encoding; the input's display matrix is written to the output, so
  players turn the square the same way they turned the input.
- **Timing**: the same frame count; every frame keeps its pts in the input's time base, so
  variable frame rate, start offset and duration survive; the declared rate is the input's.
- **Audio**: every audio stream is remuxed packet for packet (no re-encode, bit-identical).
- **Codec**: H.264 yuv420p, CRF 18 (visually lossless for most content), preset "medium".
- **Flicker**: mean absolute change between consecutive frames (grey levels, 0-255) of the
  output and of the input's crops; their ratio (> 1: the translation adds temporal flicker).
"""

from __future__ import annotations

import sys
import time
from fractions import Fraction
from pathlib import Path
from typing import Callable, Iterable, Sequence

import av
import numpy as np
import torch
from av.sidedata.sidedata import Type as SideDataType
from PIL import Image

from rfp_core.atomic import atomic_path
from rfp_core.media.decode import VIDEO_EXTS, upright
from rfp_core.media.images import center_square, to_tensor

TranslateBatch = Callable[[torch.Tensor], torch.Tensor]
# muxer per output suffix: the temp file's name (".tmp") cannot tell PyAV which one to use
MUXERS = {".mp4": "mp4", ".m4v": "mp4", ".mov": "mov", ".mkv": "matroska", ".webm": "webm", ".avi": "avi"}
CRF_CODECS = {"libx264", "libx265", "libvpx-vp9", "libaom-av1", "libsvtav1"}


class VideoTranslateError(ValueError):
    """A video that cannot be translated; the message names the file and what to do."""


def is_video(path: str | Path) -> bool:
    return Path(path).suffix.lower() in VIDEO_EXTS


def _container_info(path: Path) -> tuple[list[int] | None, int]:
    """(display matrix of the first frame or None, rotation in degrees): read before the
    output is opened, since the matrix must be set before its header is written."""
    with av.open(str(path)) as c:
        if not c.streams.video:
            kinds = ", ".join(s.type for s in c.streams) or "none"
            raise VideoTranslateError(f"{path}: no video stream (streams: {kinds}); pass a video file")
        for frame in c.decode(c.streams.video[0]):
            sd = frame.side_data.get(SideDataType.DISPLAYMATRIX)
            if sd is None:
                return None, 0
            return np.frombuffer(bytes(sd), dtype="<i4").tolist(), int(frame.rotation)
    raise VideoTranslateError(f"{path}: the video stream holds no decodable frame")


def _open_video_out(oc, in_v, size: int, codec: str, crf: int | None, preset: str, pix_fmt: str, matrix):
    rate = in_v.average_rate or in_v.guessed_rate or Fraction(25)
    out_v = oc.add_stream(codec, rate=rate)
    out_v.width = out_v.height = size
    out_v.pix_fmt = pix_fmt
    # the codec's time base = the input's: frame pts pass through unrounded (variable frame rate kept)
    out_v.time_base = in_v.time_base
    out_v.codec_context.time_base = in_v.time_base
    opts = {}
    if crf is not None and codec in CRF_CODECS:
        opts["crf"] = str(crf)
    if codec in ("libx264", "libx265"):
        opts["preset"] = preset
    out_v.options = opts
    if matrix is not None:
        out_v.set_display_matrix(matrix)
    return out_v


class _Flicker:
    """Running mean of |frame_t - frame_(t-1)| for the input crops and the outputs."""

    def __init__(self) -> None:
        self.prev: tuple[np.ndarray, np.ndarray] | None = None
        self.sum_in = self.sum_out = 0.0
        self.pairs = 0

    def add(self, x: np.ndarray, y: np.ndarray) -> None:
        x, y = x.astype(np.float32), y.astype(np.float32)
        if self.prev is not None:
            self.sum_in += float(np.abs(x - self.prev[0]).mean())
            self.sum_out += float(np.abs(y - self.prev[1]).mean())
            self.pairs += 1
        self.prev = (x, y)

    def report(self) -> dict:
        if not self.pairs:
            return {"flicker_input": None, "flicker_output": None, "flicker_ratio": None}
        fi, fo = self.sum_in / self.pairs, self.sum_out / self.pairs
        return {"flicker_input": fi, "flicker_output": fo, "flicker_ratio": fo / fi if fi > 0 else None}


def _to_uint8(y: torch.Tensor) -> np.ndarray:
    """(B, 3, S, S) in [-1, 1] -> (B, S, S, 3) uint8, rounded like `images.to_pil`."""
    y = ((y.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return y.permute(0, 2, 3, 1).numpy()


class _FrameWriter:
    """Batches decoded frames, translates them and encodes the results with the source frames'
    own timestamps; feeds the flicker meter and the progress bar."""

    def __init__(
        self, oc, out_v, in_v, translate_batch: TranslateBatch, size: int, batch_size: int, bar, rotation: int = 0
    ):
        self.oc, self.out_v, self.tb = oc, out_v, in_v.time_base
        self.turn = round(rotation / 90) * 90 % 360  # quarter turns: a square stays a square
        self.translate_batch, self.size, self.batch_size, self.bar = translate_batch, size, batch_size, bar
        self.pending: list[av.VideoFrame] = []
        self.durations: dict[int, int] = {}
        self.flicker = _Flicker()
        self.frames = 0
        self.last_pts: int | None = None
        self.last_gap: int | None = None

    def add(self, frame: av.VideoFrame) -> None:
        self.pending.append(frame)
        if len(self.pending) >= self.batch_size:
            self.flush()

    def _pts(self, src: av.VideoFrame) -> int:
        pts = src.pts
        if pts is None:  # no timestamp from the demuxer: continue the last frame's spacing
            pts = 0 if self.last_pts is None else self.last_pts + (self.last_gap or 1)
        if self.last_pts is not None:
            self.last_gap = pts - self.last_pts
        self.last_pts = pts
        return pts

    def _mux(self, packets) -> None:
        # the encoder guesses packet durations from its rate; the source's own keep the last
        # frame's duration, hence the stream's duration, as they were
        for pk in packets:
            if pk.pts is not None and pk.pts in self.durations:
                pk.duration = self.durations.pop(pk.pts)
            self.oc.mux(pk)

    def flush(self) -> None:
        if not self.pending:
            return
        crops = [np.asarray(center_square(upright(f.to_image(), self.turn), self.size)) for f in self.pending]
        y = _to_uint8(self.translate_batch(torch.stack([to_tensor(Image.fromarray(c)) for c in crops])))
        for src, crop, out in zip(self.pending, crops, y):
            stored = np.ascontiguousarray(np.rot90(out, k=-self.turn // 90))  # back to the stored orientation
            frame = av.VideoFrame.from_ndarray(stored, format="rgb24")
            frame.pts, frame.time_base = self._pts(src), self.tb
            if src.duration:
                self.durations[frame.pts] = src.duration
            self._mux(self.out_v.encode(frame))
            self.flicker.add(crop, out)
        self.frames += len(self.pending)
        self.bar.update(len(self.pending))
        self.pending.clear()

    def close(self) -> None:
        self.flush()
        self._mux(self.out_v.encode(None))


def _check_output(out_path: Path, codec: str, size: int, pix_fmt: str) -> str:
    muxer = MUXERS.get(out_path.suffix.lower())
    if muxer is None:
        raise VideoTranslateError(f"{out_path}: unknown video suffix; name the output .mp4, .mkv, .mov, .m4v or .avi")
    if muxer == "webm" and codec in ("libx264", "libx265"):
        raise VideoTranslateError(f"{out_path}: WebM cannot hold {codec}; name the output .mkv or .mp4")
    if size % 2 and pix_fmt == "yuv420p":
        raise VideoTranslateError(f"model size {size} is odd: yuv420p needs even sides; use pix_fmt='yuv444p'")
    return muxer


def _open_input(in_path: Path):
    try:
        matrix, rotation = _container_info(in_path)
        return matrix, rotation, av.open(str(in_path))
    except av.FFmpegError as exc:
        raise VideoTranslateError(
            f"{in_path}: not a readable video ({exc}); re-encode it, e.g. with ffmpeg -i IN OUT.mp4"
        ) from None


def _transcode(ic, oc, in_v, in_audio, out_audio: dict, writer: _FrameWriter, in_path: Path) -> int:
    """Video frames through the translator, audio packets copied as they are; returns the audio packet count."""
    audio_packets = 0
    try:
        for packet in ic.demux(in_v, *in_audio):
            if packet.stream.type != "audio":
                for f in packet.decode():
                    writer.add(f)
            elif packet.dts is not None:  # None: the demuxer's end-of-stream marker, not data
                packet.stream = out_audio[packet.stream.index]
                oc.mux(packet)
                audio_packets += 1
        writer.close()
    except av.FFmpegError as exc:
        raise VideoTranslateError(
            f"{in_path}: decoding or writing failed after {writer.frames} frames ({exc})"
        ) from None
    if in_v.frames and writer.frames < in_v.frames:  # a truncated file can also end quietly
        raise VideoTranslateError(
            f"{in_path}: ended after {writer.frames} of {in_v.frames} declared frames (truncated?); nothing written"
        )
    return audio_packets


def translate_video(
    in_path: str | Path,
    out_path: str | Path,
    translate_batch: TranslateBatch,
    size: int,
    batch_size: int = 8,
    codec: str = "libx264",
    crf: int | None = 18,
    preset: str = "medium",
    pix_fmt: str = "yuv420p",
    progress: bool = True,
) -> dict:
    """Translate every frame of `in_path` with `translate_batch` ((B,3,S,S) in [-1,1] -> same)
    into `out_path` (written atomically; the muxer follows its suffix). See the module doc for
    what is kept. Returns counts, timing and flicker; prints a one-line summary when `progress`."""
    from tqdm.auto import tqdm

    in_path, out_path = Path(in_path), Path(out_path)
    muxer = _check_output(out_path, codec, size, pix_fmt)
    matrix, rotation, ic = _open_input(in_path)
    start = time.perf_counter()
    with ic, atomic_path(out_path) as tmp:
        in_v = ic.streams.video[0]
        in_v.thread_type = "AUTO"
        in_audio = list(ic.streams.audio)
        with (
            av.open(str(tmp), "w", format=muxer) as oc,
            tqdm(
                total=in_v.frames or None, desc=in_path.name, unit="frame", disable=not progress, dynamic_ncols=True
            ) as bar,
        ):
            out_v = _open_video_out(oc, in_v, size, codec, crf, preset, pix_fmt, matrix)
            out_audio = {a.index: oc.add_stream_from_template(a) for a in in_audio}
            writer = _FrameWriter(oc, out_v, in_v, translate_batch, size, batch_size, bar, rotation)
            audio_packets = _transcode(ic, oc, in_v, in_audio, out_audio, writer, in_path)
        duration = float(in_v.duration * in_v.time_base) if in_v.duration else None
        fps = float(in_v.average_rate) if in_v.average_rate else None
    seconds = time.perf_counter() - start
    result = {
        "input": str(in_path),
        "output": str(out_path),
        "frames": writer.frames,
        "fps": fps,
        "duration_s": duration,
        "size": size,
        "rotation": rotation,
        "audio_streams": len(in_audio),
        "audio_packets": audio_packets,
        "codec": codec,
        "crf": crf,
        "seconds": seconds,
        "frames_per_s": writer.frames / seconds if seconds > 0 else None,
        **writer.flicker.report(),
    }
    if progress:
        print(summary_line(result), file=sys.stderr)
    return result


def summary_line(r: dict) -> str:
    flick = (
        "n/a (one frame)"
        if r["flicker_ratio"] is None and r["flicker_output"] is None
        else (
            f"output {r['flicker_output']:.2f} vs input {r['flicker_input']:.2f} grey levels/frame"
            + (f" (ratio {r['flicker_ratio']:.2f})" if r["flicker_ratio"] is not None else "")
        )
    )
    audio = f", {r['audio_streams']} audio stream(s) copied" if r["audio_streams"] else ""
    return (
        f"{r['input']} -> {r['output']}: {r['frames']} frames at {r['size']}x{r['size']}"
        f"{audio}, {r['frames_per_s']:.1f} frames/s; flicker {flick}"
    )


# ---- `rfp translate` with video inputs ------------------------------------------------------


def split_video_inputs(inputs: Iterable[str | Path]) -> tuple[list[Path], list[str]]:
    """(video files, the inputs left for the still-image path). Folders are searched
    recursively for videos; a folder stays in the second list when it holds images too. With
    no video found the inputs come back unchanged (so a wrong path still fails as before)."""
    from rfp_core.media.images import IMAGE_SUFFIXES

    videos: list[Path] = []
    rest: list[str] = []
    for item in inputs:
        p = Path(item)
        if p.is_file() and is_video(p):
            videos.append(p)
        elif p.is_dir():
            files = sorted(f for f in p.rglob("*") if f.is_file() and not f.name.startswith("."))
            videos += [f for f in files if is_video(f)]
            if any(f.suffix.lower() in IMAGE_SUFFIXES for f in files):
                rest.append(str(item))
        else:
            rest.append(str(item))
    return (videos, rest) if videos else ([], [str(i) for i in inputs])


def _out_suffix(path: Path) -> str:
    # H.264 does not go into WebM: a translated .webm becomes .mkv (which holds its Opus/Vorbis audio too)
    return ".mkv" if path.suffix.lower() == ".webm" else path.suffix.lower()


def video_outputs(videos: Sequence[Path], out: Path, other_inputs: bool) -> list[Path]:
    """Where each translated video goes: `out` itself when it names a video file (one video
    input only), else `out/<stem><suffix>` with `-2`, `-3` for a repeated stem."""
    if out.suffix.lower() in MUXERS:
        if len(videos) != 1 or other_inputs:
            raise VideoTranslateError(
                f"--out {out} is a video file name, which takes exactly one video input; pass a folder for several "
                f"inputs"
            )
        return [out]
    seen: dict[str, int] = {}
    names = []
    for v in videos:
        seen[v.stem] = seen.get(v.stem, 0) + 1
        stem = v.stem if seen[v.stem] == 1 else f"{v.stem}-{seen[v.stem]}"
        names.append(out / f"{stem}{_out_suffix(v)}")
    return names
