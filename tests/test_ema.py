"""The EMA's warm-up: short runs reach the configured decay (issue 17, item 3)."""

import pytest
from torch import nn

from rfp_core.config_files import config_from_dict
from rfp_core.train.ema import EMA, horizon_note, warmup_steps_for


def _weights_after(ema: EMA, values: list[float]) -> float:
    net = nn.Linear(1, 1, bias=False)
    for v in values:
        net.weight.data.fill_(v)
        ema.update(net)
    return float(ema.model.weight)


@pytest.mark.parametrize("decay", [0.9, 0.995, 0.999])
def test_the_configured_decay_is_reached_after_its_horizon(decay):
    ema = EMA(nn.Linear(1, 1), decay)
    horizon = round(decay / (1 - decay))  # 9, 199, 999 updates: what a short run can afford
    ema.updates = horizon
    assert ema.current_decay() == pytest.approx(decay)
    ema.updates = horizon // 2
    assert ema.current_decay() < decay
    # the old (1 + n) / (10 + n) ramp was still at 0.957 after 199 updates of a 0.995 EMA
    assert warmup_steps_for(decay, None) == horizon


def test_the_warm_up_is_the_running_mean_so_no_weight_is_over_counted():
    values = [float(v) for v in range(1, 21)]
    ema = EMA(nn.Linear(1, 1, bias=False), 0.95)  # horizon 20: 19 warm-up updates
    assert _weights_after(ema, values) == pytest.approx(sum(values) / len(values), rel=1e-6)
    # after the warm-up the configured decay acts
    before = float(ema.model.weight)
    assert _weights_after(ema, [100.0]) == pytest.approx(0.95 * before + 0.05 * 100.0, rel=1e-6)


def test_explicit_warm_up_lengths():
    # 0: the original trainer's constant decay from the first update (the initial weights count)
    ema = EMA(nn.Linear(1, 1, bias=False), 0.5, warmup_steps=0)
    ema.model.weight.data.fill_(0.0)
    assert _weights_after(ema, [1.0, 1.0]) == pytest.approx(0.75)
    # a longer ramp: the horizon grows linearly, 1 at the start, 1 / (1 - decay) at the end
    ema = EMA(nn.Linear(1, 1), 0.99, warmup_steps=1000)
    ema.updates = 500
    assert 1 / (1 - ema.current_decay()) == pytest.approx(1 + 500 * 99 / 1000)
    ema.updates = 1000
    assert ema.current_decay() == pytest.approx(0.99)
    assert EMA(nn.Linear(1, 1), 0.0).current_decay() == 0.0


def test_config_key_and_the_short_run_warning():
    cfg = config_from_dict({"ema": 0.99, "ema_warmup_steps": 0})  # the flat (original) layout
    assert cfg.velocity.ema_warmup_steps == 0
    assert config_from_dict({}).velocity.ema_warmup_steps is None
    assert horizon_note(0.995, 1000) is None
    note = horizon_note(0.995, 200)
    assert note is not None and "~200 steps" in note and "0.99" in note
    assert horizon_note(0.0, 10) is None
