"""The dual loop (CAID, arXiv 2505.19387): find the multiplier lambda that meets a budget on harm by alternating a
policy step, the maximiser of the Lagrangian reward - lambda * cost for the current lambda, and a dual step.

    # CAID as its paper runs it: DPO from the SFT model on pseudo-preferences of r - lambda c, warm-started by CAN
    python dual_alignment.py --policy_step caid --sft worlds/toy/sft --data worlds/toy/train.jsonl \\
        --prompts worlds/toy --scorer toy --constraint mean_cost --budget 1 --lambda_init can --iterations 4 \\
        --out runs/caid --beta 0.5 --max_length 64 --max_prompt_length 32 --batch_size 16 --lr 5e-3 --lora_r 8
    # the stepwise variant: the safety stage from pi_r at beta_r / lambda, on the harmlessness pairs
    python dual_alignment.py --reward_stage runs/demo/reward --data worlds/toy/train.jsonl --prompts worlds/toy \\
        --scorer toy --constraint cvar_cost_0.05 --budget 5 --iterations 6 --out runs/dual \\
        --max_length 64 --max_prompt_length 32 --batch_size 16 --lr 5e-3 --lora_r 8 --max_steps 150

Iteration k, with multiplier lambda_k (docs/math.md Sec. 6):
  1. policy step, one of
     stepwise: the safety stage trained from pi_r with beta_s = beta_r / lambda_k on the harmlessness pairs (--data);
       pi_r exp(-c / beta_s) / Y is the one-shot optimum pi_sft exp((r - lambda c) / beta_r) / Z (RSA Eq. 12-13);
       lambda_k = 0 is pi_r itself, no training.
     caid: two responses per training prompt (the unique prompts of --data) drawn from the SFT model pi_ref, both
       scored (the toy world's ground truth or --reward_model / --cost_model), the pair labelled by drawing
       Bradley-Terry on the composite u = r - lambda_k c (P(y0 preferred) = sigmoid(u0 - u1)), and the reward
       stage's script trained from pi_ref on those pseudo-preferences (--loss dpo unless another is given; one
       epoch by default): its optimum is pi_ref exp((r - lambda_k c) / beta) / Z. Fresh responses every iteration.
  2. evaluation of the constraint on fresh samples of the new policy on held-out prompts (evaluate.py): mean_cost,
     cvar_cost_0.1, cvar_cost_0.05 or severe_harm_rate, and the mean reward;
  3. dual step: lambda_{k+1} = max(0, lambda_k + dual_lr * (constraint_k - budget)), the budget on the constraint
     itself (the paper's budget centred by pi_ref's mean cost is this budget minus that mean).

--lambda_init can (CAN, the one-shot dual of the mean-cost constraint): lambda_0 = argmin over lambda >= 0 of
D(lambda) = mean_x beta log mean_i exp((r_xi - lambda (c_xi - b)) / beta) over --can_samples responses of pi_ref per
training prompt, by projected Newton steps (`can_lambda`; <out>/can.json records it).

Flags this script does not know go to the policy step's script: train_safety_stage.py (stepwise; --beta is the
loop's) or train_reward_stage.py (caid; --beta is CAID's beta). <out>/trace.json is rewritten after every iteration
({"iterations": [{"iteration", "lambda", "beta", "pseudo_preferences", "constraint", "budget", "mean_reward", ...}]}),
so a killed loop resumes where it stopped; each iteration's training and evaluation are resumable outputs of their
own (<out>/iter-K/). At the end <out>/final holds the highest-reward iterate that met the budget, with final.json
saying which (or that none did).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import sys

import torch

import evaluate
import merge_policies
import outputs
import stage
import train_reward_stage
import train_safety_stage
from outputs import UsageError

CONSTRAINTS = ("mean_cost", "cvar_cost_0.1", "cvar_cost_0.05", "severe_harm_rate")


def lambda_start(text):
    """--lambda_init: a number >= 0, or can (the one-shot dual's minimiser)."""
    try:
        return "can" if text == "can" else outputs.number(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or can, got {text!r}") from None


def build_parser():
    p = argparse.ArgumentParser(prog="dual_alignment.py", description=__doc__, formatter_class=outputs.HelpFormatter)
    p.add_argument("--policy_step", default="stepwise", choices=("stepwise", "caid"),
                   help="stepwise: safety stages from pi_r at beta_r / lambda; caid: DPO from the SFT model on "
                        "pseudo-preferences of r - lambda c")
    p.add_argument("--reward_stage", default=None, help="stepwise: pi_r, the reward stage's output folder")
    p.add_argument("--sft", default=None, help="caid: the SFT model pi_ref (a local folder or a hub id)")
    p.add_argument("--data", required=True,
                   help="stepwise: harmlessness preference pairs for the safety stages; caid: the training prompts "
                        "(the unique prompts of a preference set or file, or a prompt file)")
    p.add_argument("--prompts", required=True, help="held-out evaluation prompts (evaluate.py's --prompts)")
    p.add_argument("--scorer", default="toy", choices=("toy", "models"), help="evaluate.py's scorer")
    p.add_argument("--reward_model", default=None, help="with --scorer models")
    p.add_argument("--cost_model", default=None, help="with --scorer models")
    p.add_argument("--constraint", default="cvar_cost_0.05", choices=CONSTRAINTS, help="the constrained quantity")
    p.add_argument("--budget", type=outputs.number, required=True, help="the constraint must be at most this")
    p.add_argument("--iterations", type=int, default=5, help="dual iterations")
    p.add_argument("--lambda_init", type=lambda_start, default=1.0,
                   help="lambda_0: a number (0 with stepwise: pi_r itself), or can: the one-shot dual's minimiser "
                        "(--constraint mean_cost)")
    p.add_argument("--can_samples", type=int, default=8, help="--lambda_init can: responses of pi_ref per prompt")
    p.add_argument("--pairs_per_prompt", type=int, default=1, help="caid: pseudo-preference pairs per training prompt")
    p.add_argument("--dual_lr", type=outputs.number, default=1.0, help="step size of the dual update")
    p.add_argument("--num_samples", type=int, default=8, help="samples per evaluation prompt")
    p.add_argument("--max_new_tokens", type=int, default=128,
                   help="generation length of the evaluation and of the responses caid and can draw")
    p.add_argument("--seed", type=int, default=0, help="seed of the training, the labels and the sampling")
    p.add_argument("--out", required=True, help="output folder (resumable)")
    return p


def given(flags, *names):
    """Whether any of the flags `names` is among `flags` (as --name value or --name=value)."""
    return any(f.split("=", 1)[0] in names for f in flags)


def needs_scores(args):
    """caid labels pairs, and the warm start weighs responses, by their reward and cost."""
    return args.policy_step == "caid" or args.lambda_init == "can"


def parse(argv):
    """(args, the flags for the policy step's script, those flags parsed by that script's parser)."""
    args, stage_flags = build_parser().parse_known_args(argv)
    outputs.check_ranges(args, positive=("iterations", "dual_lr", "num_samples", "max_new_tokens", "can_samples",
                                         "pairs_per_prompt"))
    if args.lambda_init != "can" and args.lambda_init < 0:
        raise UsageError(f"--lambda_init must be 0 or more (or can), got {args.lambda_init:g}")
    if args.lambda_init == "can" and args.constraint != "mean_cost":
        raise UsageError("--lambda_init can: the one-shot dual is that of the mean cost; use --constraint mean_cost "
                         "or a number")
    if given(stage_flags, "--out", "--resume", "--overwrite", "--preference"):
        raise UsageError("--out / --resume / --overwrite / --preference of the stages are the loop's own")
    if args.scorer == "models" and not (args.reward_model or args.cost_model):
        raise UsageError("--scorer models needs --reward_model and/or --cost_model")
    if needs_scores(args) and args.scorer == "models" and not (args.reward_model and args.cost_model):
        raise UsageError("caid and --lambda_init can score responses by reward and cost: --scorer models needs "
                         "both --reward_model and --cost_model")
    evaluate.scorable_prompts(args.prompts, "test", args.scorer)
    check = ["--data", args.data, "--out", os.path.join(args.out, "check"), *stage_flags]
    if args.policy_step == "stepwise":  # the stage's flags, parsed by its own parser now, before anything is written
        if not args.reward_stage or args.sft:
            raise UsageError("--policy_step stepwise trains from pi_r: pass --reward_stage (not --sft)")
        if given(stage_flags, "--beta"):
            raise UsageError("--beta: the loop sets beta_s = beta_r / lambda itself; drop the flag")
        parsed = stage.parse_args(train_safety_stage.build_parser(), ["--reward_stage", args.reward_stage, *check])
    else:
        if not args.sft or args.reward_stage:
            raise UsageError("--policy_step caid trains from the SFT model: pass --sft (not --reward_stage)")
        parsed = stage.parse_args(train_reward_stage.build_parser(), ["--sft", args.sft, *check])
    if needs_scores(args):
        training_prompts(args)  # refused now when the scorer cannot score them
    return args, stage_flags, parsed


def write_json(path, value):
    with open(path + ".tmp", "w") as f:
        json.dump(value, f, indent=1)
    os.replace(path + ".tmp", path)


def write_jsonl(path, rows):
    with open(path + ".tmp", "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    os.replace(path + ".tmp", path)


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


# ---------------------------------------------------------------------------------------------- sampling, labels


def training_prompts(args):
    """The unique prompts of --data, in order of first appearance."""
    return list(dict.fromkeys(p["prompt"] for p in evaluate.scorable_prompts(args.data, "train", args.scorer)))


def sample_scored(model_path, prompts, n, args, seed, desc):
    """n responses of the model to each prompt with their reward and cost: rows {prompt, response, reward, cost},
    prompt-major. The model is freed before the scorer loads."""
    device = evaluate.resolve_device("auto")
    dtype = stage.resolve_dtype("auto", device)
    model = merge_policies.load_policy(model_path, dtype=dtype).to(device)
    responses = evaluate.sample_responses(model, stage.load_tokenizer(model_path), prompts, n, args.max_new_tokens,
                                          seed=seed, desc=desc)
    del model
    evaluate.free_device_memory(device)
    flat = [(p, r) for p, rs in zip(prompts, responses) for r in rs]
    scorer = evaluate.ToyScorer(args.prompts if os.path.isdir(args.prompts) else None) if args.scorer == "toy" else \
        evaluate.ModelScorer(args.reward_model, args.cost_model, device=device, dtype=dtype)
    scores = scorer([p for p, _ in flat], [r for _, r in flat])
    return [{"prompt": p, "response": r, "reward": s["reward"], "cost": s["cost"]} for (p, r), s in zip(flat, scores)]


def pseudo_preferences(rows, lam, rng):
    """PKU-schema pairs from consecutive sampled rows (two per pair), labelled by drawing Bradley-Terry on the
    composite u = r - lambda c: response_0 is the better one with probability sigmoid(u0 - u1). Pairs of two equal
    responses carry no preference and pairs with an empty response are refused by the data loader: both are left
    out, and counted. Returns (pairs, number left out)."""
    pairs, left_out = [], 0
    for a, b in zip(rows[0::2], rows[1::2]):
        if a["response"] == b["response"] or not a["response"].strip() or not b["response"].strip():
            left_out += 1
            continue
        margin = (a["reward"] - lam * a["cost"]) - (b["reward"] - lam * b["cost"])
        p_first = 1 / (1 + math.exp(-margin)) if margin > -700 else 0.0
        pairs.append({"prompt": a["prompt"], "response_0": a["response"], "response_1": b["response"],
                      "better_response_id": 0 if rng.random() < p_first else 1, "p_response_0_better": p_first,
                      "reward_0": a["reward"], "cost_0": a["cost"], "reward_1": b["reward"], "cost_1": b["cost"]})
    return pairs, left_out


# ---------------------------------------------------------------------------------------------- the one-shot dual


def can_dual(lam, rewards, costs, budget, beta, weights=None):
    """The one-shot dual of max_pi E[r] - beta KL(pi || pi_ref) s.t. E[c] <= b, estimated on responses of pi_ref:
    D(lambda) = mean_x beta log sum_i w_xi exp((r_xi - lambda (c_xi - b)) / beta), the Lagrangian's value at its
    maximiser pi_lambda = pi_ref exp((r - lambda c) / beta) / Z. (prompts, n) float64 tensors; weights default to
    1 / n (samples), or the reference's probabilities of an enumerated response list. Returns D, D'(lambda) =
    b - mean_x E_{pi_lambda}[c] and D''(lambda) = mean_x Var_{pi_lambda}[c] / beta."""
    log_w = weights.log() if weights is not None else torch.full_like(rewards, -math.log(rewards.shape[-1]))
    logits = log_w + (rewards - lam * (costs - budget)) / beta
    tilt = torch.softmax(logits, -1)
    mean_cost = (tilt * costs).sum(-1)
    variance = (tilt * (costs - mean_cost[:, None]) ** 2).sum(-1)
    return ((beta * torch.logsumexp(logits, -1)).mean().item(), (budget - mean_cost).mean().item(),
            (variance.mean() / beta).item())


def can_lambda(rewards, costs, budget, beta, weights=None, tol=1e-13, max_steps=200):
    """argmin over lambda >= 0 of the convex D(lambda) (`can_dual`) by projected Newton steps (the gradient scaled by
    1 / D''), each halved until D does not rise. 0 when pi_0 (the reward-only optimum) meets the budget already."""
    rewards, costs = rewards.double(), costs.double()
    weights = None if weights is None else weights.double()
    reachable = costs if weights is None else costs.masked_fill(weights <= 0, math.inf)
    if reachable.min(-1).values.mean().item() >= budget:
        raise UsageError(f"--budget {budget:g}: at or below the mean cost of the cheapest responses of pi_ref "
                         f"({reachable.min(-1).values.mean().item():.4g}); no lambda meets it")
    lam = 0.0
    value, slope, curvature = can_dual(lam, rewards, costs, budget, beta, weights)
    if slope >= 0:
        return 0.0
    for _ in range(max_steps):
        if abs(slope) < tol:
            break
        step = -slope / max(curvature, 1e-300)
        for _ in range(60):
            new = max(0.0, lam + step)
            new_value, new_slope, new_curvature = can_dual(new, rewards, costs, budget, beta, weights)
            if new_value <= value + 1e-15 * abs(value):
                break
            step /= 2
        if new == lam:
            break
        lam, value, slope, curvature = new, new_value, new_slope, new_curvature
    return lam


def warm_start(args, reference, beta, prompts):
    """lambda_0 = CAN's minimiser on --can_samples responses of pi_ref per training prompt (<out>/can.json)."""
    record_file = os.path.join(args.out, "can.json")
    if os.path.exists(record_file):
        with open(record_file) as f:
            return json.load(f)["lambda"]
    samples_file = os.path.join(args.out, "can_samples.jsonl")
    if not os.path.exists(samples_file):
        write_jsonl(samples_file, sample_scored(reference, prompts, args.can_samples, args, args.seed,
                                                "sampling pi_ref for the warm start"))
    rows = read_jsonl(samples_file)
    shape = (len(prompts), args.can_samples)
    rewards = torch.tensor([r["reward"] for r in rows], dtype=torch.float64).reshape(shape)
    costs = torch.tensor([r["cost"] for r in rows], dtype=torch.float64).reshape(shape)
    lam = can_lambda(rewards, costs, args.budget, beta)
    value, slope, _ = can_dual(lam, rewards, costs, args.budget, beta)
    write_json(record_file, {"lambda": lam, "beta": beta, "budget": args.budget, "dual_value": value,
                             "mean_cost_of_pi_lambda": args.budget - slope, "prompts": len(prompts),
                             "samples_per_prompt": args.can_samples, "samples": "can_samples.jsonl"})
    print(f"[dual] warm start (CAN): lambda_0 = {lam:.6g} (beta {beta:g}, {len(rows)} responses of pi_ref)",
          flush=True)
    return lam


# ---------------------------------------------------------------------------------------------- the loop


def continue_flags(out):
    """For scripts that drive a stage again after a kill: --resume when <out>.tmp has a checkpoint, --overwrite when
    it was stopped before its first one, nothing when there is no unfinished run."""
    work = out.rstrip("/") + ".tmp"
    if os.path.exists(out) or not os.path.exists(work):
        return []
    return ["--resume"] if outputs.latest_checkpoint(work) else ["--overwrite"]


def stage_or_fail(main, argv, what):
    if main(argv) != 0:
        raise UsageError(f"{what} failed (its error is above)")


def stepwise_step(k, lam, folder, loop):
    """The safety stage from pi_r at beta_r / lambda (lambda 0: pi_r itself)."""
    args = loop["args"]
    if lam == 0:
        return args.reward_stage, None, {}
    policy, beta = os.path.join(folder, "policy"), loop["beta"] / lam
    stage_or_fail(train_safety_stage.main, ["--reward_stage", args.reward_stage, "--data", args.data, "--out", policy,
                                            "--beta", repr(beta), "--seed", str(args.seed), *loop["stage_flags"],
                                            *continue_flags(policy)], f"the safety stage of iteration {k}")
    return policy, beta, {}


def caid_step(k, lam, folder, loop):
    """DPO from pi_ref on fresh pseudo-preferences of r - lambda c."""
    args, policy = loop["args"], os.path.join(folder, "policy")
    pseudo_file = os.path.join(folder, "pseudo_preferences.jsonl")
    os.makedirs(folder, exist_ok=True)
    if not os.path.exists(pseudo_file):
        rows = sample_scored(loop["reference"], loop["prompts"], 2 * args.pairs_per_prompt, args, args.seed + 1 + k,
                             f"sampling pi_ref for iteration {k}")
        pairs, left_out = pseudo_preferences(rows, lam, random.Random(args.seed * 1_000_003 + k))
        if not pairs:
            raise UsageError(f"iteration {k}: every pair of responses drawn from pi_ref had two equal responses or "
                             "an empty one; raise --max_new_tokens or --pairs_per_prompt")
        write_json(os.path.join(folder, "pseudo_preferences.json"), {"pairs": len(pairs), "left_out": left_out})
        write_jsonl(pseudo_file, pairs)
    with open(os.path.join(folder, "pseudo_preferences.json")) as f:
        counts = json.load(f)
    loss = [] if given(loop["stage_flags"], "--loss") else ["--loss", "dpo"]
    stage_or_fail(train_reward_stage.main, ["--sft", args.sft, "--data", pseudo_file, "--out", policy, "--seed",
                                            str(args.seed), *loss, *loop["stage_flags"],
                                            *continue_flags(policy)], f"the policy step of iteration {k}")
    return policy, loop["beta"], {"pseudo_preferences": counts["pairs"], "pairs_left_out": counts["left_out"]}


def iteration(k, lam, loop):
    """One policy step and its evaluation: the record of iteration k."""
    args = loop["args"]
    folder = os.path.join(args.out, f"iter-{k}")
    step = stepwise_step if args.policy_step == "stepwise" else caid_step
    policy, beta, extra = step(k, lam, folder, loop)
    eval_out = os.path.join(folder, "eval")
    results_file = os.path.join(eval_out, "results.json")
    if not os.path.exists(results_file):
        scorers = [f for flag in ("reward_model", "cost_model") if getattr(args, flag)
                   for f in (f"--{flag}", getattr(args, flag))]
        if evaluate.main(["--policies", policy, "--prompts", args.prompts, "--scorer", args.scorer, *scorers,
                          "--num_samples", str(args.num_samples), "--max_new_tokens", str(args.max_new_tokens),
                          "--seed", str(args.seed), "--no_plots", "--out", eval_out]) != 0:
            raise UsageError(f"the evaluation of iteration {k} failed (its error is above)")
    with open(results_file) as f:
        res = json.load(f)[0]
    if res[args.constraint] is None:
        raise UsageError(f"--constraint {args.constraint}: the scorer gives no value for it")
    return {"iteration": k, "lambda": lam, "beta": beta, **extra, "constraint": res[args.constraint],
            "budget": args.budget, "meets_budget": res[args.constraint] <= args.budget,
            "mean_reward": res["mean_reward"], **{m: res[m] for m in CONSTRAINTS},
            "policy": outputs.recorded_path(policy, args.out)}


def run(args, stage_flags, parsed):
    loop = {"args": args, "stage_flags": stage_flags}
    if args.policy_step == "stepwise":
        parent = outputs.read_stage(args.reward_stage)
        if parent["stage"] != "reward":
            raise UsageError(f"{args.reward_stage}: is a {parent['stage']} stage output; pass the reward stage's")
        loop["beta"], loop["reference"] = parent["args"]["beta"], outputs.base_of(args.reward_stage)[0]
    else:
        loop["beta"], loop["reference"] = parsed.beta, outputs.gguf_folder(args.sft)
    loop["prompts"] = training_prompts(args) if needs_scores(args) else None
    os.makedirs(args.out, exist_ok=True)
    trace_file = os.path.join(args.out, "trace.json")
    setup = {"policy_step": args.policy_step, "reward_stage": args.reward_stage and os.path.abspath(args.reward_stage),
             "sft": args.sft, "constraint": args.constraint, "budget": args.budget, "lambda_init": args.lambda_init,
             "dual_lr": args.dual_lr, "seed": args.seed, "stage_flags": stage_flags}
    if args.policy_step == "caid":
        setup["pairs_per_prompt"] = args.pairs_per_prompt
    if args.lambda_init == "can":
        setup["can_samples"] = args.can_samples
    trace = {"setup": setup, "iterations": []}
    if os.path.exists(trace_file):
        with open(trace_file) as f:
            trace = json.load(f)
        earlier = {"policy_step": "stepwise", "sft": None, **trace["setup"]}  # traces from before caid
        earlier.pop("warm_start", None)
        if earlier != setup:
            raise UsageError(f"{trace_file}: a loop with other settings; use another --out")
    else:  # recorded before any work, so that a killed first iteration is resumed with the same settings only
        write_json(trace_file, trace)
    start = warm_start(args, loop["reference"], loop["beta"], loop["prompts"]) if args.lambda_init == "can" \
        else args.lambda_init
    for k in range(len(trace["iterations"]), args.iterations):
        done = trace["iterations"]
        lam = start if not done else \
            max(0.0, done[-1]["lambda"] + args.dual_lr * (done[-1]["constraint"] - args.budget))
        print(f"==== dual iteration {k} ({args.policy_step}): lambda = {lam:g}", flush=True)
        record = iteration(k, lam, loop)
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
        args, stage_flags, parsed = parse(argv)
        with outputs.output_lock(args.out):
            run(args, stage_flags, parsed)

    return outputs.run_script("dual_alignment.py", parse_and_run, argv)


if __name__ == "__main__":
    sys.exit(main())
