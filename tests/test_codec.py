"""Phase 0 codec: the VAE / SAE contracts, the listed losses, training, and a latent-space run end to end."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from disc_data import make_discs

from rfp_core.config import AutoEncoderConfig, ConfigError, IdentityNetConfig
from rfp_core.config_files import config_from_dict
from rfp_core.media.frame_store import FrameStore
from rfp_core.media.ingest import ingest
from rfp_core.nets.autoencoder import SAE, VAE, Identity, build_codec
from rfp_core.train.codec import structure_loss, train_codec
from rfp_core.train.codec_io import load_codec

TINY_VAE = {
    "type": "VAE",
    "latent_channels": 4,
    "model_channels": 8,
    "ch_mult": [1, 2],
    "normalization": "GroupNormAuto",
    "num_res_blocks": 1,
}
LOSSES = [
    {"type": "L1Loss", "id": "recon"},
    {"type": "StructureLoss", "weight": 0.1},
    {"type": "KLLoss", "weight": 1e-6},
]
TINY_CODEC = {
    "net": TINY_VAE,
    "losses": LOSSES,
    "learning_rate": 3e-3,
    "train_batch_size": 16,
    "lr_schedule": "constant",
}


def _cfg(**over):
    base = {
        "max_size": 16,
        "seed": 0,
        "codec": {**TINY_CODEC, "train_images": 16 * 80},
    }
    for key, value in over.items():
        base[key] = {**base.get(key, {}), **value} if isinstance(value, dict) else value
    return config_from_dict(base)


def _manifest(tmp_path, n=16, size=16):
    d0, d1 = make_discs(tmp_path / "data", n=n, size=size)
    store = FrameStore(max_side=64)
    return ingest([d0], [d1], tmp_path / "manifest.parquet", store, progress=False).manifest_path, store, (d0, d1)


def test_vae_contract():
    torch.manual_seed(0)
    vae = build_codec(AutoEncoderConfig(**TINY_VAE))
    assert isinstance(vae, VAE) and not vae.is_identity and vae.downsample == 2 and vae.latent_channels == 4
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    vae.eval()
    z = vae.encode(x)
    assert z.shape == (3, 4, 8, 8) and vae.decode(z).shape == x.shape
    assert torch.equal(vae.encode(x), z)  # eval: the mean, what later phases see
    params = vae.encode_params(x)
    assert torch.equal(params["mu"], z) and params["logvar"].shape == z.shape
    vae.train()
    assert not torch.equal(vae.encode(x), z)  # training: a posterior sample
    with pytest.raises(ValueError, match="multiple of 2"):
        vae.encode(torch.zeros(1, 3, 15, 15))
    ident = build_codec(IdentityNetConfig())
    assert isinstance(ident, Identity) and ident.is_identity and torch.equal(ident.decode(ident.encode(x)), x)


def test_sae_codes_live_on_the_sphere():
    torch.manual_seed(0)
    sae = build_codec(AutoEncoderConfig(**{**TINY_VAE, "type": "SAE"})).eval()
    assert isinstance(sae, SAE)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    z = sae.encode(x)
    torch.testing.assert_close(z.square().mean(dim=(1, 2, 3)), torch.ones(2), atol=1e-5, rtol=0)
    noise = sae.sample_random_latent((2, 4, 8, 8), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(noise.square().mean(dim=(1, 2, 3)), torch.ones(2), atol=1e-5, rtol=0)
    # decode spherifies: scaling a code does not change the image
    torch.testing.assert_close(sae.decode(3 * z), sae.decode(z), atol=1e-5, rtol=0)
    sae.train()
    params = sae.encode_params(x)
    assert not torch.equal(params["z"], params["v_clean"]) and not torch.equal(params["v_noisy_big"], params["v_clean"])


def test_losses_the_codec_cannot_feed_or_whose_weights_are_missing_stop_before_training(tmp_path, monkeypatch):
    from rfp_core.config import CodecLossConfig
    from rfp_core.train.codec_losses import check_losses

    with pytest.raises(ConfigError, match="KLLoss .* needs a VAE"):
        check_losses([CodecLossConfig(type="KLLoss")], "AutoEncoder")
    with pytest.raises(ConfigError, match="needs an SAE"):
        check_losses([CodecLossConfig(type="SAELatentConsistencyLoss")], "VAE")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(ConfigError) as err:
        check_losses([CodecLossConfig(type="LPIPSLoss")], "VAE")
    assert "vgg16-397923af.pth" in str(err.value) and "drop the LPIPS loss" in str(err.value)
    # ids and weights take the original's defaults
    kl = CodecLossConfig(type="KLLoss")
    assert (kl.id, kl.weight) == ("kl_loss", 1e-6)


def test_structure_loss_is_zero_only_for_equal_images_and_punishes_blur():
    torch.manual_seed(0)
    # 8-pixel blocks of +-0.5: flat regions with sharp edges between them
    x = F.interpolate((torch.rand(2, 3, 4, 4) > 0.5).float() - 0.5, scale_factor=8, mode="nearest")
    assert structure_loss(x, x).item() == pytest.approx(0.0, abs=1e-6)
    blurred = F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)
    shifted = x + 0.3
    # L1 prefers the blur (smaller error); the structure term prefers the shift (edges intact)
    assert (shifted - x).abs().mean() > 3 * (blurred - x).abs().mean()
    assert structure_loss(blurred, x) > 3 * structure_loss(shifted, x)
    y = blurred.clone().requires_grad_(True)
    structure_loss(y, x).backward()
    assert y.grad.abs().sum() > 0


def test_vae_trains_and_reports_reconstruction(tmp_path):
    manifest, store, _ = _manifest(tmp_path)
    logged = []
    result = train_codec(
        _cfg(), manifest, tmp_path / "run", store=store, log=lambda m, s: logged.append((s, m)), progress=False
    )
    assert result.checkpoint == tmp_path / "run" / "codec.pt" and result.checkpoint.exists()
    assert result.steps == 80
    assert result.recon_l1 < 0.6 * result.recon_l1_init, (result.recon_l1, result.recon_l1_init)
    assert logged[-1][1]["codec/recon_l1"] == pytest.approx(result.recon_l1)
    assert {"codec/recon", "codec/structure_loss", "codec/kl_loss", "codec/loss"} <= set(logged[0][1])  # by id

    codec = load_codec(None, result.checkpoint)
    assert isinstance(codec, VAE) and not any(p.requires_grad for p in codec.parameters())
    from rfp_core.checkpoint import load_checkpoint

    ckpt = load_checkpoint(result.checkpoint, map_location="cpu")
    assert set(ckpt) >= {"codec", "config"} and ckpt["config"]["codec"]["net"]["type"] == "VAE"
    # the same config again: the finished checkpoint is reused, not retrained
    again = train_codec(_cfg(), manifest, tmp_path / "run", store=store, progress=False)
    assert (
        again.recon_l1 == result.recon_l1
        and again.checkpoint.stat().st_mtime_ns == result.checkpoint.stat().st_mtime_ns
    )


def test_identity_codec_checkpoint(tmp_path):
    manifest, store, _ = _manifest(tmp_path, n=4)
    result = train_codec(config_from_dict({"max_size": 16}), manifest, tmp_path / "run", store=store, progress=False)
    assert result.steps == 0 and result.recon_l1 == 0.0 and result.checkpoint.exists()
    assert isinstance(load_codec(None, result.checkpoint), Identity)
    with pytest.raises(ValueError, match="multiple of the codec"):
        train_codec(_cfg(max_size=17), manifest, tmp_path / "odd", store=store, progress=False)


def test_vae_codec_run_end_to_end(tmp_path):
    """Codec -> latent-space saliency -> latent-space velocity -> `rfp translate` decodes the outputs."""
    from pathlib import Path

    from PIL import Image

    from rfp_core.cli import main
    from rfp_core.config_files import load_config
    from rfp_core.inference.translate import Translator
    from rfp_core.train.saliency import load_saliency, train_saliency
    from rfp_core.train.velocity import train_velocity

    tiny = Path(__file__).resolve().parents[1] / "configs" / "tiny.json"
    cfg = load_config(
        tiny,
        overrides={
            "max_size": 16,
            "codec": {**TINY_CODEC, "train_images": 16 * 40},
            "velocity": {"train_images": 16 * 12, "sample_every_images": 16 * 12},
        },
    )
    manifest, store, (d0, _) = _manifest(tmp_path, n=24)
    run = tmp_path / "run"
    codec = train_codec(cfg, manifest, run, store=store, progress=False)
    sal = train_saliency(cfg, manifest, run, store=store, codec_checkpoint=codec.checkpoint, progress=False)
    net = load_saliency(sal.checkpoint)
    assert net.latent_input and net.backbone[0].in_channels == 4 and sal.accuracy >= cfg.saliency.accuracy_threshold
    vel = train_velocity(
        cfg,
        manifest,
        run,
        saliency_checkpoint=sal.checkpoint,
        store=store,
        codec_checkpoint=codec.checkpoint,
        progress=False,
    )
    assert vel.checkpoint.is_file() and torch.isfinite(torch.tensor(vel.final_loss))

    tr = Translator.from_run(run, device="cpu")
    assert not tr.codec.is_identity and tr.codec.downsample == 2
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    assert tr.encode(x).shape == (2, 4, 8, 8)  # the flow runs on 4 x 8 x 8 latents
    out = tmp_path / "translated"
    assert main(["translate", "--run", str(run), str(d0), "--out", str(out), "--device", "cpu"]) == 0
    written = sorted(out.glob("*.png"))
    assert len(written) == 24 and Image.open(written[0]).size == (16, 16)
