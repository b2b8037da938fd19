"""Tiny demo models built offline: a byte-level BPE tokenizer trained on a local corpus and
a randomly initialised causal LM of a real transformers architecture.

Nothing here touches the network. The result is an ordinary checkpoint directory
(config.json, model.safetensors, tokenizer files, chat template) that
`AutoModelForCausalLM.from_pretrained(dir)` / `AutoTokenizer.from_pretrained(dir)` load.

    from scalora_dist.model.tiny import make_tiny_model
    path = make_tiny_model("runs/tiny-llama", arch="llama")

Same arguments -> identical tokenizer and identical weights (seeded init).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import transformers
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "gemma3", "gemma3-multimodal")
"""`gemma3` is the text-only Gemma3ForCausalLM (Gemma-3-270M/1B); `gemma3-multimodal` is
Gemma3ForConditionalGeneration with a small SigLIP vision tower, the class of the real
Gemma-3 4B/12B/27B checkpoints (stored on disk as `language_model.model.*`)."""

BOS, EOS, PAD, UNK = "<|bos|>", "<|eos|>", "<|pad|>", "<|unk|>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [PAD, BOS, EOS, IM_START, IM_END, UNK]  # ids 0..5, in this order

# Pre-tokenisation of Qwen2 (GPT-style split, single digits) + NFC. transformers 5 reloads a
# qwen2 checkpoint's tokenizer with its own Qwen2Tokenizer, which rebuilds this exact pipeline
# from the saved vocab/merges; using it for every arch keeps all reloads identical. The
# explicit unk token stops Qwen2Tokenizer from adding an out-of-vocabulary <|endoftext|>.
_SPLIT_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# ChatML. Rendering messages[:k] with add_generation_prompt=True is a prefix of the
# rendering of messages[:k+1] when message k is the assistant's (data.py relies on it).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

_FALLBACK_TEXT = """\
The fox lives in the forest and eats berries in the morning.
Anna takes a blue kite to the meadow on Sunday.
The grey owl watches the clouds at night and sleeps all afternoon.
Ben feeds fish to the otter after lunch, and the otter feels happy.
One rainy day Clara walked slowly to the river with an old lantern.
The bear is brown and likes honey. Every day the bear counts the stars.
Later David told Ella about the small boat by the lake.
Numbers: one two three four five six seven eight nine ten 0 1 2 3 4 5 6 7 8 9.
Questions and answers: What is it? It is a red ball. Where is it? It is in the garden!
"""


def default_corpus() -> list[str]:
    """The shipped quickstart corpus if this is a source checkout, else nothing."""
    root = Path(__file__).resolve().parents[2]
    path = root / "configs" / "data" / "quickstart_train.jsonl"
    return [str(path)] if path.is_file() else []


def _strings(value) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return []


def _corpus_texts(files: list[str]) -> list[str]:
    """Text of the corpus files: JSONL/JSON records' `text` (else every string value),
    plain-text files line by line."""
    texts: list[str] = []
    for name in files:
        path = Path(name)
        raw = path.read_text(encoding="utf-8")
        if path.suffix in (".jsonl", ".json"):
            stripped = raw.lstrip()
            if stripped.startswith("["):
                records = json.loads(raw)
            else:
                records = [json.loads(line) for line in raw.splitlines() if line.strip()]
            for rec in records:
                if isinstance(rec, dict) and isinstance(rec.get("text"), str):
                    texts.append(rec["text"])
                else:
                    texts.extend(_strings(rec))
        else:
            texts.extend(line for line in raw.splitlines() if line.strip())
    return texts


def build_tokenizer(
    corpus_files: list[str] | None = None, vocab_size: int = 512
) -> transformers.PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on the corpus files (default: the quickstart
    corpus, or a small built-in text when that is not available).

    The vocabulary has at most `vocab_size` entries (fewer when a small corpus runs out of
    merges); size the model with len(tokenizer).

    Special tokens (ids 0-5): <|pad|>, <|bos|>, <|eos|>, <|im_start|>, <|im_end|>, <|unk|>
    (byte-level BPE never produces <|unk|>; it is there for transformers' Qwen2Tokenizer). The
    tokenizer itself adds no special tokens when encoding (callers add bos/eos); its chat
    template is ChatML.
    """
    files = list(corpus_files) if corpus_files is not None else default_corpus()
    texts = _corpus_texts(files) if files else []
    if not texts:
        texts = _FALLBACK_TEXT.splitlines()

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_SPLIT_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)

    wrapped = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        additional_special_tokens=[IM_START, IM_END],
        model_max_length=2048,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )
    wrapped.chat_template = CHAT_TEMPLATE
    return wrapped


def _model_config(
    arch: str,
    vocab: int,
    tokenizer,
    *,
    hidden_size,
    num_layers,
    num_heads,
    num_kv_heads,
    intermediate_size,
    max_position_embeddings,
    tie_word_embeddings=False,
):
    if hidden_size % num_heads:
        raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads {num_heads} is not divisible by num_kv_heads {num_kv_heads}")
    head_dim = hidden_size // num_heads
    common = dict(
        vocab_size=vocab,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=tie_word_embeddings,
    )
    if arch == "llama":
        return transformers.LlamaConfig(head_dim=head_dim, **common)
    if arch == "mistral":
        return transformers.MistralConfig(head_dim=head_dim, sliding_window=None, **common)
    if arch == "qwen2":
        return transformers.Qwen2Config(**common)
    if arch == "qwen3":
        return transformers.Qwen3Config(head_dim=head_dim, **common)
    if arch in ("gemma3", "gemma3-multimodal"):
        # Alternate sliding / full attention (the last layer is always full), with a
        # small window so short test sequences exercise both kinds.
        layer_types = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(num_layers)]
        layer_types[-1] = "full_attention"
        text = transformers.Gemma3TextConfig(
            head_dim=head_dim,
            query_pre_attn_scalar=head_dim,
            sliding_window=min(32, max_position_embeddings),
            layer_types=layer_types,
            **common,
        )
        if arch == "gemma3":
            return text
        vision = transformers.SiglipVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=28,
            patch_size=14,
        )
        return transformers.Gemma3Config(
            text_config=text.to_dict(),
            vision_config=vision.to_dict(),
            mm_tokens_per_image=4,
            boi_token_index=tokenizer.bos_token_id,
            eoi_token_index=tokenizer.eos_token_id,
            image_token_index=tokenizer.unk_token_id,
            tie_word_embeddings=tie_word_embeddings,
        )
    raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHITECTURES)}")


def make_tiny_model(
    out_dir: str | Path,
    *,
    arch: str = "llama",
    corpus_files: list[str] | None = None,
    vocab_size: int = 512,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    max_position_embeddings: int = 512,
    tie_word_embeddings: bool = False,
    max_shard_size: str | None = None,
    seed: int = 0,
) -> Path:
    """Build a tokenizer and a randomly initialised `arch` causal LM; save both to out_dir
    (safetensors; with `max_shard_size`, several files and an index, as large checkpoints
    are stored). Returns out_dir as a Path."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHITECTURES)}")
    out = Path(out_dir)
    tokenizer = build_tokenizer(corpus_files, vocab_size=vocab_size)
    tokenizer.model_max_length = max_position_embeddings
    config = _model_config(
        arch,
        len(tokenizer),
        tokenizer,
        hidden_size=hidden_size,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
    )
    config.dtype = torch.float32
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # Chat generations end at <|im_end|>, plain text at <|eos|>.
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(IM_END)]
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    tokenizer.save_pretrained(out)
    return out
