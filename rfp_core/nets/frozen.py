"""A frozen copy of the saliency net's h(x), built for the saliency-weighted loss.

The loss needs u = J e (forward mode) and g = J^T u (reverse mode) of a frozen ResNet h. Stock
autograd does more work than that needs, so this module states the ResNet's linearisation
directly (same function, same Jacobian, to float rounding):
- eval-mode BatchNorm is a per-channel affine map: it is folded into the conv before it;
- `jvp(x, e)` carries the primal and the tangent through the net together, each conv run ONCE
  on the two stacked along the batch (the tangent is the same conv without bias; ReLU and
  max-pool reuse the primal's mask / argmax). One weight pass instead of two is most of the win
  on small images, where a conv costs its weight traffic more than its arithmetic;
- only the primal path is recorded for autograd, and a conv's backward computes the gradient
  w.r.t. its input only (the weights are constants), so J^T u is one lean reverse pass;
- on tiny feature maps (3x3 convs on 1x1 maps deep in the net for 32 px images) kernel taps
  that only ever see zero padding are dropped: same result, a ninth of the weight traffic.
Stock forward-mode AD instead runs a separate tangent conv per layer plus a wasted conv of the
input with the (zero) weight tangent.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

Tensor = torch.Tensor


class _PairConv(torch.autograd.Function):
    """(primal, tangent) -> (conv(primal) + bias, conv(tangent)), one conv call; grads for primal only."""

    @staticmethod
    def forward(ctx, p, t, weight, bias, stride, padding):
        out = F.conv2d(torch.cat([p, t]), weight, None, stride, padding)
        p_out, t_out = out[: p.shape[0]] + bias.view(1, -1, 1, 1), out[p.shape[0] :]
        ctx.save_for_backward(weight)
        ctx.meta = (p.shape, stride, padding)
        ctx.mark_non_differentiable(t_out)
        return p_out, t_out

    @staticmethod
    def backward(ctx, grad_p, _grad_t):
        (weight,) = ctx.saved_tensors
        shape, stride, padding = ctx.meta
        grad = torch.ops.aten.convolution_backward(
            grad_p,
            grad_p.new_empty(shape),
            weight,
            None,
            stride,
            padding,
            (1, 1),
            False,
            (0, 0),
            1,
            (True, False, False),
        )[0]
        return grad, None, None, None, None, None


def _used_taps(size: int, k: int, stride: int, pad: int) -> tuple[int, int] | None:
    """[lo, hi) of the kernel taps that ever touch a real (non-padding) input pixel, with the
    same zero padding both sides afterwards; None when trimming would not keep the conv exact."""
    out = (size + 2 * pad - k) // stride + 1
    used = [i for i in range(k) if any(0 <= o * stride - pad + i < size for o in range(out))]
    if not used:
        return None
    lo, hi = used[0], used[-1] + 1
    if used != list(range(lo, hi)):
        return None
    new_pad = pad - lo
    if (size + 2 * new_pad - (hi - lo)) // stride + 1 != out or new_pad < 0:
        return None
    return lo, hi


class FoldedConv(nn.Module):
    """conv -> eval BatchNorm folded into one conv with bias; weights are constant buffers."""

    def __init__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d | None):
        super().__init__()
        if conv.groups != 1 or conv.dilation != (1, 1) or isinstance(conv.padding, str):
            raise ValueError("FoldedConv expects a plain ResNet conv (groups=1, dilation=1, numeric padding)")
        w = conv.weight.detach()
        b = conv.bias.detach() if conv.bias is not None else torch.zeros(w.shape[0], dtype=w.dtype, device=w.device)
        if bn is not None:
            scale = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
            w, b = w * scale.view(-1, 1, 1, 1), (b - bn.running_mean) * scale + bn.bias.detach()
        self.register_buffer("weight", w.clone().contiguous())
        self.register_buffer("bias", b.clone())
        self.stride, self.padding = conv.stride, conv.padding
        self._trimmed: dict[tuple, tuple[Tensor, tuple[int, int]]] = {}

    def kernel_for(self, x: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """(weight, padding) for x's spatial size. On tiny feature maps (deep layers of small
        images: a 3x3 conv on 1x1) most taps only ever see zero padding; dropping them keeps the
        conv exact and saves reading 9x the weights - the dominant cost there."""
        key = (x.shape[-2], x.shape[-1], x.device, x.dtype)
        if key not in self._trimmed:
            weight, padding = self.weight.to(x.dtype), self.padding
            taps = [
                _used_taps(n, k, st, pd) for n, k, st, pd in zip(x.shape[-2:], weight.shape[-2:], self.stride, padding)
            ]
            if all(taps) and any(hi - lo < k for (lo, hi), k in zip(taps, weight.shape[-2:])):
                (h0, h1), (w0, w1) = taps
                weight = weight[:, :, h0:h1, w0:w1].contiguous()
                padding = (padding[0] - h0, padding[1] - w0)
            self._trimmed[key] = weight, padding
        return self._trimmed[key]

    def forward(self, x: Tensor) -> Tensor:
        weight, padding = self.kernel_for(x)
        return F.conv2d(x, weight, self.bias.to(x.dtype), self.stride, padding)

    def pair(self, p: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        weight, padding = self.kernel_for(p)
        return _PairConv.apply(p, t, weight, self.bias.to(p.dtype), self.stride, padding)


def _relu_pair(p: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    p = F.relu(p)
    return p, t * (p > 0).to(t.dtype)  # the derivative autograd's ReLU uses: 1 where the output > 0


class FrozenBlock(nn.Module):
    """A torchvision BasicBlock / Bottleneck with its BatchNorms folded."""

    def __init__(self, block: BasicBlock | Bottleneck):
        super().__init__()
        pairs = [(block.conv1, block.bn1), (block.conv2, block.bn2)]
        if isinstance(block, Bottleneck):
            pairs.append((block.conv3, block.bn3))
        self.convs = nn.ModuleList(FoldedConv(c, b) for c, b in pairs)
        self.down = FoldedConv(block.downsample[0], block.downsample[1]) if block.downsample is not None else None

    def forward(self, x: Tensor) -> Tensor:
        out = x
        for i, conv in enumerate(self.convs):
            out = conv(out)
            if i < len(self.convs) - 1:
                out = F.relu(out)
        return F.relu(out + (self.down(x) if self.down is not None else x))

    def pair(self, p: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        op, ot = p, t
        for i, conv in enumerate(self.convs):
            op, ot = conv.pair(op, ot)
            if i < len(self.convs) - 1:
                op, ot = _relu_pair(op, ot)
        sp, st = self.down.pair(p, t) if self.down is not None else (p, t)
        return _relu_pair(op + sp, ot + st)


class FrozenSaliency(nn.Module):
    """h(x) of a `SaliencyNet` (eval mode, frozen), plus `jvp(x, e) -> (h(x), J_h(x) e)`.

    `h(x)` from `jvp` keeps its autograd graph to x (when x requires grad), so
    `torch.autograd.grad(h_x, x, u)` gives J^T u. Take a new copy if the net's weights change.
    """

    def __init__(self, net: nn.Module):
        super().__init__()
        bb = list(net.backbone)  # [stem conv, bn, relu, (maxpool), layer1..layer4]
        self.latent_input = net.latent_input
        self.stem = FoldedConv(bb[0], bb[1])
        self.pool = None if net.latent_input else bb[3]
        self.blocks = nn.ModuleList(FrozenBlock(b) for layer in bb[-4:] for b in layer)
        self.register_buffer("proj_w", net.latent_proj.weight.detach().clone())
        self.register_buffer("proj_b", net.latent_proj.bias.detach().clone())
        # ((x + 1) / 2 - mean) / std folded into one affine map: x * scale + shift
        mean, std = net.imagenet_mean.detach().clone(), net.imagenet_std.detach().clone()
        self.register_buffer("in_scale", 0.5 / std)
        self.register_buffer("in_shift", (0.5 - mean) / std)
        self.requires_grad_(False)
        self.eval()

    def forward(self, x: Tensor) -> Tensor:
        if not self.latent_input:
            x = x * self.in_scale.to(x.dtype) + self.in_shift.to(x.dtype)
        x = F.relu(self.stem(x))
        if self.pool is not None:
            x = self.pool(x)
        for block in self.blocks:
            x = block(x)
        return F.linear(x.mean(dim=(2, 3)), self.proj_w.to(x.dtype), self.proj_b.to(x.dtype))

    def jvp(self, x: Tensor, e: Tensor) -> tuple[Tensor, Tensor]:
        p, t = x, e
        if not self.latent_input:
            scale = self.in_scale.to(x.dtype)
            p, t = p * scale + self.in_shift.to(x.dtype), t * scale
        p, t = _relu_pair(*self.stem.pair(p, t))
        if self.pool is not None:
            pool = self.pool
            p, idx = F.max_pool2d(p, pool.kernel_size, pool.stride, pool.padding, return_indices=True)
            t = t.flatten(2).gather(2, idx.flatten(2)).view_as(p)
        for block in self.blocks:
            p, t = block.pair(p, t)
        w, b = self.proj_w.to(p.dtype), self.proj_b.to(p.dtype)
        return F.linear(p.mean(dim=(2, 3)), w, b), F.linear(t.mean(dim=(2, 3)), w)
