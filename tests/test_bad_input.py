"""Bad input, table-driven, across every script: a one-line error naming what is wrong and where, exit code 2, no
traceback, and nothing already on disk touched. In process through each script's main(argv); one subprocess per
script checks the real exit code and stderr."""

import gzip
import hashlib
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from helpers import write_jsonl
from test_stages import FAST, subset

import data
import dual_alignment
import evaluate
import merge_policies
import outputs
import stage
import train_reward_stage
import train_safety_stage
from studies import matched as study
from studies import real as study_real
from toy import world as toy

reward_main = train_reward_stage.main
CUDA = torch.cuda.is_available()  # on a GPU host the CUDA-only flags are valid: those cases would start training

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOOD = {"prompt": "how do i cooking ?", "response_0": "step cooking", "response_1": "sorry i cannot help .",
        "better_response_id": 0, "safer_response_id": 1}


def tree_digest(folder):
    """A hash of every file's path and bytes under folder."""
    h = hashlib.sha256()
    for dirpath, _, files in sorted(os.walk(folder)):
        for name in sorted(files):
            path = os.path.join(dirpath, name)
            h.update(path.encode())
            with open(path, "rb") as f:
                h.update(f.read())
    return h.hexdigest()


@pytest.fixture(scope="module")
def env(tiny_world, full_world, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad")
    pairs = subset(tiny_world, tmp)
    reward, safety = str(tmp / "reward"), str(tmp / "safety")
    common = ["--data", pairs, "--max_steps", "2", *FAST]
    assert train_reward_stage.main(["--sft", f"{tiny_world}/sft", "--out", reward, *common]) == 0
    assert train_safety_stage.main(["--reward_stage", reward, "--out", safety, *common]) == 0
    other = str(tmp / "other_reward")  # a reward stage on another base model
    assert train_reward_stage.main(["--sft", f"{full_world}/sft", "--out", other, *common]) == 0
    unfinished = tmp / "unfinished"
    shutil.copytree(reward, unfinished)
    os.remove(unfinished / outputs.COMPLETE_FILE)
    mix = str(tmp / "mix")
    assert merge_policies.main(["--first", reward, "--second", safety, "--q", "0.5", "--out", mix]) == 0
    eval_out = str(tmp / "eval")
    assert evaluate.main(["--policies", reward, "--prompts", tiny_world, "--num_samples", "1", "--max_prompts", "2",
                          "--max_new_tokens", "4", "--out", eval_out]) == 0
    files = {}
    files["bad_json"] = tmp / "bad.jsonl"
    files["bad_json"].write_text(json.dumps(GOOD) + "\n{\"prompt\": \"cut\n")
    raw = gzip.compress((json.dumps(GOOD) + "\n").encode() * 50)
    files["truncated_gz"] = tmp / "cut.jsonl.gz"
    files["truncated_gz"].write_bytes(raw[: len(raw) // 2])
    files["int_prompt"] = write_jsonl(tmp / "int_prompt.jsonl", [GOOD, {**GOOD, "prompt": 7}])
    files["id_2"] = write_jsonl(tmp / "id2.jsonl", [GOOD, GOOD, {**GOOD, "better_response_id": 2}])
    files["all_empty"] = write_jsonl(tmp / "empty.jsonl", [{**GOOD, "response_0": "  "}] * 3)
    files["latin1"] = tmp / "latin1.jsonl"
    files["latin1"].write_bytes(b'{"prompt": "caf\xe9"}\n')
    files["csv_missing"] = tmp / "missing.csv"
    files["csv_missing"].write_text("prompt,response_0,response_1,better_response_id\np,a,b,0\n")
    files["no_prompts"] = tmp / "no_prompts.json"
    files["no_prompts"].write_text("[]")
    files["no_prompt_field"] = tmp / "no_prompt_field.jsonl"
    files["no_prompt_field"].write_text('{"text": "hi"}\n')
    files["not_a_model"] = tmp / "not_a_model"  # a config.json that is not a model's (no model_type)
    files["not_a_model"].mkdir()
    (files["not_a_model"] / "config.json").write_text('{"hello": 1}')
    files["fake_gguf"] = tmp / "fake.gguf"
    files["fake_gguf"].write_text("not a GGUF file")
    for name, text in CONFIGS.items():
        files[f"config_{name}"] = tmp / f"config_{name}.yaml"
        files[f"config_{name}"].write_text(text)
    return {"tmp": tmp, "pairs": pairs, "reward": reward, "safety": safety, "other": other,
            "unfinished": str(unfinished), "mix": mix, "eval": eval_out, "world": tiny_world, "full": full_world,
            **{k: str(v) for k, v in files.items()}}


CONFIGS = {"list": "lr: [1, 2]\n", "null": "lr: null\n", "float_int": "max_steps: 2.5\n", "nan": "lr: .nan\n",
           "choice": "loss: foo\n", "bool": "strict: 3\n", "unknown": "lrr: 0.1\n"}


def cases(e):
    """(script main, argv, the output folder it must leave untouched, text the error must contain)."""
    sft, new = f"{e['world']}/sft", str(e["tmp"] / "new_run")  # new_run must never appear
    r = lambda data_file, *extra: (reward_main, ["--sft", sft, "--data", data_file, "--out", new, *extra],  # noqa: E731
                                   e["reward"])
    s = lambda *argv: (train_safety_stage.main, [*argv, "--out", new], e["safety"])  # noqa: E731
    m = lambda *argv: (merge_policies.main, [*argv, "--out", e["mix"]], e["mix"])  # noqa: E731
    v = lambda *argv: (evaluate.main, [*argv, "--out", e["eval"]], e["eval"])  # noqa: E731
    d = lambda *argv: (dual_alignment.main, ["--reward_stage", e["reward"], "--data", e["pairs"], "--prompts",  # noqa: E731
                                             e["world"], *argv, "--out", new], e["reward"])
    return [
        (*r(e["bad_json"]), "bad.jsonl: line 2: not valid JSON"),
        (*r(e["truncated_gz"]), "cut.jsonl.gz: cannot read"),
        (*r(e["int_prompt"]), "int_prompt.jsonl: row 2: field 'prompt' must be a string, got int"),
        (*r(e["id_2"]), "id2.jsonl: row 3: field 'better_response_id' must be 0 or 1, got 2"),
        (*r(e["all_empty"]), "empty.jsonl: no training pairs left after filtering"),
        (*r(e["latin1"]), "latin1.jsonl: invalid UTF-8"),
        (*r(e["csv_missing"], "--preference", "safer"), "missing.csv: row 2: missing field 'safer_response_id'"),
        (*r(str(e["tmp"] / "nowhere.jsonl")), "nowhere.jsonl: no such file"),
        (*r(str(e["tmp"])), "is a directory"),
        (reward_main, ["--sft", str(e["tmp"] / "no_model"), "--data", e["pairs"], "--out", e["reward"]], e["reward"],
         "no_model: no such model folder"),
        (*r(e["pairs"], "--loss", "dpo", "--risk_level", "0.9"), "--risk_level has no effect with --loss dpo"),
        (*r(e["pairs"], "--risk_measure", "cvar", "--risk_level", "0"), "must be in (0, 1]"),
        (*r(e["pairs"], "--risk_measure", "erm", "--split_vocab"), "--split_vocab applies to"),
        (*r(e["pairs"], "--beta", "-1"), "--beta must be positive"),
        (reward_main, ["--sft", sft, "--data", e["pairs"], "--out", e["reward"], "--max_steps", "5"], e["reward"],
         "holds a finished run with a different config"),
        (*s("--reward_stage", e["other"], "--sft", sft, "--data", e["pairs"]), "is not the base model of"),
        (*s("--reward_stage", e["unfinished"], "--data", e["pairs"]), "the stage did not finish"),
        (*s("--reward_stage", e["safety"], "--data", e["pairs"]), "is a safety stage output"),
        *([] if CUDA else [(*s("--reward_stage", e["reward"], "--data", e["pairs"], "--precision", "fp16"),
                            "fp16 needs a CUDA GPU")]),
        (*m("--first", e["reward"], "--second", e["safety"], "--q", "-0.1"), "must lie in [0, 1]"),
        (*m("--first", e["reward"], "--second", e["other"], "--q", "0.7"), "share one base model"),
        (*m("--first", e["reward"], "--second", e["world"], "--q", "0.5"), "neither a stage output nor a model folder"),
        (*s("--reward_stage", str(e["tmp"] / "no.gguf"), "--data", e["pairs"]), "no.gguf: no such GGUF file"),
        (*m("--first", e["reward"], "--second", str(e["tmp"] / "ghost"), "--q", "0.5"),
         "ghost: no such stage output or model folder"),
        (*v("--policies", e["reward"], "--prompts", e["no_prompts"]), "no_prompts.json: no prompts"),
        (*v("--policies", e["reward"], "--prompts", e["no_prompt_field"]),
         "no_prompt_field.jsonl: row 1: missing field 'prompt'"),
        (*v("--policies", e["reward"], "--prompts", e["world"], "--greedy", "--num_samples", "4"),
         "--greedy gives one response per prompt"),
        (*v("--policies", str(e["tmp"] / "ghost"), "--prompts", e["world"]), "ghost: no such policy folder"),
        (*v("--policies", e["reward"], "--prompts", e["world"], "--reward_model", e["reward"]), "need --scorer models"),
        (toy.main, ["build", "--out", e["world"], "--seed", "5"], e["world"], "pass --overwrite to replace it"),
        # models that are not models
        (reward_main, ["--sft", e["not_a_model"], "--data", e["pairs"], "--out", new], e["reward"],
         "not_a_model: cannot read a model config"),
        (*s("--reward_stage", e["not_a_model"], "--data", e["pairs"]), "not_a_model: cannot read a model config"),
        (reward_main, ["--sft", e["fake_gguf"], "--data", e["pairs"], "--out", new], e["reward"],
         "not a GGUF file"),
        (*s("--reward_stage", e["fake_gguf"], "--data", e["pairs"]), "not a GGUF file"),
        (*m("--first", e["reward"], "--second", e["not_a_model"], "--q", "0.7"), "cannot load a causal LM"),
        (*v("--policies", e["not_a_model"], "--prompts", e["world"]), "cannot load a causal LM"),
        # every numeric flag with a range
        *[(*r(e["pairs"], flag, value), message) for flag, value, message in (
            ("--lora_dropout", "1.0", "--lora_dropout must lie in [0, 1)"),
            ("--warmup_ratio", "-0.1", "--warmup_ratio must lie in [0, 1)"),
            ("--eval_pairs", "-1", "--eval_pairs must be 0 or more"),
            ("--save_total_limit", "0", "--save_total_limit must be positive"),
            ("--max_steps", "-1", "--max_steps must be 0 or more"),
            ("--epochs", "0", "--epochs must be positive"),
            ("--log_every", "0", "--log_every must be positive"),
            ("--max_grad_norm", "0", "--max_grad_norm must be positive"),
            ("--lora_alpha", "-2", "--lora_alpha must be positive"),
            ("--save_every", "-5", "--save_every must be 0 or more"))],
        *[(*v("--policies", e["reward"], "--prompts", e["world"], flag, value), message)
          for flag, value, message in (("--num_samples", "0", "--num_samples must be positive"),
                                       ("--max_new_tokens", "0", "--max_new_tokens must be positive"),
                                       ("--batch_size", "-1", "--batch_size must be positive"),
                                       ("--temperature", "0", "--temperature must be positive"),
                                       ("--top_p", "1.5", "--top_p must lie in (0, 1]"),
                                       ("--max_prompts", "-1", "--max_prompts must be 0 or more"))],
        # --resume with nothing to resume: an error, not a silent fresh start
        (*r(e["pairs"], "--resume"), "holds no complete checkpoint to continue from (no run was started there)"),
        # the studies
        (study.main, ["--out", new, "--steps", "0"], e["reward"], "--steps must be positive"),
        (study.main, ["--out", new, "--seeds", "-1"], e["reward"], "--seeds must be 0 or more"),
        (study.main, ["--out", new, "--world", e["world"], "--report"], e["reward"],
         "missing; run the study's sweep (without --report)"),
        (study_real.main, ["--out", new, "--heldout", "0"], e["reward"], "--heldout must be positive"),
        (study_real.main, ["--out", new, "--data", str(e["tmp"] / "nowhere.jsonl.gz")], e["reward"],
         "--data " + str(e["tmp"] / "nowhere.jsonl.gz") + ": no such file"),
        (study_real.main, ["--out", new, "--prompts", e["no_prompts"]], e["reward"], "no_prompts.json: no prompts"),
        # config values checked as the flags are
        *[(*r(e["pairs"], "--config", e[f"config_{name}"]), f"config_{name}.yaml: key {message}")
          for name, message in (("list", "'lr': [1, 2] is not a finite number"),
                                ("null", "'lr': None is not a finite number"),
                                ("float_int", "'max_steps': 2.5 is not an integer"),
                                ("nan", "'lr': nan is not a finite number"),
                                ("choice", "'loss': 'foo' is not one of dpo, ra_dpo1, ra_dpo2"),
                                ("bool", "'strict': 3 is not true or false"))],
        (*r(e["pairs"], "--config", e["config_unknown"]), "unknown key 'lrr' (not a flag of train_reward_stage.py)"),
        # no NaN or infinity where a number is taken
        (*r(e["pairs"], "--beta", "nan"), "argument --beta: expected a finite number, got nan"),
        (*r(e["pairs"], "--lr", "inf"), "argument --lr: expected a finite number, got inf"),
        (*s("--reward_stage", e["reward"], "--data", e["pairs"], "--risk_level=-inf"),
         "argument --risk_level: expected a finite number, got -inf"),
        (*m("--first", e["reward"], "--second", e["safety"], "--q", "nan"), "argument --q: expected a finite number"),
        (*v("--policies", e["reward"], "--prompts", e["world"], "--temperature", "nan"),
         "argument --temperature: expected a finite number"),
        (*d("--budget", "nan"), "argument --budget: expected a finite number, got nan"),
        (*d("--budget", "5", "--dual_lr", "inf"), "argument --dual_lr: expected a finite number, got inf"),
        # everything checked before anything is written
        (*d("--budget", "5", "--no_such_flag", "1"), "unrecognized arguments: --no_such_flag 1"),
        (*d("--budget", "5", "--scorer", "models"), "--scorer models needs --reward_model and/or --cost_model"),
        (*d("--budget", "5", "--prompts", "redteam"), "is not a toy-world prompt, which --scorer toy cannot score"),
        (*v("--policies", e["reward"], "--prompts", "redteam"), "is not a toy-world prompt"),
        (evaluate.main, ["--policies", e["unfinished"], "--prompts", e["world"], "--out", new], e["reward"],
         "the stage did not finish"),
        (merge_policies.main, ["--first", e["unfinished"], "--second", e["safety"], "--q", "0.5", "--out", new],
         e["reward"], "the stage did not finish"),
        (dual_alignment.main, ["--reward_stage", e["unfinished"], "--data", e["pairs"], "--prompts", e["world"],
                               "--budget", "5", "--out", new], e["reward"], "the stage did not finish"),
        (dual_alignment.main, ["--reward_stage", e["safety"], "--data", e["pairs"], "--prompts", e["world"],
                               "--budget", "5", "--out", new], e["reward"], "is a safety stage output"),
        (merge_policies.main, ["--first", e["safety"], "--second", e["reward"], "--q", "0.5", "--out", new],
         e["reward"], "is the safety stage trained on --second"),
        (*v("--policies", e["reward"], "--prompts", e["world"], "--top_p", "nan"),
         "argument --top_p: expected a finite number"),
    ]


def test_table_of_bad_inputs(env, capsys):
    table = cases(env)
    assert len(table) >= 80
    for main, argv, keep, message in table:
        before = tree_digest(keep)
        try:
            code = main(argv)
        except SystemExit as e:  # argparse's own errors (a type or an unknown flag): one line, exit code 2
            code = e.code
        err = capsys.readouterr().err
        error_lines = [line for line in err.splitlines() if "error:" in line]
        assert code == 2, (argv, err)
        assert len(error_lines) == 1 and message in error_lines[0], (message, err)
        assert "Traceback" not in err
        assert tree_digest(keep) == before, f"{keep} changed for {message}"
        assert not os.path.exists(env["tmp"] / "new_run") and not os.path.exists(env["tmp"] / "new_run.tmp")


def test_enormous_rows_are_truncated_not_fatal(env, capsys):
    huge = write_jsonl(env["tmp"] / "huge.jsonl", [{**GOOD, "prompt": "how do i cooking " * 100000 + "?",
                                                    "response_0": "step cooking " * 50000}, GOOD])
    tok = stage.load_tokenizer(env["reward"])
    ex = data.tokenize_pairs(data.load_pairs(huge), tok, max_length=48, max_prompt_length=24)
    assert len(ex) == 2 and all(len(e["prompt_ids"]) + len(e["chosen_ids"]) <= 48 for e in ex)


@pytest.mark.parametrize("script,argv,message", [
    ("train_reward_stage.py", ["--sft", "x", "--data", "y", "--out", "z", "--loss", "dpo", "--alpha", "1"],
     "--alpha has no effect with --loss dpo"),
    ("train_safety_stage.py", ["--reward_stage", "/nonexistent/r", "--data", "y", "--out", "z"],
     "/nonexistent/r: no such stage output or model folder"),
    ("merge_policies.py", ["--first", "a", "--second", "b", "--q", "2", "--out", "z"], "must lie in [0, 1]"),
    ("evaluate.py", ["--policies", "/nonexistent/p", "--prompts", "x.json", "--out", "z"],
     "/nonexistent/p: no such policy folder"),
    ("toy", ["build", "--out", "/dev/null/x", "--size", "tiny"], "python -m toy: error:"),
])
def test_each_script_exits_2_without_traceback(script, argv, message, tmp_path):
    command = ["-m", script] if script == "toy" else [os.path.join(ROOT, script)]
    run = subprocess.run([sys.executable, *command, *argv], capture_output=True, text=True, cwd=tmp_path,
                         env={**os.environ, "PYTHONPATH": ROOT}, timeout=120)
    assert run.returncode == 2, run.stderr
    assert "Traceback" not in run.stderr and message in run.stderr
    assert len([line for line in run.stderr.splitlines() if "error:" in line]) == 1


def test_ctrl_c_in_a_stage_is_one_line_naming_the_step_the_checkpoint_and_resume(monkeypatch, capsys, tiny_world,
                                                                                   tmp_path):
    """Ctrl-C (KeyboardInterrupt) in step 3 of a run that checkpoints every 2 steps: exit code 130 and one line that
    names the step, the checkpoint of step 2 and --resume, which then finishes the run."""
    import stage
    import train_reward_stage

    update = stage.one_update

    def interrupted_in_step_3(*args):
        if args[-1] == 3:
            raise KeyboardInterrupt
        return update(*args)

    out = str(tmp_path / "out")
    argv = ["--sft", os.path.join(tiny_world, "sft"), "--data", os.path.join(tiny_world, "train.jsonl"), "--out", out,
            "--max_steps", "4", "--save_every", "2", *FAST]
    monkeypatch.setattr(stage, "one_update", interrupted_in_step_3)
    assert train_reward_stage.main(argv) == 130
    checkpoint = os.path.join(out + ".tmp", "checkpoints", "step-00000002")
    assert capsys.readouterr().err.strip().splitlines() == [
        f"train_reward_stage.py: interrupted in step 3; the last checkpoint is {checkpoint}: rerun the same command "
        "with --resume to continue from it"]
    assert not os.path.exists(out + ".lock")
    monkeypatch.setattr(stage, "one_update", update)
    assert train_reward_stage.main([*argv, "--resume"]) == 0
    assert json.load(open(os.path.join(out, outputs.COMPLETE_FILE)))["steps"] == 4
