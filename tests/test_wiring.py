"""How the pipeline is wired, observed from what a stage actually trained and logged: the reference each stage
used, every loss x measure through a stage with its logged values recomputed independently, summed losses, and
gradient accumulation across a resume."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from test_stages import FAST, sequence_logps, subset

import data
import merge_policies
import outputs
import risk
import stage
import train_reward_stage
import train_safety_stage

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def records(folder, split):
    with open(os.path.join(folder, outputs.METRICS_FILE)) as f:
        return [r for r in map(json.loads, f) if r["split"] == split]


def eval_batch(folder, pairs_file, preference, n):
    """The held-out pairs a stage evaluated (the first n of --eval_data), tokenised as the stage did."""
    tok = stage.load_tokenizer(folder)
    examples = data.tokenize_pairs(data.load_pairs(pairs_file, preference)[:n], tok, 48, 24)
    return data.collate(examples, tok.pad_token_id)


def test_safety_stage_trained_against_the_reward_policy(tiny_world, tmp_path_factory):
    """At step 0 the safety stage's policy and reference are both pi_r: its first held-out evaluation has zero
    log-ratio and KL, and the chosen log-probabilities of pi_r (not of the SFT model). A safety stage that started
    from, or referred to, the SFT model fails here."""
    tmp = tmp_path_factory.mktemp("wiring_safety")
    pairs = subset(tiny_world, tmp)
    reward, safety = str(tmp / "reward"), str(tmp / "safety")
    common = ["--data", pairs, "--eval_data", pairs, "--eval_pairs", "16", "--lr", "1e-2", *FAST]
    assert train_reward_stage.main(["--sft", os.path.join(tiny_world, "sft"), "--out", reward, "--max_steps", "12",
                                    *common]) == 0
    assert train_safety_stage.main(["--reward_stage", reward, "--out", safety, "--max_steps", "2", *common]) == 0
    first = records(safety, "eval")[0]
    assert first["step"] == 0 and first["kl/chosen"] == 0.0 and first["rewards/chosen"] == 0.0
    batch = eval_batch(safety, pairs, "safer", 16)
    n = batch["input_ids"].shape[0] // 2
    pi_r = sequence_logps(merge_policies.load_policy(reward), batch)[:n].mean().item()
    sft = sequence_logps(stage.load_base_model(os.path.join(tiny_world, "sft")), batch)[:n].mean().item()
    assert first["logps/chosen"] == pytest.approx(pi_r, abs=1e-4)
    assert abs(pi_r - sft) > 0.05  # the reward stage moved the policy, so the two are told apart


CASES = [("dpo", None, None), *[(loss, m, lv) for loss in ("ra_dpo1", "ra_dpo2") for m, lv in
                                 (("expectation", None), ("cvar", 0.5), ("erm", 1.0), ("cvar_radpo", 0.9))]]


@pytest.fixture(scope="module")
def pairs(tiny_world, tmp_path_factory):
    return subset(tiny_world, tmp_path_factory.mktemp("wiring"), n=40)


@pytest.mark.parametrize("loss,measure,level", CASES)
def test_every_loss_and_measure_through_a_stage(loss, measure, level, pairs, tiny_world, tmp_path):
    """A few steps of the reward stage per loss x measure. Step 0: policy = reference, so every pair's loss is
    exactly log 2 and every log-ratio, KL and risk term 0. Last step: the logged KL, risk and loss equal what
    risk.py's full-logit path computes from the saved policy and the SFT model on the same held-out pairs."""
    out = str(tmp_path / "run")
    flags = ["--loss", loss] + ([] if measure is None else ["--risk_measure", measure] +
                                ([] if level is None else ["--risk_level", str(level)]))
    argv = ["--sft", os.path.join(tiny_world, "sft"), "--data", pairs, "--eval_data", pairs, "--eval_pairs", "8",
            "--out", out, "--max_steps", "3", "--lr", "2e-2", "--beta", "0.5", *FAST, *flags]
    assert train_reward_stage.main(argv) == 0
    first, last = records(out, "eval")[0], records(out, "eval")[-1]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert first["kl/chosen"] == 0 and first["rewards/margins"] == 0
    # ERM at D = 0 is log(sum p) / mu: fp32 rounding of a sum of ~300 probabilities, over ~24 positions
    assert abs(first.get("risk/chosen", 0)) < 1e-5
    # independently: full logits of the merged policy and of the SFT model
    batch = eval_batch(out, pairs, "better", 8)
    ids, attn, mask = batch["input_ids"], batch["attention_mask"], batch["response_mask"][:, 1:]
    with torch.no_grad():
        pol = merge_policies.load_policy(out)(input_ids=ids, attention_mask=attn).logits[:, :-1]
        ref = stage.load_base_model(os.path.join(tiny_world, "sft"))(input_ids=ids, attention_mask=attn).logits[:, :-1]
    tok = (pol.log_softmax(-1) - ref.log_softmax(-1)).gather(-1, ids[:, 1:, None]).squeeze(-1)
    logratio = torch.where(mask, tok, 0).sum(-1)
    kl = risk.sequential_kl(pol, ref, mask)
    n = ids.shape[0] // 2
    assert last["kl/chosen"] == pytest.approx(kl[:n].mean().item(), rel=1e-3, abs=1e-5)
    assert abs(last["kl/chosen"]) > 1e-3  # training moved the policy
    risk_ratio = None if measure is None else risk.sequential_risk_ratio(pol, ref, mask, measure, level)
    if risk_ratio is not None:
        assert last["risk/chosen"] == pytest.approx(risk_ratio[:n].mean().item(), rel=1e-3, abs=1e-5)
        assert last["risk/rejected"] == pytest.approx(risk_ratio[n:].mean().item(), rel=1e-3, abs=1e-5)
    losses = risk.preference_loss(logratio[:n], logratio[n:], None if risk_ratio is None else risk_ratio[:n],
                                  None if risk_ratio is None else risk_ratio[n:], 0.5, 0.5, loss)[0]
    assert last["loss"] == pytest.approx(losses.mean().item(), rel=1e-3, abs=1e-5)


def test_summed_loss_is_the_sum_over_pairs(pairs, tiny_world, tmp_path):
    out = str(tmp_path / "sum")
    assert train_reward_stage.main(["--sft", os.path.join(tiny_world, "sft"), "--data", pairs, "--eval_data", pairs,
                                    "--eval_pairs", "8", "--out", out, "--max_steps", "1", "--loss_reduction", "sum",
                                    *FAST]) == 0
    assert records(out, "eval")[0]["loss"] == pytest.approx(8 * math.log(2), abs=1e-5)  # one batch of 8 pairs


def test_grad_accum_with_a_resume_in_the_middle_equals_the_uninterrupted_run(pairs, tiny_world, tmp_path):
    """--grad_accum 2, killed by SIGKILL in step 3 (after the checkpoint of step 2) and resumed: the same weights
    as without the kill; and 2 micro-batches of 4 take the same step as one batch of 8 (dropout off)."""
    def argv(out, extra=()):
        return ["--sft", os.path.join(tiny_world, "sft"), "--data", pairs, "--eval_data", pairs, "--eval_pairs", "8",
                "--out", out, "--max_steps", "4", "--lr", "1e-2", "--save_every", "2", *FAST, "--lora_dropout", "0",
                *extra]

    accum = ["--grad_accum", "2", "--batch_size", "4"]
    whole = str(tmp_path / "whole")
    assert train_reward_stage.main(argv(whole, accum)) == 0
    killed = str(tmp_path / "killed")
    run = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "faults.py"), "mid_step@3", *argv(killed, accum)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == -9, run.stderr[-2000:]
    assert train_reward_stage.main(argv(killed, [*accum, "--resume"])) == 0
    a, b = (load_file(os.path.join(x, "adapter_model.safetensors")) for x in (whole, killed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    big = str(tmp_path / "big")
    assert train_reward_stage.main(argv(big, ["--batch_size", "8"])) == 0
    c = load_file(os.path.join(big, "adapter_model.safetensors"))
    assert all(torch.allclose(a[k], c[k], atol=1e-5) for k in a)


def test_a_bf16_base_trains_fp32_lora_with_an_exact_reference(pairs, tiny_world, tmp_path):
    """--dtype bfloat16: the saved LoRA weights are fp32, the step-0 log-ratio and KL are exactly 0 (policy and
    reference are the same computation), and the terms on a bf16 base match the fp32 base's within 2 %: bf16 keeps 8
    significant bits (2^-9 = 0.2 % rounding per weight), which two layers carry to 0.5 % at most (measured); 2 % is
    four times that."""
    from peft import PeftModel

    out = str(tmp_path / "bf16")
    assert train_reward_stage.main(["--sft", os.path.join(tiny_world, "sft"), "--data", pairs, "--eval_data", pairs,
                                    "--eval_pairs", "8", "--out", out, "--max_steps", "4", "--lr", "2e-2", *FAST,
                                    "--dtype", "bfloat16"]) == 0
    assert {v.dtype for v in load_file(os.path.join(out, "adapter_model.safetensors")).values()} == {torch.float32}
    first = records(out, "eval")[0]
    assert first["kl/chosen"] == 0 and first["rewards/margins"] == 0 and first["loss"] == pytest.approx(math.log(2))
    assert outputs.read_stage(out)["args"]["dtype"] == "bfloat16"
    batch = eval_batch(out, pairs, "better", 8)
    terms = {}
    for dtype in (torch.float32, torch.bfloat16):
        base = stage.load_base_model(os.path.join(tiny_world, "sft"), dtype=dtype, fp32_head=True)
        model = PeftModel.from_pretrained(base, out)
        assert model.get_output_embeddings().weight.dtype == torch.float32  # the head stays fp32
        with torch.no_grad():
            terms[dtype] = stage.batch_terms(model.eval(), batch, stage.LossConfig(measure="cvar", level=0.5),
                                           train_reward_stage.AdapterOff())[:3]
    for full, half in zip(terms[torch.float32], terms[torch.bfloat16]):
        assert torch.allclose(half, full, rtol=0.02, atol=1e-3)
        assert full.abs().max() > 0.01  # terms that training moved


def test_the_vocabulary_projection_runs_in_fp32_under_bf16_autocast():
    """risk.sequence_terms under bf16 autocast gives the fp32 terms (autocast is off for the heads): a bf16
    projection would round logits of sd ~5 to about 0.02 and add a spurious KL between identical heads."""
    g = torch.Generator().manual_seed(3)
    n, t, h, v = 2, 6, 64, 500
    hid_pi, hid_ref = torch.randn(n, t, h, generator=g), torch.randn(n, t, h, generator=g)
    head = torch.nn.Linear(h, v, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(v, h, generator=g) * 0.7)  # logits of sd ~5.6
    labels, mask = torch.randint(0, v, (n, t), generator=g), torch.ones(n, t, dtype=torch.bool)
    with torch.no_grad():
        full = risk.sequence_terms(hid_pi, hid_ref, head, head, labels, mask, "cvar", 0.5)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            auto = risk.sequence_terms(hid_pi, hid_ref, head, head, labels, mask, "cvar", 0.5)
    for a, b in zip(full, auto):
        assert torch.allclose(a, b, atol=1e-5)
    # what the autocast projection would have cost: the KL between an fp32 head and its bf16-rounded self
    logits = head(hid_pi)
    spurious = risk.sequential_kl(logits.to(torch.bfloat16).float(), logits, mask)
    assert spurious.min() > 1e-5 * t
