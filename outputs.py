"""What a stage leaves on disk, what it reads from there, and how every script reports a user error.

    Sec. 1  model arguments          describe (a finished stage or a plain model), gguf_folder, recorded_path
    Sec. 2  LoRA adapters as data    model_adapter, write_adapter (merge_policies.py reads and mixes them)
    Sec. 3  flags and one writer     add_flags, config_values, run_config, check_output, output_lock
    Sec. 4  checkpoints and resume   save_checkpoint, start_or_resume (past a damaged checkpoint to the one before)
    Sec. 5  the final output         publish (atomic), write_model_card (assets/model_card.md), Reporter (metrics.jsonl,
                                     TensorBoard, wandb)

An output folder holds one LoRA adapter that stock peft loads on the recorded base, the tokenizer, a model card,
rsa_config.json (the run config) and complete.json, written last. Nothing here knows the loss.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import re
import shutil
import socket
import sys
import time

import torch

import data

CONFIG_FILE, COMPLETE_FILE, METRICS_FILE = "rsa_config.json", "complete.json", "metrics.jsonl"
ADAPTER_WEIGHTS, ADAPTER_CONFIG = "adapter_model.safetensors", "adapter_config.json"
# Settings that do not change what a run computes: a re-run that differs only in these is the same run.
NOT_PART_OF_RUN = {"overwrite", "log_every", "out", "resume", "save_every", "save_total_limit", "keep_checkpoints",
                   "config", "report_to"}


class UsageError(Exception):
    """A user error: printed as one line, exit code 2, no traceback."""


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written, and every flag's default."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C in a stage's step: says which step, the last checkpoint, and how to continue."""


@contextlib.contextmanager
def interruptible(work, step):
    try:
        yield
    except KeyboardInterrupt:
        last = latest_checkpoint(work)
        raise Interrupted(f"in step {step}; " + (f"the last checkpoint is {last}: rerun the same command with --resume "
                                                 "to continue from it" if last else "no checkpoint yet: rerun the "
                                                 "same command with --overwrite to start over")) from None


def run_script(prog, main, argv=None):
    """`main(argv)` as a script: a user error (UsageError, data.DataError) is one line on stderr and exit code 2,
    Ctrl-C one line and exit code 130."""
    try:
        main(argv)
    except (UsageError, data.DataError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        print(f"{prog}: interrupted " + (str(e) or "(a stage continues from its last checkpoint with --resume)"),
              file=sys.stderr)
        return 130
    return 0


def number(text):
    """An argparse type: a finite float (nan and inf are refused where a number is taken)."""
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text}")
    return value


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


# -------------------------------------------------------------------------------------------- 1. model arguments


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


def plain_model(path):
    """The description of a model that is not a stage output: a model folder or a hub id."""
    if os.path.exists(path) or not is_hub_name(path):
        if not os.path.exists(path):
            raise UsageError(f"{path}: no such stage output or model folder")
        if not os.path.exists(os.path.join(path, "config.json")):
            raise UsageError(f"{path}: neither a stage output nor a model folder (no config.json)")
    return {"stage": None, "base_model": path, "parent": None}


def describe(path):
    """What a model argument is: a finished stage (its config) or a plain model (folder or hub id)."""
    return read_stage(path) if is_stage(path) else plain_model(path)


def gguf_folder(path):
    """A model argument as the loaders know it: a .gguf file becomes a model folder, de-quantised once into the cache
    (fp32 safetensors with its tokenizer and chat template; $RSA_CACHE, default ~/.cache/rsa), where later runs find
    it. Anything else is returned as it is."""
    if not path.endswith(".gguf"):
        return path
    if not os.path.isfile(path):
        raise UsageError(f"{path}: no such GGUF file")
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    stat = os.stat(path)
    key = hashlib.sha1(f"{os.path.abspath(path)}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    cache = os.environ.get("RSA_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "rsa")
    folder = os.path.join(cache, "gguf", f"{os.path.basename(path)[:-5]}-{key}")
    if os.path.exists(os.path.join(folder, "config.json")):
        return folder
    where, name = os.path.dirname(path) or ".", os.path.basename(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(where, gguf_file=name, dtype=torch.float32,
                                                     quantization_config=GgufConfig(dequantize=True))
        tokenizer = AutoTokenizer.from_pretrained(where, gguf_file=name)
    except (OSError, ValueError) as e:
        raise UsageError(f"{path}: cannot load a causal LM from it ({str(e).splitlines()[0]})") from None
    tmp = f"{folder}.tmp{os.getpid()}"
    save_model(model, tmp)
    tokenizer.save_pretrained(tmp)
    with contextlib.suppress(OSError):  # another process finished the same folder first: keep theirs
        os.replace(tmp, folder)
    shutil.rmtree(tmp, ignore_errors=True)
    print(f"[gguf] {path}: de-quantised into the model folder {folder}", flush=True)
    return folder


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


def base_of(folder, cfg=None):
    """(base model path as seen from here, hub revision) of a finished stage or mixture."""
    cfg = cfg or read_stage(folder)
    return resolved_path(cfg["base_model"], folder), cfg.get("revision")


def config_fingerprint(path, trust_remote_code=False, revision=None):
    """What must agree for two checkpoints to share a base: architecture and shapes, read from the model's config
    alone, without loading any weights."""
    from transformers import AutoConfig

    if not os.path.exists(path) and not is_hub_name(path):
        raise UsageError(f"{path}: no such model folder")
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code, revision=revision)
    except (OSError, ValueError) as e:
        raise UsageError(f"{path}: cannot read a model config ({str(e).splitlines()[0]})") from None
    keys = ("vocab_size", "hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads",
            "num_key_value_heads")
    return {"model_type": config.model_type, **{k: getattr(config, k, None) for k in keys}}


# --------------------------------------------------------------------------------------- 2. LoRA adapters as data

def model_adapter(model, name="default"):
    """The LoRA blocks of a peft model's adapter `name`, from memory (fp32 on the CPU, scaling folded into B)."""
    from peft.tuners.lora import LoraLayer

    return {module_name: (module.lora_A[name].weight.detach().float().cpu(),
                          module.lora_B[name].weight.detach().float().cpu() * module.scaling[name])
            for module_name, module in model.base_model.model.named_modules()
            if isinstance(module, LoraLayer) and name in module.lora_A}


def peft_base(base_model, folder):
    """The base as adapter_config.json records it: a local base as an absolute path (peft resolves it against the
    working directory; rsa_config.json keeps the path relative to the folder), a hub id as it is."""
    local = os.path.join(folder, base_model)
    return os.path.abspath(local) if not os.path.isabs(base_model) and os.path.exists(local) else base_model


def write_adapter(folder, blocks, base_model, dropout=0.0):
    """Blocks as a peft adapter folder (scaling 1: lora_alpha = r), loadable with PeftModel.from_pretrained."""
    from peft import LoraConfig
    from safetensors.torch import save

    rank = next(iter(blocks.values()))[0].shape[0]
    LoraConfig(r=rank, lora_alpha=rank, lora_dropout=dropout, target_modules=sorted(blocks), task_type="CAUSAL_LM",
               base_model_name_or_path=peft_base(base_model, folder)).save_pretrained(folder)
    tensors = {}
    for name, (a, b) in blocks.items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = a.contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = b.contiguous()
    fsync_write(os.path.join(folder, ADAPTER_WEIGHTS), lambda f: f.write(save(tensors)))


# ------------------------------------------------------------------------------------ 3. flags and one writer


def add_flags(g):
    """The output flags of both stages (into an argparse group)."""
    g.add_argument("--config", default=None,
                   help="a yaml or json file of flag values (keys are flag names), or a previous run's rsa_config.json "
                        "(its args); flags on the command line override it")
    g.add_argument("--report_to", default="none", choices=("none", "tensorboard", "wandb"),
                   help="also log metrics.jsonl's metrics to TensorBoard (<out>/runs) or Weights & Biases")
    g.add_argument("--out", required=True, help="output folder")
    g.add_argument("--overwrite", action="store_true", help="replace a finished run with a different config")
    g.add_argument("--log_every", type=int, default=10, help="steps between log lines / metrics.jsonl records")
    g.add_argument("--eval_every", type=int, default=100, help="steps between held-out evaluations")
    g.add_argument("--save_every", type=int, default=50,
                   help="steps between checkpoints (weights, optimizer, scheduler, RNG, data position); 0: none")
    g.add_argument("--save_total_limit", type=int, default=2,
                   help="complete checkpoints kept (the newest ones; a damaged newest one falls back to the previous)")
    g.add_argument("--keep_checkpoints", action="store_true",
                   help="keep them in <out>/checkpoints when the run finishes (removed by default)")
    g.add_argument("--resume", action="store_true",
                   help="continue the unfinished run in <out>.tmp from its newest readable checkpoint (an error when "
                        "there is none: a typo in --out does not silently start a new run)")


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
        values = replayed(values["args"], os.path.dirname(os.path.abspath(path)))  # a finished run's rsa_config.json
    if not isinstance(values, dict):
        raise UsageError(f"--config {path}: expected a mapping of flag names to values")
    actions = {a.dest: a for a in parser._actions}
    out = {}
    for key, value in values.items():
        action = actions.get(key.replace("-", "_"))
        if action is None:
            raise UsageError(f"--config {path}: unknown key {key!r} (not a flag of {parser.prog})")
        try:
            out[action.dest] = config_value(value, action)
        except (TypeError, ValueError, argparse.ArgumentTypeError) as e:
            raise UsageError(f"--config {path}: key {key!r}: {value!r} is not {e}") from None
    return out


def replayed(args, folder):
    """A finished run's args, its relative paths resolved against the directory that run started in (recorded in
    its complete.json), so a replay from elsewhere reads the same files."""
    try:
        with open(os.path.join(folder, COMPLETE_FILE)) as f:
            start = json.load(f).get("working_directory")
    except (OSError, ValueError):
        start = None
    if not start:
        return args
    return {k: os.path.join(start, v) if isinstance(v, str) and not os.path.isabs(v) and not os.path.exists(v)
            and os.path.exists(os.path.join(start, v)) else v for k, v in args.items()}


def config_value(value, action):
    """A config file's value for `action`, checked and converted as the command line would (the error says what
    was expected)."""
    if action.nargs == 0:  # store_true
        if not isinstance(value, bool):
            raise TypeError("true or false")
        return value
    if value is None and action.default is None:
        return None
    kind = action.type or str
    expected = {int: "an integer", str: "a string", number: "a finite number"}.get(kind, f"a valid {action.dest}")
    if not isinstance(value, str | int | float) or isinstance(value, bool) or kind is int and isinstance(value, float):
        raise TypeError(expected)
    try:
        converted = kind(value) if isinstance(value, str) or kind is not str else str(value)
    except (ValueError, argparse.ArgumentTypeError):
        raise TypeError(expected) from None
    if action.choices is not None and converted not in action.choices:
        raise ValueError("one of " + ", ".join(map(str, action.choices)))
    return converted


def run_config(args, stage, extra):
    return {"stage": stage, "args": {k: v for k, v in vars(args).items() if k not in NOT_PART_OF_RUN}, **extra}


def check_output(out, cfg, overwrite):
    """True when `out` already holds this finished run (nothing to do); errors when it holds another one."""
    if not os.path.exists(out):
        return False
    if os.path.exists(os.path.join(out, COMPLETE_FILE)):
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
            if other.get("pid") and alive(other["pid"]):
                raise UsageError(f"{out}: another run (pid {other['pid']}, started {other.get('started')}) is "
                                 "writing this output; wait for it or stop it") from None
            print(f"[lock] {path}: taking over the lock of pid {other.get('pid')}, which is no longer running")
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
    with os.fdopen(fd, "w") as f:
        json.dump({"pid": os.getpid(), "host": host, "started": time.strftime("%Y-%m-%d %H:%M:%S")}, f)
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)


def alive(pid):
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


# ---------------------------------------------------------------------------------- 4. checkpoints and resume


def save_model(model, folder):
    """model.save_pretrained(folder) (safetensors), its files then given the user's umask (transformers writes the
    weights through a private temporary file, mode 0600)."""
    model.save_pretrained(folder)
    mask = os.umask(0)
    os.umask(mask)
    for name in os.listdir(folder):
        if os.path.isfile(os.path.join(folder, name)):
            os.chmod(os.path.join(folder, name), 0o666 & ~mask)


def fsync_write(path, write):
    """Write a file and force it to disk; an OSError names the path."""
    try:
        with open(path, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise OSError(e.errno, e.strerror or str(e), path) from e


def write_json(path, value):
    fsync_write(path, lambda f: f.write(json.dumps(value, indent=1).encode()))


def write_failed(e, work, what):
    """A full disk or a failing write: one line naming the path, and what is still safe to resume from."""
    last = latest_checkpoint(work)
    return UsageError(f"cannot write {what} {e.filename or work} ({e.strerror or e}); "
                      + (f"the last complete checkpoint, {last}, is intact: free space and rerun with --resume"
                         if last else "no complete checkpoint yet: free space and rerun"))


def save_checkpoint(work, step, model, opt, sched, cfg, runtime, skipped, seconds, keep=2):
    """checkpoints/step-N: trainable weights (safetensors), optimizer, scheduler, every rank's RNG states and the
    fp16 gradient scaler (weights-only loadable), the run config, and a completeness marker written last, each
    fsynced; then renamed into place. The newest `keep` complete checkpoints are kept (a corrupt newest one then has
    a predecessor to fall back to). Called on every rank; the main one writes."""
    from safetensors.torch import save

    trainer = {"step": step, "skipped": skipped, "seconds": seconds, "rng": runtime.gather(runtime.rng_state())}
    if runtime.scaler is not None:
        trainer["scaler"] = runtime.scaler.state_dict()
    final = os.path.join(work, "checkpoints", f"step-{step:08d}")
    tmp = final + ".tmp"
    if runtime.main:
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
            weights = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
            fsync_write(os.path.join(tmp, "trainable.safetensors"), lambda f: f.write(save(weights)))
            trainer.update(optimizer=opt.state_dict(), scheduler=sched.state_dict())
            fsync_write(os.path.join(tmp, "trainer_state.pt"), lambda f: torch.save(trainer, f))
            write_json(os.path.join(tmp, CONFIG_FILE), cfg)
            write_json(os.path.join(tmp, COMPLETE_FILE), {})
            shutil.rmtree(final, ignore_errors=True)  # an unreadable checkpoint of the same step, fallen back from
            os.replace(tmp, final)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise write_failed(e, work, f"the checkpoint of step {step}:") from None
        for old in complete_checkpoints(work)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    runtime.barrier()


def complete_checkpoints(work):
    """The complete checkpoint folders of a work folder, oldest first (ones without their marker are ignored)."""
    root = os.path.join(work, "checkpoints")
    names = sorted(os.listdir(root)) if os.path.isdir(root) else []
    return [os.path.join(root, d) for d in names if d.startswith("step-") and not d.endswith(".tmp")
            and os.path.exists(os.path.join(root, d, COMPLETE_FILE))]


def latest_checkpoint(work):
    done = complete_checkpoints(work)
    return done[-1] if done else None


def load_checkpoint(path, model, opt, sched, cfg, runtime):
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
    if len(trainer["rng"]) != runtime.world:
        raise UsageError(f"{path}: the checkpoint was made by {len(trainer['rng'])} process(es); resume with as "
                         f"many (this run has {runtime.world})")
    with torch.no_grad():
        for n, w in weights.items():
            params[n].copy_(w)
    opt.load_state_dict(trainer["optimizer"])
    sched.load_state_dict(trainer["scheduler"])
    runtime.set_rng_state(trainer["rng"][runtime.rank])  # each rank its own CPU and CUDA generator
    if runtime.scaler is not None and "scaler" in trainer:
        runtime.scaler.load_state_dict(trainer["scaler"])
    return trainer


def resume(work, model, opt, sched, cfg, runtime):
    """The trainer state of the newest readable checkpoint; an unreadable one (truncated, corrupt) is skipped with a
    note, falling back to the one before."""
    checkpoints = complete_checkpoints(work)
    if not checkpoints:
        raise UsageError(f"--resume: {work} holds no complete checkpoint to continue from"
                         + ("" if os.path.exists(work) else " (no run was started there)")
                         + "; drop --resume to start a new run (or --overwrite to replace an unfinished one)")
    for checkpoint in reversed(checkpoints):
        try:
            trainer = load_checkpoint(checkpoint, model, opt, sched, cfg, runtime)
        except UsageError:
            raise
        except Exception as e:  # a damaged file: any parse error of safetensors or torch.load
            print(f"[train] {checkpoint}: unreadable ({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
                  "falling back to the previous checkpoint", flush=True)
            continue
        print(f"[train] resuming from {checkpoint} (step {trainer['step']})", flush=True)
        return trainer
    raise UsageError(f"{work}: no readable checkpoint (the newest is {checkpoints[-1]}); rerun with --overwrite to "
                     "start over")


def start_or_resume(model, opt, sched, args, cfg, runtime, work):
    """(first step, skipped batches, seconds trained so far): from the newest readable checkpoint under --resume (an
    error when there is none), else a fresh work folder. An unfinished run is never silently replaced."""
    if args.resume:
        trainer = resume(work, model, opt, sched, cfg, runtime)
        if runtime.main:
            with open(os.path.join(work, METRICS_FILE)) as f:  # drop records of steps after the checkpoint
                kept = [line for line in f if json.loads(line)["step"] <= trainer["step"]]
            with open(os.path.join(work, METRICS_FILE), "w") as f:
                f.writelines(kept)
        return trainer["step"] + 1, trainer["skipped"], trainer.get("seconds", 0.0)
    checkpoint = latest_checkpoint(work)
    if checkpoint and not args.overwrite:
        raise UsageError(f"{work}: holds an unfinished run with a checkpoint at {os.path.basename(checkpoint)}; "
                         "pass --resume to continue it or --overwrite to start over")
    runtime.barrier()
    if runtime.main:
        shutil.rmtree(work, ignore_errors=True)
        os.makedirs(work)
    runtime.barrier()
    return 1, 0, 0.0


# ---------------------------------------------------------------------------------------------- 5. the final output


# The model card's text, with {what}, {base_model}, {table} and {held} to fill in.
MODEL_CARD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "model_card.md")
CARD_TITLES = {"reward": "RSA stage 1, the reward (helpfulness) stage",
               "safety": "RSA stage 2, the safety (harmlessness) stage", "mixture": "an RSA(P) mixture of two policies"}
CARD_ROWS = {"mixture": [("q (weight of the first policy)", "q"), ("first", "first"), ("second", "second"),
                         ("update", "meaning")],
             "stage": [("loss", "loss"), ("risk measure", "risk_measure"), ("risk level", "risk_level"),
                       ("beta", "beta"), ("lambda = beta_r / beta_s", "lambda"), ("preference", "preference"),
                       ("parent (reward stage)", "parent")]}
CARD_METRICS = ("loss", "rewards/accuracies", "rewards/margins", "kl/chosen", "kl/rejected", "risk/chosen",
                "risk/rejected")


def write_model_card(folder, cfg, metrics=None):
    """README.md of an output folder (assets/model_card.md): what it is, how it was made, its held-out metrics, how
    to load it."""
    values = {**cfg.get("args", {}), **cfg}
    rows = [("base model", cfg["base_model"]), ("stage order", cfg.get("order"))] + [
        (name, values.get(key)) for name, key in CARD_ROWS["mixture" if cfg["stage"] == "mixture" else "stage"]]
    held = "".join(f"| {k} | {metrics[k]:.4f} |\n" for k in CARD_METRICS if k in (metrics or {}))
    with open(MODEL_CARD, encoding="utf-8") as f:
        text = f.read().format(
            what=CARD_TITLES[cfg["stage"]], base_model=cfg["base_model"],
            table="\n".join(f"| {k} | {v} |" for k, v in rows if v is not None),
            held=f"\n## Final held-out metrics\n\n| metric | value |\n|---|---|\n{held}" if held else "")
    with open(os.path.join(folder, "README.md"), "w", encoding="utf-8") as f:
        f.write(text)


def publish(adapter, tokenizer, cfg, work, out, summary, dropout=0.0, keep_checkpoints=False):
    """The final output, atomically: the adapter (one LoRA adapter on the recorded base that stock peft loads), the
    tokenizer, the config and a model card into the work folder, the completeness marker last, then one rename onto
    --out. A failing write leaves the checkpoints in place to resume from; after the rename they are removed unless
    kept."""
    try:
        write_adapter(work, adapter, cfg["base_model"], dropout)
        tokenizer.save_pretrained(work)
        write_model_card(work, cfg, summary.get("final_eval"))
        write_json(os.path.join(work, CONFIG_FILE), cfg)
        write_json(os.path.join(work, COMPLETE_FILE), {**summary, "working_directory": os.getcwd()})
    except OSError as e:
        raise write_failed(e, work, "the final output:") from None
    if not keep_checkpoints:
        shutil.rmtree(os.path.join(work, "checkpoints"), ignore_errors=True)
    if os.path.exists(out):
        shutil.rmtree(out)
    os.replace(work, out)


class Reporter:
    """metrics.jsonl, and with --report_to the same metrics (as "<split>/<name>") to TensorBoard or wandb."""

    def __init__(self, work, kind, cfg):
        self.file, self.tensorboard, self.wandb = open(os.path.join(work, METRICS_FILE), "a"), None, None
        if kind == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(os.path.join(work, "runs"))
        elif kind == "wandb":
            try:
                import wandb
            except ImportError:
                raise UsageError("--report_to wandb: wandb is not installed (pip install wandb)") from None
            self.wandb = wandb.init(project=os.environ.get("WANDB_PROJECT", "rsa"), config=cfg, dir=work)

    def record(self, step, split, metrics):
        self.file.write(json.dumps({"step": step, "split": split, **metrics}) + "\n")
        self.file.flush()
        if self.tensorboard:
            for k, v in metrics.items():
                self.tensorboard.add_scalar(f"{split}/{k}", v, step)
            self.tensorboard.flush()
        if self.wandb:
            self.wandb.log({f"{split}/{k}": v for k, v in metrics.items()}, step=step)

    def close(self):
        self.file.close()
        if self.tensorboard:
            self.tensorboard.close()
        if self.wandb:
            self.wandb.finish()
