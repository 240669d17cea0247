"""velocity.translate_retry_noise: outputs the run's own domain classifier still calls the source are
translated again from more noise, each image on its own; the last try stands."""

import pytest
import torch
from disc_data import make_discs
from test_pipeline import TINY, TINY_OVERRIDES
from torch import nn

from rfp_core.checkpoint import load_checkpoint, save_checkpoint
from rfp_core.cli import main
from rfp_core.config import ConfigError
from rfp_core.config_files import load_config
from rfp_core.flow import rf
from rfp_core.inference.translate import Translator
from rfp_core.train.retry_bar import target_confidence
from rfp_core.train.run import train_run
from rfp_pipeline.assets.training.saliency import _skip_reason

RETRY = [0.5, 0.8]


def _config(tmp_path, **velocity):
    """The pipeline tests' tiny settings, plain MSE from a noisy source, and `velocity` on top."""
    vel = {**TINY_OVERRIDES["velocity"], "sample_every_images": 10_000, "loss": "mse", "source_noise": 0.3}
    return load_config(TINY, overrides={**TINY_OVERRIDES, "velocity": {**vel, **velocity}})


class BrightIsTarget(nn.Module):
    """A stand-in domain classifier with a known verdict: an image whose mean is above 0 is domain 1."""

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        score = 200.0 * z.mean(dim=(1, 2, 3))
        return torch.stack([torch.zeros_like(score), score], dim=1)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("retry")
    mp = pytest.MonkeyPatch()
    mp.setenv("RFP_HOME", str(tmp / "home"))
    d0, d1 = make_discs(tmp / "data", n=12, size=16)
    yield train_run(_config(tmp, translate_retry_noise=RETRY), [d0], [d1], run_id="retry", device="cpu", progress=False)
    mp.undo()


def test_a_retry_config_trains_the_domain_classifier_even_with_plain_mse(run):
    assert (run / "saliency.pt").is_file()  # phase 1 ran though velocity.loss is "mse"
    product = load_checkpoint(run / "velocity.pt")
    assert product["saliency_checkpoint"] == str(run / "saliency.pt")
    assert 0.0 < product["retry_bar"] < 1.0  # the classifier's 10% quantile on real target frames
    tr = Translator.from_run(run, "cpu")
    assert tr.critic is not None and tr.cfg.velocity.translate_retry_noise == RETRY
    assert tr.retry_bar == pytest.approx(product["retry_bar"])
    conf = target_confidence(tr.critic, tr.encode(torch.rand(4, 3, 16, 16) * 2 - 1))
    assert conf.shape == (4,) and bool(((conf >= 0) & (conf <= 1)).all())


def test_outputs_the_classifier_rejects_are_translated_again_and_the_last_try_stands(run):
    x = torch.full((3, 3, 16, 16), -0.8)
    x[0] = 0.8  # bright: the stand-in calls its translation the target at once
    x += 0.05 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    tr = Translator.from_run(run, "cpu")
    tr.critic, tr.retry_bar = BrightIsTarget(), 0.5
    once = Translator.from_run(run, "cpu", retry=False)
    assert once.critic is None and once.cfg.velocity.translate_retry_noise == []
    at_base = once.translate(x)
    at_last = Translator.from_run(run, "cpu", retry=False).set_translate_noise(RETRY[-1]).translate(x)
    assert float(at_base[0].mean()) > 0 > float(at_base[1:].mean())
    tr.flow_evaluations = 0
    out = tr.translate(x)
    # image 0 translated once, images 1 and 2 three times (the first σ and both retries)
    steps = rf.nfe(tr.cfg.velocity.sampler, tr.cfg.velocity.num_inference_steps)
    assert tr.flow_evaluations == (1 + 3 + 3) * steps
    assert torch.allclose(out[0], at_base[0], atol=1e-5)  # accepted at the first try: kept
    assert torch.allclose(out[1:], at_last[1:], atol=1e-5)  # rejected at every σ: the last try
    assert not torch.allclose(at_base[1:], at_last[1:], atol=1e-3)  # (so the retry did change them)
    # a video's frames share one draw and one σ: no retry, their texture stays steady
    assert torch.allclose(tr.translate(x, shared_noise=True), once.translate(x, shared_noise=True), atol=1e-5)


def test_a_higher_translation_noise_drops_the_retry_levels_at_or_below_it(run):
    tr = Translator.from_run(run, "cpu").set_translate_noise(0.5)
    assert tr.cfg.velocity.translate_retry_noise == [0.8]


def test_retry_levels_must_rise_and_a_run_without_a_classifier_says_how_to_translate(tmp_path, monkeypatch, capsys):
    with pytest.raises(ConfigError, match="translate_retry_noise"):
        _config(tmp_path, translate_noise=0.4, translate_retry_noise=[0.3])
    with pytest.raises(ConfigError, match="translate_retry_noise"):
        _config(tmp_path, translate_retry_noise=[0.6, 0.5])
    assert _config(tmp_path, translate_retry_noise=[0.5]).needs_saliency
    assert not _config(tmp_path).needs_saliency  # plain MSE without the retry: no phase 1
    # the pipeline's phase-1 asset follows the same rule
    assert _skip_reason(_config(tmp_path, translate_retry_noise=[0.5])) is None
    assert "translate_retry_noise is empty" in _skip_reason(_config(tmp_path))
    monkeypatch.setenv("RFP_HOME", str(tmp_path / "home"))
    d0, d1 = make_discs(tmp_path / "data", n=12, size=16)
    run = train_run(
        _config(tmp_path, translate_retry_noise=[0.5]), [d0], [d1], run_id="r", device="cpu", progress=False
    )
    (run / "saliency.pt").unlink()
    with pytest.raises(ConfigError, match="--no-retry"):
        Translator.from_run(run, "cpu")
    assert Translator.from_run(run, "cpu", retry=False).translate(torch.zeros(1, 3, 16, 16)).shape == (1, 3, 16, 16)
    still = str(next(d0.glob("*.png")))
    assert main(["translate", "--run", str(run), still, "--out", str(tmp_path / "once"), "--no-retry"]) == 0
    assert len(list((tmp_path / "once").glob("*.png"))) == 1
    # a product without the bar (trained before the retry existed, or reflowed) translates at one σ, and says so
    product = load_checkpoint(run / "velocity.pt")
    del product["retry_bar"]
    save_checkpoint(run / "velocity.pt", product)
    tr = Translator.from_run(run, "cpu")
    assert tr.critic is None and tr.cfg.velocity.translate_retry_noise == []
    assert "no retry bar" in capsys.readouterr().err
