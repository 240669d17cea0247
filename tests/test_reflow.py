"""Reflow: stored couplings (deterministic, resumable), k-RF / distillation, the steps table, `rfp reflow`."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from disc_data import make_discs
from torch import nn

from rfp_core.bench.reflow import ToyVelocity, run_toy
from rfp_core.checkpoint import load_checkpoint
from rfp_core.cli import main
from rfp_core.config_files import config_from_dict
from rfp_core.flow import rf
from rfp_core.flow.reflow import Solver, generate_couplings, noise_source, open_couplings, tensor_source
from rfp_core.flow.reflow_metrics import FlowModel, markdown_table, order_flip_fraction, steps_table
from rfp_core.inference.translate import Translator
from rfp_core.media.datasets import FrameDataset
from rfp_core.media.frame_store import FrameStore
from rfp_core.media.ingest import ingest
from rfp_core.train.reflow import FitSettings, coupling_batches, fit
from rfp_core.train.reflow_run import pick_model, reflow_run, translator_for_steps
from rfp_core.train.run import train_run
from rfp_core.train.velocity import train_velocity

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.json"


def _swirl(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A fixed non-linear velocity: the couplings depend on every solver step."""
    return torch.sin(x.flip(1)) * (1 + t.reshape(-1, *[1] * (x.dim() - 1)))


def test_couplings_deterministic_and_resumable_after_a_kill(tmp_path):
    src = noise_source(10, (2, 4, 4), seed=3)
    full = generate_couplings(_swirl, src, "v1", Solver("rk4", 8), shard_size=3, root=tmp_path / "a", progress=False)
    assert full.computed == 4 and full.reused == 0 and len(full) == 10
    z0, z1 = full.load()
    assert z0.shape == (10, 2, 4, 4) and not torch.equal(z0, z1)

    # a kill after 3 shards (no index yet), then the last finished shard lost or truncated
    assert (
        generate_couplings(
            _swirl, src, "v1", Solver("rk4", 8), shard_size=3, root=tmp_path / "b", progress=False, max_new_shards=3
        )
        is None
    )
    part = tmp_path / "b" / full.digest
    assert sorted(p.name for p in part.glob("shard_*.pt")) == ["shard_00000.pt", "shard_00001.pt", "shard_00002.pt"]
    assert not (part / "index.parquet").exists()
    (part / "shard_00002.pt").unlink()
    (part / "shard_00001.pt").write_bytes((part / "shard_00001.pt").read_bytes()[:100])
    resumed = generate_couplings(_swirl, src, "v1", Solver("rk4", 8), shard_size=3, root=tmp_path / "b", progress=False)
    assert (resumed.computed, resumed.reused) == (3, 1)
    r0, r1 = resumed.load()
    assert torch.equal(r0, z0) and torch.equal(r1, z1)  # bit-identical to the uninterrupted run

    again = generate_couplings(_swirl, src, "v1", Solver("rk4", 8), shard_size=3, root=tmp_path / "b", progress=False)
    assert (again.computed, again.reused) == (0, 4)
    index = pq.read_table(part / "index.parquet").to_pylist()
    assert [r["index"] for r in index] == list(range(10))
    assert index[4] == {"index": 4, "source_key": "noise:3:4", "shard": "shard_00001.pt", "offset": 1}
    shard = load_checkpoint(part / "shard_00001.pt")  # weights_only load
    assert torch.equal(shard["z1"][1], z1[4])
    assert torch.allclose(shard["z1"], rf.integrate(_swirl, shard["z0"], 8, "rk4"))

    # the address changes with the velocity, the solver and the inputs
    other = {
        generate_couplings(_swirl, s, v, sv, shard_size=3, root=tmp_path / "c", progress=False).digest
        for s, v, sv in [
            (src, "v2", Solver("rk4", 8)),
            (src, "v1", Solver("heun", 8)),
            (noise_source(10, (2, 4, 4), seed=4), "v1", Solver("rk4", 8)),
        ]
    }
    assert len(other) == 3 and full.digest not in other
    assert open_couplings(part).index.num_rows == 10


class Constant(nn.Module):
    def __init__(self, c: torch.Tensor):
        super().__init__()
        self.c = nn.Parameter(c.clone())

    def forward(self, x, t):
        return self.c.expand_as(x)


def test_constant_velocity_is_straight_and_reflow_leaves_it_unchanged(tmp_path):
    c = torch.tensor([1.5, -0.5])
    v = Constant(c)
    z0 = torch.randn(64, 2, generator=torch.Generator().manual_seed(0))
    assert rf.straightness(v, z0, 8, sampler="rk4") < 1e-12
    couplings = generate_couplings(
        v, tensor_source(z0), "const", Solver("rk4", 4), shard_size=32, root=tmp_path, progress=False
    )
    a, b = couplings.load()
    assert torch.allclose(b, a + c, atol=1e-6)
    settings = FitSettings(steps=200, batch_size=64, minibatch_size=32, learning_rate=1e-2, seed=0)
    same = fit(Constant(c), coupling_batches(a, b, 64, 0), settings, progress=False).model
    assert torch.allclose(same.c, c, atol=1e-6)  # the loss is already 0: nothing to change
    torch.manual_seed(0)
    fresh = fit(ToyVelocity(32), coupling_batches(a, b, 64, 0), settings, progress=False).model
    probe = a[:32]
    for t in (0.0, 0.5, 1.0):
        assert (fresh(probe, torch.full((32,), t)) - c).abs().max() < 0.1
    assert rf.straightness(fresh, probe, 8, sampler="rk4") < 1e-3


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    torch.manual_seed(0)
    return run_toy(steps_1rf=300, steps_reflow=300, steps_distill=300, pairs=1024, root=tmp_path_factory.mktemp("toy"))


def test_toy_reflow_straightens_and_uncrosses(toy):
    assert toy["straightness_1rf"] > 0.5  # two crossing Gaussians: 1-RF's paths bend
    assert toy["straightness_2rf"] < 0.1 * toy["straightness_1rf"]
    # order flips along y: independent coupling ~0.5; the 1-RF ODE coupling (2-RF's training data) far fewer
    assert toy["order_flips_independent"] > 0.4
    assert toy["order_flips_1rf_coupling"] < 0.5 * toy["order_flips_independent"]
    assert toy["order_flips_2rf_coupling"] <= toy["order_flips_1rf_coupling"] + 0.02
    rows = {(r["model"], r["steps"]): r for r in toy["rows"]}
    assert rows[("2-RF", 1)]["mse_to_reference"] < 0.2 * rows[("1-RF", 1)]["mse_to_reference"]


def test_toy_distilled_one_step_beats_1rf_euler_one_step(toy):
    test, ref = toy["test"], toy["reference"]
    one_step = lambda m: rf.integrate(m, test, 1, "euler")  # noqa: E731
    err_dist = (one_step(toy["models"]["distilled"]) - ref).pow(2).mean()
    err_1rf = (one_step(toy["models"]["1rf"]) - ref).pow(2).mean()
    assert err_dist < 0.1 * err_1rf


def test_steps_table_rows_and_scorer():
    v = Constant(torch.tensor([1.0, 0.0]))
    z0 = torch.zeros(4, 2)
    seen = []

    def score(images_in, images_out):
        seen.append((images_in.clone(), images_out.clone()))
        return {"shift": float((images_out - images_in)[:, 0].mean())}

    rows = steps_table(
        [FlowModel("a", v), FlowModel("d", v, one_step_only=True)],
        z0,
        steps=(1, 2),
        score=score,
        reference=z0 + torch.tensor([1.0, 0.0]),
    )
    assert [(r["model"], r["steps"]) for r in rows] == [("a", 1), ("a", 2), ("d", 1)]
    assert all(abs(r["shift"] - 1.0) < 1e-6 and r["mse_to_reference"] < 1e-12 for r in rows)
    assert rows[0]["straightness"] < 1e-12 and rows[2]["straightness"] != rows[2]["straightness"]  # nan: no path
    assert torch.equal(seen[0][0], z0)
    md = markdown_table(rows)
    assert md.splitlines()[0].startswith("| model | steps |") and len(md.splitlines()) == 5


def test_order_flip_fraction():
    z = torch.arange(10.0).reshape(10, 1)
    assert order_flip_fraction(z, z * 2) == 0.0
    assert order_flip_fraction(z, -z) == 1.0


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        root = tmp_path_factory.mktemp("run")
        mp.setenv("RFP_HOME", str(root / "home"))
        d0, d1 = make_discs(root / "data", n=8, size=32)
        raw = {
            **json.loads(TINY.read_text()),
            "loss": "mse",
            "train_batch_size": 4,
            "train_minibatch_size": 4,
            "train_images": 4 * 4,
            "sample_batch_size": 2,
            "domain0": [str(d0)],
        }
        store = FrameStore(max_side=64)
        run = root / "home" / "runs" / "tiny"
        ingest([d0], [d1], out=run / "manifest.parquet", store=store, progress=False)
        cfg = config_from_dict({**raw, "store_max_side": 64})
        train_velocity(cfg, run / "manifest.parquet", run, store=store, progress=False)
        yield run


def test_reflow_run_rounds_distill_and_model_choice(tiny_run, capsys, monkeypatch):
    run = tiny_run
    monkeypatch.setenv("RFP_HOME", str(run.parents[1]))  # the run's frame store
    settings = dict(rounds=2, pairs=5, distill=True, solver=Solver("rk4", 3), train_steps=2, shard_size=2)
    res = reflow_run(run, **settings, device="cpu", progress=False)
    assert res.flows == [run / "reflow_1" / "velocity.pt", run / "reflow_2" / "velocity.pt"]
    assert res.distilled == run / "distilled" / "velocity.pt" and len(res.trained) == 3
    metas = [load_checkpoint(p)["reflow"] for p in [*res.flows, res.distilled]]
    assert [m["source"] for m in metas] == ["velocity.pt", "reflow_1/velocity.pt", "reflow_2/velocity.pt"]
    assert [m["kind"] for m in metas] == ["reflow", "reflow", "distilled"]
    assert metas[2]["settings"]["distill"] and not metas[0]["settings"]["distill"]
    # the couplings of round 1 are the training domain-0 frames, centred crop, solved by 1-RF
    cfg = Translator.from_run(run).cfg
    train_keys = FrameDataset(
        run / "manifest.parquet",
        FrameStore(max_side=64),
        0,
        32,
        split="train",
        holdout_fraction=cfg.saliency.holdout_fraction,
        train_crop=False,
    ).frame_keys
    c1 = res.couplings[0]
    assert c1.index.column("source_key").to_pylist() == train_keys[:5]
    z0, z1 = c1.load()
    base = Translator.from_run(run)
    assert torch.allclose(z1, rf.integrate(base.velocity, z0, 3, "rk4"), atol=1e-5)
    assert pick_model(run, 1) == (run / "distilled" / "velocity.pt", "distilled")
    assert pick_model(run, 2) == (run / "reflow_2" / "velocity.pt", "3-RF")
    assert pick_model(run, 12) == (run / "velocity.pt", "1-RF")
    tr, label, path = translator_for_steps(run, 1, device="cpu")
    assert label == "distilled" and "model: distilled" in capsys.readouterr().err
    one = tr.translate(torch.zeros(1, 3, 32, 32), steps=1)
    assert one.shape == (1, 3, 32, 32)

    again = reflow_run(run, **settings, device="cpu", progress=False)
    assert again.trained == [] and all(c.computed == 0 for c in again.couplings)


def test_reflow_cli_writes_products_and_the_steps_table(tiny_run, capsys, monkeypatch):
    run = tiny_run
    monkeypatch.setenv("RFP_HOME", str(run.parents[1]))
    assert (
        main(
            [
                "reflow",
                "--run",
                str(run),
                "--rounds",
                "1",
                "--distill",
                "--pairs",
                "5",
                "--steps-solver",
                "3",
                "--train-steps",
                "3",
                "--shard-size",
                "2",
                "--device",
                "cpu",
                "--report-inputs",
                "2",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "| 1-RF | 12 |" in out and "| distilled | 1 |" in out
    rows = json.loads((run / "reflow_report.json").read_text())
    assert {(r["model"], r["steps"]) for r in rows} >= {("1-RF", 1), ("1-RF", 12), ("2-RF", 4), ("distilled", 1)}
    assert all(r["mse_to_reference"] >= 0 and r["seconds_per_input"] > 0 for r in rows)
    assert load_checkpoint(run / "reflow_1" / "velocity.pt")["step"] == 3
    assert load_checkpoint(run / "distilled" / "velocity.pt")["reflow"]["source"] == "reflow_1/velocity.pt"


def test_reflow_refuses_a_folder_without_a_run(tmp_path, capsys):
    assert main(["reflow", "--run", str(tmp_path), "--device", "cpu"]) == 2
    assert "train the run first" in capsys.readouterr().err


def test_generative_reflow_couples_seeded_noise(tmp_path):
    _, d1 = make_discs(tmp_path / "data", n=6, size=32)
    raw = {
        **json.loads(TINY.read_text()),
        "loss": "mse",
        "train_batch_size": 4,
        "train_minibatch_size": 4,
        "train_images": 8,
        "sample_batch_size": 2,
    }
    run = train_run(config_from_dict(raw), "random", [d1], run_id="gen", device="cpu", progress=False)
    res = reflow_run(run, rounds=1, pairs=3, solver=Solver("euler", 2), train_steps=1, device="cpu", progress=False)
    c = res.couplings[0]
    assert c.index.column("source_key").to_pylist() == ["noise:0:0", "noise:0:1", "noise:0:2"]
    z0, _ = c.load()
    assert z0.shape == (3, 3, 32, 32) and torch.equal(z0, noise_source(3, (3, 32, 32), 0).load([0, 1, 2], 0))
    assert load_checkpoint(res.flows[0])["reflow"]["kind"] == "reflow"


def test_fit_resumes_exactly_after_a_kill(tmp_path):
    z0 = torch.randn(40, 2, generator=torch.Generator().manual_seed(1))
    z1 = z0.flip(1) * 2
    settings = FitSettings(steps=10, batch_size=8, minibatch_size=4, learning_rate=1e-2, ema=0.9, seed=3)
    batches = coupling_batches(z0, z1, 8, 3)

    def run(state: Path, fail_at: int | None = None):
        torch.manual_seed(0)

        def draw(step):
            if fail_at is not None and step == fail_at:
                raise KeyboardInterrupt  # the kill
            return batches(step)

        return fit(
            ToyVelocity(16),
            draw,
            settings,
            state_path=state,
            fingerprint={"c": "x"},
            checkpoint_every=4,
            progress=False,
        )

    whole = run(tmp_path / "a.pt")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b.pt", fail_at=6)
    assert load_checkpoint(tmp_path / "b.pt")["step"] == 4
    resumed = run(tmp_path / "b.pt")
    assert resumed.losses == whole.losses[4:]
    for p, q in zip(resumed.model.parameters(), whole.model.parameters()):
        assert torch.equal(p, q)
