"""Preference data in, token batches out, and nothing lost silently.

    pairs = load_pairs("PKU-Alignment/PKU-SafeRLHF", preference="safer")      # hub (needs a network)
    pairs = load_pairs("train.jsonl", preference="better")                     # local jsonl/json/jsonl.gz/parquet/csv
    pairs = load_pairs("hh.jsonl.gz")                                          # HH-RLHF dialogues, schema detected
    examples = tokenize_pairs(pairs, tokenizer, max_length=512, max_prompt_length=128)
    batch = collate(examples[:8], pad_token_id=tokenizer.pad_token_id)        # chosen rows first, then rejected

Schemas, detected from the columns (or forced with `schema=`):
  pku    prompt, response_0, response_1, better_response_id, safer_response_id (PKU-SafeRLHF; category, harm-category
         and severity columns are kept in `Pair.meta`). `preference` picks the pair: "better" (helpfulness, the reward
         stage) or "safer" (harmlessness, the safety stage: the safer response is chosen).
  hh     chosen, rejected: full "\\n\\nHuman: ... \\n\\nAssistant: ..." dialogues (Anthropic/hh-rlhf).
  plain  prompt, chosen, rejected.

Structural errors (a missing column, an id that is not 0 or 1, a non-string text, invalid JSON or UTF-8, an
unreadable path) raise DataError naming the file, the row and the field. Data that real sets do contain (empty or
whitespace-only responses, identical responses, HH rows whose responses do not share one prompt, rows truncated to
nothing) is dropped with a printed count per reason; `strict=True` turns every drop into a DataError.
"""

from __future__ import annotations

import csv
import gzip
import json
import os
import random
import sys
from collections import Counter
from dataclasses import dataclass, field

import torch

# The small real data the repository carries (assets/README.md: provenance and licences).
ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
HH_HARMLESS_TEST = os.path.join(ASSETS, "hh-rlhf-harmless-base-test.jsonl.gz")  # hub: Anthropic/hh-rlhf
REDTEAM_PROMPTS = os.path.join(ASSETS, "redteam-83-prompts.json")
HELPFUL_PROMPTS = os.path.join(ASSETS, "helpful-129-prompts.json")
XSTEST_PROMPTS = os.path.join(ASSETS, "xstest-prompts.csv")  # hub: Paul/XSTest
XSTEST_COMPLETIONS = os.path.join(ASSETS, "xstest-labelled-completions.jsonl.gz")  # human refusal labels

PKU_TEMPLATE = "BEGINNING OF CONVERSATION: USER: {prompt} ASSISTANT:"
SCHEMAS = ("pku", "hh", "plain", "conversational")
PREFERENCES = ("better", "safer")
PROMPT_FORMATS = ("auto", "pku", "raw", "chat")
LOCAL_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".parquet", ".csv")
HH_ASSISTANT, HH_HUMAN = "\n\nAssistant:", "\n\nHuman:"
PKU_META = ("category", "severity", "safe")  # substrings of the extra PKU columns kept in Pair.meta


class DataError(ValueError):
    """Bad input data; the message names the file, the row and the field."""


@dataclass
class Pair:
    """One preference pair. `prompt` is text (for HH the raw dialogue up to the last "Assistant:"); `messages` is
    the same prompt as chat turns, for models with a chat template."""

    prompt: str
    chosen: str
    rejected: str
    messages: list = field(default_factory=list)
    meta: dict = field(default_factory=dict)
    row: int = 0


class Drops:
    """Counts dropped rows per reason; in strict mode the first drop raises instead."""

    def __init__(self, source, strict=False):
        self.source, self.strict, self.counts, self.first = source, strict, Counter(), {}

    def drop(self, row, reason):
        if self.strict:
            raise DataError(f"{self.source}: row {row}: {reason} (dropped rows are errors under --strict)")
        self.counts[reason] += 1
        self.first.setdefault(reason, row)

    def report(self, kept, what="pairs"):
        total = kept + sum(self.counts.values())
        line = f"[data] {self.source}: kept {kept} of {total} {what}"
        if self.counts:
            line += "; dropped " + ", ".join(f"{n} ({reason}, first at row {self.first[reason]})"
                                            for reason, n in self.counts.most_common())
        print(line, flush=True)


# ---------------------------------------------------------------------------------------------- reading rows


def is_local(source):
    return os.path.exists(source) or source.endswith(LOCAL_SUFFIXES) or source.startswith((".", "/", "~"))


def _open_text(path):
    return gzip.open(path, "rt", encoding="utf-8") if path.endswith(".gz") else open(path, encoding="utf-8")


def read_rows(source, split="train", data_dir=None, config=None):
    """Rows (dicts) from a local file, a folder written by `datasets`' save_to_disk, or a Hugging Face hub data set
    (with an optional config name) when `source` is not a local path.

    Returns a list of (row number, dict); row numbers are 1-based lines for jsonl and csv (header = line 1),
    1-based positions otherwise.
    """
    if not is_local(source):
        return _read_hub(source, split, data_dir, config)
    path = os.path.expanduser(source)
    if not os.path.exists(path):
        raise DataError(f"{source}: no such file")
    if os.path.isdir(path):
        if any(os.path.exists(os.path.join(path, f)) for f in ("dataset_info.json", "dataset_dict.json")):
            return _read_saved(path, source, split)
        raise DataError(f"{source}: is a directory (and not one written by save_to_disk); pass a .jsonl, .json, "
                        ".jsonl.gz, .parquet or .csv file")
    if not path.endswith(LOCAL_SUFFIXES):
        raise DataError(f"{source}: unknown file type; use one of {', '.join(LOCAL_SUFFIXES)}")
    try:
        if path.endswith((".jsonl", ".jsonl.gz")):
            return _read_jsonl(path, source)
        if path.endswith((".json", ".json.gz")):
            return _read_json(path, source)
        if path.endswith(".csv"):
            with open(path, encoding="utf-8", newline="") as f:
                return [(i + 2, dict(r)) for i, r in enumerate(csv.DictReader(f))]
        import pyarrow.parquet as pq

        try:
            return [(i + 1, r) for i, r in enumerate(pq.read_table(path).to_pylist())]
        except Exception as e:  # pyarrow raises several types for a corrupt file
            raise DataError(f"{source}: not a readable parquet file ({e})") from None
    except PermissionError as e:
        raise DataError(f"{source}: cannot read ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{source}: invalid UTF-8 at byte {e.start}") from None
    except (EOFError, gzip.BadGzipFile, OSError) as e:
        raise DataError(f"{source}: cannot read ({e})") from None


def _read_jsonl(path, source):
    rows = []
    with _open_text(path) as f:
        for line_no, line in enumerate(iter(f.readline, "")):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{source}: line {line_no + 1}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{source}: line {line_no + 1}: expected a JSON object, got {type(row).__name__}")
            rows.append((line_no + 1, row))
    return rows


def _read_json(path, source):
    with _open_text(path) as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise DataError(f"{source}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), list):
        data = next(iter(data.values()))  # {"data": [...]} or {"train": [...]}
    if not isinstance(data, list):
        raise DataError(f"{source}: expected a JSON list of objects")
    for i, row in enumerate(data):
        if not isinstance(row, dict):
            raise DataError(f"{source}: row {i + 1}: expected a JSON object, got {type(row).__name__}")
    return [(i + 1, row) for i, row in enumerate(data)]


def _read_saved(path, source, split):
    """A Dataset or DatasetDict folder from save_to_disk (a DatasetDict gives `split`)."""
    import datasets

    try:
        ds = datasets.load_from_disk(path)
    except Exception as e:  # a damaged folder: say so in one line
        raise DataError(f"{source}: cannot read this save_to_disk folder ({type(e).__name__}: {e})") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(f"{source}: no split {split!r} (it has {', '.join(ds)}); pass --split")
        ds = ds[split]
    return [(i + 1, row) for i, row in enumerate(ds)]


def _read_hub(name, split, data_dir, config=None):
    import datasets

    try:
        ds = datasets.load_dataset(name, config, data_dir=data_dir, split=split)
    except Exception as e:  # offline, unknown name, unknown split: say which and why
        raise DataError(f"{name}: not a local file, and loading it from the Hugging Face hub failed "
                        f"({type(e).__name__}: {e})") from None
    return [(i + 1, row) for i, row in enumerate(ds)]


# ---------------------------------------------------------------------------------------------- schemas


def detect_schema(columns, source="data", first=None):
    cols = set(columns)
    if {"response_0", "response_1"} <= cols:
        return "pku"
    if {"chosen", "rejected"} <= cols and first is not None and isinstance(first.get("chosen"), list):
        return "conversational"  # TRL's: messages lists, with a prompt column or an implicit common prefix
    if {"prompt", "chosen", "rejected"} <= cols:
        return "plain"
    if {"chosen", "rejected"} <= cols:
        return "hh"
    raise DataError(f"{source}: cannot tell the schema from columns {sorted(cols)}; expected PKU-SafeRLHF "
                    "(prompt, response_0, response_1, better_response_id, safer_response_id), HH-RLHF "
                    "(chosen, rejected), plain (prompt, chosen, rejected) or TRL's conversational format")


def _text(row, key, source, row_no):
    if key not in row:
        raise DataError(f"{source}: row {row_no}: missing field {key!r}")
    value = row[key]
    if not isinstance(value, str):
        raise DataError(f"{source}: row {row_no}: field {key!r} must be a string, got {type(value).__name__}")
    return value


def _choice_id(row, key, source, row_no):
    if key not in row:
        raise DataError(f"{source}: row {row_no}: missing field {key!r} (needed for this preference)")
    value = row[key]
    if isinstance(value, str) and value.strip() in ("0", "1"):  # csv
        return int(value)
    if isinstance(value, bool) or value not in (0, 1):
        raise DataError(f"{source}: row {row_no}: field {key!r} must be 0 or 1, got {value!r}")
    return int(value)


def split_hh(chosen, rejected):
    """(prompt, chosen response, rejected response): the prompt is the longest common prefix of the two dialogues
    that ends at "\\n\\nAssistant:". Returns None when they share no assistant turn."""
    common = os.path.commonprefix([chosen, rejected])
    cut = common.rfind(HH_ASSISTANT)
    if cut < 0:
        return None
    end = cut + len(HH_ASSISTANT)
    return chosen[:end], chosen[end:], rejected[end:]


def hh_messages(prompt):
    """The raw HH dialogue as chat turns: [{"role": "user" | "assistant", "content": ...}, ...]."""
    messages = []
    for chunk in prompt.split(HH_HUMAN)[1:]:
        parts = chunk.split(HH_ASSISTANT)
        messages.append({"role": "user", "content": parts[0].strip()})
        messages += [{"role": "assistant", "content": p.strip()} for p in parts[1:] if p.strip()]
    return messages


def load_pairs(source, preference="better", schema=None, split="train", data_dir=None, strict=False, config=None):
    """Load preference pairs from a local file or a hub data set; prints what was kept and dropped."""
    if preference not in PREFERENCES:
        raise ValueError(f"preference must be one of {PREFERENCES}, got {preference!r}")
    rows = read_rows(source, split, data_dir, config)
    if not rows:
        raise DataError(f"{source}: no rows")
    if schema is None:
        schema = detect_schema(rows[0][1].keys(), source, rows[0][1])
    elif schema not in SCHEMAS:
        raise ValueError(f"schema must be one of {SCHEMAS}, got {schema!r}")
    drops = Drops(source, strict)
    pairs = []
    for row_no, row in rows:
        pair = _row_to_pair(row, row_no, schema, preference, source, drops)
        if pair is None:
            continue
        if not pair.chosen.strip() or not pair.rejected.strip():
            drops.drop(row_no, "empty or whitespace-only response")
        elif pair.chosen.strip() == pair.rejected.strip():
            drops.drop(row_no, "identical chosen and rejected")
        else:
            pairs.append(pair)
    drops.report(len(pairs))
    return pairs


def _row_to_pair(row, row_no, schema, preference, source, drops):
    if schema == "pku":
        prompt = _text(row, "prompt", source, row_no)
        responses = [_text(row, "response_0", source, row_no), _text(row, "response_1", source, row_no)]
        key = "better_response_id" if preference == "better" else "safer_response_id"
        win = _choice_id(row, key, source, row_no)
        meta = {k: v for k, v in row.items() if any(s in k for s in PKU_META)}
        return Pair(prompt, responses[win], responses[1 - win], [{"role": "user", "content": prompt}], meta, row_no)
    if schema == "plain":
        prompt = _text(row, "prompt", source, row_no)
        chosen, rejected = _text(row, "chosen", source, row_no), _text(row, "rejected", source, row_no)
        return Pair(prompt, chosen, rejected, [{"role": "user", "content": prompt}], {}, row_no)
    if schema == "conversational":
        return _conversation_to_pair(row, row_no, source, drops)
    split = split_hh(_text(row, "chosen", source, row_no), _text(row, "rejected", source, row_no))
    if split is None:
        drops.drop(row_no, "chosen and rejected share no assistant turn")
        return None
    prompt, chosen, rejected = split
    if HH_HUMAN in chosen or HH_HUMAN in rejected or HH_ASSISTANT in chosen or HH_ASSISTANT in rejected:
        drops.drop(row_no, "a response continues the dialogue (the two sides have different prompts)")
        return None
    return Pair(prompt, chosen, rejected, hh_messages(prompt), {}, row_no)


def _messages(row, key, source, row_no):
    value = row.get(key)
    if key not in row:
        raise DataError(f"{source}: row {row_no}: missing field {key!r}")
    if not isinstance(value, list) or not all(isinstance(m, dict) and isinstance(m.get("content"), str)
                                              and isinstance(m.get("role"), str) for m in value):
        raise DataError(f"{source}: row {row_no}: field {key!r} must be a list of messages with 'role' and "
                        f"'content' strings, got {type(value).__name__}")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _conversation_to_pair(row, row_no, source, drops):
    """TRL's conversational rows: prompt / chosen / rejected as message lists, or (implicit prompt) chosen and
    rejected as whole conversations whose common prefix of messages is the prompt. The responses are the final
    assistant message of each side."""
    chosen, rejected = _messages(row, "chosen", source, row_no), _messages(row, "rejected", source, row_no)
    if "prompt" in row:
        prompt = _messages(row, "prompt", source, row_no)
    else:
        n = 0
        while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
            n += 1
        prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
    if len(chosen) != 1 or len(rejected) != 1 or chosen[0]["role"] != "assistant" or \
            rejected[0]["role"] != "assistant" or not prompt or prompt[-1]["role"] != "user":
        drops.drop(row_no, "not one assistant reply to a prompt ending with a user turn")
        return None
    return Pair(prompt[-1]["content"], chosen[0]["content"], rejected[0]["content"], prompt, {}, row_no)


def load_prompts(source):
    """Evaluation prompts from a json/jsonl file of objects with `prompt` (optionally `category`, and `should_refuse`:
    true for a prompt a safe model declines, false for one it should answer)."""
    rows = read_rows(source)
    prompts = []
    for row_no, row in rows:
        should_refuse = row.get("should_refuse")
        if should_refuse is not None and not isinstance(should_refuse, bool):
            raise DataError(f"{source}: row {row_no}: field 'should_refuse' must be true or false, got "
                            f"{should_refuse!r}")
        prompts.append({"prompt": _text(row, "prompt", source, row_no), "category": str(row.get("category", "all")),
                        "should_refuse": should_refuse})
    if not prompts:
        raise DataError(f"{source}: no prompts (expected objects with a 'prompt' field)")
    return prompts


# ---------------------------------------------------------------------------------------------- tokenisation


def render_prompt(pair_or_prompt, tokenizer, prompt_format="pku"):
    """The prompt text the model sees: PKU template, the raw text, or the tokenizer's chat template."""
    if isinstance(pair_or_prompt, Pair):
        prompt, messages = pair_or_prompt.prompt, pair_or_prompt.messages
    else:
        prompt, messages = pair_or_prompt, [{"role": "user", "content": pair_or_prompt}]
    if prompt_format == "pku":
        return PKU_TEMPLATE.format(prompt=prompt)
    if prompt_format == "raw":
        return prompt
    if prompt_format == "chat":
        if getattr(tokenizer, "chat_template", None) is None:
            raise DataError("--prompt_format chat: the tokenizer has no chat template")
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    raise ValueError(f"prompt_format must be one of {PROMPT_FORMATS}, got {prompt_format!r}")


def resolve_prompt_format(prompt_format, pairs=(), tokenizer=None):
    """`auto`: the model's own chat template when its tokenizer has one; otherwise raw text for HH dialogues (they
    carry their own turns) and the PKU template for everything else."""
    if prompt_format != "auto":
        return prompt_format
    if getattr(tokenizer, "chat_template", None):
        return "chat"
    return "raw" if pairs and pairs[0].prompt.startswith(HH_HUMAN) else "pku"


def response_text(response, prompt_format):
    """Responses follow the prompt after one space (PKU / raw text); chat templates take the content as is."""
    if prompt_format == "chat":
        return response.strip()
    return response if response[:1].isspace() else " " + response


def tokenize_pairs(pairs, tokenizer, max_length=512, max_prompt_length=128, prompt_format="auto", strict=False,
                   source="data"):
    """Token ids for each pair: {prompt_ids, chosen_ids, rejected_ids} with EOS appended to each response.

    The prompt is truncated from the left to `max_prompt_length`, then each response from the right so that
    prompt + response fits `max_length`. Pairs whose prompt tokens are not a prefix of the prompt + response tokens,
    or whose response is truncated to nothing, are dropped with a count.
    """
    if tokenizer.eos_token_id is None:
        raise DataError("the tokenizer has no EOS token; responses must end with one")
    if max_prompt_length >= max_length:
        raise ValueError(f"max_prompt_length ({max_prompt_length}) must be smaller than max_length ({max_length})")
    fmt = resolve_prompt_format(prompt_format, pairs, tokenizer)
    special = fmt != "chat"  # chat templates write their own BOS
    drops = Drops(source, strict)
    out = []
    for pair in pairs:
        prompt = render_prompt(pair, tokenizer, fmt)
        prompt_ids = tokenizer(prompt, add_special_tokens=special)["input_ids"]
        responses = []
        for text in (pair.chosen, pair.rejected):
            full = tokenizer(prompt + response_text(text, fmt), add_special_tokens=special)["input_ids"]
            if full[: len(prompt_ids)] != prompt_ids:
                break
            responses.append(full[len(prompt_ids):] + [tokenizer.eos_token_id])
        if len(responses) < 2:
            drops.drop(pair.row, "prompt tokens are not a prefix of prompt + response tokens")
            continue
        prompt_ids = prompt_ids[-max_prompt_length:]
        room = max_length - len(prompt_ids)
        chosen, rejected = responses[0][:room], responses[1][:room]
        if chosen == rejected:
            drops.drop(pair.row, "chosen and rejected identical after truncation")
            continue
        out.append({"prompt_ids": prompt_ids, "chosen_ids": chosen, "rejected_ids": rejected, "row": pair.row})
    drops.report(len(out), "tokenised pairs")
    return out


def collate(examples, pad_token_id=0):
    """Pad and stack: rows 0..B-1 are the chosen sequences, rows B..2B-1 the rejected ones, for one forward pass.

    Returns input_ids and attention_mask (2B, T), and response_mask (2B, T) bool: True on response tokens and EOS,
    built from positions (never from pad_token_id, which may equal EOS).
    """
    seqs, starts = [], []
    for side in ("chosen_ids", "rejected_ids"):
        for ex in examples:
            seqs.append(ex["prompt_ids"] + ex[side])
            starts.append(len(ex["prompt_ids"]))
    width = max(len(s) for s in seqs)
    n = len(seqs)
    input_ids = torch.full((n, width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((n, width), dtype=torch.long)
    response_mask = torch.zeros((n, width), dtype=torch.bool)
    for i, (seq, start) in enumerate(zip(seqs, starts)):
        input_ids[i, : len(seq)] = torch.tensor(seq)
        attention_mask[i, : len(seq)] = 1
        response_mask[i, start: len(seq)] = True
    return {"input_ids": input_ids, "attention_mask": attention_mask, "response_mask": response_mask}


def batch_order(n_examples, batch_size, seed, world=1, rank=0, start=0):
    """Index lists, one micro-batch for this rank each, from global micro-batch `start` on. The order is a fixed
    function of the seed and the epoch (not of the batch size or the number of processes), so a resumed run sees
    what an uninterrupted one would, and R ranks x B pairs see what one process with R x B pairs would."""
    size = batch_size * world
    per_epoch = max(1, n_examples // size)
    for micro in range(start, sys.maxsize):
        epoch, k = divmod(micro, per_epoch)
        order = list(range(n_examples))
        random.Random(seed * 100003 + epoch).shuffle(order)
        yield order[k * size: (k + 1) * size][rank * batch_size: (rank + 1) * batch_size]


def add_flags(g):
    """The data flags of both stages (into an argparse group; each stage adds its own --preference)."""
    g.add_argument("--data", required=True,
                   help="preference data: a local jsonl/json/jsonl.gz/parquet/csv file, a save_to_disk folder, or a "
                        "hub name (PKU-Alignment/PKU-SafeRLHF, Anthropic/hh-rlhf); PKU, HH, plain (prompt, chosen, "
                        "rejected) and TRL's conversational rows are recognised")
    g.add_argument("--data_dir", default=None, help="hub data_dir (e.g. harmless-base for Anthropic/hh-rlhf)")
    g.add_argument("--data_config", default=None, help="hub config name of --data (and --eval_data)")
    g.add_argument("--split", default="train", help="hub split")
    g.add_argument("--schema", default=None, choices=SCHEMAS, help="force the schema (default: detect)")
    g.add_argument("--eval_data", default=None, help="held-out pairs (default: --eval_pairs split off --data)")
    g.add_argument("--eval_split", default="test", help="hub split of --eval_data")
    g.add_argument("--eval_pairs", type=int, default=64, help="held-out pairs evaluated (split off if no --eval_data)")
    g.add_argument("--strict", action="store_true", help="treat dropped rows as errors")
    g.add_argument("--max_length", type=int, default=512, help="prompt + response tokens")
    g.add_argument("--max_prompt_length", type=int, default=128, help="prompt tokens kept (from the end)")
    g.add_argument("--prompt_format", default="auto", choices=PROMPT_FORMATS,
                   help="auto: the tokenizer's chat template if it has one, else raw text for HH dialogues and the PKU "
                        "template for the rest")


def train_and_held_out(args, tokenizer):
    """Tokenised (train, held-out) examples of a stage's data flags, with every drop counted."""
    pairs = load_pairs(args.data, args.preference, args.schema, args.split, args.data_dir, args.strict,
                       args.data_config)
    if args.eval_data:
        held = load_pairs(args.eval_data, args.preference, args.schema, args.eval_split, args.data_dir, args.strict,
                          args.data_config)[: args.eval_pairs]
    else:
        pairs = pairs[:]
        random.Random(args.seed).shuffle(pairs)
        n_held = min(args.eval_pairs, len(pairs) // 10)
        held, pairs = pairs[:n_held], pairs[n_held:]
        print(f"[data] held out {n_held} of the training pairs for evaluation (no --eval_data)")
    options = dict(max_length=args.max_length, max_prompt_length=args.max_prompt_length,
                   prompt_format=args.prompt_format, strict=args.strict)
    train = tokenize_pairs(pairs, tokenizer, source=args.data, **options)
    if not train:
        raise DataError(f"{args.data}: no training pairs left after filtering")
    return train, tokenize_pairs(held, tokenizer, source=args.eval_data or args.data, **options)
