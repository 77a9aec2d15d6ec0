"""The enumerable world (toy/enumerable.py): its closed forms, its SFT model, its preference labels, and both
stages trained through their scripts landing on their closed-form optima (studies/theory.py, docs/theory.md)."""

import math

import pytest
import torch

import data
import merge_policies
import stage
from studies import theory
from toy import enumerable


@pytest.fixture(scope="module")
def world(enum_world):
    return enum_world


def test_stepwise_optimum_equals_the_one_shot_optimum_to_float64():
    """RSA's factorisation (docs/math.md Sec. 6): a second KL-regularised step from pi_r on -c at beta_s = beta_r /
    lambda lands on the one-shot optimum of r - lambda c at beta_r: pi_r exp(-c / beta_s) / Y = pi_ref exp((r -
    lambda c) / beta_r) / Z, per prompt, to float64 rounding."""
    reward, cost, reference, _ = enumerable.tables()
    assert torch.allclose(reference.sum(-1), torch.ones(3, dtype=torch.float64), atol=1e-15)
    for beta_r, lam in ((0.1, 10.0), (0.5, 2.0), (1.0, 0.3)):
        pi_r = enumerable.dpo_optimum(reference, reward, beta_r)
        stepwise = enumerable.dpo_optimum(pi_r, -cost, beta_r / lam)
        one_shot = enumerable.dpo_optimum(reference, reward - lam * cost, beta_r)
        assert (stepwise - one_shot).abs().max().item() < 1e-12
        # the constrained optimum takes the rare costly branch less than pi_r does, which takes it more than pi_ref
        costly = enumerable.COSTLY
        assert (one_shot[:, costly] < pi_r[:, costly]).all() and (pi_r[:, costly] > reference[:, costly]).all()


def test_the_sft_model_is_the_reference_table(world):
    """The stages train a real model; its distribution over the 16 responses of each prompt is the table's (the
    fit is good to KL 1e-3 per prompt and leaves under 1 % of the mass outside the listed responses)."""
    reward, cost, reference = enumerable.load(world)
    sft = merge_policies.load_policy(f"{world}/sft")
    table, outside = enumerable.policy_table(sft, stage.load_tokenizer(f"{world}/sft"))
    assert enumerable.kl(reference, table) < 1e-3 and max(outside) < 0.01
    assert (reference[:, enumerable.COSTLY] - 0.02).abs().max() < 1e-12  # the rare branch: 2 % of the reference


def test_preference_files_load_as_pairs_with_bradley_terry_labels(world):
    """Both labels of every pair follow Bradley-Terry: over the pairs, the number of times the first response is
    the better one (on r) and the safer one (on -c) is within four standard deviations of its expectation (the sum
    of the pairs' Bernoulli probabilities and variances), and the stages' data loader reads every pair."""
    reward, cost, _ = enumerable.load(world)
    index = {r: i for i, r in enumerate(enumerable.RESPONSES)}
    prompt = {p: i for i, p in enumerate(enumerable.PROMPTS)}
    for preference, values, sign in (("better", reward, 1.0), ("safer", cost, -1.0)):
        rows = [row for _, row in data.read_rows(f"{world}/train.jsonl")]
        key = f"{preference}_response_id"
        probs = [1 / (1 + math.exp(-sign * (values[prompt[r["prompt"]], index[r["response_0"]]]
                                            - values[prompt[r["prompt"]], index[r["response_1"]]]).item()))
                 for r in rows]
        first = sum(r[key] == 0 for r in rows)
        mean, var = sum(probs), sum(p * (1 - p) for p in probs)
        assert abs(first - mean) < 4 * math.sqrt(var), (preference, first, mean)
        assert len(data.load_pairs(f"{world}/train.jsonl", preference)) == len(rows) == 3 * 1500


def test_both_stages_trained_with_dpo_land_on_their_closed_form_optima(world, tmp_path_factory):
    """The reward stage from the SFT model and the safety stage from the trained pi_r, trained through their scripts
    with DPO, each land within the floor the finite sample sets: KL(optimum || trained) below KL(optimum ||
    empirical optimum), the tabular minimiser of the same loss on the same pairs. The bound discriminates: the
    trained policies lie farther than it from the optima of beta off by a factor of 2 either way and, for the
    safety stage, from the optimum with the SFT model as its reference (where stages trained with those settings
    land). Measured here (docs/theory.md): reward 0.046 against a floor of 0.080, safety 0.037 against 0.052. A
    reward stage trained with Ra-DPO_2 and CVaR 0.5 lands on that loss's own optimum (the tabular token-level
    policy at which the gradient of its expected loss vanishes), within its floor, and not on the optimum at twice
    the level."""
    out = str(tmp_path_factory.mktemp("theory"))
    folders = theory.train_stages(world, out)
    m = theory.measure(world, *folders)
    for name in ("reward", "safety"):
        r = m[name]
        assert r["trained"] < r["floor"] < r["start"], (name, r)
        wrong = [r["beta x 0.5"], r["beta x 2"]] + ([r["reference is the SFT model"]] if name == "safety" else [])
        assert min(wrong) > r["floor"], (name, r)
    # RSA(P) at q lands on the safety optimum at lambda (1 - q), within the safety stage's floor; at q 0.5 and 0.75
    # both stages it mixes lie outside that floor (at q 0.25 the safety stage itself is within it)
    for q, r in m["mixtures"].items():
        assert r["mixture"] < m["safety"]["floor"], (q, r)
        if q >= 0.5:
            assert min(r["reward stage"], r["safety stage"]) > m["safety"]["floor"], (q, r)
    # a risk measure: the reward stage with Ra-DPO_2 and CVaR 0.5 lands on its own optimum, within twice the floor
    # of the same loss on the same pairs; the optimum at twice the level (CVaR 1, which is TDPO) lies outside that
    # bound (measured: 0.0039 against a floor of 0.0046, and 0.0666). Half the level (0.25) has nearly the same
    # optimum in this stage (0.0040): that error is not one this world can show (docs/theory.md)
    cvar = theory.train_risk_stages(world, out, names=("Ra-DPO_2, CVaR 0.5",), safety=False)
    cvar = cvar["reward, Ra-DPO_2, CVaR 0.5"]
    assert cvar["own"] < 2 * cvar["floor"] < cvar["start"], cvar
    assert cvar["level x 2"] > 5 * cvar["floor"], cvar
    costly = m["costly branch"]
    assert costly["safety stage"] < 0.1 * costly["sft"] < costly["reward stage"]  # the rare harm, bought and removed
