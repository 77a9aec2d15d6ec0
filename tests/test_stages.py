"""The two stages: they learn, the safety stage's reference is the reward-stage policy, and the errors and the
completeness marker behave."""

import json
import os

import pytest
import torch
from helpers import write_jsonl

import data
import merge_policies
import outputs
import stage
import train_reward_stage
import train_safety_stage

reward_main = train_reward_stage.main

FAST = ["--max_length", "48", "--max_prompt_length", "24", "--batch_size", "8", "--lora_r", "4", "--log_every", "5"]


def subset(world, tmp_path, n=32, name="pairs.jsonl"):
    with open(os.path.join(world, "train.jsonl")) as f:
        rows = [json.loads(line) for line in f][:n]
    return write_jsonl(tmp_path / name, rows)


def eval_records(folder):
    with open(os.path.join(folder, outputs.METRICS_FILE)) as f:
        return [r for r in map(json.loads, f) if r["split"] == "eval"]


@pytest.fixture(scope="module")
def stages(tiny_world, tmp_path_factory):
    """A reward stage and a safety stage on top of it, trained for a few steps on 32 pairs of the tiny world."""
    tmp = tmp_path_factory.mktemp("stages")
    pairs = subset(tiny_world, tmp)
    reward = str(tmp / "reward")
    assert train_reward_stage.main(["--sft", os.path.join(tiny_world, "sft"), "--data", pairs, "--eval_data", pairs,
                       "--eval_pairs", "32", "--out", reward, "--max_steps", "24", "--lr", "1e-2", *FAST]) == 0
    safety = str(tmp / "safety")
    assert train_safety_stage.main(["--reward_stage", reward, "--data", pairs, "--eval_data", pairs,
                                    "--eval_pairs", "32", "--out", safety, "--max_steps", "8", "--lr", "1e-2",
                                    *FAST]) == 0
    return {"pairs": pairs, "reward": reward, "safety": safety, "tmp": tmp}


def test_reward_stage_lowers_loss_and_raises_accuracy_on_training_pairs(stages):
    first, last = eval_records(stages["reward"])[0], eval_records(stages["reward"])[-1]
    assert first["step"] == 0 and last["step"] == 24
    assert last["loss"] < first["loss"] - 0.05
    assert last["rewards/accuracies"] > max(0.6, first["rewards/accuracies"])
    for key in ("rewards_ra/margins", "logps/chosen", "kl/rejected", "risk/margins"):
        assert key in last
    with open(os.path.join(stages["reward"], outputs.METRICS_FILE)) as f:
        train_rec = [r for r in map(json.loads, f) if r["split"] == "train"][0]
    for key in ("grad_norm", "lr", "tokens_per_s", "rewards/chosen", "risk/chosen"):
        assert key in train_rec
    for name in ("adapter_model.safetensors", "adapter_config.json", "tokenizer.json", outputs.CONFIG_FILE,
                 outputs.COMPLETE_FILE):
        assert os.path.exists(os.path.join(stages["reward"], name)), name


def sequence_logps(model, batch):
    """sum over response tokens of log pi(y_t), from a plain model with full logits (independent of risk.py)."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    logp = logits.log_softmax(-1).gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    return (logp * batch["response_mask"][:, 1:]).sum(-1)


def test_safety_stage_reference_is_the_reward_policy(stages, tiny_world):
    """The implicit rewards the safety stage logged at its end, beta_s * log(pi_rs / reference) on its held-out
    pairs, are those of pi_r as the reference, computed here from full logits, and not those of the SFT model."""
    cfg = outputs.read_stage(stages["safety"])
    assert outputs.resolved_path(cfg["parent"], stages["safety"]) == stages["reward"]
    assert cfg["parent"] == os.path.join("..", "reward") and cfg["lambda"] == pytest.approx(10.0)  # relative
    final = json.load(open(os.path.join(stages["safety"], outputs.COMPLETE_FILE)))["final_eval"]
    tok = stage.load_tokenizer(stages["safety"])
    examples = data.tokenize_pairs(data.load_pairs(stages["pairs"], "safer")[:32], tok, 48, 24)
    batch = data.collate(examples, tok.pad_token_id)
    n = len(examples)
    pi_rs = sequence_logps(merge_policies.load_policy(stages["safety"]), batch)[:n]
    pi_r = sequence_logps(merge_policies.load_policy(stages["reward"]), batch)[:n]
    sft = sequence_logps(stage.load_base_model(os.path.join(tiny_world, "sft")), batch)[:n]
    beta_s = cfg["args"]["beta"]
    assert final["rewards/chosen"] == pytest.approx(beta_s * (pi_rs - pi_r).mean().item(), abs=1e-5)
    assert abs(final["rewards/chosen"] - beta_s * (pi_rs - sft).mean().item()) > 1e-3  # not against the SFT model
    assert (pi_rs - pi_r).abs().max() > 1e-3  # the safety adapter did move the policy


def test_complete_output_is_reused_and_a_different_config_refused(stages, capsys):
    base = ["--reward_stage", stages["reward"], "--data", stages["pairs"], "--eval_data", stages["pairs"],
            "--eval_pairs", "32", *FAST]
    argv = base + ["--out", stages["safety"], "--max_steps", "8", "--lr", "1e-2"]
    before = os.path.getmtime(os.path.join(stages["safety"], "adapter_model.safetensors"))
    assert train_safety_stage.main(argv) == 0
    assert "already complete with this config; nothing to do" in capsys.readouterr().out
    assert train_safety_stage.main(argv + ["--lr", "2e-2"]) == 2
    err = capsys.readouterr().err
    assert "different config (differs in: lr)" in err and "--overwrite" in err
    assert os.path.getmtime(os.path.join(stages["safety"], "adapter_model.safetensors")) == before
    out = str(stages["tmp"] / "safety2")
    assert train_safety_stage.main(base + ["--out", out, "--max_steps", "2"]) == 0
    assert train_safety_stage.main(base + ["--out", out, "--max_steps", "3", "--overwrite"]) == 0
    assert json.load(open(os.path.join(out, outputs.COMPLETE_FILE)))["steps"] == 3


def test_errors_before_training(stages, tiny_world, full_world, tmp_path, capsys):
    sft = os.path.join(tiny_world, "sft")
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    json.dump({"stage": "reward"}, open(unfinished / outputs.CONFIG_FILE, "w"))
    no_safer = [{k: v for k, v in json.loads(line).items() if k != "safer_response_id"}
                for line in open(stages["pairs"])]
    no_safer_file = write_jsonl(tmp_path / "no_safer.jsonl", no_safer)
    cases = [
        (train_safety_stage.main, ["--reward_stage", str(tmp_path / "missing"), "--data", stages["pairs"]],
         "no such stage output or model folder"),
        (train_safety_stage.main, ["--reward_stage", str(unfinished), "--data", stages["pairs"]], "did not finish"),
        (train_safety_stage.main, ["--reward_stage", stages["reward"], "--sft", os.path.join(full_world, "sft"),
                                   "--data", stages["pairs"]], "is not the base model"),
        (train_safety_stage.main, ["--reward_stage", stages["reward"], "--data", no_safer_file],
         "missing field 'safer_response_id'"),
        (reward_main, ["--sft", sft, "--data", stages["pairs"], "--loss", "dpo", "--risk_measure", "cvar"],
         "--risk_measure has no effect with --loss dpo"),
        (reward_main, ["--sft", sft, "--data", stages["pairs"], "--risk_measure", "cvar", "--split_vocab"],
         "--split_vocab applies to --risk_measure cvar_radpo only"),
        (reward_main, ["--sft", sft, "--data", stages["pairs"], "--risk_measure", "cvar", "--risk_level", "1.5"],
         "(0, 1]"),
        (reward_main, ["--sft", sft, "--data", stages["pairs"], "--max_length", "16", "--max_prompt_length", "16"],
         "must be smaller than --max_length"),
        (reward_main, ["--sft", str(tmp_path / "nomodel"), "--data", stages["pairs"]], "no such model folder"),
    ]
    for main, argv, message in cases:
        out = str(tmp_path / "out")
        assert main(argv + ["--out", out]) == 2, message
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (message, err)
        assert not os.path.exists(out)


def test_parity_preset_and_baselines_are_settings():
    reward = train_reward_stage.build_parser
    a = stage.parse_args(reward(), ["--sft", "s", "--data", "d", "--out", "o", "--radpo_parity"])
    assert (a.loss, a.risk_measure, a.risk_level, a.split_vocab, a.loss_reduction, a.lr) == \
        ("ra_dpo1", "cvar_radpo", 0.95, True, "sum", 5e-6)
    # the rest of the authors' setup (zlj123-max/Ra-DPO config/config.yaml and config/model/base_model.yaml)
    assert (a.warmup_steps, a.max_grad_norm, a.max_length, a.max_prompt_length) == (150, 5.0, 512, 256)
    b = stage.parse_args(reward(), ["--sft", "s", "--data", "d", "--out", "o", "--radpo_parity", "--lr", "1e-4"])
    assert b.lr == 1e-4  # an explicit flag wins over the preset
    assert stage.parse_args(reward(), ["--sft", "s", "--data", "d", "--out", "o"]).beta == 0.1
    safety = stage.parse_args(train_safety_stage.build_parser(), ["--reward_stage", "r", "--data", "d", "--out", "o"])
    assert safety.beta == 0.01


def test_a_finished_stage_is_recognised_before_any_weights_load(stages, monkeypatch, capsys):
    def no_loading(*args, **kwargs):
        raise AssertionError("weights loaded for a run that was already complete")

    for name in ("load_base_model", "load_tokenizer"):
        monkeypatch.setattr(stage, name, no_loading)
    argv = ["--data", stages["pairs"], "--eval_data", stages["pairs"], "--eval_pairs", "32", *FAST]
    sft = outputs.base_of(stages["reward"])[0]
    assert reward_main(["--sft", sft, "--out", stages["reward"], "--max_steps", "24", "--lr", "1e-2", *argv]) == 0
    assert train_safety_stage.main(["--reward_stage", stages["reward"], "--out", stages["safety"], "--max_steps", "8",
                                    "--lr", "1e-2", *argv]) == 0
    assert capsys.readouterr().out.count("already complete with this config; nothing to do") == 2


@pytest.mark.parametrize("script", [train_reward_stage, train_safety_stage])
def test_help_shows_the_stage_description_and_every_default(script):
    parser = script.build_parser()
    text = parser.format_help()
    assert script.__doc__.splitlines()[0] in text
    flags = [a for a in parser._actions if a.option_strings and a.dest != "help"]
    for action in flags:  # argparse shows "(default: ...)" only for flags with help text
        assert action.help and "default" in parser._get_formatter()._get_help_string(action), action.dest
    assert text.count("(default:") >= len(flags)


def test_second_stage_takes_the_other_preference_and_records_the_order_run(stages, tmp_path, capsys):
    """RSA(S->H): a safer-first reward stage makes the second stage default to `better`; the same preference
    twice is refused unless asked for."""
    common = ["--data", stages["pairs"], "--max_steps", "1", *FAST]
    first = str(tmp_path / "safer_first")
    sft = outputs.base_of(stages["reward"])[0]
    assert reward_main(["--sft", sft, "--out", first, "--preference", "safer", *common]) == 0
    assert outputs.read_stage(first)["order"] == "S"
    second = str(tmp_path / "then_helpful")
    assert train_safety_stage.main(["--reward_stage", first, "--out", second, *common]) == 0
    cfg = outputs.read_stage(second)
    assert (cfg["args"]["preference"], cfg["order"]) == ("better", "S->H")
    assert outputs.read_stage(stages["safety"])["order"] == "H->S"
    same = str(tmp_path / "same")
    assert train_safety_stage.main(["--reward_stage", first, "--out", same, "--preference", "safer", *common]) == 2
    assert "trained on it already" in capsys.readouterr().err and not os.path.exists(same)
    assert train_safety_stage.main(["--reward_stage", first, "--out", same, "--preference", "safer",
                                    "--same_preference", *common]) == 0
    assert outputs.read_stage(same)["order"] == "S->S"
