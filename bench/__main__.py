"""Speed and memory of the token-level risk terms and of a training step (not run in CI).

    python -m bench                 # about 8 minutes on 2 idle CPU cores; writes docs/bench/bench.json and bench.md
    python -m bench --quick         # smaller shapes, for a quick look
    python -m bench --profile       # which operators take a training step's time, per loss: docs/bench/profile.md
    python -m bench --memory_plan   # the stages' memory plan against the measured peak: docs/bench/memory_plan.md

Every time is a ratio against a baseline measured in the same process (one warm-up, then the median of
--repeats); every peak memory comes from a subprocess of its own per configuration (a process's peak RSS never goes
down), reported as the growth of peak RSS over the RSS once the inputs exist, with glibc told to return every
freed block of 64 KiB or more (see memory()).

1. Risk terms at (N, T, V) = (16, 256, 32000), fp32, forward + backward, starting from final hidden states and an
   output projection, through risk.sequence_terms with each measure against measure=None, whose gradient is DPO's
   log-ratio alone (as in training, the KL is computed but not differentiated): the fused chunks
   (closed-form gradient) and the checkpointed autograd chunks, and a transcription of the Ra-DPO authors' code
   (full tensors, torch.quantile).
2. A training step of our loop (LoRA r 16, all linear layers) on a randomly initialised ~10M-parameter Llama with a
   32000 vocabulary, 8 pairs x 256 tokens: dpo against ra_dpo2 with each measure.
3. The same step through TRL's DPOTrainer (loss "sigmoid"), when trl is installed; it is not a requirement:
   `pip install trl -c requirements.txt` keeps the pinned torch and transformers.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

import risk
from outputs import HelpFormatter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HIDDEN = 256


def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_mb():
    """VmHWM: this process's peak RSS since its exec (getrusage's ru_maxrss can carry the parent's peak over a fork,
    which made every subprocess report at least the benchmark driver's size)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


# ---------------------------------------------------------------------------------------------- 1. risk terms


def authors_transcription(policy_logits, reference_logits, mask, level):
    """The Ra-DPO code's _radpo_get_batch_logps / _calculate_cvar (no split), on full (N, T, V) tensors."""
    logps = policy_logits.float().log_softmax(-1)
    ref_ps = reference_logits.float().softmax(-1)
    ref_logps = ref_ps.log()
    d = ref_logps - logps
    var = torch.quantile(d, 1 - level, dim=-1).unsqueeze(-1)
    cvar = (ref_ps * d * (d > var).float()).sum(-1)
    return (cvar * mask).sum(-1)


def risk_inputs(n, t, v):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, t, HIDDEN, generator=g)
    ref_hidden = torch.randn(n, t, HIDDEN, generator=g)
    head = torch.nn.Linear(HIDDEN, v, bias=False)
    ref_head = torch.nn.Linear(HIDDEN, v, bias=False)
    labels = torch.randint(0, v, (n, t), generator=g)
    mask = torch.ones(n, t, dtype=torch.bool)
    mask[:, : t // 4] = False  # a prompt
    return hidden, ref_hidden, head, ref_head, labels, mask


MEASURES = ["none", "expectation", "erm", "cvar_radpo", "cvar"]
RISK_CONFIGS = [f"{path}/{m}" for path in ("fused", "autograd") for m in MEASURES] + ["authors/cvar_radpo"]
LEVELS = {"none": None, "expectation": None, "cvar_radpo": 0.95, "cvar": 0.25, "erm": 1.0}


class AutogradHead(torch.nn.Linear):
    """The same projection, which sequence_terms does not treat as a plain Linear: its chunks take the checkpointed
    autograd path (the path before the closed-form gradient, and the one LoRA on the head still takes)."""


def risk_step(config, inputs):
    hidden, ref_hidden, head, ref_head, labels, mask = inputs
    h = hidden.detach().requires_grad_(True)
    path, measure = config.split("/")
    if path == "authors":
        with torch.no_grad():
            ref_logits = ref_head(ref_hidden)
        out = authors_transcription(head(h), ref_logits, mask, 0.95)
    else:
        if path == "autograd":
            head.__class__ = ref_head.__class__ = AutogradHead
        try:
            res = risk.sequence_terms(h, ref_hidden, head, ref_head, labels, mask,
                                      None if measure == "none" else measure, LEVELS[measure], chunk_size=256)
        finally:
            head.__class__ = ref_head.__class__ = torch.nn.Linear
        # what a training loss differentiates: the log-ratio (DPO's only term) and the risk term; the KL is only logged
        out = res[0] + (res[2] if res[2] is not None else 0)
    out.sum().backward()
    head.weight.grad = None


# ---------------------------------------------------------------------------------------------- 2. training step


STEP_CONFIGS = ["dpo", "ra_dpo2/expectation", "ra_dpo2/cvar_radpo", "ra_dpo2/cvar", "ra_dpo2/erm"]
# the cost each term may add over DPO's (time ratios)
TARGETS = {"fused/expectation": 1.2, "fused/erm": 1.3, "fused/cvar_radpo": 1.4, "fused/cvar": 1.6,
           "ra_dpo2/expectation": 1.2, "ra_dpo2/erm": 1.2, "ra_dpo2/cvar_radpo": 1.2, "ra_dpo2/cvar": 1.7}
# the stages' default LoRA (the flags stage.add_lora reads)
LORA = argparse.Namespace(seed=42, lora_r=16, lora_alpha=32.0, lora_dropout=0.05, lora_target_modules="all-linear",
                          load_in_4bit=False, gradient_checkpointing=False)


def step_setup(pairs, length):
    from transformers import LlamaConfig, LlamaForCausalLM

    import stage

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32000, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=4, intermediate_size=344, max_position_embeddings=length,
                         tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    model = stage.add_lora(model, LORA)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 32000, (2 * pairs, length), generator=g)
    resp = torch.zeros_like(ids, dtype=torch.bool)
    resp[:, length // 4:] = True
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "response_mask": resp}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    return model, batch, opt, n_params


def train_step(config, setup):
    import stage
    import train_reward_stage

    model, batch, opt, _ = setup
    loss_name, _, measure = config.partition("/")
    loss_config = stage.LossConfig(loss=loss_name, measure=measure or None,
                          level={"cvar_radpo": 0.95, "cvar": 0.25, "erm": 2.0}.get(measure))
    loss, _ = stage.batch_loss(model, batch, loss_config, train_reward_stage.AdapterOff())
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


# ---------------------------------------------------------------------------------------------- 3. TRL


def trl_setup(pairs, length):
    """TRL's DPOTrainer (loss "sigmoid", the same base model, LoRA and batch as step_setup; reference = adapter off).
    The batch is the same token ids, collated by TRL's own collator."""
    import tempfile

    from datasets import Dataset
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from trl import DPOConfig, DPOTrainer

    import stage

    model, batch, _, n_params = step_setup(pairs, length)
    base = model.unload()  # TRL adds the same LoRA itself
    vocab = {"<eos>": 0, "<pad>": 1, **{chr(97 + i): 2 + i for i in range(26)}}  # any tokenizer: the ids are given
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>")
    cfg = DPOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=pairs, max_length=length, beta=0.1,
                    loss_type=["sigmoid"], learning_rate=1e-4, use_cpu=True, report_to=[], save_strategy="no",
                    gradient_checkpointing=False, bf16=False, fp16=False, dataloader_num_workers=0)
    text = Dataset.from_list([{"prompt": "a", "chosen": " b", "rejected": " c"}] * pairs)
    trainer = DPOTrainer(model=base, args=cfg, train_dataset=text, processing_class=tokenizer,
                         peft_config=stage.lora_config(LORA))
    n, start = pairs, length // 4
    ids = batch["input_ids"]
    examples = [{"prompt_ids": ids[i, :start].tolist(), "chosen_ids": ids[i, start:].tolist(),
                 "rejected_ids": ids[n + i, start:].tolist()} for i in range(n)]
    trl_batch = trainer.data_collator(examples)
    trainer.create_optimizer()
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train(), which is not used here
    trainer.model.train()
    return trainer, trl_batch, n_params


def trl_step(setup):
    trainer, batch, _ = setup
    trainer.training_step(trainer.model, batch)
    trainer.optimizer.step()
    trainer.optimizer.zero_grad(set_to_none=True)


# ---------------------------------------------------------------------------------------------- driver


def timed(fn, repeats):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def interleaved(fns, repeats):
    """Median seconds of each function, the repeats interleaved (A B C A B C ...) after one warm-up of each, so a
    machine that slows down or speeds up affects every configuration alike."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


# ---------------------------------------------------------------------------------------------- 4. memory plan

PLAN_CONFIGS = ["fp32", "bf16", "4bit", "fp32+gc"]  # base weights and compute; gc: --gradient_checkpointing
PLAN_SIZES = [(256, 4), (512, 8)]  # (hidden, layers) of a random Llama, vocabulary 8192
PLAN_BATCH = dict(batch_size=4, max_length=256)


def plan_run(config, hidden, layers, folder):
    """Load the saved random model as a stage loads its base (this config's dtype, 4-bit, checkpointing), print
    the stage's memory plan, then train 2 steps: (plan bytes, peak RSS growth in bytes over the RSS before loading).
    The peak is reset after the plan (clear_refs), so it is the training's own, weights included."""
    import bitsandbytes  # noqa: F401  # every import a stage makes, before the baseline: libraries are not the plan's
    import peft  # noqa: F401
    from transformers import AutoModelForCausalLM, LlamaForCausalLM  # noqa: F401

    import stage
    import train_reward_stage

    before = rss_mb()
    args = argparse.Namespace(**vars(LORA), **PLAN_BATCH, chunk_size=256, grad_accum=1, loss_reduction="mean",
                              max_grad_norm=1.0, skip_nonfinite=False, out=os.devnull)
    args.load_in_4bit, args.gradient_checkpointing = config == "4bit", config.endswith("+gc")
    runtime = stage.Runtime("bf16" if config in ("bf16", "4bit") else "fp32")
    dtype = torch.bfloat16 if config == "bf16" else torch.float32
    model = stage.load_base_model(os.path.join(folder, f"h{hidden}l{layers}"), load_in_4bit=args.load_in_4bit,
                                  dtype=dtype, fp32_head=True, compute_dtype=runtime.dtype or torch.float32)
    model = stage.add_lora(model, args)
    plan = stage.memory_plan(model, args, runtime)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 8192, (2 * args.batch_size, args.max_length), generator=g)
    resp = torch.zeros_like(ids, dtype=torch.bool)
    resp[:, args.max_length // 4:] = True
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "response_mask": resp}
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    # ra_dpo2, cvar_radpo: the stages' default loss
    module = stage.PairLoss(model, stage.LossConfig(), train_reward_stage.AdapterOff())
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the peak RSS restarts from here: the plan's probe and the load's transients are not counted
    for step in (1, 2):  # the second step holds AdamW's state too
        stage.one_update(module, params, opt, sched, [batch], args, runtime, step)
    return plan, (peak_mb() - before) * 2**20


LLAMA_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
                num_key_value_heads=32, tie_word_embeddings=False, max_position_embeddings=512)


def recipe_counts(config, layers, folder):
    """For LLaMA-7B's shape cut to `layers` layers: (weights, LoRA + AdamW, saved bytes per pair, hidden bytes per
    pair), as a stage holds them at 512 tokens (bf16 base or 4-bit, bf16 autocast, fp32 head)."""
    import stage

    args = argparse.Namespace(**vars(LORA), max_length=512)
    args.load_in_4bit = config == "4bit"
    runtime = stage.Runtime("bf16")
    model = stage.load_base_model(os.path.join(folder, f"l{layers}"), load_in_4bit=args.load_in_4bit,
                                  dtype=torch.bfloat16, fp32_head=True, compute_dtype=torch.bfloat16)
    model = stage.add_lora(model, args)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad) * 16
    return [weights, trainable, *stage.saved_bytes(model, args, runtime)]


def recipes_7b():
    """The plan of the 7B recipes (bf16 and QLoRA, with and without gradient checkpointing) at 512 tokens, and the
    largest batch of pairs it fits in 24, 48 and 80 GB: the counts of 1- and 2-layer models of LLaMA-7B's shape,
    extended to 32 layers (every layer is alike)."""
    import tempfile

    from transformers import LlamaConfig, LlamaForCausalLM

    import stage

    gb, rows = 1024 ** 3, []
    with tempfile.TemporaryDirectory() as folder:
        for layers in (1, 2):
            torch.manual_seed(0)
            LlamaForCausalLM(LlamaConfig(num_hidden_layers=layers, **LLAMA_7B)).to(torch.bfloat16).save_pretrained(
                os.path.join(folder, f"l{layers}"))
        for config in ("bf16", "4bit"):
            one_layer, two_layers = (memory("recipe", config, (n,), extra=["--folder", folder])["counts"]
                                     for n in (1, 2))
            weights, trainable, saved = (a + 31 * (b - a) for a, b in zip(one_layer[:3], two_layers[:3]))
            for gc in (False, True):
                per_pair = stage.planned_activations(saved, one_layer[3], 32, gc)
                fixed = weights + trainable + 256 * 32000 * 4 * 8  # the risk terms' chunks
                fits = {budget: max(0, int((budget * gb - fixed) // per_pair)) for budget in (24, 48, 80)}
                rows.append({"recipe": ("QLoRA (4-bit)" if config == "4bit" else "bf16 base") +
                             (" + gradient checkpointing" if gc else ""), "fixed_gb": fixed / gb,
                             "per_pair_gb": per_pair / gb, "fits": fits})
    return rows


def memory_plan_table(args):
    """Each configuration and size in a process of its own: the plan, the measured peak, their ratio."""
    import tempfile

    from transformers import LlamaConfig, LlamaForCausalLM

    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for hidden, layers in PLAN_SIZES:
            torch.manual_seed(0)
            LlamaForCausalLM(LlamaConfig(vocab_size=8192, hidden_size=hidden, num_hidden_layers=layers,
                                         num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64,
                                         intermediate_size=int(hidden * 2.6875), tie_word_embeddings=False,
                                         max_position_embeddings=512)).save_pretrained(
                os.path.join(folder, f"h{hidden}l{layers}"))
            for config in PLAN_CONFIGS:
                r = memory("plan", config, (hidden, layers), extra=["--folder", folder])
                rows.append({"config": config, "hidden": hidden, "layers": layers, **r,
                             "ratio": r["peak_bytes"] / r["plan_bytes"]})
                print(f"[bench] memory plan {config} h{hidden} l{layers}: plan {r['plan_bytes'] / 2**20:.0f} MB, "
                      f"peak {r['peak_bytes'] / 2**20:.0f} MB, peak / plan {rows[-1]['ratio']:.2f}", flush=True)
    from demo import readme_table as readme

    b = PLAN_BATCH
    lines = [f"Command: `python -m bench --memory_plan` ({os.cpu_count()} CPU threads, torch {torch.__version__}), at "
             f"commit {readme.commit()}.", "",
             f"The stages' memory plan (stage.memory_plan: weights, LoRA + AdamW, activations measured by a probe "
             f"forward, the risk terms' chunks) against the peak RSS growth of 2 training steps (ra_dpo2, "
             f"cvar_radpo), {b['batch_size']} pairs x {b['max_length']} tokens, random Llama, vocabulary 8192, LoRA "
             "r 16 on all linear layers, each run in a process of its own (glibc returning freed blocks; the peak "
             "counted from before the model loads, reset after the plan's probe):", "",
             "| base | hidden x layers | plan (MB) | measured peak (MB) | peak / plan |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['config']} | {r['hidden']} x {r['layers']} | {r['plan_bytes'] / 2**20:.0f} | "
                     f"{r['peak_bytes'] / 2**20:.0f} | {r['ratio']:.2f} |")
    recipes = recipes_7b()
    lines += ["", "The plan for LLaMA-7B (hidden 4096, 32 layers, vocabulary 32000) at 512 tokens per sequence, LoRA "
              "r 16 on all linear layers, bf16 autocast: weights, LoRA + AdamW and the chunks (fixed), the "
              "activations of one pair, and the largest --batch_size whose plan fits the memory (probe counts of "
              "1- and 2-layer models of that shape on this CPU, extended to 32 layers; on a GPU the attention "
              "kernel may differ):", "",
              "| recipe | fixed (GB) | per pair (GB) | batch in 24 GB | in 48 GB | in 80 GB |",
              "|---|---|---|---|---|---|"]
    for r in recipes:
        lines.append(f"| {r['recipe']} | {r['fixed_gb']:.1f} | {r['per_pair_gb']:.2f} | {r['fits'][24]} | "
                     f"{r['fits'][48]} | {r['fits'][80]} |")
    text = "\n".join(lines) + "\n"
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "memory_plan.md"), "w") as f:
        f.write(text)
    print(text)
    return rows


def one(kind, config, shape, folder=None):
    """Run one configuration once in this (fresh) process and report its memory."""
    if kind == "recipe":
        print(json.dumps({"counts": recipe_counts(config, shape[0], folder)}))
        return
    if kind == "plan":
        plan, peak = plan_run(config, *shape, folder)
        print(json.dumps({"plan_bytes": plan, "peak_bytes": peak}))
        return
    if kind == "risk":
        inputs = risk_inputs(*shape)
        before = rss_mb()
        risk_step(config, inputs)
    elif kind == "trl":
        setup = trl_setup(*shape)
        before = rss_mb()
        trl_step(setup)
    else:
        setup = step_setup(*shape)
        before = rss_mb()
        train_step(config, setup)
    print(json.dumps({"rss_before_mb": before, "peak_mb": peak_mb(), "growth_mb": peak_mb() - before}))


def memory(kind, config, shape, extra=()):
    """Peak RSS growth of one configuration in a process of its own. glibc's malloc keeps freed memory for reuse
    (how much depends on the order of earlier allocations), which moved these peaks by hundreds of MB between runs;
    MALLOC_MMAP_THRESHOLD_=65536 maps every allocation of 64 KiB or more on its own and unmaps it when freed, so the
    peak RSS is the peak of live tensors (plus small allocations), the same to about 1 MB from run to run."""
    out = subprocess.run([sys.executable, "-m", "bench", "--one", kind, config, "--shape", *map(str, shape), *extra],
                         capture_output=True, text=True, check=True, cwd=ROOT,
                         env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"})
    return json.loads(out.stdout.strip().splitlines()[-1])


def profile_steps(setup, configs, steps=3, rows=20):
    """The operators that take the time of a training step, per loss: self CPU milliseconds per step from
    torch.profiler, averaged over `steps` steps after a warm-up; the `rows` largest, as a markdown table."""
    from torch.profiler import ProfilerActivity, profile

    per_step = {}
    for config in configs:
        train_step(config, setup)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                train_step(config, setup)
        per_step[config] = {e.key: e.self_cpu_time_total / 1e3 / steps for e in prof.key_averages()}
    ops = sorted(set().union(*per_step.values()), key=lambda op: -max(t.get(op, 0.0) for t in per_step.values()))
    lines = ["| operator (ms per step) | " + " | ".join(configs) + " |", "|---" * (len(configs) + 1) + "|"]
    for op in ops[:rows]:
        lines.append(f"| {op} | " + " | ".join(f"{per_step[c].get(op, 0.0):.0f}" for c in configs) + " |")
    lines.append("| all operators | " + " | ".join(f"{sum(per_step[c].values()):.0f}" for c in configs) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--quick", action="store_true", help="(4, 128, 32000) risk terms, 2 pairs x 128 tokens")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats (median) after a warm-up")
    p.add_argument("--out", default="docs/bench", help="where bench.json and bench.md (or profile.md) go")
    p.add_argument("--profile", action="store_true",
                   help="instead: which operators take a training step's time, per loss (torch.profiler), into "
                        "profile.md")
    p.add_argument("--memory_plan", action="store_true",
                   help="instead: the stages' memory plan against the measured peak for fp32, bf16, 4-bit and "
                        "gradient-checkpointing runs at two sizes, into memory_plan.md")
    p.add_argument("--one", nargs=2, help=argparse.SUPPRESS)
    p.add_argument("--shape", nargs="+", type=int, help=argparse.SUPPRESS)
    p.add_argument("--folder", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    if args.one:
        one(args.one[0], args.one[1], args.shape, args.folder)
        return 0
    if args.memory_plan:
        memory_plan_table(args)
        return 0
    risk_shape = (4, 128, 32000) if args.quick else (16, 256, 32000)
    step_shape = (2, 128) if args.quick else (8, 256)
    os.makedirs(args.out, exist_ok=True)
    if args.profile:
        from demo import readme_table as readme

        pairs, tokens = step_shape
        text = (f"Command: `python -m bench --profile{' --quick' if args.quick else ''}` ({os.cpu_count()} CPU "
                f"threads, torch {torch.__version__}), at commit {readme.commit()}. One training step of the "
                f"benchmark's model, {pairs} pairs x {tokens} tokens, per loss: self CPU time of the largest "
                "operators, mean of "
                "3 steps after a warm-up.\n\n" + profile_steps(step_setup(*step_shape), STEP_CONFIGS))
        with open(os.path.join(args.out, "profile.md"), "w") as f:
            f.write(text)
        print(text)
        return 0
    results = {"machine": f"{os.cpu_count()} CPU threads, torch {torch.__version__}", "risk_shape": risk_shape,
               "step_shape": {"pairs": step_shape[0], "tokens": step_shape[1]}, "risk": {}, "step": {}}
    inputs = risk_inputs(*risk_shape)
    times = interleaved({c: (lambda c=c: risk_step(c, inputs)) for c in RISK_CONFIGS}, args.repeats)
    for config in RISK_CONFIGS:
        results["risk"][config] = {"seconds": times[config], **memory("risk", config, risk_shape)}
        print(f"[bench] risk {config}: {times[config]:.2f} s, peak growth "
              f"{results['risk'][config]['growth_mb']:.0f} MB", flush=True)
    setup = step_setup(*step_shape)
    results["step"]["parameters"] = setup[3]
    times = interleaved({c: (lambda c=c: train_step(c, setup)) for c in STEP_CONFIGS}, args.repeats)
    for config in STEP_CONFIGS:
        results["step"][config] = {"seconds": times[config], **memory("step", config, step_shape)}
        print(f"[bench] step {config}: {times[config]:.2f} s, peak growth "
              f"{results['step'][config]['growth_mb']:.0f} MB", flush=True)
    try:
        import trl
    except ImportError:
        print("[bench] trl is not installed (pip install trl -c requirements.txt); skipping the TRL comparison")
    else:
        setup = trl_setup(*step_shape)
        sec = timed(lambda: trl_step(setup), args.repeats)
        del setup
        results["trl"] = {"version": trl.__version__, "seconds": sec, **memory("trl", "dpo", step_shape)}
        print(f"[bench] TRL {trl.__version__} DPOTrainer step: {sec:.2f} s, peak growth "
              f"{results['trl']['growth_mb']:.0f} MB", flush=True)
    with open(os.path.join(args.out, "bench.json"), "w") as f:
        json.dump(results, f, indent=1)
    text = report(results, args)
    with open(os.path.join(args.out, "bench.md"), "w") as f:
        f.write(text)
    print(text)
    return 0


def report(results, args):
    n, t, v = results["risk_shape"]
    from demo import readme_table as readme

    lines = [f"Command: `python -m bench{' --quick' if args.quick else ''}` ({results['machine']}), at commit "
             f"{readme.commit()}.", "",
             f"Risk terms through risk.sequence_terms, (N, T, V) = ({n}, {t}, {v}), fp32, forward + backward from "
             f"hidden states (H = {HIDDEN}), chunks of 256 positions; ratios against measure=None (DPO's "
             "log-ratio alone, the one term DPO's loss differentiates) on the same path. fused: the closed-form "
             "gradient (the training path); autograd: the checkpointed chunks it replaced (still used with LoRA on "
             "the head); authors: their full-tensor transcription with torch.quantile. Peak RSS growth per "
             "configuration in its own process (glibc returning every freed block of 64 KiB or more, so the peak is "
             "that of live tensors):", "",
             "| configuration | time (s) | time / none | peak growth (MB) | memory / none |",
             "|---|---|---|---|---|"]
    for config, r in results["risk"].items():
        base = results["risk"][f"{'autograd' if config.startswith('autograd') else 'fused'}/none"]
        lines.append(f"| {config} | {r['seconds']:.2f} | {r['seconds'] / base['seconds']:.2f} | "
                     f"{r['growth_mb']:.0f} | {r['growth_mb'] / base['growth_mb']:.2f} |")
    dpo = results["step"]["dpo"]
    s = results["step_shape"]
    lines += ["", f"Training step, random Llama ({results['step']['parameters'] / 1e6:.1f}M parameters, vocabulary "
              f"32000), LoRA r 16, {s['pairs']} pairs x {s['tokens']} tokens; ratios against dpo:", "",
              "| loss | time (s) | time / dpo | peak growth (MB) | memory / dpo |", "|---|---|---|---|---|"]
    for config in STEP_CONFIGS:
        r = results["step"][config]
        lines.append(f"| {config} | {r['seconds']:.2f} | {r['seconds'] / dpo['seconds']:.2f} | "
                     f"{r['growth_mb']:.0f} | {r['growth_mb'] / dpo['growth_mb']:.2f} |")
    if "trl" in results:
        r = results["trl"]
        lines += ["", f"The same model, LoRA and batch through TRL {r['version']}'s DPOTrainer (loss sigmoid; its "
                  "training_step and optimizer step on the batch its collator makes from the same token ids):", "",
                  "| step | time (s) | ours / TRL | peak growth (MB) | ours / TRL |", "|---|---|---|---|---|",
                  f"| TRL DPOTrainer | {r['seconds']:.2f} | | {r['growth_mb']:.0f} | |",
                  f"| ours, dpo | {dpo['seconds']:.2f} | {dpo['seconds'] / r['seconds']:.2f} | "
                  f"{dpo['growth_mb']:.0f} | "
                  f"{dpo['growth_mb'] / r['growth_mb']:.2f} |"]
    lines += ["", "Against the targets (time over DPO's: the risk terms over fused/none, the step over dpo):", "",
              "| target | measured | verdict |", "|---|---|---|"]
    for config, most in TARGETS.items():
        table, base = (results["risk"], results["risk"]["fused/none"]) if config.startswith("fused") else \
            (results["step"], dpo)
        ratio = table[config]["seconds"] / base["seconds"]
        lines.append(f"| {config} <= {most}x | {ratio:.2f} | {'met' if ratio <= most else 'missed'} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
