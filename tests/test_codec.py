"""Phase 0 codec: the VAE's contract, its structure loss, training, and a latent-space run end to end."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from disc_data import make_discs

from rfp_core.config import CodecNetConfig, config_from_dict
from rfp_core.frame_store import FrameStore
from rfp_core.ingest import ingest
from rfp_core.nets.codec import VAE, IdentityCodec, build_codec
from rfp_core.train.codec import load_codec, structure_loss, train_codec

TINY_VAE = {"type": "VAE", "latent_channels": 4, "model_channels": 8, "ch_mult": [1, 2]}


def _cfg(**over):
    base = {
        "max_size": 16, "seed": 0,
        "codec": {"net": TINY_VAE, "learning_rate": 3e-3, "train_images": 16 * 80, "batch_size": 16},
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
    vae = build_codec(CodecNetConfig(**TINY_VAE))
    assert isinstance(vae, VAE) and not vae.is_identity and vae.downsample == 2 and vae.latent_channels == 4
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    z = vae.encode(x)
    assert z.shape == (3, 4, 8, 8) and vae.decode(z).shape == x.shape
    assert torch.equal(vae.encode(x), z)  # the mean: deterministic, what later phases see
    assert not torch.equal(vae.encode(x, sample=True), z)
    mean, logvar = vae.encode_dist(x)
    assert mean.shape == logvar.shape == (3, 4, 8, 8)

    # standardisation: fitted latents are ~N(0, 1) per channel and decode() undoes it exactly
    raw = mean.detach()
    before = vae.decode_raw(raw)
    vae.fit_latent_stats(raw)
    zs = vae.encode(x)
    assert zs.mean(dim=(0, 2, 3)).abs().max() < 1e-5
    torch.testing.assert_close(zs.std(dim=(0, 2, 3)), torch.ones(4), atol=1e-4, rtol=0)
    torch.testing.assert_close(vae.decode(zs), before, atol=1e-5, rtol=0)
    assert {"latent_shift", "latent_scale"} <= set(vae.state_dict())  # travel with the weights
    with pytest.raises(ValueError, match="multiple of 2"):
        vae.encode(torch.zeros(1, 3, 15, 15))
    ident = build_codec(CodecNetConfig())
    assert isinstance(ident, IdentityCodec) and ident.is_identity and torch.equal(ident.decode(ident.encode(x)), x)


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
    result = train_codec(_cfg(), manifest, tmp_path / "run", store=store, log=lambda m, s: logged.append((s, m)), progress=False)
    assert result.checkpoint == tmp_path / "run" / "codec.pt" and result.checkpoint.exists()
    assert result.steps == 80
    assert result.recon_l1 < 0.6 * result.recon_l1_init, (result.recon_l1, result.recon_l1_init)
    assert logged[-1][1]["codec/recon_l1"] == pytest.approx(result.recon_l1)
    assert {"codec/l1", "codec/perceptual", "codec/kl"} <= set(logged[0][1])

    codec = load_codec(result.checkpoint)
    assert isinstance(codec, VAE) and not any(p.requires_grad for p in codec.parameters())
    from rfp_core.checkpoint import load_checkpoint

    ckpt = load_checkpoint(result.checkpoint, map_location="cpu")
    assert set(ckpt) >= {"codec", "config"} and ckpt["config"]["codec"]["net"]["type"] == "VAE"
    # latents of the data are standardised
    from rfp_core.data import FrameDataset

    x = torch.stack([FrameDataset(manifest, store, d, 16, train_crop=False)[i] for d in (0, 1) for i in range(8)])
    z = codec.encode(x)
    assert 0.5 < z.std().item() < 2.0 and z.mean().abs().item() < 0.5
    # the same config again: the finished checkpoint is reused, not retrained
    again = train_codec(_cfg(), manifest, tmp_path / "run", store=store, progress=False)
    assert again.recon_l1 == result.recon_l1 and again.checkpoint.stat().st_mtime_ns == result.checkpoint.stat().st_mtime_ns


def test_identity_codec_checkpoint(tmp_path):
    manifest, store, _ = _manifest(tmp_path, n=4)
    result = train_codec(config_from_dict({"max_size": 16}), manifest, tmp_path / "run", store=store, progress=False)
    assert result.steps == 0 and result.recon_l1 == 0.0 and result.checkpoint.exists()
    assert isinstance(load_codec(result.checkpoint), IdentityCodec)
    with pytest.raises(ValueError, match="multiple of the codec"):
        train_codec(_cfg(max_size=17), manifest, tmp_path / "odd", store=store, progress=False)


def test_vae_codec_run_end_to_end(tmp_path):
    """Codec -> latent-space saliency -> latent-space velocity -> `rfp translate` decodes the outputs."""
    from pathlib import Path

    from PIL import Image

    from rfp_core.cli import main
    from rfp_core.config import load_config
    from rfp_core.train.saliency import load_saliency, train_saliency
    from rfp_core.train.velocity import train_velocity
    from rfp_core.translate import Translator

    tiny = Path(__file__).resolve().parents[1] / "configs" / "tiny.json"
    cfg = load_config(tiny, overrides={
        "max_size": 16,
        "codec": {"net": TINY_VAE, "learning_rate": 3e-3, "train_images": 16 * 40, "batch_size": 16},
        "velocity": {"train_images": 16 * 12, "sample_every_images": 16 * 12},
    })
    manifest, store, (d0, _) = _manifest(tmp_path, n=24)
    run = tmp_path / "run"
    codec = train_codec(cfg, manifest, run, store=store, progress=False)
    sal = train_saliency(cfg, manifest, run, store=store, codec_checkpoint=codec.checkpoint, progress=False)
    net = load_saliency(sal.checkpoint)
    assert net.latent_input and net.backbone.conv1.in_channels == 4 and sal.accuracy >= cfg.saliency.accuracy_threshold
    vel = train_velocity(cfg, manifest, run, saliency_checkpoint=sal.checkpoint, store=store,
                         codec_checkpoint=codec.checkpoint, progress=False)
    assert vel.checkpoint.is_file() and torch.isfinite(torch.tensor(vel.final_loss))

    tr = Translator.from_run(run, device="cpu")
    assert not tr.codec.is_identity and tr.codec.downsample == 2
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    assert tr.encode(x).shape == (2, 4, 8, 8)  # the flow runs on 4 x 8 x 8 latents
    out = tmp_path / "translated"
    assert main(["translate", "--run", str(run), str(d0), "--out", str(out), "--device", "cpu"]) == 0
    written = sorted(out.glob("*.png"))
    assert len(written) == 24 and Image.open(written[0]).size == (16, 16)
