"""What the benchmarks share: their header facts, and the one place that writes into docs/.

A benchmark's `run()` writes only under `$RFP_HOME` (its work files, a `--quick` run's report) and
returns its summary; a full run adds a `Docs` under the key "docs": the files, copied pictures and
`docs/BENCHMARKS.md` sections it wants published. `publish`, called by `rfp bench` at the command
boundary, writes them and hands back the rest (the last-line JSON).
"""

from __future__ import annotations

import json
import platform
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

DOCS_KEY = "docs"


def platform_line() -> str:
    """The machine a number was made on, as every benchmark header gives it."""
    return f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def device_name(dev: torch.device) -> str:
    """The GPU's name, or the CPU's as `platform` knows it."""
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return f"cpu ({platform.processor() or platform.machine()})"


def today() -> str:
    return time.strftime("%Y-%m-%d")


def n_seeds(seeds: int | None, quick: bool) -> int:
    """--seeds, by default 3 (1 with --quick)."""
    from rfp_core.config import ConfigError

    n = seeds if seeds is not None else (1 if quick else 3)
    if n < 1:
        raise ConfigError(f"--seeds must be at least 1, got {n}")
    return n


def command(name: str, quick: bool, **flags: Any) -> str:
    """The command line that remakes a result: `rfp bench NAME [--quick] --flag value ...` (None left out)."""
    parts = [f"rfp bench {name}"] + (["--quick"] if quick else [])
    parts += [f"--{k} {v}" for k, v in flags.items() if v is not None]
    return " ".join(parts)


def jsonable(result: dict) -> dict:
    """Strict JSON types (paths and other objects as strings), as the last output line carries them."""
    return json.loads(json.dumps(result, default=str))


@dataclass(frozen=True)
class Section:
    """A table spliced into docs/BENCHMARKS.md between its `begin` / `end` markers."""

    begin: str
    end: str
    title: str
    table: str


@dataclass
class Docs:
    """What a full benchmark run publishes, paths relative to docs/."""

    files: dict[str, str] = field(default_factory=dict)  # path -> text
    copies: dict[str, Path] = field(default_factory=dict)  # path -> a file to copy there (grids)
    sections: list[Section] = field(default_factory=list)


def splice_benchmarks(path: Path, table: str, begin: str, end: str, title: str) -> None:
    """Put the table (without its title) between the `begin` / `end` markers of docs/BENCHMARKS.md,
    replacing what was there; a file without the markers gets a section `title` with them appended once."""
    from rfp_core.atomic import atomic_write_text

    body = table.split("\n", 2)[2].strip() if table.startswith("# ") else table.strip()
    block = f"{begin}\n{body}\n{end}"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + f"\n\n{title}\n\n" + block + "\n"
    atomic_write_text(path, text)


def write_docs(docs: Docs, root: Path) -> None:
    """Every file, copy and section of `docs` under the docs folder `root`."""
    from rfp_core.atomic import atomic_write_text

    for rel, text in docs.files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(root / rel, text)
    for rel, src in docs.copies.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, root / rel)
    for s in docs.sections:
        splice_benchmarks(root / "BENCHMARKS.md", s.table, begin=s.begin, end=s.end, title=s.title)


def publish(result: dict, root: Path | None = None) -> dict:
    """The command boundary: write the result's docs (if it has any) into docs/, return the rest."""
    from rfp_core.paths import project_root

    docs = result.pop(DOCS_KEY, None)
    if docs is not None:
        write_docs(docs, root if root is not None else project_root() / "docs")
    return result
