"""RSA(P): mix the weights of the two stages' policies, theta(q) = q * theta_first + (1 - q) * theta_second.

    python merge_policies.py --first runs/demo/reward --second runs/demo/safety --q 0.25 0.5 0.9 --out runs/demo/mix

q is the weight of the FIRST-stage policy (the reward-aligned pi_r in RSA(H->S)): q = 0.9 means 90 % reward policy,
q = 1 is pi_r and q = 0 is the safety policy pi_rs. SACPO's merge configs name the other weight (their ratio is
1 - q here). When the second stage's LoRA adapter sits on the first (the usual RSA pipeline), theta_rs = theta_r +
Delta_s, so theta(q) = theta_r + (1 - q) * Delta_s exactly; peft's add_weighted_adapter("linear") mixes the A and B
factors separately and is not this. Any two full checkpoints of one architecture can be mixed the same way
(P-SACPO's "naive" merge); the note records which it was.

Each q gets a folder (q0.5, ...) that AutoModelForCausalLM.from_pretrained loads directly (safetensors), with the
tokenizer and rsa_mixture.json (parents, q, stage order), written last as the completeness marker.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

import torch

import stage
from stage import UsageError

MIXTURE_FILE = "rsa_mixture.json"


def mix_state_dicts(first, second, q):
    """q * first + (1 - q) * second, key by key, in fp32 (integer buffers are taken from the first)."""
    out = {}
    for k, a in first.items():
        b = second[k]
        out[k] = (q * a.float() + (1 - q) * b.float()).to(a.dtype) if a.is_floating_point() else a.clone()
    return out


def check_compatible(first, second, names):
    sa, sb = first.state_dict(), second.state_dict()
    if sa.keys() != sb.keys():
        diff = sorted(set(sa) ^ set(sb))[:3]
        raise UsageError(f"{names[0]} and {names[1]} have different parameters (e.g. {', '.join(diff)}); "
                         "both parents must share one base model")
    for k in sa:
        if sa[k].shape != sb[k].shape:
            raise UsageError(f"{names[0]} and {names[1]} differ in the shape of {k}: {tuple(sa[k].shape)} vs "
                             f"{tuple(sb[k].shape)}; both parents must share one base model")
    # copies: the first model's own tensors are overwritten by each mixture
    return {k: v.detach().clone() for k, v in sa.items()}, {k: v.detach().clone() for k, v in sb.items()}


def q_name(q):
    return f"q{q:g}"


def run(args):
    for q in args.q:
        if not 0.0 <= q <= 1.0:
            raise UsageError(f"--q {q:g}: each q must lie in [0, 1] (the weight of the first-stage policy)")
    first_info, second_info = stage.describe(args.first), stage.describe(args.second)
    exact = second_info.get("parent") and os.path.abspath(second_info["parent"]) == os.path.abspath(args.first)
    note = {"first": os.path.abspath(args.first), "second": os.path.abspath(args.second),
            "order": second_info.get("order") or first_info.get("order"),
            "mode": "rsa_p" if exact else "linear",
            "meaning": "theta(q) = q * theta_first + (1 - q) * theta_second" + (
                " = theta_first + (1 - q) * Delta_second (the second stage's adapter sits on the first)"
                if exact else " (plain interpolation of two full checkpoints)")}
    todo = []
    for q in args.q:
        folder = os.path.join(args.out, q_name(q))
        marker = os.path.join(folder, MIXTURE_FILE)
        if os.path.exists(marker):
            with open(marker) as f:
                if json.load(f) == {**note, "q": q}:
                    print(f"[merge] {folder}: already made from these parents; skipping")
                    continue
            if not args.overwrite:
                raise UsageError(f"{folder}: holds a mixture of other parents; pass --overwrite to replace it")
        elif os.path.exists(folder) and not args.overwrite:
            raise UsageError(f"{folder}: exists and is not a finished mixture; pass --overwrite to replace it")
        todo.append(q)
    if not todo:
        return
    first = stage.load_policy(args.first, args.trust_remote_code)
    second = stage.load_policy(args.second, args.trust_remote_code)
    sa, sb = check_compatible(first, second, (args.first, args.second))
    tokenizer = stage.load_tokenizer(args.second if stage.is_stage(args.second) else args.first)
    for q in todo:
        folder = os.path.join(args.out, q_name(q))
        tmp = folder + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        with torch.no_grad():
            first.load_state_dict(mix_state_dicts(sa, sb, q))
        first.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        with open(os.path.join(tmp, MIXTURE_FILE), "w") as f:
            json.dump({**note, "q": q}, f, indent=1)
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
        print(f"[merge] {folder}: q = {q:g} ({note['mode']})", flush=True)
    first.load_state_dict(sa)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=stage.HelpFormatter)
    parser.add_argument("--first", required=True, help="first-stage policy (RSA(H->S): the reward stage's output)")
    parser.add_argument("--second", required=True, help="second-stage policy (RSA(H->S): the safety stage's output)")
    parser.add_argument("--q", type=float, nargs="+", required=True,
                        help="weights of the FIRST policy, each in [0, 1] (SACPO's configs name 1 - q)")
    parser.add_argument("--out", required=True, help="folder that receives one subfolder per q")
    parser.add_argument("--overwrite", action="store_true", help="replace mixtures made from other parents")
    parser.add_argument("--trust_remote_code", action="store_true", help="allow model code from the hub (off: safer)")
    args = parser.parse_args(argv)
    try:
        with stage.output_lock(args.out):
            run(args)
    except UsageError as e:
        print(f"merge_policies.py: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
