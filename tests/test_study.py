"""studies/matched.py: the matched-helpfulness reading, the bootstrap, and the whole study in miniature on the tiny
world."""

import json
import math
import os
import random

import pytest
import torch

import evaluate
from studies import matched as study


def test_the_frontier_is_the_pareto_front_and_is_read_linearly():
    pts = [(1.0, 5.0), (2.0, 4.0), (3.0, 6.0), (2.5, 7.0), (3.0, 6.5)]
    assert study.pareto(pts, lower_is_better=True) == [(2.0, 4.0), (3.0, 6.0)]
    front = study.pareto(pts, lower_is_better=True)
    assert study.read_at(front, 2.5) == pytest.approx(5.0)  # halfway between (2, 4) and (3, 6)
    assert study.read_at(front, 1.0) == 4.0  # below the front: a more helpful point does at least as well
    assert math.isnan(study.read_at(front, 3.5))  # above it: never that helpful
    # higher is better (the safe rate): the front keeps the largest value at each reward
    assert study.pareto(pts, lower_is_better=False) == [(2.5, 7.0), (3.0, 6.5)]


def test_sample_metrics_are_evaluates_metrics():
    """The bootstrap recomputes the metrics from samples; they must be evaluate.py's, CVaR boundary sample included."""
    rng = random.Random(0)
    prompts = [f"p{i}" for i in range(7)]
    records = [{"prompt": p, "sample": j, "reward": rng.gauss(1, 2), "cost": rng.choice([-1.0, 0.0, 2.0, 9.0]) +
                rng.random(), "severe": rng.random() < 0.1, "length": 3, "category": "x"}
               for p in prompts for j in range(3)]
    x = torch.tensor([[[r["reward"], r["cost"], float(r["severe"])] for r in records]], dtype=torch.float64)
    got = study.sample_metrics(x.transpose(-1, -2))[0]
    want = evaluate.policy_metrics(records, knows_severity=True)
    for k, name in enumerate(study.METRICS):
        assert got[k].item() == pytest.approx(want[name], abs=1e-9), name


def test_the_identity_draw_is_the_mean_over_seeds_and_a_draw_picks_its_seeds():
    x = torch.randn(2, 3, 4, 3, 5, 2, dtype=torch.float64)  # methods, seeds, points, (r, c, severe), prompts, samples
    identity, first = study.draws(5, 2, 3, replicates=1)
    per_seed = study.sample_metrics(x.flatten(-2))
    assert torch.allclose(study.seed_means(x, *identity), per_seed.mean(1))
    prompts, seeds = first
    want = torch.stack([study.sample_metrics(x[m][seeds[m]][..., prompts, :].flatten(-2)).mean(0) for m in range(2)])
    assert torch.allclose(study.seed_means(x, prompts, seeds), want)


def test_interval_reports_the_estimate_and_the_share_of_draws():
    est, lo, hi, share = study.interval([1.0, *[float(v) for v in range(100)], *[math.nan] * 100])
    assert est == 1.0 and share == 0.5 and lo == pytest.approx(2.475) and hi == pytest.approx(96.525)


def test_the_study_in_miniature(tiny_world, tmp_path, monkeypatch):
    """Every part on the tiny world (a few steps, two methods, one seed): the files the README points at, the
    bisection's rule, and a resume that trains nothing again."""
    monkeypatch.setattr(study, "METHODS", {k: study.METHODS[k] for k in ("sacpo", "rsa_radpo_0.95")})
    for name, value in (("BETAS", (0.1, 0.01)), ("QS", (0.5,)), ("BUDGETS", (4.0,)), ("BISECTIONS", 2),
                        ("CHECK", {"sacpo_br0.3": ("sacpo", 0.3)}), ("REPLICATES", 20),
                        ("DUAL", {**study.DUAL, "iterations": 2})):
        monkeypatch.setattr(study, name, value)
    out = str(tmp_path / "study")
    argv = ["--out", out, "--world", tiny_world, "--steps", "2", "--samples", "2", "--seeds", "0", "--jobs", "1"]
    assert study.main(argv) == 0
    for name in ("matched.md", "matched.png", "equal.md"):
        assert os.path.getsize(os.path.join(out, name)) > 0
    text = open(os.path.join(out, "matched.md")).read()
    for heading in ("## Frontier of every policy", "## Frontier by strength only", "## The reward stages",
                    "| sacpo_br0.3 | 0.3 |", "rsa_radpo_0.95 - sacpo_br0.3", "### Budget 4", "(c) dual loop"):
        assert heading in text
    bis = json.load(open(os.path.join(out, "budget", "B4", "seed0", "bisection.json")))
    feasible = [t["q"] for t in bis["trace"] if t["constraint"] <= 4.0]
    assert bis["q"] == (max(feasible) if feasible else 0.0)
    assert bis["met_on_tuning"] == bool(feasible)
    assert bis["evaluations"] == len(bis["trace"]) == len({t["q"] for t in bis["trace"]})
    stamp = os.path.getmtime(os.path.join(out, "sacpo", "seed0", "safety", "b0.01", "adapter_model.safetensors"))
    assert study.main(argv) == 0
    assert os.path.getmtime(os.path.join(out, "sacpo", "seed0", "safety", "b0.01",
                                         "adapter_model.safetensors")) == stamp
