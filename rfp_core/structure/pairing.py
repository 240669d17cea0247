"""Top-k structure pairing: for each domain-0 frame, the k most similar domain-1 frames.

Cosine similarity is a matmul of L2-normalised vectors. Both sides are cut into blocks and a
running top-k is merged block by block, so memory is O(chunk²) whatever N0 and N1 are
(100k x 100k full similarities would be 40 GB; one 4096² block is 64 MB).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from rfp_core.atomic import atomic_path
from rfp_core.config import StructureConfig

PAIRS_SCHEMA = pa.schema(
    [
        ("d0_key", pa.string()),
        ("d1_key", pa.string()),
        ("rank", pa.int16()),  # 0 = most similar
        ("similarity", pa.float32()),
    ]
)


def topk_indices(
    d0_emb: np.ndarray,
    d1_emb: np.ndarray,
    k: int,
    chunk_size: int = 4096,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """(similarities (N0, k) float32 descending, indices into d1 (N0, k) int64)."""
    n0, n1 = len(d0_emb), len(d1_emb)
    k = min(k, n1)
    if n0 == 0 or k == 0:
        return np.zeros((n0, k), np.float32), np.zeros((n0, k), np.int64)
    device = torch.device(device)
    d1 = F.normalize(torch.as_tensor(np.asarray(d1_emb, np.float32)).to(device), dim=1)
    out_v = np.empty((n0, k), np.float32)
    out_i = np.empty((n0, k), np.int64)
    for s0 in tqdm(range(0, n0, chunk_size), desc="top-k pairing", unit="chunk", disable=not progress):
        q = F.normalize(torch.as_tensor(np.asarray(d0_emb[s0 : s0 + chunk_size], np.float32)).to(device), dim=1)
        best_v = best_i = None
        for s1 in range(0, n1, chunk_size):
            sims = q @ d1[s1 : s1 + chunk_size].T
            v, i = sims.topk(min(k, sims.shape[1]), dim=1)
            i += s1
            if best_v is not None:
                v, i = torch.cat([best_v, v], 1), torch.cat([best_i, i], 1)
                v, j = v.topk(k, dim=1)
                i = i.gather(1, j)
            best_v, best_i = v, i
        out_v[s0 : s0 + len(q)] = best_v.cpu().numpy()
        out_i[s0 : s0 + len(q)] = best_i.cpu().numpy()
    return out_v, out_i


def topk_pairs(
    d0_keys: Sequence[str],
    d0_emb: np.ndarray,
    d1_keys: Sequence[str],
    d1_emb: np.ndarray,
    k: int,
    chunk_size: int = 4096,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> pa.Table:
    """Table (d0_key, d1_key, rank, similarity): k rows per domain-0 key, rank 0 the best."""
    if len(d0_keys) != len(d0_emb) or len(d1_keys) != len(d1_emb):
        raise ValueError(
            f"keys and embeddings differ in length: {len(d0_keys)}/{len(d0_emb)}, {len(d1_keys)}/{len(d1_emb)}"
        )
    sims, idx = topk_indices(d0_emb, d1_emb, k, chunk_size, device, progress)
    n0, kk = idx.shape
    return pa.table(
        {
            "d0_key": pa.array(list(d0_keys), pa.string()).take(pa.array(np.repeat(np.arange(n0), kk))),
            "d1_key": pa.array(list(d1_keys), pa.string()).take(pa.array(idx.reshape(-1))),
            "rank": pa.array(np.tile(np.arange(kk, dtype=np.int16), n0)),
            "similarity": pa.array(sims.reshape(-1)),
        },
        schema=PAIRS_SCHEMA,
    )


def write_pairs(table: pa.Table, path: str | Path) -> Path:
    with atomic_path(path) as tmp:
        pq.write_table(table.cast(PAIRS_SCHEMA), tmp)
    return Path(path)


def read_pairs(path: str | Path) -> pa.Table:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no structure pairs; build them first (structure pairing step)")
    return pq.read_table(path).cast(PAIRS_SCHEMA)


def pair_frames(
    d0_keys: Sequence[str],
    d1_keys: Sequence[str],
    store,
    cfg: StructureConfig,
    device: str | torch.device = "cpu",
    encoder=None,
    progress: bool = True,
) -> pa.Table:
    """Embed both domains through the shared cache (only new keys computed) and pair them."""
    from rfp_core.structure.cache import EmbeddingCache, embed_frames
    from rfp_core.structure.encoders import build_encoder

    encoder = encoder or build_encoder(cfg, device)
    cache = EmbeddingCache(encoder.encoder_id)
    e0 = embed_frames(d0_keys, store, encoder, cache, progress)
    e1 = embed_frames(d1_keys, store, encoder, cache, progress)
    return topk_pairs(d0_keys, e0, d1_keys, e1, cfg.candidates, device=device, progress=progress)


def pair_manifest(
    manifest, store, cfg: StructureConfig, device: str | torch.device = "cpu", encoder=None, progress: bool = True
) -> pa.Table:
    """`pair_frames` over the ok frames of a manifest (path or table); what training consumes."""
    from rfp_core.media.manifest import ok_frames, read_manifest

    table = manifest if isinstance(manifest, pa.Table) else read_manifest(manifest)
    return pair_frames(ok_frames(table, 0), ok_frames(table, 1), store, cfg, device, encoder, progress)
