"""dual_alignment.py: the CAID loop in miniature on the tiny toy world."""

import json
import os
import subprocess
import sys
import time

import pytest
from test_stages import FAST, subset

import dual_alignment
import outputs
import stage
import train_reward_stage

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


def argv(setup, out, iterations=3, budget="0.5", extra=()):
    return ["--reward_stage", setup["reward"], "--data", setup["pairs"], "--prompts", setup["world"], "--scorer",
            "toy", "--constraint", "mean_cost", "--budget", budget, "--iterations", str(iterations), "--lambda_init",
            "0", "--dual_lr", "4", "--num_samples", "2", "--max_new_tokens", "8", "--out", out, *STAGE, *extra]


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
        assert final["iteration"] == best["iteration"] and stage.load_policy(os.path.join(out, "final"))
    else:
        assert final["met_budget"] is False and "no iterate met" in final["statement"]


def test_a_killed_loop_resumes_where_it_stopped(setup):
    out = str(setup["tmp"] / "killed")
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "dual_alignment.py"), *argv(setup, out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    trace_file = os.path.join(out, "trace.json")
    for _ in range(1200):  # kill it once the first iteration is recorded
        if os.path.exists(trace_file):
            break
        time.sleep(0.1)
    proc.kill()
    proc.wait()
    first = json.load(open(trace_file))["iterations"]
    assert len(first) in (1, 2)  # killed mid-loop
    assert dual_alignment.main(argv(setup, out)) == 0
    trace = json.load(open(trace_file))["iterations"]
    assert len(trace) == 3 and trace[: len(first)] == first  # finished iterations are kept, not redone


@pytest.mark.parametrize("extra,message", [
    (["--iterations", "0"], "--iterations must be positive"),
    (["--dual_lr", "-1"], "--dual_lr must be positive"),
    (["--lambda_init", "-2"], "--lambda_init must be 0 or more"),
    (["--beta", "0.01"], "the loop sets beta_s = beta_r / lambda itself"),
])
def test_bad_flags_are_one_line_errors(setup, extra, message, capsys):
    out = str(setup["tmp"] / "bad")
    assert dual_alignment.main(argv(setup, out, extra=extra)) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and not os.path.exists(out)
