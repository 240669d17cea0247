"""Two experiments ingesting overlapping folders at the same time, into one frame store, hash
cache, source cache and embedding cache: nothing lost, nothing corrupt. Each round starts both
`rfp ingest`-and-embed processes at one gate on an empty $RFP_HOME and then checks the store
frame by frame against a single-process reference: every stored file decodes in full and holds
exactly the pixels of the source its key hashes; both manifests equal the reference's; every
cache holds every entry of both processes once. `-m slow` runs 20 rounds, the default suite 2."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from media_factory import make_image, make_video, make_zip

from rfp_core.media.frame_store import FrameStore
from rfp_core.media.hashing import HashCache
from rfp_core.media.ingest import ingest
from rfp_core.media.manifest import read_manifest
from rfp_core.media.source_cache import SourceCache
from rfp_core.structure import EmbeddingCache, ThumbnailEncoder

ROOT = Path(__file__).resolve().parents[1]
# one experiment's process: wait at the gate, ingest, embed every ok frame into the shared cache.
# The caches flush after every file / batch, so the two processes' merges interleave as often as possible.
WORKER = """
import sys, time
from pathlib import Path
import rfp_core.media.ingest as ingest_mod
import rfp_core.structure.cache as cache_mod
from rfp_core.media.frame_store import FrameStore
from rfp_core.structure import EmbeddingCache, ThumbnailEncoder
ingest_mod.PACK_EVERY_S = 0.0
cache_mod.FLUSH_EVERY = 2
gate, d0, d1, out = map(Path, sys.argv[1:5])
Path(str(out) + ".ready").touch()
while not gate.exists():
    time.sleep(0.005)
store = FrameStore(max_side=32)
report = ingest_mod.ingest([d0], [d1], out=out, store=store, progress=False)
table = report.table
keys = [k for k, s in zip(table.column("frame_key").to_pylist(), table.column("status").to_pylist()) if s == "ok"]
EmbeddingCache("thumbnail8").compute_missing(keys, store, ThumbnailEncoder(8), batch_size=2, progress=False)
"""


def _folders(root: Path) -> dict[str, Path]:
    shared, only_a, only_b = root / "shared", root / "only_a", root / "only_b"
    for i in range(10):
        make_image(shared / f"s{i:02d}.png", 40, (20 * i, 100, 200 - 10 * i))
    make_video(shared / "clip.mp4", n_frames=8, size=40)
    make_zip(shared / "pack.zip", {f"z{i}.png": (40, (i * 30, 5, 5)) for i in range(4)})
    for i in range(4):
        make_image(only_a / f"a{i}.png", 40, (5, 30 * i, 5))
        make_image(only_b / f"b{i}.png", 40, (5, 5, 30 * i))
    return {"shared": shared, "only_a": only_a, "only_b": only_b}


def _experiments(f: dict[str, Path]) -> list[tuple[Path, Path]]:
    # domain 0 overlaps (a folder shared by both), domain 1 is the same folder in both
    return [(f["only_a"].parent, f["shared"]), (f["only_b"].parent, f["shared"])]


def _reference(tmp_path: Path, f: dict[str, Path], monkeypatch) -> tuple[dict[str, np.ndarray], list, dict]:
    home = tmp_path / "reference_home"
    monkeypatch.setenv("RFP_HOME", str(home))
    store = FrameStore(max_side=32)
    tables = [
        ingest([d0], [d1], out=tmp_path / f"ref{i}.parquet", store=store, progress=False).table
        for i, (d0, d1) in enumerate(_experiments(f))
    ]
    keys = sorted(
        {
            k
            for t in tables
            for k, s in zip(t.column("frame_key").to_pylist(), t.column("status").to_pylist())
            if s == "ok"
        }
    )
    cache = EmbeddingCache("thumbnail8")
    cache.compute_missing(keys, store, ThumbnailEncoder(8), progress=False)
    vectors, _ = cache.get(keys)
    pixels = {k: np.asarray(store.load(k)) for k in keys}
    return pixels, tables, dict(zip(keys, vectors))


def _round(tmp_path: Path, f: dict[str, Path], n: int) -> tuple[Path, list[Path]]:
    home = tmp_path / f"home{n:02d}"
    gate = tmp_path / f"gate{n:02d}"
    outs = [tmp_path / f"m{n:02d}_{i}.parquet" for i in range(2)]
    env = {**os.environ, "RFP_HOME": str(home), "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, str(gate), str(d0), str(d1), str(out)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for (d0, d1), out in zip(_experiments(f), outs)
    ]
    deadline = time.monotonic() + 300
    while not all(Path(str(out) + ".ready").exists() for out in outs):  # both past their imports
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "a worker did not start"
        time.sleep(0.01)
    gate.touch()
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
    return home, outs


def _check(home: Path, outs: list[Path], pixels: dict, ref_tables: list, vectors: dict) -> None:
    store = FrameStore(home / "store", max_side=32)
    # lose nothing: both manifests are the single-process ones
    for out, ref in zip(outs, ref_tables):
        assert read_manifest(out).equals(ref)
    # corrupt nothing: the store holds exactly the expected files, each whole and each the pixels of its key
    expected = {store.path_for(k) for k in pixels} | {
        store.path_for(k, lv) for k in pixels for lv in store.levels if store.path_for(k, lv).exists()
    }
    files = {p for p in (home / "store" / "frames").rglob("*") if p.is_file()}
    assert files == expected, sorted(map(str, files ^ expected))[:5]
    for key, ref in pixels.items():
        assert store.verify(key) is None
        assert np.array_equal(np.asarray(store.load(key)), ref), key
    assert not list(home.rglob("*.tmp"))
    # the caches kept both writers' entries
    paths = {r for t in ref_tables for r in t.column("source_path").to_pylist()}
    hashes = HashCache(home / "cache" / "hash_cache.parquet")
    assert len(hashes) == len(paths)
    sources = SourceCache(home / "store")
    md5s = {m for t in ref_tables for m in t.column("source_md5").to_pylist()}
    assert all(sources.get(m) is not None for m in md5s)
    cache = EmbeddingCache("thumbnail8", home / "cache" / "embeddings" / "thumbnail8.parquet")
    assert len(cache) == len(vectors)
    got, missing = cache.get(list(vectors))
    assert not missing and np.array_equal(got, np.stack(list(vectors.values())))


def _run(tmp_path, monkeypatch, rounds: int) -> None:
    f = _folders(tmp_path / "data")
    pixels, ref_tables, vectors = _reference(tmp_path, f, monkeypatch)
    assert len(pixels) == 10 + 8 + 4 + 4 + 4
    for n in range(rounds):
        home, outs = _round(tmp_path, f, n)
        _check(home, outs, pixels, ref_tables, vectors)


def test_two_parallel_ingests_of_overlapping_folders_lose_and_corrupt_nothing(tmp_path, monkeypatch):
    _run(tmp_path, monkeypatch, rounds=2)


@pytest.mark.slow
def test_two_parallel_ingests_stress_20_rounds(tmp_path, monkeypatch):
    _run(tmp_path, monkeypatch, rounds=20)
