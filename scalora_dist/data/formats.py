"""Record formats: how one record becomes `input_ids` and `labels` (-100 = no loss).

* `text`: `[bos] + tokens(text) + [eos]`, loss on every token. Records whose text is empty
  or only whitespace are dropped.
* `instruction`: `[bos] + tokens(prompt) + tokens(response) + [eos]`, loss on the response
  and the eos only. The prompt and the response are tokenised separately and joined with
  no separator: put one (a newline, "### Response:", ...) in the prompt if you want one.
* `alpaca`: the Stanford Alpaca columns `instruction`, `input` (optional) and `output`
  (and `system`, optional). With a tokenizer that has a chat template they become a user
  turn (instruction, a blank line, input) and an assistant turn (output), rendered as in
  `chat`; without one, the Alpaca prompt text ("Below is an instruction ... ### Response:")
  is the prompt of an `instruction` record.
* `chat`: the `messages` list (`{"role", "content"}` objects) rendered with the tokenizer's
  chat template. Loss only on assistant turns: for each assistant message k, the text
  between `render(messages[:k], add_generation_prompt=True)` and `render(messages[:k+1])`
  (the reply plus the template's end-of-turn marker) is labelled, everything else is -100.
  This requires each of those renders to be a prefix of the next one (true of ChatML and
  most templates); a template without that property is rejected. The rendered text is
  tokenised segment by segment (segment = the text between two such boundaries), so token
  boundaries always fall on turn boundaries. No bos/eos is added: the template decides.
* `sharegpt`: the `conversations` list of `{"from", "value"}` objects (from: system, human
  or user, gpt or assistant), then as `chat`.

`bos` is prepended when the tokenizer has a bos token (whether or not it would add it
itself: tokens are encoded with `add_special_tokens=False` and bos/eos added here, so it
is never doubled).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import datasets

from scalora_dist.config import DataConfig

IGNORE_INDEX = -100
"""Label value that carries no loss (the default ignore_index of cross-entropy)."""

FEATURES = datasets.Features(
    {
        "input_ids": datasets.List(datasets.Value("int32")),
        "labels": datasets.List(datasets.Value("int32")),
    }
)
TOKENISED_FEATURES = datasets.Features({**FEATURES, "length": datasets.Value("int32")})
"""A tokenised example: FEATURES, and its length before truncation to data.max_length."""

_SOURCE_HASH = hashlib.blake2b(
    b"".join(p.read_bytes() for p in sorted(Path(__file__).parent.glob("*.py"))), digest_size=8
).hexdigest()

# Stanford Alpaca's prompts, for tokenizers without a chat template.
ALPACA_PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)
ALPACA_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides "
    "further context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
CHAT_FORMATS = ("chat", "sharegpt")


class DataError(ValueError):
    """User data problem; message names the file (or dataset) and the 1-based line or row."""


class RecordError(Exception):
    """Raised inside dataset.map with the record's index in its source; turned into a DataError."""

    def __init__(self, index: int, message: str):
        super().__init__(message)
        self.index = index
        self.message = message


def fields(cfg: DataConfig, plain_text: bool = False) -> dict[str, str]:
    """Format role -> column name."""
    if cfg.format == "text":
        return {"text": "text" if plain_text else cfg.text_field}
    if cfg.format == "instruction":
        return {"prompt": cfg.prompt_field, "response": cfg.response_field}
    if cfg.format == "alpaca":
        return {"instruction": "instruction", "input": "input", "output": "output", "system": "system"}
    if cfg.format == "sharegpt":
        return {"messages": "conversations"}
    return {"messages": cfg.messages_field}


OPTIONAL_FIELDS = {"alpaca": ("input", "system")}


def hash_parts(*parts: Any) -> str:
    """A fingerprint for datasets' cache: this package's source plus the parts."""
    h = hashlib.blake2b(digest_size=16)
    h.update(_SOURCE_HASH.encode())
    for p in parts:
        h.update(b"\x00" + json.dumps(p, sort_keys=True, default=str).encode())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------
# Record checks (also used to find the first bad line of a JSON file)


def type_name(value: Any) -> str:
    return {dict: "object", list: "list", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), type(value).__name__
    )


def check_record(rec: Any, fmt: str, cols: dict[str, str]) -> str | None:
    """Why this record is unusable for `fmt`, or None. (Emptiness is judged elsewhere.)"""
    if not isinstance(rec, dict):
        return f"expected a JSON object, got {type_name(rec)}"
    if fmt in CHAT_FORMATS:
        return check_messages(rec.get(cols["messages"]), cols["messages"], fmt)
    optional = OPTIONAL_FIELDS.get(fmt, ())
    for role, name in cols.items():
        value = rec.get(name)
        if value is None and role in optional:
            continue
        if value is None:
            return f"missing field '{name}'"
        if not isinstance(value, str):
            return f"field '{name}' must be a string, got {type_name(value)}"
    return None


def check_messages(messages: Any, name: str, fmt: str = "chat") -> str | None:
    role_key, content_key = ("from", "value") if fmt == "sharegpt" else ("role", "content")
    if messages is None:
        return f"missing field '{name}'"
    if not isinstance(messages, list):
        return f"field '{name}' must be a list of {{{role_key}, {content_key}}} objects, got {type_name(messages)}"
    if not messages:
        return f"field '{name}' is an empty list"
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            return f"{name}[{i}] must be a {{{role_key}, {content_key}}} object, got {type_name(m)}"
        for key in (role_key, content_key):
            if m.get(key) is None:
                return f"{name}[{i}]: missing field '{key}'"
            if not isinstance(m[key], str):
                return f"{name}[{i}]: field '{key}' must be a string, got {type_name(m[key])}"
        if fmt == "sharegpt" and m[role_key] not in SHAREGPT_ROLES:
            return f"{name}[{i}]: 'from' is {m[role_key]!r}; ShareGPT turns are from {', '.join(SHAREGPT_ROLES)}"
    roles = [SHAREGPT_ROLES[m[role_key]] if fmt == "sharegpt" else m[role_key] for m in messages]
    if "assistant" not in roles:
        return f"no assistant turn in '{name}' (nothing to train on)"
    return None


# ---------------------------------------------------------------------------------------
# Tokenisation


class TokenizerInfo:
    """The tokenizer plus what the map function needs. The map calls pass an explicit
    new_fingerprint (built from `fingerprint`), so datasets never pickles this to hash it."""

    def __init__(self, tokenizer, bos: int | None, eos: int | None, fingerprint: str):
        self.tokenizer, self.bos, self.eos, self.fingerprint = tokenizer, bos, eos, fingerprint

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    @classmethod
    def of(cls, tokenizer, cfg: DataConfig) -> TokenizerInfo:
        bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
        info = cls(tokenizer, bos, eos, _tokenizer_fingerprint(tokenizer))
        templated = cfg.format in CHAT_FORMATS or (cfg.format == "alpaca" and info.has_chat_template)
        if not templated and eos is None:
            raise DataError(
                f"data.format '{cfg.format}' needs a tokenizer with an eos token to end "
                f"each example; this tokenizer has none"
            )
        if cfg.format in CHAT_FORMATS and not info.has_chat_template:
            raise DataError(
                f"data.format '{cfg.format}' needs a tokenizer with a chat template; this tokenizer "
                "has none (set one, or use format 'instruction')"
            )
        return info

    def encode(self, texts: list[str]) -> list[list[int]]:
        if not texts:
            return []
        return self.tokenizer(texts, add_special_tokens=False)["input_ids"]


def _tokenizer_fingerprint(tokenizer) -> str:
    parts = [
        type(tokenizer).__name__,
        str(tokenizer.bos_token_id),
        str(tokenizer.eos_token_id),
        str(getattr(tokenizer, "chat_template", None)),
    ]
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        parts.append(backend.to_str())
    else:
        parts.append(json.dumps(sorted(tokenizer.get_vocab().items())))
    parts.append(json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str))
    return hash_parts(*parts)


def tokenize_batch(
    batch: dict[str, list],
    indices: list[int],
    *,
    cfg_format: str,
    cols: dict[str, str],
    max_length: int | None,
    tok: TokenizerInfo,
) -> dict:
    n = len(indices)
    columns = {key: batch.get(name, [None] * n) for key, name in cols.items()}
    if cfg_format in CHAT_FORMATS:
        examples = _chat_examples(columns["messages"], indices, cols["messages"], tok, cfg_format)
    elif cfg_format == "alpaca":
        examples = _alpaca_examples(columns, indices, cols, tok)
    elif cfg_format == "instruction":
        examples = _instruction_examples(columns, indices, cols, tok)
    else:
        examples = _text_examples(columns["text"], indices, cols["text"], tok)

    out = {"input_ids": [], "labels": [], "length": []}
    for ids, labels in examples:
        length = len(ids)
        if max_length is not None:
            ids, labels = ids[:max_length], labels[:max_length]
        if any(label != IGNORE_INDEX for label in labels):
            out["input_ids"].append(ids)
            out["labels"].append(labels)
            out["length"].append(length)
    return out


def _check_column(values: list, indices: list[int], name: str, optional: bool = False) -> None:
    for value, index in zip(values, indices):
        if value is None and optional:
            continue
        if value is None:
            raise RecordError(index, f"missing field '{name}'")
        if not isinstance(value, str):
            raise RecordError(index, f"field '{name}' must be a string, got {type_name(value)}")


def _text_examples(texts, indices, name, tok):
    _check_column(texts, indices, name)
    kept = [t for t in texts if t.strip()]  # empty texts are dropped (and counted)
    bos = [tok.bos] if tok.bos is not None else []
    for ids in tok.encode(kept):
        seq = bos + ids + [tok.eos]
        yield seq, list(seq)


def _check_responses(responses, indices, name) -> None:
    for response, index in zip(responses, indices):
        if not response.strip():
            raise RecordError(index, f"field '{name}' is empty (nothing to train on)")


def _instruction_examples(columns, indices, cols, tok):
    _check_column(columns["prompt"], indices, cols["prompt"])
    _check_column(columns["response"], indices, cols["response"])
    _check_responses(columns["response"], indices, cols["response"])
    yield from _prompt_response_examples(columns["prompt"], columns["response"], tok)


def _prompt_response_examples(prompts, responses, tok):
    bos = [tok.bos] if tok.bos is not None else []
    for p, r in zip(tok.encode(prompts), tok.encode(responses)):
        prefix = bos + p
        target = r + [tok.eos]
        yield prefix + target, [IGNORE_INDEX] * len(prefix) + target


def _alpaca_examples(columns, indices, cols, tok):
    for role in ("instruction", "output"):
        _check_column(columns[role], indices, cols[role])
    for role in ("input", "system"):
        _check_column(columns[role], indices, cols[role], optional=True)
    _check_responses(columns["output"], indices, cols["output"])
    rows = zip(columns["instruction"], columns["input"], columns["output"], columns["system"])
    if tok.has_chat_template:
        conversations = []
        for instruction, extra, output, system in rows:
            user = f"{instruction}\n\n{extra}" if extra and extra.strip() else instruction
            turns = [{"role": "system", "content": system}] if system and system.strip() else []
            conversations.append(turns + [{"role": "user", "content": user}, {"role": "assistant", "content": output}])
        yield from _templated_examples(conversations, indices, tok)
        return
    prompts, responses = [], []
    for instruction, extra, output, system in rows:
        template = ALPACA_PROMPT_WITH_INPUT if extra and extra.strip() else ALPACA_PROMPT
        prompt = template.format(instruction=instruction, input=extra)
        prompts.append(f"{system}\n\n{prompt}" if system and system.strip() else prompt)
        responses.append(output)
    yield from _prompt_response_examples(prompts, responses, tok)


def _render(tokenizer, messages, index: int, generation_prompt: bool) -> str:
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as e:  # noqa: BLE001 - template errors (e.g. role order) are data errors
        raise RecordError(index, f"the tokenizer's chat template failed on this record: {e}") from None
    if not isinstance(text, str):  # some versions return a list for batched input
        text = text[0]
    return text


def _chat_segments(tokenizer, messages: list[dict], index: int) -> list[tuple[str, bool]]:
    """Split the rendered conversation into (text, is_assistant) segments."""
    full = _render(tokenizer, messages, index, False)
    boundaries: list[tuple[int, bool]] = []  # (end offset, segment-before-it is assistant)
    for k, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        if k == 0:
            raise RecordError(
                index,
                "the conversation starts with an assistant turn; the prompt before it "
                "cannot be rendered (transformers refuses an empty conversation): put a "
                "system or user turn first",
            )
        before = _render(tokenizer, messages[:k], index, True)
        after = _render(tokenizer, messages[: k + 1], index, False)
        last = boundaries[-1][0] if boundaries else 0
        if not (after.startswith(before) and full.startswith(after) and len(before) >= last):
            raise RecordError(
                index,
                "the tokenizer's chat template does not render conversations incrementally "
                "(render(messages[:k], add_generation_prompt=True) is not a prefix of "
                "render(messages[:k+1]) for assistant turn "
                f"{k}), so the assistant tokens cannot be located for loss masking; use a "
                "template with that property or format 'instruction'",
            )
        boundaries.append((len(before), False))
        boundaries.append((len(after), True))
    segments, start = [], 0
    for end, is_assistant in boundaries:
        segments.append((full[start:end], is_assistant))
        start = end
    segments.append((full[start:], False))
    return [(text, a) for text, a in segments if text]


def _chat_examples(column, indices, name, tok, fmt):
    conversations = []
    for messages, index in zip(column, indices):
        problem = check_messages(messages, name, fmt)
        if problem:
            raise RecordError(index, problem)
        if fmt == "sharegpt":
            conversations.append([{"role": SHAREGPT_ROLES[m["from"]], "content": m["value"]} for m in messages])
        else:
            conversations.append([{k: v for k, v in m.items() if v is not None} for m in messages])
    yield from _templated_examples(conversations, indices, tok)


def _templated_examples(conversations, indices, tok):
    per_record = [_chat_segments(tok.tokenizer, c, index) for c, index in zip(conversations, indices)]
    flat = [text for segs in per_record for text, _ in segs]
    encoded = iter(tok.encode(flat))
    for segs in per_record:
        ids, labels = [], []
        for _, is_assistant in segs:
            piece = next(encoded)
            ids += piece
            labels += piece if is_assistant else [IGNORE_INDEX] * len(piece)
        yield ids, labels
