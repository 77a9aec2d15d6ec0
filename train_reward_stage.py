"""Stage 1 of RSA: the reward (helpfulness) stage.

    python -m toy build --out worlds/toy   # the toy world, once
    python train_reward_stage.py --sft worlds/toy/sft --data worlds/toy/train.jsonl --out runs/demo/reward
    # a 7B model on PKU-SafeRLHF, one 24 GB GPU, QLoRA (docs/gpu.md)
    python train_reward_stage.py --sft PKU-Alignment/alpaca-7b-reproduced --data PKU-Alignment/PKU-SafeRLHF \\
        --out runs/reward --load_in_4bit --gradient_checkpointing --batch_size 8 --grad_accum 4 --lr 2e-5 --epochs 3

What it solves (RSA Eq. 15, docs/math.md Sec. 5-6): make the SFT model more helpful while staying near it,

    pi_r = argmax_pi  E[r(x, y)] - beta_r KL(pi || pi_sft)      (DPO's optimum: pi_sft exp(r / beta_r) / Z),

learnt from helpfulness preferences (`better_response_id`) with Ra-DPO, the token-level loss in which the
sequential KL of TDPO is replaced by a nested risk of the log-ratio D = log pi_sft - log pi (risk.py).

- The policy: a LoRA adapter on the SFT model. The reference: the SFT model itself, that is the same weights with the
  adapter switched off (AdapterOff below), so there is no second copy of the model.
- beta = beta_r (--beta); the loss, measure and level are shared flags (--loss, --risk_measure, --risk_level).
- Writes (--out): one LoRA adapter on the SFT model (stock peft loads it), the tokenizer, a model card,
  rsa_config.json, metrics.jsonl and complete.json, last. A finished output with the same config is not redone.

Baselines are settings: DPO (--loss dpo), TDPO (--risk_measure expectation), the Ra-DPO authors' setup
(--radpo_parity). RSA(S->H) runs this stage with --preference safer; the safety stage then takes the other one.
"""

from __future__ import annotations

import argparse
import sys

import data
import outputs
import stage


def build_parser():
    p = argparse.ArgumentParser(prog="train_reward_stage.py", description=__doc__,
                                formatter_class=outputs.HelpFormatter)
    g = p.add_argument_group("reward stage")
    g.add_argument("--sft", required=True,
                   help="the SFT model: policy start and frozen reference (a local folder, a hub id or a .gguf file)")
    g.add_argument("--beta", type=outputs.number, default=0.1, help="beta_r, the KL temperature of the reward stage")
    g.add_argument("--preference", default="better", choices=data.PREFERENCES,
                   help="which PKU label picks the chosen response: better (helpfulness; RSA(H->S)) or safer "
                        "(harmlessness first; RSA(S->H))")
    return stage.add_shared_flags(p)


class AdapterOff:
    """The reference pi_sft: the policy's own weights with its trained adapter switched off (stage.reference_pass runs
    it in eval mode, without grad)."""

    def weights(self, model):
        return model.disable_adapter()

    def head(self, head):
        return getattr(head, "base_layer", head)  # with LoRA on the head: its frozen base layer


def run(args):
    sft = outputs.gguf_folder(args.sft)  # a .gguf file becomes a model folder here, once
    cfg = outputs.run_config(args, "reward", {
        "base_model": outputs.recorded_path(sft, args.out), "revision": args.revision, "parent": None,
        "reference": "sft", "order": "H" if args.preference == "better" else "S",
        "base_fingerprint": outputs.config_fingerprint(sft, args.trust_remote_code, args.revision)})
    if outputs.check_output(args.out, cfg, args.overwrite):
        print(f"[train] {args.out}: already complete with this config; nothing to do")
        return
    runtime = stage.Runtime(args.precision, args.deterministic)
    tokenizer = stage.load_tokenizer(sft, args.trust_remote_code, args.revision)
    train_examples, held_out = data.train_and_held_out(args, tokenizer)
    model = stage.add_lora(stage.training_base(sft, args.revision, args, runtime), args)
    stage.train(model if args.load_in_4bit else model.to(runtime.device), tokenizer, args, cfg,
                train_examples=train_examples, eval_examples=held_out, runtime=runtime, reference=AdapterOff())


def main(argv=None):
    return stage.stage_main("train_reward_stage.py", build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
