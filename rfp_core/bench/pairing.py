"""`rfp bench pairing`: chunked top-k pairing of 50,000 x 50,000 384-d vectors (ViT-S/14's size), k = 8.

Runs in a fresh Python process so the peak RSS it reports (getrusage ru_maxrss: the OS's
high-water mark of resident memory, imports and input arrays included) is this job's alone.
`pairs_per_s` = similarities scored per second (N0 * N1 / seconds of top-k); the parquet
write of the N0 * k result rows is timed separately.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile

FULL = dict(n0=50_000, n1=50_000, dim=384, k=8)
QUICK = dict(n0=5_000, n1=5_000, dim=384, k=8)
MEMORY_LIMIT_GIB = 2.0


def _child(n0: int, n1: int, dim: int, k: int, chunk_size: int, device: str) -> None:
    import resource
    import time
    from pathlib import Path

    import torch

    from rfp_core.structure.pairing import topk_pairs, write_pairs

    def rss_gib() -> float:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux

    gen = torch.Generator().manual_seed(0)
    d0 = torch.nn.functional.normalize(torch.randn(n0, dim, generator=gen), dim=1).numpy()
    d1 = torch.nn.functional.normalize(torch.randn(n1, dim, generator=gen), dim=1).numpy()
    k0 = [f"{i:032x}:frame:{i}" for i in range(n0)]  # key strings as long as real ones
    k1 = [f"{i:032x}:frame:{i + n0}" for i in range(n1)]
    rss_inputs = rss_gib()
    t0 = time.perf_counter()
    table = topk_pairs(k0, d0, k1, d1, k=k, chunk_size=chunk_size, device=device)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        t1 = time.perf_counter()
        path = write_pairs(table, Path(tmp) / "pairs.parquet")
        write_s = time.perf_counter() - t1
        size_mib = path.stat().st_size / 2**20
    print(json.dumps({
        "n0": n0, "n1": n1, "dim": dim, "k": k, "chunk_size": chunk_size, "device": device,
        "torch_threads": torch.get_num_threads(), "rows": table.num_rows,
        "topk_s": round(seconds, 3), "pairs_per_s": round(n0 * n1 / seconds),
        "d0_frames_per_s": round(n0 / seconds, 1), "write_s": round(write_s, 3),
        "pairs_parquet_mib": round(size_mib, 2), "rss_after_inputs_gib": round(rss_inputs, 3),
        "peak_rss_gib": round(rss_gib(), 3),
    }))


def run(quick: bool = False, device: str | None = None, chunk_size: int = 4096) -> dict:

    from rfp_core.device import pick_device

    device = str(pick_device(device))
    sizes = QUICK if quick else FULL
    args = ", ".join(f"{v!r}" for v in (*sizes.values(), chunk_size, device))
    code = f"from rfp_core.bench.pairing import _child; _child({args})"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"pairing benchmark process failed:\n{proc.stderr[-2000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["quick"] = quick
    result["peak_rss_under_limit"] = result["peak_rss_gib"] < MEMORY_LIMIT_GIB
    return result
