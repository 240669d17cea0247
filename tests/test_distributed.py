"""Data-parallel training (train/distributed.py): 2 ranks on CPU (gloo) and 1 rank at the same global
batch train the same nets: the same loss curve and final weights within float tolerance, for the
velocity phase with the saliency-weighted loss and for the saliency phase (augmentations on, BatchNorm
over the global batch, the 1a -> 1b switch re-wrapping DDP); a 1-rank checkpoint resumed by 2 ranks
ends where 1 rank did."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from disc_data import make_discs
from dist_worker import spawn, train

from rfp_core.checkpoint import load_checkpoint
from rfp_core.config import ConfigError
from rfp_core.config_files import config_from_dict, load_config
from rfp_core.media.frame_store import FrameStore
from rfp_core.media.ingest import ingest
from rfp_core.train import distributed

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.json"
# velocity: 6 images a step, minibatch 2: 1 rank accumulates 3 micro-batches, 2 ranks 2 + 1 each
OVERRIDES = {
    "max_size": 16,
    "saliency": {
        "batch_size": 8,
        "max_steps": 6,
        "eval_every": 1,
        "accuracy_threshold": 1.0,
        "warmup_threshold": 0.5,
        "augmentations": ["hflip", "color_jitter"],
        "blend_fraction": 0.0,
        "label_smoothing": 0.1,
    },
    "velocity": {
        "train_batch_size": 6,
        "train_minibatch_size": 2,
        "train_images": 24,
        "loss": "saliency",
        "mse_weight": 0.1,
        "ema": 0.9,
        "gradient_clip": 1.0,
        "sample_every_images": 10_000,
        "checkpoint_every_steps": 2,
        "timestep_sampling": "logit-normal",
    },
}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    d0, d1 = make_discs(root / "data", n=12, size=16)
    store = FrameStore(root=root / "store", max_side=64)
    report = ingest([d0], [d1], out=root / "manifest.parquet", store=store, progress=False)
    base = load_config(TINY)
    cfg = config_from_dict(base.model_dump(mode="json"), source="test", overrides={**OVERRIDES, "store_max_side": 64})
    return root, cfg, report.manifest_path, store


def _job(root: Path, cfg, manifest, store, phase: str, name: str, **extra) -> dict:
    out = root / name
    out.mkdir(exist_ok=True)
    return {
        "phase": phase,
        "config": cfg.model_dump(mode="json"),
        "manifest": str(manifest),
        "store_root": str(store.root),
        "out_dir": str(out),
        "log": str(out / "log.jsonl"),
        "rfp_home": str(root / "home"),
        **extra,
    }


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _assert_same_weights(a: dict, b: dict, lr: float, steps: int) -> None:
    """Equal within float tolerance. The exception Adam makes: where a gradient is float noise (~0),
    its first updates are ~lr * sign(noise), so a few elements in a million may differ by up to
    lr per step; they are counted and bounded, the rest must match to 1e-5."""
    assert a.keys() == b.keys()
    off, total = 0, 0
    for k in a:
        if not a[k].is_floating_point():
            assert torch.equal(a[k], b[k]), k
            continue
        diff = (a[k] - b[k]).abs()
        off += int((diff > 1e-5 + 1e-4 * b[k].abs()).sum())
        total += diff.numel()
        assert float(diff.max()) <= 2 * lr * steps + 1e-5, k
    assert off <= max(2, total * 1e-5), f"{off} of {total} weights differ"


@pytest.fixture(scope="module")
def runs(data):
    """1 rank in this process; then one 2-rank world trains the same saliency and velocity jobs, and
    continues 1 rank's step-2 velocity checkpoint to the end (resume at another world size)."""
    root, cfg, manifest, store = data
    sal = {n: _job(root, cfg, manifest, store, "saliency", f"saliency_{n}") for n in (1, 2)}
    train(sal[1])
    sal_ckpt = str(Path(sal[1]["out_dir"]) / "saliency.pt")  # both velocity runs use 1 rank's saliency net
    vel = {
        n: _job(root, cfg, manifest, store, "velocity", name, saliency_checkpoint=sal_ckpt)
        for n, name in ((1, "velocity_1"), (2, "velocity_2"), ("resumed", "velocity_resumed"))
    }
    train(vel[1])
    shutil.copy(Path(vel[1]["out_dir"]) / "velocity_00000002.pt", vel["resumed"]["out_dir"])
    spawn([sal[2], vel[2], vel["resumed"]], 2)
    return {
        k: Path(j["out_dir"])
        for k, j in {"sal_1": sal[1], "sal_2": sal[2], **{f"vel_{n}": j for n, j in vel.items()}}.items()
    }


def test_saliency_two_ranks_match_one_rank(data, runs):
    one, two = runs["sal_1"], runs["sal_2"]
    # the training rows (the last row is the report-split accuracy, logged once at the end)
    a, b = ([r for r in _rows(p / "log.jsonl") if "saliency/loss" in r] for p in (one, two))
    ra, rb = ([r for r in _rows(p / "log.jsonl") if "saliency/report_accuracy" in r] for p in (one, two))
    assert len(ra) == len(rb) == 1 and ra[0]["saliency/report_accuracy"] == rb[0]["saliency/report_accuracy"]
    # warm-up ends at the first evaluation (0.5 >= 0.5): the fine-tune steps after it train the backbone too
    assert [r["step"] for r in a] == [r["step"] for r in b] and len(a) >= 3
    assert a[0]["saliency/warmed_up"] == 0.0 and a[-1]["saliency/warmed_up"] == 1.0
    assert [r["saliency/loss"] for r in b] == pytest.approx([r["saliency/loss"] for r in a], rel=1e-4)
    assert [r["saliency/accuracy"] for r in b] == [r["saliency/accuracy"] for r in a]
    ca, cb = (load_checkpoint(p / "saliency.pt", map_location="cpu") for p in (one, two))
    assert ca["steps"] == cb["steps"] == len(a) and ca["backbone_warmed_up"] and cb["backbone_warmed_up"]
    _assert_same_weights(ca["saliency"], cb["saliency"], data[1].saliency.learning_rate, len(a))
    assert len({round(r["saliency/loss"], 5) for r in a}) == len(a)  # a curve, not a constant


def test_velocity_saliency_loss_two_ranks_match_one_rank(data, runs):
    lr = data[1].velocity.learning_rate
    a, b = (_rows(runs[k] / "metrics.jsonl") for k in ("vel_1", "vel_2"))
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 4]
    for key in ("loss", "loss_saliency", "loss_mse"):
        assert [r[key] for r in b] == pytest.approx([r[key] for r in a], rel=1e-4), key
    assert len({round(r["loss"], 6) for r in a}) == 4  # a curve, not a constant
    fa, fb = (load_checkpoint(runs[k] / "velocity_00000004.pt", map_location="cpu") for k in ("vel_1", "vel_2"))
    _assert_same_weights(fa["model"], fb["model"], lr, 4)
    _assert_same_weights(fa["ema"]["model"], fb["ema"]["model"], lr, 4)
    _assert_same_weights(
        *(load_checkpoint(runs[k] / "velocity.pt", map_location="cpu")["velocity"] for k in ("vel_1", "vel_2")), lr, 4
    )


def test_a_one_rank_checkpoint_continued_by_two_ranks_ends_where_one_rank_did(data, runs):
    a, c = (_rows(runs[k] / "metrics.jsonl") for k in ("vel_1", "vel_resumed"))
    assert [r["step"] for r in c] == [3, 4]
    assert [r["loss"] for r in c] == pytest.approx([r["loss"] for r in a[2:]], rel=1e-4)
    fa, fc = (load_checkpoint(runs[k] / "velocity_00000004.pt", map_location="cpu") for k in ("vel_1", "vel_resumed"))
    _assert_same_weights(fa["model"], fc["model"], data[1].velocity.learning_rate, 2)


def test_shards_split_the_global_batch_and_refuse_too_few_samples():
    ranks = [distributed.World(r, 4) for r in range(4)]
    assert [distributed.shard(10, w) for w in ranks] == [(0, 3), (3, 3), (6, 2), (8, 2)]
    assert distributed.ShardBatches(10, 2, ranks[0]).micro_sizes() == [2, 1]
    first_two_steps = iter(distributed.ShardBatches(10, 2, ranks[2], start_step=1))
    assert [next(first_two_steps) for _ in range(2)] == [[16, 17], [26, 27]]
    with pytest.raises(ConfigError, match="smaller than the 4 ranks"):
        distributed.shard(3, ranks[0])


def test_torchrun_command_passes_the_command_line_on_without_its_own_flags(tmp_path):
    from rfp_core.cli import build_parser
    from rfp_core.train.launch import torchrun_command

    def command(*extra: str) -> list[str]:
        argv = ["train", "-c", "cfg.json", "-d0", "a", "-d1", "b", "--nproc-per-node", "2", *extra, "--dev"]
        args = build_parser().parse_args(argv)
        args.argv = argv
        return torchrun_command(args)

    one_node = command()
    assert one_node[1:8] == [
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--standalone",
        "-m",
        "rfp_core.cli",
    ]
    assert one_node[8:] == ["train", "-c", "cfg.json", "-d0", "a", "-d1", "b", "--dev"]
    two_nodes = command("--nnodes", "2", "--node-rank=1", "--master-addr", "10.0.0.1", "--master-port", "29500")
    assert "--standalone" not in two_nodes
    assert two_nodes[5:13] == [
        "--nnodes",
        "2",
        "--node-rank",
        "1",
        "--master-addr",
        "10.0.0.1",
        "--master-port",
        "29500",
    ]
    assert two_nodes[-8:] == one_node[-8:]


@pytest.mark.slow
def test_rfp_train_nproc_per_node_2_trains_like_one_process(data, tmp_path, monkeypatch):
    """The user's command end to end: torchrun starts 2 ranks of `rfp train`; the velocity loss curve is
    1 rank's (the saliency nets of the two runs differ by float noise, hence the looser tolerance)."""
    import subprocess
    import sys

    root, cfg, _, _ = data
    d0, d1 = root / "data" / "domain0", root / "data" / "domain1"
    cfg_path = tmp_path / "cfg.json"
    cfg_path.write_text(
        config_from_dict(
            cfg.model_dump(mode="json"),
            overrides={"saliency": {"max_steps": 3, "accuracy_threshold": 0.5, "warmup_threshold": 0.5}},
        ).to_json()
    )
    home = tmp_path / "home"
    monkeypatch.setenv("RFP_HOME", str(home))
    args = ["train", "-c", str(cfg_path), "-d0", str(d0), "-d1", str(d1), "--dev", "--device", "cpu"]
    for run_id, extra in (("one", []), ("two", ["--nproc-per-node", "2"])):
        proc = subprocess.run(
            [sys.executable, "-m", "rfp_core.cli", *args, "--run-id", run_id, *extra],
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert proc.stdout.strip().splitlines() == [str(home / "runs" / run_id)]  # rank 0 prints the folder once
    assert "torch.distributed.run --nproc-per-node 2 --standalone" in proc.stderr
    a, b = (_rows(home / "runs" / r / "metrics.jsonl") for r in ("one", "two"))
    assert [r["images"] for r in b] == [r["images"] for r in a] == [6, 12, 18, 24]  # the global batch, kept
    assert [r["loss"] for r in b] == pytest.approx([r["loss"] for r in a], rel=1e-3)


def test_bench_nproc_per_node_is_refused_where_it_cannot_compare(capsys):
    from rfp_core.cli import main

    assert main(["bench", "ingest", "--nproc-per-node", "2"]) == 2
    assert "`rfp bench ingest` does not take these" in capsys.readouterr().err
    assert main(["bench", "train", "--nproc-per-node", "1", "--device", "cpu"]) == 2
    assert "compares 1 rank with N >= 2 ranks" in capsys.readouterr().err


@pytest.mark.slow
def test_bench_train_nproc_per_node_2_reports_both_rows_and_equal_curves(capsys):
    from rfp_core.cli import main

    assert main(["bench", "train", "--nproc-per-node", "2", "--quick", "--device", "cpu"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [r["ranks"] for r in out["rows"]] == [1, 2] and all(r["images_per_s"] > 0 for r in out["rows"])
    assert all(r["steps"] == out["steps"] for r in out["rows"]) and out["loss_curve_max_rel_diff"] < 1e-4
    assert "correctness only" in out["note"]
