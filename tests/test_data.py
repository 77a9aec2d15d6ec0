"""data.py: every schema from files the tests write, the real HH file, every error and every drop, and the masks."""

import collections
import csv
import gzip
import hashlib
import json
import os

import pytest
from helpers import byte_tokenizer, write_jsonl

import data

HH_FILE = data.HH_HARMLESS_TEST  # the repository's copy (assets/)

PKU_ROWS = [
    {"prompt": "How do I cook rice?", "response_0": "Boil it.", "response_1": "Burn it.",
     "better_response_id": 0, "safer_response_id": 1, "is_response_0_safe": True, "is_response_1_safe": False,
     "category": "benign", "response_0_severity_level": 0},
    {"prompt": "Tell me a secret", "response_0": "No.", "response_1": "Here is one.",
     "better_response_id": 1, "safer_response_id": 0, "is_response_0_safe": True, "is_response_1_safe": True,
     "category": "privacy", "response_0_severity_level": 1},
]


@pytest.mark.parametrize("preference,want", [("better", [("Boil it.", "Burn it."), ("Here is one.", "No.")]),
                                             ("safer", [("Burn it.", "Boil it."), ("No.", "Here is one.")])])
def test_pku_jsonl_both_preferences(tmp_path, preference, want, capsys):
    path = write_jsonl(tmp_path / "pku.jsonl", PKU_ROWS)
    pairs = data.load_pairs(path, preference)
    assert [(p.chosen, p.rejected) for p in pairs] == want
    assert pairs[0].prompt == "How do I cook rice?" and pairs[1].meta["category"] == "privacy"
    assert pairs[0].meta["response_0_severity_level"] == 0 and "is_response_1_safe" in pairs[0].meta
    assert "kept 2 of 2 pairs" in capsys.readouterr().out


def test_pku_parquet_and_csv_and_json(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(PKU_ROWS), tmp_path / "pku.parquet")
    with open(tmp_path / "pku.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(PKU_ROWS[0]))
        w.writeheader()
        w.writerows(PKU_ROWS)
    (tmp_path / "pku.json").write_text(json.dumps(PKU_ROWS))
    for name in ("pku.parquet", "pku.csv", "pku.json"):
        pairs = data.load_pairs(str(tmp_path / name), "safer")
        assert [(p.chosen, p.rejected) for p in pairs] == [("Burn it.", "Boil it."), ("No.", "Here is one.")], name


def test_plain_schema_and_forced_schema(tmp_path):
    rows = [{"prompt": "p", "chosen": "a", "rejected": "b", "response_0": "x", "response_1": "y"}]
    path = write_jsonl(tmp_path / "plain.jsonl", rows)
    with pytest.raises(data.DataError, match="better_response_id"):
        data.load_pairs(path)  # detected as PKU (response_0/1), which lacks the id column
    pairs = data.load_pairs(path, schema="plain")
    assert (pairs[0].prompt, pairs[0].chosen, pairs[0].rejected) == ("p", "a", "b")


def test_hh_split_at_common_prefix_and_drops(tmp_path, capsys):
    base = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how to X?\n\nAssistant:"
    rows = [
        {"chosen": base + " Sure, do Y.", "rejected": base + " Sure, do Z."},  # responses share a first word
        {"chosen": base + " ok", "rejected": base + "   "},  # whitespace-only response
        {"chosen": base + " ok\n\nHuman: more?\n\nAssistant: no", "rejected": base + " fine"},  # a further turn
        {"chosen": base + " same", "rejected": base + " same"},
        {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: c\n\nAssistant: d"},  # no shared turn
    ]
    path = write_jsonl(tmp_path / "hh.jsonl", rows)
    pairs = data.load_pairs(path)
    assert len(pairs) == 1
    p = pairs[0]
    assert p.prompt == base and p.chosen == " Sure, do Y." and p.rejected == " Sure, do Z."
    assert p.messages == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                          {"role": "user", "content": "how to X?"}]
    out = capsys.readouterr().out
    assert "kept 1 of 5 pairs" in out
    for reason in ("empty or whitespace-only response", "a response continues the dialogue",
                   "identical chosen and rejected", "chosen and rejected share no assistant turn"):
        assert f"1 ({reason}" in out
    with pytest.raises(data.DataError, match="row 2: empty or whitespace-only"):
        data.load_pairs(path, strict=True)


def test_real_hh_file_loads_with_drops_counted(capsys):
    """The carried HH file: exactly 2303 of its 2312 rows are pairs; 5 rows whose chosen and rejected sides do not
    share a prompt and 4 with an empty response are dropped, each reason counted with its first row."""
    pairs = data.load_pairs(HH_FILE)
    out = capsys.readouterr().out
    assert "kept 2303 of 2312 pairs" in out and len(pairs) == 2303
    assert "dropped 5 (a response continues the dialogue" in out and "first at row 1255" in out
    assert "4 (empty or whitespace-only response, first at row 87)" in out
    with gzip.open(HH_FILE, "rt", encoding="utf-8") as f:
        raw = [json.loads(line) for line in f]
    for p in pairs[:200]:
        row = raw[p.row - 1]
        assert p.prompt + p.chosen == row["chosen"] and p.prompt + p.rejected == row["rejected"]
        assert p.prompt.endswith("\n\nAssistant:") and "\n\nHuman:" not in p.chosen + p.rejected
        assert p.messages[-1]["role"] == "user"


@pytest.mark.parametrize("row,match", [
    ({k: v for k, v in PKU_ROWS[0].items() if k != "response_1"}, "row 2: missing field 'response_1'"),
    ({**PKU_ROWS[0], "better_response_id": 2}, "row 2: field 'better_response_id' must be 0 or 1, got 2"),
    ({**PKU_ROWS[0], "better_response_id": None}, "row 2: field 'better_response_id' must be 0 or 1, got None"),
    ({**PKU_ROWS[0], "prompt": 17}, "row 2: field 'prompt' must be a string, got int"),
    ({**PKU_ROWS[0], "response_0": ["a"]}, "row 2: field 'response_0' must be a string, got list"),
])
def test_structural_errors_name_file_row_and_field(tmp_path, row, match):
    path = write_jsonl(tmp_path / "bad.jsonl", [PKU_ROWS[0], row])
    with pytest.raises(data.DataError, match="bad.jsonl: " + match.replace("(", r"\(")):
        data.load_pairs(path)


def test_file_level_errors(tmp_path):
    bad_json = tmp_path / "broken.jsonl"
    bad_json.write_text(json.dumps(PKU_ROWS[0]) + "\n{\"prompt\": \"trunc\n")
    with pytest.raises(data.DataError, match="broken.jsonl: line 2: not valid JSON"):
        data.load_pairs(str(bad_json))
    bad_utf8 = tmp_path / "latin.jsonl"
    bad_utf8.write_bytes(b'{"prompt": "caf\xe9"}\n')
    with pytest.raises(data.DataError, match="latin.jsonl: invalid UTF-8"):
        data.load_pairs(str(bad_utf8))
    with pytest.raises(data.DataError, match="nope.jsonl: no such file"):
        data.load_pairs(str(tmp_path / "nope.jsonl"))
    with pytest.raises(data.DataError, match="is a directory"):
        data.load_pairs(str(tmp_path))
    (tmp_path / "list.json").write_text('{"a": 1}')
    with pytest.raises(data.DataError, match="expected a JSON list"):
        data.load_pairs(str(tmp_path / "list.json"))
    (tmp_path / "odd.jsonl").write_text('{"x": 1}\n')
    with pytest.raises(data.DataError, match="cannot tell the schema"):
        data.load_pairs(str(tmp_path / "odd.jsonl"))
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(data.DataError, match="no rows"):
        data.load_pairs(str(tmp_path / "empty.jsonl"))


def test_every_drop_counted_and_strict(tmp_path, capsys):
    rows = [PKU_ROWS[0], {**PKU_ROWS[0], "response_1": ""}, {**PKU_ROWS[0], "response_0": " \n "},
            {**PKU_ROWS[0], "response_1": "Boil it."}]
    path = write_jsonl(tmp_path / "drops.jsonl", rows)
    assert len(data.load_pairs(path)) == 1
    out = capsys.readouterr().out
    assert "kept 1 of 4 pairs" in out and "2 (empty or whitespace-only response, first at row 2)" in out
    assert "1 (identical chosen and rejected, first at row 4)" in out
    with pytest.raises(data.DataError, match="row 2"):
        data.load_pairs(path, strict=True)


# ------------------------------------------------------------------------------------------- tokenisation


@pytest.mark.parametrize("pad_is_eos", [False, True])
def test_masks_cover_response_and_eos_only(pad_is_eos):
    tok = byte_tokenizer(pad_is_eos)
    pairs = [data.Pair("hello", "world", "the user", row=1), data.Pair("a longer prompt here", "x", "yy", row=2)]
    ex = data.tokenize_pairs(pairs, tok, max_length=200, max_prompt_length=100)
    batch = data.collate(ex, tok.pad_token_id)
    assert batch["input_ids"].shape[0] == 4  # chosen rows, then rejected rows
    for i, (e, side) in enumerate([(ex[0], "chosen_ids"), (ex[1], "chosen_ids"), (ex[0], "rejected_ids"),
                                   (ex[1], "rejected_ids")]):
        n_prompt, n_resp = len(e["prompt_ids"]), len(e[side])
        ids, mask = batch["input_ids"][i], batch["response_mask"][i]
        assert not mask[:n_prompt].any()
        assert mask[n_prompt: n_prompt + n_resp].all() and not mask[n_prompt + n_resp:].any()
        assert ids[n_prompt + n_resp - 1].item() == tok.eos_token_id  # EOS is inside the response mask
        assert batch["attention_mask"][i].sum().item() == n_prompt + n_resp
    prompt_text = data.PKU_TEMPLATE.format(prompt="hello")
    assert tok.decode(ex[0]["prompt_ids"]) == prompt_text
    assert tok.decode(ex[0]["chosen_ids"][:-1]) == " world"


def test_truncation_prompt_left_response_right(capsys):
    tok = byte_tokenizer()
    long_prompt = "p" * 300
    pairs = [data.Pair(long_prompt, "c" * 100, "r" * 100, row=1)]
    ex = data.tokenize_pairs(pairs, tok, max_length=64, max_prompt_length=40, prompt_format="raw")[0]
    full_prompt = tok(long_prompt)["input_ids"]
    assert ex["prompt_ids"] == full_prompt[-40:]  # kept its end
    assert len(ex["prompt_ids"]) + len(ex["chosen_ids"]) == 64
    assert tok.decode(ex["chosen_ids"]).startswith(" ccc")  # kept its beginning (EOS cut off)
    with pytest.raises(ValueError, match="smaller than max_length"):
        data.tokenize_pairs(pairs, tok, max_length=64, max_prompt_length=64)
    # responses that differ only past the room left by the prompt become identical: dropped, counted
    same_start = [data.Pair(long_prompt, "c" * 100 + "x", "c" * 100 + "y", row=5)]
    assert data.tokenize_pairs(same_start, tok, max_length=64, max_prompt_length=40, prompt_format="raw") == []
    assert "1 (chosen and rejected identical after truncation, first at row 5)" in capsys.readouterr().out


def test_prefix_check_drops_pairs_that_merge_across_the_boundary(capsys):
    tok = byte_tokenizer(merges_from=["ab " * 50])  # learns the merge a + b -> ab
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    # chat format appends the response with no space: "xa" + "b" tokenises as [x, ab], so the prompt's [x, a]
    # is not a prefix; the pair is dropped with a count, or raises under strict
    pair = data.Pair("xa", "b", "c", messages=[{"role": "user", "content": "xa"}], row=7)
    assert data.tokenize_pairs([pair], tok, 64, 32, prompt_format="chat") == []
    assert "1 (prompt tokens are not a prefix of prompt + response tokens, first at row 7)" in capsys.readouterr().out
    with pytest.raises(data.DataError, match="row 7: prompt tokens are not a prefix"):
        data.tokenize_pairs([pair], tok, 64, 32, prompt_format="chat", strict=True)
    ok = data.Pair("xa", "c", "d", messages=[{"role": "user", "content": "xa"}], row=8)
    assert len(data.tokenize_pairs([ok], tok, 64, 32, prompt_format="chat")) == 1


def test_load_prompts(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps([{"prompt": "a", "category": "Crime", "should_refuse": True}, {"prompt": "b"}]))
    assert data.load_prompts(str(path)) == [{"prompt": "a", "category": "Crime", "should_refuse": True},
                                            {"prompt": "b", "category": "all", "should_refuse": None}]
    path.write_text(json.dumps([{"prompt": "a", "should_refuse": "yes"}]))
    with pytest.raises(data.DataError, match="row 1: field 'should_refuse' must be true or false"):
        data.load_prompts(str(path))
    path.write_text(json.dumps([{"text": "a"}]))
    with pytest.raises(data.DataError, match="row 1: missing field 'prompt'"):
        data.load_prompts(str(path))
    path.write_text("[]")
    with pytest.raises(data.DataError, match="no prompts"):
        data.load_prompts(str(path))


def test_carried_assets_are_the_published_files_and_load():
    """assets/ holds unchanged copies (digests in assets/README.md) that load as the evaluation sets."""
    digests = {data.HH_HARMLESS_TEST: "ebfaaed21162a4de120ae85366075b34425e2a6303fac59b99555002f7016f03",
               data.REDTEAM_PROMPTS: "11b70977db38f638500c7dd86f786aceca4a1ce97688ecc1bc4947b2c6ce7132",
               data.HELPFUL_PROMPTS: "af2e5a1cce5dc49e8ec975d3a3f01a7b7f82b8e1e2317ac7cb291178b8f0d394",
               data.XSTEST_PROMPTS: "11783fb294ed017473ee53c207d71f2161c7672c8d0b037501e78387f801cb5a",
               data.XSTEST_COMPLETIONS: "67b4e1834880021c0e674eaa09e2237a7e7928702ff9bd013b373c05c4253fef"}
    for path, digest in digests.items():
        with open(path, "rb") as f:
            assert hashlib.sha256(f.read()).hexdigest() == digest, path
    redteam = data.load_prompts(data.REDTEAM_PROMPTS)
    counts = collections.Counter(p["category"] for p in redteam)
    assert len(redteam) == 83 and len(counts) == 8 and counts["Social Bias"] == 14 and counts["Pornographic"] == 9
    assert len(data.load_prompts(data.HELPFUL_PROMPTS)) == 129
    for name in ("hh-rlhf-LICENSE", "sacpo-assets-LICENSE", "xstest-LICENSE", "README.md"):
        assert os.path.exists(os.path.join(data.ASSETS, name))


def test_study_real_splits_the_carried_pairs(tmp_path):
    """study_real.py's data split on the repository's HH copy: 64 held-out and 2239 training rows, disjoint, fixed by
    the seed (what `make study-real` trains on)."""
    from studies import real as study_real

    train_file, held_file = study_real.split_pairs(data.HH_HARMLESS_TEST, str(tmp_path), 64, 0)
    train, held = data.load_pairs(train_file), data.load_pairs(held_file)
    assert (len(train), len(held)) == (2239, 64)
    assert not {p.prompt + p.chosen for p in train} & {p.prompt + p.chosen for p in held}
    again = study_real.split_pairs(data.HH_HARMLESS_TEST, str(tmp_path / "again"), 64, 0)[1]
    with open(held_file) as a, open(again) as b:
        assert a.read() == b.read()
