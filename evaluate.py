"""Evaluation (work in progress): batched sampling from a policy."""

from __future__ import annotations

import sys

import torch
from tqdm import tqdm

import data


@torch.no_grad()
def sample_responses(model, tokenizer, prompts, num_samples=1, max_new_tokens=32, do_sample=True, temperature=1.0,
                     top_p=1.0, batch_size=64, prompt_format="pku", seed=0, desc="sampling"):
    """Responses to each prompt, `num_samples` each (prompt-major order): batched, left-padded generation that stops
    at EOS or after `max_new_tokens`. Returns a list of lists of strings."""
    torch.manual_seed(seed)
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    model.eval()
    texts = [data.render_prompt(p, tokenizer, prompt_format) for p in prompts]
    out = []
    per_batch = max(1, batch_size // num_samples)
    try:
        for start in tqdm(range(0, len(texts), per_batch), desc=desc, file=sys.stdout, mininterval=2,
                          disable=len(texts) <= per_batch):
            enc = tokenizer(texts[start: start + per_batch], return_tensors="pt", padding=True,
                            add_special_tokens=prompt_format != "chat").to(model.device)
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=do_sample,
                                 temperature=temperature if do_sample else None, top_p=top_p if do_sample else None,
                                 num_return_sequences=num_samples, pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=tokenizer.eos_token_id)
            decoded = tokenizer.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
            for i in range(0, len(decoded), num_samples):
                out.append([d.strip() for d in decoded[i: i + num_samples]])
    finally:
        tokenizer.padding_side = side
    return out
