"""The study: at matched helpfulness, does risk-aware stepwise alignment suppress the tail better than SACPO? And for a
budget on tail harm, what does the dual loop (CAID) buy over a fixed lambda and over RSA(P)?

    python study.py --out runs/study --jobs 2      # or: make study   (resumable; not part of CI)
    python study.py --out runs/study --report      # only the analysis, from the evaluations on disk

On the toy world (fixed: seed 0) and for 5 training seeds:
  1. frontiers by strength: each method (SACPO = DPO in both stages, TDPO = the expectation, RSA with the authors'
     CVaR 0.95, the paper-form CVaR 0.25 and ERM mu 1) trains its reward stage (beta_r 0.1) and then one safety stage
     per beta_s in BETAS (lambda = beta_r / beta_s from 0.2 to 50), plus the RSA(P) / P-SACPO mixtures of the default
     stage (beta_s 0.01) at QS;
  2. budgets on CVaR 0.05 of cost, for RSA (CVaR 0.95): (a) the fixed default lambda, (b) RSA(P) with q found by
     bisection (evaluations only), (c) the dual loop (dual_alignment.py). Choices are made on tuning prompts (56
     training-set prompts), results are reported on the held-out ones;
  3. the reward-stage check: SACPO's reward stage at larger beta_r, matched in KL or reward to RSA's.
Every policy is evaluated on the 56 held-out prompts x SAMPLES samples with the toy world's ground truth. The analysis
(`analyse`) writes matched.md, matched.png and equal.md into --out. Every stage, mixture, evaluation and dual loop is a
resumable output of its own: a killed study restarts where it stopped.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import sys
from concurrent.futures import ProcessPoolExecutor

import torch

import dual_alignment
import evaluate
import merge_policies
import stage
import toy
import train_reward_stage
import train_safety_stage

METHODS = {
    "sacpo": ["--loss", "dpo"],
    "tdpo": ["--risk_measure", "expectation"],
    "rsa_radpo_0.95": ["--risk_measure", "cvar_radpo", "--risk_level", "0.95"],
    "rsa_cvar_0.25": ["--risk_measure", "cvar", "--risk_level", "0.25"],
    "rsa_erm_1": ["--risk_measure", "erm", "--risk_level", "1"],
}
RSA = "rsa_radpo_0.95"  # the method of the budget comparison
BETA_R = 0.1
BETAS = (0.5, 0.2, 0.1, 0.05, 0.02, 0.01, 0.005, 0.002)  # beta_s: lambda = 0.2 ... 50
DEFAULT_BETA = 0.01  # train_safety_stage.py's default (lambda 10)
QS = (0.25, 0.5, 0.75)
BUDGETS = (8.0, 5.0)  # on CVaR 0.05 of cost; the SFT model's is about 8
BISECTIONS = 5  # RSA(P): q to 1/32
DUAL = {"iterations": 6, "lambda_init": 10.0, "dual_lr": 2.0}
CHECK_BETA_R = (0.3, 1.0)  # the reward-stage check for SACPO
METRICS = ("mean_reward", "mean_cost", "safe_rate", "cvar_cost_0.1", "cvar_cost_0.05", "severe_harm_rate")


class Study:
    """Where everything lies, and the shared settings of every stage and evaluation."""

    def __init__(self, out, world, steps, samples):
        self.out, self.world, self.steps, self.samples = out, world, steps, samples
        self.tune = os.path.join(out, "tune_prompts.json")
        self.heldout = world

    def stage_flags(self, seed):
        return ["--data", f"{self.world}/train.jsonl", "--max_length", "64", "--max_prompt_length", "32",
                "--batch_size", "16", "--lr", "5e-3", "--lora_r", "8", "--max_steps", str(self.steps),
                "--log_every", "50", "--seed", str(seed)]

    def base(self, method, seed):
        return os.path.join(self.out, method, f"seed{seed}")

    def evaluated(self, policy, out, seed, prompts=None, extra=()):
        """The results row of `policy` (evaluated into `out` unless already there)."""
        results = os.path.join(out, "results.json")
        if not os.path.exists(results):
            argv = ["--policies", policy, "--prompts", prompts or self.heldout, "--scorer", "toy", "--num_samples",
                    str(self.samples), "--max_new_tokens", "24", "--seed", str(seed), "--no_plots", "--out", out,
                    *extra]
            if evaluate.main(argv) != 0:
                raise RuntimeError(f"evaluation of {policy} into {out} failed (its log says why)")
        with open(results) as f:
            return json.load(f)[0]


def trained(script, out, argv):
    """Train (or resume, or reuse) one stage into `out`."""
    if script.main([*argv, "--out", out, *stage.continue_flags(out)]) != 0:
        raise RuntimeError(f"{script.__name__} into {out} failed (its log says why)")
    return out


def mixed(first, second, qs, out):
    if merge_policies.main(["--first", first, "--second", second, "--q", *map(repr, qs), "--out", out]) != 0:
        raise RuntimeError(f"merge into {out} failed (its log says why)")
    return [os.path.join(out, f"q{q:g}") for q in qs]


# ------------------------------------------------------------------------------------------------------------ jobs


def sweep_job(s, method, seed):
    """One method, one seed: the reward stage, a safety stage per beta_s, the mixtures, their evaluations."""
    base, flags = s.base(method, seed), [*s.stage_flags(seed), *METHODS[method]]
    reward = trained(train_reward_stage, f"{base}/reward", ["--sft", f"{s.world}/sft", *flags])
    s.evaluated(reward, f"{base}/eval/reward", seed,
                extra=("--kl_pairs", f"{s.world}/test.jsonl", "--kl_reference", f"{s.world}/sft"))
    for beta in BETAS:
        safety = trained(train_safety_stage, f"{base}/safety/b{beta:g}",
                         ["--reward_stage", reward, "--beta", repr(beta), *flags])
        s.evaluated(safety, f"{base}/eval/b{beta:g}", seed)
    for mix in mixed(reward, f"{base}/safety/b{DEFAULT_BETA:g}", QS, f"{base}/mix"):
        s.evaluated(mix, f"{base}/eval/{os.path.basename(mix)}", seed)


def budget_job(s, budget, seed):
    """For one budget on CVaR 0.05 of cost: RSA(P)'s bisection over q and the dual loop, chosen on the tuning prompts
    and evaluated on the held-out ones. (The fixed lambda is the sweep's default stage.)"""
    base, out = s.base(RSA, seed), os.path.join(s.out, "budget", f"B{budget:g}", f"seed{seed}")
    reward, safety = f"{base}/reward", f"{base}/safety/b{DEFAULT_BETA:g}"
    trace_file = os.path.join(out, "bisection.json")
    if not os.path.exists(trace_file):
        def cvar(q):
            policy = safety if q == 0 else reward if q == 1 else mixed(reward, safety, [q], f"{out}/mix")[0]
            res = s.evaluated(policy, f"{out}/tune/q{q:g}", seed, prompts=s.tune)
            trace.append({"q": q, "constraint": res["cvar_cost_0.05"], "mean_reward": res["mean_reward"]})
            return res["cvar_cost_0.05"]

        trace, lo, hi = [], 0.0, 1.0  # q = 1 is pi_r, q = 0 the safety policy
        if cvar(1.0) <= budget:
            lo = 1.0
        elif cvar(0.0) <= budget:
            for _ in range(BISECTIONS):
                mid = (lo + hi) / 2
                lo, hi = (mid, hi) if cvar(mid) <= budget else (lo, mid)
        met = next(t["constraint"] for t in trace if t["q"] == lo) <= budget
        dual_alignment.write_json(trace_file, {"budget": budget, "q": lo, "met_on_tuning": met, "trace": trace,
                                               "evaluations": len(trace)})
    with open(trace_file) as f:
        q = json.load(f)["q"]
    policy = safety if q == 0 else reward if q == 1 else mixed(reward, safety, [q], f"{out}/mix")[0]
    s.evaluated(policy, f"{out}/rsa_p_heldout", seed)
    argv = ["--reward_stage", reward, "--prompts", s.tune, "--scorer", "toy", "--constraint", "cvar_cost_0.05",
            "--budget", repr(budget), "--num_samples", str(s.samples), "--max_new_tokens", "24",
            "--seed", str(seed), "--out", f"{out}/dual", *[f"--{k}={v}" for k, v in DUAL.items()],
            *s.stage_flags(seed), *METHODS[RSA]]
    if dual_alignment.main(argv) != 0:
        raise RuntimeError(f"the dual loop into {out}/dual failed (its log says why)")
    if os.path.isdir(f"{out}/dual/final"):
        s.evaluated(f"{out}/dual/final", f"{out}/dual_heldout", seed)


def check_job(s, beta_r, seed):
    """SACPO's reward stage at a larger beta_r, evaluated with its KL to the SFT model."""
    base = os.path.join(s.out, "check", f"sacpo_br{beta_r:g}", f"seed{seed}")
    reward = trained(train_reward_stage, f"{base}/reward",
                     ["--sft", f"{s.world}/sft", "--beta", repr(beta_r), *s.stage_flags(seed), *METHODS["sacpo"]])
    s.evaluated(reward, f"{base}/eval/reward", seed,
                extra=("--kl_pairs", f"{s.world}/test.jsonl", "--kl_reference", f"{s.world}/sft"))


def sft_job(s, seed):
    s.evaluated(f"{s.world}/sft", os.path.join(s.out, "sft", f"seed{seed}"), seed)


@contextlib.contextmanager
def logged(path):
    """Send this process's stdout and stderr (file descriptors, so progress bars too) to `path`."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(path, "a") as f:
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def run_job(job):
    fn, s, *args = job
    name = "-".join(str(a) for a in (fn.__name__.removesuffix("_job"), *args))
    with logged(os.path.join(s.out, "logs", name + ".log")):
        fn(s, *args)
    return name


def init_worker(threads):
    torch.set_num_threads(threads)


def run_all(jobs, workers):
    """Run jobs (each a tuple: function, Study, args...) on `workers` processes; the first failure stops the study."""
    if workers == 1:
        for job in jobs:
            print(f"[study] done {run_job(job)}", flush=True)
        return
    threads = max(1, (os.cpu_count() or 1) // workers)
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=init_worker, initargs=(threads,)) as pool:
        for name in pool.map(run_job, jobs):
            print(f"[study] done {name}", flush=True)


def write_tune_prompts(path):
    """56 training-set prompts with the held-out set's category mix: the bisection and the dual loop choose on these."""
    train = toy.split_prompts()[0]
    want = {"benign": 24}
    picked = [p for c in sorted({c for _, c in train})
              for p in [{"prompt": t, "category": c} for t, cc in train if cc == c][:want.get(c, 4)]]
    dual_alignment.write_json(path, picked)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=stage.HelpFormatter)
    p.add_argument("--out", default="runs/study", help="output folder (resumable)")
    p.add_argument("--world", default="worlds/toy", help="toy world folder (built if missing)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="training seeds")
    p.add_argument("--steps", type=int, default=150, help="optimizer steps per stage")
    p.add_argument("--samples", type=int, default=16, help="samples per evaluation prompt")
    p.add_argument("--jobs", type=int, default=2, help="worker processes (threads are split among them)")
    p.add_argument("--parts", nargs="+", default=["sweep", "budget", "check"], choices=("sweep", "budget", "check"),
                   help="which parts to run (the budget part needs the sweep's RSA stages)")
    p.add_argument("--report", action="store_true", help="only the analysis of what is on disk")
    args = p.parse_args(argv)
    try:
        stage.check_ranges(args, positive=("steps", "samples", "jobs"))
        if any(seed < 0 for seed in args.seeds):
            raise stage.UsageError(f"--seeds must be 0 or more, got {args.seeds}")
    except stage.UsageError as e:
        print(f"study.py: error: {e}", file=sys.stderr)
        return 2
    s = Study(os.path.abspath(args.out), os.path.abspath(args.world), args.steps, args.samples)
    if not args.report:
        toy.build(s.world, "full", 0)
        os.makedirs(s.out, exist_ok=True)
        write_tune_prompts(s.tune)
        jobs = [(sft_job, s, seed) for seed in args.seeds]
        if "sweep" in args.parts:
            jobs += [(sweep_job, s, m, seed) for seed in args.seeds for m in METHODS]
        run_all(jobs, args.jobs)
        later = [(budget_job, s, b, seed) for b in BUDGETS for seed in args.seeds] if "budget" in args.parts else []
        later += [(check_job, s, b, seed) for b in CHECK_BETA_R for seed in args.seeds] if "check" in args.parts \
            else []
        run_all(later, args.jobs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
