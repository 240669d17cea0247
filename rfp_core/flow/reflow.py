"""Reflow couplings: pairs (z0, z1 = ODE(z0)) solved with a trained flow, stored content-addressed.

A rectified flow's ODE turns any coupling into a non-crossing one; training a new velocity on
(z0, ODE(z0)) gives straighter paths (docs/METHOD.md: reflow). The pairs are expensive (an accurate
solve per input) and are a pure function of (velocity weights, inputs, solver), so they live
under `$RFP_HOME/reflow/<digest of those>/`:

    spec.json          what the digest was computed from
    shard_00000.pt     {"index": (n,) int64, "z0": (n, ...), "z1": (n, ...)}, torch.save, atomic
    index.parquet      one row per pair: index, source_key, shard, offset (written last)

Shard k always holds the pairs [k*shard_size, (k+1)*shard_size) computed as one batch, so a rerun
after a kill recomputes only missing (or unreadable) shards and gets bit-identical results on CPU.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm.auto import tqdm

from rfp_core.atomic import atomic_path, atomic_write_text, atomic_write_with
from rfp_core.checkpoint import CheckpointError, load_checkpoint
from rfp_core.flow import rf
from rfp_core.paths import rfp_home

Tensor = torch.Tensor
INDEX_SCHEMA = pa.schema(
    [
        pa.field("index", pa.int64(), nullable=False),
        pa.field("source_key", pa.string(), nullable=False),
        pa.field("shard", pa.string(), nullable=False),
        pa.field("offset", pa.int32(), nullable=False),
    ]
)


def file_digest(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes: the identity of a velocity checkpoint."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclass
class CouplingSource:
    """The z0 side of the couplings: one key per pair and a loader for a batch of them.

    `load(indices)` returns z0 in model (codec) space; it must be a pure function of the indices
    (and, for noise, of the shard it is asked for), so shards can be recomputed independently.
    `digest` names what the inputs are (frame keys + crop, or noise seed + shape)."""

    keys: list[str]
    load: Callable[[list[int], int], Tensor]  # (indices, shard number) -> z0
    digest: str


def noise_source(n: int, shape: Sequence[int], seed: int) -> CouplingSource:
    """Generative mode: z0 ~ N(0, I), drawn per shard from a generator seeded by (seed, shard)."""
    shape = tuple(int(s) for s in shape)

    def load(indices: list[int], shard: int) -> Tensor:
        g = torch.Generator().manual_seed(int(seed) * 1_000_003 + shard)
        return torch.randn(len(indices), *shape, generator=g)

    digest = hashlib.sha256(json.dumps({"noise": list(shape), "n": n, "seed": int(seed)}).encode()).hexdigest()
    return CouplingSource([f"noise:{seed}:{i}" for i in range(n)], load, digest)


def tensor_source(z0: Tensor, name: str = "tensor") -> CouplingSource:
    """Given z0 (toys, tests): the digest is of the tensor's bytes."""
    z0 = z0.detach().cpu().contiguous()
    digest = hashlib.sha256(z0.numpy().tobytes() + str(tuple(z0.shape)).encode()).hexdigest()
    return CouplingSource([f"{name}:{i}" for i in range(len(z0))], lambda idx, _shard: z0[idx], digest)


def frame_source(
    manifest: str | os.PathLike,
    store,
    size: int,
    encode: Callable[[Tensor], Tensor],
    holdout_fraction: float,
    split: str = "train",
    limit: int | None = None,
) -> CouplingSource:
    """Translation mode: the run's domain-0 frames, centred crop (no jitter), encoded by the codec."""
    from rfp_core.media.datasets import FrameDataset

    ds = FrameDataset(manifest, store, 0, size, split=split, holdout_fraction=holdout_fraction, train_crop=False)
    keys = ds.frame_keys if limit is None else ds.frame_keys[: int(limit)]

    def load(indices: list[int], _shard: int) -> Tensor:
        return encode(torch.stack([ds[i] for i in indices])).cpu()

    payload = json.dumps({"frames": keys, "size": int(size), "crop": "centre", "split": split})
    return CouplingSource(list(keys), load, hashlib.sha256(payload.encode()).hexdigest())


@dataclass
class Solver:
    sampler: rf.Sampler = "rk4"
    steps: int = 16

    def as_dict(self) -> dict:
        return {"sampler": self.sampler, "steps": int(self.steps)}


@dataclass
class Couplings:
    """A finished set of couplings on disk; `load()` gives (z0, z1) in index order."""

    root: Path
    index: pa.Table
    computed: int  # shards solved by this call
    reused: int  # shards found on disk

    def __len__(self) -> int:
        return self.index.num_rows

    @property
    def digest(self) -> str:
        return self.root.name

    def load(self) -> tuple[Tensor, Tensor]:
        z0, z1 = [], []
        for shard in dict.fromkeys(self.index.column("shard").to_pylist()):
            state = load_checkpoint(self.root / shard)
            z0.append(state["z0"])
            z1.append(state["z1"])
        return torch.cat(z0), torch.cat(z1)


def couplings_digest(velocity_digest: str, source: CouplingSource, solver: Solver, shard_size: int) -> str:
    payload = {
        "velocity": velocity_digest,
        "inputs": source.digest,
        "solver": solver.as_dict(),
        "shard_size": int(shard_size),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:32]


def _valid_shard(path: Path, n: int) -> bool:
    if not path.is_file():
        return False
    try:
        state = load_checkpoint(path)
    except CheckpointError:
        return False  # truncated by a kill mid-fsync, or damaged: recompute it
    return all(k in state for k in ("index", "z0", "z1")) and len(state["z0"]) == n == len(state["z1"])


def generate_couplings(
    v_fn: rf.VelocityFn,
    source: CouplingSource,
    velocity_digest: str,
    solver: Solver | None = None,
    shard_size: int = 64,
    root: Path | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
    max_new_shards: int | None = None,
) -> Couplings | None:
    """Solve z1 = ODE(z0) for every pair of `source`, reusing finished shards.

    `max_new_shards` stops after solving that many shards (a budget, and how the tests simulate a
    kill); the call then returns None and a later call continues."""
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    n = len(source.keys)
    if n == 0:
        raise ValueError("no inputs to build couplings from (the source has no keys)")
    solver = solver or Solver()
    digest = couplings_digest(velocity_digest, source, solver, shard_size)
    out = (root if root is not None else rfp_home() / "reflow") / digest
    out.mkdir(parents=True, exist_ok=True)
    spec = {
        "velocity": velocity_digest,
        "inputs": source.digest,
        "solver": solver.as_dict(),
        "shard_size": shard_size,
        "pairs": n,
    }
    atomic_write_text(out / "spec.json", json.dumps(spec, indent=2) + "\n")

    spans = [(k, list(range(s, min(s + shard_size, n)))) for k, s in enumerate(range(0, n, shard_size))]
    done = {k for k, idx in spans if _valid_shard(out / f"shard_{k:05d}.pt", len(idx))}
    todo = [(k, idx) for k, idx in spans if k not in done]
    computed = 0
    bar = tqdm(total=len(spans), initial=len(done), desc="reflow couplings", unit="shard", disable=not progress)
    for k, idx in todo:
        if max_new_shards is not None and computed >= max_new_shards:
            bar.close()
            return None
        z0 = source.load(idx, k).to(device)
        z1 = rf.integrate(v_fn, z0, solver.steps, sampler=solver.sampler)
        shard = {"index": torch.tensor(idx, dtype=torch.int64), "z0": z0.cpu(), "z1": z1.cpu()}
        atomic_write_with(out / f"shard_{k:05d}.pt", lambda tmp, s=shard: torch.save(s, tmp))
        computed += 1
        bar.update(1)
    bar.close()
    rows = [
        {"index": i, "source_key": source.keys[i], "shard": f"shard_{k:05d}.pt", "offset": j}
        for k, idx in spans
        for j, i in enumerate(idx)
    ]
    index = pa.Table.from_pylist(rows, schema=INDEX_SCHEMA)
    with atomic_path(out / "index.parquet") as tmp:
        pq.write_table(index, tmp)
    return Couplings(out, index, computed=computed, reused=len(done))


def open_couplings(root: str | os.PathLike) -> Couplings:
    """A finished couplings folder (one with index.parquet)."""
    root = Path(root)
    path = root / "index.parquet"
    if not path.is_file():
        raise FileNotFoundError(f"{root}: no index.parquet, the couplings are not finished; rerun `rfp reflow`")
    return Couplings(root, pq.read_table(path), computed=0, reused=0)
