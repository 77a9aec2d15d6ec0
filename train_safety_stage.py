"""Stage 2 of RSA: the safety (harmlessness) stage, realigning the reward-stage policy pi_r.

    python train_safety_stage.py --reward_stage runs/demo/reward --data worlds/toy/train.jsonl --out runs/demo/safety
    python train_safety_stage.py --reward_stage runs/reward --data PKU-Alignment/PKU-SafeRLHF --out runs/safety

The policy starts at pi_r and the reference is pi_r, frozen and deterministic (math.md Sec. 6): the reward stage's
adapter is merged into the SFT weights in full precision, and a new LoRA adapter is trained on top, so switching
that adapter off gives exactly pi_r (never the raw SFT model). Pairs are the harmlessness preferences
(`safer_response_id`: the safer response is chosen). `--beta` is beta_s = beta_r / lambda (default 0.01); the
implied lambda is logged. Everything else, the loss, the loop and the outputs, is the reward stage's
(train_reward_stage.py); the output records which reward-stage policy it sits on. SACPO is both stages with
--loss dpo; RSA(S->H) runs the reward stage with --preference safer and this one with --preference better.
"""

from __future__ import annotations

import os
import sys

import torch

import train_reward_stage as stage
from train_reward_stage import UsageError


def stacked_model(args, parent):
    """Stage 1 kept as a frozen adapter ("reward", dropout off) under a new trainable one ("default"): the QLoRA
    path, where merging into 4-bit weights would be lossy. The reference switches the new adapter off."""
    from peft import PeftModel

    if parent.get("parent"):
        raise UsageError("--reference_mode stack supports a reward stage trained directly on its base model")
    base = stage.load_base_model(parent["base_model"], parent.get("gguf_file"), args.trust_remote_code,
                                 args.load_in_4bit)
    base = stage.prepare_base(base, args)
    model = PeftModel.from_pretrained(base, args.reward_stage, adapter_name="reward", is_trainable=False)
    for module in model.modules():  # a deterministic reference: no dropout in the frozen adapter
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    torch.manual_seed(args.seed)
    model.add_adapter("default", stage.lora_config(args))
    model.base_model.set_adapter(["reward", "default"])
    stage.freeze_adapter(model, "reward")
    model.rsa_reference_adapter = "reward"
    return model


def main(argv=None):
    try:
        args = stage.parse_args(argv, "safety")
        if stage.is_stage(args.reward_stage):
            parent = stage.read_stage(args.reward_stage)
            if parent["stage"] != "reward":
                raise UsageError(f"{args.reward_stage}: is a {parent['stage']} stage output; pass the reward stage's")
            if args.gguf_file:
                raise UsageError("--gguf_file: the reward stage's output records its own base model")
            pi_r = None
        else:  # an already helpful model plays pi_r: the new adapter sits directly on it
            parent = stage.plain_model(args.reward_stage, args.gguf_file)
            pi_r = stage.load_base_model(args.reward_stage, args.gguf_file, args.trust_remote_code, args.load_in_4bit)
            parent.update(base_fingerprint=stage.fingerprint(pi_r), order="H->S")
        if args.sft is not None:
            sft = stage.load_base_model(args.sft, trust_remote_code=args.trust_remote_code)
            if stage.fingerprint(sft) != parent["base_fingerprint"]:
                raise UsageError(f"--sft {args.sft} is not the base model of {args.reward_stage} "
                                 f"({parent['base_model']}): architectures or shapes differ")
        beta_r = parent["args"]["beta"] if pi_r is None else None
        cfg = stage.run_config(args, "safety", {
            "base_model": parent["base_model"], "gguf_file": parent.get("gguf_file"),
            "base_fingerprint": parent["base_fingerprint"],
            "parent": os.path.abspath(args.reward_stage) if pi_r is None else None,
            "parent_config": parent, "order": parent["order"],
            "reference": "reward-stage policy (stage 1 merged in full precision)" if pi_r is None else
            f"the model {args.reward_stage} itself", "lambda": beta_r / args.beta if beta_r else None,
            "reference_mode": "stack" if args.load_in_4bit and pi_r is None else args.reference_mode})
        if stage.check_output(args.out, cfg, args.overwrite):
            print(f"[train] {args.out}: already complete with this config; nothing to do")
            return 0
        print(f"[train] safety stage on {args.reward_stage}: beta_s = {args.beta}" + (
            f" with beta_r = {beta_r}, so lambda = beta_r / beta_s = {beta_r / args.beta:g}" if beta_r else
            " (pi_r is a plain model: no beta_r, no lambda)"), flush=True)
        rt = stage.Runtime(args)
        tokenizer = stage.load_tokenizer(args.reward_stage, args.gguf_file)
        train_examples, eval_examples = stage.prepare_data(args, tokenizer)
        if pi_r is not None:
            model = stage.add_lora(pi_r, args)
        elif args.load_in_4bit or args.reference_mode == "stack":
            model = stacked_model(args, parent)
        else:
            pi_r = stage.load_policy(args.reward_stage, args.trust_remote_code)  # merged: the frozen reference
            model = stage.add_lora(pi_r, args)
        stage.train(model.to(rt.device) if not args.load_in_4bit else model, tokenizer, args, cfg, train_examples,
                    eval_examples, rt)
    except UsageError as e:
        print(f"train_safety_stage.py: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
