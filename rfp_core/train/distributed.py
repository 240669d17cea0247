"""Data-parallel training over torch.distributed (started by torchrun; `rfp train --nproc-per-node N`).

One process per device. torchrun sets RANK, WORLD_SIZE, LOCAL_RANK and MASTER_ADDR/PORT; without
them a phase trains in one process as before and every helper here does nothing.

Why results match at any world size: the global batch of step s is the sample positions
[s*B, (s+1)*B) of the step-indexed data order (`resume.StepSampler`'s permutations), and rank r
trains a contiguous slice of it, in micro-batches (the rest of its share by accumulation). Every
per-sample random draw (crop, domain-1 pick, augmentation, timestep, noise) is seeded by the
sample's position, never by the rank, and each rank weighs its loss by its share of the batch, so
DDP's gradient mean is the mean over the global batch. What stays rank-dependent: dropout masks
inside a net (seeded per step and rank).
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Dataset, Sampler

from rfp_core.config import ConfigError
from rfp_core.train.resume import epoch_order

# a rank waits this long at a collective (rank 0 training the codec alone, writing a checkpoint)
TIMEOUT = timedelta(hours=2)
_MASK = (1 << 63) - 1


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0 writes checkpoints, samples, metrics and tracking."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        """In-place sum over ranks (a no-op in one process)."""
        if self.distributed:
            dist.all_reduce(t)
        return t

    def from_main(self, fn: Callable[[], Any]) -> Any:
        """fn() on rank 0 only (it may move files aside); every rank gets its (picklable) result,
        or rank 0's exception raised again, so no rank waits on a collective rank 0 never reaches."""
        if not self.distributed:
            return fn()
        payload: list[Any] = [None]
        if self.main:
            try:
                payload = [("ok", fn())]
            except Exception as exc:  # handed to the others, then raised here too
                payload = [("error", exc)]
        dist.broadcast_object_list(payload, src=0)
        kind, value = payload[0]
        if kind == "error":
            raise value
        return value

    def wrap(self, model: nn.Module, device: torch.device) -> nn.Module:
        """DDP around `model` (its parameters stay `model`'s: EMA and checkpoints use `model`)."""
        if not self.distributed:
            return model
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def world() -> World:
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    return World()


def init(device: str | torch.device) -> tuple[World, torch.device]:
    """Join the process group torchrun describes (once; NCCL on CUDA, gloo on CPU) and return
    the world and this rank's device (cuda:LOCAL_RANK on CUDA)."""
    device = torch.device(device)
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return world(), device
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=TIMEOUT)
    return world(), device


def no_sync(model: nn.Module, last: bool):
    """DDP's gradient all-reduce only on a step's last micro-batch."""
    return nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()


# --- which samples a rank trains on -------------------------------------------------------------
def shard(n: int, w: World, what: str = "train_batch_size") -> tuple[int, int]:
    """(offset, count) of this rank's slice of n items: the first n % size ranks take one more."""
    if n < w.size:
        raise ConfigError(f"{what} {n} is smaller than the {w.size} ranks: every rank needs a sample per step; "
                          f"raise {what} to at least {w.size} or start fewer processes (--nproc-per-node)")
    base, extra = divmod(n, w.size)
    return w.rank * base + min(w.rank, extra), base + (w.rank < extra)


class ShardBatches(Sampler[list[int]]):
    """Endless: per step from `start_step`, this rank's positions of the step's global batch, in
    micro-batches of at most `micro` (the DataLoader's batch_sampler)."""

    def __init__(self, batch: int, micro: int, w: World, start_step: int = 0, what: str = "velocity.train_batch_size"):
        self.batch, self.micro, self.start_step = batch, micro, start_step
        self.offset, self.count = shard(batch, w, what)

    def micro_sizes(self) -> list[int]:
        return [min(self.micro, self.count - i) for i in range(0, self.count, self.micro)]

    def __iter__(self) -> Iterator[list[int]]:
        step = self.start_step
        while True:
            first = step * self.batch + self.offset
            for i in range(0, self.count, self.micro):
                yield list(range(first + i, first + min(i + self.micro, self.count)))
            step += 1


def position_seed(seed: int, position: int, salt: int = 0) -> int:
    return ((seed * 1_000_003 + position) * 1_009 + salt) & _MASK


class Positions(Dataset):
    """Item k = dataset[the k-th index of the step-indexed order], drawn with torch's CPU RNG
    seeded by (seed, k): its crop, domain-1 pick and `transform` do not depend on which rank or
    worker loads it. Items carry their position ("position") for the per-sample draws after."""

    def __init__(self, dataset: Dataset, seed: int, transform: Callable[[dict], dict] | None = None):
        self.dataset, self.seed, self.transform = dataset, seed, transform
        self.n = len(dataset)
        self._epoch: tuple[int, list[int]] = (-1, [])

    def __len__(self) -> int:
        return self.n

    def index(self, k: int) -> int:
        epoch, offset = divmod(k, self.n)
        if self._epoch[0] != epoch:
            self._epoch = (epoch, epoch_order(self.n, self.seed, epoch))
        return self._epoch[1][offset]

    def __getitem__(self, k: int) -> dict:
        with torch.random.fork_rng(devices=[]):
            torch.random.default_generator.manual_seed(position_seed(self.seed, k))
            item = dict(self.dataset[self.index(k)])
            if self.transform is not None:
                item = self.transform(item)
        item["position"] = k
        return item


def per_sample(draw: Callable[[torch.Generator], torch.Tensor], seed: int, positions, salt: int) -> torch.Tensor:
    """torch.cat of draw(generator seeded by (seed, position, salt)) over the batch's positions."""
    return torch.cat([draw(torch.Generator().manual_seed(position_seed(seed, int(k), salt))) for k in positions])


def seed_step(seed: int, step: int, w: World) -> None:
    """The global RNG (dropout inside the nets) per step and rank: resume-exact at the same world size."""
    torch.manual_seed(position_seed(seed, step, 7_919 + w.rank))


# --- BatchNorm over the global batch --------------------------------------------------------------
class _SumOverRanks(torch.autograd.Function):
    """Differentiable all-reduce (sum): d(sum)/d(local) = 1 on every rank, so the gradient is
    the sum of all ranks' upstream gradients."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        out = x.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are those of the global batch (all ranks), on any
    device: torch's SyncBatchNorm only runs on GPUs, this is its CPU (gloo) stand-in."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        c = x.shape[1]
        count = torch.tensor([x.numel() / c], dtype=x.dtype, device=x.device)
        total = _SumOverRanks.apply(torch.cat([x.sum((0, 2, 3)), (x * x).sum((0, 2, 3)), count]))
        n = total[-1]
        mean = total[:c] / n
        var = (total[c:2 * c] / n - mean * mean).clamp_min(0)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.lerp_(mean.detach(), m)
                self.running_var.lerp_(var.detach() * n / (n - 1).clamp_min(1), m)
        y = (x - mean.view(1, c, 1, 1)) * torch.rsqrt(var + self.eps).view(1, c, 1, 1)
        return y * self.weight.view(1, c, 1, 1) + self.bias.view(1, c, 1, 1) if self.affine else y


def sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """BatchNorms over the global batch: torch's SyncBatchNorm on CUDA, GlobalBatchNorm2d else.
    Same parameters and buffers, so checkpoints load into the plain net."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d) and not isinstance(child, GlobalBatchNorm2d):
            new = GlobalBatchNorm2d(child.num_features, child.eps, child.momentum, child.affine,
                                    child.track_running_stats).to(device)
            new.load_state_dict(child.state_dict())
            new.train(child.training)
            for p_new, p_old in zip(new.parameters(), child.parameters()):
                p_new.requires_grad_(p_old.requires_grad)
            setattr(module, name, new)
        else:
            sync_batchnorm(child, device)
    return module
