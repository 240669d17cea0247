"""The velocity phase's speed switches (train/speed.py) and `rfp bench train --switches`."""

import json
import shutil

import pyarrow as pa
import pytest
import torch
from test_velocity_options import TINY, _short, velocity_again

from rfp_core.bench import train as bench_train
from rfp_core.bench import train_switches
from rfp_core.checkpoint import load_checkpoint
from rfp_core.cli import main
from rfp_core.config import ConfigError, VelocityConfig
from rfp_core.config_files import config_from_dict, load_config
from rfp_core.train import speed
from rfp_core.train.resume import velocity_inputs
from rfp_core.train.run import train_run

MICRO = dict(
    name="micro",
    size=16,
    batch=2,
    unet=dict(model_channels=8, ch_mult=[1, 2], num_res_blocks=1, normalization="GroupNormAuto"),
    backbone="resnet18",
    rounds=1,
    block=1,
    sizes="a UNet of 8 channels at 16 px",
)


def test_switch_defaults_keep_the_plain_path_and_misspelt_keys_are_named():
    vc = load_config(TINY).velocity
    assert (vc.channels_last, vc.adamw, vc.compile, vc.cpu_threads) == (False, "default", False, None)
    net = torch.nn.Conv2d(3, 4, 3)
    assert speed.prepare_net(net, vc) is net and speed.compiled(net, vc) is net
    opt = speed.make_optimizer(net, vc).defaults
    assert opt["foreach"] is None and not opt["fused"] and opt["lr"] == vc.learning_rate
    on = VelocityConfig(channels_last=True, adamw="fused")
    assert speed.prepare_net(net, on).weight.is_contiguous(memory_format=torch.channels_last)
    assert speed.make_optimizer(net, on).defaults["fused"] is True
    assert speed.make_optimizer(net, VelocityConfig(adamw="foreach")).defaults["foreach"] is True
    old = torch.get_num_threads()
    try:
        speed.set_threads(VelocityConfig(cpu_threads=old + 1), torch.device("cpu"))
        assert torch.get_num_threads() == old + 1
        speed.set_threads(VelocityConfig(cpu_threads=old + 2), torch.device("cuda"))  # CPU runs only
        assert torch.get_num_threads() == old + 1
    finally:
        torch.set_num_threads(old)
    with pytest.raises(ConfigError, match="channels_last"):
        load_config(TINY, overrides={"velocity": {"chanels_last": True}})
    with pytest.raises(ConfigError, match="adamw"):
        load_config(TINY, overrides={"velocity": {"adamw": "fast"}})
    # a switch does not change what a run is: the lineage a resume checks stays the same
    fast = load_config(TINY, overrides={"velocity": {"adamw": "foreach", "cpu_threads": 1, "channels_last": True}})
    table = pa.table({"frame_key": ["k"], "domain": [1], "status": ["ok"]})
    plain = velocity_inputs(json.loads(load_config(TINY).to_json()), table, None, None)
    assert velocity_inputs(json.loads(fast.to_json()), table, None, None) == plain


def test_foreach_adamw_trains_the_same_weights_channels_last_and_bf16_nearly(tmp_path, monkeypatch):
    monkeypatch.setenv("RFP_HOME", str(tmp_path / "home"))
    cfg, d0, d1 = _short(tmp_path)
    run = train_run(cfg, [d0], [d1], run_id="plain", device="cpu", progress=False)
    plain = load_checkpoint(run / "velocity.pt")["velocity"]
    base = json.loads((run / "config.json").read_text())
    # bf16 autocast rounds the velocity net's activations to 8 bits of mantissa: near, not equal
    tolerance = {"adamw": 0, "channels_last": 1e-3, "bf16": 2e-2}
    for switches in ({"adamw": "foreach", "cpu_threads": 1}, {"channels_last": True}, {"bf16": True}):
        base["velocity"].update(switches)
        out = tmp_path / f"v_{'_'.join(switches)}"
        shutil.rmtree(out, ignore_errors=True)
        result = velocity_again(run, out, config_from_dict(base))
        product = load_checkpoint(result.checkpoint)
        assert product["precision"] == ("bf16" if switches.get("bf16") else "float32")
        got = product["velocity"]
        diff = max((plain[k].float() - got[k].float()).abs().max().item() for k in plain)
        bound = tolerance[next(iter(switches))]
        assert diff == 0 if bound == 0 else 0 < diff < bound, (switches, diff)
        for k in switches:
            base["velocity"].pop(k)


def test_bf16_left_out_means_where_the_device_has_bf16_kernels():
    cpu = torch.device("cpu")
    assert VelocityConfig().bf16 is None and load_config(TINY).velocity.bf16 is False  # tiny.json pins float32
    assert speed.uses_bf16(VelocityConfig(), cpu) == speed.native_bf16(cpu)
    assert speed.uses_bf16(VelocityConfig(bf16=True), cpu) and not speed.uses_bf16(VelocityConfig(bf16=False), cpu)
    assert not speed.uses_bf16(VelocityConfig(bf16=True), torch.device("mps"))  # no bf16 autocast there
    assert isinstance(speed.velocity_autocast(VelocityConfig(bf16=True), cpu), torch.autocast)
    # the original's key, in its flat files: set = as written, left out = None
    flat = {"type": "RFPix2pixModel", "max_size": 32}
    assert config_from_dict({**flat, "bf16": True}).velocity.bf16 is True
    assert config_from_dict(flat).velocity.bf16 is None


def test_switch_bench_measures_numbers_and_rewrites_its_docs_block(tmp_path):
    ctx = train_switches._setup(MICRO, torch.device("cpu"))
    same = train_switches.measure_switch(ctx, MICRO, {}, {"adamw": "foreach"}, steps=2)
    assert same["max_weight_diff"] == 0 and same["ms_per_step"]["on"] > 0 and same["cpu_ms_per_step"]["off"] > 0
    moved = train_switches.measure_switch(ctx, MICRO, {}, {"adamw": "fused"}, steps=2)
    assert moved["max_weight_diff"] > 0  # fused AdamW rounds differently
    # the attention kernel: the math path against flash, on a DiT (the same sums, another order)
    dit = dict(MICRO, unet=dict(type="DiT", patch_size=2, hidden_size=32, depth=1, num_heads=2))
    kernels = train_switches.measure_switch(
        train_switches._setup(dit, torch.device("cpu")), dit, *train_switches.SWITCHES["sdpa_flash"], steps=2
    )
    assert 0 <= kernels["max_weight_diff"] < 1e-5 and kernels["ms_per_step"]["on"] > 0
    result = {
        "configs": {"micro": {"sizes": MICRO["sizes"], "batch": 2, "switches": {"adamw_foreach": same}}},
        "device": "cpu",
        "machine": "test",
        "torch": torch.__version__,
        "load_average": {"before": [1.0], "after": [2.0]},
        "date": "today",
    }
    table = train_switches.markdown(result)
    assert "| micro (batch 2) | `adamw_foreach` |" in table and train_switches.COMMAND in table
    docs = tmp_path / "BENCHMARKS.md"
    docs.write_text("# Benchmarks\n\nkept\n")
    train_switches.write_docs(table, docs)
    train_switches.write_docs(table.replace("today", "tomorrow"), docs)
    text = docs.read_text()
    assert text.startswith("# Benchmarks\n\nkept\n") and text.count(train_switches.BEGIN) == 1
    assert "tomorrow" in text and "today" not in text


def test_bench_train_keeps_the_jvp_in_float32_under_bf16_and_counts_the_originals_extra_flops():
    out = bench_train.measure(dict(MICRO, loss_rounds=1), torch.device("cpu"))
    assert out["flop_ratios"]["speedup_vs_reference"] > 1 and out["gflops_per_image"]["loss_reference"] > 0
    assert set(out["step_fractions"]) == {"velocity_net", "loss", "optimizer"} and out["loss_step_ms"]["optimizer"] > 0
    assert ("bf16" in out) == speed.native_bf16(torch.device("cpu"))
    if "bf16" in out:  # this project's loss under autocast is float32's; the original's bf16 jvp is not
        err = out["bf16"]["loss_gradient_rel_error"]
        assert err["fast_under_bf16_autocast"] < 1e-6 < 1e-3 < err["reference_under_bf16_autocast"]
        assert {"fast_bf16", "reference_bf16", "generative_bf16"} <= set(out["ms_per_step"])


def test_switches_is_an_option_of_bench_train_only(capsys):
    assert main(["bench", "ingest", "--switches"]) == 2
    assert "`rfp bench ingest` does not take these" in capsys.readouterr().err
