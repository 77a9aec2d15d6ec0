"""make smoke-gpu: what one CUDA GPU does with the pipeline, with nothing downloaded (prepared to finish inside 8
minutes on one GPU; its CPU check, `--cpu_check`, takes 2 minutes here; not yet run on a GPU).

    python -m bench.smoke_gpu --out runs/smoke-gpu     # writes report.md and report.json there

1. The toy pipeline (reward stage, safety stage, RSA(P), evaluation) through the real scripts, in bf16 and with
   --load_in_4bit: finished or not, with the error's last line if not.
2. A randomly initialised ~1B-parameter Llama built from a config (vocabularies 32,000 and 128,256) in bf16 with
   the stages' default LoRA: tokens/s of a training step (8 pairs x 512 tokens) for DPO and each risk measure of
   Ra-DPO_2, each as a ratio to DPO's, and the peak GPU memory against the stages' memory plan.
3. Two identical reward-stage runs under --deterministic: bitwise equal adapters or not.

The GPU's name, the driver and the versions go into the report. Without CUDA it stops with one line.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOSSES = ["dpo", "ra_dpo2/expectation", "ra_dpo2/cvar_radpo", "ra_dpo2/cvar", "ra_dpo2/erm"]
LEVELS = {"cvar_radpo": 0.95, "cvar": 0.25, "erm": 2.0}


def run(argv, log):
    """A script of the pipeline as a user runs it: (ok, last line of its error)."""
    with open(log, "w") as f:
        done = subprocess.run([sys.executable, *argv], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    with open(log) as f:
        lines = [line.strip() for line in f if line.strip()]
    return done.returncode == 0, "" if done.returncode == 0 else (lines[-1] if lines else f"exit {done.returncode}")


def toy_pipeline(out, world, mode, steps):
    folder = os.path.join(out, "toy", mode)
    os.makedirs(folder, exist_ok=True)
    flags = ["--max_length", "64", "--max_prompt_length", "32", "--batch_size", "16", "--lr", "5e-3", "--lora_r", "8",
             "--max_steps", str(steps), "--eval_every", str(steps), "--save_every", str(steps // 2),
             "--log_every", "5", *(["--load_in_4bit"] if mode == "4bit" else [])]
    data = ["--data", os.path.join(world, "train.jsonl"), "--eval_data", os.path.join(world, "test.jsonl")]
    r, s, mix = (os.path.join(folder, n) for n in ("reward", "safety", "mix"))
    steps_run = [
        ("reward stage", ["train_reward_stage.py", "--sft", os.path.join(world, "sft"), *data, "--out", r, *flags]),
        ("safety stage", ["train_safety_stage.py", "--reward_stage", r, *data, "--out", s, *flags]),
        ("RSA(P)", ["merge_policies.py", "--first", r, "--second", s, "--q", "0.5", "--out", mix]),
        ("evaluation", ["evaluate.py", "--policies", os.path.join(world, "sft"), r, s, os.path.join(mix, "q0.5"),
                        "--prompts", world, "--scorer", "toy", "--num_samples", "4", "--max_new_tokens", "24",
                        "--no_plots", "--out", os.path.join(folder, "eval")])]
    rows = []
    for name, argv in steps_run:
        t0 = time.time()
        ok, err = run(argv, os.path.join(folder, name.split()[0].lower().replace("(", "").replace(")", "") + ".log"))
        row = {"mode": mode, "step": name, "ok": ok, "seconds": round(time.time() - t0, 1), "error": err}
        if ok and name.endswith("stage"):
            stage_out = r if name.startswith("reward") else s
            done = json.load(open(os.path.join(stage_out, "complete.json")))
            records = [json.loads(line) for line in open(os.path.join(stage_out, "metrics.jsonl"))]
            last = [rec for rec in records if rec["split"] == "train"][-1]
            row.update(tokens_per_s=round(last["tokens_per_s"]), peak_gb=round(last.get("max_memory_gb", math.nan), 3),
                       accuracy=done["final_eval"]["rewards/accuracies"])
        rows.append(row)
        if not ok:
            break
    return rows


def big_model(vocab, device, size):
    """A ~1B Llama (TinyLlama's shape) from a config, random weights, bf16, with the stages' default LoRA."""
    from transformers import LlamaConfig, LlamaForCausalLM

    import stage

    shape = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                 num_key_value_heads=4) if size == "1b" else dict(hidden_size=64, intermediate_size=128,
                                                                   num_hidden_layers=2, num_attention_heads=4,
                                                                   num_key_value_heads=2)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, max_position_embeddings=2048, tie_word_embeddings=False, **shape)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.get_output_embeddings().float()  # the stages keep the head fp32 under a 16-bit base
    model.config.use_cache = False
    n = sum(p.numel() for p in model.parameters())
    args = argparse.Namespace(seed=42, lora_r=16, lora_alpha=32.0, lora_dropout=0.05, lora_target_modules="all-linear",
                              load_in_4bit=False, gradient_checkpointing=False)
    return stage.add_lora(model, args), n


def step_speed(vocab, pairs, length, steps, size):
    """tokens/s per loss (median over `steps` after one warm-up) and peak memory against the plan."""
    import stage
    import train_reward_stage

    runtime = stage.Runtime("bf16")
    model, n_params = big_model(vocab, runtime.device, size)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, vocab, (2 * pairs, length), generator=g)
    resp = torch.zeros_like(ids, dtype=torch.bool)
    resp[:, length // 4:] = True
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "response_mask": resp}
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    rows = []
    for config in LOSSES:
        loss, _, measure = config.partition("/")
        args = argparse.Namespace(batch_size=pairs, max_length=length, chunk_size=256, load_in_4bit=False,
                                  gradient_checkpointing=False, grad_accum=1, loss_reduction="mean",
                                  max_grad_norm=1.0, skip_nonfinite=True, out=os.devnull)
        loss_config = stage.LossConfig(loss=loss, measure=measure or None, level=LEVELS.get(measure))
        module = stage.PairLoss(model, loss_config, train_reward_stage.AdapterOff())
        if runtime.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        plan = stage.memory_plan(model, args, runtime)
        times = []
        for i in range(steps + 1):
            t0 = time.time()
            stage.one_update(module, params, opt, sched, [batch], args, runtime, i + 1)  # reads the metrics: a sync
            times.append(time.time() - t0)
        peak = torch.cuda.max_memory_allocated(runtime.device) if runtime.device.type == "cuda" else float("nan")
        rows.append({"vocab": vocab, "loss": config, "params": n_params, "tokens_per_s":
                     round(2 * pairs * length / statistics.median(times[1:])), "peak_gb": round(peak / 2**30, 2),
                     "plan_gb": round(plan / 2**30, 2)})
    dpo = rows[0]["tokens_per_s"]
    for r in rows:
        r["time_over_dpo"] = round(dpo / r["tokens_per_s"], 3)
    del model, opt
    if runtime.device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def deterministic_twice(out, world, steps):
    folders, rows = [os.path.join(out, "deterministic", n) for n in ("a", "b")], []
    os.makedirs(os.path.join(out, "deterministic"), exist_ok=True)
    for folder in folders:
        ok, err = run(["train_reward_stage.py", "--sft", os.path.join(world, "sft"), "--data",
                       os.path.join(world, "train.jsonl"), "--out", folder, "--max_length", "64",
                       "--max_prompt_length", "32", "--batch_size", "16", "--lr", "5e-3", "--max_steps", str(steps),
                       "--eval_every", str(steps), "--save_every", "0", "--deterministic"], folder + ".log")
        rows.append({"ok": ok, "error": err})
    if not all(r["ok"] for r in rows):
        return {"bitwise_equal": None, "runs": rows}
    from safetensors.torch import load_file

    a, b = (load_file(os.path.join(f, "adapter_model.safetensors")) for f in folders)
    return {"bitwise_equal": a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "runs": rows}


def machine():
    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "date": time.strftime("%Y-%m-%d %H:%M")}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
        smi = shutil.which("nvidia-smi")
        if smi:
            q = subprocess.run([smi, "--query-gpu=driver_version,memory.total", "--format=csv,noheader"],
                               capture_output=True, text=True)
            info["driver, memory"] = q.stdout.strip()
    import peft
    import transformers

    info.update(transformers=transformers.__version__, peft=peft.__version__)
    try:
        import bitsandbytes

        info["bitsandbytes"] = bitsandbytes.__version__
    except ImportError:
        info["bitsandbytes"] = None
    return info


def report(result, out):
    lines = ["# smoke-gpu", "", "| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in result["machine"].items()]
    lines += ["", "## Toy pipeline", "", "| mode | step | finished | s | tokens/s | peak GB | accuracy | error |",
              "|---|---|---|---|---|---|---|---|"]
    for r in result["toy"]:
        lines.append(f"| {r['mode']} | {r['step']} | {r['ok']} | {r['seconds']} | {r.get('tokens_per_s', '')} | "
                     f"{r.get('peak_gb', '')} | {r.get('accuracy', '')} | {r['error']} |")
    lines += ["", "## Training step of a random 1B Llama (bf16 base, fp32 head and LoRA)", "",
              "| vocab | loss | tokens/s | step time / DPO's | peak GB | plan GB |", "|---|---|---|---|---|---|"]
    for r in result["speed"]:
        lines.append(f"| {r['vocab']} | {r['loss']} | {r['tokens_per_s']} | {r['time_over_dpo']} | {r['peak_gb']} | "
                     f"{r['plan_gb']} |")
    equal = result["deterministic"]["bitwise_equal"]
    lines += ["", f"Two identical runs under --deterministic, bitwise equal: {equal}", "",
              f"Command: `{result['command']}`", ""]
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write("\n".join(lines))
    with open(os.path.join(out, "report.json"), "w") as f:
        json.dump(result, f, indent=1)
    print("\n".join(lines))


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.smoke_gpu", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/smoke-gpu", help="where the runs and report.md go")
    p.add_argument("--steps", type=int, default=20, help="optimizer steps per toy stage")
    p.add_argument("--speed_steps", type=int, default=5, help="timed steps per loss (after one warm-up)")
    p.add_argument("--cpu_check", action="store_true",
                   help="run every part on the CPU at tiny sizes (a check of the script itself, not a measurement)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available() and not args.cpu_check:
        print("python -m bench.smoke_gpu: error: needs a CUDA GPU and this machine has none (make demo runs the "
              "pipeline on the CPU)", file=sys.stderr)
        return 2
    sys.path.insert(0, ROOT)
    from toy import world as toy

    os.makedirs(args.out, exist_ok=True)
    world = os.path.join(args.out, "world")
    if not os.path.exists(os.path.join(world, "train.jsonl")):
        toy.build(world, size="tiny" if args.cpu_check else "full", seed=0)
    size, pairs, length = ("tiny", 2, 64) if args.cpu_check else ("1b", 8, 512)
    result = {"machine": machine(), "command": " ".join(["python", "-m", "bench.smoke_gpu", *(argv or sys.argv[1:])]),
              "toy": [], "speed": []}
    for mode in ("bf16", "4bit"):
        result["toy"] += toy_pipeline(args.out, world, mode, args.steps)
    for vocab in (32000, 128256):
        try:
            result["speed"] += step_speed(vocab, pairs, length, args.speed_steps, size)
        except Exception as e:  # an out-of-memory or a kernel error is a finding: record it, go on
            result["speed"].append({"vocab": vocab, "loss": f"failed: {type(e).__name__}: {str(e)[:200]}",
                                    "tokens_per_s": "", "time_over_dpo": "", "peak_gb": "", "plan_gb": ""})
    result["deterministic"] = deterministic_twice(args.out, world, args.steps)
    report(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
