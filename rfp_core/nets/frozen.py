"""A frozen, loss-ready copy of a conv net: the same function, cheaper Jacobian products.

The saliency-weighted loss needs J e (forward mode) and J^T u (reverse mode) of a frozen h.
Two things make stock PyTorch slower than it needs to be there:
- eval-mode BatchNorm is a per-channel affine map; folding it into the preceding conv removes
  its forward, tangent and backward passes (torch.fx's conv/bn fusion);
- the built-in forward-mode rule of a convolution also convolves the input with the weight's
  tangent, which for a frozen weight is a zero tensor - a whole wasted convolution per layer.
  `FrozenConv2d` states the exact rules of a constant-weight conv instead: tangent = conv(dx, W),
  backward = grad w.r.t. the input only.
"""

from __future__ import annotations

import copy
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx.experimental.optimization import fuse


class _ConstantWeightConv(torch.autograd.Function):
    @staticmethod
    def forward(x, weight, bias, stride, padding, dilation, groups):
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, _, *args = inputs
        ctx.save_for_backward(weight)
        ctx.save_for_forward(weight)
        ctx.args, ctx.x_shape = args, x.shape

    @staticmethod
    def jvp(ctx, dx, *_):
        (weight,) = ctx.saved_tensors
        return F.conv2d(dx, weight, None, *ctx.args)

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.args
        grad_x = torch.ops.aten.convolution_backward(
            grad, grad.new_empty(ctx.x_shape), weight, None, stride, padding, dilation,
            False, [0, 0], groups, [True, False, False],
        )[0]
        return grad_x, None, None, None, None, None, None


class FrozenConv2d(nn.Module):
    """A Conv2d whose weight is a constant buffer (never trained, never gets a gradient)."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError("FrozenConv2d supports numeric zero padding only")
        self.register_buffer("weight", conv.weight.detach().clone())
        self.register_buffer("bias", None if conv.bias is None else conv.bias.detach().clone())
        self.args = (conv.stride, conv.padding, conv.dilation, conv.groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _ConstantWeightConv.apply(x, self.weight, self.bias, *self.args)


class _Call(nn.Module):
    """Wrap `fn(x)` of a module (e.g. `net.h`) as a module's forward, so torch.fx can trace it."""

    def __init__(self, module: nn.Module, method: str):
        super().__init__()
        self.module, self.method = module, method

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return getattr(self.module, self.method)(x)


def _swap_convs(module: nn.Module) -> None:
    for name, child in module.named_children():
        if isinstance(child, nn.Conv2d):
            setattr(module, name, FrozenConv2d(child))
        else:
            _swap_convs(child)


def freeze_for_loss(module: nn.Module, method: str = "forward") -> Callable[[torch.Tensor], torch.Tensor]:
    """An eval-mode copy of `module.<method>` with BN folded into convs and constant-weight convs.

    Computes the same function (to float rounding); `module` itself is left untouched. Take a
    new copy whenever the original's weights change.
    """
    was_training = module.training
    module.eval()
    try:
        frozen = fuse(_Call(copy.deepcopy(module), method), inplace=True)
    finally:
        module.train(was_training)
    _swap_convs(frozen)
    frozen.requires_grad_(False)
    return frozen.eval()
