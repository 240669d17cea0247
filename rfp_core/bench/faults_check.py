"""What `rfp bench faults` checks after its kills: the final weights against the reference's, bit
for bit, and every file under $RFP_HOME reading back (no orphaned temp files)."""

from __future__ import annotations

import json
from pathlib import Path

from rfp_core.bench.faults_drive import Channel

WEIGHTS = {
    "codec": ("codec.pt", "codec"),
    "saliency": ("saliency.pt", "saliency"),
    "velocity": ("velocity.pt", "velocity"),
}


def weights(ch: Channel) -> dict:
    """The final weights of each phase of `ch`'s run (None where a phase left none)."""
    import torch

    out = {}
    for phase, (name, key) in WEIGHTS.items():
        (path,) = [p for p in ch.files(phase, name) if p.exists()][-1:] or [None]
        out[phase] = torch.load(path, map_location="cpu", weights_only=True)[key] if path else None
    return out


def mismatches(reference: dict, got: dict) -> list[str]:
    """One line per phase whose final weights are not the reference's bit for bit."""
    import torch

    bad = []
    for phase, ref in reference.items():
        other = got.get(phase)
        if ref is None or other is None or ref.keys() != other.keys():
            bad.append(f"{phase}: missing")
            continue
        differ = [k for k in ref if not torch.equal(ref[k], other[k])]
        if differ:
            bad.append(f"{phase}: {len(differ)} of {len(ref)} tensors differ (first: {differ[0]})")
    return bad


def audit(home: Path) -> tuple[list[str], list[str]]:
    """(orphaned temp files, unreadable files) under our parts of $RFP_HOME (MLflow's own store excluded)."""
    import pyarrow.parquet as pq
    import torch
    from PIL import Image

    orphans, corrupt = [], []
    for part in ("runs", "pipeline", "store", "cache", "manifests", "reflow"):
        for path in sorted((home / part).rglob("*")) if (home / part).is_dir() else []:
            if not path.is_file():
                continue
            try:
                if path.name.endswith(".tmp"):
                    orphans.append(str(path))
                elif path.suffix == ".pt":
                    torch.load(path, map_location="cpu", weights_only=True)
                elif path.suffix == ".parquet":
                    pq.read_table(path)
                elif path.suffix == ".json":
                    json.loads(path.read_text())
                elif path.suffix == ".jsonl":
                    [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
                elif path.suffix in (".png", ".ppm"):  # frames and the store's smaller copies
                    with Image.open(path) as img:
                        img.load()
            except Exception as exc:  # anything that does not read back is what this audit is for
                corrupt.append(f"{path}: {type(exc).__name__}: {str(exc)[:100]}")
    return orphans, corrupt
