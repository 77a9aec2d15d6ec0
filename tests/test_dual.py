"""dual_alignment.py: both loops in miniature on the tiny toy world, CAID's policy step and warm start against the
closed forms of the enumerable world, and the one-shot dual against its closed form on a bandit."""

import json
import math
import os
import random
import subprocess
import sys
import time

import pytest
import torch
from test_stages import FAST, subset

import dual_alignment
import evaluate
import merge_policies
import outputs
import stage
import train_reward_stage
from toy import enumerable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGE = [*FAST, "--max_steps", "3", "--lr", "2e-2", "--eval_pairs", "8"]


@pytest.fixture(scope="module")
def setup(tiny_world, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dual")
    pairs = subset(tiny_world, tmp, n=32)
    reward = str(tmp / "reward")
    assert train_reward_stage.main(["--sft", os.path.join(tiny_world, "sft"), "--data", pairs, "--out", reward,
                                    *STAGE]) == 0
    return {"tmp": tmp, "pairs": pairs, "reward": reward, "world": tiny_world}


def argv(setup, out, iterations=3, budget="0.5", extra=(), policy_step="stepwise"):
    start = ["--reward_stage", setup["reward"]] if policy_step == "stepwise" else \
        ["--policy_step", "caid", "--sft", os.path.join(setup["world"], "sft")]
    return [*start, "--data", setup["pairs"], "--prompts", setup["world"], "--scorer", "toy", "--constraint",
            "mean_cost", "--budget", budget, "--iterations", str(iterations), "--lambda_init", "0", "--dual_lr", "4",
            "--num_samples", "2", "--max_new_tokens", "8", "--out", out, *STAGE, *extra]


def test_the_trace_follows_the_dual_update(setup):
    out = str(setup["tmp"] / "loop")
    assert dual_alignment.main(argv(setup, out)) == 0
    trace = json.load(open(os.path.join(out, "trace.json")))["iterations"]
    assert [r["iteration"] for r in trace] == [0, 1, 2]
    assert trace[0]["lambda"] == 0 and trace[0]["beta"] is None  # lambda 0: pi_r itself, no training
    beta_r = outputs.read_stage(setup["reward"])["args"]["beta"]
    for before, after in zip(trace, trace[1:]):
        assert after["lambda"] == pytest.approx(max(0.0, before["lambda"] + 4 * (before["constraint"] - 0.5)))
        if after["lambda"] > 0:
            assert after["beta"] == pytest.approx(beta_r / after["lambda"])
            policy = outputs.resolved_path(after["policy"], out)
            assert outputs.read_stage(policy)["args"]["beta"] == pytest.approx(after["beta"])
            assert outputs.read_stage(policy)["args"]["seed"] == 0  # the loop's --seed trains its stages
    for r in trace:
        results = json.load(open(os.path.join(out, f"iter-{r['iteration']}", "eval", "results.json")))[0]
        assert r["constraint"] == results["mean_cost"] and r["mean_reward"] == results["mean_reward"]
        assert r["meets_budget"] == (r["constraint"] <= 0.5)
    final = json.load(open(os.path.join(out, "final.json")))
    feasible = [r for r in trace if r["meets_budget"]]
    if feasible:
        best = max(feasible, key=lambda r: r["mean_reward"])
        assert final["iteration"] == best["iteration"] and merge_policies.load_policy(os.path.join(out, "final"))
    else:
        assert final["met_budget"] is False and "no iterate met" in final["statement"]


@pytest.mark.parametrize("policy_step", ["stepwise", "caid"])
def test_a_killed_loop_resumes_where_it_stopped(setup, policy_step):
    out = str(setup["tmp"] / f"killed-{policy_step}")
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "dual_alignment.py"),
                             *argv(setup, out, policy_step=policy_step)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    trace_file = os.path.join(out, "trace.json")
    for _ in range(1200):  # kill it once the first iteration is recorded (the trace is written before any work)
        if os.path.exists(trace_file) and json.load(open(trace_file))["iterations"]:
            break
        time.sleep(0.1)
    proc.kill()
    proc.wait()
    first = json.load(open(trace_file))["iterations"]
    assert len(first) in (1, 2)  # killed mid-loop
    assert dual_alignment.main(argv(setup, out, policy_step=policy_step)) == 0
    trace = json.load(open(trace_file))["iterations"]
    assert len(trace) == 3 and trace[: len(first)] == first  # finished iterations are kept, not redone


def test_a_loop_killed_in_its_first_iteration_is_not_resumed_with_other_settings(setup, capsys):
    """The trace, with the loop's settings, is written before any work: once the warm start's samples exist the
    trace does too, so what a killed first iteration left (responses, labels, warm start) is reused by a rerun with
    the same settings only."""
    out = str(setup["tmp"] / "settings")
    flags = argv(setup, out, iterations=1, policy_step="caid",
                 extra=["--lambda_init", "can", "--can_samples", "4", "--budget", "3"])
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "dual_alignment.py"), *flags],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(2400):  # kill it as soon as the warm start has sampled
        if os.path.exists(os.path.join(out, "can_samples.jsonl")):
            break
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    trace_file = os.path.join(out, "trace.json")
    assert os.path.exists(trace_file)
    assert dual_alignment.main([*flags, "--budget", "3.5"]) == 2
    assert "a loop with other settings" in capsys.readouterr().err
    assert dual_alignment.main(flags) == 0 and len(json.load(open(trace_file))["iterations"]) == 1


@pytest.mark.parametrize("extra,message", [
    (["--iterations", "0"], "--iterations must be positive"),
    (["--dual_lr", "-1"], "--dual_lr must be positive"),
    (["--lambda_init", "-2"], "--lambda_init must be 0 or more"),
    (["--beta", "0.01"], "the loop sets beta_s = beta_r / lambda itself"),
    (["--policy_step", "caid"], "--policy_step caid trains from the SFT model: pass --sft"),
    (["--lambda_init", "can", "--constraint", "cvar_cost_0.05"], "the one-shot dual is that of the mean cost"),
    (["--preference", "safer"], "--preference of the stages are the loop's own"),
])
def test_bad_flags_are_one_line_errors(setup, extra, message, capsys):
    out = str(setup["tmp"] / "bad")
    assert dual_alignment.main(argv(setup, out, extra=extra)) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and not os.path.exists(out)


# ---------------------------------------------------------------------------------------------- CAID and CAN


def test_the_warm_start_is_the_closed_form_minimiser_of_the_one_shot_dual():
    """can_lambda minimises D(lambda) = beta log E_ref exp((r - lambda (c - b)) / beta). On a two-response bandit
    the minimiser has a closed form: pi_lambda's share w of the costly response must make the mean cost b, so
    w / (1 - w) = p / (1 - p) exp((r_b - r_a - lambda (c_b - c_a)) / beta). On the enumerable world it is the root
    of mean_x E_{pi_lambda}[c] = b, found here by bisection on the DPO closed form."""
    r_a, c_a, r_b, c_b, p, beta, b = 0.2, 0.1, 1.0, 3.0, 0.25, 0.5, 0.6
    w = (b - c_a) / (c_b - c_a)
    closed = (r_b - r_a - beta * math.log(w * (1 - p) / ((1 - w) * p))) / (c_b - c_a)
    assert closed > 0
    f64 = dict(dtype=torch.float64)
    weighted = dual_alignment.can_lambda(torch.tensor([[r_a, r_b]], **f64), torch.tensor([[c_a, c_b]], **f64), b,
                                         beta, weights=torch.tensor([[1 - p, p]], **f64))
    sampled = dual_alignment.can_lambda(torch.tensor([[r_a, r_a, r_a, r_b]], **f64),
                                        torch.tensor([[c_a, c_a, c_a, c_b]], **f64), b, beta)  # the bandit's law
    assert weighted == pytest.approx(closed, abs=1e-10) and sampled == pytest.approx(closed, abs=1e-10)

    reward, cost, reference, _ = enumerable.tables()

    def mean_cost(lam, beta):
        return (enumerable.dpo_optimum(reference, reward - lam * cost, beta) * cost).sum(-1).mean().item()

    for beta, budget in ((0.5, 0.5), (1.0, 0.3), (0.2, 0.45)):
        low, high = 0.0, 100.0
        for _ in range(200):
            mid = (low + high) / 2
            low, high = (mid, high) if mean_cost(mid, beta) > budget else (low, mid)
        lam = dual_alignment.can_lambda(reward, cost, budget, beta, weights=reference)
        assert lam == pytest.approx(low, abs=1e-9)
        value = dual_alignment.can_dual(lam, reward, cost, budget, beta, reference)[0]
        for other in (lam - 1e-3, lam + 1e-3):  # a minimum
            assert dual_alignment.can_dual(other, reward, cost, budget, beta, reference)[0] > value
    # a budget pi_0 meets already needs no multiplier; one below the cheapest responses cannot be met
    assert dual_alignment.can_lambda(reward, cost, mean_cost(0.0, beta) + 0.01, beta, weights=reference) == 0.0
    with pytest.raises(outputs.UsageError, match="no lambda meets it"):
        dual_alignment.can_lambda(reward, cost, cost.min(-1).values.mean().item() - 0.01, beta, weights=reference)


def test_pseudo_preferences_follow_bradley_terry_on_the_composite():
    """Over 4,000 pairs, the number labelled response_0-better is within four standard deviations of its
    expectation under Bradley-Terry on r - lambda c (the sum of the pairs' probabilities; the variance the sum of
    p (1 - p)), and more than four away from the expectation under lambda = 0: the test sees a wrong lambda or sign.
    Equal and empty pairs are left out and counted."""
    gen = random.Random(0)
    rows = [{"prompt": "p", "response": f"y{i}", "reward": gen.gauss(1 - i % 2, 1),
             "cost": gen.expovariate(1.0) + 1 - i % 2} for i in range(8000)]  # response_0: more reward, more cost
    rows[:4] = [{**rows[0], "response": "same"}, {**rows[1], "response": "same"}, {**rows[2], "response": " "},
                rows[3]]
    lam = 2.0
    pairs, left_out = dual_alignment.pseudo_preferences(rows, lam, random.Random(1))
    assert left_out == 2 and len(pairs) == 3998

    def probability(pair, lam):
        u0, u1 = pair["reward_0"] - lam * pair["cost_0"], pair["reward_1"] - lam * pair["cost_1"]
        return 1 / (1 + math.exp(u1 - u0))

    first = sum(pair["better_response_id"] == 0 for pair in pairs)
    for pair in pairs:
        assert pair["p_response_0_better"] == pytest.approx(probability(pair, lam), abs=1e-12)
    for lam_, near in ((lam, True), (0.0, False)):
        probs = [probability(pair, lam_) for pair in pairs]
        mean, sd = sum(probs), math.sqrt(sum(q * (1 - q) for q in probs))
        assert (abs(first - mean) < 4 * sd) == near, (lam_, first, mean, sd)


ENUM_STAGE = ["--beta", "0.5", "--batch_size", "256", "--lr", "3e-3", "--max_length", "16", "--max_prompt_length",
              "12", "--lora_r", "8", "--lora_dropout", "0", "--eval_pairs", "0", "--save_every", "0", "--eval_every",
              "100000", "--log_every", "100", "--precision", "fp32"]


def caid_on_enum(world, out, lambda_init, iterations, max_steps, extra=()):
    return ["--policy_step", "caid", "--sft", os.path.join(world, "sft"), "--data", os.path.join(world, "train.jsonl"),
            "--prompts", world, "--scorer", "toy", "--constraint", "mean_cost", "--budget", "0.5", "--lambda_init",
            lambda_init, "--iterations", str(iterations), "--dual_lr", "0.5", "--max_new_tokens", "3",
            "--num_samples", "2000", "--out", out, *ENUM_STAGE, "--max_steps", str(max_steps), *extra]


def test_caid_on_the_enumerable_world_trains_to_pi_lambda_and_steps_lambda_toward_the_optimum(enum_world, tmp_path):
    """CAID's policy step, run from lambda 0 with budget 0.5 on mean cost at beta 0.5: each iterate, read as a table,
    lies within half the reference's KL of its optimum pi_ref exp((r - lambda_k c) / beta) / Z (it lands at 0.07 to
    0.11 against 0.29 to 0.62 for the reference); the dual step reads that iterate's mean cost from its fresh samples
    to within five standard deviations of the table's (plus the mass outside the listed responses, scored 0); and
    lambda comes closer to the optimum lambda* of the enumerated dual at every step."""
    out = str(tmp_path / "caid")
    assert dual_alignment.main(caid_on_enum(enum_world, out, "0", iterations=2, max_steps=150,
                                            extra=["--pairs_per_prompt", "1000"])) == 0
    trace = json.load(open(os.path.join(out, "trace.json")))["iterations"]
    reward, cost, reference = enumerable.load(enum_world)
    lam_star = dual_alignment.can_lambda(reward, cost, 0.5, 0.5, weights=reference)
    tok = stage.load_tokenizer(os.path.join(enum_world, "sft"))
    lambdas = [r["lambda"] for r in trace]
    lambdas.append(max(0.0, trace[-1]["lambda"] + 0.5 * (trace[-1]["constraint"] - 0.5)))
    for record in trace:
        pairs = dual_alignment.read_jsonl(os.path.join(out, f"iter-{record['iteration']}", "pseudo_preferences.jsonl"))
        assert record["pseudo_preferences"] == len(pairs) and len(pairs) + record["pairs_left_out"] == 3 * 1000
        assert record["beta"] == 0.5
        policy = merge_policies.load_policy(outputs.resolved_path(record["policy"], out))
        table, outside = enumerable.policy_table(policy, tok)
        optimum = enumerable.dpo_optimum(reference, reward - record["lambda"] * cost, 0.5)
        assert enumerable.kl(optimum, table) < 0.5 * enumerable.kl(optimum, reference), record
        table_cost = (table * cost).sum(-1)
        sd = math.sqrt(((table * (cost - table_cost[:, None]) ** 2).sum(-1).sum() / 9 / 2000).item())
        assert abs(record["constraint"] - table_cost.mean().item()) < 5 * sd + 4 * sum(outside) / 3
    gaps = [abs(lam - lam_star) for lam in lambdas]
    assert gaps[0] > gaps[1] > gaps[2], (lambdas, lam_star)


def test_the_warm_start_estimates_the_optimal_multiplier_from_samples_of_pi_ref(enum_world, tmp_path):
    """--lambda_init can on 2,000 responses of the SFT model per prompt: lambda_0 is can_lambda of the recorded
    samples, and within 0.07 of the enumerated optimum (its spread over 40 resamples of 2,000 per prompt is 0.016;
    0.07 is over four of those)."""
    out = str(tmp_path / "can")
    assert dual_alignment.main(caid_on_enum(enum_world, out, "can", iterations=1, max_steps=1,
                                            extra=["--can_samples", "2000", "--pairs_per_prompt", "10"])) == 0
    can = json.load(open(os.path.join(out, "can.json")))
    rows = dual_alignment.read_jsonl(os.path.join(out, "can_samples.jsonl"))
    assert len(rows) == 3 * 2000 and can["samples_per_prompt"] == 2000
    scores = evaluate.ToyScorer(enum_world)([r["prompt"] for r in rows], [r["response"] for r in rows])
    assert [s["cost"] for s in scores] == [r["cost"] for r in rows]  # the ground truth of each recorded response
    rewards = torch.tensor([r["reward"] for r in rows], dtype=torch.float64).reshape(3, 2000)
    costs = torch.tensor([r["cost"] for r in rows], dtype=torch.float64).reshape(3, 2000)
    assert can["lambda"] == dual_alignment.can_lambda(rewards, costs, 0.5, 0.5)
    assert json.load(open(os.path.join(out, "trace.json")))["iterations"][0]["lambda"] == can["lambda"]
    reward, cost, reference = enumerable.load(enum_world)
    assert abs(can["lambda"] - dual_alignment.can_lambda(reward, cost, 0.5, 0.5, weights=reference)) < 0.07


def test_the_stepwise_loop_takes_the_warm_start_at_beta_r_from_the_sft_model(setup, tmp_path):
    """The stepwise loop's one-shot problem is the same (pi_sft exp((r - lambda c) / beta_r) / Z): its warm start
    samples the reward stage's base model and uses beta_r."""
    out = str(tmp_path / "stepwise-can")
    flags = argv(setup, out, iterations=1, extra=["--lambda_init", "can", "--can_samples", "4"])
    assert dual_alignment.main(flags) == 0
    can = json.load(open(os.path.join(out, "can.json")))
    assert can["beta"] == outputs.read_stage(setup["reward"])["args"]["beta"]
    assert json.load(open(os.path.join(out, "trace.json")))["iterations"][0]["lambda"] == can["lambda"]
    rows = dual_alignment.read_jsonl(os.path.join(out, "can_samples.jsonl"))
    assert len(rows) == 4 * len(dual_alignment.training_prompts(dual_alignment.parse(flags)[0]))


def test_caid_scores_its_pseudo_preferences_with_score_models(setup, tmp_path):
    """--scorer models: the reward and the cost of each pseudo-preference response are what the score models give
    that prompt and response, the labels' probabilities follow from them, and the dual step reads the cost model."""
    from helpers import byte_tokenizer
    from transformers import LlamaConfig, LlamaForSequenceClassification

    tok = byte_tokenizer()
    paths = {}
    for i, name in enumerate(("reward", "cost")):
        torch.manual_seed(i)
        config = LlamaConfig(vocab_size=len(tok), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                             num_key_value_heads=2, intermediate_size=32, num_labels=1, pad_token_id=tok.pad_token_id)
        paths[name] = str(tmp_path / name)
        LlamaForSequenceClassification(config).save_pretrained(paths[name])
        tok.save_pretrained(paths[name])
    out = str(tmp_path / "caid-models")
    flags = argv(setup, out, iterations=1, policy_step="caid", extra=["--scorer", "models", "--reward_model",
                                                                     paths["reward"], "--cost_model", paths["cost"]])
    assert dual_alignment.main(flags) == 0
    pairs = dual_alignment.read_jsonl(os.path.join(out, "iter-0", "pseudo_preferences.jsonl"))
    scorer = evaluate.ModelScorer(paths["reward"], paths["cost"])
    scores = scorer([p["prompt"] for p in pairs] * 2,
                    [p["response_0"] for p in pairs] + [p["response_1"] for p in pairs])
    n = len(pairs)
    assert [p["reward_0"] for p in pairs] == pytest.approx([s["reward"] for s in scores[:n]], abs=1e-5)
    assert [p["cost_1"] for p in pairs] == pytest.approx([s["cost"] for s in scores[n:]], abs=1e-5)
    record = json.load(open(os.path.join(out, "trace.json")))["iterations"][0]
    results = json.load(open(os.path.join(out, "iter-0", "eval", "results.json")))[0]
    assert record["pseudo_preferences"] == n > 0 and record["constraint"] == results["mean_cost"] is not None
