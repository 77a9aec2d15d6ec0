"""The machinery both RSA stages share: models, the flags, one batch of the Ra-DPO loss, and the training loop.

    Sec. 1  models        load_base_model, load_tokenizer, add_lora
    Sec. 2  flags         add_shared_flags, parse_args (with --config), LossConfig
    Sec. 3  one batch     batch_terms, batch_loss (the TRL metric names), evaluate_pairs
    Sec. 4  the loop      Runtime (device, precision, processes), one_update, memory_plan, train

Each stage script says what its policy starts from and what its reference is (train_reward_stage.py: the SFT model;
train_safety_stage.py: the reward-stage policy pi_r); train() runs either. The math lives in risk.py
(docs/math.md), what a stage leaves on disk in outputs.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import sys
import time
import warnings

import torch
from tqdm import tqdm

import data
import outputs
import risk
from outputs import UsageError, number

# The Ra-DPO authors' published setup (docs/math.md Sec. 4 and 8), from zlj123-max/Ra-DPO: config/config.yaml
# (lr 5e-6, warmup_steps 150), config/model/base_model.yaml (max_grad_norm 5.0, max_length 512,
# max_prompt_length 256), and their loss code (Ra-DPO_1, the two-halves CVaR threshold, the loss summed over pairs).
RADPO_PARITY = dict(loss="ra_dpo1", risk_measure="cvar_radpo", risk_level=0.95, split_vocab=True,
                    loss_reduction="sum", lr=5e-6, warmup_steps=150, max_grad_norm=5.0, max_length=512,
                    max_prompt_length=256)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# peft calls transformers' deprecated names (is_gradient_checkpointing; gradient_checkpointing_enable under QLoRA)
warnings.filterwarnings("ignore", message=".*`(is_gradient_checkpointing|gradient_checkpointing_enable)` is deprecated")
# peft imports bitsandbytes whenever it is installed; on a CPU its 4-bit kernel loader then warns about an optional
# kernel package
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


# ------------------------------------------------------------------------------------------------------ 1. models


def resolve_precision(spec, device):
    """auto: bf16 autocast on a GPU that has bf16 in hardware (Ampere and newer; V100 and T4 only emulate it, several
    times slower), fp16 with a gradient scaler on one that does not, fp32 on the CPU."""
    if spec != "auto":
        return spec
    if device.type != "cuda":
        return "fp32"
    return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"


def resolve_dtype(spec, device, precision="auto"):
    """auto: on a CUDA device the 16-bit type of the precision (fp32 under --precision fp32), fp32 on the CPU."""
    if spec != "auto":
        return DTYPES[spec]
    if device.type != "cuda":
        return torch.float32
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[resolve_precision(precision, device)]


def load_base_model(path, trust_remote_code=False, load_in_4bit=False, revision=None, dtype=torch.float32,
                    fp32_head=False, compute_dtype=None):
    """The causal LM at `path` (a local folder or a hub id), weights from safetensors, in `dtype`, or for QLoRA its
    linear layers in 4-bit nf4 (double quantisation) computing in `compute_dtype` (default `dtype`), on this rank's
    GPU or on the CPU. For training (`fp32_head`), the output head is fp32 under a 16-bit dtype (a tied head as an
    untied fp32 copy), so the vocabulary projection of the risk terms is not rounded to 16 bits."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one "Loading weights" bar per load says nothing a user needs
    if not os.path.exists(path) and not outputs.is_hub_name(path):
        raise UsageError(f"{path}: no such model folder")
    kwargs = {"trust_remote_code": trust_remote_code, "dtype": dtype, "revision": revision, "use_safetensors": True}
    if load_in_4bit:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype or dtype,
            bnb_4bit_use_double_quant=True)
        kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", "0")) if torch.cuda.is_available() else "cpu"}
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as e:  # no weights, no model_type, ...
        raise UsageError(f"{path}: cannot load a causal LM from it ({str(e).splitlines()[0]})") from None
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
    no_dropout(model)  # a deterministic reference: no dropout outside the LoRA layers added later
    for module in model.modules():
        # bitsandbytes on a CPU with AVX512-BF16 repacks a 4-bit weight in place for an inference kernel at the
        # first eval-mode forward without grad (the reference pass); that kernel has no backward, so every later
        # gradient through the layer is silently dropped. The training kernel serves both passes instead.
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    return model


def no_dropout(model):
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def training_base(path, revision, args, runtime):
    """The frozen base a stage trains on: in --dtype (auto: the precision's 16-bit type on a GPU, fp32 on the CPU),
    or with --load_in_4bit in nf4 computing in the autocast dtype (fp32 without autocast); an fp32 output head."""
    return load_base_model(path, args.trust_remote_code, args.load_in_4bit, revision,
                           dtype=resolve_dtype(args.dtype, runtime.device, runtime.precision), fp32_head=True,
                           compute_dtype=runtime.dtype or torch.float32)


def load_tokenizer(path, trust_remote_code=False, revision=None):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code, revision=revision)
    except (OSError, ValueError) as e:
        raise UsageError(f"{path}: cannot load a tokenizer from it ({str(e).splitlines()[0]})") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # the masks never rely on pad ids
    return tokenizer


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
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    return model


def add_lora(model, args):
    """The trainable LoRA adapter ("default") on `model`; switched off, it leaves `model` itself."""
    from peft import get_peft_model

    torch.manual_seed(args.seed)  # the adapter's initialisation is part of the run, whatever ran before
    try:
        return get_peft_model(prepare_base(model, args), lora_config(args))
    except ValueError as e:
        raise UsageError(f"--lora_target_modules {args.lora_target_modules}: {e}") from None


def backbone_and_head(model):
    """The transformer body (to get final hidden states without full logits) and the output projection."""
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(lm, lm.base_model_prefix), lm.get_output_embeddings()


# ------------------------------------------------------------------------------------------------------- 2. flags


def add_shared_flags(p):
    """The flags both stages take (each stage script adds its own first: its model, beta and preference)."""
    g = p.add_argument_group("model")
    g.add_argument("--revision", default=None, help="hub revision (branch, tag or commit) of the model, recorded")
    g.add_argument("--trust_remote_code", action="store_true", help="allow model code from the hub (off: safer)")
    g.add_argument("--lora_r", type=int, default=16, help="LoRA rank")
    g.add_argument("--lora_alpha", type=number, default=32.0, help="LoRA scaling numerator (update x alpha / r)")
    g.add_argument("--lora_dropout", type=number, default=0.05, help="dropout on the LoRA input (policy pass only)")
    g.add_argument("--lora_target_modules", default="all-linear",
                   help="comma-separated module names, or all-linear (every linear layer but the output head)")
    data.add_flags(p.add_argument_group("data"))
    g = p.add_argument_group("loss (docs/math.md Sec. 4-5)")
    g.add_argument("--loss", default="ra_dpo2", choices=risk.VARIANTS, help="the preference loss")
    g.add_argument("--risk_measure", default="cvar_radpo", choices=risk.MEASURES,
                   help="expectation gives TDPO; cvar is the paper form, cvar_radpo the authors' code form")
    g.add_argument("--risk_level", type=number, default=0.95, help="CVaR tail mass in (0, 1], or ERM's mu > 0")
    g.add_argument("--erm_on_rewards", action="store_true",
                   help="erm: --risk_level is mu on the implicit reward beta * D instead of on D, so one value means "
                        "one risk aversion at every beta (mu on D = level x beta; docs/math.md Sec. 2)")
    g.add_argument("--alpha", type=number, default=0.5, help="ra_dpo2 loss weight of the risk term (not the level)")
    g.add_argument("--split_vocab", action="store_true", help="cvar_radpo: the authors' two-halves threshold quirk")
    g.add_argument("--loss_reduction", default="mean", choices=("mean", "sum"),
                   help="over pairs in a batch (the Ra-DPO code sums)")
    g.add_argument("--radpo_parity", action="store_true",
                   help="the Ra-DPO authors' setup: " + ", ".join(f"{k}={v}" for k, v in RADPO_PARITY.items()))
    g = p.add_argument_group("optimisation")
    g.add_argument("--lr", type=number, default=1e-4, help="AdamW learning rate of the LoRA weights")
    g.add_argument("--epochs", type=number, default=1.0, help="passes over the training pairs")
    g.add_argument("--max_steps", type=int, default=0, help="optimizer steps; overrides --epochs when > 0")
    g.add_argument("--batch_size", type=int, default=8, help="pairs per micro-batch")
    g.add_argument("--grad_accum", type=int, default=1, help="micro-batches per optimizer step")
    g.add_argument("--warmup_ratio", type=number, default=0.03, help="linear warm-up, as a share of the steps")
    g.add_argument("--warmup_steps", type=int, default=0, help="linear warm-up steps; overrides --warmup_ratio if > 0")
    g.add_argument("--schedule", default="cosine", choices=("cosine", "linear", "constant"),
                   help="learning-rate decay after the warm-up")
    g.add_argument("--max_grad_norm", type=number, default=1.0, help="gradient clipping")
    g.add_argument("--weight_decay", type=number, default=0.0, help="AdamW weight decay")
    g.add_argument("--chunk_size", type=int, default=256, help="response positions per chunk of vocabulary terms")
    g.add_argument("--seed", type=int, default=42, help="data order, held-out split and LoRA initialisation")
    g.add_argument("--skip_nonfinite", action="store_true",
                   help="skip a batch whose loss or gradient is not finite (counted) instead of stopping the run")
    g = p.add_argument_group("compute (docs/gpu.md)")
    g.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
                   help="auto: bf16 autocast on GPUs that have it, fp16 with a gradient scaler on those that do not "
                        "(T4, V100), fp32 on a CPU")
    g.add_argument("--load_in_4bit", action="store_true",
                   help="QLoRA: the base's linear layers in 4-bit nf4, computing in the precision's dtype (needs "
                        "bitsandbytes; on a CPU it runs, slowly: for tests and small checks)")
    g.add_argument("--dtype", default="auto", choices=("auto", *DTYPES),
                   help="the frozen base weights: auto is bf16 on CUDA, fp32 on the CPU (LoRA weights, optimizer and "
                        "the vocabulary projection stay fp32)")
    g.add_argument("--gradient_checkpointing", action="store_true", help="recompute activations (non-reentrant)")
    g.add_argument("--deterministic", action="store_true",
                   help="bitwise repeatable runs on a GPU: deterministic kernels only (torch.use_deterministic_"
                        "algorithms, CUBLAS_WORKSPACE_CONFIG=:4096:8); slower. The CPU is deterministic already")
    outputs.add_flags(p.add_argument_group("output (docs/reliability.md)"))
    return p


def parse_args(parser, argv=None):
    """Parse with the parity preset and a --config file applied under explicit flags, and refuse flag combinations
    that cannot work."""
    argv = list(sys.argv[1:] if argv is None else argv)
    config = next((argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--config"), None)
    config = config or next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    values = outputs.config_values(config, parser) if config else {}
    if "--radpo_parity" in argv or values.get("radpo_parity"):
        parser.set_defaults(**RADPO_PARITY)
    parser.set_defaults(**values)
    for action in parser._actions:  # a flag the config gives is no longer required on the command line
        if action.dest in values:
            action.required = False
    args = parser.parse_args(argv)
    check_flags(args, given=lambda name: any(a == f"--{name}" or a.startswith(f"--{name}=") for a in argv))
    return args


def check_flags(args, given):
    """One-line errors for flag combinations that cannot work and values out of range."""
    if args.loss == "dpo":
        for name in ("risk_measure", "risk_level", "alpha", "split_vocab", "radpo_parity", "erm_on_rewards"):
            if given(name):
                raise UsageError(f"--{name} has no effect with --loss dpo (DPO has no risk term); drop one of them")
    if args.loss == "ra_dpo1" and given("alpha"):
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
    outputs.check_ranges(args, positive=("beta", "lr", "epochs", "batch_size", "grad_accum", "chunk_size", "lora_r",
                                         "lora_alpha", "max_grad_norm", "max_length", "max_prompt_length",
                                         "log_every", "eval_every", "save_total_limit"),
                         non_negative=("alpha", "max_steps", "warmup_steps", "weight_decay", "eval_pairs",
                                       "save_every"),
                         fractions=("lora_dropout", "warmup_ratio"))


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


# --------------------------------------------------------------------------------------------------- 3. one batch


@contextlib.contextmanager
def reference_pass(model, reference):
    """The context of the reference forward: `reference`'s weights, in eval mode (no dropout of any kind), no grad.
    Each stage file defines its reference (train_reward_stage.AdapterOff, train_safety_stage.RewardStagePolicy):
    `reference.weights(model)`, the context that puts the reference's weights in place, and `reference.head(head)`,
    its output projection."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), reference.weights(model):
            yield
    finally:
        model.train(was_training)


def batch_terms(model, batch, loss_config, reference):
    """Per-sequence (logratio, kl, risk, logps) for a collated batch (chosen rows first), from one policy forward
    and one reference forward."""
    body, head = backbone_and_head(model)
    ids, attention, response = batch["input_ids"], batch["attention_mask"], batch["response_mask"]
    hidden = body(input_ids=ids, attention_mask=attention).last_hidden_state
    with reference_pass(model, reference):
        reference_hidden = body(input_ids=ids, attention_mask=attention).last_hidden_state
    # position t predicts token t + 1: shift once here, risk.py never shifts
    return risk.sequence_terms(hidden[:, :-1], reference_hidden[:, :-1], head, reference.head(head), ids[:, 1:],
                               response[:, 1:], loss_config.measure, loss_config.level, loss_config.chunk_size,
                               split_vocab=loss_config.split_vocab, with_logps=True)


def batch_loss(model, batch, loss_config, reference):
    """The loss of a batch and its metrics (the names TRL users know, plus the Ra-DPO paper's rewards), as 0-dim
    device tensors: the loop reads them once per step (one host sync)."""
    logratio, kl, risk_ratio, logps = batch_terms(model, batch, loss_config, reference)
    n = logratio.shape[0] // 2
    chosen, rejected = slice(0, n), slice(n, 2 * n)
    has_risk = risk_ratio is not None
    losses, chosen_ra, rejected_ra = risk.preference_loss(
        logratio[chosen], logratio[rejected], risk_ratio[chosen] if has_risk else None,
        risk_ratio[rejected] if has_risk else None, loss_config.beta, loss_config.alpha, loss_config.loss)
    loss = losses.mean() if loss_config.reduction == "mean" else losses.sum()
    reward_chosen, reward_rejected = (loss_config.beta * logratio[side].detach() for side in (chosen, rejected))
    m = {"loss": loss.detach(),
         "rewards/chosen": reward_chosen.mean(), "rewards/rejected": reward_rejected.mean(),
         "rewards/margins": (reward_chosen - reward_rejected).mean(),
         "rewards/accuracies": (reward_chosen > reward_rejected).float().mean(),
         "rewards_ra/chosen": chosen_ra.mean(), "rewards_ra/rejected": rejected_ra.mean(),
         "rewards_ra/margins": (chosen_ra - rejected_ra).mean(),
         "rewards_ra/accuracies": (chosen_ra > rejected_ra).float().mean(),
         "logps/chosen": logps[chosen].mean(), "logps/rejected": logps[rejected].mean(),
         "kl/chosen": kl[chosen].mean(), "kl/rejected": kl[rejected].mean()}
    if has_risk:
        m.update({"risk/chosen": risk_ratio[chosen].mean(), "risk/rejected": risk_ratio[rejected].mean(),
                  "risk/margins": (risk_ratio[rejected] - risk_ratio[chosen]).mean()})
    return loss, {k: v.detach().float() for k, v in m.items()}


class PairLoss(torch.nn.Module):
    """batch_loss as a module, so DistributedDataParallel (which hooks a module's forward) can wrap it."""

    def __init__(self, model, loss_config, reference):
        super().__init__()
        self.model, self.loss_config, self.reference = model, loss_config, reference

    def forward(self, batch):
        return batch_loss(self.model, batch, self.loss_config, self.reference)


@torch.no_grad()
def evaluate_pairs(loss_module, examples, batch_size, pad_id, device="cpu"):
    """Mean metrics of a PairLoss over held-out pairs (weighted by pairs)."""
    was_training = loss_module.training
    loss_module.eval()
    totals, count = {}, 0
    for start in range(0, len(examples), batch_size):
        chunk = examples[start: start + batch_size]
        _, m = loss_module({k: v.to(device) for k, v in data.collate(chunk, pad_id).items()})
        for k, v in m.items():
            totals[k] = totals.get(k, 0.0) + v * len(chunk)
        count += len(chunk)
    loss_module.train(was_training)
    keys = sorted(totals)
    return dict(zip(keys, (torch.stack([totals[k] for k in keys]) / count).tolist()))


# ----------------------------------------------------------------------------------------------------- 4. the loop


class Runtime:
    """Where and how a run computes: the device (cuda:LOCAL_RANK under torchrun / accelerate launch), mixed precision,
    and the process group. Several processes train through DistributedDataParallel, so every rank's step equals one
    process stepping on the global batch."""

    def __init__(self, precision="auto", deterministic=False):
        if deterministic:  # before any CUDA work: cuBLAS reads the workspace setting when it starts
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
        self.world, self.rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
        cuda = torch.cuda.is_available()
        self.device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if cuda else "cpu")
        if cuda:
            torch.cuda.set_device(self.device)  # peft, RNG states and NCCL then use this rank's GPU, not GPU 0
        if self.world > 1 and not torch.distributed.is_initialized():
            torch.distributed.init_process_group("nccl" if cuda else "gloo", device_id=self.device if cuda else None)
        self.precision = resolve_precision(precision, self.device)
        if self.precision == "fp16" and not cuda:
            raise UsageError("--precision fp16 needs a CUDA GPU (use bf16 or fp32 on a CPU)")
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)
        self.scaler = torch.amp.GradScaler("cuda") if self.precision == "fp16" else None
        self.main = self.rank == 0

    def autocast(self):
        return contextlib.nullcontext() if self.dtype is None else torch.autocast(self.device.type, dtype=self.dtype)

    def wrap(self, module):
        """`module` under DistributedDataParallel when there are several processes (itself otherwise)."""
        if self.world == 1:
            return module
        return torch.nn.parallel.DistributedDataParallel(
            module, device_ids=[self.device] if self.device.type == "cuda" else None, broadcast_buffers=False)

    def all_reduce_mean(self, tensor):
        if self.world > 1:
            torch.distributed.all_reduce(tensor)
            tensor /= self.world
        return tensor

    def gather(self, obj):
        """[obj of rank 0, obj of rank 1, ...] on every rank."""
        out = [obj] * self.world
        if self.world > 1:
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


def lr_lambda(args, total_steps):
    """Linear warm-up, then cosine, linear or constant."""
    warmup = args.warmup_steps or (max(1, int(args.warmup_ratio * total_steps)) if args.warmup_ratio > 0 else 0)

    def factor(step):
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return {"cosine": 0.5 * (1 + math.cos(math.pi * progress)), "linear": 1 - progress}.get(args.schedule, 1.0)

    return factor


def one_update(loss_module, params, opt, sched, micro_batches, args, runtime, step):
    """One optimizer step over `grad_accum` micro-batches: (metrics, whether the batch was applied). A non-finite
    loss stops the run (or, with --skip_nonfinite, skips the batch); so does a non-finite gradient, except under fp16,
    where the gradient scaler skips an overflowing step itself and lowers its scale. The learning-rate schedule
    advances only with the optimizer. Metrics are read from the device once, after the backward."""
    start, tokens, per_micro, scaler = time.time(), 0, [], runtime.scaler
    scale = runtime.world if args.loss_reduction == "sum" else 1  # DDP averages gradients over ranks; a sum adds
    for i, batch in enumerate(micro_batches):
        tokens += int(batch["attention_mask"].sum())  # counted on the CPU, before the copy: no device sync
        batch = {k: v.to(runtime.device, non_blocking=True) for k, v in batch.items()}
        last = runtime.world == 1 or i == args.grad_accum - 1  # gradients are all-reduced with the last backward
        with contextlib.nullcontext() if last else loss_module.no_sync():
            with runtime.autocast():
                loss, m = loss_module(batch)
            loss = loss * (scale / args.grad_accum)
            (scaler.scale(loss) if scaler else loss).backward()
        per_micro.append(m)
    if scaler:
        scaler.unscale_(opt)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
    keys = sorted(per_micro[0])
    values = torch.stack([torch.stack([x[k] for x in per_micro]).mean() for k in keys] + [grad_norm.float()])
    values = runtime.all_reduce_mean(values.double()).tolist()  # the one host sync of the step
    m, grad_norm = dict(zip(keys, values[:-1])), values[-1]
    applied = math.isfinite(m["loss"]) and (math.isfinite(grad_norm) or scaler is not None)
    if not applied and not args.skip_nonfinite:
        checkpoint = outputs.latest_checkpoint(args.out.rstrip("/") + ".tmp")
        raise UsageError(f"non-finite {'loss' if not math.isfinite(m['loss']) else 'gradient'} at step {step}; "
                         + (f"the last good checkpoint is {checkpoint}: fix the cause (e.g. a lower --lr) and rerun "
                            "with --resume" if checkpoint else "no checkpoint yet (see --save_every)")
                         + "; or pass --skip_nonfinite to skip such batches")
    stepped = applied
    if scaler:
        before = scaler.get_scale()
        if applied:
            scaler.step(opt)  # skips the step itself when the scaled gradients overflowed
        scaler.update()
        stepped = applied and scaler.get_scale() >= before  # a skipped step lowered the scale
        m["loss_scale"] = scaler.get_scale()
    elif applied:
        opt.step()
    if stepped:
        sched.step()
    opt.zero_grad(set_to_none=True)
    m.update({"grad_norm": grad_norm, "lr": sched.get_last_lr()[0],
              "tokens_per_s": tokens * runtime.world / (time.time() - start)})
    if runtime.device.type == "cuda":
        m["max_memory_gb"] = torch.cuda.max_memory_allocated(runtime.device) / 1024 ** 3
    return m, applied


def saved_bytes(model, args, runtime):
    """(bytes autograd keeps for backward from the policy pass of one pair, bytes of its final hidden states),
    counted by one probe forward of 2 x --max_length tokens in train mode under the run's autocast, with saved-tensor
    hooks adding up each distinct storage that is not a parameter (gradient checkpointing off meanwhile)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    body, _ = backbone_and_head(model)
    layers = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False)]
    for m in layers:
        m.gradient_checkpointing = False
    was_training = model.training
    model.train()
    try:
        ids = torch.zeros(2, args.max_length, dtype=torch.long, device=runtime.device)
        with runtime.autocast(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            hidden = body(input_ids=ids).last_hidden_state
    finally:
        for m in layers:
            m.gradient_checkpointing = True
        model.train(was_training)
    return sum(seen.values()), hidden.numel() * hidden.element_size()


def planned_activations(saved, hidden, layers, checkpointing):
    """Activation bytes per pair from the probe's counts. Under --gradient_checkpointing the layers keep their inputs
    and backward recomputes one layer at a time. Backward's working set adds about 1.5 layers' share of the saved
    tensors: what `python -m bench --memory_plan` measured across its configurations (docs/bench/memory_plan.md)."""
    kept = saved / layers + hidden * layers if checkpointing else saved
    return kept + 1.5 * saved / layers


def memory_plan(model, args, runtime):
    """Print what training will hold (weights, LoRA + AdamW, the measured activations, the risk terms' chunks) against
    what this process can use; on a CUDA device that cannot hold it, a one-line error naming the flags that help."""
    gb, device = 1024 ** 3, runtime.device
    activations = args.batch_size * planned_activations(*saved_bytes(model, args, runtime),
                                                        model.config.num_hidden_layers, args.gradient_checkpointing)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad) * 16  # fp32 value, grad, Adam m and v
    chunks = min(args.chunk_size, 2 * args.batch_size * args.max_length) * model.config.vocab_size * 4 * 8
    need = weights + trainable + activations + chunks  # chunks: fp32 logits of both models and their by-products
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_reserved(device)  # the weights are placed
    else:
        with open("/proc/meminfo") as f:
            free = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable")) + weights
    print(f"[memory] weights {weights / gb:.3g} GB, LoRA + AdamW {trainable / gb:.3g} GB, activations "
          f"{activations / gb:.3g} GB (measured: {args.batch_size} pairs x {args.max_length} tokens), risk-term chunks "
          f"~{chunks / gb:.3g} GB: about {need / gb:.3g} GB of {free / gb:.3g} GB on {device}", flush=True)
    if device.type == "cuda" and need > free:
        helps = [f for f, on in (("--load_in_4bit", not args.load_in_4bit),
                                 ("--gradient_checkpointing", not args.gradient_checkpointing),
                                 (f"--batch_size {max(1, args.batch_size // 2)} with --grad_accum "
                                  f"{2 * args.grad_accum}", args.batch_size > 1)) if on]
        raise UsageError(f"about {need / gb:.1f} GB needed but {free / gb:.1f} GB available on {device}: try "
                         + ", ".join(helps))
    return need


def metrics_line(prefix, m):
    return (f"{prefix} loss {m['loss']:.4f}, acc {m['rewards/accuracies']:.3f}, margin {m['rewards/margins']:.4f}, "
            f"kl {m['kl/chosen']:.4f}/{m['kl/rejected']:.4f}")


def total_steps(args, n_examples, world):
    return args.max_steps or max(1, math.ceil(args.epochs * max(1, n_examples // (args.batch_size * world))
                                              / args.grad_accum))


def held_out(step, loss_module, examples, args, runtime, log, pad_id):
    """The held-out metrics at `step` (main process; None without held-out pairs), logged and printed."""
    result = None
    if runtime.main and examples:
        with runtime.autocast():
            result = evaluate_pairs(loss_module, examples, args.batch_size, pad_id, runtime.device)
        log.record(step, "eval", result)
        tqdm.write(metrics_line(f"[eval] step {step}:", result), file=sys.stdout)
    runtime.barrier()
    return result


def train(model, tokenizer, args, cfg, train_examples, eval_examples, runtime, reference,
          adapter=outputs.model_adapter):
    """The loop both stages share: AdamW, warm-up then decay, accumulation, clipping, mixed precision, logging,
    held-out evaluation, periodic checkpoints with exact resume, and an atomic final save. `model` is a peft model,
    `reference` its reference (reference_pass); `adapter(model)` gives the LoRA blocks the output holds."""
    work, pad = args.out.rstrip("/") + ".tmp", tokenizer.pad_token_id
    loss_config, total = LossConfig.from_args(args), total_steps(args, len(train_examples), runtime.world)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(args, total))
    if runtime.main:
        memory_plan(model, args, runtime)
    torch.manual_seed(args.seed)  # after the plan's probe forward (its dropout draws), on every rank alike
    first_step, skipped, seconds = outputs.start_or_resume(model, opt, sched, args, cfg, runtime, work)
    if runtime.main:
        announce(cfg, args, loss_config, len(train_examples), total, runtime)
    log = outputs.Reporter(work, args.report_to, cfg) if runtime.main else None
    loss_module = PairLoss(model, loss_config, reference)
    final_eval = held_out(0, loss_module, eval_examples, args, runtime, log, pad) if first_step == 1 else None
    model.train()
    wrapped = runtime.wrap(loss_module)
    stream = data.batch_order(len(train_examples), args.batch_size, args.seed, runtime.world, runtime.rank,
                              start=(first_step - 1) * args.grad_accum)
    window, start = [], time.time()
    for step in tqdm(range(first_step, total + 1), desc=f"{cfg['stage']} stage", file=sys.stdout, mininterval=1,
                     disable=not runtime.main, initial=first_step - 1, total=total):
        micro = (data.collate([train_examples[i] for i in next(stream)], pad) for _ in range(args.grad_accum))
        with outputs.interruptible(work, step):
            m, applied = one_update(wrapped, params, opt, sched, micro, args, runtime, step)
        skipped += not applied
        if not applied:
            tqdm.write(f"[train] step {step}: non-finite loss or gradient; batch skipped ({skipped} so far)",
                       file=sys.stdout)
        window.append(m)
        if runtime.main and (step % args.log_every == 0 or step == total):
            log_window(log, step, total, window)
            window = []
        if step % args.eval_every == 0 and step != total:
            held_out(step, loss_module, eval_examples, args, runtime, log, pad)
        if args.save_every and step % args.save_every == 0 and step != total:
            outputs.save_checkpoint(work, step, model, opt, sched, cfg, runtime, skipped=skipped,
                                    seconds=seconds + time.time() - start, keep=args.save_total_limit)
    final_eval = held_out(total, loss_module, eval_examples, args, runtime, log, pad) or final_eval
    summary = {"steps": total, "seconds": round(seconds + time.time() - start, 1), "nonfinite_skipped": skipped,
               "final_eval": final_eval}
    if runtime.main:
        log.close()
        outputs.publish(adapter(model), tokenizer, cfg, work, args.out, summary, dropout=args.lora_dropout,
                        keep_checkpoints=args.keep_checkpoints)
        print(f"[train] saved {cfg['stage']} stage to {args.out}"
              + (f" ({skipped} non-finite batches skipped)" if skipped else ""), flush=True)
    runtime.barrier()
    return final_eval


def announce(cfg, args, loss_config, n_pairs, total, runtime):
    print(f"[train] {cfg['stage']} stage: {n_pairs} pairs, {total} steps of {args.batch_size} x {args.grad_accum} "
          f"pairs x {runtime.world} process(es); loss {loss_config.loss}"
          + ("" if loss_config.measure is None else f" ({loss_config.measure}, level {args.risk_level})")
          + f", beta {loss_config.beta}; {runtime.precision} on {runtime.device}", flush=True)


def log_window(log, step, total, window):
    """The mean of the steps since the last log line: to metrics.jsonl (and TensorBoard / wandb) and the terminal."""
    mean = {k: sum(x[k] for x in window) / len(window) for k in window[0]}
    log.record(step, "train", mean)
    tqdm.write(metrics_line(f"[train] step {step}/{total}:", mean) + f", grad {mean['grad_norm']:.3f}, lr "
               f"{mean['lr']:.2e}, {mean['tokens_per_s']:.0f} tok/s", file=sys.stdout)


def stage_main(prog, parser, run, argv=None):
    """A stage script's main: parse, take the output's lock, run; a user error is one line (outputs.run_script)."""
    def parse_and_run(argv):
        args = parse_args(parser, argv)
        with outputs.output_lock(args.out):
            run(args)

    return outputs.run_script(prog, parse_and_run, argv)
