"""Where the tool keeps its state: one root, `$RFP_HOME`, for everything it writes."""

from __future__ import annotations

import os
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent


def project_root() -> Path:
    """The checkout this package lives in (editable install), else the working directory."""
    candidate = PACKAGE_DIR.parent
    if (candidate / "pyproject.toml").exists():
        return candidate
    return Path.cwd()


def rfp_home() -> Path:
    """Root of all state: frame store, hash cache, runs, MLflow store. `$RFP_HOME` overrides."""
    env = os.environ.get("RFP_HOME")
    root = Path(env).expanduser() if env else project_root() / ".rfp_home"
    root.mkdir(parents=True, exist_ok=True)
    return root.resolve()


def store_dir() -> Path:
    return rfp_home() / "store"


def runs_dir() -> Path:
    return rfp_home() / "runs"


def cache_dir() -> Path:
    return rfp_home() / "cache"


def resolve_against_root(path: str | os.PathLike, root: Path | None = None) -> Path:
    """Relative paths in experiment and config files resolve against the project root."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else (root or project_root()) / p
