"""The machinery both RSA stages share: what a stage leaves on disk, models, the common flags, one batch of the
Ra-DPO loss, and the training loop with checkpoints and exact resume.

    Sec. 1  outputs on disk         is_stage, read_stage, load_policy, the LoRA adapter as data (read_adapter,
                                    concat_adapters, write_adapter), write_model_card, config_fingerprint,
                                    output_lock, check_output
    Sec. 2  models                  load_base_model, load_tokenizer, lora_config, add_lora, backbone_and_head
    Sec. 3  flags both stages share add_shared_flags, parse_args (with --config), LossConfig
    Sec. 4  one batch               reference_context, batch_terms, batch_loss, evaluate_pairs
    Sec. 5  the loop                Runtime, train (start_or_resume, one_update, publish), checkpoints, memory_plan,
                                    Reporter (metrics.jsonl, TensorBoard, wandb)

The stage scripts (train_reward_stage.py, train_safety_stage.py) hold only what differs between the stages: their
own flags, the policy and reference each starts from, and `main`. The math lives in risk.py (docs/math.md).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import math
import os
import random
import re
import shutil
import socket
import sys
import time
import warnings

import torch
from tqdm import tqdm

import data
import risk

CONFIG_FILE, COMPLETE_FILE, METRICS_FILE = "rsa_config.json", "complete.json", "metrics.jsonl"
# Settings that do not change what a run computes: a re-run that differs only in these is the same run.
NOT_PART_OF_RUN = {"overwrite", "log_every", "out", "resume", "save_every", "save_total_limit", "config", "report_to"}
# The Ra-DPO authors' published setup (docs/math.md Sec. 4 and 8), from zlj123-max/Ra-DPO: config/config.yaml
# (lr 5e-6, warmup_steps 150), config/model/base_model.yaml (max_grad_norm 5.0, max_length 512,
# max_prompt_length 256), and their loss code (Ra-DPO_1, the two-halves CVaR threshold, the loss summed over pairs).
RADPO_PARITY = dict(loss="ra_dpo1", risk_measure="cvar_radpo", risk_level=0.95, split_vocab=True,
                    loss_reduction="sum", lr=5e-6, warmup_steps=150, max_grad_norm=5.0, max_length=512,
                    max_prompt_length=256)
# In the safety stage, the frozen reward-stage adapter carries this name; the loop finds the
# reference by looking for it in the model's peft config (as TRL looks for its "ref" adapter).
REFERENCE_ADAPTER = "reference"

warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")  # peft calls a deprecated name
# peft imports bitsandbytes whenever it is installed; on a CPU its 4-bit kernel loader then warns about an optional
# kernel package
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


class UsageError(Exception):
    """A user error: printed as one line, exit code 2, no traceback."""


# ---------------------------------------------------------------------------------------------- 1. stage outputs


def model_source(path, gguf_file=None):
    """(folder or hub name, gguf file name or None): a path to a .gguf file is split into its folder and name."""
    if gguf_file is None and path.endswith(".gguf"):
        return os.path.dirname(path) or ".", os.path.basename(path)
    return path, gguf_file


def is_hub_name(path):
    """A Hugging Face hub id such as `org/name` (for paths that do not exist locally)."""
    return re.fullmatch(r"[\w.-]+(/[\w.-]+)?", path) is not None and not path.startswith(".")


def is_stage(path):
    return os.path.exists(os.path.join(path, CONFIG_FILE))


def read_stage(folder):
    """The rsa_config.json of a finished stage; errors for missing or unfinished ones."""
    if not os.path.isdir(folder):
        raise UsageError(f"{folder}: no such stage output folder")
    if not is_stage(folder):
        raise UsageError(f"{folder}: not a stage output (no {CONFIG_FILE})")
    if not os.path.exists(os.path.join(folder, COMPLETE_FILE)):
        raise UsageError(f"{folder}: the stage did not finish (no {COMPLETE_FILE}); rerun it first")
    with open(os.path.join(folder, CONFIG_FILE)) as f:
        return json.load(f)


def plain_model(path, gguf_file=None):
    """The description of a model that is not a stage output: a model folder, a hub name, or a GGUF file."""
    folder, name = model_source(path, gguf_file)
    local = os.path.exists(folder) or not is_hub_name(folder)
    if name and local and not os.path.isfile(os.path.join(folder, name)):
        raise UsageError(f"{os.path.join(folder, name)}: no such GGUF file")
    if not name and local and not os.path.exists(path):
        raise UsageError(f"{path}: no such stage output or model folder")
    if not name and local and not os.path.exists(os.path.join(path, "config.json")):
        raise UsageError(f"{path}: neither a stage output nor a model folder (no config.json)")
    return {"stage": None, "base_model": path, "gguf_file": gguf_file, "parent": None}


def describe(path, gguf_file=None):
    """What a model argument is: a finished stage (its config) or a plain model (folder, hub name, .gguf file)."""
    return read_stage(path) if is_stage(path) else plain_model(path, gguf_file)


def recorded_path(path, folder):
    """A model path as an output folder records it: relative to that folder when local (a run tree moved together
    with its base still loads), a hub id as it is."""
    if path is None or not os.path.exists(path):
        return path
    return os.path.relpath(os.path.abspath(path), os.path.abspath(folder))


def resolved_path(path, folder):
    """The inverse of recorded_path: a path recorded in `folder`'s config, as seen from here."""
    if path is None or os.path.isabs(path):
        return path
    candidate = os.path.normpath(os.path.join(folder, path))
    return candidate if os.path.exists(candidate) else path


def copy_output(src, dst):
    """Copy a finished stage or mixture folder, its recorded paths rewritten for where the copy lies."""
    shutil.copytree(src, dst)
    cfg = read_stage(dst)
    for key in ("base_model", "parent", "first", "second"):
        if cfg.get(key):
            cfg[key] = recorded_path(resolved_path(cfg[key], src), dst)
    with open(os.path.join(dst, CONFIG_FILE), "w") as f:
        json.dump(cfg, f, indent=1)
    adapter_config = os.path.join(dst, ADAPTER_CONFIG)
    if os.path.exists(adapter_config):
        with open(adapter_config) as f:
            config = json.load(f)
        config["base_model_name_or_path"] = cfg["base_model"]
        with open(adapter_config, "w") as f:
            json.dump(config, f, indent=2)


def base_of(folder, cfg=None):
    """(base model path as seen from here, gguf file, revision) of a finished stage or mixture."""
    cfg = cfg or read_stage(folder)
    return resolved_path(cfg["base_model"], folder), cfg.get("gguf_file"), cfg.get("revision")


def load_policy(folder, trust_remote_code=False, dtype=torch.float32):
    """A finished stage's (or mixture's) policy: its recorded base with its one LoRA adapter, as stock peft loads it
    (PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), folder)). In fp32 the adapter is merged
    into the weights (a plain transformers model); on a 16-bit base it stays an fp32 adapter beside them, computed
    as in training, not folded into 16-bit weights. Also accepts a plain model folder, a hub name or a .gguf
    file."""
    from peft import PeftModel

    if not is_stage(folder):
        return load_base_model(folder, trust_remote_code=trust_remote_code, dtype=dtype)
    path, gguf_file, revision = base_of(folder)
    base = load_base_model(path, gguf_file, trust_remote_code, revision=revision, dtype=dtype)
    model = PeftModel.from_pretrained(base, folder, torch_device="cpu")  # peft would pick GPU 0 by itself
    return model.merge_and_unload() if dtype == torch.float32 else model.eval()


# LoRA adapters as data: {module path: (A (r, in), B (out, r) with the scaling folded in)}. Concatenating two
# adapters in rank gives one adapter whose update is the sum of theirs, exactly (peft's add_weighted_adapter calls
# this "cat"); scaling a block of B scales that adapter's update. This is how the safety stage and RSA(P) mixtures
# become one adapter on the SFT base that stock peft loads.

ADAPTER_WEIGHTS, ADAPTER_CONFIG = "adapter_model.safetensors", "adapter_config.json"


def read_adapter(folder):
    """The LoRA blocks of an adapter folder (peft format), scaling folded into B."""
    from safetensors.torch import load_file

    with open(os.path.join(folder, ADAPTER_CONFIG)) as f:
        config = json.load(f)
    weights = load_file(os.path.join(folder, ADAPTER_WEIGHTS))
    if any("lora_embedding" in k or "lora_magnitude" in k for k in weights):
        raise UsageError(f"{folder}: only LoRA on linear layers can be combined (found embedding LoRA or DoRA)")
    blocks = {}
    for key, a in weights.items():
        if not key.endswith(".lora_A.weight"):
            continue
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
    modules = sorted(set().union(*(blocks for _, blocks in parts)))
    out = {}
    for name in modules:
        shapes = next((a.shape[1], b.shape[0]) for _, blocks in parts for a, b in [blocks.get(name, (None, None))]
                      if a is not None)
        a_parts, b_parts = [], []
        for coef, blocks in parts:
            rank = next(iter(blocks.values()))[0].shape[0]
            a, b = blocks.get(name, (torch.zeros(rank, shapes[0]), torch.zeros(shapes[1], rank)))
            a_parts.append(a)
            b_parts.append(coef * b)
        out[name] = (torch.cat(a_parts), torch.cat(b_parts, dim=1))
    return out


def model_adapter(model, name="default"):
    """The LoRA blocks of a peft model's adapter `name`, from memory (fp32 on the CPU, scaling folded into B)."""
    from peft.tuners.lora import LoraLayer

    blocks = {}
    for module_name, module in model.base_model.model.named_modules():
        if isinstance(module, LoraLayer) and name in module.lora_A:
            a = module.lora_A[name].weight.detach().float().cpu()
            b = module.lora_B[name].weight.detach().float().cpu() * module.scaling[name]
            blocks[module_name] = (a, b)
    return blocks


def write_adapter(folder, blocks, base_model, dropout=0.0):
    """Blocks as a peft adapter folder (scaling 1: lora_alpha = r), loadable with PeftModel.from_pretrained."""
    from peft import LoraConfig
    from safetensors.torch import save

    rank = next(iter(blocks.values()))[0].shape[0]
    config = LoraConfig(r=rank, lora_alpha=rank, lora_dropout=dropout, target_modules=sorted(blocks),
                        task_type="CAUSAL_LM", base_model_name_or_path=base_model)
    config.save_pretrained(folder)
    tensors = {}
    for name, (a, b) in blocks.items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = a.contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = b.contiguous()
    _fsync_write(os.path.join(folder, ADAPTER_WEIGHTS), lambda f: f.write(save(tensors)))


CITATIONS = """- RSA: Risk-aware Stepwise Alignment, arXiv 2512.24263
- Ra-DPO: Risk-aware Direct Preference Optimization under nested risk measures, arXiv 2505.20359
- SACPO: Stepwise Alignment for Constrained Language Model Policy Optimization, arXiv 2404.11049"""


def write_model_card(folder, cfg, metrics=None):
    """README.md of an output folder: what it is, how it was made, its held-out metrics, how to load it."""
    args = cfg.get("args", {})
    what = {"reward": "RSA stage 1, the reward (helpfulness) stage", "safety": "RSA stage 2, the safety "
            "(harmlessness) stage", "mixture": "an RSA(P) mixture of two policies"}[cfg["stage"]]
    rows = [("base model", cfg["base_model"]), ("stage order", cfg.get("order"))]
    if cfg["stage"] == "mixture":
        rows += [("q (weight of the first policy)", cfg["q"]), ("first", cfg["first"]), ("second", cfg["second"]),
                 ("update", cfg["meaning"])]
    else:
        rows += [("loss", args.get("loss")), ("risk measure", args.get("risk_measure")),
                 ("risk level", args.get("risk_level")), ("beta", args.get("beta")),
                 ("lambda = beta_r / beta_s", cfg.get("lambda")), ("preference", args.get("preference")),
                 ("parent (reward stage)", cfg.get("parent"))]
    table = "\n".join(f"| {k} | {v} |" for k, v in rows if v is not None)
    held = ""
    if metrics:
        keys = [k for k in ("loss", "rewards/accuracies", "rewards/margins", "kl/chosen", "kl/rejected",
                            "risk/chosen", "risk/rejected") if k in metrics]
        held = ("\n## Final held-out metrics\n\n| metric | value |\n|---|---|\n"
                + "\n".join(f"| {k} | {metrics[k]:.4f} |" for k in keys) + "\n")
    base = cfg["base_model"]
    text = f"""---
library_name: peft
base_model: {base}
tags: [rsa, ra-dpo, safety-alignment, lora]
---

# {what}

One LoRA adapter on the base model below; its update is the whole policy's change from that base (a safety stage's
adapter holds stage 1's update and its own, concatenated in rank). Made by the RSA reference implementation.

| | |
|---|---|
{table}
{held}
## Load it

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
from peft import PeftModel

base = AutoModelForCausalLM.from_pretrained("{base}")  # the path is relative to this folder when local
model = PeftModel.from_pretrained(base, "path/to/this/folder")
tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder")
```

## Cite

{CITATIONS}
"""
    with open(os.path.join(folder, "README.md"), "w", encoding="utf-8") as f:
        f.write(text)


def fingerprint(config):
    """What must agree for two checkpoints to share a base: architecture and shapes (from a model's config)."""
    keys = ("vocab_size", "hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads",
            "num_key_value_heads")
    return {"model_type": config.model_type, **{k: getattr(config, k, None) for k in keys}}


def config_fingerprint(path, gguf_file=None, trust_remote_code=False, revision=None):
    """The fingerprint of the model at `path` read from its config alone, without loading any weights."""
    from transformers import AutoConfig

    folder, gguf_file = model_source(path, gguf_file)
    if not os.path.exists(folder) and not is_hub_name(folder):
        raise UsageError(f"{folder}: no such model folder")
    try:
        config = AutoConfig.from_pretrained(folder, gguf_file=gguf_file, trust_remote_code=trust_remote_code,
                                            revision=revision)
    except (OSError, ValueError) as e:
        raise UsageError(f"{path}: cannot read a model config ({str(e).splitlines()[0]})") from None
    return fingerprint(config)


@contextlib.contextmanager
def output_lock(out):
    """One writer per output: `<out>.lock` holds the pid and host of the run writing `out` (and `out`.tmp). A second
    run into the same output stops with a one-line error while that process lives; a lock left by a process that
    died is taken over with a note. Only the main process of a multi-process run takes it."""
    if int(os.environ.get("RANK", "0")) != 0:
        yield
        return
    path, host = out.rstrip("/") + ".lock", socket.gethostname()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    me = json.dumps({"pid": os.getpid(), "host": host, "started": time.strftime("%Y-%m-%d %H:%M:%S")})
    while True:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            break
        except FileExistsError:
            try:
                with open(path) as f:
                    other = json.load(f)
            except (OSError, ValueError):
                other = {}  # half-written by a process that died at once: stale
            if other.get("host", host) != host:
                raise UsageError(f"{out}: pid {other.get('pid')} on {other['host']} holds {path}; if that run is "
                                 "gone, delete the lock file") from None
            if other.get("pid") and _alive(other["pid"]):
                raise UsageError(f"{out}: another run (pid {other['pid']}, started {other.get('started')}) is "
                                 "writing this output; wait for it or stop it") from None
            print(f"[lock] {path}: taking over the lock of pid {other.get('pid')}, which is no longer running")
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
    with os.fdopen(fd, "w") as f:
        f.write(me)
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)


def _alive(pid):
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def run_config(args, stage, extra):
    cfg = {"stage": stage, "args": {k: v for k, v in vars(args).items() if k not in NOT_PART_OF_RUN}}
    cfg.update(extra)
    return cfg


def check_output(out, cfg, overwrite):
    """True when `out` already holds this finished run (nothing to do); errors when it holds another one."""
    if not os.path.exists(out):
        return False
    done = os.path.exists(os.path.join(out, COMPLETE_FILE))
    if done:
        with open(os.path.join(out, CONFIG_FILE)) as f:
            old = json.load(f)
        if old == cfg:
            return True
        if not overwrite:
            changed = sorted(k for k in set(old["args"]) | set(cfg["args"]) if old["args"].get(k) != cfg["args"].get(k))
            raise UsageError(f"{out}: holds a finished run with a different config (differs in: "
                             f"{', '.join(changed) or 'stage inputs'}); pass --overwrite to replace it")
    elif not overwrite:
        raise UsageError(f"{out}: exists but holds no finished run; pass --overwrite to replace it")
    return False


# ---------------------------------------------------------------------------------------------- 2. models


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(spec="auto"):
    """auto: the first CUDA device when there is one, else the CPU; cuda / cuda:N checked to exist."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {spec}: this machine has no CUDA device (use --device cpu or auto)")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise UsageError(f"--device {spec}: not a device (auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UsageError(f"--device {spec}: there are {torch.cuda.device_count()} CUDA devices")
    return device


def native_bf16():
    """bf16 in hardware (Ampere and newer), not merely representable: V100 and T4 emulate it, several times slower."""
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)


def resolve_precision(spec, device):
    """auto: bf16 autocast on a GPU that has bf16 in hardware, fp16 with a gradient scaler on one that does not
    (T4, V100), fp32 on the CPU."""
    if spec != "auto":
        return spec
    return ("bf16" if native_bf16() else "fp16") if device.type == "cuda" else "fp32"


def resolve_dtype(spec, device, precision="auto"):
    """auto: on a CUDA device the 16-bit type of the precision (bf16 where the GPU has it, else fp16; fp32 under
    --precision fp32), fp32 on the CPU."""
    if spec != "auto":
        return DTYPES[spec]
    if device.type != "cuda":
        return torch.float32
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[resolve_precision(precision, device)]


def load_base_model(path, gguf_file=None, trust_remote_code=False, load_in_4bit=False, revision=None,
                    dtype=torch.float32, fp32_head=False, compute_dtype=None):
    """The causal LM at `path` (local folder, hub name, or GGUF), weights from safetensors (or GGUF), in `dtype`, or
    for QLoRA its linear layers in 4-bit nf4 (double quantisation) computing in `compute_dtype` (default `dtype`),
    on this rank's GPU or on the CPU. For training (`fp32_head`), the output head is fp32 under a 16-bit dtype (a
    tied head as an untied fp32 copy), so the vocabulary projection of the risk terms is not rounded to 16 bits
    (risk.sequence_terms projects with autocast off)."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one "Loading weights" bar per load says nothing a user needs
    path, gguf_file = model_source(path, gguf_file)
    if not os.path.exists(path) and not is_hub_name(path):
        raise UsageError(f"{path}: no such model folder")
    kwargs = {"trust_remote_code": trust_remote_code, "dtype": dtype, "revision": revision}
    if load_in_4bit:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype or dtype,
            bnb_4bit_use_double_quant=True)
        kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", "0")) if torch.cuda.is_available() else "cpu"}
    if gguf_file:
        from transformers import GgufConfig

        if load_in_4bit:
            raise UsageError(f"--load_in_4bit with the GGUF file {gguf_file}: GGUF weights load de-quantised to fp32; "
                             "save the model with save_pretrained and pass that folder to quantise it with nf4")
        # de-quantised at load: a plain dense model that trains and saves like any other
        kwargs.update(gguf_file=gguf_file, quantization_config=GgufConfig(dequantize=True))
    else:
        kwargs["use_safetensors"] = True  # never unpickle weights
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as e:  # no weights, no model_type, not a GGUF file, ...
        where = os.path.join(path, gguf_file) if gguf_file else path
        raise UsageError(f"{where}: cannot load a causal LM from it ({str(e).splitlines()[0]})") from None
    model.config.use_cache = False
    head = model.get_output_embeddings()
    if fp32_head and dtype != torch.float32 and not load_in_4bit and head is not None:
        if head.weight is getattr(model.get_input_embeddings(), "weight", None):
            # a tied head (SmolLM2, Qwen2-0.5B): an untied fp32 copy for the projection; the head is frozen, so the
            # copy stays equal to the embedding, and adapters still load on the tied base
            head.weight = torch.nn.Parameter(head.weight.detach().float().clone(), requires_grad=False)
            model.config.tie_word_embeddings = False
        else:
            head.float()
    for module in model.modules():  # a deterministic reference: no dropout outside the LoRA layers added later
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        # bitsandbytes on a CPU with AVX512-BF16 repacks a 4-bit weight in place for an inference kernel at the
        # first eval-mode forward without grad (the reference pass); that kernel has no backward, so every later
        # gradient through the layer is silently dropped. The training kernel serves both passes instead.
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    return model


def training_base(path, gguf_file, revision, args, rt):
    """The frozen base a stage trains on: in --dtype (auto: the precision's 16-bit type on a GPU, fp32 on the CPU),
    or with --load_in_4bit in nf4 computing in the autocast dtype (fp32 without autocast); an fp32 output head."""
    return load_base_model(path, gguf_file, args.trust_remote_code, args.load_in_4bit, revision,
                           resolve_dtype(args.dtype, rt.device, rt.precision), fp32_head=True,
                           compute_dtype=rt.dtype or torch.float32)


def load_tokenizer(path, gguf_file=None, trust_remote_code=False, revision=None):
    from transformers import AutoTokenizer

    path, gguf_file = model_source(path, gguf_file)
    try:
        tok = AutoTokenizer.from_pretrained(path, gguf_file=gguf_file, trust_remote_code=trust_remote_code,
                                            revision=revision)
    except (OSError, ValueError) as e:
        where = os.path.join(path, gguf_file) if gguf_file else path
        raise UsageError(f"{where}: cannot load a tokenizer from it ({str(e).splitlines()[0]})") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token  # the masks never rely on pad ids
    return tok


def lora_config(args):
    from peft import LoraConfig

    targets = args.lora_target_modules
    targets = targets if targets == "all-linear" else [t.strip() for t in targets.split(",") if t.strip()]
    return LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                      target_modules=targets, task_type="CAUSAL_LM")


def prepare_base(model, args):
    """Gradient checkpointing (non-reentrant) and the k-bit preparation of QLoRA, before adapters are added."""
    if args.load_in_4bit:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=args.gradient_checkpointing,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    elif args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def add_lora(model, args):
    """The trainable LoRA adapter ("default") on `model`; switched off, it leaves `model` itself: the reference."""
    from peft import get_peft_model

    torch.manual_seed(args.seed)  # the adapter's initialisation is part of the run, whatever ran before
    try:
        return get_peft_model(prepare_base(model, args), lora_config(args))
    except ValueError as e:
        raise UsageError(f"--lora_target_modules {args.lora_target_modules}: {e}") from None


def freeze_adapter(model, name):
    for n, p in model.named_parameters():
        if f".{name}." in n:
            p.requires_grad_(False)


def backbone_and_head(model):
    """The transformer body (to get final hidden states without full logits) and the output projection."""
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(lm, lm.base_model_prefix), lm.get_output_embeddings()


# ---------------------------------------------------------------------------------------------- 3. shared flags


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written, and every flag's default."""


def add_shared_flags(p):
    """The flags both stages take (each stage script adds its own first: its model, beta and preference)."""
    g = p.add_argument_group("model")
    g.add_argument("--gguf_file", default=None, help="name of a .gguf file inside the model folder (or pass its path)")
    g.add_argument("--revision", default=None, help="hub revision (branch, tag or commit) of the model, recorded")
    g.add_argument("--trust_remote_code", action="store_true", help="allow model code from the hub (off: safer)")
    g.add_argument("--lora_r", type=int, default=16, help="LoRA rank")
    g.add_argument("--lora_alpha", type=float, default=32.0, help="LoRA scaling numerator (update x alpha / r)")
    g.add_argument("--lora_dropout", type=float, default=0.05, help="dropout on the LoRA input (policy pass only)")
    g.add_argument("--lora_target_modules", default="all-linear",
                   help="comma-separated module names, or all-linear (every linear layer but the output head; "
                        "works for Llama-, GPT-2- and Qwen-shaped models)")
    g = p.add_argument_group("data")
    g.add_argument("--data", required=True,
                   help="preference data: a local jsonl/json/jsonl.gz/parquet/csv file, a save_to_disk folder, or a "
                        "hub name (PKU-Alignment/PKU-SafeRLHF, Anthropic/hh-rlhf); PKU, HH, plain (prompt, chosen, "
                        "rejected) and TRL's conversational rows are recognised")
    g.add_argument("--data_dir", default=None, help="hub data_dir (e.g. harmless-base for Anthropic/hh-rlhf)")
    g.add_argument("--data_config", default=None, help="hub config name of --data (and --eval_data)")
    g.add_argument("--split", default="train", help="hub split")
    g.add_argument("--schema", default=None, choices=data.SCHEMAS, help="force the schema (default: detect)")
    g.add_argument("--eval_data", default=None, help="held-out pairs (default: --eval_pairs split off --data)")
    g.add_argument("--eval_split", default="test", help="hub split of --eval_data")
    g.add_argument("--eval_pairs", type=int, default=64, help="held-out pairs evaluated (split off if no --eval_data)")
    g.add_argument("--strict", action="store_true", help="treat dropped rows as errors")
    g.add_argument("--max_length", type=int, default=512, help="prompt + response tokens")
    g.add_argument("--max_prompt_length", type=int, default=128, help="prompt tokens kept (from the end)")
    g.add_argument("--prompt_format", default="auto", choices=data.PROMPT_FORMATS,
                   help="auto: the tokenizer's chat template if it has one, else raw text for HH dialogues and the PKU "
                        "template for the rest")
    return add_training_flags(p)


def add_training_flags(p):
    """The loss, optimisation, compute and output flags (part of add_shared_flags)."""
    g = p.add_argument_group("loss (docs/math.md Sec. 4-5)")
    g.add_argument("--loss", default="ra_dpo2", choices=risk.VARIANTS, help="the preference loss")
    g.add_argument("--risk_measure", default="cvar_radpo", choices=risk.MEASURES,
                   help="expectation gives TDPO; cvar is the paper form, cvar_radpo the authors' code form")
    g.add_argument("--risk_level", type=float, default=0.95, help="CVaR tail mass in (0, 1], or ERM's mu > 0")
    g.add_argument("--erm_on_rewards", action="store_true",
                   help="erm: --risk_level is mu on the implicit reward beta * D instead of on D, so one value means "
                        "one risk aversion at every beta (mu on D = level x beta; docs/math.md Sec. 2)")
    g.add_argument("--alpha", type=float, default=0.5, help="ra_dpo2 loss weight of the risk term (not the level)")
    g.add_argument("--split_vocab", action="store_true", help="cvar_radpo: the authors' two-halves threshold quirk")
    g.add_argument("--loss_reduction", default="mean", choices=("mean", "sum"),
                   help="over pairs in a batch (the Ra-DPO code sums)")
    g.add_argument("--radpo_parity", action="store_true",
                   help="the Ra-DPO authors' setup: " + ", ".join(f"{k}={v}" for k, v in RADPO_PARITY.items()))
    g = p.add_argument_group("optimisation")
    g.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate of the LoRA weights")
    g.add_argument("--epochs", type=float, default=1.0, help="passes over the training pairs")
    g.add_argument("--max_steps", type=int, default=0, help="optimizer steps; overrides --epochs when > 0")
    g.add_argument("--batch_size", type=int, default=8, help="pairs per micro-batch")
    g.add_argument("--grad_accum", type=int, default=1, help="micro-batches per optimizer step")
    g.add_argument("--warmup_ratio", type=float, default=0.03, help="linear warm-up, as a share of the steps")
    g.add_argument("--warmup_steps", type=int, default=0, help="linear warm-up steps; overrides --warmup_ratio if > 0")
    g.add_argument("--schedule", default="cosine", choices=("cosine", "linear", "constant"),
                   help="learning-rate decay after the warm-up")
    g.add_argument("--max_grad_norm", type=float, default=1.0, help="gradient clipping")
    g.add_argument("--weight_decay", type=float, default=0.0, help="AdamW weight decay")
    g.add_argument("--chunk_size", type=int, default=256, help="response positions per chunk of vocabulary terms")
    g.add_argument("--seed", type=int, default=42, help="data order, held-out split and LoRA initialisation")
    g.add_argument("--skip_nonfinite", action="store_true",
                   help="skip a batch whose loss or gradient is not finite (counted) instead of stopping the run")
    g = p.add_argument_group("compute")
    g.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
                   help="auto: bf16 autocast on GPUs that have it, fp16 with a gradient scaler on those that do not "
                        "(T4, V100), fp32 on a CPU")
    g.add_argument("--load_in_4bit", action="store_true",
                   help="QLoRA: the base's linear layers in 4-bit nf4, computing in the precision's dtype (needs "
                        "bitsandbytes; on a CPU it runs, slowly: for tests and small checks)")
    g.add_argument("--dtype", default="auto", choices=("auto", *DTYPES),
                   help="the frozen base weights: auto is bf16 on CUDA, fp32 on the CPU (LoRA weights, optimizer and "
                        "the vocabulary projection stay fp32; 16-bit bases keep stage 1 as a frozen adapter)")
    g.add_argument("--gradient_checkpointing", action="store_true", help="recompute activations (non-reentrant)")
    g.add_argument("--deterministic", action="store_true",
                   help="bitwise repeatable runs on a GPU: deterministic kernels only (torch.use_deterministic_"
                        "algorithms, CUBLAS_WORKSPACE_CONFIG=:4096:8); slower. The CPU is deterministic already")
    g = p.add_argument_group("output")
    g.add_argument("--config", default=None,
                   help="a yaml or json file of flag values (keys are flag names), or a previous run's rsa_config.json "
                        "(its args); flags on the command line override it")
    g.add_argument("--report_to", default="none", choices=("none", "tensorboard", "wandb"),
                   help="also log the metrics of metrics.jsonl to TensorBoard (event files under <out>/runs) or "
                        "Weights & Biases (imported only then; WANDB_MODE=offline is respected)")
    g.add_argument("--out", required=True, help="output folder")
    g.add_argument("--overwrite", action="store_true", help="replace a finished run with a different config")
    g.add_argument("--log_every", type=int, default=10, help="steps between log lines / metrics.jsonl records")
    g.add_argument("--save_every", type=int, default=50,
                   help="steps between checkpoints (weights, optimizer, scheduler, RNG, data position); 0: none")
    g.add_argument("--save_total_limit", type=int, default=2,
                   help="complete checkpoints kept (the newest ones; a damaged newest one falls back to the previous)")
    g.add_argument("--resume", action="store_true",
                   help="continue the unfinished run in <out>.tmp from its newest readable checkpoint; an error when "
                        "there is none (a typo in --out does not silently start a new run)")
    g.add_argument("--eval_every", type=int, default=100, help="steps between held-out evaluations")
    return p


def _explicit(argv, name):
    return any(a == f"--{name}" or a.startswith(f"--{name}=") for a in argv)


def config_values(path, parser):
    """Flag values from a yaml/json config file (or a previous run's rsa_config.json, whose "args" are read)."""
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            values = yaml.safe_load(f)  # yaml reads json too
    except OSError as e:
        raise UsageError(f"--config {path}: cannot read ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise UsageError(f"--config {path}: not valid yaml or json ({str(e).splitlines()[0]})") from None
    if isinstance(values, dict) and "stage" in values and isinstance(values.get("args"), dict):
        values = values["args"]  # a finished run's rsa_config.json
    if not isinstance(values, dict):
        raise UsageError(f"--config {path}: expected a mapping of flag names to values")
    dests = {a.dest for a in parser._actions}
    for key in values:
        if key.replace("-", "_") not in dests:
            raise UsageError(f"--config {path}: unknown key {key!r} (not a flag of {parser.prog})")
    return {k.replace("-", "_"): v for k, v in values.items()}


def parse_args(parser, argv=None):
    """Parse with the parity preset and a --config file applied under explicit flags, and refuse flag combinations
    that cannot work."""
    argv = list(sys.argv[1:] if argv is None else argv)
    config = next((argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--config"), None)
    config = config or next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    values = config_values(config, parser) if config else {}
    if "--radpo_parity" in argv or values.get("radpo_parity"):
        parser.set_defaults(**RADPO_PARITY)
    parser.set_defaults(**values)
    for action in parser._actions:  # a flag the config gives is no longer required on the command line
        if action.dest in values:
            action.required = False
    args = parser.parse_args(argv)
    if args.loss == "dpo":
        for name in ("risk_measure", "risk_level", "alpha", "split_vocab", "radpo_parity", "erm_on_rewards"):
            if _explicit(argv, name):
                raise UsageError(f"--{name} has no effect with --loss dpo (DPO has no risk term); drop one of them")
    if args.loss == "ra_dpo1" and _explicit(argv, "alpha"):
        raise UsageError("--alpha weights the risk term of ra_dpo2 only; drop it or use --loss ra_dpo2")
    if args.split_vocab and args.risk_measure != "cvar_radpo":
        raise UsageError("--split_vocab applies to --risk_measure cvar_radpo only")
    if args.erm_on_rewards and args.risk_measure != "erm":
        raise UsageError("--erm_on_rewards applies to --risk_measure erm only")
    try:
        if args.loss != "dpo":
            risk.check_measure(args.risk_measure, args.risk_level)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if args.load_in_4bit:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise UsageError("--load_in_4bit needs bitsandbytes (pip install bitsandbytes)") from None
    if args.precision == "fp16" and not torch.cuda.is_available():
        raise UsageError("--precision fp16 needs a CUDA GPU (use bf16 or fp32 on a CPU)")
    if args.max_prompt_length >= args.max_length:
        raise UsageError(f"--max_prompt_length ({args.max_prompt_length}) must be smaller than --max_length "
                         f"({args.max_length})")
    check_ranges(args, positive=("beta", "lr", "epochs", "batch_size", "grad_accum", "chunk_size", "lora_r",
                                 "lora_alpha", "max_grad_norm", "max_length", "max_prompt_length", "log_every",
                                 "eval_every", "save_total_limit"),
                 non_negative=("alpha", "max_steps", "warmup_steps", "weight_decay", "eval_pairs", "save_every"),
                 fractions=("lora_dropout", "warmup_ratio"))
    return args


def check_ranges(args, positive=(), non_negative=(), fractions=()):
    """One-line errors for numeric flags out of range (every script uses this for its own flags)."""
    for name in positive:
        if getattr(args, name) <= 0:
            raise UsageError(f"--{name} must be positive, got {getattr(args, name)}")
    for name in non_negative:
        if getattr(args, name) < 0:
            raise UsageError(f"--{name} must be 0 or more, got {getattr(args, name)}")
    for name in fractions:
        if not 0 <= getattr(args, name) < 1:
            raise UsageError(f"--{name} must lie in [0, 1), got {getattr(args, name)}")


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """The few values the loss needs (docs/math.md Sec. 4-5); `measure` None means DPO (no risk term)."""

    loss: str = "ra_dpo2"
    measure: str | None = "cvar_radpo"
    level: float | None = 0.95
    beta: float = 0.1
    alpha: float = 0.5
    split_vocab: bool = False
    reduction: str = "mean"
    chunk_size: int = 256

    @classmethod
    def from_args(cls, args):
        level = args.risk_level
        if getattr(args, "erm_on_rewards", False):  # ERM_nu(beta D) = beta ERM_{nu beta}(D)
            level = level * args.beta
        return cls(loss=args.loss, measure=None if args.loss == "dpo" else args.risk_measure, level=level,
                   beta=args.beta, alpha=args.alpha, split_vocab=args.split_vocab, reduction=args.loss_reduction,
                   chunk_size=args.chunk_size)


# ---------------------------------------------------------------------------------------------- 4. one batch


@contextlib.contextmanager
def reference_context(model):
    """The reference: the same weights with the trained adapter off (the SFT model in the reward stage, or a plain
    model that plays pi_r), or, when the model carries a frozen REFERENCE_ADAPTER (the safety stage: stage 1 on the
    SFT base), that adapter alone. In eval mode, so no dropout of any kind (LoRA or attention) touches the
    reference."""
    was_training = model.training
    model.eval()
    try:
        if REFERENCE_ADAPTER in getattr(model, "peft_config", {}):
            active = list(model.base_model.active_adapters)
            model.base_model.set_adapter(REFERENCE_ADAPTER)
            try:
                yield
            finally:
                model.base_model.set_adapter(active)
                freeze_adapter(model, REFERENCE_ADAPTER)  # set_adapter marks the active adapters trainable
        else:
            with model.disable_adapter():
                yield
    finally:
        model.train(was_training)


def reference_head(model, head):
    """The reference's output projection. With LoRA on the head, the frozen base layer, plus the reference adapter's
    own update when the model carries one (the safety stage keeps stage 1's change to the head)."""
    base = getattr(head, "base_layer", None)
    if base is None:
        return head
    if REFERENCE_ADAPTER not in getattr(head, "lora_A", {}):
        return base
    ref = torch.nn.Linear(base.in_features, base.out_features, bias=base.bias is not None,
                          device=base.weight.device, dtype=base.weight.dtype)
    with torch.no_grad():
        ref.weight.copy_(base.weight + head.get_delta_weight(REFERENCE_ADAPTER).to(base.weight.dtype))
        if base.bias is not None:
            ref.bias.copy_(base.bias)
    return ref.requires_grad_(False)


def batch_terms(model, batch, lc):
    """Per-sequence (logratio, kl, risk, logps) for a collated batch (chosen rows first), from one policy forward
    and one reference forward."""
    body, head = backbone_and_head(model)
    ids, attn, resp = batch["input_ids"], batch["attention_mask"], batch["response_mask"]
    hidden = body(input_ids=ids, attention_mask=attn).last_hidden_state
    with torch.no_grad(), reference_context(model):
        ref_hidden = body(input_ids=ids, attention_mask=attn).last_hidden_state
    # position t predicts token t + 1: shift once here, risk.py never shifts
    return risk.sequence_terms(hidden[:, :-1], ref_hidden[:, :-1], head, reference_head(model, head), ids[:, 1:],
                               resp[:, 1:], lc.measure, lc.level, lc.chunk_size, split_vocab=lc.split_vocab,
                               with_logps=True)


def batch_loss(model, batch, lc):
    """The loss of a batch and its metrics (the names TRL users know, plus the Ra-DPO paper's rewards)."""
    logratio, kl, rr, logps = batch_terms(model, batch, lc)
    n = logratio.shape[0] // 2
    w, l = slice(0, n), slice(n, 2 * n)
    losses, cw, cl = risk.preference_loss(logratio[w], logratio[l], None if rr is None else rr[w],
                                          None if rr is None else rr[l], lc.beta, lc.alpha, lc.loss)
    loss = losses.mean() if lc.reduction == "mean" else losses.sum()
    rw, rl = lc.beta * logratio[w].detach(), lc.beta * logratio[l].detach()
    # metrics stay on the device as 0-dim tensors: the loop reads them once per step (one host sync, not 16)
    m = {"loss": loss.detach(),
         "rewards/chosen": rw.mean(), "rewards/rejected": rl.mean(),
         "rewards/margins": (rw - rl).mean(), "rewards/accuracies": (rw > rl).float().mean(),
         "rewards_ra/chosen": cw.mean(), "rewards_ra/rejected": cl.mean(),
         "rewards_ra/margins": (cw - cl).mean(), "rewards_ra/accuracies": (cw > cl).float().mean(),
         "logps/chosen": logps[w].mean(), "logps/rejected": logps[l].mean(),
         "kl/chosen": kl[w].mean(), "kl/rejected": kl[l].mean()}
    if rr is not None:
        m.update({"risk/chosen": rr[w].mean(), "risk/rejected": rr[l].mean(),
                  "risk/margins": (rr[l] - rr[w]).mean()})
    m = {k: v.detach().float() for k, v in m.items()}
    return loss, m


@torch.no_grad()
def evaluate_pairs(model, examples, lc, batch_size, pad_id, device="cpu"):
    """Mean metrics over held-out pairs (weighted by pairs)."""
    was_training = model.training
    model.eval()
    totals, count = {}, 0
    for start in range(0, len(examples), batch_size):
        chunk = examples[start: start + batch_size]
        batch = {k: v.to(device) for k, v in data.collate(chunk, pad_id).items()}
        _, m = batch_loss(model, batch, lc)
        for k, v in m.items():
            totals[k] = totals.get(k, 0.0) + v * len(chunk)
        count += len(chunk)
    model.train(was_training)
    keys = sorted(totals)
    return dict(zip(keys, (torch.stack([totals[k] for k in keys]) / count).tolist()))


def prepare_data(args, tokenizer):
    """Tokenised (train, eval) examples, with every drop counted."""
    try:
        pairs = data.load_pairs(args.data, args.preference, args.schema, args.split, args.data_dir, args.strict,
                                args.data_config)
        if args.eval_data:
            eval_pairs = data.load_pairs(args.eval_data, args.preference, args.schema, args.eval_split,
                                         args.data_dir, args.strict, args.data_config)[: args.eval_pairs]
        else:
            rng = random.Random(args.seed)
            pairs = pairs[:]
            rng.shuffle(pairs)
            n_eval = min(args.eval_pairs, len(pairs) // 10)
            eval_pairs, pairs = pairs[:n_eval], pairs[n_eval:]
            print(f"[data] held out {n_eval} of the training pairs for evaluation (no --eval_data)")
        tok = dict(max_length=args.max_length, max_prompt_length=args.max_prompt_length,
                   prompt_format=args.prompt_format, strict=args.strict)
        train = data.tokenize_pairs(pairs, tokenizer, source=args.data, **tok)
        held = data.tokenize_pairs(eval_pairs, tokenizer, source=args.eval_data or args.data, **tok)
    except data.DataError as e:
        raise UsageError(str(e)) from None
    if not train:
        raise UsageError(f"{args.data}: no training pairs left after filtering")
    return train, held


# ---------------------------------------------------------------------------------------------- 5. the loop


class Runtime:
    """Where and how a run computes: the device (cuda:LOCAL_RANK under torchrun / accelerate launch), mixed precision,
    and the process group. Several processes train through PyTorch's DistributedDataParallel (bucketed gradient
    all-reduce overlapped with the backward), so every rank's step equals one process stepping on the global batch."""

    def __init__(self, precision="auto", deterministic=False):
        if deterministic:  # before any CUDA work: cuBLAS reads the workspace setting when it starts
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        cuda = torch.cuda.is_available()
        self.device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if cuda else "cpu")
        if cuda:
            torch.cuda.set_device(self.device)  # peft, RNG states and NCCL then use this rank's GPU, not GPU 0
        if self.world > 1 and not torch.distributed.is_initialized():
            torch.distributed.init_process_group("nccl" if cuda else "gloo", device_id=self.device if cuda else None)
        precision = resolve_precision(precision, self.device)
        if precision == "fp16" and not cuda:
            raise UsageError("--precision fp16 needs a CUDA GPU (use bf16 or fp32 on a CPU)")
        self.precision = precision
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        self.scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None

    @property
    def main(self):
        return self.rank == 0

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def wrap(self, module):
        """`module` under DistributedDataParallel when there are several processes (itself otherwise)."""
        if self.world == 1:
            return module
        return torch.nn.parallel.DistributedDataParallel(module, device_ids=[self.device] if self.device.type ==
                                                         "cuda" else None, broadcast_buffers=False)

    def all_reduce_mean(self, tensor):
        if self.world > 1:
            torch.distributed.all_reduce(tensor)
            tensor /= self.world
        return tensor

    def gather(self, obj):
        """[obj of rank 0, obj of rank 1, ...] on every rank."""
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out

    def rng_state(self):
        state = {"torch_rng": torch.get_rng_state()}
        if self.device.type == "cuda":
            state["cuda_rng"] = torch.cuda.get_rng_state(self.device)
        return state

    def set_rng_state(self, state):
        torch.set_rng_state(state["torch_rng"])
        if self.device.type == "cuda" and "cuda_rng" in state:
            torch.cuda.set_rng_state(state["cuda_rng"], self.device)

    def barrier(self):
        if self.world > 1:
            torch.distributed.barrier()


class PairLoss(torch.nn.Module):
    """batch_loss as a module, so DistributedDataParallel (which hooks a module's forward) can wrap it."""

    def __init__(self, model, lc):
        super().__init__()
        self.model, self.lc = model, lc

    def forward(self, batch):
        return batch_loss(self.model, batch, self.lc)


def lr_lambda(args, total_steps):
    warmup = args.warmup_steps or (max(1, int(args.warmup_ratio * total_steps)) if args.warmup_ratio > 0 else 0)

    def f(step):
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        if args.schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        if args.schedule == "linear":
            return max(0.0, 1 - progress)
        return 1.0

    return f


def _fsync_write(path, write):
    """Write a file and force it to disk; an OSError names the path."""
    try:
        with open(path, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise OSError(e.errno, e.strerror or str(e), path) from e


def _write_failed(e, work, what):
    """A full disk or a failing write: one line naming the path, and what is still safe to resume from."""
    last = latest_checkpoint(work)
    return UsageError(f"cannot write {what} {e.filename or work} ({e.strerror or e}); "
                      + (f"the last complete checkpoint, {last}, is intact: free space and rerun with --resume"
                         if last else "no complete checkpoint yet: free space and rerun"))


def save_checkpoint(work, step, model, opt, sched, cfg, state, keep=2):
    """checkpoints/step-N: trainable weights (safetensors), optimizer, scheduler, every rank's RNG states and the
    fp16 gradient scaler (weights-only loadable), the run config, and a completeness marker written last, each
    fsynced; then renamed into place. The newest `keep` complete checkpoints are kept (a corrupt newest one then has
    a predecessor to fall back to)."""
    from safetensors.torch import save

    root = os.path.join(work, "checkpoints")
    final = os.path.join(root, f"step-{step:08d}")
    tmp = final + ".tmp"
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        weights = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
        _fsync_write(os.path.join(tmp, "trainable.safetensors"), lambda f: f.write(save(weights)))
        trainer = {"step": step, "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), **state}
        _fsync_write(os.path.join(tmp, "trainer_state.pt"), lambda f: torch.save(trainer, f))
        _fsync_write(os.path.join(tmp, CONFIG_FILE), lambda f: f.write(json.dumps(cfg, indent=1).encode()))
        _fsync_write(os.path.join(tmp, COMPLETE_FILE), lambda f: f.write(b"{}"))
        shutil.rmtree(final, ignore_errors=True)  # an unreadable checkpoint of the same step, fallen back from
        os.replace(tmp, final)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _write_failed(e, work, f"the checkpoint of step {step}:") from None
    for old in complete_checkpoints(work)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def complete_checkpoints(work):
    """The complete checkpoint folders of a work folder, oldest first (ones without their marker are ignored)."""
    root = os.path.join(work, "checkpoints")
    if not os.path.isdir(root):
        return []
    return [os.path.join(root, d) for d in sorted(os.listdir(root))
            if d.startswith("step-") and not d.endswith(".tmp") and os.path.exists(os.path.join(root, d,
                                                                                                COMPLETE_FILE))]


def continue_flags(out):
    """For scripts that drive a stage again after a kill: --resume when <out>.tmp has a checkpoint, --overwrite when
    it was stopped before its first one, nothing when there is no unfinished run."""
    work = out.rstrip("/") + ".tmp"
    if os.path.exists(out) or not os.path.exists(work):
        return []
    return ["--resume"] if latest_checkpoint(work) else ["--overwrite"]


def latest_checkpoint(work):
    """The newest complete checkpoint folder in a work folder, or None."""
    done = complete_checkpoints(work)
    return done[-1] if done else None


def load_checkpoint(path, model, opt, sched, cfg, rt):
    from safetensors.torch import load_file

    with open(os.path.join(path, CONFIG_FILE)) as f:
        if json.load(f) != cfg:
            raise UsageError(f"{path}: the checkpoint was made with a different config; rerun with the same flags "
                             "or pass --overwrite to start over")
    weights = load_file(os.path.join(path, "trainable.safetensors"))
    trainer = torch.load(os.path.join(path, "trainer_state.pt"), map_location="cpu", weights_only=True)
    params = dict(model.named_parameters())
    if set(weights) != {n for n, p in params.items() if p.requires_grad}:
        raise ValueError("its weights are not this model's trainable parameters")
    if len(trainer["rng"]) != rt.world:
        raise UsageError(f"{path}: the checkpoint was made by {len(trainer['rng'])} process(es); resume with as "
                         f"many (this run has {rt.world})")
    with torch.no_grad():
        for n, w in weights.items():
            params[n].copy_(w)
    opt.load_state_dict(trainer["optimizer"])
    sched.load_state_dict(trainer["scheduler"])
    rt.set_rng_state(trainer["rng"][rt.rank])  # each rank its own CPU and CUDA generator
    if rt.scaler is not None and "scaler" in trainer:
        rt.scaler.load_state_dict(trainer["scaler"])
    return trainer


def resume(work, model, opt, sched, cfg, rt):
    """The trainer state of the newest readable checkpoint; an unreadable one (truncated, corrupt) is skipped with a
    note, falling back to the one before."""
    ckpts = complete_checkpoints(work)
    if not ckpts:
        raise UsageError(f"--resume: {work} holds no complete checkpoint to continue from"
                         + ("" if os.path.exists(work) else " (no run was started there)")
                         + "; drop --resume to start a new run (or --overwrite to replace an unfinished one)")
    for ckpt in reversed(ckpts):
        try:
            trainer = load_checkpoint(ckpt, model, opt, sched, cfg, rt)
        except UsageError:
            raise
        except Exception as e:  # a damaged file: any parse error of safetensors or torch.load
            print(f"[train] {ckpt}: unreadable ({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
                  "falling back to the previous checkpoint", flush=True)
            continue
        print(f"[train] resuming from {ckpt} (step {trainer['step']})", flush=True)
        return trainer
    raise UsageError(f"{work}: no readable checkpoint (the newest is {ckpts[-1]}); rerun with --overwrite to start "
                     "over")


def global_batches(n_examples, args, world, rank, start):
    """Micro-batches for this rank from global micro-batch `start` on. The order is a fixed function of the seed
    and the epoch (not of the batch size or the number of processes), so a resumed run sees what an uninterrupted
    one would, and R ranks x B pairs see what one process with R x B pairs would."""
    size = args.batch_size * world
    per_epoch = max(1, n_examples // size)
    m = start
    while True:
        epoch, k = divmod(m, per_epoch)
        order = list(range(n_examples))
        random.Random(args.seed * 100003 + epoch).shuffle(order)
        batch = order[k * size: (k + 1) * size]
        yield batch[rank * args.batch_size: (rank + 1) * args.batch_size]
        m += 1


def start_or_resume(model, opt, sched, args, cfg, rt, work):
    """(first step, skipped batches): from the newest readable checkpoint under --resume (an error when there is
    none), else a fresh work folder. An unfinished run is never silently replaced."""
    if args.resume:
        trainer = resume(work, model, opt, sched, cfg, rt)
        if rt.main:
            with open(os.path.join(work, METRICS_FILE)) as f:  # drop records of steps after the checkpoint
                kept = [line for line in f if json.loads(line)["step"] <= trainer["step"]]
            with open(os.path.join(work, METRICS_FILE), "w") as f:
                f.writelines(kept)
        return trainer["step"] + 1, trainer["skipped"]
    ckpt = latest_checkpoint(work)
    if ckpt and not args.overwrite:
        raise UsageError(f"{work}: holds an unfinished run with a checkpoint at {os.path.basename(ckpt)}; "
                         "pass --resume to continue it or --overwrite to start over")
    rt.barrier()
    if rt.main:
        shutil.rmtree(work, ignore_errors=True)
        os.makedirs(work)
    rt.barrier()
    return 1, 0


def one_update(loss_module, params, opt, sched, micro_batches, args, rt, step):
    """One optimizer step over `grad_accum` micro-batches: (metrics, whether the batch was applied). A non-finite
    loss stops the run (or, with --skip_nonfinite, skips the batch); so does a non-finite gradient, except under fp16,
    where the gradient scaler skips an overflowing step itself and lowers its scale. The learning-rate schedule
    advances only with the optimizer. Metrics are read from the device once, after the backward."""
    t0, tokens, per_micro = time.time(), 0, []
    scale = rt.world if args.loss_reduction == "sum" else 1  # DDP averages gradients over ranks; a sum adds them
    for i, batch in enumerate(micro_batches):
        tokens += int(batch["attention_mask"].sum())  # counted on the CPU, before the copy: no device sync
        batch = {k: v.to(rt.device, non_blocking=True) for k, v in batch.items()}
        # gradients are all-reduced with the last micro-batch's backward only
        sync = loss_module.no_sync() if rt.world > 1 and i < args.grad_accum - 1 else contextlib.nullcontext()
        with sync:
            with rt.autocast():
                loss, m = loss_module(batch)
            loss = loss * (scale / args.grad_accum)
            (rt.scaler.scale(loss) if rt.scaler else loss).backward()
        per_micro.append(m)
    if rt.scaler:
        rt.scaler.unscale_(opt)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
    keys = sorted(per_micro[0])
    values = torch.stack([torch.stack([x[k] for x in per_micro]).mean() for k in keys] + [grad_norm.float()])
    values = rt.all_reduce_mean(values.double()).tolist()  # the one host sync of the step
    m, grad_norm = dict(zip(keys, values[:-1])), values[-1]
    applied = math.isfinite(m["loss"]) and (math.isfinite(grad_norm) or rt.scaler is not None)
    if not applied and not args.skip_nonfinite:
        last = latest_checkpoint(args.out.rstrip("/") + ".tmp")
        raise UsageError(f"non-finite {'loss' if not math.isfinite(m['loss']) else 'gradient'} at step {step}; "
                         + (f"the last good checkpoint is {last}: fix the cause (e.g. a lower --lr) and rerun with "
                            "--resume" if last else "no checkpoint yet (see --save_every)")
                         + "; or pass --skip_nonfinite to skip such batches")
    stepped = applied
    if rt.scaler:
        before = rt.scaler.get_scale()
        if applied:
            rt.scaler.step(opt)  # skips the step itself when the scaled gradients overflowed
        rt.scaler.update()
        stepped = applied and rt.scaler.get_scale() >= before  # a skipped step lowered the scale
        m["loss_scale"] = rt.scaler.get_scale()
    elif applied:
        opt.step()
    if stepped:
        sched.step()
    opt.zero_grad(set_to_none=True)
    m.update({"grad_norm": grad_norm, "lr": sched.get_last_lr()[0],
              "tokens_per_s": tokens * rt.world / (time.time() - t0)})
    if rt.device.type == "cuda":
        m["max_memory_gb"] = torch.cuda.max_memory_allocated(rt.device) / 1024 ** 3
    return m, applied


def publish(adapter, tokenizer, cfg, work, out, summary, dropout=0.0):
    """The final output, atomically: the adapter (one LoRA adapter on the recorded base that stock peft loads), the
    tokenizer, the config and a model card into the work folder, the completeness marker last, then one rename onto
    --out. A failing write leaves the checkpoints in place to resume from."""
    try:
        write_adapter(work, adapter, cfg["base_model"], dropout)
        tokenizer.save_pretrained(work)
        write_model_card(work, cfg, summary.get("final_eval"))
        _fsync_write(os.path.join(work, CONFIG_FILE), lambda f: f.write(json.dumps(cfg, indent=1).encode()))
        _fsync_write(os.path.join(work, COMPLETE_FILE), lambda f: f.write(json.dumps(summary, indent=1).encode()))
    except OSError as e:
        raise _write_failed(e, work, "the final output:") from None
    shutil.rmtree(os.path.join(work, "checkpoints"), ignore_errors=True)
    if os.path.exists(out):
        shutil.rmtree(out)
    os.replace(work, out)


def saved_bytes(model, args, rt):
    """(bytes autograd keeps for backward from the policy pass of one pair, bytes of its final hidden states):
    counted, not assumed. One probe forward of 2 sequences of --max_length tokens in train mode under the run's
    autocast, with saved-tensor hooks that add up each distinct storage that is not a parameter, so LoRA dropout, a
    4-bit base's fp32 residual stream and the attention kernel all show up as they are. Gradient checkpointing is
    off during the probe."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen, total = set(), 0

    def pack(t):
        nonlocal total
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key not in params and key not in seen:
            seen.add(key)
            total += storage.nbytes()
        return t

    body, _ = backbone_and_head(model)
    layers = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False)]
    for m in layers:
        m.gradient_checkpointing = False
    was_training = model.training
    model.train()
    try:
        ids = torch.zeros(2, args.max_length, dtype=torch.long, device=rt.device)
        with rt.autocast(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            hidden = body(input_ids=ids).last_hidden_state
    finally:
        for m in layers:
            m.gradient_checkpointing = True
        model.train(was_training)
    return total, hidden.numel() * hidden.element_size()


def planned_activations(saved, hidden, layers, checkpointing):
    """Activation bytes per pair from the probe's counts. Under --gradient_checkpointing the layers keep only their
    inputs and backward recomputes one layer at a time: one layer's share of the probe plus every layer's input.
    Backward's own working set (the gradients of the layer it is in, before that layer's saved tensors are freed)
    adds about one and a half layers' share: what `python -m bench --memory_plan` measured on top of the saved
    tensors across its configurations (docs/bench/memory_plan.md)."""
    working = 1.5 * saved / layers
    if checkpointing:
        return saved / layers + hidden * layers + working
    return saved + working


def memory_plan(model, args, rt):
    """Print what training will hold (weights, LoRA + AdamW, the measured activations, the risk terms' chunks) against
    the memory this process can use (free on the device plus what it holds already, the model included); on a CUDA
    device that cannot hold it, a one-line error naming the flags that help."""
    gb, device = 1024 ** 3, rt.device
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad) * 16  # fp32 value, grad, Adam m and v
    tokens = 2 * args.batch_size * args.max_length
    activations = args.batch_size * planned_activations(*saved_bytes(model, args, rt), model.config.num_hidden_layers,
                                                        args.gradient_checkpointing)
    chunks = min(args.chunk_size, tokens) * model.config.vocab_size * 4 * 8  # fp32 logits of both models, by-products
    need = weights + trainable + activations + chunks
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_reserved(device)  # the weights are placed
    else:
        with open("/proc/meminfo") as f:
            free = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable")) + weights
    print(f"[memory] weights {weights / gb:.3g} GB, LoRA + AdamW {trainable / gb:.3g} GB, activations "
          f"{activations / gb:.3g} GB (measured: {args.batch_size} pairs x {args.max_length} tokens), risk-term chunks "
          f"~{chunks / gb:.3g} GB: about {need / gb:.3g} GB of {free / gb:.3g} GB on {device}", flush=True)
    if device.type == "cuda" and need > free:
        raise UsageError(f"about {need / gb:.1f} GB needed but {free / gb:.1f} GB available on {device}: try "
                         + ", ".join(f for f, on in (("--load_in_4bit", not args.load_in_4bit),
                                                     ("--gradient_checkpointing", not args.gradient_checkpointing),
                                                     (f"--batch_size {max(1, args.batch_size // 2)} with --grad_accum "
                                                      f"{2 * args.grad_accum}", args.batch_size > 1)) if on))
    return need


class Reporter:
    """metrics.jsonl, and with --report_to the same metrics (as "<split>/<name>") to TensorBoard or wandb."""

    def __init__(self, work, kind, cfg):
        self.file, self.tb, self.wandb = open(os.path.join(work, METRICS_FILE), "a"), None, None
        if kind == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(os.path.join(work, "runs"))
        elif kind == "wandb":
            try:
                import wandb
            except ImportError:
                raise UsageError("--report_to wandb: wandb is not installed (pip install wandb)") from None
            self.wandb = wandb.init(project=os.environ.get("WANDB_PROJECT", "rsa"), config=cfg, dir=work)

    def record(self, step, split, metrics):
        self.file.write(json.dumps({"step": step, "split": split, **metrics}) + "\n")
        self.file.flush()
        if self.tb:
            for k, v in metrics.items():
                self.tb.add_scalar(f"{split}/{k}", v, step)
            self.tb.flush()
        if self.wandb:
            self.wandb.log({f"{split}/{k}": v for k, v in metrics.items()}, step=step)

    def close(self):
        self.file.close()
        if self.tb:
            self.tb.close()
        if self.wandb:
            self.wandb.finish()


def _line(prefix, m):
    return (f"{prefix} loss {m['loss']:.4f}, acc {m['rewards/accuracies']:.3f}, margin {m['rewards/margins']:.4f}, "
            f"kl {m['kl/chosen']:.4f}/{m['kl/rejected']:.4f}")


def train(model, tokenizer, args, cfg, train_examples, eval_examples, rt, adapter=model_adapter):
    """The loop both stages share: AdamW, warm-up then decay, accumulation, clipping, mixed precision, logging,
    held-out evaluation, periodic checkpoints with exact resume, and an atomic final save. `model` is a peft model
    whose reference is given by reference_context; `adapter(model)` gives the LoRA blocks the output holds."""
    out, work, lc, pad = args.out, args.out.rstrip("/") + ".tmp", LossConfig.from_args(args), tokenizer.pad_token_id
    total = args.max_steps or max(1, math.ceil(args.epochs * max(1, len(train_examples) // (args.batch_size * rt.world))
                                               / args.grad_accum))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(args, total))
    if rt.main:
        memory_plan(model, args, rt)
    torch.manual_seed(args.seed)  # after the plan's probe forward (its dropout draws), on every rank alike
    first_step, skipped = start_or_resume(model, opt, sched, args, cfg, rt, work)
    if rt.main:
        print(f"[train] {cfg['stage']} stage: {len(train_examples)} pairs, {total} steps of {args.batch_size} x "
              f"{args.grad_accum} pairs x {rt.world} process(es); loss {lc.loss}"
              + ("" if lc.measure is None else f" ({lc.measure}, level {args.risk_level})")
              + f", beta {lc.beta}; {rt.precision} on {rt.device}", flush=True)
    log = Reporter(work, args.report_to, cfg) if rt.main else None

    def run_eval(step):
        result = None
        if rt.main and eval_examples:
            with rt.autocast():
                result = evaluate_pairs(model, eval_examples, lc, args.batch_size, pad, rt.device)
            log.record(step, "eval", result)
            tqdm.write(_line(f"[eval] step {step}:", result), file=sys.stdout)
        rt.barrier()
        return result

    final_eval = run_eval(0) if first_step == 1 else None
    model.train()
    loss_module = rt.wrap(PairLoss(model, lc))
    stream = global_batches(len(train_examples), args, rt.world, rt.rank, (first_step - 1) * args.grad_accum)
    window, start = [], time.time()
    bar = tqdm(range(first_step, total + 1), desc=f"{cfg['stage']} stage", file=sys.stdout, mininterval=1,
               disable=not rt.main, initial=first_step - 1, total=total)
    for step in bar:
        micro = (data.collate([train_examples[i] for i in next(stream)], pad) for _ in range(args.grad_accum))
        m, applied = one_update(loss_module, params, opt, sched, micro, args, rt, step)
        if not applied:
            skipped += 1
            tqdm.write(f"[train] step {step}: non-finite loss or gradient; batch skipped ({skipped} so far)",
                       file=sys.stdout)
        window.append(m)
        bar.set_postfix(loss=f"{m['loss']:.4f}", acc=f"{m['rewards/accuracies']:.2f}", refresh=False)
        if rt.main and (step % args.log_every == 0 or step == total):
            avg = {k: sum(x[k] for x in window) / len(window) for k in window[0]}
            log.record(step, "train", avg)
            tqdm.write(_line(f"[train] step {step}/{total}:", avg) + f", grad {avg['grad_norm']:.3f}, lr "
                       f"{avg['lr']:.2e}, {avg['tokens_per_s']:.0f} tok/s", file=sys.stdout)
            window = []
        if step % args.eval_every == 0 and step != total:
            run_eval(step)
        if args.save_every and step % args.save_every == 0 and step != total:
            state = {"skipped": skipped, "rng": rt.gather(rt.rng_state())}
            if rt.scaler is not None:
                state["scaler"] = rt.scaler.state_dict()
            if rt.main:
                save_checkpoint(work, step, model, opt, sched, cfg, state, args.save_total_limit)
            rt.barrier()
    bar.close()
    final_eval = run_eval(total) or final_eval
    if rt.main:
        log.close()
        publish(adapter(model), tokenizer, cfg, work, out, {"steps": total, "seconds": round(time.time() - start, 1),
                                                            "nonfinite_skipped": skipped, "final_eval": final_eval},
                args.lora_dropout)
        print(f"[train] saved {cfg['stage']} stage to {out}" + (f" ({skipped} non-finite batches skipped)"
                                                               if skipped else ""), flush=True)
    rt.barrier()
    return final_eval
