"""RSA(P): mix the weights of the two stages' policies, theta(q) = q * theta_first + (1 - q) * theta_second.

    python merge_policies.py --first runs/demo/reward --second runs/demo/safety --q 0.25 0.5 0.9 --out runs/demo/mix

q is the weight of the FIRST-stage policy (the reward-aligned pi_r in RSA(H->S)): q = 0.9 means 90 % reward policy,
q = 1 is pi_r and q = 0 is the safety policy pi_rs. SACPO's merge configs name the other weight (their ratio is
1 - q here).

Both stages' outputs are LoRA adapters on the SFT model: pi_r = W + Delta_r, and the safety stage's adapter holds
Delta_r and Delta_s concatenated in rank. So theta(q) = W + Delta_r + (1 - q) * Delta_s exactly, and each mixture is
again one adapter on W (megabytes, not a model copy): the safety adapter with its Delta_s block scaled by 1 - q. Any
two adapters on one base mix the same way, q * Delta_first + (1 - q) * Delta_second, concatenated in rank (exact;
peft's add_weighted_adapter "linear" mixes the A and B factors separately and is not this). Two full models on
different bases (P-SACPO's "naive" merge) are interpolated weight by weight instead, one full model per q.

Each q gets a folder (q0.5, ...): the adapter (loads with stock peft on the base), the tokenizer, a model card,
rsa_config.json (parents, q, stage order; paths relative to the folder) and complete.json, written last.
--merged adds q*/merged/, the full merged model, for serving. Merged and full mixtures are computed in fp32 on any
host and saved in --dtype (fp32 by default; bfloat16 or float16 round the merged weights once, at the save).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys

import torch

import outputs
import stage
from outputs import UsageError

MIXTURE_FILE = "rsa_mixture.json"  # the marker of a full-weight mixture (parents on different bases)

# LoRA adapters as data: {module path: (A (r, in), B (out, r) with the scaling folded in)}. Concatenating two
# adapters in rank gives one adapter whose update is the sum of theirs, exactly (peft's add_weighted_adapter calls
# this "cat"); scaling a block of B scales that adapter's update. So the safety stage's output (Delta_r + Delta_s)
# and every RSA(P) mixture are one adapter on the SFT base.


def read_adapter(folder):
    """The LoRA blocks of an adapter folder (peft format), scaling folded into B."""
    from safetensors.torch import load_file

    with open(os.path.join(folder, outputs.ADAPTER_CONFIG)) as f:
        config = json.load(f)
    weights = load_file(os.path.join(folder, outputs.ADAPTER_WEIGHTS))
    if any("lora_embedding" in k or "lora_magnitude" in k for k in weights):
        raise UsageError(f"{folder}: only LoRA on linear layers can be combined (found embedding LoRA or DoRA)")
    blocks = {}
    for key, a in weights.items():
        if key.endswith(".lora_A.weight"):
            module = key[: -len(".lora_A.weight")]
            name = module.removeprefix("base_model.model.")
            r = config.get("rank_pattern", {}).get(name, config["r"])
            alpha = config.get("alpha_pattern", {}).get(name, config["lora_alpha"])
            scaling = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
            blocks[name] = (a.float(), weights[module + ".lora_B.weight"].float() * scaling)
    return blocks


def concat_adapters(parts):
    """One adapter from [(coefficient, blocks), ...]: sum_k coefficient_k * update_k, exactly (ranks add; a module
    missing from a part gets zero rows there)."""
    out = {}
    for name in sorted(set().union(*(blocks for _, blocks in parts))):
        fan_in, fan_out = next((a.shape[1], b.shape[0]) for _, blocks in parts if name in blocks
                               for a, b in [blocks[name]])
        a_parts, b_parts = [], []
        for coefficient, blocks in parts:
            rank = next(iter(blocks.values()))[0].shape[0]
            a, b = blocks.get(name, (torch.zeros(rank, fan_in), torch.zeros(fan_out, rank)))
            a_parts.append(a)
            b_parts.append(coefficient * b)
        out[name] = (torch.cat(a_parts), torch.cat(b_parts, dim=1))
    return out


def load_policy(folder, trust_remote_code=False, dtype=torch.float32):
    """A finished stage's (or mixture's) policy: its recorded base with its one LoRA adapter, as stock peft loads it
    (PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), folder)). In fp32 the adapter is merged
    into the weights (a plain transformers model); on a 16-bit base it stays an fp32 adapter beside them, computed
    as in training, not folded into 16-bit weights. A plain model folder or hub id loads as it is."""
    from peft import PeftModel

    if not outputs.is_stage(folder):
        return stage.load_base_model(folder, trust_remote_code=trust_remote_code, dtype=dtype)
    path, revision = outputs.base_of(folder)
    base = stage.load_base_model(path, trust_remote_code, revision=revision, dtype=dtype)
    model = PeftModel.from_pretrained(base, folder, torch_device="cpu")  # peft would pick GPU 0 by itself
    return model.merge_and_unload() if dtype == torch.float32 else model.eval()


def parent(path):
    """(description, (base, revision), LoRA blocks or None): a stage output is its base plus its adapter;
    a plain model is a base with no update of its own."""
    if outputs.is_stage(path):
        cfg = outputs.read_stage(path)
        return cfg, outputs.base_of(path, cfg), read_adapter(path)
    return outputs.plain_model(path), (path, None), None


def same_base(a, b):
    key = lambda m: (os.path.abspath(m[0]) if os.path.exists(m[0]) else m[0], m[1])  # noqa: E731
    return key(a) == key(b)


def mixture_adapter(first, second, q, exact):
    """The LoRA blocks of theta(q). `exact`: the second adapter is [Delta_first, Delta_s] (a safety stage on the
    first), so scaling its Delta_s block by 1 - q gives theta_first + (1 - q) Delta_s at the safety adapter's rank."""
    if exact:
        r1 = next(iter(first.values()))[0].shape[0]
        return {n: (a, torch.cat([b[:, :r1], (1 - q) * b[:, r1:]], dim=1)) for n, (a, b) in second.items()}
    return concat_adapters([(c, blocks) for c, blocks in ((q, first), (1 - q, second)) if blocks])


def write_adapter_mixture(tmp, folder, blocks, base, note, q, tokenizer, merged, dtype):
    cfg = {"stage": "mixture", "base_model": outputs.recorded_path(base[0], folder), "revision": base[1], **note,
           "first": outputs.recorded_path(note["first"], folder),
           "second": outputs.recorded_path(note["second"], folder), "q": q}
    os.makedirs(tmp)
    outputs.write_adapter(tmp, blocks, cfg["base_model"])
    tokenizer.save_pretrained(tmp)
    outputs.write_model_card(tmp, cfg)
    with open(os.path.join(tmp, outputs.CONFIG_FILE), "w") as f:
        json.dump(cfg, f, indent=1)
    with open(os.path.join(tmp, outputs.COMPLETE_FILE), "w") as f:  # written last: the completeness marker
        json.dump({"q": q}, f)
    if merged:  # the full model, for serving: the base plus this adapter, merged in fp32, saved in `dtype`
        outputs.save_model(load_policy(tmp).to(dtype), os.path.join(tmp, "merged"))
        tokenizer.save_pretrained(os.path.join(tmp, "merged"))
    return cfg


def write_full_mixture(tmp, args, second_model, q, tokenizer, note, dtype):
    """Weight by weight into a fresh copy of the first model (two model copies in memory at most)."""
    first_model = load_policy(args.first, args.trust_remote_code)
    sa, sb = first_model.state_dict(), second_model.state_dict()
    if sa.keys() != sb.keys() or any(sa[k].shape != sb[k].shape for k in sa):
        diff = sorted(k for k in set(sa) | set(sb) if k not in sa or k not in sb or sa[k].shape != sb[k].shape)
        raise UsageError(f"{args.first} and {args.second} differ in their parameters (e.g. {', '.join(diff[:3])}); "
                         "both parents must share one base model")
    with torch.no_grad():
        for k, a in sa.items():
            if a.is_floating_point():
                a.copy_(q * a.float() + (1 - q) * sb[k].float())
    outputs.save_model(first_model.to(dtype), tmp)
    tokenizer.save_pretrained(tmp)
    with open(os.path.join(tmp, MIXTURE_FILE), "w") as f:
        json.dump({**note, "q": q}, f, indent=1)


def finished(folder, q, mode, first, second):
    """True when `folder` already holds this mixture of these parents, None when it holds something else, False when
    it does not exist."""
    for name in (outputs.CONFIG_FILE, MIXTURE_FILE):
        path = os.path.join(folder, name)
        done = os.path.exists(os.path.join(folder, outputs.COMPLETE_FILE))
        if os.path.exists(path) and (name == MIXTURE_FILE or done):
            with open(path) as f:
                have = json.load(f)
            parents = [os.path.abspath(outputs.resolved_path(have.get(k), folder) or "") for k in ("first", "second")]
            return (have.get("q"), have.get("mode")) == (q, mode) and parents == [os.path.abspath(first),
                                                                                  os.path.abspath(second)]
    return None if os.path.exists(folder) else False


def run(args):
    for q in args.q:
        if not 0.0 <= q <= 1.0:
            raise UsageError(f"--q {q:g}: each q must lie in [0, 1] (the weight of the first-stage policy)")
    args.first, args.second = outputs.gguf_folder(args.first), outputs.gguf_folder(args.second)
    first_info, first_base, first_blocks = parent(args.first)
    second_info, second_base, second_blocks = parent(args.second)
    on_second = first_info.get("parent") and os.path.abspath(outputs.resolved_path(first_info["parent"], args.first)) \
        == os.path.abspath(args.second)
    if on_second:  # the order slipped: q would weigh the safety stage
        raise UsageError(f"--first {args.first} is the safety stage trained on --second {args.second}, but q is the "
                         f"weight of the first-stage policy: pass --first {args.second} --second {args.first}")
    adapters = same_base(first_base, second_base) and (first_blocks or second_blocks)
    exact = bool(adapters and first_blocks and second_info.get("parent")
                 and os.path.abspath(outputs.resolved_path(second_info["parent"], args.second))
                 == os.path.abspath(args.first))
    note = {"first": os.path.abspath(args.first), "second": os.path.abspath(args.second),
            "order": second_info.get("order") or first_info.get("order"),
            "mode": "rsa_p" if exact else "adapters" if adapters else "full",
            "meaning": "theta(q) = q * theta_first + (1 - q) * theta_second" + (
                " = theta_first + (1 - q) * Delta_second (the second stage's adapter sits on the first)" if exact else
                " = base + q * Delta_first + (1 - q) * Delta_second (one adapter, concatenated in rank)" if adapters
                else " (weight by weight: two full models)")}
    todo = []
    for q in args.q:
        folder = os.path.join(args.out, f"q{q:g}")
        state = finished(folder, q, note["mode"], args.first, args.second)
        if state and not args.overwrite:
            print(f"[merge] {folder}: already made from these parents; skipping")
            continue
        if state is not False and not args.overwrite:
            what = "a mixture of other parents" if state is not None else "something that is not a finished mixture"
            raise UsageError(f"{folder}: holds {what}; pass --overwrite to replace it")
        todo.append(q)
    if not todo:
        return
    tokenizer = stage.load_tokenizer(args.second if outputs.is_stage(args.second) else args.first)
    dtype = stage.DTYPES[args.dtype]  # what is saved; the mixing itself is fp32
    second_model = None if adapters else load_policy(args.second, args.trust_remote_code)
    for q in todo:
        folder = os.path.join(args.out, f"q{q:g}")
        tmp = folder + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        if adapters:
            blocks = mixture_adapter(first_blocks, second_blocks, q, exact)
            write_adapter_mixture(tmp, folder, blocks, first_base, note, q, tokenizer, args.merged, dtype)
        else:
            write_full_mixture(tmp, args, second_model, q, tokenizer, note, dtype)
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
        print(f"[merge] {folder}: q = {q:g} ({note['mode']})", flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="merge_policies.py", description=__doc__,
                                     formatter_class=outputs.HelpFormatter)
    parser.add_argument("--first", required=True, help="first-stage policy (RSA(H->S): the reward stage's output)")
    parser.add_argument("--second", required=True, help="second-stage policy (RSA(H->S): the safety stage's output)")
    parser.add_argument("--q", type=outputs.number, nargs="+", required=True,
                        help="weights of the FIRST policy, each in [0, 1] (SACPO's configs name 1 - q)")
    parser.add_argument("--out", required=True, help="folder that receives one subfolder per q")
    parser.add_argument("--merged", action="store_true", help="also write q*/merged/, the full merged model")
    parser.add_argument("--dtype", default="float32", choices=tuple(stage.DTYPES),
                        help="weights saved for --merged and full mixtures (computed in fp32 either way, on any host)")
    parser.add_argument("--overwrite", action="store_true", help="replace mixtures made from other parents")
    parser.add_argument("--trust_remote_code", action="store_true", help="allow model code from the hub (off: safer)")
    args = parser.parse_args(argv)

    def locked_run(_):
        with outputs.output_lock(args.out):
            run(args)

    return outputs.run_script("merge_policies.py", locked_run)


if __name__ == "__main__":
    sys.exit(main())
