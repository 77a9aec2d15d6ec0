"""Stage 1 of RSA: the reward (helpfulness) stage.

    # the toy world (python -m toy build --out worlds/toy first)
    python train_reward_stage.py --sft worlds/toy/sft --data worlds/toy/train.jsonl --out runs/demo/reward
    # a real model on PKU-SafeRLHF, one 24 GB GPU, QLoRA (docs/bench/memory_plan.md: 12 pairs of 512 tokens fit)
    python train_reward_stage.py --sft PKU-Alignment/alpaca-7b-reproduced --data PKU-Alignment/PKU-SafeRLHF \\
        --out runs/reward --load_in_4bit --gradient_checkpointing --batch_size 8 --grad_accum 4 --lr 2e-5 --epochs 3

Policy and reference both start from the SFT model; the policy is a LoRA adapter on it and the reference is the
same weights with the adapter switched off (no second model copy). Pairs are the helpfulness preferences
(`better_response_id`); the loss is Ra-DPO (docs/math.md Sec. 5, RSA Eq. 15) with beta = beta_r and the nested
risk of risk.py, computed chunk by chunk at response positions from the final hidden states, never as a full
(N, T, V) tensor. The loop, checkpoints and outputs are stage.py's.

Output (--out): the LoRA adapter (safetensors; loads with stock peft on the SFT model), the tokenizer, a model card
(README.md), rsa_config.json (the full run config, local paths relative to --out), metrics.jsonl, and
complete.json, written last: a run whose output is complete with the same config is not redone (checked before
any weights load). Baselines are settings: DPO (--loss dpo), TDPO (--risk_measure expectation), the Ra-DPO
authors' setup (--radpo_parity). RSA(S->H) runs this stage with --preference safer; the safety stage then
defaults to the other preference.
"""

from __future__ import annotations

import argparse
import sys

import data
import stage
from stage import UsageError


def build_parser():
    p = argparse.ArgumentParser(prog="train_reward_stage.py", description=__doc__, formatter_class=stage.HelpFormatter)
    g = p.add_argument_group("reward stage")
    g.add_argument("--sft", required=True,
                   help="the SFT model: policy start and frozen reference (a local folder, a hub name, a .gguf file)")
    g.add_argument("--beta", type=float, default=0.1, help="beta_r, the KL temperature of the reward stage")
    g.add_argument("--preference", default="better", choices=data.PREFERENCES,
                   help="which PKU label picks the chosen response: better (helpfulness; RSA(H->S)) or safer "
                        "(harmlessness first; RSA(S->H))")
    return stage.add_shared_flags(p)


def run(args):
    cfg = stage.run_config(args, "reward", {
        "base_model": stage.recorded_path(args.sft, args.out), "gguf_file": args.gguf_file, "revision": args.revision,
        "parent": None, "reference": "sft", "order": "H" if args.preference == "better" else "S",
        "base_fingerprint": stage.config_fingerprint(args.sft, args.gguf_file, args.trust_remote_code, args.revision)})
    if stage.check_output(args.out, cfg, args.overwrite):
        print(f"[train] {args.out}: already complete with this config; nothing to do")
        return
    rt = stage.Runtime(args.precision, args.deterministic)
    tokenizer = stage.load_tokenizer(args.sft, args.gguf_file, args.trust_remote_code, args.revision)
    train_examples, eval_examples = stage.prepare_data(args, tokenizer)
    model = stage.add_lora(stage.training_base(args.sft, args.gguf_file, args.revision, args, rt), args)
    stage.train(model if args.load_in_4bit else model.to(rt.device), tokenizer, args, cfg, train_examples,
                eval_examples, rt)


def main(argv=None):
    try:
        args = stage.parse_args(build_parser(), argv)
        with stage.output_lock(args.out):
            run(args)
    except UsageError as e:
        print(f"train_reward_stage.py: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
