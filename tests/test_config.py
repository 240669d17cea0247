import json
from pathlib import Path

import pytest

from rfp_core.cli import main as rfp
from rfp_core.config import ConfigError
from rfp_core.config_files import experiment_model_config, load_config, load_experiment

HERE = Path(__file__).parent
FLAT = HERE / "original_flat_config.json"

# The same model in the trainer's later, nested layout.
NESTED = {
    "type": "RFPix2pixModel",
    "max_size": 128,
    "structure": {"pairing": False, "candidates": 8},
    "velocity": {
        "sample_batch_size": 8,
        "train_batch_size": 48,
        "train_minibatch_size": 24,
        "train_images": 6000000,
        "learning_rate": 0.0002,
        "num_inference_steps": 12,
        "timestep_sampling": "logit-normal",
        "net": {
            "type": "UNet",
            "model_channels": 128,
            "ch_mult": [1, 2, 4, 8, 8],
            "normalization": "GroupNorm32",
            "activation": "SiLU",
            "num_res_blocks": 2,
            "zero_res_blocks": False,
            "attention_resolutions": [],
            "num_attention_heads": 8,
        },
    },
    "saliency": {
        "learning_rate": 0.00005,
        "accuracy_threshold": 0.995,
        "warmup_threshold": 0.90,
        "blend_fraction": 0.0,
        "label_smoothing": 0.1,
        "augmentations": ["color_jitter", "grayscale", "hflip", "random_erasing"],
        "net": {
            "type": "ResNetSaliencyNet",
            "backbone": "resnet50",
            "num_classes": 2,
            "pretrained": True,
            "latent_channels": 512,
        },
    },
}


def write(tmp_path: Path, name: str, data: dict) -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


def test_flat_and_nested_formats_load_to_equal_configs(tmp_path):
    flat = load_config(FLAT)
    nested = load_config(write(tmp_path, "nested.json", NESTED))
    assert flat == nested
    assert flat.velocity.net.ch_mult == [1, 2, 4, 8, 8]
    assert flat.saliency.net.backbone == "resnet50"
    assert flat.saliency.accuracy_threshold == 0.995
    assert flat.velocity.accumulation_steps == 2
    assert flat.velocity.total_steps == 6000000 // 48


def test_misspelt_key_is_named_with_file_and_suggestion(tmp_path):
    raw = json.loads(FLAT.read_text())
    raw["velocity_net"]["model_chanels"] = raw["velocity_net"].pop("model_channels")
    path = write(tmp_path, "typo.json", raw)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = str(err.value)
    assert str(path) in msg
    assert "velocity_net.model_chanels" in msg
    assert "did you mean 'model_channels'" in msg


def test_misspelt_top_level_flat_key(tmp_path):
    raw = json.loads(FLAT.read_text())
    raw["saliency_acuracy_threshold"] = raw.pop("saliency_accuracy_threshold")
    with pytest.raises(ConfigError, match="saliency_acuracy_threshold"):
        load_config(write(tmp_path, "typo.json", raw))


def test_wrong_type_names_key_and_expectation(tmp_path):
    raw = dict(NESTED, velocity=dict(NESTED["velocity"], train_images="lots"))
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, "bad.json", raw))
    assert "velocity.train_images" in str(err.value)
    assert "integer" in str(err.value)


def test_batch_must_be_a_multiple_of_minibatch(tmp_path):
    raw = json.loads(FLAT.read_text())
    raw["train_minibatch_size"] = 20
    with pytest.raises(ConfigError, match="multiple of"):
        load_config(write(tmp_path, "bad.json", raw))


def test_not_json_and_missing_file(tmp_path):
    bad = tmp_path / "broken.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "absent.json")


def test_overrides_merge_in_either_format():
    cfg = load_config(FLAT, overrides={"velocity": {"train_images": 96}, "max_size": 32})
    assert (cfg.velocity.train_images, cfg.max_size) == (96, 32)
    cfg = load_config(FLAT, overrides={"train_images": 96, "saliency_net": {"backbone": "resnet18"}})
    assert (cfg.velocity.train_images, cfg.saliency.net.backbone) == (96, "resnet18")
    assert cfg.saliency.net.latent_channels == 512  # untouched keys survive the merge


def test_experiment_resolves_relative_paths(tmp_path):
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "m.json").write_text(FLAT.read_text())
    exp_path = write(
        tmp_path,
        "horses.json",
        {"domain0": "random", "domain1": "data/zebras", "config": "configs/m.json", "overrides": {"max_size": 64}},
    )
    exp = load_experiment(exp_path, root=tmp_path)
    assert exp.name == "horses" and exp.generative
    assert exp.domain1 == [tmp_path / "data" / "zebras"]
    assert experiment_model_config(exp).max_size == 64


def test_experiment_with_missing_config_names_it(tmp_path):
    path = write(tmp_path, "e.json", {"domain0": ["a"], "domain1": ["b"], "config": "nope.json"})
    with pytest.raises(ConfigError, match="nope.json"):
        load_experiment(path, root=tmp_path)


def test_cli_config_show_prints_resolved_json(capsys, tmp_path):
    assert rfp(["config", "show", str(FLAT)]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["velocity"]["net"]["model_channels"] == 128
    assert shown["codec"]["net"]["type"] == "Identity"
    raw = json.loads(FLAT.read_text())
    raw["velocity_nett"] = {}
    assert rfp(["config", "show", str(write(tmp_path, "x.json", raw))]) == 2
    assert "velocity_nett" in capsys.readouterr().err
