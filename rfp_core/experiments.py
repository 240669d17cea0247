"""Experiment files and the content digests the sensors compare (no Dagster here).

`spec_digest` is what an experiment *asks for* (folders + fully resolved model config);
`folder_digest` is what its folders *hold* (the md5 of every media file, per domain). Both
ignore mtimes, so touching a file changes neither.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from rfp_core.config import ModelConfig
from rfp_core.config_experiment import ExperimentConfig
from rfp_core.config_files import config_from_dict, experiment_model_config, load_experiment
from rfp_core.media.decode import discover
from rfp_core.media.hashing import HashCache

NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-.")


def experiment_files(experiments_dir: Path) -> dict[str, Path]:
    """`<name>.json` files in the folder (hidden ones skipped), by name."""
    if not experiments_dir.is_dir():
        return {}
    out = {}
    for path in sorted(experiments_dir.glob("*.json")):
        if path.name.startswith("."):
            continue
        out[path.stem] = path
    return out


def check_name(name: str, path: Path) -> None:
    # the name becomes a partition key, a folder name and an MLflow experiment/model name
    if not name or not set(name) <= NAME_CHARS or name.startswith("."):
        raise ValueError(f"{path}: experiment names may use letters, digits, '_', '-' and '.' only; rename the file")


def load(path: Path, root: Path) -> ExperimentConfig:
    check_name(path.stem, path)
    return load_experiment(path, root=root)


def _portable(p: Path, root: Path) -> str:
    # folders inside the project are recorded relative to it, so moving the checkout keeps versions
    try:
        return Path(os.path.relpath(p, root)).as_posix() if Path(p).resolve().is_relative_to(root.resolve()) else str(p)
    except ValueError:
        return str(p)


def resolved_spec(exp: ExperimentConfig, root: Path) -> dict[str, Any]:
    """The experiment with folders and the model config fully resolved (JSON-ready).

    The model config carries the domains too (as `rfp train` does), so `generative` is right.
    """
    domain0 = "random" if exp.generative else [_portable(p, root) for p in exp.domain0]
    domain1 = [_portable(p, root) for p in exp.domain1]
    cfg = experiment_model_config(exp).model_copy(update={"domain0": domain0, "domain1": domain1})
    return {
        "name": exp.name,
        "domain0": domain0,
        "domain1": domain1,
        "masks": None if exp.masks is None else _portable(exp.masks, root),
        "config_file": _portable(exp.config, root),
        "overrides": exp.overrides,
        "model_config": json.loads(cfg.to_json()),
        # only when set, so an experiment without reflow keeps the spec (and the training) it had
        **({"reflow": exp.reflow} if exp.reflow is not None else {}),
        **({"translate": [_portable(p, root) for p in exp.translate]} if exp.translate else {}),
        **({"pairing": exp.pairing} if exp.pairing != "unpaired" else {}),
    }


def model_config(spec: dict[str, Any]) -> ModelConfig:
    return config_from_dict(spec["model_config"], source=f"experiment {spec['name']}")


def spec_digest(spec: dict[str, Any]) -> str:
    # the config file's name is not content: two files with the same resolved config are the same;
    # what to translate with the trained model does not change what is trained
    body = {k: v for k, v in spec.items() if k not in ("config_file", "overrides", "name", "translate")}
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()


def spec_domains(spec: dict[str, Any], root: Path) -> tuple[list[Path] | str, list[Path]]:
    """The spec's folders as absolute paths (domain0 may be "random")."""
    absolute = lambda p: Path(p) if Path(p).is_absolute() else root / p  # noqa: E731
    d0 = spec["domain0"]
    return ("random" if d0 == "random" else [absolute(p) for p in d0]), [absolute(p) for p in spec["domain1"]]


def folder_digest(domain0: list[Path] | str, domain1: list[Path], cache: HashCache) -> str:
    """sha256 over the sorted (domain, md5) of every media file in the experiment's folders.

    md5s come from `cache`, which re-hashes only files whose stat fingerprint changed: a touched
    file is read once, its md5 is unchanged and so is the digest. Copies and renames count once.
    """
    pairs: set[tuple[int, str]] = set()
    domains = [(0, domain0), (1, domain1)]
    for domain, folders in domains:
        if folders == "random":
            pairs.add((domain, "random"))
            continue
        for media in discover(list(folders)):
            try:
                pairs.add((domain, cache.md5(media.path)))
            except OSError:
                continue  # vanished or unreadable mid-scan: ingest records it, the next tick sees it
    digest = hashlib.sha256()
    for domain, md5 in sorted(pairs):
        digest.update(f"{domain}\t{md5}\n".encode())
    return digest.hexdigest()
