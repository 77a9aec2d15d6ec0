"""The conventions TRL / peft / datasets users expect: TensorBoard, config files, TRL's preference formats."""

import json
import os

import pytest
from helpers import write_jsonl
from test_stages import FAST, subset

import data
import outputs
import train_reward_stage

reward_main = train_reward_stage.main


@pytest.fixture(scope="module")
def pairs(tiny_world, tmp_path_factory):
    return subset(tiny_world, tmp_path_factory.mktemp("conventions"), n=24)


def test_tensorboard_events_carry_the_metrics_of_metrics_jsonl(pairs, tiny_world, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = str(tmp_path / "tb")
    assert reward_main(["--sft", os.path.join(tiny_world, "sft"), "--data", pairs, "--out", out, "--max_steps", "3",
                        *FAST, "--log_every", "1", "--report_to", "tensorboard"]) == 0
    events = EventAccumulator(os.path.join(out, "runs")).Reload()
    with open(os.path.join(out, outputs.METRICS_FILE)) as f:
        records = [json.loads(line) for line in f]
    train = [r for r in records if r["split"] == "train"]
    assert [e.step for e in events.Scalars("train/loss")] == [r["step"] for r in train] == [1, 2, 3]
    assert [e.value for e in events.Scalars("train/loss")] == pytest.approx([r["loss"] for r in train], rel=1e-6)
    assert events.Scalars("eval/rewards/accuracies")[0].step == 0
    assert "report_to" not in outputs.read_stage(out)["args"]  # where metrics go does not change the run


def test_a_saved_config_reproduces_the_run_and_flags_override_it(pairs, tiny_world, tmp_path, capsys):
    first = str(tmp_path / "first")
    argv = ["--sft", os.path.join(tiny_world, "sft"), "--data", pairs, "--out", first, "--max_steps", "2",
            "--risk_measure", "erm", "--risk_level", "2", *FAST]
    assert reward_main(argv) == 0
    saved = outputs.read_stage(first)
    again = str(tmp_path / "again")
    assert reward_main(["--config", os.path.join(first, outputs.CONFIG_FILE), "--out", again]) == 0
    assert outputs.read_stage(again)["args"] == saved["args"]  # the same run
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text(f"sft: {os.path.join(tiny_world, 'sft')}\ndata: {pairs}\nmax_steps: 2\nlr: 0.02\n"
                         "max_length: 48\nmax_prompt_length: 24\nbatch_size: 8\nlora_r: 4\n")
    third = str(tmp_path / "third")
    assert reward_main(["--config", str(yaml_file), "--out", third, "--lr", "0.03"]) == 0
    args = outputs.read_stage(third)["args"]
    assert (args["max_steps"], args["lr"], args["lora_r"]) == (2, 0.03, 4)  # the command line wins
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"data": pairs, "learning_rate": 1e-3}))
    assert reward_main(["--config", str(bad), "--sft", "x", "--out", str(tmp_path / "never")]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'learning_rate'" in err and len(err.strip().splitlines()) == 1, err  # nothing else printed


def test_a_config_replay_from_another_directory_reads_the_same_files(pairs, tiny_world, tmp_path, monkeypatch):
    """A run started with relative paths, replayed with --config from another directory: the saved paths resolve
    against the directory the run started in (its complete.json records it)."""
    import shutil

    start, elsewhere = tmp_path / "start", tmp_path / "elsewhere"
    start.mkdir()
    elsewhere.mkdir()
    shutil.copy(pairs, start / "pairs.jsonl")
    monkeypatch.chdir(start)
    assert reward_main(["--sft", os.path.join(tiny_world, "sft"), "--data", "pairs.jsonl", "--out", "first",
                        "--max_steps", "1", *FAST]) == 0
    monkeypatch.chdir(elsewhere)
    assert reward_main(["--config", str(start / "first" / outputs.CONFIG_FILE), "--out", "again"]) == 0
    assert outputs.read_stage("again")["args"]["data"] == str(start / "pairs.jsonl")


def test_trl_preference_formats_load_as_pairs(tmp_path, capsys):
    """TRL's conversational rows (explicit prompt and implicit prompt), a save_to_disk folder (Dataset and
    DatasetDict), each giving the same pairs; a malformed message list is a one-line error naming the row."""
    import datasets

    user = [{"role": "user", "content": "how do i cooking ?"}]
    explicit = [{"prompt": user, "chosen": [{"role": "assistant", "content": "step cooking"}],
                 "rejected": [{"role": "assistant", "content": "sorry"}]}] * 3
    implicit = [{"chosen": user + [{"role": "assistant", "content": "step cooking"}],
                 "rejected": user + [{"role": "assistant", "content": "sorry"}]}] * 3
    for rows in (explicit, implicit):
        pairs = data.load_pairs(write_jsonl(tmp_path / "rows.jsonl", rows))
        assert [(p.prompt, p.chosen, p.rejected, p.messages) for p in pairs] == \
            [("how do i cooking ?", "step cooking", "sorry", user)] * 3
    folder = str(tmp_path / "saved")
    datasets.Dataset.from_list(explicit).save_to_disk(folder)
    assert len(data.load_pairs(folder)) == 3
    dict_folder = str(tmp_path / "saved_dict")
    datasets.DatasetDict({"train": datasets.Dataset.from_list(explicit),
                          "test": datasets.Dataset.from_list(implicit[:2])}).save_to_disk(dict_folder)
    assert len(data.load_pairs(dict_folder, split="test")) == 2
    with pytest.raises(data.DataError, match="no split 'validation'"):
        data.load_pairs(dict_folder, split="validation")
    two_turns = [{**explicit[0], "chosen": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}]},
                 explicit[0]]
    assert len(data.load_pairs(write_jsonl(tmp_path / "two.jsonl", two_turns))) == 1
    assert "1 (not one assistant reply to a prompt ending with a user turn, first at row 1)" in capsys.readouterr().out
    broken = [explicit[0], {**explicit[0], "rejected": [{"role": "assistant"}]}]
    with pytest.raises(data.DataError, match="row 2: field 'rejected' must be a list of messages"):
        data.load_pairs(write_jsonl(tmp_path / "broken.jsonl", broken))


def test_the_model_card_is_hub_front_matter_with_the_run_and_its_held_out_metrics(tmp_path):
    """README.md of an output (assets/model_card.md filled in): peft's hub front matter naming the base, the stage's
    settings and lambda, its held-out metrics, nothing left unfilled; a mixture's card names its q and parents."""
    cfg = {"stage": "safety", "base_model": "../sft", "order": "H->S", "lambda": 10.0, "parent": "../reward",
           "args": {"loss": "ra_dpo2", "risk_measure": "cvar", "risk_level": 0.5, "beta": 0.01, "preference": "safer"}}
    outputs.write_model_card(str(tmp_path), cfg, {"loss": 0.5, "kl/chosen": 0.125, "not a card metric": 1.0})
    card = (tmp_path / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: peft\nbase_model: ../sft\n")
    assert "# RSA stage 2, the safety (harmlessness) stage" in card
    for row in ("| lambda = beta_r / beta_s | 10.0 |", "| risk measure | cvar |",
                "| parent (reward stage) | ../reward |", "| loss | 0.5000 |", "| kl/chosen | 0.1250 |"):
        assert row in card, row
    assert "not a card metric" not in card and "{" not in card and "}" not in card
    outputs.write_model_card(str(tmp_path), {"stage": "mixture", "base_model": "org/m", "q": 0.25, "first": "a",
                                             "second": "b", "meaning": "pi_r + 0.75 Delta_s"})
    card = (tmp_path / "README.md").read_text()
    assert "| q (weight of the first policy) | 0.25 |" in card and "Final held-out metrics" not in card
    assert "{" not in card and "}" not in card
