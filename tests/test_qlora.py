"""QLoRA (--load_in_4bit) on the CPU: gradients through 4-bit layers, both stages on a 4-bit base (the reference is
pi_r there too), exact resume after SIGKILL, merging and evaluation. bitsandbytes' CPU kernels stand in for the
CUDA ones: this tests the plumbing (k-bit preparation, Linear4bit under LoRA, the stacked reference, checkpoints),
not CUDA numerics or memory."""

import json
import os
import subprocess
import sys

import pytest
import torch
from test_reliability import adapter, argv_for, same_weights
from test_stages import FAST, eval_records, subset

import evaluate
import merge_policies
import outputs
import stage
import train_reward_stage
import train_safety_stage

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def lora_grads(model, ids):
    """The LoRA gradients of one train-mode step, after an eval-mode forward without grad (as a reference pass)."""
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def lora_on(model):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear"))
    with torch.no_grad():  # B away from zero, so every LoRA factor gets a gradient
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(0.1 * torch.randn_like(p))
    return model


@pytest.mark.filterwarnings("ignore:.*gemv_4bit.*:UserWarning")  # the warning of the broken half, expected
def test_lora_gradients_through_4bit_layers_match_an_fp32_model_of_the_dequantised_weights(tmp_path):
    """With the setting stage.load_base_model applies, LoRA gradients through nf4 layers equal those of an fp32 model
    holding the de-quantised weights (fp32 compute: only summation order differs). Without it, bitsandbytes' CPU
    inference repacking (AVX512-BF16 CPUs) drops the gradient through every 4-bit layer after an eval-mode forward."""
    from bitsandbytes.functional import dequantize_4bit, has_avx512bf16
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "m")  # widths of 64 or more: bnb's CPU packing needs them
    ids = torch.randint(0, 96, (2, 16))

    def four_bit():
        return stage.load_base_model(str(tmp_path / "m"), load_in_4bit=True, compute_dtype=torch.float32)

    quantised = four_bit()
    twin = stage.load_base_model(str(tmp_path / "m"))
    linears = {n: m for n, m in quantised.named_modules() if type(m).__name__ == "Linear4bit"}
    assert linears and all(not m.support_avx512bf16_for_cpu for m in linears.values())
    with torch.no_grad():
        for n, m in linears.items():
            twin.get_submodule(n).weight.copy_(dequantize_4bit(m.weight.data, m.weight.quant_state))
    want = lora_grads(lora_on(twin), ids)
    got = lora_grads(lora_on(quantised), ids)
    assert got.keys() == want.keys() and len(got) == 28  # A and B of 7 linears x 2 layers
    for n in got:
        assert torch.allclose(got[n], want[n], rtol=1e-3, atol=1e-6), n
    if not has_avx512bf16():
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes never repacks here, so there is nothing to undo")
    broken = four_bit()
    for m in broken.modules():
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = True  # bitsandbytes' own default on this CPU
    bad = lora_grads(lora_on(broken), ids)
    worst = max(((bad[n] - want[n]).norm() / want[n].norm()).item() for n in want)
    assert worst > 0.05  # without the setting, gradients are silently wrong


@pytest.fixture(scope="module")
def qlora(tiny_world, tmp_path_factory):
    """Both stages, 4-bit, on the tiny world: reward stage uninterrupted, and a safety stage on it."""
    tmp = tmp_path_factory.mktemp("qlora")
    pairs = subset(tiny_world, tmp)
    reward = str(tmp / "reward")
    assert train_reward_stage.main(argv_for(tiny_world, pairs, reward, extra=["--load_in_4bit"])) == 0
    safety = str(tmp / "safety")
    assert train_safety_stage.main(["--reward_stage", reward, "--data", pairs, "--eval_data", pairs, "--eval_pairs",
                                    "8", "--out", safety, "--max_steps", "4", "--lr", "1e-2", "--load_in_4bit",
                                    *FAST]) == 0
    return {"pairs": pairs, "reward": reward, "safety": safety, "tmp": tmp}


def test_both_stages_train_on_a_4bit_base_and_the_safety_reference_is_pi_r(qlora):
    for name in ("reward", "safety"):
        first, last = eval_records(qlora[name])[0], eval_records(qlora[name])[-1]
        # at step 0 the policy is its reference exactly: the new adapter is zero and the reference pass runs the
        # same 4-bit kernels (a reference that is not pi_r, or a repacked inference kernel, moves these off 0)
        assert first["step"] == 0 and first["rewards/margins"] == 0 and first["kl/chosen"] < 1e-6, (name, first)
        assert last["kl/chosen"] > 1e-4, name  # and training moved it
        assert outputs.read_stage(qlora[name])["args"]["load_in_4bit"]
    assert outputs.read_stage(qlora["safety"])["reference"].startswith("the reward-stage policy")
    assert all(torch.isfinite(v).all() for v in adapter(qlora["safety"]).values())


def test_a_killed_4bit_run_resumes_to_the_uninterrupted_weights(qlora, tiny_world):
    out = str(qlora["tmp"] / "killed")
    argv = argv_for(tiny_world, qlora["pairs"], out, extra=["--load_in_4bit"])
    run = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "faults.py"), "mid_step@5", *argv],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == -9, run.stderr[-2000:]
    assert train_reward_stage.main([*argv, "--resume"]) == 0
    assert same_weights(adapter(out), adapter(qlora["reward"]))


def test_4bit_outputs_merge_and_evaluate(qlora, tiny_world):
    mix = str(qlora["tmp"] / "mix")
    assert merge_policies.main(["--first", qlora["reward"], "--second", qlora["safety"], "--q", "0.5",
                                "--out", mix]) == 0
    out = str(qlora["tmp"] / "eval")
    assert evaluate.main(["--policies", qlora["reward"], qlora["safety"], os.path.join(mix, "q0.5"), "--prompts",
                          tiny_world, "--num_samples", "1", "--max_new_tokens", "6", "--max_prompts", "4",
                          "--no_plots", "--out", out]) == 0
    results = json.load(open(os.path.join(out, "results.json")))
    assert [r["policy"] for r in results] == ["reward", "safety", "q0.5"]
    assert all(r["num_samples"] == 4 and r["mean_cost"] is not None for r in results)
