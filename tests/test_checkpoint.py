import random

import numpy as np
import pytest
import torch
from torch import nn

from rfp_core.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    load_latest,
    prune_checkpoints,
    save_checkpoint,
)


class NotData:
    """A class instance: unpickling it needs its code, so weights_only loading must refuse it."""

    def __init__(self):
        self.x = 1


class ExplodesWhenPickled:
    def __reduce__(self):
        raise RuntimeError("writer failed half-way")


def _state(step: int) -> dict:
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4))
    opt = torch.optim.AdamW(net.parameters())
    net(torch.randn(1, 3, 8, 8)).sum().backward()
    opt.step()
    return {
        "step": step,
        "model": net.state_dict(),
        "optimizer": opt.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "numpy_rng": np.random.get_state(),
        "python_rng": random.getstate(),
        "meta": {"loss": 0.25, "name": "velocity", "shape": [3, 8, 8]},
    }


def test_round_trip_keeps_tensors_state_dicts_and_rng(tmp_path):
    state = _state(7)
    path = save_checkpoint(tmp_path / "velocity_00000007.pt", state)
    back = load_checkpoint(path)
    assert back["step"] == 7 and back["meta"] == state["meta"]
    for k, v in state["model"].items():
        assert torch.equal(back["model"][k], v)
    assert back["optimizer"]["state"][0]["exp_avg"].equal(state["optimizer"]["state"][0]["exp_avg"])
    assert torch.equal(back["torch_rng"], state["torch_rng"])
    np.random.set_state(back["numpy_rng"])  # a real numpy RNG state, usable as such
    assert back["numpy_rng"][0] == "MT19937" and np.array_equal(back["numpy_rng"][1], state["numpy_rng"][1])
    assert back["python_rng"] == state["python_rng"]


def test_pickled_object_is_refused_with_a_clear_message(tmp_path):
    path = tmp_path / "velocity_00000001.pt"
    torch.save({"model": {}, "extra": NotData()}, path)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    msg = str(err.value)
    assert str(path) in msg and "pickled code/objects" in msg and "refused" in msg
    assert "NotData" in msg and "Re-save" in msg


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_file_error_names_the_file(tmp_path, damage):
    path = save_checkpoint(tmp_path / "velocity_00000003.pt", _state(3))
    data = path.read_bytes()
    path.write_bytes({"truncate": data[: len(data) // 2], "garbage": b"not a checkpoint" * 8, "empty": b""}[damage])
    with pytest.raises(CheckpointError, match="velocity_00000003.pt"):
        load_checkpoint(path)


def test_list_is_newest_first_by_step_and_ignores_other_files(tmp_path):
    for step in (2, 10, 9):
        save_checkpoint(tmp_path / f"velocity_{step:08d}.pt", {"step": step})
    save_checkpoint(tmp_path / "saliency_00000099.pt", {"step": 99})
    (tmp_path / "velocity_notes.txt").write_text("x")
    (tmp_path / ".velocity_00000011.pt.abc.tmp").write_bytes(b"partial")
    assert [p.name for p in list_checkpoints(tmp_path, "velocity")] == [
        "velocity_00000010.pt",
        "velocity_00000009.pt",
        "velocity_00000002.pt",
    ]
    assert list_checkpoints(tmp_path / "missing", "velocity") == []


def test_corrupt_newest_falls_back_to_previous(tmp_path):
    save_checkpoint(tmp_path / "velocity_00000100.pt", _state(100))
    newest = save_checkpoint(tmp_path / "velocity_00000200.pt", _state(200))
    newest.write_bytes(newest.read_bytes()[:500])  # a torn write from some other tool
    with pytest.warns(UserWarning, match="velocity_00000200.pt"):
        path, state = load_latest(tmp_path, "velocity")
    assert path.name == "velocity_00000100.pt" and state["step"] == 100
    with pytest.warns(UserWarning):
        assert latest_checkpoint(tmp_path, "velocity").name == "velocity_00000100.pt"
    assert load_latest(tmp_path / "empty", "velocity") is None


def test_failing_writer_leaves_no_partial_file_and_keeps_the_old_one(tmp_path):
    final = save_checkpoint(tmp_path / "velocity_00000005.pt", {"step": 5})
    with pytest.raises(RuntimeError, match="half-way"):
        save_checkpoint(final, {"step": 6, "weights": torch.zeros(1000), "bad": ExplodesWhenPickled()})
    assert load_checkpoint(final)["step"] == 5
    with pytest.raises(RuntimeError):
        save_checkpoint(tmp_path / "velocity_00000006.pt", {"bad": ExplodesWhenPickled()})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["velocity_00000005.pt"]


def test_prune_keeps_the_newest(tmp_path):
    for step in (1, 2, 3, 4):
        save_checkpoint(tmp_path / f"velocity_{step:08d}.pt", {"step": step})
    deleted = prune_checkpoints(tmp_path, "velocity", keep=2)
    assert [p.name for p in deleted] == ["velocity_00000002.pt", "velocity_00000001.pt"]
    assert [p.name for p in list_checkpoints(tmp_path, "velocity")] == ["velocity_00000004.pt", "velocity_00000003.pt"]
