"""Nothing lost, nothing trained on the wrong thing: a run folder only resumes (and prunes) the work
of its own lineage, refuses other inputs unless forced, continues a raised budget, and survives a
metrics line torn by a kill."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from disc_data import make_discs

from rfp_core.checkpoint import list_checkpoints, prune_checkpoints, save_checkpoint
from rfp_core.config_files import config_from_dict
from rfp_core.media.frame_store import FrameStore
from rfp_core.media.ingest import ingest
from rfp_core.train.schedule import lr_at
from rfp_core.train.velocity import train_velocity

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.json"


class Killed(Exception):
    """Stands in for SIGKILL at a chosen step (raised from the metrics callback)."""


def kill_at(step: int):
    def log(metrics: dict, at: int) -> None:
        if at == step:
            raise Killed(at)

    return log


def _cfg(**flat):
    # plain MSE: the saliency phase is not what these tests are about
    raw = {
        **json.loads(TINY.read_text()),
        "loss": "mse",
        "train_batch_size": 8,
        "train_minibatch_size": 4,
        "checkpoint_every_steps": 2,
        "sample_every_images": 10**6,
        **flat,
    }
    return config_from_dict(raw)


@pytest.fixture
def data(tmp_path):
    d0, d1 = make_discs(tmp_path / "data", n=12, size=32)
    store = FrameStore(max_side=64)
    report = ingest([d0], [d1], out=tmp_path / "manifest.parquet", store=store, progress=False)
    return report.manifest_path, store


def _steps(folder: Path) -> list[int]:
    return sorted(int(p.stem.split("_")[1]) for p in list_checkpoints(folder, "velocity"))


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["velocity"]


def test_prune_only_counts_the_current_lineage(tmp_path):
    save_checkpoint(tmp_path / "velocity_00001600.pt", {"step": 1600, "lineage": "old-config"})
    for step in (2, 4, 6):
        save_checkpoint(tmp_path / f"velocity_{step:08d}.pt", {"step": step, "lineage": "new"})
    deleted = prune_checkpoints(tmp_path, "velocity", keep=2, lineage="new")
    assert [p.name for p in deleted] == ["velocity_00000002.pt"]
    assert _steps(tmp_path) == [4, 6, 1600]


def test_another_lineages_checkpoints_neither_push_out_nor_replace_the_resume(tmp_path, data, capsys):
    manifest, store = data
    run = tmp_path / "run"
    old = _cfg(train_images=8 * 8)
    train_velocity(old, manifest, run, store=store, progress=False)  # leaves velocity_6, velocity_8 (old lineage)
    assert _steps(run) == [6, 8]
    init = tmp_path / "old_final.pt"
    init.write_bytes((run / "velocity.pt").read_bytes())

    # a new config fine-tuned from the old weights in the same folder, killed after step 5
    new = _cfg(train_images=8 * 6, learning_rate=0.002)
    with pytest.raises(Killed):
        train_velocity(new, manifest, run, store=store, progress=False, resume_from=init, log=kill_at(5))
    # the new run's step-2 and step-4 checkpoints survive beside the old run's higher steps
    assert _steps(run) == [2, 4, 6, 8]
    capsys.readouterr()
    resumed = train_velocity(new, manifest, run, store=store, progress=False)
    assert f"resuming from {run / 'velocity_00000004.pt'} at step 4/6" in capsys.readouterr().err
    assert resumed.steps == 6

    straight = train_velocity(new, manifest, tmp_path / "straight", store=store, progress=False, resume_from=init)
    a, b = _weights(straight.checkpoint), _weights(resumed.checkpoint)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the old run's step-6 checkpoint was not overwritten by the new run's: it moved aside
    moved = list((run / "superseded").glob("velocity_00000006-*/velocity_00000006.pt"))
    assert len(moved) == 1 and torch.load(moved[0], weights_only=True)["config"]["velocity"]["learning_rate"] == 0.001


def test_other_inputs_are_refused_with_what_changed_and_restart_moves_the_old_work_aside(tmp_path, data):
    from rfp_core.train.resume import ResumeRefused

    manifest, store = data
    run = tmp_path / "run"
    train_velocity(_cfg(train_images=8 * 4), manifest, run, store=store, progress=False)

    with pytest.raises(ResumeRefused) as err:
        train_velocity(_cfg(train_images=8 * 4, learning_rate=0.002), manifest, run, store=store, progress=False)
    msg = str(err.value)
    assert "velocity.learning_rate 0.001 -> 0.002" in msg and "--run-id NEW" in msg and "--restart" in msg

    # new data, same config: refused too, naming the data
    d0, d1 = make_discs(tmp_path / "other", n=12, size=32, seed=1)
    other = ingest([d0], [d1], out=tmp_path / "other.parquet", store=store, progress=False).manifest_path
    with pytest.raises(ResumeRefused, match=r"the data \(manifest content version\)"):
        train_velocity(_cfg(train_images=8 * 4), other, run, store=store, progress=False)
    assert _steps(run) == [2, 4] and (run / "velocity.pt").is_file()  # nothing was touched

    forced = train_velocity(_cfg(train_images=8 * 4), other, run, store=store, progress=False, force=True)
    assert forced.steps == 4
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]  # the new run's own log, from step 1
    old = list((run / "superseded").glob("velocity-*"))
    assert len(old) == 1 and {"velocity_00000004.pt", "velocity.pt", "metrics.jsonl"} <= {
        p.name for p in old[0].iterdir()
    }


def test_raising_train_images_continues_with_the_schedule_recomputed(tmp_path, data, capsys):
    manifest, store = data
    run = tmp_path / "run"
    train_velocity(_cfg(train_images=8 * 4), manifest, run, store=store, progress=False)
    capsys.readouterr()
    longer = _cfg(train_images=8 * 8)
    result = train_velocity(longer, manifest, run, store=store, progress=False)
    err = capsys.readouterr().err
    assert "at step 4/8" in err and "LR schedule is recomputed for 8 steps" in err
    assert result.steps == 8
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 9))
    vc = longer.velocity
    for r in rows[4:]:  # the continued steps follow the 8-step schedule
        assert r["lr"] == pytest.approx(lr_at(r["step"] - 1, 8, vc.learning_rate, vc.lr_schedule, vc.warmup_fraction))


def test_a_metrics_line_torn_by_a_kill_is_skipped_with_a_warning(tmp_path, data):
    manifest, store = data
    run = tmp_path / "run"
    cfg = _cfg(train_images=8 * 8)
    with pytest.raises(Killed):
        train_velocity(cfg, manifest, run, store=store, progress=False, log=kill_at(7))
    with (run / "metrics.jsonl").open("a") as fh:
        fh.write('{"step": 8, "loss": 0.1')  # the kill landed mid-write
    with pytest.warns(UserWarning, match=r"metrics.jsonl:8: skipping an unreadable metrics line"):
        result = train_velocity(cfg, manifest, run, store=store, progress=False)
    assert result.steps == 8
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))


def _other_data(tmp_path, store):
    d0, d1 = make_discs(tmp_path / "other", n=12, size=32, seed=1)
    return d0, d1, ingest([d0], [d1], out=tmp_path / "other.parquet", store=store, progress=False).manifest_path


def test_a_finished_saliency_phase_on_other_frames_is_not_reused(tmp_path, data):
    from rfp_core.train.resume import ResumeRefused
    from rfp_core.train.saliency import train_saliency

    manifest, store = data
    cfg = config_from_dict(
        json.loads(TINY.read_text()),
        overrides={
            "saliency": {
                "accuracy_threshold": 0.75,
                "warmup_threshold": 0.6,
                "eval_every": 2,
                "max_steps": 200,
                "augmentations": [],
            }
        },
    )
    run = tmp_path / "run"
    first = train_saliency(cfg, manifest, run, store=store, progress=False)
    assert first.accuracy >= 0.75 and first.steps > 0
    again = train_saliency(cfg, manifest, run, store=store, progress=False)  # same frames: finished, reused
    assert again.steps == first.steps

    _, _, other = _other_data(tmp_path, store)
    with pytest.raises(ResumeRefused) as err:
        train_saliency(cfg, other, run, store=store, progress=False)
    assert "the data (manifest content version)" in str(err.value) and "--restart" in str(err.value)
    fresh = train_saliency(cfg, other, run, store=store, progress=False, force=True)
    state = json.loads((run / "saliency_state.json").read_text())
    assert fresh.steps > 0 and state["steps"] == fresh.steps and fresh.accuracy >= 0.75
    moved = list((run / "superseded").glob("saliency-*/saliency_state.json"))
    assert len(moved) == 1 and json.loads(moved[0].read_text())["steps"] == first.steps


def test_rfp_train_on_new_data_is_refused_and_restart_retrains_every_phase_built_from_it(tmp_path, capsys):
    from rfp_core.cli import main
    from rfp_core.config_files import load_config
    from rfp_core.paths import runs_dir

    raw = load_config(TINY).model_dump(mode="json")
    raw["velocity"].update(loss="mse", train_images=8 * 2, sample_every_images=10**6)
    raw["codec"].update(
        net={
            "type": "VAE",
            "latent_channels": 4,
            "model_channels": 8,
            "ch_mult": [1, 2],
            "normalization": "GroupNormAuto",
            "num_res_blocks": 1,
        },
        losses=[{"type": "L1Loss"}, {"type": "KLLoss"}],
        train_images=16 * 4,
        train_batch_size=16,
    )
    cfg_path = tmp_path / "vae.json"
    cfg_path.write_text(json.dumps(raw))
    d0, d1 = make_discs(tmp_path / "data", n=12, size=32)
    args = ["train", "-c", str(cfg_path), "--run-id", "r", "--device", "cpu", "--dev"]
    assert main([*args, "-d0", str(d0), "-d1", str(d1)]) == 0
    run = runs_dir() / "r"
    codec_before = (run / "codec.pt").read_bytes()

    e0, e1 = make_discs(tmp_path / "new", n=12, size=32, seed=1)
    capsys.readouterr()
    assert main([*args, "-d0", str(e0), "-d1", str(e1)]) == 1
    err = capsys.readouterr().err
    assert "codec:" in err and "the data (manifest content version)" in err and "--restart" in err
    assert (run / "codec.pt").read_bytes() == codec_before  # refused before anything was trained

    assert main([*args, "-d0", str(e0), "-d1", str(e1), "--restart"]) == 0
    assert (run / "codec.pt").read_bytes() != codec_before
    moved = {p.parent.name.split("-")[0] for p in (run / "superseded").glob("*/*")}
    assert moved == {"codec", "velocity"}
