"""Precision on the GPU path, checked on the CPU: which precision and dtype `auto` picks, the fp16 gradient scaler's
step (a non-finite loss counted, an overflow left to the scaler, the schedule held), its state in checkpoints, and
the fp32 projection of a tied head under a 16-bit base."""

import argparse

import pytest
import torch

import outputs
import stage


def test_auto_picks_bf16_only_where_the_gpu_has_it(monkeypatch):
    """A V100 or T4 can make bf16 tensors (emulated) but has no bf16 tensor cores: auto is fp16 there, with fp16
    weights (not bf16 weights under fp16 autocast); --precision fp32 loads fp32 weights."""
    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for native, precision, dtype in ((False, "fp16", torch.float16), (True, "bf16", torch.bfloat16)):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True, n=native:
                            n or including_emulation)
        assert stage.resolve_precision("auto", cuda) == precision
        assert stage.resolve_dtype("auto", cuda) == dtype
        assert stage.resolve_dtype("auto", cuda, "fp32") == torch.float32
    assert stage.resolve_precision("auto", torch.device("cpu")) == "fp32"
    assert stage.resolve_dtype("auto", torch.device("cpu"), "bf16") == torch.float32


class Overflow(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


class Scalar(torch.nn.Module):
    """A loss module with one weight whose loss (or only its gradient) can be made non-finite."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(2))
        self.mode = "finite"

    def forward(self, batch):
        loss = (self.w ** 2).sum()
        if self.mode == "nan_loss":
            loss = loss * float("nan")
        elif self.mode == "inf_grad":  # a finite loss whose backward overflows, as fp16 gradients do
            loss = Overflow.apply(self.w ** 2).sum()
        return loss, {"loss": loss.detach()}


def scaled_step(module, runtime, opt, sched):
    args = argparse.Namespace(grad_accum=1, loss_reduction="mean", max_grad_norm=1.0, skip_nonfinite=False,
                              out="unused")
    batch = {"attention_mask": torch.ones(1, 1)}
    return stage.one_update(module, list(module.parameters()), opt, sched, [batch], args, runtime, 1)


def fp16_runtime(init_scale=1024.0):
    runtime = stage.Runtime("fp32")
    runtime.scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)  # the fp16 path's scaler, on the CPU
    return runtime


def test_under_the_scaler_a_nonfinite_loss_stops_and_an_overflow_holds_the_schedule():
    module, runtime = Scalar(), fp16_runtime()
    opt = torch.optim.SGD(module.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    m, applied = scaled_step(module, runtime, opt, sched)
    assert applied and sched.last_epoch == 1 and not torch.equal(module.w.detach(), torch.ones(2))
    w = module.w.detach().clone()
    module.mode = "inf_grad"
    m, applied = scaled_step(module, runtime, opt, sched)
    assert applied and torch.equal(module.w.detach(), w)  # the scaler skipped the optimizer step
    assert sched.last_epoch == 1 and m["loss_scale"] == 512.0  # the schedule held, the scale halved
    module.mode = "nan_loss"
    with pytest.raises(outputs.UsageError, match="non-finite loss at step 1"):
        scaled_step(module, runtime, opt, sched)


def test_the_scaler_state_travels_in_checkpoints(tmp_path):
    module, runtime = Scalar(), fp16_runtime(init_scale=256.0)
    opt = torch.optim.AdamW(module.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    outputs.save_checkpoint(str(tmp_path), 3, module, opt, sched, {"c": 1}, runtime, skipped=0, seconds=1.5)
    later = fp16_runtime(init_scale=65536.0)
    trainer = outputs.load_checkpoint(outputs.latest_checkpoint(str(tmp_path)), module, opt, sched, {"c": 1}, later)
    assert trainer["step"] == 3 and trainer["seconds"] == 1.5 and later.scaler.get_scale() == 256.0


def test_a_tied_head_projects_in_fp32_under_a_16bit_base(tmp_path):
    """A tied head (SmolLM2's) gets an untied fp32 copy for training, equal to the embedding, and stays out of the
    trainable weights; without it the risk terms would project bf16 logits."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "tied")
    model = stage.load_base_model(str(tmp_path / "tied"), dtype=torch.bfloat16, fp32_head=True)
    lora = argparse.Namespace(seed=0, lora_r=4, lora_alpha=8.0, lora_dropout=0.0, lora_target_modules="all-linear",
                              load_in_4bit=False, gradient_checkpointing=False)
    model = stage.add_lora(model, lora)
    _, head = stage.backbone_and_head(model)
    embedding = model.get_input_embeddings().weight
    assert head.weight.dtype == torch.float32 and embedding.dtype == torch.bfloat16
    assert head.weight is not embedding and torch.equal(head.weight.bfloat16(), embedding)
    assert not head.weight.requires_grad
    plain = stage.load_base_model(str(tmp_path / "tied"), dtype=torch.bfloat16)  # for evaluation: tied, as saved
    assert plain.get_output_embeddings().weight is plain.get_input_embeddings().weight
