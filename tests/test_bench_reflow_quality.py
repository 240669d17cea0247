"""`rfp bench reflow_quality`'s verdict: the three "straight and fast" checks on means over seeds."""

from __future__ import annotations

import json

import pytest

from rfp_core.bench.reflow_quality import acceptance, summary_rows


def _seed(s1: float, s2: float, c12: float, c1: float, t12: float, t1: float, tr: float = 1.0) -> list[dict]:
    return [
        {
            "model": "1-RF",
            "steps": 12,
            "straightness": s1,
            "content_kept": c12,
            "transfer_rate": tr,
            "seconds_per_input": t12,
        },
        {
            "model": "2-RF",
            "steps": 12,
            "straightness": s2,
            "content_kept": c12,
            "transfer_rate": tr,
            "seconds_per_input": t12,
        },
        {
            "model": "distilled",
            "steps": 1,
            "straightness": float("nan"),
            "content_kept": c1,
            "transfer_rate": tr,
            "seconds_per_input": t1,
        },
    ]


def test_acceptance_passes_only_when_every_check_holds():
    good = [_seed(0.10, 0.01, 0.80, 0.75, 0.012, 0.001), _seed(0.12, 0.02, 0.82, 0.78, 0.012, 0.001)]
    v = acceptance(good)
    assert v["straightness_ratio"] == pytest.approx(0.11 / 0.015)
    assert v["content_kept_within_10pct"] and v["speedup_n1_vs_n12"] == pytest.approx(12.0) and v["passed"]
    # content 0.70 < 0.9 x 0.81: fails on content alone
    assert not acceptance([_seed(0.10, 0.01, 0.81, 0.70, 0.012, 0.001)])["passed"]
    # straightness only 4x lower
    assert not acceptance([_seed(0.08, 0.02, 0.80, 0.80, 0.012, 0.001)])["passed"]
    # one step only 6x faster
    assert not acceptance([_seed(0.10, 0.01, 0.80, 0.80, 0.006, 0.001)])["passed"]


def test_summary_rows_are_mean_and_spread_over_seeds():
    rows = summary_rows([_seed(0.1, 0.01, 0.8, 0.7, 0.01, 0.001), _seed(0.3, 0.03, 0.6, 0.5, 0.01, 0.001)])
    one = next(r for r in rows if r["model"] == "1-RF")
    assert one["straightness"]["mean"] == pytest.approx(0.2) and one["straightness"]["n"] == 2
    assert one["content_kept"]["std"] == pytest.approx(0.1414, abs=1e-3)
    dist = next(r for r in rows if r["model"] == "distilled")
    assert dist["straightness"]["n"] == 0  # a one-step map has no path


@pytest.mark.slow
def test_a_seed_run_alone_is_cached_and_the_seeds_run_reuses_it(isolated_rfp_home, capsys):
    """`--seed 0` scores one seed and caches it; `--seeds 1` then assembles the table from the cache."""
    from rfp_core.cli import main

    assert main(["bench", "reflow_quality", "--quick", "--seed", "0", "--device", "cpu"]) == 0
    one = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert one["seed"] == 0 and set(one["checks"]) >= {"passed"}
    cached = list((isolated_rfp_home / "bench" / "reflow_quality" / "quick").glob("seed0-mse-*.json"))
    assert len(cached) == 1
    rows = json.loads(cached[0].read_text())
    assert {r["model"] for r in rows} >= {"1-RF", "distilled"}

    assert main(["bench", "reflow_quality", "--quick", "--seeds", "1", "--device", "cpu"]) == 0
    out = capsys.readouterr()
    assert f"scored rows reused from {cached[0]}" in out.err
    table = json.loads(out.out.strip().splitlines()[-1])
    assert table["seeds"] == 1 and table["checks"] == one["checks"]
