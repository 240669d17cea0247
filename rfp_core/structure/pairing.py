"""Top-k structure pairing: for each domain-0 frame, the k most similar domain-1 frames.

Cosine similarity is a matmul of L2-normalised vectors. Both sides are cut into blocks and a
running top-k is merged block by block, so memory is O(chunk²) whatever N0 and N1 are
(100k x 100k full similarities would be 40 GB; one 4096² block is 64 MB).

Two-stage pairing (`structure.shortlist_encoder`): one encoder shortlists, another re-ranks the
shortlist; e.g. the targets whose shape agrees (hog), of which the one laid out most alike (thumbnail).
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


def rerank_indices(
    d0_emb: np.ndarray, d1_emb: np.ndarray, shortlist: np.ndarray, k: int, chunk_size: int = 1024
) -> tuple[np.ndarray, np.ndarray]:
    """Among each d0 row's `shortlist` (N0, S) indices into d1, the k most similar by these
    embeddings: (similarities (N0, k) descending, indices into d1 (N0, k))."""
    n0, s = shortlist.shape
    k = min(k, s)
    d0 = F.normalize(torch.as_tensor(np.asarray(d0_emb, np.float32)), dim=1)
    d1 = F.normalize(torch.as_tensor(np.asarray(d1_emb, np.float32)), dim=1)
    idx = torch.as_tensor(shortlist, dtype=torch.int64)
    out_v = np.empty((n0, k), np.float32)
    out_i = np.empty((n0, k), np.int64)
    for a in range(0, n0, chunk_size):
        cand = idx[a : a + chunk_size]
        sims = torch.einsum("nd,nsd->ns", d0[a : a + chunk_size], d1[cand])
        v, j = sims.topk(k, dim=1)
        out_v[a : a + len(cand)] = v.numpy()
        out_i[a : a + len(cand)] = cand.gather(1, j).numpy()
    return out_v, out_i


def pairs_table(d0_keys: Sequence[str], d1_keys: Sequence[str], sims: np.ndarray, idx: np.ndarray) -> pa.Table:
    """Table (d0_key, d1_key, rank, similarity) of (N0, k) similarities and indices into d1_keys."""
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


def _check_lengths(d0_keys, d0_emb, d1_keys, d1_emb) -> None:
    if len(d0_keys) != len(d0_emb) or len(d1_keys) != len(d1_emb):
        raise ValueError(
            f"keys and embeddings differ in length: {len(d0_keys)}/{len(d0_emb)}, {len(d1_keys)}/{len(d1_emb)}"
        )


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
    _check_lengths(d0_keys, d0_emb, d1_keys, d1_emb)
    return pairs_table(d0_keys, d1_keys, *topk_indices(d0_emb, d1_emb, k, chunk_size, device, progress))


def write_pairs(table: pa.Table, path: str | Path) -> Path:
    with atomic_path(path) as tmp:
        pq.write_table(table.cast(PAIRS_SCHEMA), tmp)
    return Path(path)


def read_pairs(path: str | Path) -> pa.Table:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no structure pairs; build them first (structure pairing step)")
    return pq.read_table(path).cast(PAIRS_SCHEMA)


def pair_embeddings(
    d0_keys: Sequence[str],
    d1_keys: Sequence[str],
    emb: tuple[np.ndarray, np.ndarray],
    cfg: StructureConfig,
    shortlist_emb: tuple[np.ndarray, np.ndarray] | None = None,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> pa.Table:
    """The pairs table from both domains' `cfg.encoder` embeddings `emb` and, when the config
    shortlists, the `cfg.shortlist_encoder` ones: its `shortlist` nearest, re-ranked by `emb`."""
    _check_lengths(d0_keys, emb[0], d1_keys, emb[1])
    if cfg.shortlist_encoder is None:
        return topk_pairs(d0_keys, emb[0], d1_keys, emb[1], cfg.candidates, device=device, progress=progress)
    if shortlist_emb is None:
        raise ValueError(f"structure.shortlist_encoder is '{cfg.shortlist_encoder}' but no embeddings of it were given")
    _, shortlist = topk_indices(*shortlist_emb, cfg.shortlist, device=device, progress=progress)
    return pairs_table(d0_keys, d1_keys, *rerank_indices(*emb, shortlist, cfg.candidates))


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
    from rfp_core.structure.encoders import build_encoder, build_shortlist_encoder

    encoder = encoder or build_encoder(cfg, device)
    emb = _embed(encoder, d0_keys, d1_keys, store, progress)
    short = build_shortlist_encoder(cfg, device)
    short_emb = _embed(short, d0_keys, d1_keys, store, progress) if short is not None else None
    return pair_embeddings(d0_keys, d1_keys, emb, cfg, short_emb, device, progress)


def _embed(encoder, d0_keys, d1_keys, store, progress: bool) -> tuple[np.ndarray, np.ndarray]:
    from rfp_core.structure.cache import EmbeddingCache, embed_frames

    cache = EmbeddingCache(encoder.encoder_id)
    e0 = embed_frames(d0_keys, store, encoder, cache, progress)
    return e0, embed_frames(d1_keys, store, encoder, cache, progress)


def pair_manifest(
    manifest, store, cfg: StructureConfig, device: str | torch.device = "cpu", encoder=None, progress: bool = True
) -> pa.Table:
    """`pair_frames` over the ok frames of a manifest (path or table); what training consumes."""
    from rfp_core.media.manifest import ok_frames, read_manifest

    table = manifest if isinstance(manifest, pa.Table) else read_manifest(manifest)
    return pair_frames(ok_frames(table, 0), ok_frames(table, 1), store, cfg, device, encoder, progress)
