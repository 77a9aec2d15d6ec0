"""Stage 2 of RSA: the safety (harmlessness) stage, realigning the reward-stage policy pi_r.

    python train_safety_stage.py --reward_stage runs/demo/reward --data worlds/toy/train.jsonl --out runs/demo/safety
    python train_safety_stage.py --reward_stage runs/reward --data PKU-Alignment/PKU-SafeRLHF --out runs/safety

Why pi_r is both the start and the reference (RSA Eq. 12-13, docs/math.md Sec. 6): the one-shot optimum of reward
minus lambda times cost factorises,

    pi_sft exp((r - lambda c) / beta_r) / Z  =  pi_r exp(-c / beta_s) / Y,      beta_s = beta_r / lambda,

so a second DPO-style stage from pi_r, on harmlessness preferences (`safer_response_id`, read as -c), with pi_r as
its frozen reference and temperature beta_s, lands on the constrained optimum. `--beta` is beta_s (default 0.01:
lambda = 10 at beta_r = 0.1); the implied lambda is printed and recorded.

- The reference pi_r: the SFT base with the reward stage's adapter loaded, frozen and without dropout, as an adapter
  named "reference" (RewardStagePolicy below). The reference pass runs it alone, in eval mode, so it is pi_r exactly
  in every dtype: nothing is merged into 16-bit or 4-bit weights, where rounding would move pi_r.
- The policy: a new trainable LoRA adapter on top; the policy pass runs both adapters, starting at pi_r.
- Writes (--out): one LoRA adapter on the SFT model holding Delta_r + Delta_s (the two updates concatenated in
  rank), so stock peft loads the safety policy on the SFT base, and merge_policies.py mixes it with pi_r.

The preference defaults to the one the reward stage did not use (RSA(S->H) swaps them). An already helpful model
(a folder, a hub id or a .gguf file) can play pi_r; the new adapter then sits directly on it. SACPO is both stages
with --loss dpo.
"""

from __future__ import annotations

import argparse
import contextlib
import sys

import torch

import data
import merge_policies
import outputs
import stage
import train_reward_stage
from outputs import UsageError

REFERENCE = "reference"  # the name of the frozen reward-stage adapter
OTHER = {"better": "safer", "safer": "better"}
LETTER = {"better": "H", "safer": "S"}


def build_parser():
    p = argparse.ArgumentParser(prog="train_safety_stage.py", description=__doc__,
                                formatter_class=outputs.HelpFormatter)
    g = p.add_argument_group("safety stage")
    g.add_argument("--reward_stage", required=True,
                   help="pi_r, the start and the frozen reference: the output folder of train_reward_stage.py, or an "
                        "already helpful model (a folder, a hub id or a .gguf file)")
    g.add_argument("--sft", default=None, help="optional: the SFT model the reward stage should sit on (checked)")
    g.add_argument("--beta", type=outputs.number, default=0.01,
                   help="beta_s = beta_r / lambda: a smaller beta_s is a larger lambda, a stronger safety step")
    g.add_argument("--preference", default=None, choices=data.PREFERENCES,
                   help="which PKU label picks the chosen response (default: the one the reward stage did not use, "
                        "safer after a helpfulness stage)")
    g.add_argument("--same_preference", action="store_true",
                   help="allow the reward stage's own preference again (refused by default: it is not RSA)")
    return stage.add_shared_flags(p)


class RewardStagePolicy:
    """The reference pi_r: the frozen REFERENCE adapter alone on the SFT base (stage.train runs it in eval mode)."""

    @contextlib.contextmanager
    def weights(self, model):
        active = list(model.base_model.active_adapters)
        model.base_model.set_adapter(REFERENCE)
        try:
            yield
        finally:
            model.base_model.set_adapter(active)
            freeze_adapter(model, REFERENCE)  # set_adapter marks the active adapters trainable

    def head(self, head):
        """The output projection of pi_r: with LoRA on the head, its base layer plus stage 1's update."""
        base = getattr(head, "base_layer", None)
        if base is None or REFERENCE not in head.lora_A:
            return head if base is None else base
        reference = torch.nn.Linear(base.in_features, base.out_features, bias=base.bias is not None,
                                    device=base.weight.device, dtype=base.weight.dtype)
        with torch.no_grad():
            reference.weight.copy_(base.weight + head.get_delta_weight(REFERENCE).to(base.weight.dtype))
            if base.bias is not None:
                reference.bias.copy_(base.bias)
        return reference.requires_grad_(False)


def freeze_adapter(model, name):
    for n, p in model.named_parameters():
        if f".{name}." in n:
            p.requires_grad_(False)


def stacked_model(args, parent, runtime):
    """pi_r as the SFT base with stage 1 as a frozen adapter (REFERENCE), and a new trainable one ("default")."""
    from peft import PeftModel

    path, revision = outputs.base_of(args.reward_stage, parent)
    base = stage.prepare_base(stage.training_base(path, revision, args, runtime), args)
    model = PeftModel.from_pretrained(base, args.reward_stage, adapter_name=REFERENCE, is_trainable=False,
                                      torch_device=str(next(base.parameters()).device))
    stage.no_dropout(model)  # stage 1 is part of pi_r: no dropout in the frozen adapter, policy pass included
    torch.manual_seed(args.seed)
    model.add_adapter("default", stage.lora_config(args))
    model.base_model.set_adapter([REFERENCE, "default"])
    freeze_adapter(model, REFERENCE)
    return model


def parent_of(args):
    """(description of pi_r, whether pi_r is a plain model), with the preference this stage implies."""
    parent = outputs.describe(args.reward_stage)
    plain = parent["stage"] is None
    if not plain and parent["stage"] != "reward":
        raise UsageError(f"{args.reward_stage}: is a {parent['stage']} stage output; pass the reward stage's")
    if plain:
        parent.update(base_fingerprint=outputs.config_fingerprint(args.reward_stage, args.trust_remote_code,
                                                                  args.revision), order="H", revision=args.revision)
    elif args.revision:
        raise UsageError("--revision: the reward stage's output records its own base model and revision")
    first = None if plain else parent["args"]["preference"]
    args.preference = args.preference or (OTHER[first] if first else "safer")
    if args.preference == first and not args.same_preference:
        raise UsageError(f"--preference {args.preference}: the reward stage {args.reward_stage} was trained on it "
                         "already; the second stage uses the other preference (pass --same_preference to insist)")
    return parent, plain


def run(args):
    args.reward_stage = outputs.gguf_folder(args.reward_stage)  # a .gguf file becomes a model folder here, once
    parent, plain = parent_of(args)
    if args.sft is not None and outputs.config_fingerprint(args.sft) != parent["base_fingerprint"]:
        raise UsageError(f"--sft {args.sft} is not the base model of {args.reward_stage} "
                         f"({parent['base_model']}): architectures or shapes differ")
    beta_r = None if plain else parent["args"]["beta"]
    base = args.reward_stage if plain else outputs.base_of(args.reward_stage, parent)[0]
    cfg = outputs.run_config(args, "safety", {
        "base_model": outputs.recorded_path(base, args.out), "revision": parent.get("revision"),
        "base_fingerprint": parent["base_fingerprint"], "parent_config": parent,
        "parent": None if plain else outputs.recorded_path(args.reward_stage, args.out),
        "order": f"{parent['order'].split('->')[0]}->{LETTER[args.preference]}",
        "reference": f"the model {args.reward_stage} itself" if plain else "the reward-stage policy (stage 1 as a "
                     "frozen adapter)", "lambda": beta_r / args.beta if beta_r else None})
    if outputs.check_output(args.out, cfg, args.overwrite):
        print(f"[train] {args.out}: already complete with this config; nothing to do")
        return
    print(f"[train] safety stage on {args.reward_stage} ({cfg['order']}): beta_s = {args.beta}" + (
        f" with beta_r = {beta_r}, so lambda = beta_r / beta_s = {beta_r / args.beta:g}" if beta_r else
        f" (pi_r is the plain model {args.reward_stage}, not a reward stage's output, so it is also the frozen "
        "reference and there is no beta_r or lambda; to realign a reward stage, pass its output folder as "
        "--reward_stage)"), flush=True)
    runtime = stage.Runtime(args.precision, args.deterministic)
    tokenizer = stage.load_tokenizer(args.reward_stage, args.trust_remote_code, args.revision)
    train_examples, held_out = data.train_and_held_out(args, tokenizer)
    if plain:  # an already helpful model plays pi_r: the new adapter sits directly on it
        model = stage.add_lora(stage.training_base(args.reward_stage, args.revision, args, runtime), args)
        reference, adapter = train_reward_stage.AdapterOff(), outputs.model_adapter
    else:
        model, reference = stacked_model(args, parent, runtime), RewardStagePolicy()
        reward_update = merge_policies.read_adapter(args.reward_stage)

        def adapter(m):  # one adapter on the SFT base: stage 1's update and this stage's, concatenated in rank
            return merge_policies.concat_adapters([(1.0, reward_update), (1.0, outputs.model_adapter(m))])
    stage.train(model if args.load_in_4bit else model.to(runtime.device), tokenizer, args, cfg,
                train_examples=train_examples, eval_examples=held_out, runtime=runtime, reference=reference,
                adapter=adapter)


def main(argv=None):
    return stage.stage_main("train_safety_stage.py", build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
