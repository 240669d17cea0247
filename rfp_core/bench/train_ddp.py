"""`rfp bench train --nproc-per-node N`: velocity-phase throughput at 1 and N ranks, side by side.

Each row is a real `train_velocity` run started by torchrun (`--standalone`), the saliency-weighted
loss on the project's tiny nets (configs/tiny.json at 32 px, an untrained ResNet-18 as h), on
generated demo shapes, at the same global batch: N ranks split it. images/s counts the global batch
(median over the logged steps after the first, which pays for warm-up). The loss curves of the two
rows are compared too: they should agree to float tolerance.

On CPU the ranks share one machine's cores (each gets cores / N threads), so the N-rank figure says
the distributed path runs and matches, not that it scales: it is for correctness only. With one GPU
per rank (NCCL) it is the speed-up figure.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from rfp_core.config import ConfigError
from rfp_core.config_files import config_from_dict, load_config

TINY = Path(__file__).resolve().parents[2] / "configs" / "tiny.json"
SIZE, BATCH, MINIBATCH, FRAMES = 32, 8, 4, 24


def _data(root: Path):
    """Demo shapes (flat warm vs striped cool), ingested; an untrained saliency net as h."""
    from rfp_core.checkpoint import save_checkpoint
    from rfp_core.media.demo_data import draw_sample
    from rfp_core.media.frame_store import FrameStore
    from rfp_core.media.ingest import ingest
    from rfp_core.nets.saliency import SaliencyNet

    dirs = []
    for domain in (0, 1):
        d = root / "data" / f"domain{domain}"
        d.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng([0, domain])
        for i in range(FRAMES):
            Image.fromarray(draw_sample(domain, rng, SIZE)[0]).save(d / f"d{domain}_{i:03d}.png")
        dirs.append(d)
    store = FrameStore(root=root / "store", max_side=64)
    manifest = ingest([dirs[0]], [dirs[1]], out=root / "manifest.parquet", store=store, progress=False).manifest_path
    cfg = load_config(TINY)
    torch.manual_seed(0)
    net_cfg = cfg.saliency.net.model_copy(update={"pretrained": False})
    net = SaliencyNet(net_cfg)
    sal = save_checkpoint(
        root / "saliency.pt", {"saliency": net.state_dict(), "net": net_cfg.model_dump(mode="json"), "in_channels": 3}
    )
    return manifest, store, sal


def _row(job: dict, ranks: int, device: str) -> dict:
    """One torchrun launch of `worker` with `ranks` processes; what rank 0 wrote."""
    out = Path(job["root"]) / f"ranks_{ranks}"
    job = {**job, "out_dir": str(out), "device": device}
    job_path = Path(job["root"]) / f"job_{ranks}.json"
    job_path.write_text(json.dumps(job))
    threads = os.environ.get("OMP_NUM_THREADS") or str(max(1, (os.cpu_count() or 1) // ranks))
    env = {**os.environ, "OMP_NUM_THREADS": threads}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        str(ranks),
        "-m",
        "rfp_core.bench.train_ddp",
        str(job_path),
    ]
    proc = subprocess.run(command, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"bench train --nproc-per-node: the {ranks}-rank run failed:\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {
        "ranks": ranks,
        "threads_per_rank": int(threads),
        "images_per_s": statistics.median(r["images_per_s"] for r in rows[1:])
        if len(rows) > 1
        else rows[0]["images_per_s"],
        "steps": rows[-1]["step"],
        "losses": [r["loss"] for r in rows],
    }


def run(quick: bool = False, device: str | None = None, nproc: int = 2) -> dict:
    from rfp_core.device import pick_device

    dev = pick_device(device)
    if nproc < 2:
        raise ConfigError(f"--nproc-per-node {nproc}: the benchmark compares 1 rank with N >= 2 ranks")
    if dev.type == "cuda" and torch.cuda.device_count() < nproc:
        raise ConfigError(
            f"--nproc-per-node {nproc}: this machine has {torch.cuda.device_count()} GPU(s); NCCL "
            "needs one per rank: lower --nproc-per-node or pass --device cpu (correctness only)"
        )
    steps = 8 if quick else 40
    with tempfile.TemporaryDirectory(prefix="rfp-bench-ddp-") as tmp:
        manifest, store, sal = _data(Path(tmp))
        cfg = config_from_dict(
            load_config(TINY).model_dump(mode="json"),
            source="bench train_ddp",
            overrides={
                "max_size": SIZE,
                "store_max_side": 64,
                "velocity": {
                    "train_batch_size": BATCH,
                    "train_minibatch_size": MINIBATCH,
                    "train_images": BATCH * steps,
                    "sample_every_images": 10**9,
                    "warmup_fraction": 0.0,
                },
            },
        )
        job = {
            "root": tmp,
            "config": cfg.model_dump(mode="json"),
            "manifest": str(manifest),
            "store_root": str(store.root),
            "saliency_checkpoint": str(sal),
        }
        rows = [_row(job, n, dev.type) for n in (1, nproc)]
    one, many = rows
    diff = max(abs(a - b) / max(abs(a), 1e-12) for a, b in zip(one.pop("losses"), many.pop("losses")))
    on_cpu = dev.type == "cpu"
    return {
        "benchmark": "train_ddp",
        "rows": rows,
        "speedup": many["images_per_s"] / one["images_per_s"],
        "loss_curve_max_rel_diff": diff,
        "global_batch": BATCH,
        "minibatch": MINIBATCH,
        "size": SIZE,
        "steps": steps,
        "device": torch.cuda.get_device_name(dev)
        if not on_cpu
        else f"cpu ({platform.processor() or platform.machine()})",
        "cpu_cores": os.cpu_count(),
        "torch": torch.__version__,
        "note": (
            "CPU: the ranks share this machine's cores; the figures check the distributed path, for correctness "
            "only, not speed"
        )
        if on_cpu
        else "one GPU per rank, NCCL",
    }


def worker(job_path: str) -> None:
    """A rank under torchrun: train the job's velocity phase (rank 0 writes metrics.jsonl)."""
    from rfp_core.media.frame_store import FrameStore
    from rfp_core.train.velocity import train_velocity

    job = json.loads(Path(job_path).read_text())
    cfg = config_from_dict(job["config"], source=job_path)
    store = FrameStore(root=Path(job["store_root"]), max_side=cfg.store_max_side)
    os.environ.setdefault("RFP_HOME", job["root"])
    try:
        train_velocity(
            cfg,
            Path(job["manifest"]),
            Path(job["out_dir"]),
            device=job["device"],
            store=store,
            saliency_checkpoint=Path(job["saliency_checkpoint"]),
            progress=False,
        )
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    worker(sys.argv[1])
