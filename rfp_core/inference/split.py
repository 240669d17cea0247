"""`rfp split`: sort an unsorted pile of images into domain0 / domain1 / uncertain.

A run's trained saliency classifier scores each image (centred square at the run's
`max_size`, through the run's codec when it works in a latent space). p(domain 1) >=
threshold -> domain1, p(domain 0) >= threshold -> domain0, else uncertain. Files are copied,
never moved; a file whose md5 was seen before (in this pile or already in the output) is
skipped; an ignore list (paths or md5s, one a line, `#` comments) leaves files out.
A `split_report.csv` in the output lists every decision.
"""

from __future__ import annotations

import csv
import io
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from rfp_core.atomic import atomic_path, atomic_write_text
from rfp_core.config import ConfigError
from rfp_core.config_files import config_from_dict
from rfp_core.media.hashing import md5_file
from rfp_core.media.images import ImageLoadError, find_images, load_image

LABELS = ("domain0", "domain1", "uncertain")
_MD5 = re.compile(r"^[0-9a-fA-F]{32}$")


@dataclass
class SplitItem:
    source: Path
    md5: str
    label: str
    p_domain1: float
    dest: Path


@dataclass
class SplitReport:
    output: Path
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(LABELS, 0))
    duplicates: int = 0  # same md5 as an earlier file of this pile
    already_sorted: int = 0  # md5 already present in the output folders (an earlier split)
    ignored: int = 0
    unreadable: list[str] = field(default_factory=list)
    items: list[SplitItem] = field(default_factory=list)

    @property
    def report_path(self) -> Path:
        return self.output / "split_report.csv"


def read_ignore_list(path: Path) -> tuple[set[str], set[Path]]:
    """(md5s, resolved paths) named in an ignore file; relative paths resolve against the
    working directory and, failing that, the ignore file's own folder."""
    if not path.is_file():
        raise ConfigError(f"ignore list {path} does not exist (a text file of paths or md5s, one a line)")
    md5s: set[str] = set()
    paths: set[Path] = set()
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if _MD5.match(line):
            md5s.add(line.lower())
            continue
        p = Path(line).expanduser()
        if not p.is_absolute() and not p.exists():
            p = path.parent / p
        paths.add(p.resolve())
    return md5s, paths


def load_classifier(run: Path, device: torch.device):
    """(saliency net, codec, image size) of a run folder (or a saliency.pt file)."""
    from rfp_core.checkpoint import load_checkpoint
    from rfp_core.original import find_original_run, is_original_run, load_original_nets, load_original_saliency
    from rfp_core.train.saliency import load_saliency

    folder = run if run.is_dir() else run.parent
    if is_original_run(folder) and not (folder / "saliency.pt").is_file():  # the original trainer's run folder
        found = find_original_run(folder)
        if run.suffix == ".ckpt":
            found.saliency = run
        _, codec = load_original_nets(found, device)
        return load_original_saliency(found, device), (None if codec.is_identity else codec), found.cfg.max_size
    ckpt_path = run / "saliency.pt" if run.is_dir() else run
    if not ckpt_path.is_file():
        raise ConfigError(
            f"{ckpt_path}: no saliency checkpoint; train the run first (rfp train) or pass its folder with --run"
        )
    cfg = config_from_dict(load_checkpoint(ckpt_path, map_location="cpu")["config"], source=str(ckpt_path))
    net = load_saliency(ckpt_path, device)
    codec = None
    if net.latent_input:
        from rfp_core.train.codec_io import load_codec

        codec_path = ckpt_path.parent / "codec.pt"
        if not codec_path.is_file():
            raise ConfigError(
                f"{ckpt_path} classifies codec latents but {codec_path} is missing; copy the run's codec.pt beside it"
            )
        codec = load_codec(None, codec_path, device)
    return net, codec, cfg.max_size


def _dest(folder: Path, src: Path, md5: str) -> Path:
    dest = folder / src.name
    return dest if not dest.exists() else folder / f"{src.stem}_{md5[:8]}{src.suffix}"


def _existing_md5s(output: Path) -> set[str]:
    return {md5_file(p) for label in LABELS if (output / label).is_dir() for p in find_images([output / label])}


@torch.inference_mode()
def split_folder(
    run: Path,
    inputs: list[Path],
    output: Path,
    threshold: float = 0.7,
    ignore: Path | None = None,
    device: str | torch.device | None = None,
    batch_size: int = 32,
    progress: bool = True,
) -> SplitReport:
    """Copy every image under `inputs` into output/domain0, /domain1 or /uncertain."""
    from rfp_core.device import pick_device

    if not 0.5 < threshold <= 1.0:
        raise ConfigError(
            f"threshold must be in (0.5, 1], got {threshold}: below 0.5 an image could belong to both domains"
        )
    run, output = Path(run), Path(output)
    device = pick_device(device)
    net, codec, size = load_classifier(run, device)
    ignore_md5, ignore_paths = read_ignore_list(Path(ignore)) if ignore else (set(), set())
    out_resolved = output.resolve()
    files = [p for p in find_images(inputs) if out_resolved not in p.resolve().parents]  # output inside an input

    report = SplitReport(output)
    todo = _to_sort(files, report, ignore_md5, ignore_paths, _existing_md5s(output))
    for label in LABELS:
        (output / label).mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=len(todo), desc="split", unit="image", disable=not progress)
    for start in range(0, len(todo), batch_size):
        chunk = todo[start : start + batch_size]
        _sort_batch(chunk, net, codec, size, device, threshold, output, report)
        bar.update(len(chunk))
    bar.close()
    _write_report(report)
    return report


def _to_sort(
    files: list[Path], report: SplitReport, ignore_md5: set[str], ignore_paths: set[Path], existing: set[str]
) -> list[tuple[Path, str]]:
    """(path, md5) of the files still to sort; ignored, duplicate and already sorted ones counted."""
    seen: set[str] = set()
    todo: list[tuple[Path, str]] = []
    for path in files:
        if path.resolve() in ignore_paths:
            report.ignored += 1
            continue
        md5 = md5_file(path)
        if md5 in ignore_md5:
            report.ignored += 1
        elif md5 in seen:
            report.duplicates += 1
        elif md5 in existing:
            report.already_sorted += 1
        else:
            seen.add(md5)
            todo.append((path, md5))
    return todo


@torch.no_grad()
def _sort_batch(
    chunk: list[tuple[Path, str]], net, codec, size: int, device, threshold: float, output: Path, report: SplitReport
) -> None:
    """Classify one batch and copy each image (atomically) into its label's folder."""
    batch, tensors = [], []
    for path, md5 in chunk:
        try:
            tensors.append(load_image(path, size))
            batch.append((path, md5))
        except ImageLoadError as exc:
            report.unreadable.append(str(exc))
    if not batch:
        return
    x = torch.stack(tensors).to(device)
    p1 = torch.softmax(net(codec.encode(x) if codec is not None else x).float(), dim=1)[:, 1].cpu().tolist()
    for (path, md5), p in zip(batch, p1):
        label = "domain1" if p >= threshold else "domain0" if 1.0 - p >= threshold else "uncertain"
        dest = _dest(output / label, path, md5)
        with atomic_path(dest) as tmp:
            shutil.copyfile(path, tmp)
        report.counts[label] += 1
        report.items.append(SplitItem(path, md5, label, p, dest))


def _write_report(report: SplitReport) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["source", "md5", "label", "p_domain1", "dest"])
    writer.writerows([str(i.source), i.md5, i.label, f"{i.p_domain1:.4f}", str(i.dest)] for i in report.items)
    atomic_write_text(report.report_path, buf.getvalue())
