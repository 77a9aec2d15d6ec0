"""The study: does risk-aware stepwise alignment suppress the tail better than risk-neutral stepwise alignment?

    python study.py --out runs/study            # or: make study   (not part of CI; took about 2.5 hours here)

On the toy world (fixed: seed 0, built once) and for several training seeds, every method runs the same pipeline as
`make demo` (reward stage -> safety stage -> mixtures over q -> evaluation with the ground truth) and differs only in
its loss: SACPO (DPO in both stages; its mixtures are P-SACPO), TDPO (the expectation, risk-neutral but token-level),
and RSA with the authors' CVaR form, the paper-form CVaR and ERM at several levels (its mixtures are RSA(P)).
Resumable: every finished stage, mixture and evaluation is reused. Writes runs/study/summary.md (mean and spread over
seeds), summary.json, frontier.png and tail.png (how the probability of severe-harm tokens moves, stage by stage).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import torch

import evaluate
import merge_policies
import readme
import stage
import toy
import train_reward_stage
import train_safety_stage

METHODS = {
    "sacpo": ["--loss", "dpo"],
    "tdpo": ["--risk_measure", "expectation"],
    **{f"rsa_radpo_{lv:g}": ["--risk_measure", "cvar_radpo", "--risk_level", str(lv)] for lv in (0.99, 0.95, 0.9)},
    **{f"rsa_cvar_{lv:g}": ["--risk_measure", "cvar", "--risk_level", str(lv)] for lv in (0.5, 0.25, 0.1)},
    **{f"rsa_erm_{mu:g}": ["--risk_measure", "erm", "--risk_level", str(mu)] for mu in (1, 2, 5)},
}
QS = (0.25, 0.5, 0.75, 0.9)
METRICS = ("mean_reward", "mean_cost", "safe_rate", "cvar_cost_0.1", "cvar_cost_0.05", "severe_harm_rate",
           "severe_token_prob")


@torch.no_grad()
def severe_token_prob(folder, world):
    """Mean over harmful evaluation prompts of the policy's total probability on severe-harm tokens at the first
    response position: the exact (not sampled) weight of the tail where it starts."""
    model, tok = stage.load_policy(folder).eval(), stage.load_tokenizer(folder)
    severe = [tok.convert_tokens_to_ids(f"<harm:{c}:severe>") for c in toy.HARM_CATEGORIES]
    prompts = [p for p, c in toy.split_prompts()[1] if c != "benign"]
    tok.padding_side = "left"
    enc = tok([f"BEGINNING OF CONVERSATION: USER: {p} ASSISTANT:" for p in prompts], return_tensors="pt",
              padding=True)
    positions = (enc["attention_mask"].cumsum(-1) - 1).clamp(min=0)  # left padding: positions start at each prompt
    probs = model(**enc, position_ids=positions).logits[:, -1].softmax(-1)
    return probs[:, severe].sum(-1).mean().item()


def run_method(name, flags, seed, world, out, steps, samples):
    """One method, one seed: both stages, the mixtures, the evaluation. Returns the results list."""
    base = os.path.join(out, name, f"seed{seed}")
    common = ["--data", f"{world}/train.jsonl", "--eval_data", f"{world}/test.jsonl", "--max_length", "64",
              "--max_prompt_length", "32", "--batch_size", "16", "--lr", "5e-3", "--lora_r", "8", "--max_steps",
              str(steps), "--eval_every", "50", "--log_every", "50", "--seed", str(seed), *flags]
    if train_reward_stage.main(["--sft", f"{world}/sft", "--out", f"{base}/reward", *common]) != 0:
        raise SystemExit(f"reward stage failed for {name} seed {seed}")
    if train_safety_stage.main(["--reward_stage", f"{base}/reward", "--out", f"{base}/safety", *common]) != 0:
        raise SystemExit(f"safety stage failed for {name} seed {seed}")
    if merge_policies.main(["--first", f"{base}/reward", "--second", f"{base}/safety", "--q", *map(str, QS),
                            "--out", f"{base}/mix"]) != 0:
        raise SystemExit(f"merge failed for {name} seed {seed}")
    results_file = f"{base}/eval/results.json"
    if not os.path.exists(results_file):
        policies = [f"{base}/reward", f"{base}/safety", *[f"{base}/mix/q{q:g}" for q in QS]]
        if evaluate.main(["--policies", *policies, "--prompts", world, "--num_samples", str(samples),
                          "--max_new_tokens", "24", "--seed", str(seed), "--out", f"{base}/eval"]) != 0:
            raise SystemExit(f"evaluation failed for {name} seed {seed}")
    with open(results_file) as f:
        results = json.load(f)
    for r in results:
        if "severe_token_prob" not in r:
            folder = f"{base}/{r['policy']}" if r["q"] is None else f"{base}/mix/{r['policy']}"
            r["severe_token_prob"] = severe_token_prob(folder, world)
    with open(results_file, "w") as f:
        json.dump(results, f, indent=1)
    return results


def summarise(all_results, sft, out, seeds):
    """Mean and standard deviation over seeds per (method, policy)."""
    rows = []
    for name, per_seed in all_results.items():
        for policy in [r["policy"] for r in per_seed[0]]:
            recs = [next(r for r in res if r["policy"] == policy) for res in per_seed]
            row = {"method": name, "policy": policy, "q": recs[0]["q"]}
            for m in METRICS:
                vals = [r[m] for r in recs]
                row[m] = statistics.mean(vals)
                row[m + "_sd"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
            rows.append(row)
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump({"seeds": seeds, "sft": sft, "rows": rows}, f, indent=1)
    head = ["method", "policy", *METRICS]
    lines = [f"Command: `make study` at commit {readme.commit()}.", "",
             f"Training seeds {seeds} (the toy world is fixed: seed 0). Each cell: mean +- sd over seeds.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head),
             "| sft | - | " + " | ".join(f"{sft[m]:.3f}" for m in METRICS) + " |"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['policy']} | "
                     + " | ".join(f"{r[m]:.3f} +- {r[m + '_sd']:.3f}" for m in METRICS) + " |")
    text = "\n".join(lines) + "\n"
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(text)
    plot(rows, sft, out)
    return text


def plot(rows, sft, out):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = ["safety", *[f"q{q:g}" for q in QS], "reward"]
    fig, ax = plt.subplots(figsize=(8, 6))
    for name in METHODS:
        pts = [next(r for r in rows if r["method"] == name and r["policy"] == p) for p in order
               if any(r["method"] == name and r["policy"] == p for r in rows)]
        if not pts:
            continue
        style = "-o" if name.startswith("rsa") else "-s"
        ax.errorbar([p["cvar_cost_0.05"] for p in pts], [p["mean_reward"] for p in pts],
                    xerr=[p["cvar_cost_0.05_sd"] for p in pts], fmt=style, ms=4, lw=1.2 if name != "sacpo" else 2.5,
                    label=name, alpha=0.85)
    ax.scatter([sft["cvar_cost_0.05"]], [sft["mean_reward"]], marker="*", s=200, color="k", label="sft", zorder=5)
    ax.set_xlabel("CVaR 0.05 of cost (tail harm; lower is safer)")
    ax.set_ylabel("mean reward")
    ax.set_title("Frontiers over q (safety stage ... mixtures ... reward stage), mean over seeds")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "frontier.png"), dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, 4.5))
    names = [n for n in METHODS if any(r["method"] == n for r in rows)]
    for i, kind in enumerate(("reward", "safety")):
        vals = [next(r for r in rows if r["method"] == n and r["policy"] == kind)["severe_token_prob"] for n in names]
        ax.bar([j + 0.4 * i for j in range(len(names))], vals, 0.4, label=f"after the {kind} stage")
    ax.axhline(sft["severe_token_prob"], color="k", ls="--", lw=1, label="sft")
    ax.set_xticks([j + 0.2 for j in range(len(names))])
    ax.set_xticklabels(names, rotation=35, ha="right", fontsize=8)
    ax.set_ylabel("P(severe-harm token first)\non harmful prompts")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "tail.png"), dpi=120)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=stage.HelpFormatter)
    p.add_argument("--out", default="runs/study", help="output folder (resumable)")
    p.add_argument("--world", default="worlds/toy", help="toy world folder (built if missing)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS), help="methods to run")
    p.add_argument("--steps", type=int, default=150, help="optimizer steps per stage")
    p.add_argument("--samples", type=int, default=32, help="samples per evaluation prompt")
    args = p.parse_args(argv)
    try:
        stage.check_ranges(args, positive=("steps", "samples"))
        if any(seed < 0 for seed in args.seeds):
            raise stage.UsageError(f"--seeds must be 0 or more, got {args.seeds}")
    except stage.UsageError as e:
        print(f"study.py: error: {e}", file=sys.stderr)
        return 2
    toy.build(args.world, "full", 0)
    os.makedirs(args.out, exist_ok=True)
    sft_file = os.path.join(args.out, "sft_eval", "results.json")
    if not os.path.exists(sft_file):
        evaluate.main(["--policies", f"{args.world}/sft", "--prompts", args.world, "--num_samples",
                       str(args.samples), "--max_new_tokens", "24", "--out", os.path.join(args.out, "sft_eval")])
    with open(sft_file) as f:
        sft = json.load(f)[0]
    sft["severe_token_prob"] = severe_token_prob(f"{args.world}/sft", args.world)
    all_results = {}
    for name in args.methods:
        all_results[name] = []
        for seed in args.seeds:
            print(f"==== study: {name}, seed {seed}", flush=True)
            all_results[name].append(run_method(name, METHODS[name], seed, args.world, args.out, args.steps,
                                                args.samples))
    print(summarise(all_results, sft, args.out, args.seeds))
    print(f"[study] wrote {args.out}/summary.md, summary.json, frontier.png, tail.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
