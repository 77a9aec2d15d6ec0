"""Stage 2 of RSA: the safety (harmlessness) stage, realigning the reward-stage policy pi_r.

    python train_safety_stage.py --reward_stage runs/demo/reward --data worlds/toy/train.jsonl --out runs/demo/safety
    python train_safety_stage.py --reward_stage runs/reward --data PKU-Alignment/PKU-SafeRLHF --out runs/safety

The policy starts at pi_r and the reference is pi_r, frozen and deterministic (docs/math.md Sec. 6). Why pi_r and
not the SFT model: the one-shot optimum of reward - lambda * cost factorises (RSA Eq. 12-13),

    pi_ref exp((r - lambda c) / beta_r) / Z  =  pi_r exp(-c / beta_s) / Y,   beta_s = beta_r / lambda,

so a second DPO-style stage from pi_r with temperature beta_s lands on the constrained optimum. `--beta` is beta_s
(default 0.01, i.e. lambda = 10 at beta_r = 0.1); the implied lambda is printed and recorded.

How pi_r is the reference: the reward stage's adapter is loaded, frozen and without dropout, as an adapter named
"reference" on the SFT base, and a new trainable LoRA adapter goes on top. The policy pass runs both adapters; the
reference pass runs "reference" alone, in eval mode, so it is pi_r exactly, in every dtype: nothing is merged into
16-bit or 4-bit weights, where rounding would move pi_r. Pairs are the harmlessness preferences
(`safer_response_id`) by default, or the other preference from the reward stage's (RSA(S->H)). SACPO is both stages
with --loss dpo.

The output is one LoRA adapter on the SFT model holding Delta_r + Delta_s (the two updates concatenated in rank), so
stock peft loads the safety policy on the SFT base; merge_policies.py mixes such adapters without copying the model.
"""

from __future__ import annotations

import argparse
import sys

import torch

import data
import stage
from stage import UsageError

OTHER = {"better": "safer", "safer": "better"}
LETTER = {"better": "H", "safer": "S"}


def build_parser():
    p = argparse.ArgumentParser(prog="train_safety_stage.py", description=__doc__, formatter_class=stage.HelpFormatter)
    g = p.add_argument_group("safety stage")
    g.add_argument("--reward_stage", required=True,
                   help="the policy pi_r this stage starts from and keeps, frozen, as its reference: the output "
                        "folder of train_reward_stage.py, or an already helpful model (folder, hub name, .gguf file; "
                        "--gguf_file names a GGUF file inside it)")
    g.add_argument("--sft", default=None, help="optional: the SFT model the reward stage should sit on (checked)")
    g.add_argument("--beta", type=float, default=0.01,
                   help="beta_s = beta_r / lambda: a smaller beta_s is a larger lambda, a stronger safety step")
    g.add_argument("--preference", default=None, choices=data.PREFERENCES,
                   help="which PKU label picks the chosen response (default: the one the reward stage did not use, "
                        "safer after a helpfulness stage)")
    g.add_argument("--same_preference", action="store_true",
                   help="allow the reward stage's own preference again (refused by default: it is not RSA)")
    return stage.add_shared_flags(p)


def stacked_model(args, parent, rt):
    """pi_r as the SFT base with stage 1 as a frozen adapter (stage.REFERENCE_ADAPTER), and a new trainable one
    ("default") above it. The reference switches the new adapter off."""
    from peft import PeftModel

    path, gguf_file, revision = stage.base_of(args.reward_stage, parent)
    base = stage.prepare_base(stage.training_base(path, gguf_file, revision, args, rt), args)
    model = PeftModel.from_pretrained(base, args.reward_stage, adapter_name=stage.REFERENCE_ADAPTER,
                                      is_trainable=False, torch_device=str(next(base.parameters()).device))
    for module in model.modules():  # stage 1 is part of pi_r: no dropout in the frozen adapter, policy pass included
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    torch.manual_seed(args.seed)
    model.add_adapter("default", stage.lora_config(args))
    model.base_model.set_adapter([stage.REFERENCE_ADAPTER, "default"])
    stage.freeze_adapter(model, stage.REFERENCE_ADAPTER)
    return model


def parent_of(args):
    """(description of pi_r, whether pi_r is a plain model), with the preference and order this stage implies."""
    parent = stage.describe(args.reward_stage, args.gguf_file)
    plain = parent["stage"] is None
    if not plain and parent["stage"] != "reward":
        raise UsageError(f"{args.reward_stage}: is a {parent['stage']} stage output; pass the reward stage's")
    if not plain and args.gguf_file:
        raise UsageError("--gguf_file: the reward stage's output records its own base model")
    if plain:
        parent.update(base_fingerprint=stage.config_fingerprint(args.reward_stage, args.gguf_file,
                                                                args.trust_remote_code, args.revision),
                      order="H", revision=args.revision)
    elif args.revision:
        raise UsageError("--revision: the reward stage's output records its own base model and revision")
    first = None if plain else parent["args"]["preference"]
    args.preference = args.preference or (OTHER[first] if first else "safer")
    if args.preference == first and not args.same_preference:
        raise UsageError(f"--preference {args.preference}: the reward stage {args.reward_stage} was trained on it "
                         "already; the second stage uses the other preference (pass --same_preference to insist)")
    return parent, plain


def run(args):
    parent, plain = parent_of(args)
    if args.sft is not None and stage.config_fingerprint(args.sft) != parent["base_fingerprint"]:
        raise UsageError(f"--sft {args.sft} is not the base model of {args.reward_stage} "
                         f"({parent['base_model']}): architectures or shapes differ")
    beta_r = None if plain else parent["args"]["beta"]
    base = args.reward_stage if plain else stage.base_of(args.reward_stage, parent)[0]
    cfg = stage.run_config(args, "safety", {
        "base_model": stage.recorded_path(base, args.out), "gguf_file": parent.get("gguf_file"),
        "revision": parent.get("revision"), "base_fingerprint": parent["base_fingerprint"],
        "parent": None if plain else stage.recorded_path(args.reward_stage, args.out), "parent_config": parent,
        "order": f"{parent['order'].split('->')[0]}->{LETTER[args.preference]}",
        "reference": f"the model {args.reward_stage} itself" if plain else "the reward-stage policy (stage 1 as a "
                     "frozen adapter)", "lambda": beta_r / args.beta if beta_r else None})
    if stage.check_output(args.out, cfg, args.overwrite):
        print(f"[train] {args.out}: already complete with this config; nothing to do")
        return
    print(f"[train] safety stage on {args.reward_stage} ({cfg['order']}): beta_s = {args.beta}" + (
        f" with beta_r = {beta_r}, so lambda = beta_r / beta_s = {beta_r / args.beta:g}" if beta_r else
        " (pi_r is a plain model: no beta_r, no lambda)"), flush=True)
    rt = stage.Runtime(args.precision, args.deterministic)
    tokenizer = stage.load_tokenizer(args.reward_stage, args.gguf_file, args.trust_remote_code, args.revision)
    train_examples, eval_examples = stage.prepare_data(args, tokenizer)
    if plain:  # an already helpful model plays pi_r: the new adapter sits directly on it
        model = stage.add_lora(stage.training_base(args.reward_stage, args.gguf_file, args.revision, args, rt), args)
        adapter = stage.model_adapter
    else:
        model = stacked_model(args, parent, rt)
        reward_update = stage.read_adapter(args.reward_stage)

        def adapter(m):  # one adapter on the SFT base: stage 1's update and this stage's, concatenated in rank
            return stage.concat_adapters([(1.0, reward_update), (1.0, stage.model_adapter(m))])
    stage.train(model if args.load_in_4bit else model.to(rt.device), tokenizer, args, cfg, train_examples,
                eval_examples, rt, adapter)


def main(argv=None):
    try:
        args = stage.parse_args(build_parser(), argv)
        with stage.output_lock(args.out):
            run(args)
    except UsageError as e:
        print(f"train_safety_stage.py: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
