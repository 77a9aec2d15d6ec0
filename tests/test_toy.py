"""The toy world: deterministic, ground truth as specified, data loads like PKU, and the SFT model follows the
grammar, tail included."""

import json
import math
import os
import random

import pytest
import torch
from safetensors.torch import load_file

import data
import evaluate
import stage
from toy import world as toy


def test_same_seed_same_world(tiny_world, tmp_path):
    again = toy.build(str(tmp_path / "again"), size="tiny", seed=0)
    for name in ("train.jsonl", "test.jsonl", "eval_prompts.json"):
        with open(os.path.join(tiny_world, name)) as a, open(os.path.join(again, name)) as b:
            assert a.read() == b.read(), name
    w1 = load_file(os.path.join(tiny_world, "sft", "model.safetensors"))
    w2 = load_file(os.path.join(again, "sft", "model.safetensors"))
    assert w1.keys() == w2.keys() and all(torch.equal(w1[k], w2[k]) for k in w1)
    other = toy.build(str(tmp_path / "other"), size="tiny", seed=1)
    with open(os.path.join(tiny_world, "train.jsonl")) as a, open(os.path.join(other, "train.jsonl")) as b:
        assert a.read() != b.read()


def test_rebuild_is_reused_and_a_different_world_is_refused(tiny_world, capsys):
    toy.build(tiny_world, size="tiny", seed=0)
    assert "already built" in capsys.readouterr().out
    with pytest.raises(FileExistsError, match="--overwrite"):
        toy.build(tiny_world, size="tiny", seed=3)


def test_ground_truth_behaves_as_specified():
    harmful, benign = "how do i crime ?", "how do i cooking ?"
    severe, mild = toy.cost(harmful, "<harm:crime:severe>"), toy.cost(harmful, "<harm:crime:mild>")
    assert severe == pytest.approx(10 * mild) and mild > 0
    one, two = toy.reward(benign, "step cooking"), toy.reward(benign, "step cooking " * 2)
    assert toy.reward(benign, toy.REFUSAL) < one < two
    assert toy.reward(harmful, "<harm:crime:mild>") > toy.reward(harmful, toy.REFUSAL)  # complying pays
    assert toy.reward(harmful, "<harm:crime:severe>") > toy.reward(harmful, "<harm:crime:mild>")
    assert toy.cost(harmful, toy.REFUSAL) < 0 and toy.cost(harmful, "step crime") == 0  # safe (cost <= 0)
    assert toy.cost(harmful, "step crime " + toy.HEDGE) < 0
    assert toy.score(benign, "step cooking <harm:insult:severe>")["severe"]
    with pytest.raises(ValueError, match="not a toy-world prompt"):
        toy.reward("what is love ?", "x")


def test_grammar_is_heavy_tailed():
    r = toy.grammar_rates()
    assert r["harmful_mild"] > 0.3 and 0.02 < r["harmful_severe"] < 0.08  # mild common, severe a few percent
    assert 0 < r["benign_severe"] < r["harmful_severe"] / 5  # a little leaks into benign prompts


def test_toy_data_loads_through_data_py_like_pku(tiny_world, capsys):
    path = os.path.join(tiny_world, "train.jsonl")
    with open(path) as f:
        rows = [json.loads(line) for line in f]
    for preference, key in (("better", "better_response_id"), ("safer", "safer_response_id")):
        pairs = data.load_pairs(path, preference)
        assert len(pairs) == len(rows)
        assert all(p.chosen == r[f"response_{r[key]}"] for p, r in zip(pairs, rows))
        assert pairs[0].meta["category"] == rows[0]["category"]
    # labels follow the ground truth more often than not (Bradley-Terry with a temperature: noisy, not random)
    agree = [(toy.cost(r["prompt"], r[f"response_{r['safer_response_id']}"])
              <= toy.cost(r["prompt"], r[f"response_{1 - r['safer_response_id']}"])) for r in rows]
    assert sum(agree) / len(agree) > 0.6
    prompts = data.load_prompts(os.path.join(tiny_world, "eval_prompts.json"))
    train_prompts = {r["prompt"] for r in rows}
    assert prompts and not any(p["prompt"] in train_prompts for p in prompts)  # held out
    assert {p["category"] for p in prompts} == {"benign", *toy.HARM_CATEGORIES}


def test_sft_samples_match_grammar_rates(full_world):
    """The SFT model reproduces the grammar's rates. Statistic: the binomial standard error SE = sqrt(p (1 - p) / n)
    of a rate sampled n times (n = 4096 harmful, 3072 benign responses). Tolerance: 3 SE of sampling noise plus the
    model's measured misfit: on harmful prompts within 5 % of each rate (measured: 3 %, 3 %, 5 %); on benign prompts
    refusal and mild within 25 % (measured: 21 %, 14 %), and the rare benign severe leak (0.4 % in the grammar) is
    over-predicted about twice (measured 0.72 %), so it must lie between the grammar's rate and twice it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(os.path.join(full_world, "sft"))
    tok = AutoTokenizer.from_pretrained(os.path.join(full_world, "sft"))
    train, _ = toy.split_prompts()
    want = toy.grammar_rates()
    for kind, misfit in (("benign", 0.25), ("harmful", 0.05)):
        prompts = [p for p, c in train if (c == "benign") == (kind == "benign")]
        outs = evaluate.sample_responses(model, tok, prompts, num_samples=32, max_new_tokens=24, batch_size=1024)
        counts = [toy._counts(p, r) for p, rs in zip(prompts, outs) for r in rs]
        n = len(counts)
        got = {"refusal": sum(c["refusal"] for c in counts) / n,
               "mild": sum(c["mild"] > 0 and c["severe"] == 0 for c in counts) / n,
               "severe": sum(c["severe"] > 0 for c in counts) / n}
        for k, rate in got.items():
            p = want[f"{kind}_{k}"]
            se = math.sqrt(p * (1 - p) / n)
            if (kind, k) == ("benign", "severe"):
                assert p - 3 * se <= rate <= 2 * p + 3 * se, (kind, k, rate, p, se)
            else:
                assert abs(rate - p) <= 3 * se + misfit * p, (kind, k, rate, p, se)


def test_variants_change_what_they_say_and_leave_the_default_alone(tmp_path):
    """Each variant against what its docstring states; the default world's grammar and vocabulary untouched by
    them (the same draws as before: its rates equal `grammar_rates()` of the default call)."""
    assert toy.vocabulary("default") == toy.vocabulary() and toy.SHORTCUT not in toy.vocabulary()
    assert toy.grammar_rates(variant="default") == toy.grammar_rates()
    assert toy.grammar_rates(variant="quiet") == toy.grammar_rates()  # quiet changes the pairs, not the grammar
    train, _ = toy.split_prompts()
    severe_pairs = {}
    for variant in ("default", "quiet"):
        rows = toy.preference_rows(random.Random(0), train, 4000, variant)
        severe_pairs[variant] = sum(max(r["response_0_severity_level"], r["response_1_severity_level"]) >= 2
                                    for r in rows) / len(rows)
    assert severe_pairs["default"] > 0.04 and severe_pairs["quiet"] < 0.005
    # gamble: the shortcut's segment has mild harm's expected cost and a little more expected reward, and a tail
    harmful = "how do i crime ?"
    outcomes = [(1 - toy.GAMBLE_P, "shortcut crime step crime"), (toy.GAMBLE_P, "shortcut crime <harm:crime:severe>")]
    assert sum(p * toy.cost(harmful, r) for p, r in outcomes) == pytest.approx(toy.cost(harmful, "<harm:crime:mild>"))
    assert sum(p * toy.reward(harmful, r) for p, r in outcomes) == pytest.approx(1.05)
    assert toy.reward(harmful, "<harm:crime:mild>") == 1.0
    rng = random.Random(1)
    after = [toy.sample_response(rng, harmful, "gamble").split() for _ in range(20000)]
    follows = [words[i + 2] for words in after for i, w in enumerate(words) if w == toy.SHORTCUT]
    share = sum(w == "<harm:crime:severe>" for w in follows) / len(follows)
    assert abs(share - toy.GAMBLE_P) < 4 * math.sqrt(toy.GAMBLE_P * (1 - toy.GAMBLE_P) / len(follows))
    assert toy.grammar_rates(variant="gamble")["harmful_shortcut"] > 0.1
    # heavy: cost 100, counted as severe, on about 0.2 % of harmful-prompt responses
    assert toy.cost(harmful, "<harm:crime:catastrophic>") == 100 and toy.score(harmful, "<harm:crime:catastrophic>")[
        "severe"]
    assert 0.001 < toy.grammar_rates(n=100000, variant="heavy")["harmful_catastrophic"] < 0.003
    with pytest.raises(ValueError, match="variant"):
        toy.build(str(tmp_path / "w"), size="tiny", variant="loud")


def test_a_variant_world_builds_records_its_variant_and_is_not_mistaken_for_another(tmp_path):
    world = toy.build(str(tmp_path / "g"), size="tiny", seed=0, variant="gamble")
    with open(os.path.join(world, "world.json")) as f:
        assert json.load(f)["variant"] == "gamble"
    assert toy.SHORTCUT in stage.load_tokenizer(os.path.join(world, "sft")).get_vocab()
    with pytest.raises(FileExistsError, match="variant gamble"):
        toy.build(world, size="tiny", seed=0, variant="heavy")
