"""A rank of a local torch.distributed world (gloo on CPU), for tests: `spawn(jobs, n)` starts n
processes with the environment torchrun would give them; each trains the jobs' phases in turn."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from rfp_core.config_files import config_from_dict
from rfp_core.media.frame_store import FrameStore
from rfp_core.train.saliency import SaliencyThresholdNotReached, train_saliency
from rfp_core.train.velocity import train_velocity


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train(job: dict) -> None:
    """One phase as `job` says; the saliency losses rank 0 logs go to job["log"] (JSON lines)."""
    cfg = config_from_dict(job["config"], source="dist_worker")
    store = FrameStore(root=Path(job["store_root"]), max_side=cfg.store_max_side)
    out = Path(job["out_dir"])
    if job["phase"] == "saliency":
        log_path = Path(job["log"])

        def log(metrics: dict, step: int) -> None:
            with log_path.open("a") as fh:
                fh.write(json.dumps({"step": step, **metrics}) + "\n")

        try:
            train_saliency(cfg, Path(job["manifest"]), out, device="cpu", store=store, log=log, progress=False)
        except SaliencyThresholdNotReached:
            pass  # the step budget is the test's: its checkpoint is written
    else:
        train_velocity(
            cfg,
            Path(job["manifest"]),
            out,
            device="cpu",
            store=store,
            progress=False,
            saliency_checkpoint=Path(job["saliency_checkpoint"]),
        )


def _rank_main(rank: int, size: int, port: int, jobs: list[dict]) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        WORLD_SIZE=str(size),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        RFP_HOME=jobs[0]["rfp_home"],
    )
    torch.set_num_threads(1)
    try:
        for job in jobs:
            train(job)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def spawn(jobs: list[dict], nprocs: int) -> None:
    mp.spawn(_rank_main, args=(nprocs, free_port(), jobs), nprocs=nprocs, join=True)
