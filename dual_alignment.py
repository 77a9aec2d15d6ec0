"""The dual loop (CAID, arXiv 2505.19387) on RSA's stepwise form: find the multiplier lambda that meets a budget on
harm, here a tail measure of it, by alternating a policy step and a dual step.

    python dual_alignment.py --reward_stage runs/demo/reward --data worlds/toy/train.jsonl --prompts worlds/toy \\
        --scorer toy --constraint cvar_cost_0.05 --budget 5 --iterations 6 --out runs/dual \\
        --max_length 64 --max_prompt_length 32 --batch_size 16 --lr 5e-3 --lora_r 8 --max_steps 150

Iteration k, with multiplier lambda_k:
  1. policy step: the maximiser of the Lagrangian reward - lambda_k * cost. In the stepwise form (RSA Eq. 12-13) it is
     the safety stage trained from pi_r with beta_s = beta_r / lambda_k (lambda_k = 0: pi_r itself, no training).
     Retraining from pi_r each time is the exact maximiser; nothing is warm-started.
  2. evaluation of the constraint on held-out prompts (evaluate.py): mean_cost, cvar_cost_0.1, cvar_cost_0.05 or
     severe_harm_rate, and the mean reward;
  3. dual step: lambda_{k+1} = max(0, lambda_k + dual_lr * (constraint_k - budget)).

CAID constrains expectations; a constraint on a CVaR of cost is the new part. RSA(P) instead fixes lambda and mixes
weights (merge_policies.py). Every flag this script does not know goes to train_safety_stage.py (except --beta, which
the loop sets). <out>/trace.json is rewritten after every iteration ({"iterations": [{"iteration", "lambda", "beta",
"constraint", "budget", "mean_reward", ...}]}), so a killed loop resumes where it stopped; each iteration's stage and
evaluation are resumable outputs of their own (<out>/iter-K/). At the end <out>/final holds the highest-reward
iterate that met the budget, with final.json saying which (or that none did).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

import evaluate
import outputs
import stage
import train_safety_stage
from outputs import UsageError

CONSTRAINTS = ("mean_cost", "cvar_cost_0.1", "cvar_cost_0.05", "severe_harm_rate")


def build_parser():
    p = argparse.ArgumentParser(prog="dual_alignment.py", description=__doc__, formatter_class=outputs.HelpFormatter)
    p.add_argument("--reward_stage", required=True, help="pi_r: the reward stage's output folder")
    p.add_argument("--data", required=True, help="harmlessness preference pairs for the safety stages")
    p.add_argument("--prompts", required=True, help="held-out evaluation prompts (evaluate.py's --prompts)")
    p.add_argument("--scorer", default="toy", choices=("toy", "models"), help="evaluate.py's scorer")
    p.add_argument("--reward_model", default=None, help="with --scorer models")
    p.add_argument("--cost_model", default=None, help="with --scorer models")
    p.add_argument("--constraint", default="cvar_cost_0.05", choices=CONSTRAINTS, help="the constrained quantity")
    p.add_argument("--budget", type=outputs.number, required=True, help="the constraint must be at most this")
    p.add_argument("--iterations", type=int, default=5, help="dual iterations")
    p.add_argument("--lambda_init", type=outputs.number, default=1.0, help="lambda_0 (0: start from pi_r itself)")
    p.add_argument("--dual_lr", type=outputs.number, default=1.0, help="step size of the dual update")
    p.add_argument("--num_samples", type=int, default=8, help="samples per evaluation prompt")
    p.add_argument("--max_new_tokens", type=int, default=128, help="generation length of the evaluation")
    p.add_argument("--seed", type=int, default=0, help="seed of the stages' training and the evaluation's sampling")
    p.add_argument("--out", required=True, help="output folder (resumable)")
    return p


def parse(argv):
    args, stage_flags = build_parser().parse_known_args(argv)
    outputs.check_ranges(args, positive=("iterations", "dual_lr", "num_samples", "max_new_tokens"),
                       non_negative=("lambda_init",))
    if any(f == "--beta" or f.startswith("--beta=") for f in stage_flags):
        raise UsageError("--beta: the loop sets beta_s = beta_r / lambda itself; drop the flag")
    if any(f in stage_flags for f in ("--reward_stage", "--out", "--resume", "--overwrite")):
        raise UsageError("--out / --resume / --overwrite of the stages are the loop's own")
    if args.scorer == "models" and not (args.reward_model or args.cost_model):
        raise UsageError("--scorer models needs --reward_model and/or --cost_model")
    evaluate.scorable_prompts(args.prompts, "test", args.scorer)
    # the flags for the safety stage, parsed by its own parser now, before anything is written
    stage.parse_args(train_safety_stage.build_parser(), ["--reward_stage", args.reward_stage, "--data", args.data,
                                                         "--out", os.path.join(args.out, "check"), *stage_flags])
    return args, stage_flags


def write_json(path, value):
    with open(path + ".tmp", "w") as f:
        json.dump(value, f, indent=1)
    os.replace(path + ".tmp", path)


def iteration(k, lam, beta_r, args, stage_flags):
    """One policy step and its evaluation: the record of iteration k."""
    folder = os.path.join(args.out, f"iter-{k}")
    policy = args.reward_stage if lam == 0 else os.path.join(folder, "policy")
    beta = None if lam == 0 else beta_r / lam
    if lam > 0:
        argv = ["--reward_stage", args.reward_stage, "--data", args.data, "--out", policy, "--beta", repr(beta),
                "--seed", str(args.seed), *stage_flags, *outputs.continue_flags(policy)]
        if train_safety_stage.main(argv) != 0:
            raise UsageError(f"the safety stage of iteration {k} failed (its error is above)")
    eval_out = os.path.join(folder, "eval")
    results_file = os.path.join(eval_out, "results.json")
    if not os.path.exists(results_file):
        extra = [f for flag in ("reward_model", "cost_model") if getattr(args, flag)
                 for f in (f"--{flag}", getattr(args, flag))]
        if evaluate.main(["--policies", policy, "--prompts", args.prompts, "--scorer", args.scorer, *extra,
                          "--num_samples", str(args.num_samples), "--max_new_tokens", str(args.max_new_tokens),
                          "--seed", str(args.seed), "--no_plots", "--out", eval_out]) != 0:
            raise UsageError(f"the evaluation of iteration {k} failed (its error is above)")
    with open(results_file) as f:
        res = json.load(f)[0]
    if res[args.constraint] is None:
        raise UsageError(f"--constraint {args.constraint}: the scorer gives no value for it")
    return {"iteration": k, "lambda": lam, "beta": beta, "constraint": res[args.constraint], "budget": args.budget,
            "meets_budget": res[args.constraint] <= args.budget, "mean_reward": res["mean_reward"],
            **{m: res[m] for m in CONSTRAINTS}, "policy": outputs.recorded_path(policy, args.out)}


def run(args, stage_flags):
    parent = outputs.read_stage(args.reward_stage)
    if parent["stage"] != "reward":
        raise UsageError(f"{args.reward_stage}: is a {parent['stage']} stage output; pass the reward stage's")
    beta_r = parent["args"]["beta"]
    os.makedirs(args.out, exist_ok=True)
    trace_file = os.path.join(args.out, "trace.json")
    setup = {"reward_stage": os.path.abspath(args.reward_stage), "constraint": args.constraint,
             "budget": args.budget, "lambda_init": args.lambda_init, "dual_lr": args.dual_lr,
             "seed": args.seed, "stage_flags": stage_flags, "warm_start": False}
    trace = {"setup": setup, "iterations": []}
    if os.path.exists(trace_file):
        with open(trace_file) as f:
            trace = json.load(f)
        if trace["setup"] != setup:
            raise UsageError(f"{trace_file}: a loop with other settings; use another --out")
    for k in range(len(trace["iterations"]), args.iterations):
        done = trace["iterations"]
        lam = args.lambda_init if not done else \
            max(0.0, done[-1]["lambda"] + args.dual_lr * (done[-1]["constraint"] - args.budget))
        print(f"==== dual iteration {k}: lambda = {lam:g}", flush=True)
        record = iteration(k, lam, beta_r, args, stage_flags)
        trace["iterations"].append(record)
        write_json(trace_file, trace)
        print(f"[dual] iteration {k}: lambda {lam:g}, {args.constraint} {record['constraint']:.4f} (budget "
              f"{args.budget:g}), mean reward {record['mean_reward']:.4f}", flush=True)
    feasible = [r for r in trace["iterations"] if r["meets_budget"]]
    final = os.path.join(args.out, "final")
    shutil.rmtree(final, ignore_errors=True)
    if not feasible:
        write_json(os.path.join(args.out, "final.json"), {"met_budget": False, "statement": (
            f"no iterate met {args.constraint} <= {args.budget:g} in {len(trace['iterations'])} iterations")})
        print(f"[dual] no iterate met the budget; see {trace_file}")
        return
    best = max(feasible, key=lambda r: r["mean_reward"])
    copy_output(outputs.resolved_path(best["policy"], args.out), final)
    write_json(os.path.join(args.out, "final.json"), {"met_budget": True, **best})
    print(f"[dual] final: iteration {best['iteration']} (lambda {best['lambda']:g}): {args.constraint} "
          f"{best['constraint']:.4f}, mean reward {best['mean_reward']:.4f} -> {final}")


def copy_output(src, dst):
    """Copy a finished stage or mixture folder, its recorded paths rewritten for where the copy lies."""
    shutil.copytree(src, dst)
    cfg = outputs.read_stage(dst)
    for key in ("base_model", "parent", "first", "second"):
        if cfg.get(key):
            cfg[key] = outputs.recorded_path(outputs.resolved_path(cfg[key], src), dst)
    outputs.write_json(os.path.join(dst, outputs.CONFIG_FILE), cfg)
    if os.path.exists(os.path.join(dst, outputs.ADAPTER_CONFIG)):
        with open(os.path.join(dst, outputs.ADAPTER_CONFIG)) as f:
            config = json.load(f)
        config["base_model_name_or_path"] = outputs.peft_base(cfg["base_model"], dst)
        outputs.write_json(os.path.join(dst, outputs.ADAPTER_CONFIG), config)


def main(argv=None):
    def parse_and_run(argv):
        args, stage_flags = parse(argv)
        with outputs.output_lock(args.out):
            run(args, stage_flags)

    return outputs.run_script("dual_alignment.py", parse_and_run, argv)


if __name__ == "__main__":
    sys.exit(main())
