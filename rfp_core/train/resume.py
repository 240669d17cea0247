"""Resuming a training phase: the same data order, the same RNG, and only the work it belongs to.

A phase's *lineage* is a digest of what it is built from: the training-relevant config, the
manifest's content version, and the digests of the checkpoints it reads (codec, saliency) and
of the structure pairs. Checkpoints carry it; a run folder is only resumed, and only pruned,
within the current lineage. Work of another lineage in the folder is never used silently:
continuing it is refused with what changed, unless the caller forces a fresh start (`force`,
`rfp train --restart`), which moves that work to `superseded/` instead of deleting it.
Budgets (`velocity.train_images`, the saliency step limit and thresholds) are not part of a
lineage: raising one continues the phase. Exact resume: a checkpoint holds the optimizer and
RNG state (`restore_exact` puts them back) and the data order is a function of the step.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import random
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch
from torch.utils.data import Sampler

from rfp_core.atomic import atomic_write_text
from rfp_core.checkpoint import (
    CheckpointError,
    checkpoint_lineage,
    list_checkpoints,
    load_checkpoint,
    load_latest,
    prune_checkpoints,
    save_checkpoint,
)

SUPERSEDED = "superseded"
# velocity settings that change how a run is watched, not what it trains
VELOCITY_WATCH_KEYS = {
    "sample_every_images",
    "sample_batch_size",
    "checkpoint_every_minutes",
    "checkpoint_every_steps",
    "num_inference_steps",
    "sampler",
}
VELOCITY_BUDGET_KEYS = {"train_images"}
# how fast, not what is trained (train/speed.py): a run continues across them, and the lineage of
# runs made before these keys existed stays the same
VELOCITY_SPEED_KEYS = {"channels_last", "adamw", "compile", "cpu_threads"}
RESTART_HINT = "start a new run (`rfp train --run-id NEW`), or add `--restart` (force=True) to train it afresh here"


class ResumeRefused(RuntimeError):
    """The folder holds work built from other inputs; the message says what changed and what to do."""


# --- data order and RNG -----------------------------------------------------------------------
class StepSampler(Sampler[int]):
    """Endless shuffled epochs, each permutation seeded by (seed, epoch), starting at `start`.

    The k-th index drawn depends only on (seed, k), so a resumed run sees the same data order.
    """

    def __init__(self, n: int, seed: int, start: int = 0):
        self.n, self.seed, self.start = n, seed, start

    def __iter__(self) -> Iterator[int]:
        epoch, offset = divmod(self.start, self.n)
        while True:
            yield from epoch_order(self.n, self.seed, epoch)[offset:]
            epoch, offset = epoch + 1, 0


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The permutation of epoch `epoch`: the k-th sample overall is epoch_order(n, seed, k // n)[k % n]."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()


def rng_state(device: torch.device) -> dict:
    state = {"cpu": torch.get_rng_state(), "python": list(random.getstate()[1])}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if "python" in state:
        random.setstate((3, tuple(int(v) for v in state["python"]), None))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def restore_exact(state: dict, device: torch.device, **parts) -> None:
    """Load each part (model, EMA, optimizer, ...) from `state[name]`, then the RNG state: the
    run continues as if it had never stopped. Call it where the first draw after it is a step's."""
    for name, part in parts.items():
        part.load_state_dict(state[name])
    set_rng_state(state["rng"], device)


# --- what a phase is built from ---------------------------------------------------------------
def file_digest(path: str | os.PathLike | None) -> str | None:
    if path is None:
        return None
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def pairs_digest(table) -> str | None:
    """Content of a structure-pairs table: who is paired with whom, in which rank order."""
    if table is None:
        return None
    h = hashlib.sha256()
    for col in ("d0_key", "d1_key", "rank"):
        h.update("\x1f".join(map(str, table.column(col).to_pylist())).encode())
        h.update(b"\x1e")
    return h.hexdigest()


def _manifest_version(manifest: str | os.PathLike) -> str:
    from rfp_core.media.manifest import content_version

    return content_version(manifest)


def _common(cfg: dict) -> dict:
    # the folders are paths; what they hold enters as the manifest's content version
    return {
        "max_size": cfg.get("max_size"),
        "store_max_side": cfg.get("store_max_side"),
        "generative": cfg.get("domain0") == "random",
        "codec": cfg.get("codec"),
        "holdout_fraction": (cfg.get("saliency") or {}).get("holdout_fraction"),
    }


def codec_inputs(cfg: dict, manifest: str | os.PathLike) -> dict:
    return {"config": {**_common(cfg), "seed": cfg.get("seed")}, "manifest": _manifest_version(manifest)}


def saliency_inputs(cfg: dict, manifest: str | os.PathLike, codec_checkpoint: str | os.PathLike | None) -> dict:
    """The net and the frames it tells apart; its learning rate, augmentations, step limit and
    thresholds are how hard it trains towards the same goal, so changing them continues it."""
    return {
        "config": {**_common(cfg), "saliency_net": (cfg.get("saliency") or {}).get("net")},
        "manifest": _manifest_version(manifest),
        "codec_checkpoint": file_digest(codec_checkpoint),
    }


def velocity_inputs(
    cfg: dict,
    manifest: str | os.PathLike,
    saliency_checkpoint: str | os.PathLike | None,
    codec_checkpoint: str | os.PathLike | None,
    pairs=None,
) -> dict:
    velocity = {
        k: v
        for k, v in (cfg.get("velocity") or {}).items()
        if k not in VELOCITY_WATCH_KEYS | VELOCITY_BUDGET_KEYS | VELOCITY_SPEED_KEYS
    }
    return {
        "config": {**_common(cfg), "seed": cfg.get("seed"), "type": cfg.get("type"), "velocity": velocity},
        "manifest": _manifest_version(manifest),
        "saliency_checkpoint": file_digest(saliency_checkpoint),
        "codec_checkpoint": file_digest(codec_checkpoint),
        "pairs": pairs_digest(pairs),
    }


def lineage_digest(inputs: dict) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()[:16]


_LABELS = {
    "manifest": "the data (manifest content version)",
    "saliency_checkpoint": "the saliency checkpoint",
    "codec_checkpoint": "the codec checkpoint",
    "pairs": "the structure pairs",
}


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _show(v: Any) -> str:
    s = json.dumps(v, default=str) if not isinstance(v, str) else v
    return s[:12] if isinstance(v, str) and len(v) >= 32 else s[:60]  # digests: a short prefix is enough


def describe_changes(old: dict | None, new: dict) -> list[str]:
    """Human-readable differences between two input records ("velocity.learning_rate 0.001 -> 0.002")."""
    if not old:
        return ["it was written before runs recorded what they are built from, so it cannot be told apart"]
    a, b = _flat(old), _flat(new)
    changes = []
    for key in sorted(a.keys() | b.keys()):
        if a.get(key) != b.get(key):
            label = _LABELS.get(key, key.removeprefix("config."))
            changes.append(f"{label} {_show(a.get(key))} -> {_show(b.get(key))}")
    return changes or ["its lineage digest differs"]


def refusal(phase: str, where: Path, changes: list[str]) -> ResumeRefused:
    return ResumeRefused(
        f"{phase}: {where} holds {phase} work built from other inputs than this call's: {'; '.join(changes)}. "
        f"Continuing it would train on the wrong thing: {RESTART_HINT} (the previous {phase} files are then "
        f"moved to {where / SUPERSEDED}/, nothing is deleted)."
    )


def supersede(directory: Path, names: Iterable[str], phase: str, why: str = "starting afresh") -> Path | None:
    """Move the phase's files (names, or glob patterns) to `directory/superseded/<phase>-<time>/`."""
    found = sorted({p for name in names for p in directory.glob(name)})
    if not found:
        return None
    dest = directory / SUPERSEDED / f"{phase}-{time.strftime('%Y%m%d-%H%M%S')}"
    n = 1
    while dest.exists():
        dest, n = dest.with_name(f"{dest.name.split('~')[0]}~{n}"), n + 1
    dest.mkdir(parents=True)
    for p in found:
        shutil.move(str(p), dest / p.name)
    print(f"{phase}: {why}; moved {', '.join(p.name for p in found)} to {dest}", file=sys.stderr)
    return dest


def continue_saved(
    phase: str, where: Path, saved: dict | None, inputs: dict, force: bool, files: Iterable[str]
) -> bool:
    """Whether saved work (`saved`: {"lineage", "lineage_inputs"} or None when there is none) may be
    continued. Another lineage raises ResumeRefused, or, with `force`, is moved aside (False)."""
    if saved is None:
        return False
    if saved.get("lineage") == lineage_digest(inputs):
        return True
    if not force:
        raise refusal(phase, where, describe_changes(saved.get("lineage_inputs"), inputs))
    supersede(where, files, phase)
    return False


# --- velocity checkpoints ---------------------------------------------------------------------
VELOCITY_FILES = ("velocity_*.pt", "velocity.pt", "metrics.jsonl", "samples")


def _other_lineage(out_dir: Path, prefix: str, lineage: str) -> tuple[Path, dict] | None:
    """The newest loadable checkpoint here (intermediate, else the final `<prefix>.pt`) of another lineage."""
    for path in [*list_checkpoints(out_dir, prefix), out_dir / f"{prefix}.pt"]:
        try:
            if path.is_file() and checkpoint_lineage(path) != lineage:
                return path, load_checkpoint(path, mmap=True)
        except CheckpointError:
            continue  # torn: load_latest has warned about it already
    return None


def resume_point(
    out_dir: Path, prefix: str, inputs: dict, resume_from: Path | None = None, force: bool = False
) -> tuple[Path, dict] | None:
    """The checkpoint a velocity call continues from: `resume_from` when given (any lineage: the
    caller named it), else the newest loadable one of this lineage in `out_dir`. Velocity work of
    another lineage and none of this one: refused, or with `force` moved aside (start at 0)."""
    lineage = lineage_digest(inputs)
    if resume_from is not None:
        state = load_checkpoint(Path(resume_from), map_location="cpu")
        if state.get("lineage") != lineage:
            changes = describe_changes(state.get("lineage_inputs"), inputs)
            print(
                f"{prefix}: {resume_from} was built from other inputs ({'; '.join(changes)}); "
                "continuing from it as --checkpoint asks",
                file=sys.stderr,
            )
        return Path(resume_from), state
    found = load_latest(out_dir, prefix, map_location="cpu", lineage=lineage)
    if found is not None:
        return found
    other = _other_lineage(out_dir, prefix, lineage)
    if other is not None:
        path, state = other
        if not force:
            raise refusal(
                prefix,
                out_dir,
                [f"newest {path.name}: " + "; ".join(describe_changes(state.get("lineage_inputs"), inputs))],
            )
        supersede(out_dir, VELOCITY_FILES, prefix)
    return None


def pick_resume_point(world, out_dir: Path, prefix: str, inputs: dict, resume_from: Path | None, force: bool):
    """`resume_point` under torchrun: rank 0 picks (it may move other work aside), the other ranks
    load the file it picked. Returns (path, state) or None."""
    found = None

    def pick() -> str | None:
        nonlocal found
        found = resume_point(out_dir, prefix, inputs, resume_from=resume_from, force=force)
        return None if found is None else str(found[0])

    picked = world.from_main(pick)
    if picked is None:
        return None
    return found or (Path(picked), load_checkpoint(Path(picked), map_location="cpu"))


def write_step_checkpoint(out_dir: Path, prefix: str, step: int, state: dict, lineage: str, keep: int = 2) -> Path:
    """`<prefix>_<step>.pt` of this lineage; of this lineage's step checkpoints the newest `keep`
    stay (another run's files are never moved out or deleted)."""
    path = out_dir / f"{prefix}_{step:08d}.pt"
    make_room(path, lineage)
    save_checkpoint(path, state)
    prune_checkpoints(out_dir, prefix, keep=keep, lineage=lineage)
    return path


def make_room(path: Path, lineage: str) -> None:
    """Before writing `path`: a file of that name from another lineage moves to superseded/, so a
    run never overwrites another run's checkpoint of the same step."""
    try:
        theirs = path.is_file() and checkpoint_lineage(path) != lineage
    except CheckpointError:
        theirs = False  # torn: nothing worth keeping
    if theirs:
        supersede(path.parent, [path.name], path.stem, why=f"{path.name} here belongs to another lineage")


def budget_note(state: dict, total: int, batch_size: int) -> str | None:
    """What to say when a resumed checkpoint was trained towards another step budget."""
    old_total = state.get("total_steps")
    if old_total is None:  # written before checkpoints recorded it: derive it from their config
        old_images = (state.get("config") or {}).get("velocity", {}).get("train_images")
        old_total = max(1, int(old_images) // batch_size) if old_images else total
    old_total, step = int(old_total), int(state.get("step", 0))
    if old_total == total:
        return None
    how = f"continuing from step {step} to {total}" if step < total else f"already at step {step}, past the new total"
    return (
        f"velocity: velocity.train_images now gives {total} steps (this checkpoint trained towards {old_total}): "
        f"{how}; the LR schedule is recomputed for {total} steps"
    )


def trim_metrics(path: Path, step: int) -> None:
    """Drop lines logged after `step` (they belong to the run that was killed), and lines a kill
    tore (a partial last line), with a warning: they cannot be read back."""
    if not path.exists():
        return
    keep = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            at = int(row.get("step", 0))
        except (ValueError, TypeError, AttributeError):
            warnings.warn(
                f"{path}:{n}: skipping an unreadable metrics line (torn by a kill?): {line[:80]!r}", stacklevel=2
            )
            continue
        if at <= step:
            keep.append(line)
    atomic_write_text(path, "".join(line + "\n" for line in keep))


def saved_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def lineage_record(inputs: dict) -> dict:
    """What a phase stores beside its product, so the next call can tell whether it continues it."""
    return {"lineage": lineage_digest(inputs), "lineage_inputs": copy.deepcopy(inputs)}
