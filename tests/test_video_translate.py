"""Video -> video translation: frames, timestamps, audio, rotation and flicker carried over."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from media_factory import make_video, make_video_with_audio
from PIL import Image

from rfp_core.cli import main
from rfp_core.inference.video import VideoTranslateError, split_video_inputs, translate_video
from rfp_core.media.images import center_square, load_image, to_tensor


def _frames(path: Path) -> list[av.VideoFrame]:
    with av.open(str(path)) as c:
        return list(c.decode(video=0))


def _stream(path: Path) -> tuple[Fraction, float]:
    with av.open(str(path)) as c:
        v = c.streams.video[0]
        return v.average_rate, float(v.duration * v.time_base)


def _audio_packets(path: Path) -> list[tuple[int, bytes]]:
    with av.open(str(path)) as c:
        tb = c.streams.audio[0].time_base
        # pts in seconds x 10^6: the output muxer may pick another time base for the same instants
        return [(round(p.pts * tb * 10**6), bytes(p)) for p in c.demux(audio=0) if p.size]


def _still(frame: av.VideoFrame, size: int) -> torch.Tensor:
    return to_tensor(center_square(frame.to_image(), size))


def _u8(x: torch.Tensor) -> np.ndarray:
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy().astype(np.float32)


def mirror(x: torch.Tensor) -> torch.Tensor:
    """A deterministic stand-in translator that moves pixels (so a wrong crop or order shows)."""
    return x.flip(-1) * 0.8 + 0.1


def test_container_properties_survive(tmp_path):
    src = make_video_with_audio(tmp_path / "in.mp4", n_frames=24, fps=12, size=(48, 32), rotation=90)
    out = tmp_path / "out.mp4"
    r = translate_video(src, out, mirror, 32, batch_size=5, crf=0, progress=False)
    fin, fout = _frames(src), _frames(out)
    assert len(fin) == len(fout) == r["frames"] == 24
    (rate_in, dur_in), (rate_out, dur_out) = _stream(src), _stream(out)
    assert rate_out == rate_in == 12
    assert abs(dur_out - dur_in) <= 1 / 12 and abs(dur_in - 2.0) <= 1 / 12
    assert [f.pts * f.time_base for f in fout] == [f.pts * f.time_base for f in fin]
    assert _audio_packets(out) == _audio_packets(src) and len(_audio_packets(src)) > 20
    assert r["audio_packets"] == len(_audio_packets(src))
    assert all(f.rotation == 90 for f in fout) and r["rotation"] == 90
    assert (fout[0].width, fout[0].height) == (32, 32)

    # translated upright (as ingest stores the frames: turned 90 degrees counter-clockwise), then
    # turned back, so the stored output shows upright under the same display matrix
    def expected(f: av.VideoFrame) -> np.ndarray:
        upright = to_tensor(center_square(f.to_image().transpose(Image.Transpose.ROTATE_90), 32))
        return np.rot90(_u8(mirror(upright)), k=-1)

    diffs = [np.abs(o.to_ndarray(format="rgb24").astype(np.float32) - expected(i)).mean() for i, o in zip(fin, fout)]
    assert max(diffs) < 6, diffs
    # the turn matters: the translation of the stored (sideways) crop does not match
    assert np.abs(fout[6].to_ndarray(format="rgb24").astype(np.float32) - _u8(mirror(_still(fin[6], 32)))).mean() > 10
    # frames in order: frame 5's translation does not match output frame 6
    assert np.abs(fout[6].to_ndarray(format="rgb24") - expected(fin[5])).mean() > 10


def test_variable_frame_rate_and_pcm_audio_in_mkv(tmp_path):
    stamps = [0, 100, 150, 400, 450, 500, 900, 1000]  # uneven gaps, 1/1200 s units
    src = make_video_with_audio(tmp_path / "vfr.mkv", fps=12, size=32, pts=stamps, audio_codec="pcm_s16le")
    out = tmp_path / "vfr_out.mkv"
    r = translate_video(src, out, mirror, 32, batch_size=3, progress=False)
    assert r["frames"] == len(stamps)
    t_in = [float(f.pts * f.time_base) for f in _frames(src)]
    t_out = [float(f.pts * f.time_base) for f in _frames(out)]
    assert t_out == pytest.approx(t_in, abs=1e-3) and t_in == pytest.approx([s / 1200 for s in stamps], abs=1e-3)
    assert _audio_packets(out) == _audio_packets(src)
    assert all(f.rotation == 0 for f in _frames(out))


def test_webm_becomes_mkv_with_its_opus_audio_copied(tmp_path):
    from rfp_core.inference.video import video_outputs

    src = make_video_with_audio(
        tmp_path / "in" / "clip.webm",
        n_frames=12,
        size=32,
        video_codec="libvpx-vp9",
        audio_codec="libopus",
        audio_rate=48000,
    )
    [dst] = video_outputs([src], tmp_path / "out", other_inputs=False)
    assert dst == tmp_path / "out" / "clip.mkv"
    r = translate_video(src, dst, mirror, 32, progress=False)
    assert r["frames"] == 12 and len(_frames(dst)) == 12
    with av.open(str(dst)) as c:
        assert (c.streams.video[0].codec_context.name, c.streams.audio[0].codec_context.name) == ("h264", "opus")
    assert _audio_packets(dst) == _audio_packets(src)
    assert video_outputs([src, src], tmp_path / "out", False)[1].name == "clip-2.mkv"
    with pytest.raises(VideoTranslateError, match="exactly one video"):
        video_outputs([src, src], tmp_path / "one.mp4", False)


def test_flicker_is_measured_against_the_input(tmp_path):
    src = make_video_with_audio(tmp_path / "in.mp4", n_frames=10, size=32)
    same = translate_video(src, tmp_path / "a.mp4", lambda x: x, 32, progress=False)
    assert same["flicker_ratio"] == pytest.approx(1.0) and same["flicker_input"] > 1
    g = torch.Generator().manual_seed(0)
    noisy = translate_video(
        src, tmp_path / "b.mp4", lambda x: x + 0.3 * torch.randn(x.shape, generator=g), 32, progress=False
    )
    assert noisy["flicker_ratio"] > 1.5


def test_bad_inputs_name_the_file(tmp_path):
    bad = tmp_path / "broken.mp4"
    bad.write_text("not a video")
    with pytest.raises(VideoTranslateError, match="broken.mp4"):
        translate_video(bad, tmp_path / "o.mp4", mirror, 32, progress=False)
    src = make_video_with_audio(tmp_path / "in.mp4", n_frames=4, size=32)
    with pytest.raises(VideoTranslateError, match=r"o\.webm.*\.mkv"):
        translate_video(src, tmp_path / "o.webm", mirror, 32, progress=False)
    assert not (tmp_path / "o.mp4").exists() and not (tmp_path / "o.webm").exists()
    whole = make_video(tmp_path / "whole.mp4", n_frames=24, size=32, faststart=True, noise=True)
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with pytest.raises(VideoTranslateError, match=r"cut\.mp4.*(truncated|failed after)"):
        translate_video(cut, tmp_path / "o.mp4", mirror, 32, progress=False)
    assert not (tmp_path / "o.mp4").exists() and not list(tmp_path.glob(".o.mp4*"))


def test_split_video_inputs(tmp_path):
    (tmp_path / "vids").mkdir()
    (tmp_path / "mixed").mkdir()
    for p in ("vids/a.mp4", "mixed/b.MOV", "mixed/c.png", "d.mkv"):
        (tmp_path / p).write_bytes(b"x")
    videos, rest = split_video_inputs([tmp_path / "vids", tmp_path / "mixed", tmp_path / "d.mkv", tmp_path / "e.png"])
    assert [v.name for v in videos] == ["a.mp4", "b.MOV", "d.mkv"]
    assert rest == [str(tmp_path / "mixed"), str(tmp_path / "e.png")]
    assert split_video_inputs([tmp_path / "nothing"]) == ([], [str(tmp_path / "nothing")])


def test_cli_translates_videos_and_stills_with_a_trained_run(tmp_path, monkeypatch):
    from test_translate import _run

    from rfp_core.inference.translate import Translator

    run = _run(tmp_path / "train", generative=False)
    tr = Translator.from_run(run, device="cpu")
    video = make_video_with_audio(tmp_path / "in" / "clip.mp4", n_frames=24, size=(48, 32))
    still = tmp_path / "in" / "frame3.png"
    fin = _frames(video)
    fin[3].to_image().save(still)
    out = tmp_path / "out"
    args = ["translate", "--run", str(run), "--device", "cpu", "--steps", "2", "--crf", "0"]
    assert main([*args, str(tmp_path / "in"), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["clip.mp4", "frame3.png"]
    fout = _frames(out / "clip.mp4")
    assert len(fout) == 24 and _audio_packets(out / "clip.mp4") == _audio_packets(video)
    for i in (0, 3, 23):  # each output frame = the still translation of that input frame
        expect = tr.translate(load_image(_save(fin[i], tmp_path / f"f{i}.png"), tr.size)[None], steps=2)[0]
        assert np.abs(fout[i].to_ndarray(format="rgb24") - _u8(expect)).mean() < 6
    still_out = np.asarray(Image.open(out / "frame3.png")).astype(np.float32)
    assert np.abs(fout[3].to_ndarray(format="rgb24") - still_out).mean() < 6
    # a single video to a file name; a file name for two inputs is refused with exit code 2
    assert main([*args, str(video), "--out", str(tmp_path / "one.mkv")]) == 0
    assert len(_frames(tmp_path / "one.mkv")) == 24
    assert main([*args, str(video), str(still), "--out", str(tmp_path / "two.mp4")]) == 2


def _save(frame: av.VideoFrame, path: Path) -> Path:
    frame.to_image().save(path)
    return path
