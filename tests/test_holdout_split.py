"""The held-out split by source file, and its stop / report halves (issue 17, item 3)."""

import numpy as np

from rfp_core.media.datasets import MIN_SOURCES_TO_HALVE, VIDEO_RUNS, holdout_parts, holdout_split, source_groups


def _video(md5: str, n: int) -> list[str]:
    return [f"{md5}:frame:{i}" for i in range(n)]


def test_frames_of_one_video_land_on_one_side():
    videos = [f"{v:032x}" for v in range(40)]
    keys = [k for v in videos for k in _video(v, 25)] + [f"{i:032x}img" for i in range(200)]
    held = holdout_split(keys, 0.2)
    for v in videos:
        sides = {bool(h) for k, h in zip(keys, held) if k.startswith(v + ":frame:")}
        assert len(sides) == 1, f"video {v} has frames on both sides"
    held_videos = {k.split(":frame:")[0] for k, h in zip(keys, held) if h and ":frame:" in k}
    assert 0 < len(held_videos) < len(videos)
    # images and zip members are still split one by one, as before
    assert source_groups(["a", "z:member:x.png", "z:member:y.png"]) == ["a", "z:member:x.png", "z:member:y.png"]
    # stable as frames are added: a new video does not move the old ones
    more = holdout_split(keys + _video("f" * 32, 10), 0.2)
    assert np.array_equal(more[: len(keys)], held)


def test_a_domain_that_is_one_video_is_split_in_contiguous_runs():
    keys = _video("ab" * 16, 200)
    held = holdout_split(keys, 0.3)
    assert 0 < held.sum() < len(keys)
    # the sides change at run boundaries only: at most VIDEO_RUNS - 1 changes along the video
    changes = int(np.abs(np.diff(held.astype(int))).sum())
    assert changes <= VIDEO_RUNS - 1 and held.sum() % (200 // VIDEO_RUNS) == 0


def test_stop_and_report_halves_are_disjoint_sources():
    keys = [k for v in range(60) for k in _video(f"{v:032x}", 5)]
    held = holdout_split(keys, 0.3)
    stop, report = holdout_parts(keys, 0.3)
    assert not (stop & report).any() and np.array_equal(stop | report, held)
    assert stop.any() and report.any()
    n_stop, n_report = (
        len({k.split(":frame:")[0] for k, m in zip(keys, stop) if m}),
        len({k.split(":frame:")[0] for k, m in zip(keys, report) if m}),
    )
    assert abs(n_stop - n_report) <= 1  # equal halves of the held-out sources
    source = lambda mask: {k.split(":frame:")[0] for k, m in zip(keys, mask) if m}  # noqa: E731
    assert not source(stop) & source(report)
    # fewer than MIN_SOURCES_TO_HALVE held-out sources are not halved: both masks are all of them,
    # and the caller can see they overlap
    stop1, report1 = holdout_parts(["a", "b", "c"], 0.1)
    assert np.array_equal(stop1, report1) and stop1.sum() == 1
    few = [f"{i:04d}" for i in range(40)]
    held = holdout_split(few, 0.06)
    assert 0 < held.sum() < MIN_SOURCES_TO_HALVE
    stop2, report2 = holdout_parts(few, 0.06)
    assert np.array_equal(stop2, held) and np.array_equal(report2, held)
