"""Tiny offline models: every architecture builds, reloads with the Auto classes, runs;
the tokenizer's chat template renders incrementally; builds are deterministic."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import write_jsonl, write_text
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from scalora_dist.model.tiny import (
    ARCHITECTURES,
    build_tokenizer,
    default_corpus,
    make_tiny_model,
)

TEXTS = [
    "The fox lives in the forest.",
    "  two  spaces\n\nand 12345 digits, café ünïcödé 😀",
    "<|im_start|>user\nHi<|im_end|>\n",
]

CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Where does the fox live?"},
        {"role": "assistant", "content": "In the forest."},
        {"role": "user", "content": "And the owl?"},
        {"role": "assistant", "content": " In the\nvalley. "},
    ],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": ""}, {"role": "user", "content": "b"}],
]


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_arch_builds_reloads_and_runs(tiny_model, arch):
    path = tiny_model(arch)
    assert (path / "model.safetensors").is_file() and (path / "config.json").is_file()
    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    config = model.config.get_text_config()  # the language model's (Gemma-3 multimodal nests it)

    assert config.vocab_size == len(tok) == 512
    assert config.hidden_size == 64 and config.num_hidden_layers == 2
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (
        tok.bos_token_id,
        tok.eos_token_id,
        tok.pad_token_id,
    )
    assert tok.bos_token == "<|bos|>" and tok.eos_token == "<|eos|>" and tok.pad_token == "<|pad|>"
    # untied: lm_head is its own Linear
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    assert isinstance(head, torch.nn.Linear)
    assert head.weight.data_ptr() != emb.weight.data_ptr()
    # the reloaded tokenizer (whatever class AutoTokenizer picks for this arch) encodes
    # exactly like the one that was trained
    reference = build_tokenizer()
    for text in TEXTS:
        assert tok(text)["input_ids"] == reference(text)["input_ids"]
        assert tok.decode(tok(text)["input_ids"]) == text
    assert max(max(tok(t)["input_ids"]) for t in TEXTS) < config.vocab_size

    # longer than gemma3's sliding window (32): exercises both attention kinds
    ids = tok(" ".join(TEXTS * 4), return_tensors="pt")["input_ids"][:, :80]
    assert ids.shape[1] > 40
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape == (1, ids.shape[1], config.vocab_size)
    assert torch.isfinite(logits).all()


def test_chat_template_prefix_property(tiny_tokenizer):
    tok = tiny_tokenizer
    for conv in CONVERSATIONS:
        full = tok.apply_chat_template(conv, tokenize=False)
        for k in range(1, len(conv)):  # transformers refuses to render an empty conversation
            before = tok.apply_chat_template(conv[:k], tokenize=False, add_generation_prompt=True)
            after = tok.apply_chat_template(conv[: k + 1], tokenize=False)
            assert full.startswith(after)
            if conv[k]["role"] == "assistant":
                assert after.startswith(before)
                assert after[len(before) :] == conv[k]["content"] + "<|im_end|>\n"
    text = tok.apply_chat_template(CONVERSATIONS[0], tokenize=False)
    assert text == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.convert_tokens_to_ids("<|im_start|>") in ids  # special tokens are atomic
    assert tok.convert_tokens_to_ids("<|im_end|>") in ids


def test_deterministic(tmp_path):
    a = make_tiny_model(tmp_path / "a", arch="qwen3", num_layers=1, seed=3)
    b = make_tiny_model(tmp_path / "b", arch="qwen3", num_layers=1, seed=3)
    c = make_tiny_model(tmp_path / "c", arch="qwen3", num_layers=1, seed=4)
    wa, wb, wc = (load_file(p / "model.safetensors") for p in (a, b, c))
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not all(torch.equal(wa[k], wc[k]) for k in wa)
    assert (a / "tokenizer.json").read_text() == (b / "tokenizer.json").read_text()
    assert json.loads((a / "config.json").read_text()) == json.loads((b / "config.json").read_text())


def test_custom_corpus_and_fallback(tmp_path):
    txt = write_text(tmp_path / "c.txt", ["zebra quagga okapi"] * 50)
    chat = write_jsonl(tmp_path / "c.jsonl", [{"messages": [{"role": "user", "content": "wombat numbat"}]}] * 50)
    tok = build_tokenizer([str(txt), str(chat)], vocab_size=300)
    assert len(tok) <= 300  # a small corpus may run out of merges before vocab_size
    assert len(tok("zebra")["input_ids"]) == 1 and len(tok("wombat")["input_ids"]) == 1
    empty = build_tokenizer([], vocab_size=300)  # no corpus at all: built-in fallback text
    assert empty.decode(empty("The fox lives in the forest.")["input_ids"]) == "The fox lives in the forest."
    assert default_corpus() and default_corpus()[0].endswith("quickstart_train.jsonl")


def test_custom_sizes_and_bad_arch(tmp_path):
    path = make_tiny_model(
        tmp_path / "m", arch="gemma3", hidden_size=32, num_layers=3, num_heads=2, num_kv_heads=1, intermediate_size=48
    )
    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.config.num_hidden_layers == 3 and model.config.head_dim == 16
    assert model.config.layer_types[-1] == "full_attention"
    with pytest.raises(ValueError, match="unknown arch"):
        make_tiny_model(tmp_path / "x", arch="gpt5")
