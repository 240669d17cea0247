"""Embeddings cached by frame key, one parquet file per encoder, shared by every experiment.

A frame key is a content hash, so an embedding computed once is right forever: adding one
image to a domain computes one embedding. Writes re-read the file under a lock and merge,
so two experiments filling the same cache at once both keep their rows.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from rfp_core import paths
from rfp_core.atomic import atomic_path, file_lock, sweep_temps
from rfp_core.structure.encoders import StructureEncoder

# Flush computed rows to disk this often, so an interrupted run keeps most of its work.
FLUSH_EVERY = 20_000


def default_cache_path(encoder_id: str) -> Path:
    return paths.cache_dir() / "embeddings" / f"{encoder_id}.parquet"


class EmbeddingCache:
    """`frame_key -> float32 vector` for one encoder; parquet columns frame_key, embedding."""

    def __init__(self, encoder_id: str, path: Path | None = None):
        self.encoder_id = encoder_id
        self.path = Path(path) if path is not None else default_cache_path(encoder_id)
        self.computed = 0  # embeddings computed by this object, summed over compute_missing calls
        self._index: dict[str, int] = {}
        self._matrix = np.zeros((0, 0), np.float32)
        self._load()

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, key: str) -> bool:
        return key in self._index

    @property
    def dim(self) -> int | None:
        return self._matrix.shape[1] if len(self._index) else None

    def _read(self) -> tuple[list[str], np.ndarray]:
        if not self.path.exists():
            return [], np.zeros((0, 0), np.float32)
        try:
            table = pq.read_table(self.path)
            meta = table.schema.metadata or {}
            stored_id = meta.get(b"encoder_id", b"").decode()
            if stored_id and stored_id != self.encoder_id:
                raise ValueError(f"it holds embeddings of encoder '{stored_id}', not '{self.encoder_id}'")
            keys = table.column("frame_key").to_pylist()
            emb = table.column("embedding").combine_chunks()
            dim = emb.type.list_size
            matrix = emb.values.to_numpy(zero_copy_only=False).astype(np.float32, copy=False).reshape(-1, dim)
        except (OSError, KeyError, ValueError, pa.ArrowException) as exc:
            raise ValueError(f"{self.path}: unreadable embedding cache ({exc}); delete it to rebuild it") from None
        return keys, matrix

    def _load(self) -> None:
        keys, matrix = self._read()
        self._index = {k: i for i, k in enumerate(keys)}
        self._matrix = matrix

    def get(self, keys: Sequence[str]) -> tuple[np.ndarray, list[str]]:
        """(vectors of the cached keys, in the given order, missing ones left out; missing keys).

        When nothing is missing, row i belongs to keys[i].
        """
        rows = [self._index[k] for k in keys if k in self._index]
        missing = [k for k in keys if k not in self._index]
        dim = self._matrix.shape[1] if len(self._index) else 0
        return (self._matrix[rows] if rows else np.zeros((0, dim), np.float32)), missing

    def _merge_and_write(self, new_keys: list[str], new_emb: np.ndarray) -> None:
        with file_lock(self.path):
            sweep_temps(self.path.parent, recursive=False)  # a writer killed mid-write left its temp file
            keys, matrix = self._read()  # another process may have added rows since we loaded
            have = set(keys)
            take = [i for i, k in enumerate(new_keys) if k not in have]
            if matrix.size and new_emb.size and matrix.shape[1] != new_emb.shape[1]:
                raise ValueError(
                    f"{self.path}: cached vectors have {matrix.shape[1]} dims, the encoder gives {new_emb.shape[1]}"
                )
            keys = keys + [new_keys[i] for i in take]
            matrix = np.concatenate([matrix, new_emb[take]]) if matrix.size else new_emb[take]
            dim = matrix.shape[1]
            flat = pa.array(np.ascontiguousarray(matrix, np.float32).reshape(-1))
            table = pa.table(
                {
                    "frame_key": pa.array(keys, pa.string()),
                    "embedding": pa.FixedSizeListArray.from_arrays(flat, dim),
                }
            ).replace_schema_metadata({"encoder_id": self.encoder_id})
            with atomic_path(self.path) as tmp:
                pq.write_table(table, tmp)
            self._index = {k: i for i, k in enumerate(keys)}
            self._matrix = matrix

    def compute_missing(
        self, keys: Sequence[str], store, encoder: StructureEncoder, batch_size: int = 64, progress: bool = True
    ) -> int:
        """Embed the keys not cached yet (frames from `store`), write them; return how many."""
        if encoder.encoder_id != self.encoder_id:
            raise ValueError(f"cache is for encoder '{self.encoder_id}', got encoder '{encoder.encoder_id}'")
        missing = list(dict.fromkeys(k for k in keys if k not in self._index))
        if not missing:
            return 0
        done_keys: list[str] = []
        done: list[np.ndarray] = []
        pending = 0
        bar = tqdm(total=len(missing), desc=f"embed {self.encoder_id}", unit="frame", disable=not progress)
        try:
            for start in range(0, len(missing), batch_size):
                batch = missing[start : start + batch_size]
                images = [store.load(key) for key in batch]  # the store's error names the fix
                done.append(encoder.embed(images))
                done_keys.extend(batch)
                pending += len(batch)
                bar.update(len(batch))
                if pending >= FLUSH_EVERY:
                    self._merge_and_write(done_keys, np.concatenate(done))
                    self.computed += len(done_keys)
                    done_keys, done, pending = [], [], 0
        finally:
            bar.close()
            if done_keys:  # also on interruption: keep what was computed
                self._merge_and_write(done_keys, np.concatenate(done))
                self.computed += len(done_keys)
        return len(missing)


def embed_frames(
    keys: Sequence[str], store, encoder: StructureEncoder, cache: EmbeddingCache | None = None, progress: bool = True
) -> np.ndarray:
    """Vectors for `keys` in key order (N, dim); only keys missing from the cache are computed."""
    cache = cache if cache is not None else EmbeddingCache(encoder.encoder_id)
    cache.compute_missing(keys, store, encoder, progress=progress)
    emb, missing = cache.get(keys)
    assert not missing, missing
    return emb
