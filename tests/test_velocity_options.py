"""Item 2's velocity options: the relative MSE anchor and minibatch optimal-transport coupling."""

import itertools
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from disc_data import make_discs

from rfp_core.checkpoint import load_checkpoint
from rfp_core.config import ConfigError
from rfp_core.config_files import load_config
from rfp_core.flow import rf
from rfp_core.flow.coupling import Coupler, embedding_cost, ot_permutation, pixel_cost
from rfp_core.media.frame_store import FrameStore
from rfp_core.structure.encoders import ThumbnailEncoder
from rfp_core.train.anchor import RelativeAnchor
from rfp_core.train.run import train_run
from rfp_core.train.velocity import train_velocity

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.json"


def _mean_pair_cost(cost: torch.Tensor, perm: torch.Tensor | None = None) -> float:
    idx = torch.arange(len(cost))
    return float(cost[idx, idx if perm is None else perm].mean())


def test_ot_coupling_lowers_the_batch_pair_cost_to_the_optimum():
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        x0, x1 = torch.randn(6, 3, 8, 8, generator=g), torch.randn(6, 3, 8, 8, generator=g)
        cost = pixel_cost(x0, x1)
        assert cost[2, 4] == pytest.approx(float(((x0[2] - x1[4]) ** 2).mean()), rel=1e-5)
        perm = ot_permutation(cost)
        assert sorted(perm.tolist()) == list(range(6))  # every drawn x1 is used once
        best = min(_mean_pair_cost(cost, torch.tensor(p)) for p in itertools.permutations(range(6)))
        assert _mean_pair_cost(cost, perm) == pytest.approx(best, rel=1e-6)
        assert _mean_pair_cost(cost, perm) < _mean_pair_cost(cost)  # independent = the drawn order


def test_structure_space_coupling_pairs_by_layout(tmp_path):
    # domain-0 and domain-1 images of the same layouts, drawn in a shuffled order: OT in the
    # thumbnail encoder's space finds the matching layout for each
    g = torch.Generator().manual_seed(1)
    n = 8
    masks = torch.zeros(n, 1, 16, 16)
    for i in range(n):
        r, c = divmod(i, 4)
        masks[i, :, 2 + 6 * r : 8 + 6 * r, 1 + 4 * c : 4 + 4 * c] = 1
    x0 = -0.6 + masks * torch.tensor([1.4, 0.2, -0.2]).view(1, 3, 1, 1)
    order = torch.randperm(n, generator=g)
    x1 = (-0.6 + masks * torch.tensor([-0.2, 0.4, 1.4]).view(1, 3, 1, 1))[order]
    cfg = load_config(
        TINY,
        overrides={
            "velocity": {"coupling": "minibatch_ot", "coupling_space": "structure"},
            "structure": {"encoder": "thumbnail", "thumbnail_size": 8},
        },
    )
    coupler = Coupler(cfg)
    assert isinstance(coupler.encoder, ThumbnailEncoder)
    batch = {"domain_0": x0, "domain_1": x1}
    cost = coupler.cost(batch, x0, x1)
    coupled = coupler(batch, x0, x1)
    assert torch.equal(coupled, x1[torch.argsort(order)])  # each layout meets its own
    assert _mean_pair_cost(cost, ot_permutation(cost)) < _mean_pair_cost(cost)
    assert embedding_cost(torch.eye(2), torch.eye(2)).diag().abs().max() < 1e-6


def test_relative_anchor_means_the_same_share_at_any_scale():
    # two tasks whose MSE differs by 100x (image size, latent width): an absolute weight gives the
    # anchor a 100x different share of the loss, the relative one the same share
    shares = []
    for mse_scale in (1.0, 100.0):
        anchor = RelativeAnchor(0.5)
        for step in range(50):
            sal, mse = torch.tensor(2.0 + 0.1 * (step % 3)), torch.tensor(mse_scale * (1.0 + 0.05 * (step % 5)))
            w = anchor(sal, mse)
        shares.append(float(w * mse_scale) / 2.1)
    assert shares[0] == pytest.approx(0.5, rel=0.1) and shares[1] == pytest.approx(shares[0], rel=1e-6)
    # the effective weight carries the gradient of the anchored loss: d total = d sal + w_eff d mse
    torch.manual_seed(0)
    lin = torch.nn.Conv2d(3, 4, 1)
    h = lambda x: lin(x).mean(dim=(2, 3))  # noqa: E731
    x_t, target = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    v = torch.randn(4, 3, 8, 8, requires_grad=True)
    anchor = RelativeAnchor(2.0)
    total, sal, mse = rf.anchored_saliency_loss_terms(h, x_t, target, v, anchor)
    assert anchor.effective == pytest.approx(2.0 * float(sal) / float(mse), rel=1e-5)
    (grad,) = torch.autograd.grad(total, v)
    vs = v.detach().requires_grad_(True)
    (g_sal,) = torch.autograd.grad(rf.reference_saliency_loss(h, x_t, target, vs), vs)
    g_mse = 2 * (vs.detach() - target) / v.numel()
    torch.testing.assert_close(grad, g_sal + anchor.effective * g_mse, rtol=1e-4, atol=1e-7)
    restored = RelativeAnchor(2.0)
    restored.load_state_dict(anchor.state_dict())
    assert float(restored(sal, mse)) == pytest.approx(float(anchor(sal, mse)))


def _short(tmp_path, **velocity):
    d0, d1 = make_discs(tmp_path / "data", n=12, size=16)
    over = {
        "max_size": 16,
        "store_max_side": 16,
        "saliency": {
            "accuracy_threshold": 0.6,
            "warmup_threshold": 0.55,
            "eval_every": 2,
            "max_steps": 60,
            "batch_size": 8,
            "holdout_fraction": 0.35,
            "augmentations": [],
        },
        "velocity": {
            "train_images": 6 * 8,
            "train_batch_size": 8,
            "train_minibatch_size": 8,
            "sample_every_images": 10_000,
            "checkpoint_every_steps": 3,
            **velocity,
        },
    }
    return load_config(TINY, overrides=over), d0, d1


def velocity_again(run, out, cfg, **keywords):
    """The velocity phase of `cfg` again, on the manifest and saliency net of `run`, into `out`."""
    return train_velocity(
        cfg,
        run / "manifest.parquet",
        out,
        saliency_checkpoint=run / "saliency.pt",
        store=FrameStore(max_side=cfg.store_max_side),
        progress=False,
        **keywords,
    )


def test_training_runs_with_ot_coupling_and_the_relative_anchor(tmp_path, monkeypatch):
    monkeypatch.setenv("RFP_HOME", str(tmp_path / "home"))
    cfg, d0, d1 = _short(tmp_path, coupling="minibatch_ot", mse_weight_mode="relative", mse_weight=0.5)
    run = train_run(cfg, [d0], [d1], run_id="opts", device="cpu", progress=False)
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    last = lines[-1]
    assert last["step"] == 6 and all(torch.isfinite(torch.tensor(x["loss"])) for x in lines)
    assert last["mse_weight_effective"] > 0
    # the anchor's share of the loss is about the configured 0.5 of the saliency term
    assert last["mse_weight_effective"] * last["loss_mse"] / last["loss_saliency"] == pytest.approx(0.5, rel=0.5)
    state = load_checkpoint(run / "velocity_00000006.pt")
    assert state["anchor"]["norm"] > 0 and state["config"]["velocity"]["coupling"] == "minibatch_ot"
    # resuming at step 3 continues the anchor's scales: the same final weights, bit for bit
    import shutil

    from rfp_core.config_files import config_from_dict

    resumed_dir = tmp_path / "resumed"
    resumed_dir.mkdir()
    shutil.copy(run / "velocity_00000003.pt", resumed_dir / "from3.pt")
    cfg_run = config_from_dict(json.loads((run / "config.json").read_text()))
    resumed = velocity_again(run, resumed_dir, cfg_run, resume_from=resumed_dir / "from3.pt")
    a, b = load_checkpoint(run / "velocity.pt")["velocity"], load_checkpoint(resumed.checkpoint)["velocity"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_training_runs_with_structure_space_coupling(tmp_path, monkeypatch):
    monkeypatch.setenv("RFP_HOME", str(tmp_path / "home"))
    cfg, d0, d1 = _short(tmp_path, loss="mse", coupling="minibatch_ot", coupling_space="structure")
    cfg = cfg.model_copy(update={"structure": cfg.structure.model_copy(update={"encoder": "thumbnail"})})
    run = train_run(cfg, [d0], [d1], run_id="struct", device="cpu", progress=False)
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["step"] == 6 and torch.isfinite(torch.tensor(last["loss"]))


def test_a_source_noise_range_draws_each_samples_sigma_inside_it_by_position():
    from rfp_core.train.velocity_step import _source_sigma

    cfg = load_config(TINY)
    cfg.velocity.source_noise, cfg.velocity.source_noise_min = 0.5, 0.2
    sigma = _source_sigma(cfg, range(400)).flatten()
    assert sigma.min() >= 0.2 and sigma.max() <= 0.5 and sigma.max() - sigma.min() > 0.25
    assert float(sigma.mean()) == pytest.approx(0.35, abs=0.02)  # uniform over the range
    assert torch.equal(_source_sigma(cfg, [7, 3])[:, 0, 0, 0], sigma[[7, 3]])  # by position, any batch
    cfg.velocity.source_noise_min = None
    assert float(_source_sigma(cfg, [7, 3])) == 0.5
    with pytest.raises(ConfigError, match="source_noise_min"):
        load_config(TINY, overrides={"velocity": {"source_noise": 0.3, "source_noise_min": 0.4}})


def test_source_noise_is_drawn_per_image_the_same_in_any_batch_and_shared_on_request():
    g = torch.Generator().manual_seed(3)
    a, b, c = torch.randn(3, 1, 3, 8, 8, generator=g)
    batch = torch.cat([a, b, c])
    noise = rf.source_noise(batch, 0.5)
    # an image gets the same draw alone or in any batch; two images do not share one
    assert torch.equal(noise[1], rf.source_noise(b, 0.5)[0])
    assert torch.equal(noise[2], rf.source_noise(torch.cat([c, a]), 0.5)[0])
    assert not torch.allclose(noise[0], noise[1])
    assert float(noise.std()) == pytest.approx(0.5, rel=0.15)
    assert not torch.equal(noise[0], rf.source_noise(a, 0.5, seed=1)[0])  # the run's seed moves it
    shared = rf.source_noise(batch, 0.5, shared=True)  # a video's frames: one draw for all
    assert torch.equal(shared[0], shared[2]) and torch.equal(shared[0], rf.source_noise(c, 0.5, shared=True)[0])


def _fine_share(x: torch.Tensor, period: float) -> float:
    """Share of x's power at spatial frequencies finer than `period` pixels."""
    h, w = x.shape[-2:]
    power = torch.fft.fft2(x.double()).abs() ** 2
    fine = torch.hypot(torch.fft.fftfreq(h).view(-1, 1), torch.fft.fftfreq(w).view(1, -1)) > 1 / period
    return float(power[..., fine].sum() / power.sum())


def test_lowpass_source_noise_keeps_only_variation_coarser_than_its_period():
    eps = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    coarse = rf.lowpass(eps, 5)
    assert float(coarse.std()) == pytest.approx(1.0, rel=0.05)  # σ still means the noise's std
    assert _fine_share(eps, 5) > 0.8 and _fine_share(coarse, 5) < 1e-9
    assert rf.lowpass(eps, None) is eps
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    assert torch.equal(rf.source_noise(x, 0.5, lowpass_period=5), 0.5 * rf.lowpass(rf.source_noise(x, 1.0), 5))
    shared = rf.source_noise(x, 0.5, shared=True, lowpass_period=5)
    assert torch.equal(shared[0], shared[1])
    with pytest.raises(ConfigError, match="source_noise_lowpass"):
        load_config(TINY, overrides={"velocity": {"source_noise": 0.5, "source_noise_lowpass": 1}})
    # training draws it the same way: a micro-batch's noisy sources differ from the clean ones by coarse noise
    from rfp_core.nets.autoencoder import Identity
    from rfp_core.train.velocity_step import _pair

    cfg = load_config(TINY, overrides={"velocity": {"source_noise": 0.5, "source_noise_lowpass": 5}})
    clean = torch.rand(32, 3, 32, 32) * 2 - 1
    batch = {"position": list(range(32)), "domain_0": clean, "domain_1": clean}
    run = SimpleNamespace(cfg=cfg, codec=Identity(), device=torch.device("cpu"), couple=None)
    noise = _pair(run, batch)[0] - clean
    assert float(noise.std()) == pytest.approx(0.5, rel=0.1) and _fine_share(noise, 5) < 1e-9


def test_a_run_with_source_noise_trains_and_translates_from_noisy_starts(tmp_path, monkeypatch):
    from rfp_core.inference.translate import Translator

    monkeypatch.setenv("RFP_HOME", str(tmp_path / "home"))
    cfg, d0, d1 = _short(tmp_path, loss="mse", source_noise=0.5)
    run = train_run(cfg, [d0], [d1], run_id="noisy", device="cpu", progress=False)
    tr = Translator.from_run(run, "cpu")
    assert tr.cfg.velocity.source_noise == 0.5
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    start = tr.start(x)
    assert float((start - tr.encode(x)).std()) == pytest.approx(0.5, rel=0.3)  # the noise is there
    # a translation is the same whatever batch the image is in, and deterministic
    assert torch.allclose(tr.translate(x)[1], tr.translate(x[1:2])[0], atol=1e-5)
    assert torch.equal(tr.translate(x), tr.translate(x))
    # without the noise the same net gives other outputs: the start point is what moved
    clean = Translator(cfg.model_copy(deep=True), tr.net, tr.codec, tr.device)
    clean.cfg.velocity.source_noise = 0.0
    assert not torch.allclose(clean.translate(x), tr.translate(x), atol=1e-3)
    coarse = Translator(cfg.model_copy(deep=True), tr.net, tr.codec, tr.device)
    coarse.cfg.velocity.source_noise_lowpass = 4.0  # translation draws the run's band too
    noise = coarse.start(x) - coarse.encode(x)
    assert _fine_share(noise, 4.0) < 1e-9 and float(noise.std()) == pytest.approx(0.5, rel=0.3)
    shared = tr.start(x, shared_noise=True) - tr.encode(x)
    assert torch.allclose(shared[0], shared[2], atol=1e-6)
    # a lower noise at translation (velocity.translate_noise, `rfp translate --noise`): the same draw, scaled
    cooler = Translator.from_run(run, "cpu").set_translate_noise(0.2)
    assert torch.allclose(cooler.start(x) - cooler.encode(x), (start - tr.encode(x)) * 0.4, atol=1e-5)
    assert torch.allclose(Translator.from_run(run, "cpu").set_translate_noise(0.0).translate(x), clean.translate(x))
    with pytest.raises(ConfigError, match=">= 0"):
        cooler.set_translate_noise(-0.1)
