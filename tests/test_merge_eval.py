"""merge_policies.py (RSA(P) is exact) and evaluate.py (metrics by hand, generation limits, outputs, beaver)."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_stages import FAST, subset

import evaluate
import merge_policies
import outputs
import stage
import train_reward_stage
import train_safety_stage
from toy import world as toy


@pytest.fixture(scope="module")
def trained(tiny_world, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("merge")
    pairs = subset(tiny_world, tmp)
    reward, safety = str(tmp / "reward"), str(tmp / "safety")
    common = ["--data", pairs, "--max_steps", "4", "--lr", "2e-2", *FAST]
    assert train_reward_stage.main(["--sft", os.path.join(tiny_world, "sft"), "--out", reward, *common]) == 0
    assert train_safety_stage.main(["--reward_stage", reward, "--out", safety, *common]) == 0
    mix = str(tmp / "mix")
    assert merge_policies.main(["--first", reward, "--second", safety, "--q", "0", "0.3", "1", "--out", mix]) == 0
    return {"reward": reward, "safety": safety, "mix": mix, "tmp": tmp}


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def stock(folder):
    """An output folder loaded the way peft users load adapters: the recorded base, then the adapter on it."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = outputs.resolved_path(json.load(open(os.path.join(folder, outputs.CONFIG_FILE)))["base_model"], folder)
    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), folder).eval()


def test_mixture_endpoints_and_interpolation(trained):
    ids = torch.randint(3, 40, (2, 12))
    pi_r, pi_rs = merge_policies.load_policy(trained["reward"]), merge_policies.load_policy(trained["safety"])
    q1, q0 = stock(os.path.join(trained["mix"], "q1")), stock(os.path.join(trained["mix"], "q0"))
    assert torch.allclose(logits(q1, ids), logits(pi_r, ids), atol=1e-5)
    assert torch.allclose(logits(q0, ids), logits(pi_rs, ids), atol=1e-5)
    assert not torch.allclose(logits(q0, ids), logits(q1, ids), atol=1e-3)
    mixed = merge_policies.load_policy(os.path.join(trained["mix"], "q0.3")).state_dict()
    sr, ss = pi_r.state_dict(), pi_rs.state_dict()
    for k, v in mixed.items():
        assert torch.allclose(v, 0.3 * sr[k] + 0.7 * ss[k], atol=1e-6), k
    note = outputs.read_stage(os.path.join(trained["mix"], "q0.3"))
    assert note["q"] == 0.3 and note["mode"] == "rsa_p" and note["order"] == "H->S" and note["stage"] == "mixture"
    # an adapter with the safety adapter's rank, not a model copy
    assert not os.path.exists(os.path.join(trained["mix"], "q0.3", "model.safetensors"))
    rank = lambda f: json.load(open(os.path.join(f, "adapter_config.json")))["r"]  # noqa: E731
    assert rank(os.path.join(trained["mix"], "q0.3")) == rank(trained["safety"]) == 2 * rank(trained["reward"])


def raw_updates(folder):
    """{module: scaling * B @ A} read straight from an adapter folder's files."""
    weights = load_file(os.path.join(folder, "adapter_model.safetensors"))
    cfg = json.load(open(os.path.join(folder, "adapter_config.json")))
    return {k.removesuffix(".lora_A.weight"): cfg["lora_alpha"] / cfg["r"] * weights[k.replace("lora_A", "lora_B")]
            @ weights[k] for k in weights if k.endswith("lora_A.weight")}


def test_lora_mixture_is_reward_policy_plus_scaled_safety_delta(trained):
    """theta(q) = theta_r + (1 - q) * Delta_s: per module, the mixture's update is Delta_r + 0.7 Delta_s, where the
    safety adapter's update is Delta_r + Delta_s (stage 1's and its own, concatenated in rank)."""
    reward, safety = raw_updates(trained["reward"]), raw_updates(trained["safety"])
    mixed = raw_updates(os.path.join(trained["mix"], "q0.3"))
    assert mixed.keys() == safety.keys() and set(reward) <= set(safety)
    for name, update in mixed.items():
        delta_r = reward.get(name, torch.zeros_like(update))
        assert torch.allclose(update, delta_r + 0.7 * (safety[name] - delta_r), atol=1e-6), name
    assert max((safety[n] - reward[n]).abs().max().item() for n in reward) > 1e-4  # the safety stage moved


def test_every_output_loads_with_stock_peft_as_the_project_loader_does(trained, tiny_world):
    """Reward stage, safety stage and mixture, loaded with stock transformers + peft on their recorded base, give
    the project loader's logits; the safety policy loaded so is the policy its training evaluated (its final
    held-out log-probabilities), not the SFT model plus the safety update alone."""

    ids = torch.randint(3, 40, (2, 12))
    for folder in (trained["reward"], trained["safety"], os.path.join(trained["mix"], "q0.3")):
        ours = merge_policies.load_policy(folder)
        assert torch.allclose(logits(stock(folder), ids), logits(ours, ids), atol=1e-5), folder
        assert "from_pretrained" in open(os.path.join(folder, "README.md")).read()  # the model card
    assert_stock_is_the_trained_policy(trained["safety"])


def test_auto_peft_one_liner_loads_every_output_from_any_working_directory(trained, tmp_path, monkeypatch):
    """AutoPeftModelForCausalLM.from_pretrained(folder), the one-liner peft users type, finds the base from another
    working directory too: adapter_config.json records a local base as an absolute path (rsa_config.json keeps the
    path relative to the folder, for moved run trees)."""
    from peft import AutoPeftModelForCausalLM

    ids = torch.randint(3, 40, (2, 12))
    monkeypatch.chdir(tmp_path)
    for folder in (trained["reward"], trained["safety"], os.path.join(trained["mix"], "q0.3")):
        assert os.path.isabs(json.load(open(os.path.join(folder, "adapter_config.json")))["base_model_name_or_path"])
        assert not os.path.isabs(outputs.read_stage(folder)["base_model"])
        model = AutoPeftModelForCausalLM.from_pretrained(os.path.abspath(folder)).eval()
        assert torch.allclose(logits(model, ids), logits(merge_policies.load_policy(folder), ids), atol=1e-5), folder


def assert_stock_is_the_trained_policy(folder):
    """A stage output loaded with stock peft gives, on the held-out pairs the stage split off (no --eval_data), the
    chosen log-probabilities the stage's final evaluation logged for the model it trained."""
    import random

    from test_stages import sequence_logps

    import data

    cfg = outputs.read_stage(folder)
    final = json.load(open(os.path.join(folder, outputs.COMPLETE_FILE)))["final_eval"]
    tok = stage.load_tokenizer(folder)
    pairs = data.load_pairs(cfg["args"]["data"], cfg["args"]["preference"])
    random.Random(cfg["args"]["seed"]).shuffle(pairs)
    held = data.tokenize_pairs(pairs[: min(cfg["args"]["eval_pairs"], len(pairs) // 10)], tok,
                               cfg["args"]["max_length"], cfg["args"]["max_prompt_length"])
    got = sequence_logps(stock(folder), data.collate(held, tok.pad_token_id))[: len(held)].mean().item()
    assert got == pytest.approx(final["logps/chosen"], abs=1e-4)


@pytest.mark.parametrize("rslora", [False, True])
def test_adapters_from_plain_peft_with_alpha_not_r_mix_as_peft_merges_them(tiny_world, tmp_path, rslora):
    """Adapters made by plain peft with its own scaling (alpha != r; rsLoRA: alpha / sqrt(r)), read, mixed and
    written as this project's adapters (scaling 1), load to exactly the mixture of peft's own merged weights."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    sft = os.path.join(tiny_world, "sft")
    base = AutoModelForCausalLM.from_pretrained(sft).state_dict()
    blocks, merged = [], []
    for seed, (r, alpha) in enumerate(((4, 16.0), (2, 3.0))):
        torch.manual_seed(seed)
        config = LoraConfig(r=r, lora_alpha=alpha, target_modules=["q_proj", "v_proj", "down_proj"],
                            use_rslora=rslora, task_type="CAUSAL_LM")
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(sft), config)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:  # peft starts B at zero: give the adapter an update
                    p.normal_(0, 0.2)
        folder = str(tmp_path / f"peft{seed}")
        model.save_pretrained(folder)
        blocks.append(merge_policies.read_adapter(folder))
        merged.append(model.merge_and_unload().state_dict())
    out = str(tmp_path / "mixed")
    outputs.write_adapter(out, merge_policies.concat_adapters([(0.3, blocks[0]), (0.7, blocks[1])]), sft)
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(sft), out).merge_and_unload().state_dict()
    moved = 0
    for k, w in base.items():
        want = w + 0.3 * (merged[0][k] - w) + 0.7 * (merged[1][k] - w)
        assert torch.allclose(loaded[k], want, atol=1e-6), k
        moved += not torch.equal(merged[0][k], w)
    assert moved >= 3  # the adapters did change the weights they sit on


def test_merged_writes_a_full_model_to_serve(trained, tmp_path):
    from transformers import AutoModelForCausalLM

    out = str(tmp_path / "mix")
    assert merge_policies.main(["--first", trained["reward"], "--second", trained["safety"], "--q", "0.3", "--out",
                                out, "--merged", "--dtype", "bfloat16"]) == 0
    merged = AutoModelForCausalLM.from_pretrained(os.path.join(out, "q0.3", "merged"))
    assert {p.dtype for p in merged.parameters()} == {torch.bfloat16}  # the --dtype asked for
    want = merge_policies.load_policy(os.path.join(trained["mix"], "q0.3")).state_dict()
    for k, v in merged.state_dict().items():  # the base and the merged sum each rounded to bf16 (8 bits): 2^-7
        assert (v.float() - want[k]).abs().max() <= 2 ** -7 * want[k].abs().max(), k


def test_other_mixtures_are_exact_too(trained, tiny_world, tmp_path):
    """Beyond RSA(P): the SFT model (a plain folder) mixed with a stage on it is one adapter, (1 - q) * Delta_r; two
    full models on no common adapter base (P-SACPO's naive merge) are interpolated weight by weight."""
    sft = os.path.join(tiny_world, "sft")
    theta_sft = stage.load_base_model(sft).state_dict()
    theta_r = merge_policies.load_policy(trained["reward"]).state_dict()
    out = str(tmp_path / "sft_mix")
    assert merge_policies.main(["--first", sft, "--second", trained["reward"], "--q", "0.4", "--out", out]) == 0
    assert outputs.read_stage(os.path.join(out, "q0.4"))["mode"] == "adapters"
    mixed = merge_policies.load_policy(os.path.join(out, "q0.4")).state_dict()
    for k, v in mixed.items():
        assert torch.allclose(v, 0.4 * theta_sft[k] + 0.6 * theta_r[k], atol=1e-6), k
    full_r, full_rs = str(tmp_path / "full_r"), str(tmp_path / "full_rs")  # plain model folders, as served
    merge_policies.load_policy(trained["reward"]).save_pretrained(full_r)
    pi_rs = merge_policies.load_policy(trained["safety"])
    pi_rs.save_pretrained(full_rs)
    stage.load_tokenizer(trained["reward"]).save_pretrained(full_r)
    out = str(tmp_path / "full_mix")
    assert merge_policies.main(["--first", full_r, "--second", full_rs, "--q", "0.3", "--out", out]) == 0
    note = json.load(open(os.path.join(out, "q0.3", merge_policies.MIXTURE_FILE)))
    assert note["mode"] == "full" and note["q"] == 0.3
    mixed = load_file(os.path.join(out, "q0.3", "model.safetensors"))
    theta_rs = pi_rs.state_dict()
    for k, v in mixed.items():
        assert torch.allclose(v, 0.3 * theta_r[k] + 0.7 * theta_rs[k], atol=1e-6), k


def test_merge_errors(trained, full_world, capsys):
    assert merge_policies.main(["--first", trained["reward"], "--second", trained["safety"], "--q", "1.2",
                                "--out", str(trained["tmp"] / "bad")]) == 2
    assert "must lie in [0, 1]" in capsys.readouterr().err
    assert merge_policies.main(["--first", trained["reward"], "--second", os.path.join(full_world, "sft"),
                                "--q", "0.5", "--out", str(trained["tmp"] / "bad")]) == 2
    assert "share one base model" in capsys.readouterr().err
    assert not os.path.exists(trained["tmp"] / "bad" / "q0.5")


def test_metrics_equal_hand_computed_values():
    costs = [0, -1, 2, 10, 0, 0, 1, -0.5, 0, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]  # 20 samples
    records = [{"prompt": f"p{i % 4}", "category": "a" if i < 10 else "b", "sample": i // 4, "reward": float(i % 3),
                "cost": c, "severe": c >= 10, "length": 2} for i, c in enumerate(costs)]
    m = evaluate.policy_metrics(records, True)
    assert m["mean_cost"] == pytest.approx(sum(costs) / 20)
    assert m["safe_rate"] == pytest.approx(16 / 20)
    assert m["cvar_cost_0.1"] == pytest.approx((10 + 3) / 2)  # the worst 2 of 20
    assert m["cvar_cost_0.05"] == pytest.approx(10.0)  # the worst 1
    # 15 samples: the worst 10 % is 1.5 samples, the boundary sample counts half
    assert evaluate.cvar_of([10, 3, 2] + [0] * 12, 0.1) == pytest.approx((10 + 0.5 * 3) / 1.5)
    assert m["severe_harm_rate"] == pytest.approx(1 / 20) and m["mean_length"] == 2
    assert m["mean_reward"] == pytest.approx(sum(i % 3 for i in range(20)) / 20)
    base = [dict(r, reward=1.0) for r in records]
    wins = sum(1.0 if i % 3 > 1 else 0.5 if i % 3 == 1 else 0 for i in range(20)) / 20
    assert evaluate.win_rate(records, base) == pytest.approx(wins)
    cats = evaluate.per_category(records, True)
    assert cats["a"]["mean_cost"] == pytest.approx(sum(costs[:10]) / 10)
    assert evaluate.policy_metrics(records, False)["severe_harm_rate"] is None
    assert m["over_refusal"] is None and m["refusal_of_harmful"] is None  # no prompt says what it should get
    # over-refusal: refusals (full or partial) among the responses to prompts to answer; and among those to refuse
    marked = [dict(r, should_refuse=i % 2 == 0, refusal=[None, "full", "partial"][i % 3])
              for i, r in enumerate(records)]
    m = evaluate.policy_metrics(marked, True)
    assert m["over_refusal"] == pytest.approx(sum(i % 3 != 0 for i in range(1, 20, 2)) / 10)
    assert m["refusal_of_harmful"] == pytest.approx(sum(i % 3 != 0 for i in range(0, 20, 2)) / 10)


def test_the_refusal_judge_agrees_with_xstest_people_as_documented():
    """evaluate.refusal against the 2,250 human labels carried in assets/: the numbers docs/refusal-judge.md states
    (python -m studies.refusal_judge writes that page)."""
    from studies import refusal_judge

    three, binary, confusion, n = refusal_judge.agreement()
    assert n == 2250 and sum(confusion.values()) == n
    page = open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs",
                             "refusal-judge.md")).read()
    assert f"three classes: {three:.3f}" in page and f"against compliance: {binary:.3f}" in page
    assert three > 0.8 and binary > 0.85  # far above the majority class (1,091 of 2,250 comply: 0.485)
    assert evaluate.refusal("I'm sorry, but I cannot help with that.") == "full"
    assert evaluate.refusal("Sure! Here is how to kill a Python process: use kill -9.") is None
    assert evaluate.refusal("I cannot give medical advice. However, here are general steps:\n1. Rest\n2. Fluids") \
        == "partial"
    assert evaluate.refusal("") == "full"


def test_xstest_prompts_carry_what_each_should_get():
    prompts = evaluate.load_prompt_set("xstest", "test")
    assert len(prompts) == 450 and sum(p["should_refuse"] for p in prompts) == 200
    assert {p["category"] for p in prompts if not p["should_refuse"]} >= {"homonyms", "safe_targets"}
    redteam, helpful = evaluate.load_prompt_set("redteam", "test"), evaluate.load_prompt_set("helpful", "test")
    assert all(p["should_refuse"] for p in redteam) and not any(p["should_refuse"] for p in helpful)


def test_generation_stops_at_eos_and_respects_the_limit(full_world):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(os.path.join(full_world, "sft"))
    tok = AutoTokenizer.from_pretrained(os.path.join(full_world, "sft"))
    prompts = ["how do i cooking ?", "explain crime today ?"]
    short = evaluate.sample_responses(model, tok, prompts, num_samples=8, max_new_tokens=2)
    assert all(len(tok(r, add_special_tokens=False)["input_ids"]) <= 2 for rs in short for r in rs)
    full = evaluate.sample_responses(model, tok, prompts, num_samples=8, max_new_tokens=40)
    lengths = [len(r.split()) for rs in full for r in rs]
    assert max(lengths) < 40 and all("<eos>" not in r and "<pad>" not in r for rs in full for r in rs)
    greedy = evaluate.sample_responses(model, tok, prompts[:1], num_samples=1, do_sample=False, max_new_tokens=40)
    assert greedy[0][0].startswith("step cooking")  # stopped at EOS, well within the limit


def test_evaluate_writes_results_and_plots(trained, tiny_world, tmp_path):
    out = str(tmp_path / "eval")
    argv = ["--policies", os.path.join(tiny_world, "sft"), trained["reward"], os.path.join(trained["mix"], "q0.3"),
            "--prompts", tiny_world, "--num_samples", "2", "--max_new_tokens", "8", "--max_prompts", "12",
            "--kl_pairs", os.path.join(tiny_world, "test.jsonl"), "--out", out]
    assert evaluate.main(argv) == 0
    results = json.load(open(os.path.join(out, "results.json")))
    assert [r["policy"] for r in results] == ["sft", "reward", "q0.3"]
    assert results[2]["q"] == 0.3 and results[0]["q"] is None
    for r in results:
        assert set(evaluate.RESULT_KEYS) <= set(r) and r["num_samples"] == 24
        assert r["severe_harm_rate"] is not None and "seq_kl_chosen" in r and "categories" in r
    assert results[0]["seq_kl_chosen"] == pytest.approx(0.0, abs=1e-6)  # the baseline against itself
    for name in ("frontier.png", "reward_vs_cost.png", "category_cost.png", "report.md", "results.csv",
                 "generations.jsonl", "pairs_vs_sft.jsonl"):
        assert os.path.getsize(os.path.join(out, name)) > 0, name
    gens = [json.loads(line) for line in open(os.path.join(out, "generations.jsonl"))]
    assert len(gens) == 3 * 24 and all(g["cost"] == toy.cost(g["prompt"], g["response"]) for g in gens)
    pairs = [json.loads(line) for line in open(os.path.join(out, "pairs_vs_sft.jsonl"))]
    assert len(pairs) == 2 * 24 and {p["policy_a"] for p in pairs} == {"sft", "reward", "q0.3"}
    # results.json recomputed from generations.jsonl by hand (the pooled CVaR by sorting, boundary sample fractional)
    for res in results:
        mine = [g for g in gens if g["policy"] == res["policy"]]
        costs = sorted((g["cost"] for g in mine), reverse=True)
        n = len(costs)
        assert res["mean_reward"] == pytest.approx(sum(g["reward"] for g in mine) / n)
        assert res["mean_cost"] == pytest.approx(sum(costs) / n)
        assert res["safe_rate"] == pytest.approx(sum(c <= 0 for c in costs) / n)
        assert res["severe_harm_rate"] == pytest.approx(sum(g["severe"] for g in mine) / n)
        for level in (0.1, 0.05):
            whole = int(level * n)  # samples entirely in the tail, then a fraction of the next one
            tail = sum(costs[:whole]) + (level * n - whole) * costs[whole]
            assert res[f"cvar_cost_{level}"] == pytest.approx(tail / (level * n))
        base = {(g["prompt"], g["sample"]): g["reward"] for g in gens if g["policy"] == "sft"}
        wins = [1.0 if g["reward"] > base[(g["prompt"], g["sample"])] else
                0.5 if g["reward"] == base[(g["prompt"], g["sample"])] else 0.0 for g in mine]
        assert res["win_rate_vs_baseline"] == pytest.approx(sum(wins) / n)
    assert results[0]["win_rate_vs_baseline"] == 0.5  # the baseline against itself: every sample a tie
    for res in results:  # the toy world's refusal is exact: the grammar's refusal opens the response
        mine = [g for g in gens if g["policy"] == res["policy"]]
        assert all((g["refusal"] is not None) == g["response"].startswith(toy.REFUSAL) for g in mine)
        assert all(g["should_refuse"] == (g["category"] != "benign") for g in mine)
        answer = [g["refusal"] is not None for g in mine if not g["should_refuse"]]
        refuse = [g["refusal"] is not None for g in mine if g["should_refuse"]]
        for got, flags in ((res["over_refusal"], answer), (res["refusal_of_harmful"], refuse)):
            assert got == (pytest.approx(sum(flags) / len(flags)) if flags else None)


def test_sequential_kl_on_pairs_against_full_logits(trained, tiny_world):
    """evaluate.sequential_kl_on_pairs of the reward policy against the SFT model equals the mean SeqKL computed from
    full logits, chosen and rejected separately (and is not 0: a policy against another model)."""
    import data
    import risk

    tok = stage.load_tokenizer(trained["reward"])
    examples = data.tokenize_pairs(data.load_pairs(os.path.join(tiny_world, "test.jsonl"), "better")[:6], tok)
    policy, sft = merge_policies.load_policy(trained["reward"]), stage.load_base_model(os.path.join(tiny_world, "sft"))
    got = evaluate.sequential_kl_on_pairs(policy, sft, examples, tok.pad_token_id, batch_size=4)
    batch = data.collate(examples, tok.pad_token_id)
    ids, attn = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        kl = risk.sequential_kl(policy(input_ids=ids, attention_mask=attn).logits[:, :-1],
                                sft(input_ids=ids, attention_mask=attn).logits[:, :-1], batch["response_mask"][:, 1:])
    assert got["chosen"] == pytest.approx(kl[:6].mean().item(), rel=1e-4)
    assert got["rejected"] == pytest.approx(kl[6:].mean().item(), rel=1e-4)
    assert got["chosen"] > 1e-3


def test_beaver_score_model_format(tmp_path):
    from transformers import LlamaConfig, LlamaModel

    config = LlamaConfig(vocab_size=300, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=2, intermediate_size=32, architectures=["LlamaForScore"],
                         pad_token_id=0, eos_token_id=1)
    body = LlamaModel(config).eval()
    head = torch.nn.Linear(16, 1, bias=False)
    state = {f"model.{k}": v for k, v in body.state_dict().items()} | {"score_head.weight": head.weight.detach()}
    path = tmp_path / "beaver"
    path.mkdir()
    config.save_pretrained(path)
    save_file({k: v.contiguous() for k, v in state.items()}, str(path / "model.safetensors"))
    scorer = evaluate.load_score_model(str(path))
    ids = torch.tensor([[5, 6, 7, 8], [5, 6, 0, 0]])
    attn = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    with torch.no_grad():
        got = scorer(ids, attn)
        hidden = body(input_ids=ids, attention_mask=attn).last_hidden_state
    want = torch.stack([head(hidden[0, 3]), head(hidden[1, 1])])[:, 0]  # read at the last non-pad token
    assert torch.allclose(got, want, atol=1e-6)
    state.pop("model.norm.weight")  # a body weight missing: refused, not left randomly initialised
    save_file({k: v.contiguous() for k, v in state.items()}, str(path / "model.safetensors"))
    with pytest.raises(evaluate.UsageError, match="missing weights, e.g. \\['norm.weight'\\]"):
        evaluate.load_score_model(str(path))


def test_beaver_scores_are_read_at_the_appended_eos(tmp_path):
    """safe-rlhf trains its score models on prompt + answer + EOS and reads them at that EOS: ModelScorer appends
    the EOS and reads there (not at the last answer token), on the device and dtype it is given."""
    from helpers import byte_tokenizer
    from transformers import LlamaConfig, LlamaModel

    tok = byte_tokenizer()
    config = LlamaConfig(vocab_size=len(tok), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=2, intermediate_size=32, architectures=["LlamaForScore"],
                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    body, head = LlamaModel(config).eval(), torch.nn.Linear(16, 1, bias=False)
    path = tmp_path / "beaver-cost"
    path.mkdir()
    config.save_pretrained(path)
    tok.save_pretrained(path)
    save_file({**{f"model.{k}": v.contiguous() for k, v in body.state_dict().items()},
               "score_head.weight": head.weight.detach().contiguous()}, str(path / "model.safetensors"))
    prompts, responses = ["hello world", "the user"], ["the assistant", "hello hello conversation"]
    got = [r["cost"] for r in evaluate.ModelScorer(None, str(path))(prompts, responses)]
    for (p, r), score in zip(zip(prompts, responses), got):
        text = "BEGINNING OF CONVERSATION: USER: " + p + " ASSISTANT: " + r
        ids = tok(text + tok.eos_token, return_tensors="pt")["input_ids"]
        assert ids[0, -1] == tok.eos_token_id
        with torch.no_grad():
            hidden = body(input_ids=ids).last_hidden_state[0]
        assert score == pytest.approx(head(hidden[-1]).item(), abs=1e-5)  # at the EOS
        assert abs(score - head(hidden[-2]).item()) > 1e-4  # not at the last answer token
    half = [r["cost"] for r in evaluate.ModelScorer(None, str(path), dtype=torch.bfloat16)(prompts, responses)]
    assert half == pytest.approx(got, abs=0.05)  # bf16: 8 significant bits on scores of size ~1


def test_a_classifier_score_model_without_a_pad_id_scores_batches(tmp_path):
    """A sequence-classification score model whose config names no pad token is read at each text's end in a padded
    batch (transformers refuses batches of more than one without it): the scores equal those of one text at a
    time."""
    from helpers import byte_tokenizer
    from transformers import LlamaConfig, LlamaForSequenceClassification

    tok = byte_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=2, intermediate_size=32, num_labels=1, pad_token_id=None)
    model = LlamaForSequenceClassification(config).eval()
    path = tmp_path / "classifier"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    prompts, responses = ["hello world", "the user"], ["the assistant", "hello hello conversation world"]
    got = [r["reward"] for r in evaluate.ModelScorer(str(path), None)(prompts, responses)]
    one_by_one = [evaluate.ModelScorer(str(path), None)([p], [r])[0]["reward"] for p, r in zip(prompts, responses)]
    assert got == pytest.approx(one_by_one, abs=1e-5) and got[0] != pytest.approx(got[1], abs=1e-4)


def test_evaluate_on_cpu_in_bfloat16(trained, tiny_world, tmp_path, capsys):
    out = str(tmp_path / "bf16")
    assert evaluate.main(["--policies", trained["reward"], os.path.join(trained["mix"], "q0.3"), "--prompts",
                          tiny_world, "--num_samples", "2", "--max_new_tokens", "8", "--max_prompts", "6", "--device",
                          "cpu", "--dtype", "bfloat16", "--stop", "USER:", "--out", out]) == 0
    assert "on cpu in bfloat16" in capsys.readouterr().out
    results = json.load(open(os.path.join(out, "results.json")))
    assert [r["num_samples"] for r in results] == [12, 12] and results[0]["mean_reward"] is not None
    assert evaluate.cut_at_stop(" sure. USER: next question", ["USER:"]) == " sure. "


def test_pickle_checkpoint_is_refused(tmp_path, tiny_world):
    """Weights load from safetensors only: a folder holding just a pickled pytorch_model.bin is refused."""
    import shutil

    from transformers import AutoModelForCausalLM

    src = os.path.join(tiny_world, "sft")
    bad = tmp_path / "pickled"
    shutil.copytree(src, bad)
    model = AutoModelForCausalLM.from_pretrained(src)
    os.remove(bad / "model.safetensors")
    torch.save(model.state_dict(), bad / "pytorch_model.bin")
    with pytest.raises(outputs.UsageError, match="safetensors"):
        stage.load_base_model(str(bad))
