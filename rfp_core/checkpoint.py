"""Checkpoints: written atomically (temp file, then rename), read with `weights_only=True`.

A checkpoint holds tensors, state dicts, plain Python values (numbers, strings, lists, dicts,
tuples) and numpy arrays (e.g. numpy's RNG state). Anything else - a pickled class instance,
a function - is refused on load: unpickling it could run code. Files are named
`{prefix}_{step:08d}.pt`, so the newest is the one with the highest step.

A checkpoint may carry a `lineage` (a digest of what its run is built from, see
`rfp_core.train.resume`). Given one, `load_latest` and `prune_checkpoints` only consider
checkpoints of that lineage: a previous config's `velocity_00001600.pt` in the same folder is
neither resumed nor allowed to push the new run's checkpoints out.
"""

from __future__ import annotations

import importlib
import os
import pickle
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rfp_core.atomic import atomic_write_with


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the file and what to do."""


def _numpy_globals() -> list[Any]:
    # numpy arrays and scalars are plain data; allowing them lets RNG states round-trip
    mod = None
    for name in ("numpy._core.multiarray", "numpy.core.multiarray"):
        try:
            mod = importlib.import_module(name)
            break
        except ImportError:
            continue
    allowed: list[Any] = [np.ndarray, np.dtype]
    if mod is not None:
        allowed += [mod._reconstruct, mod.scalar]
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        allowed += [getattr(dtypes, n) for n in dir(dtypes) if n.endswith("DType") and n != "ObjectDType"]
    return allowed


def save_checkpoint(path: str | os.PathLike, state: dict) -> Path:
    """Write `state` to `path` atomically: a crash mid-write leaves any previous file intact."""
    return atomic_write_with(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu", mmap: bool = False) -> dict:
    """The checkpoint's dict; `mmap=True` maps tensor storages instead of reading them (cheap peeks)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        with torch.serialization.safe_globals(_numpy_globals()):
            state = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        if "Unsupported global" in str(exc) or "GLOBAL" in str(exc):
            found = re.search(r"GLOBAL ([\w.]+)", str(exc))
            what = f" ({found.group(1)})" if found else ""
            raise CheckpointError(
                f"checkpoint {path} holds pickled code/objects{what}, which could run code when loaded, so it is "
                "refused (this tool loads checkpoints with weights_only=True). Re-save it with tensors, "
                "state_dicts and plain Python values only: in a trusted session, "
                "`s = torch.load(path, weights_only=False)`, convert objects to state_dict()/dicts, then torch.save(s, "
                "path)."
            ) from None
        raise CheckpointError(
            f"checkpoint {path} is corrupt or not a torch checkpoint: {str(exc).splitlines()[0][:200]}"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise CheckpointError(
            f"checkpoint {path} is truncated or corrupt ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:200] if str(exc) else 'no data'})"
        ) from None
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(state).__name__}, expected a dict")
    return state


def checkpoint_lineage(path: str | os.PathLike) -> str | None:
    """The `lineage` a checkpoint was written with (None: written without one), read without
    loading its tensors. Raises CheckpointError for a file that does not load."""
    try:
        state = load_checkpoint(path, mmap=True)
    except CheckpointError:
        state = load_checkpoint(path)  # mmap needs the zip format: an old-format file loads the long way
    lineage = state.get("lineage")
    return str(lineage) if lineage is not None else None


def _step_of(path: Path, prefix: str) -> int | None:
    m = re.fullmatch(rf"{re.escape(prefix)}_(\d+)\.pt", path.name)
    return int(m.group(1)) if m else None


def list_checkpoints(directory: str | os.PathLike, prefix: str) -> list[Path]:
    """`{prefix}_{step}.pt` files in `directory`, newest (highest step) first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(step, p) for p in directory.iterdir() if (step := _step_of(p, prefix)) is not None and p.is_file()]
    return [p for _, p in sorted(found, key=lambda sp: sp[0], reverse=True)]


def load_latest(
    directory: str | os.PathLike, prefix: str, map_location: str | torch.device = "cpu", lineage: str | None = None
) -> tuple[Path, dict] | None:
    """The newest checkpoint that loads (of `lineage`, when given); corrupt newer ones are skipped
    with a warning naming them, checkpoints of other lineages silently."""
    for path in list_checkpoints(directory, prefix):
        try:
            if lineage is not None and checkpoint_lineage(path) != lineage:
                continue
            return path, load_checkpoint(path, map_location)
        except CheckpointError as exc:
            warnings.warn(f"skipping unusable checkpoint {path}: {exc}", stacklevel=2)
    return None


def latest_checkpoint(directory: str | os.PathLike, prefix: str, lineage: str | None = None) -> Path | None:
    """Path of the newest checkpoint that loads (see `load_latest`)."""
    found = load_latest(directory, prefix, lineage=lineage)
    return found[0] if found else None


def prune_checkpoints(
    directory: str | os.PathLike, prefix: str, keep: int = 2, lineage: str | None = None
) -> list[Path]:
    """Delete all but the `keep` newest checkpoints; returns what was deleted.

    With `lineage`, only that lineage's checkpoints are counted and deleted: other runs' files
    (and files that do not load, which cannot be told apart) are left alone.
    """
    mine = list_checkpoints(directory, prefix)
    if lineage is not None:
        mine = [p for p in mine if _lineage_or_none(p) == lineage]
    doomed = mine[max(keep, 0) :]
    for path in doomed:
        path.unlink(missing_ok=True)
    return doomed


def _lineage_or_none(path: Path) -> str | None:
    try:
        return checkpoint_lineage(path)
    except CheckpointError:
        return None
