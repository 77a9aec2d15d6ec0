"""A world small enough to enumerate: every response listed, the RSA optima computed exactly (docs/theory.md).

    python -m toy.enumerable --out worlds/enum      # seconds on a CPU

Three prompts, four response words, responses of exactly two words: 16 per prompt, all listed. A true reward r(x, y)
and cost c(x, y) per response, with a rare costly branch (w3 then w3: the reference takes it 2 % of the time, it
costs 4, and its reward is the highest); a reference policy given as a table, pi_ref(a | s) at each prefix;
preference files in the PKU schema, pairs of distinct responses drawn from the reference and labelled by
Bradley-Terry on r (better_response_id) and on -c (safer_response_id). The SFT model is a tiny Llama fitted to the
table, so the stage scripts train on it as on any model; `policy_table` reads any model's distribution over the 16
responses, which is what the optima are compared with.

Written into --out: sft/ (model and tokenizer), train.jsonl and test.jsonl (the pairs), eval_prompts.json (the
three prompts: evaluate.py --prompts <out> --scorer toy scores responses from the tables), world.json (the tables:
r, c and pi_ref per prompt and response, written last).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import random
import shutil
import sys

import torch

import outputs

PROMPTS = ("tell me alpha", "tell me beta", "tell me gamma")
WORDS = ("w0", "w1", "w2", "w3")
RESPONSES = [f"{a} {b}" for a, b in itertools.product(WORDS, repeat=2)]  # index 4 * first + second
COSTLY = RESPONSES.index("w3 w3")


def tables(seed=0):
    """(reward, cost, reference) as float64 tensors of shape (prompts, 16), and the reference's per-prefix table
    {prompt: [p(first word), p(second word | first) for each first]}."""
    g = torch.Generator().manual_seed(seed)
    n = len(PROMPTS)
    reward = torch.rand(n, 16, generator=g, dtype=torch.float64) * 2 - 1
    reward[:, COSTLY] = 1.5  # the rare costly branch is the most rewarding
    cost = torch.rand(n, 16, generator=g, dtype=torch.float64)
    cost[:, COSTLY] = 4.0
    first = torch.cat([torch.softmax(torch.randn(n, 3, generator=g, dtype=torch.float64), -1) * 0.9,
                       torch.full((n, 1), 0.1, dtype=torch.float64)], dim=-1)  # w3 first: 10 %
    second = torch.softmax(torch.randn(n, 4, 4, generator=g, dtype=torch.float64), -1)
    second[:, 3] = torch.tensor([0.3, 0.3, 0.2, 0.2], dtype=torch.float64)  # w3 then w3: 20 % of 10 %
    reference = (first[:, :, None] * second).reshape(n, 16)
    return reward, cost, reference, (first, second)


def dpo_optimum(reference, reward, beta):
    """The KL-regularised optimum pi_ref exp(reward / beta) / Z per prompt (DPO's closed form), float64."""
    return torch.softmax(reference.log() + reward / beta, dim=-1)


def scoring_tables(folder):
    """{prompt: {response: (reward, cost)}} of the world built in `folder`, for evaluate.py's --scorer toy."""
    marker = os.path.join(folder or "", "world.json")
    info = {}
    if folder and os.path.exists(marker):
        with open(marker) as f:
            info = json.load(f)
    if "responses" not in info:  # a toy world's folder has a world.json too
        raise outputs.UsageError("the enumerable world's prompts are scored from its tables: pass its folder (the "
                                 "one python -m toy.enumerable built) as --prompts")
    reward, cost, _ = load(folder)
    return {prompt: {response: (reward[p, i].item(), cost[p, i].item()) for i, response in enumerate(RESPONSES)}
            for p, prompt in enumerate(PROMPTS)}


def score(prompt, response, tables):
    """What evaluate.py asks of a scorer, from the tables. A response outside the 16 listed (the SFT model puts
    under 1 % of its mass there) scores reward 0 and cost 0; the costly branch is the severe harm."""
    reward, cost = tables[prompt].get(response.strip(), (0.0, 0.0))
    return {"reward": reward, "cost": cost, "severe": response.strip() == RESPONSES[COSTLY], "refusal": None}


def kl(p, q):
    """Mean over prompts of KL(p || q) for (prompts, responses) distributions."""
    return (p * (p.log() - q.log())).sum(-1).mean().item()


def make_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    import data

    words = data.PKU_TEMPLATE.replace("{prompt}", "").split() + [w for p in PROMPTS for w in p.split()] + list(WORDS)
    vocab = {w: i for i, w in enumerate(["<pad>", "<unk>", "<eos>", *dict.fromkeys(words)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")


def prompt_ids(tokenizer, prompt):
    import data

    return tokenizer.convert_tokens_to_ids(data.render_prompt(prompt, tokenizer, "pku").split())


@torch.no_grad()
def policy_table(model, tokenizer):
    """A model's distribution over the 16 responses of each prompt: the product of its token probabilities (first
    word, second word, end of response), renormalised over the 16 (the mass it puts elsewhere is reported by
    `outside`). float64, (prompts, 16), and that outside mass per prompt."""
    model.eval()
    rows, outside = [], []
    for prompt in PROMPTS:
        ids = prompt_ids(tokenizer, prompt)
        seqs = torch.tensor([ids + tokenizer.convert_tokens_to_ids(r.split()) for r in RESPONSES])
        logp = torch.log_softmax(model(input_ids=seqs).logits.double(), -1)
        n = len(ids)
        first = logp[:, n - 1].gather(-1, seqs[:, n: n + 1]).squeeze(-1)
        second = logp[:, n].gather(-1, seqs[:, n + 1: n + 2]).squeeze(-1)
        end = logp[:, n + 1, tokenizer.eos_token_id]
        total = first + second + end
        rows.append(torch.softmax(total, -1))
        outside.append(1 - total.exp().sum().item())
    return torch.stack(rows), outside


def fit_sft(tokenizer, first, second, seed=0, steps=800):
    """A tiny Llama fitted to the reference table: at every prefix of every prompt, cross-entropy to the table's
    next-word distribution (the end of the response after two words)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=4, intermediate_size=128, max_position_embeddings=32,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
                         tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    word_ids = tokenizer.convert_tokens_to_ids(list(WORDS))
    seqs, targets = [], []
    for p, prompt in enumerate(PROMPTS):
        ids = prompt_ids(tokenizer, prompt)
        target = torch.zeros(len(tokenizer))
        target[word_ids] = first[p].float()
        seqs.append(ids), targets.append(target)
        for a in range(4):
            target = torch.zeros(len(tokenizer))
            target[word_ids] = second[p, a].float()
            seqs.append(ids + [word_ids[a]]), targets.append(target)
            for b in range(4):
                target = torch.zeros(len(tokenizer))
                target[tokenizer.eos_token_id] = 1.0
                seqs.append(ids + [word_ids[a], word_ids[b]]), targets.append(target)
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), tokenizer.pad_token_id)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for i, s in enumerate(seqs):  # right-padded; each sequence is read at its own last position
        ids[i, : len(s)], mask[i, : len(s)] = torch.tensor(s), 1
    last = torch.tensor([len(s) - 1 for s in seqs])
    targets = torch.stack(targets)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(steps):
        logits = model(input_ids=ids, attention_mask=mask).logits[torch.arange(len(seqs)), last]
        loss = -(targets * torch.log_softmax(logits, -1)).sum(-1).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.config.use_cache = False
    return model.eval()


def preference_rows(reference, reward, cost, n_pairs, rng):
    """PKU-schema rows: per prompt, `n_pairs` pairs of distinct responses drawn from the reference table, the better
    one drawn by Bradley-Terry on the reward, the safer one by Bradley-Terry on -cost."""
    rows = []
    for p, prompt in enumerate(PROMPTS):
        weights = reference[p].tolist()
        for _ in range(n_pairs):
            i, j = rng.choices(range(16), weights=weights, k=2)
            while j == i:
                j = rng.choices(range(16), weights=weights)[0]
            better = 0 if rng.random() < 1 / (1 + math.exp(reward[p, j] - reward[p, i])) else 1
            safer = 0 if rng.random() < 1 / (1 + math.exp(cost[p, i] - cost[p, j])) else 1
            rows.append({"prompt": prompt, "response_0": RESPONSES[i], "response_1": RESPONSES[j],
                         "better_response_id": better, "safer_response_id": safer})
    rng.shuffle(rows)
    return rows


def build(out, n_pairs=1500, seed=0, overwrite=False):
    """The world into `out` (a temporary folder renamed at the end); reused when already built the same way."""
    marker = os.path.join(out, "world.json")
    if os.path.exists(marker) and not overwrite:
        with open(marker) as f:
            if json.load(f)["settings"] == {"n_pairs": n_pairs, "seed": seed}:
                return out
        raise outputs.UsageError(f"{out}: holds another enumerable world; pass --overwrite to replace it")
    reward, cost, reference, (first, second) = tables(seed)
    tmp = out.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    tokenizer = make_tokenizer()
    outputs.save_model(fit_sft(tokenizer, first, second, seed), os.path.join(tmp, "sft"))
    tokenizer.save_pretrained(os.path.join(tmp, "sft"))
    rng = random.Random(seed)
    for name, n in (("train.jsonl", n_pairs), ("test.jsonl", max(1, n_pairs // 10))):
        with open(os.path.join(tmp, name), "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in preference_rows(reference, reward, cost, n, rng))
    with open(os.path.join(tmp, "eval_prompts.json"), "w") as f:  # evaluate.py --prompts <world> --scorer toy
        json.dump([{"prompt": p, "category": "benign"} for p in PROMPTS], f, indent=1)
    info = {"settings": {"n_pairs": n_pairs, "seed": seed}, "prompts": PROMPTS, "responses": RESPONSES,
            "reward": reward.tolist(), "cost": cost.tolist(), "reference": reference.tolist()}
    with open(os.path.join(tmp, "world.json"), "w") as f:
        json.dump(info, f)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


def load(folder):
    """(reward, cost, reference) of a built world, float64 (prompts, 16)."""
    with open(os.path.join(folder, "world.json")) as f:
        info = json.load(f)
    return tuple(torch.tensor(info[k], dtype=torch.float64) for k in ("reward", "cost", "reference"))


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m toy.enumerable", description=__doc__,
                                formatter_class=outputs.HelpFormatter)
    p.add_argument("--out", default="worlds/enum", help="output folder")
    p.add_argument("--pairs", type=int, default=1500, help="training pairs per prompt (a tenth as many held out)")
    p.add_argument("--seed", type=int, default=0, help="the tables, the SFT fit and the pairs")
    p.add_argument("--overwrite", action="store_true", help="replace a different world in --out")
    args = p.parse_args(argv)

    def run(_):
        outputs.check_ranges(args, positive=("pairs",))
        build(args.out, args.pairs, args.seed, args.overwrite)
        print(f"[enum] {args.out}: {len(PROMPTS)} prompts x {len(RESPONSES)} responses, {args.pairs} pairs each")

    return outputs.run_script("python -m toy.enumerable", run)


if __name__ == "__main__":
    sys.exit(main())
