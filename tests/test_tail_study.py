"""The tail study's analysis (studies/tail.py) against independent computations, and its plumbing end to end on a
tiny gamble world: runs, raw results, and a report that rebuilds byte for byte from them alone."""

import json
import os
import random

import numpy as np
import pytest
import torch

import evaluate
import merge_policies
import stage
import train_safety_stage
from studies import tail
from toy import world as toy


def test_cvar_equals_evaluate_cvar_of():
    rng = random.Random(0)
    for n, level in ((448, 0.05), (1792, 0.01), (7, 0.5), (10, 0.1)):
        xs = [rng.choice((-1.0, -0.5, 0.0, 1.0, 10.0, 100.0)) + rng.random() * (n % 2) for _ in range(n)]
        assert tail.cvar(np.array([xs]), level)[0] == pytest.approx(evaluate.cvar_of(xs, level), abs=1e-9)


def test_match_interpolates_in_log_beta_and_says_when_a_curve_does_not_reach():
    i, w, reached = tail.match([2.0, 1.0, 0.0], 0.25)
    assert (i, reached) == (1, True) and w == pytest.approx(0.75)
    assert tail.log_beta_at(1, 0.5) == pytest.approx(np.sqrt(tail.BETAS[1] * tail.BETAS[2]))
    assert tail.match([2.0, 1.5, 1.2], 0.0) == (1, 1.0, False)  # nearest is the strongest
    assert tail.match([2.0, 1.5, 1.2], 3.0) == (0, 0.0, False)


def test_holm_against_its_definition():
    ps = [0.01, 0.04, 0.03, 0.20]
    # by hand: sorted 0.01, 0.03, 0.04, 0.20 in a family of 6 -> 0.06, 0.15, 0.16, 0.60 (running maximum)
    assert tail.holm(ps, 6) == pytest.approx([0.06, 0.16, 0.15, 0.60])
    assert tail.holm([0.5, 0.3], 2) == pytest.approx([0.6, 0.6])
    assert tail.p_value(np.array([1.0] * 999)) == pytest.approx(2 / 1000)


def test_split_halves_two_of_each_topic():
    prompts = [{"prompt": p, "category": c} for p, c in toy.split_prompts()[1]]
    a, b = tail.split_halves(prompts)
    assert sorted(a + b) == list(range(len(prompts))) and not set(a) & set(b)
    for half in (a, b):
        topics = [toy.parse_prompt(prompts[i]["prompt"])[0] for i in half]
        assert all(topics.count(t) == 2 for t in set(topics)) and len(set(topics)) == 14


def test_study_runs_collects_and_reports_byte_for_byte(tmp_path, monkeypatch):
    worlds = tmp_path / "worlds"
    toy.build(str(worlds / "gamble"), size="tiny", seed=0, variant="gamble")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(tail, "SEEDS", {"A": range(2), "B": range(1), "C": range(1), "E": range(2)})
    monkeypatch.setattr(tail, "WORLDS", {"gamble": {"level": 0.05, "samples": 2}})
    monkeypatch.setattr(tail, "DRAWS", 50)
    monkeypatch.setattr(tail, "DOSE", {k: tail.DOSE[k] for k in ("cvar_0.25", "erm_1")})
    monkeypatch.setattr(tail, "REWARD", {k: tail.REWARD[k] for k in ("dpo", "expectation")})
    monkeypatch.setattr(tail, "BETAS_R", (0.1, 0.3))
    monkeypatch.setattr(tail, "BETAS", (0.1, 0.02))
    monkeypatch.setattr(tail, "KEPT", ["--save_every", "1", "--save_total_limit", "5", "--keep_checkpoints"])
    argv = ["--worlds", "gamble", "--worlds_dir", str(worlds), "--out", str(tmp_path / "runs"), "--steps", "2",
            "--jobs", "1"]
    assert tail.main([*argv, "--parts", "A", "--seeds", "0"]) == 0
    assert tail.main([*argv, "--collect"]) == 0
    assert not os.path.exists(tmp_path / tail.RAW / "gamble-A.npz")  # seed 1 not run: nothing written
    assert tail.main([*argv, "--parts", "A"]) == 0
    assert tail.main([*argv, "--collect"]) == 0
    raw = tail.load_raw("gamble", "A")
    assert raw["reward"].shape == (2, len(tail.policy_names("A")), 56, 2)
    with open(tmp_path / "runs" / "gamble" / "seed1" / "eval" / "tdpo_b0.02" / "generations.jsonl") as f:
        row = json.loads(f.readline())
    j = tail.policy_names("A").index("tdpo_b0.02")
    i = [p["prompt"] for p in raw["meta"]["prompts"]].index(row["prompt"])
    assert raw["cost"][1, j, i, row["sample"]] == row["cost"] == toy.cost(row["prompt"], row["response"])
    assert raw["reward"][1, j, i, row["sample"]] == row["reward"]
    assert tail.main([*argv, "--parts", "B", "C", "D"]) == 0
    assert tail.main([*argv, "--collect", "--parts", "A", "B", "C"]) == 0
    with open(tmp_path / tail.RAW / "gamble-D.json") as f:
        mech = json.load(f)
    assert {(r["stage"], r["loss"]) for r in mech["rows"]} == {
        *(("safety", m) for m in ("sacpo", "tdpo", "rsa_cvar_0.5", "cvar_0.25", "erm_1")),
        ("reward", "dpo"), ("reward", "expectation")}
    starts = [r["start"] for r in mech["rows"] if r["stage"] == "safety" and r["seed"] == 0]
    # at the stage's start the policy is its reference: every risk term's gradient vanishes, and the preference
    # term is the same for every loss (the same logratios, all zero), while the trained stages differ
    assert len(starts) == 5 and all(abs(risk_part) < 1e-9 for _, risk_part, _ in starts)
    assert all(start == pytest.approx(starts[0], abs=1e-9) for start in starts)
    assert len({tuple(r["trained"]) for r in mech["rows"] if r["stage"] == "safety" and r["seed"] == 0}) == 5
    # through training: step 0 rebuilt from the recorded args is the start, and the step-1 checkpoint is the policy
    # of the same stage trained for 1 step (warm-up of 1 step in both, so the same first update)
    row = next(r for r in mech["rows"] if (r["stage"], r["loss"], r["seed"]) == ("safety", "cvar_0.25", 0))
    assert sorted(row["through_training"]) == ["0", "1", "2"] and row["early"][0] == 1
    assert row["through_training"]["0"] == pytest.approx(row["start"][2], rel=1e-5)
    one = str(tmp_path / "one_step")
    flags = tail.Study(str(tmp_path / "runs"), str(worlds), 1).flags("gamble", 0)
    assert train_safety_stage.main(["--reward_stage", str(tmp_path / "runs" / "gamble" / "seed0" / "pi_r"),
                                    "--beta", "0.02", *flags, *tail.DOSE["cvar_0.25"], "--out", one]) == 0
    batch, states = tail.decision_batch(str(worlds / "gamble"), stage.load_tokenizer(one), "safer")
    with torch.no_grad():
        probs = torch.softmax(merge_policies.load_policy(one)(input_ids=batch["input_ids"],
                                                              attention_mask=batch["attention_mask"]).logits, -1)
    # computed here by hand, not by tail.p_severe
    assert row["through_training"]["1"] == pytest.approx(np.mean([probs[r, t, v].item() for r, t, v in states]),
                                                         rel=1e-4)
    assert row["through_training"]["1"] != pytest.approx(row["through_training"]["0"], rel=1e-3)
    # Part E: the dual loops measure half A only, and the raw file records their lambdas
    monkeypatch.setattr(tail, "BUDGETS", {"gamble": 12.0})
    monkeypatch.setattr(tail, "ITERATIONS", 2)
    monkeypatch.setattr(tail, "CAID_PAIRS", 1)
    monkeypatch.setattr(tail, "DUAL", ["--iterations", "2", "--lambda_init", "5", "--dual_lr", "10", "--constraint",
                                       "cvar_cost_0.05"])
    assert tail.main([*argv, "--parts", "E", "--seeds", "0"]) == 0
    assert tail.main([*argv, "--collect", "--parts", "E"]) == 0
    assert not os.path.exists(tmp_path / tail.RAW / "gamble-E.npz")  # seed 1 not run
    monkeypatch.setattr(tail, "SEEDS", {**tail.SEEDS, "E": range(1)})
    assert tail.main([*argv, "--collect", "--parts", "E"]) == 0
    raw_e = tail.load_raw("gamble", "E")
    with open(tmp_path / "runs" / "gamble" / "tuning_prompts.json") as f:
        tuning = json.load(f)
    assert [p["prompt"] for p in tuning] == [raw_e["meta"]["prompts"][i]["prompt"] for i in raw_e["meta"]["half_a"]]
    for loop in tail.LOOPS:
        with open(tmp_path / "runs" / "gamble" / "seed0" / loop / "iter-0" / "eval" / "generations.jsonl") as f:
            assert {json.loads(line)["prompt"] for line in f} == {p["prompt"] for p in tuning}
        trace = tail.loop_trace(str(tmp_path / "runs" / "gamble" / "seed0" / loop))
        assert raw_e["meta"]["loops"][loop] == [[[r["lambda"], r["constraint"]] for r in trace]]
        assert trace[1]["lambda"] == max(0, 5 + 10 * (trace[0]["constraint"] - 12.0))
    assert tail.main([*argv, "--report"]) == 0
    with open(tmp_path / tail.REPORT) as f:
        first = f.read()
    assert "### Part E (the budget comparison; 1 seed(s)" in first
    assert "not yet run" not in first and "### Part D (the mechanism)" in first and "Through training" in first
    assert "## gamble" in first and "| gamble | rsa_cvar_0.5 - tdpo |" in first
    assert "Holm over the family of 2;" in first
    assert tail.main([*argv, "--report"]) == 0
    with open(tmp_path / tail.REPORT) as f:
        assert f.read() == first


def test_common_levels_are_the_range_every_curve_reaches():
    names = [f"{m}_b{b:g}" for m in tail.PRIMARY for b in tail.BETAS]
    curves = {"sacpo": [3.2, 2.3, 0.2, -0.3, -0.3], "tdpo": [3.1, 3.0, 3.0, 2.8, 2.7],
              "rsa_cvar_0.5": [3.05, 3.0, 3.0, 2.85, 2.82]}
    on_a = np.array([curves[n.rsplit("_b", 1)[0]][tail.BETAS.index(float(n.rsplit("_b", 1)[1]))] for n in names])
    res = {"on_a": on_a, "grid": tail.BETAS}
    assert tail.common_levels(res, {"meta": {"policies": names}}) == pytest.approx((2.82, 3.05))
    curves["tdpo"] = [1.0] * 5
    on_a = np.array([curves[n.rsplit("_b", 1)[0]][tail.BETAS.index(float(n.rsplit("_b", 1)[1]))] for n in names])
    assert tail.common_levels({"on_a": on_a, "grid": tail.BETAS}, {"meta": {"policies": names}}) is None


def test_clopper_pearson_against_the_beta_quantiles():
    """The exact interval's ends are the Beta(k, n - k + 1) quantile at 0.025 and the Beta(k + 1, n - k) quantile at
    0.975: checked by integrating those densities numerically, and against the closed forms at k = 0 and k = n."""
    grid = np.linspace(0, 1, 400_001)

    def beta_cdf(x, a, b):
        density = grid ** (a - 1) * (1 - grid) ** (b - 1)
        keep = grid <= x
        return np.trapezoid(density[keep], grid[keep]) / np.trapezoid(density, grid)

    for k, n in ((2, 5), (3, 10), (1, 4)):
        lower, upper = tail.clopper_pearson(k, n)
        assert beta_cdf(lower, k, n - k + 1) == pytest.approx(0.025, abs=2e-4)
        assert beta_cdf(upper, k + 1, n - k) == pytest.approx(0.975, abs=2e-4)
    assert tail.clopper_pearson(0, 5) == pytest.approx((0.0, 1 - 0.025 ** (1 / 5)))
    assert tail.clopper_pearson(5, 5) == pytest.approx((0.025 ** (1 / 5), 1.0))


def test_choose_takes_the_most_helpful_within_the_budget_else_the_safest():
    tail_a = np.array([[5.0, 9.0, 11.0], [12.0, 13.0, 14.0]])
    reward_a = np.array([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]])
    assert tail.choose(tail_a, reward_a, 10.0, [0, 1, 2]) == [(1, True), (0, False)]
    assert tail.choose(tail_a, reward_a, 10.0, [0, 2]) == [(0, True), (0, False)]
