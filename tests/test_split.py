"""`rfp split`: a tiny trained classifier sorts a generated mixed pile into domain folders."""

from __future__ import annotations

import csv
import hashlib
import shutil

import numpy as np
import pytest
from disc_data import disc_image, make_discs

from rfp_core.cli import main
from rfp_core.config import ConfigError
from rfp_core.config_files import config_from_dict
from rfp_core.inference.split import split_folder
from rfp_core.media.frame_store import FrameStore
from rfp_core.media.ingest import ingest

SIZE = 16


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A run folder with a saliency.pt trained for a few steps on warm flat vs cool striped discs."""
    from rfp_core.train.saliency import train_saliency

    root = tmp_path_factory.mktemp("split_run")
    d0, d1 = make_discs(root / "data", n=32, size=SIZE, seed=1)
    store = FrameStore(root / "store", max_side=64)
    manifest = ingest([d0], [d1], root / "manifest.parquet", store, progress=False).manifest_path
    cfg = config_from_dict(
        {
            "max_size": SIZE,
            "saliency": {
                "net": {"backbone": "resnet18", "pretrained": False, "latent_channels": 16},
                "learning_rate": 1e-3,
                "accuracy_threshold": 1.0,
                "warmup_threshold": 0.9,
                "eval_every": 5,
                "max_steps": 300,
                "augmentations": [],
                "label_smoothing": 0.0,
                "batch_size": 16,
                "holdout_fraction": 0.25,
                "stop_on": "holdout",
            },
        }
    )
    result = train_saliency(cfg, manifest, root / "run", store=store, progress=False)
    assert result.accuracy == 1.0
    return root / "run"


def _pile(tmp_path):
    """30 generated images (15 per domain, two folders deep), 3 byte-identical copies, 2 to ignore, 1 broken."""
    rng = np.random.default_rng(7)
    truth: dict[str, str] = {}  # md5 -> true label
    pile = tmp_path / "pile"
    made = []
    for i in range(30):
        domain = i % 2
        path = pile / ("sub" if i % 3 == 0 else "") / f"img_{i:02d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        disc_image(domain, rng, 24).save(path)  # another size than training: split resizes
        truth[hashlib.md5(path.read_bytes()).hexdigest()] = f"domain{domain}"
        made.append(path)
    for i in range(3):
        shutil.copyfile(made[i + 1], pile / f"copy_{i}.png")
    extra = tmp_path / "more"
    extra.mkdir()
    disc_image(0, rng, 24).save(extra / "skip_by_md5.png")
    disc_image(1, rng, 24).save(extra / "skip_by_path.png")
    (extra / "broken.png").write_bytes(b"not a png")
    ignore = tmp_path / "ignore.txt"
    ignore.write_text(
        "# leave these out\n"
        f"{hashlib.md5((extra / 'skip_by_md5.png').read_bytes()).hexdigest()}\n"
        "more/skip_by_path.png\n"  # relative to the ignore file's folder
    )
    return [pile, extra], ignore, truth


def test_split_sorts_a_mixed_pile(trained_run, tmp_path):
    inputs, ignore, truth = _pile(tmp_path)
    out = tmp_path / "sorted"
    report = split_folder(trained_run, inputs, out, threshold=0.7, ignore=ignore, device="cpu", progress=False)

    assert report.duplicates == 3 and report.ignored == 2 and len(report.unreadable) == 1
    assert "broken.png" in report.unreadable[0]
    assert sum(report.counts.values()) == 30
    decided = [i for i in report.items if i.label != "uncertain"]
    correct = sum(truth[i.md5] == i.label for i in decided)
    assert len(decided) >= 20 and correct / len(decided) >= 0.9, (correct, len(decided), report.counts)
    for label in ("domain0", "domain1", "uncertain"):
        files = sorted((out / label).iterdir())
        assert len(files) == report.counts[label]
        assert all(hashlib.md5(f.read_bytes()).hexdigest() in truth for f in files)
    assert all(i.source.exists() for i in report.items)  # copied, not moved
    rows = list(csv.DictReader(report.report_path.open()))
    assert len(rows) == 30 and {r["label"] for r in rows} <= {"domain0", "domain1", "uncertain"}

    # splitting into the same output again copies nothing: every md5 is already there
    again = split_folder(trained_run, inputs, out, ignore=ignore, device="cpu", progress=False)
    assert again.already_sorted == 33 and again.duplicates == 0 and sum(again.counts.values()) == 0
    assert sum(len(list((out / label).iterdir())) for label in ("domain0", "domain1", "uncertain")) == 30


def test_split_cli_and_errors(trained_run, tmp_path, capsys):
    inputs, ignore, _ = _pile(tmp_path)
    out = tmp_path / "cli_out"
    rc = main(
        [
            "split",
            "--run",
            str(trained_run),
            "--input",
            *map(str, inputs),
            "--output",
            str(out),
            "--threshold",
            "0.9",
            "--ignore",
            str(ignore),
            "--device",
            "cpu",
        ]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    assert "duplicates skipped 3" in printed and "ignored 2" in printed and "split_report.csv" in printed
    assert (out / "domain0").is_dir() and (out / "uncertain").is_dir()

    with pytest.raises(ConfigError, match="threshold"):
        split_folder(trained_run, inputs, out, threshold=0.4)
    with pytest.raises(ConfigError, match="no saliency checkpoint"):
        split_folder(tmp_path, inputs, out)
    with pytest.raises(ConfigError, match="ignore list"):
        split_folder(trained_run, inputs, out, ignore=tmp_path / "none.txt")
    assert main(["split", "--run", str(tmp_path), "--input", str(inputs[0]), "--output", str(out)]) == 2
