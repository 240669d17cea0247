"""`rfp bench quality`: the tasks, the judges, and a --quick run through the CLI.

The reference rows are where the benchmark can be checked without a trained model: the untranslated
inputs must fail on transfer and realism, and a flat colour wash must be told apart from real target
images by the two-sample test even where it fools the domain judge.
"""

import json

import pytest
import torch

from rfp_core.bench import quality as Q
from rfp_core.bench import quality_configs as QC
from rfp_core.bench import quality_judges as QJ
from rfp_core.bench import quality_tasks as QT
from rfp_core.bench.report import splice_benchmarks
from rfp_core.cli import main
from rfp_core.config import ConfigError
from rfp_core.evaluate.judges import train_content_judge, two_sample_accuracy
from rfp_core.evaluate.metrics import edge_agreements


@pytest.mark.parametrize("name", ["digits", "photo", "digits_heldout"])
def test_task_pools_are_disjoint_labelled_and_unpaired(tmp_path, name):
    task = QT.make_task(name, tmp_path / name, QT.QUICK, seed=1)
    sources = {}
    for pool in QT.POOLS:
        for d in QT._pool_domains(pool):
            folder = task.folder(pool, d)
            x, y = task.load(pool, d)
            assert x.shape[1:] == (3, QT.SIZE, QT.SIZE) and x.min() >= -1 and x.max() <= 1
            assert len(x) == QT._counts(QT.QUICK)[pool] and int(y.max()) < task.n_classes
            sources.setdefault(pool, set()).update(json.loads((folder / "sources.json").read_text()).values())
    # no digit sample / photo tile is in two pools: the translator never sees the judges' or the scored material
    pools = list(sources)
    for i, a in enumerate(pools):
        for b in pools[i + 1 :]:
            assert not sources[a] & sources[b], (a, b)
    # domain 1 really is restyled: its colour statistics differ from domain 0's
    m0, _ = QJ.channel_stats(task.load("train0", 0)[0])
    m1, _ = QJ.channel_stats(task.load("train1", 1)[0])
    assert float((m0 - m1).abs().max()) > 0.05
    if name == "digits_heldout":  # the held-out textures are not the digits task's photographs
        digits = QT.make_task("digits", tmp_path / "digits", QT.QUICK, seed=1)
        m1_digits, _ = QJ.channel_stats(digits.load("train1", 1)[0])
        assert float((m1 - m1_digits).abs().max()) > 0.02
    # a complete set is reused, not rewritten
    stamp = (task.root / "task.json").stat().st_mtime_ns
    QT.make_task(name, tmp_path / name, QT.QUICK, seed=1)
    assert (task.root / "task.json").stat().st_mtime_ns == stamp


def test_content_judge_and_two_sample_test_on_known_answers():
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(120) % 3
    # class = which third of the image is bright: learnable; noise makes every image different
    x = torch.rand(120, 3, 16, 16, generator=g) * 0.4 - 1
    for i, c in enumerate(labels.tolist()):
        x[i, :, :, 5 * c : 5 * c + 5] += 1.2
    judge = train_content_judge(x[:90], labels[:90], 3, steps=120, seed=0)
    assert judge.accuracy(x[90:], labels[90:]) >= 0.9
    with pytest.raises(ValueError, match="labels must lie"):
        train_content_judge(x[:10], labels[:10] + 5, 3, steps=1)
    # same distribution: near chance; different: told apart
    a, b = torch.rand(64, 3, 16, 16, generator=g) * 2 - 1, torch.rand(64, 3, 16, 16, generator=g) * 2 - 1
    assert two_sample_accuracy(a, b, steps=60) <= 0.75
    assert two_sample_accuracy(a, (b * 0.2 + 0.5), steps=60) >= 0.9


def test_edge_agreement_and_tint():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 3, 16, 16, generator=g) * 2 - 1
    assert edge_agreements(x, x) == pytest.approx([1.0] * 4)
    flat = torch.zeros_like(x)
    assert edge_agreements(x, flat) == pytest.approx([0.0] * 4)
    assert float(edge_agreements(x, torch.rand(4, 3, 16, 16, generator=g)).mean()) < 0.5
    stats0, stats1 = QJ.channel_stats(x), (torch.tensor([0.2, -0.1, 0.4]), torch.tensor([0.1, 0.1, 0.1]))
    m, s = QJ.channel_stats(QJ.tint(x, stats0, stats1))
    torch.testing.assert_close(m, stats1[0], atol=0.02, rtol=0)
    torch.testing.assert_close(s, stats1[1], atol=0.02, rtol=0)


def test_splice_replaces_between_the_quality_markers(tmp_path):
    path = tmp_path / "BENCHMARKS.md"
    path.write_text("# Benchmarks\n\nintro\n")
    for body in ("first table", "second table"):
        splice_benchmarks(path, f"# Title\n\n{body}\n", begin=Q.BEGIN, end=Q.END, title="## Quality")
    text = path.read_text()
    assert text.count(Q.BEGIN) == 1 and text.count("## Quality") == 1
    assert "second table" in text and "first table" not in text and text.startswith("# Benchmarks\n\nintro")


def test_row_configs_set_every_training_key_and_differ_only_in_the_loss():
    from rfp_core.config import ModelConfig

    defaults = ModelConfig().model_dump(mode="json")

    def keys(d, prefix=""):
        return {prefix + k for k, v in d.items() if not isinstance(v, dict)} | {
            kk for k, v in d.items() if isinstance(v, dict) for kk in keys(v, prefix + k + ".")
        }

    # every key that trains something: section `type` names carry no setting, and an Identity
    # codec trains nothing, so its training keys cannot move a result
    ignored = {
        k
        for k in keys(defaults)
        if k.endswith(".type") and k.count(".") == 1 or k.startswith("codec.") and k != "codec.net.type"
    } | {"domain0", "domain1"}
    for row, raw in QC.ROW_CONFIGS.items():
        assert raw["codec"]["net"]["type"] == "Identity"
        assert keys(defaults) - ignored <= keys(raw), (row, sorted(keys(defaults) - ignored - keys(raw)))
        assert QC.row_config(row, 3, quick=False).seed == 3
    strip = lambda r: {**r, "velocity": {k: v for k, v in r["velocity"].items() if k not in ("loss", "mse_weight")}}  # noqa: E731
    assert strip(QC.ROW_CONFIGS["paper"]) == strip(QC.ROW_CONFIGS["mse"]) == strip(QC.ROW_CONFIGS["anchored"])
    with pytest.raises(ConfigError, match="--rows"):
        Q._parse_list("paper,bogus", QC.ROWS, "rows")


def test_quick_run_scores_the_reference_rows_as_failures(capsys, isolated_rfp_home):
    from rfp_core.paths import project_root

    bench_md = project_root() / "docs" / "BENCHMARKS.md"
    before = bench_md.read_text() if bench_md.exists() else None
    assert main(["bench", "quality", "--quick", "--tasks", "digits", "--rows", "identity,tint,mse"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])  # the contract: last line is one JSON object
    d = out["digits"]
    assert set(d) == {"ceilings", "identity", "tint", "mse"}
    for row in ("identity", "tint", "mse"):
        assert set(d[row]) == {"content_kept", "transfer_rate"}
        assert {"mean", "std", "min", "max", "n"} <= set(d[row]["content_kept"])
    c = d["ceilings"]
    assert c["domain_judge_acc"] >= 0.8  # the domain judge beats chance on real images
    assert d["identity"]["transfer_rate"]["mean"] <= 0.2  # untranslated inputs are not called domain 1
    raw = {
        "tasks": {
            "digits": json.loads((isolated_rfp_home / "bench" / "quality" / "report" / "digits.json").read_text())
        }
    }
    rows = raw["tasks"]["digits"]["rows"]
    assert rows["identity"][0]["edge_agreement"] == pytest.approx(1.0)
    assert rows["identity"][0]["two_sample_acc"] >= 0.8  # domain 0 is trivially told from domain 1
    assert rows["tint"][0]["two_sample_acc"] >= 0.8  # the colour wash does not pass for real target images
    assert rows["mse"][0]["nfe"] == QC.QUICK_OVERRIDES["velocity"]["num_inference_steps"]
    assert rows["mse"][0]["straightness"] is not None and rows["mse"][0]["wall_s"] > 0
    report = isolated_rfp_home / "bench" / "quality" / "report"
    assert {"digits_identity.png", "digits_tint.png", "digits_mse.png", "QUALITY.md"} <= {
        p.name for p in report.iterdir()
    }
    assert "tint baseline" in (report / "QUALITY.md").read_text()
    # a --quick run leaves the docs alone
    assert (bench_md.read_text() if bench_md.exists() else None) == before


def test_item_2_rows_differ_from_their_base_row_in_their_option_only():
    def diff(a: dict, b: dict, prefix: str = "") -> set[str]:
        out = set()
        for k in a.keys() | b.keys():
            if isinstance(a.get(k), dict) and isinstance(b.get(k), dict):
                out |= diff(a[k], b[k], prefix + k + ".")
            elif a.get(k) != b.get(k):
                out.add(prefix + k)
        return out

    rows = QC.ROW_CONFIGS
    assert diff(rows["anchored_relative"], rows["anchored"]) == {"velocity.mse_weight", "velocity.mse_weight_mode"}
    assert diff(rows["paper_ot"], rows["paper"]) == {"velocity.coupling"}
    assert diff(rows["paper_bf16"], rows["paper"]) == {"velocity.bf16"}
    # configs/translate.json is the measured mse_noise05lp5_pairs1 row at --steps 2000, its precision left
    # to the machine, translated from σ 0.3 and retried up to 0.5
    assert diff(rows["recipe"], rows["mse_noise05lp5_pairs1"]) == {
        "velocity.bf16",
        "velocity.train_images",
        "velocity.translate_noise",
        "velocity.translate_retry_noise",
    }
    assert diff(rows["mse_noise05lp5_pairs1"], rows["mse_noise05_pairs1"]) == {"velocity.source_noise_lowpass"}
    assert rows["recipe"]["velocity"]["bf16"] is None
    assert QC.row_config("recipe", 0, False).velocity.total_steps == 2000
    assert QC.row_config("recipe", 0, False, steps=2000) == QC.row_config("recipe", 0, False)
    # a run is reused whatever σ it is translated from (that is applied at translation), not across seeds
    from rfp_core.bench.reuse import comparable

    recipe = QC.row_config("recipe", 0, False)
    cooler = recipe.model_copy(deep=True)
    cooler.velocity.translate_noise = 0.3
    assert comparable(cooler) == comparable(recipe) != comparable(QC.row_config("recipe", 1, False))
    assert diff(rows["mse_noise05_pairs1"], rows["mse"]) == {
        "velocity.source_noise",
        "velocity.bf16",
        "structure.pairing",  # with the base's one candidate: each input's most similar target
    }
    assert diff(rows["mse_noise05_pairs4"], rows["mse_noise05_pairs1"]) == {"structure.candidates"}
    assert diff(rows["anchored_ot"], rows["anchored"]) == {"velocity.coupling"}
    assert diff(rows["mse_ot"], rows["mse"]) == {"velocity.coupling"}
    assert diff(rows["anchored_ot_structure"], rows["anchored"]) == {"velocity.coupling", "velocity.coupling_space"}
    assert diff(rows["anchored_train_stop"], rows["anchored"]) == {"saliency.stop_on"}
    cfg = QC.row_config("anchored_ot_structure", 0, quick=True)
    assert cfg.velocity.coupling == "minibatch_ot" and cfg.structure.encoder == "thumbnail"
    assert set(QC.ROW_CONFIGS) <= set(Q._parse_list(None, QC.ROWS, "rows"))


def test_paired_task_renders_each_training_digit_in_both_domains_under_one_name(tmp_path):
    from rfp_core.flow.paired import pairing_from_filenames
    from rfp_core.media.frame_store import FrameStore
    from rfp_core.media.ingest import ingest

    task = QT.make_task("digits_paired", tmp_path / "p", QT.QUICK, seed=1)
    assert task.paired and QT.is_paired("digits_paired") and not QT.is_paired("digits")
    f0, f1 = task.folder("train0", 0), task.folder("train1", 1)
    names = sorted(json.loads((f0 / "labels.json").read_text()))
    assert len(names) == QT.QUICK.n_train and names == sorted(json.loads((f1 / "labels.json").read_text()))
    for meta in ("labels.json", "sources.json"):  # the same digit sample and label under the same name
        assert json.loads((f0 / meta).read_text()) == json.loads((f1 / meta).read_text())
    # the same pose and pen: a pair's edges agree far better than a digit's with another render of its class
    x0, x1 = task.load("train0", 0)[0], task.load("train1", 1)[0]
    paired = float(edge_agreements(x0, x1).mean())
    assert paired > 0.5
    assert paired > float(edge_agreements(x0, x1.roll(1, dims=0)).mean()) + 0.2
    # pairing by file names (rfp_core.flow.paired) finds exactly these pairs
    store = FrameStore(root=tmp_path / "store", max_side=64)
    report = ingest([f0], [f1], out=tmp_path / "m.parquet", store=store, progress=False)
    pairs = pairing_from_filenames(report.manifest_path)
    assert sorted(pairs.column("stem").to_pylist()) == [n.removesuffix(".png") for n in names]
    # the judges' and the scored pools never share a digit sample with the training pairs
    train_src = set(json.loads((f0 / "sources.json").read_text()).values())
    for pool in ("judge", "eval"):
        for d in (0, 1):
            assert not train_src & set(json.loads((task.folder(pool, d) / "sources.json").read_text()).values())


def test_paired_rows_run_on_paired_tasks_only():
    plan = Q.plan_rows(["digits", "digits_paired"], list(QC.ROWS))
    assert "paired" not in plan["digits"] and "mse" in plan["digits"] and "paper" in plan["digits"]
    assert plan["digits_paired"] == ["identity", "tint", "mse", "paired"]
    assert QC.row_pairing("paired") == "filenames" and QC.row_pairing("mse") == "unpaired"
    assert QC.row_config("paired", 0, quick=True).velocity.loss == "mse"  # the pix2pix default: plain MSE
    with pytest.raises(ConfigError, match="none runs on task digits; its rows are identity,tint,paper"):
        Q.plan_rows(["digits"], ["paired"])


def test_quick_paired_task_trains_the_paired_row_on_true_pairs(capsys, isolated_rfp_home, tmp_path):
    from rfp_core.bench.report import DOCS_KEY, publish

    assert main(["bench", "quality", "--quick", "--tasks", "digits_paired", "--rows", "mse,paired"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(out["digits_paired"]) == {"ceilings", "mse", "paired"}
    runs = isolated_rfp_home / "runs"
    paired_run, unpaired_run = (
        runs / "quality-digits_paired-paired-s0-quick",
        runs / "quality-digits_paired-mse-s0-quick",
    )
    ckpt = torch.load(paired_run / "velocity.pt", map_location="cpu", weights_only=True)
    assert ckpt["paired"]["pairs"] == QT.QUICK.n_train and ckpt["paired"]["loss"] == "mse"
    assert json.loads((paired_run / "quality.json").read_text())["pairing"] == "filenames"
    # the unpaired twin trains on the same files without pairs
    assert "paired" not in torch.load(unpaired_run / "velocity.pt", map_location="cpu", weights_only=True)
    assert "pairing" not in json.loads((unpaired_run / "quality.json").read_text())
    work = isolated_rfp_home / "bench" / "quality" / "report"
    raw = json.loads((work / "digits_paired.json").read_text())
    for row in ("mse", "paired"):
        r = raw["rows"][row][0]
        assert 0 <= r["content_kept"] <= 1 and 0 <= r["transfer_rate"] <= 1 and r["wall_s"] > 0
        assert r["nfe"] == QC.QUICK_OVERRIDES["velocity"]["num_inference_steps"] and r["straightness"] is not None
    assert "paired: true pairs (same file name), MSE" in (work / "QUALITY.md").read_text()
    # what a full run hands to `rfp bench`: the docs files, grids linked from docs/, one BENCHMARKS section
    docs_dir = tmp_path / "docs"
    rest = publish({"x": 1, DOCS_KEY: Q.docs_update(work, ["digits_paired"], docs_dir)}, root=docs_dir)
    assert rest == {"x": 1}
    published = json.loads((docs_dir / "quality" / "digits_paired.json").read_text())
    assert published["rows"] == raw["rows"] and published["header"] == raw["header"]
    assert published["grids"]["paired"] == str(docs_dir / "quality" / "digits_paired_paired.png")
    assert (docs_dir / "quality" / "digits_paired_paired.png").read_bytes() == (
        work / "digits_paired_paired.png"
    ).read_bytes()
    bench = (docs_dir / "BENCHMARKS.md").read_text()
    assert bench.count(Q.BEGIN) == 1 and "[paired](quality/digits_paired_paired.png)" in bench


def test_a_run_recorded_before_a_config_key_existed_is_reused_and_a_changed_one_is_not(tmp_path):
    from rfp_core.bench.reuse import comparable, finished

    cfg = QC.row_config("paper", 0, quick=True)
    old = comparable(cfg)
    del old["velocity"]["source_noise"]  # the marker of a run made before the key existed
    (tmp_path / "velocity.pt").write_bytes(b"")
    (tmp_path / "quality.json").write_text(json.dumps({"config": old, "train_seconds": 12.5}))
    assert finished(tmp_path, "quality.json", {"config": comparable(cfg)}) == 12.5
    noisy = QC.row_config("paper", 0, quick=True).model_copy(deep=True)
    noisy.velocity.source_noise = 0.5
    assert finished(tmp_path, "quality.json", {"config": comparable(noisy)}) is None
