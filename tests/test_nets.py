import json

import pytest
import torch
import torchvision
from torch import nn

from rfp_core.config import ConfigError, SaliencyNetConfig, UNetConfig
from rfp_core.config_files import config_from_dict
from rfp_core.nets.dit import DiT
from rfp_core.nets.layers import ResBlock, SelfAttention, auto_groups, normalization
from rfp_core.nets.saliency import PretrainedWeightsMissing, SaliencyNet, pretrained_weights_file
from rfp_core.nets.unet import UNet

TINY_UNET = dict(
    model_channels=16,
    ch_mult=[1, 2],
    num_res_blocks=1,
    num_attention_heads=2,
    normalization="GroupNormAuto",
    zero_out=True,
)


def _sal(backbone="resnet18", **kw) -> SaliencyNetConfig:
    return SaliencyNetConfig(backbone=backbone, pretrained=False, latent_channels=kw.pop("latent_channels", 32), **kw)


# ---------------------------------------------------------------------------- saliency


@pytest.mark.parametrize("backbone,features", [("resnet18", 512), ("resnet50", 2048)])
def test_saliency_shapes(backbone, features):
    net = SaliencyNet(_sal(backbone)).eval()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert net.latent_proj.in_features == features
    assert net.h(x).shape == (2, 32) and net(x).shape == (2, 2)
    # logits are the classifier applied to h
    torch.testing.assert_close(net(x), net.classifier(net.h(x)))


def test_pixel_input_gets_imagenet_normalisation():
    net = SaliencyNet(_sal()).eval()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    expected = net.latent_proj(net.backbone(((x + 1) / 2 - mean) / std).mean(dim=(2, 3)))
    torch.testing.assert_close(net.h(x), expected)


def test_latent_stem():
    net = SaliencyNet(_sal(), in_channels=4).eval()
    stem = net.backbone[0]
    assert (stem.in_channels, stem.kernel_size, stem.stride) == (4, (3, 3), (1, 1)) and stem.bias is not None
    assert not any(isinstance(m, nn.MaxPool2d) for m in net.backbone)  # no max-pool on latents
    z = torch.randn(2, 4, 8, 8)
    assert net.h(z).shape == (2, 32)
    # no ImageNet normalisation on latents: h is the backbone straight on z
    torch.testing.assert_close(net.h(z), net.latent_proj(net.backbone(z).mean(dim=(2, 3))))


def test_parameter_groups_and_backbone_freezing():
    net = SaliencyNet(_sal())
    heads, backbone = list(net.head_parameters()), list(net.backbone_parameters())
    assert len(heads) == 4 and len(heads) + len(backbone) == len(list(net.parameters()))
    net.set_backbone_trainable(False)
    assert not any(p.requires_grad for p in net.backbone_parameters())
    assert all(p.requires_grad for p in net.head_parameters())
    net.set_backbone_trainable(True)
    assert all(p.requires_grad for p in net.parameters())


def test_missing_pretrained_weights_names_the_file_and_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    expected = tmp_path / "torch" / "hub" / "checkpoints" / "resnet50-11ad3fa6.pth"
    assert pretrained_weights_file("resnet50")[0] == expected
    with pytest.raises(PretrainedWeightsMissing) as err:
        SaliencyNet(SaliencyNetConfig(backbone="resnet50", pretrained=True))
    assert isinstance(err.value, ConfigError)
    msg = str(err.value)
    assert str(expected) in msg and '"pretrained": false' in msg and "download.pytorch.org" in msg
    # an explicit path that is missing is named too
    with pytest.raises(PretrainedWeightsMissing, match="my_weights.pth"):
        SaliencyNet(
            SaliencyNetConfig(backbone="resnet18", pretrained=True, pretrained_path=tmp_path / "my_weights.pth")
        )


def test_pretrained_weights_load_from_the_torch_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    path, _ = pretrained_weights_file("resnet18")
    path.parent.mkdir(parents=True)
    donor = torchvision.models.resnet18(weights=None)
    torch.save(donor.state_dict(), path)  # stands in for the ImageNet file, same name and layout
    net = SaliencyNet(SaliencyNetConfig(backbone="resnet18", pretrained=True, latent_channels=8))
    assert torch.equal(net.backbone[6][0].conv1.weight, donor.layer3[0].conv1.weight)  # backbone.6 = layer3
    assert torch.equal(net.backbone[1].running_var, donor.bn1.running_var)
    # latent input keeps the pretrained body but not the (replaced) RGB stem
    lat = SaliencyNet(
        SaliencyNetConfig(backbone="resnet18", pretrained=True, latent_channels=8, pretrained_path=path), in_channels=4
    )
    assert torch.equal(lat.backbone[3][0].conv2.weight, donor.layer1[0].conv2.weight)  # no max-pool: layer1 is 3
    assert lat.backbone[0].weight.shape == (64, 4, 3, 3)


def _trained_looking_bn(net: nn.Module) -> nn.Module:
    with torch.no_grad():  # non-trivial BN statistics so folding them is really tested
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.2), m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5), m.bias.normal_(0, 0.2)
    return net


@pytest.mark.parametrize(
    "backbone,in_channels,latent", [("resnet18", 3, False), ("resnet50", 3, False), ("resnet18", 4, True)]
)
def test_frozen_h_is_the_same_function_with_the_same_jacobian(backbone, in_channels, latent):
    torch.manual_seed(0)
    net = _trained_looking_bn(SaliencyNet(_sal(backbone), in_channels=in_channels).double())
    net.train()
    frozen = net.frozen_h()
    assert net.training  # the original is left as it was
    assert not any(isinstance(m, nn.BatchNorm2d) for m in frozen.modules())
    assert not any(p.requires_grad for p in frozen.parameters())
    size = 8 if latent else 32
    x = torch.rand(2, in_channels, size, size, dtype=torch.float64) * 2 - 1
    e = torch.randn_like(x)
    net.eval()
    torch.testing.assert_close(frozen(x), net.h(x), rtol=1e-10, atol=1e-12)
    # jvp: h(x) and J e in one batched pass, equal to torch.func's forward-mode AD on the real net
    ref_y, ref_u = torch.func.jvp(net.h, (x,), (e,))
    xr = x.clone().requires_grad_()
    y, u = frozen.jvp(xr, e)
    torch.testing.assert_close(y, ref_y, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(u, ref_u, rtol=1e-10, atol=1e-12)
    assert not u.requires_grad
    # and h(x) from jvp carries the graph for J^T w: same as autograd through the real net
    w = torch.randn_like(y)
    (g,) = torch.autograd.grad(y, xr, w)
    xr2 = x.clone().requires_grad_()
    (ref_g,) = torch.autograd.grad(net.h(xr2), xr2, w)
    torch.testing.assert_close(g, ref_g, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------- UNet


@pytest.mark.parametrize("in_channels,h,w", [(3, 16, 16), (4, 8, 24)])
def test_unet_shapes(in_channels, h, w):
    net = UNet(UNetConfig(**TINY_UNET), in_channels=in_channels)
    x = torch.randn(2, in_channels, h, w)
    assert net(x, torch.rand(2)).shape == x.shape


def test_unet_rejects_sides_not_divisible_by_the_downsampling():
    net = UNet(UNetConfig(model_channels=8, ch_mult=[1, 2, 2], num_res_blocks=1, normalization="GroupNormAuto"))
    with pytest.raises(ValueError, match=r"divisible by 4"):
        net(torch.randn(1, 3, 18, 16), torch.rand(1))


def test_zero_out_gives_zero_velocity_at_init():
    net = UNet(UNetConfig(**TINY_UNET))
    out = net(torch.randn(2, 3, 16, 16), torch.rand(2))
    assert torch.count_nonzero(out) == 0
    # and it is still trainable: the output conv gets a gradient
    (net(torch.randn(2, 3, 16, 16), torch.rand(2)) - 1).pow(2).mean().backward()
    assert net.output_block[3].weight.grad.abs().sum() > 0
    # off by default, as in the original
    assert torch.count_nonzero(
        UNet(UNetConfig(**{**TINY_UNET, "zero_out": False}))(torch.randn(1, 3, 16, 16), torch.rand(1))
    )


def test_time_conditioning_changes_the_output():
    torch.manual_seed(0)
    net = UNet(UNetConfig(**{**TINY_UNET, "zero_out": False})).eval()
    x = torch.randn(1, 3, 16, 16).expand(2, -1, -1, -1)
    out = net(x, torch.tensor([0.1, 0.9]))
    assert (out[0] - out[1]).abs().max() > 1e-4
    # conditioning enters as FiLM on the norm between the convs: zeroing those layers removes it
    for m in net.modules():
        if isinstance(m, ResBlock) and m.time_dim:
            nn.init.zeros_(m.time_proj[1].weight), nn.init.zeros_(m.time_proj[1].bias)
    out = net(x, torch.tensor([0.1, 0.9]))
    torch.testing.assert_close(out[0], out[1])


def test_attention_at_listed_levels():
    torch.manual_seed(0)
    cfg = UNetConfig(**{**TINY_UNET, "ch_mult": [1, 2, 2], "zero_out": False}, attention_resolutions=[1])
    net = UNet(cfg)
    attn = [m for m in net.modules() if isinstance(m, SelfAttention)]
    # level 1 (32 channels): one after its encoder stack, one after its decoder stack
    assert len(attn) == 2 and all(a.q_proj.in_channels == 32 for a in attn)
    for a in attn:  # the output projection starts at zero (identity); give it weights to test it
        nn.init.normal_(a.out_proj.weight, std=0.1)
    x, t = torch.randn(2, 3, 16, 16), torch.rand(2)
    out = net(x, t)
    out.pow(2).mean().backward()
    assert all(a.q_proj.weight.grad.abs().sum() > 0 for a in attn)
    with torch.no_grad():
        for a in attn:
            a.out_proj.weight.zero_(), a.out_proj.bias.zero_()
        assert (out - net(x, t)).abs().max() > 1e-5
    with pytest.raises(ValueError, match="3 heads"):
        UNet(UNetConfig(**{**TINY_UNET, "num_attention_heads": 3}, attention_resolutions=[1]))
    with pytest.raises(ValueError, match="level indices"):
        UNetConfig(**TINY_UNET, attention_resolutions=[2])  # only levels 0 and 1 exist


def test_zero_res_blocks_makes_res_blocks_identity_at_init():
    block = ResBlock(16, 16, "GroupNormAuto", "SiLU", zero_out=True, time_dim=32)
    x = torch.randn(2, 16, 8, 8)
    torch.testing.assert_close(block(x, torch.randn(2, 32)), x)


def test_normalizations():
    # GroupNormAuto: GroupNorm32 where possible, never instance norm on narrow layers
    assert auto_groups(128) == 32 and auto_groups(256) == 32
    assert auto_groups(32) == 8 and auto_groups(16) == 4 and auto_groups(48) == 12 and auto_groups(3) == 1
    # the original's names mean what they meant there
    assert normalization("GroupNorm32", 64).num_groups == 32 and normalization("GroupNorm16", 64).num_groups == 16
    assert isinstance(normalization("BatchNorm2d", 8), nn.BatchNorm2d) and isinstance(
        normalization("None", 8), nn.Identity
    )
    with pytest.raises(ValueError, match="GroupNormAuto"):
        normalization("GroupNorm32", 16)


@pytest.mark.parametrize("patch,in_channels", [(2, 3), (1, 4)])
def test_dit_shapes_and_zero_init(patch, in_channels):
    from rfp_core.config import DiTConfig

    net = DiT(DiTConfig(patch_size=patch, hidden_size=32, depth=2, num_heads=4), in_channels=in_channels)
    x = torch.randn(2, in_channels, 8, 8)
    out = net(x, torch.rand(2))
    assert out.shape == x.shape and torch.count_nonzero(out) == 0  # adaLN-Zero: v = 0 at init
    out.sum().backward()  # but trainable: the final projection gets a gradient
    (net(x, torch.rand(2)) - 1).pow(2).mean().backward()
    assert net.final_layer.linear.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="multiple of patch_size"):
        DiT(DiTConfig(patch_size=4, hidden_size=32, depth=1, num_heads=4))(torch.randn(1, 3, 6, 6), torch.rand(1))


def test_original_flat_config_builds_both_nets(tmp_path):
    raw = {
        "type": "RFPix2pixModel",
        "max_size": 32,
        "velocity_net": {
            "type": "UNet",
            "model_channels": 16,
            "ch_mult": [1, 2],
            "normalization": "GroupNorm16",
            "activation": "SiLU",
            "num_res_blocks": 1,
            "zero_res_blocks": False,
            "attention_resolutions": [1],
            "num_attention_heads": 4,
        },
        "saliency_net": {
            "type": "ResNetSaliencyNet",
            "backbone": "resnet18",
            "num_classes": 2,
            "pretrained": False,
            "latent_channels": 16,
        },
    }
    cfg = config_from_dict(json.loads(json.dumps(raw)))
    unet, sal = UNet(cfg.velocity.net), SaliencyNet(cfg.saliency.net).eval()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert unet(x, torch.rand(2)).shape == x.shape and sal(x).shape == (2, 2)
