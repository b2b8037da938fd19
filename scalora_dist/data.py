"""Training data: local files -> tokenised (and optionally packed) examples -> micro-batches.

Files
-----
`load_split` reads one split (a list of local files) with `datasets.load_dataset`; the
builder follows the extension: `.jsonl` / `.json` -> "json" (JSON Lines, or one JSON array
of records), `.parquet` -> "parquet", `.txt` -> "text" (one record per line, field `text`;
blank lines are skipped). All files of a split must use the same builder. Nothing touches
the network; results are cached by `datasets` under its usual cache directory, keyed on the
files, the data config, the tokenizer and this module's source.

Formats (`DataConfig.format`)
-----------------------------
* `text`: `[bos] + tokens(text) + [eos]`, loss on every token. Records whose text is empty
  or only whitespace are dropped.
* `instruction`: `[bos] + tokens(prompt) + tokens(response) + [eos]`, loss on the response
  and the eos only. The prompt and the response are tokenised separately and joined with
  no separator: put one (a newline, "### Response:", ...) in the prompt if you want one.
* `chat`: the `messages` list (`{"role", "content"}` objects) rendered with the tokenizer's
  chat template. Loss only on assistant turns: for each assistant message k, the text
  between `render(messages[:k], add_generation_prompt=True)` and `render(messages[:k+1])`
  (the reply plus the template's end-of-turn marker) is labelled, everything else is -100.
  This requires each of those renders to be a prefix of the next one (true of ChatML and
  most templates); a template without that property is rejected with a DataError. The
  rendered text is tokenised segment by segment (segment = the text between two such
  boundaries), so token boundaries always fall on turn boundaries. No bos/eos is added:
  the template decides.

`bos` is prepended when the tokenizer has a bos token (whether or not it would add it
itself: tokens are encoded with `add_special_tokens=False` and bos/eos added here, so it
is never doubled). Without packing, examples are truncated to `max_length` tokens; an
example left with no labelled token (a prompt longer than `max_length`, say) is dropped and
counted.

Packing (`DataConfig.packing`)
------------------------------
The tokenised examples, in file order and NOT truncated (a long example runs on into the
next chunk), are concatenated (input_ids and labels alike; each example already ends with
eos in the `text`/`instruction` formats) and cut into consecutive chunks of exactly
`max_length` tokens; the final remainder (< max_length tokens) is dropped, and so is any
chunk with no labelled token. Attention is NOT blocked at example boundaries: a token can
attend to the end of the previous example in its chunk (the usual "EOS-separated" packing).

Output: a `datasets.Dataset` with exactly two columns, `input_ids` and `labels` (lists of
ints, -100 = no loss).

Batches
-------
`BatchLoader` turns that dataset into padded micro-batches for one data-parallel rank; see
its docstring for the exact ordering rule.

Errors
------
A user data problem raises `DataError` whose message names the file and the 1-based line
(JSON Lines, text) or record (JSON array) or row (Parquet), e.g.
`data/train.jsonl:17: missing field 'text'`. Malformed JSON is only looked for (by
re-reading the JSON files line by line with `json.loads`) when `load_dataset` fails, so the
normal path reads each file once; the line numbers of records that fail validation after
loading are likewise only computed when there is an error to report.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch

from .config import DataConfig

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
"""Label value that carries no loss (the default ignore_index of cross-entropy)."""

_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".txt": "text"}
_MAP_BATCH = 1000

_SOURCE_HASH = hashlib.blake2b(Path(__file__).read_bytes(), digest_size=8).hexdigest()


class DataError(ValueError):
    """User data problem; message names the file and (1-based) line or row."""


class _RecordError(Exception):
    """Raised inside dataset.map with the global record index; turned into a DataError."""

    def __init__(self, index: int, message: str):
        super().__init__(message)
        self.index = index
        self.message = message


# ---------------------------------------------------------------------------------------
# Loading


def load_split(cfg: DataConfig, tokenizer, files: list[str]) -> datasets.Dataset:
    """Load, validate and tokenise one split; returns a Dataset with `input_ids`, `labels`.

    Raises DataError for any problem with the files or their records."""
    files = [str(f) for f in files]
    if not files:
        raise DataError("no data files given")
    builder = _builder_for(files)
    if builder == "text" and cfg.format != "text":
        raise DataError(
            f"{files[0]}: plain-text files only support data.format 'text' "
            f"(format '{cfg.format}' needs JSON Lines, JSON or Parquet records)"
        )
    for f in files:
        if _file_is_empty(f, builder):
            raise DataError(f"{f}: no records")
    tok = _TokenizerInfo.of(tokenizer, cfg)

    locator = _Locator(files, builder)
    try:
        raw = datasets.load_dataset(builder, data_files=files, split="train")
    except Exception as e:  # noqa: BLE001 - every failure becomes a DataError naming files
        raise _diagnose_load_failure(cfg, files, builder, e) from None
    if len(raw) == 0:
        raise DataError(f"{', '.join(files)}: no records")

    fields = _fields(cfg, builder)
    # packing does not truncate: a long example runs on into the next chunk(s)
    truncate_to = None if cfg.packing else cfg.max_length
    fingerprint = _hash(raw._fingerprint, cfg.format, fields, truncate_to, tok.fingerprint)
    try:
        out = raw.map(
            _tokenize_batch,
            batched=True,
            batch_size=_MAP_BATCH,
            with_indices=True,
            remove_columns=raw.column_names,
            fn_kwargs={"cfg_format": cfg.format, "fields": fields,
                       "max_length": truncate_to, "tok": tok},
            features=_FEATURES,
            new_fingerprint=fingerprint,
            desc=f"Tokenising ({cfg.format})",
        )
    except _RecordError as e:
        raise DataError(f"{locator.where(e.index)}: {e.message}") from None

    dropped = len(raw) - len(out)
    if len(out) == 0:
        raise DataError(
            f"{', '.join(files)}: all {len(raw)} records were dropped: none has a token to "
            f"train on within data.max_length={cfg.max_length} (empty texts, or prompts "
            f"longer than max_length?)"
        )
    if dropped:
        logger.warning(
            "%s: dropped %d of %d records with nothing to train on (empty text, or no "
            "labelled token within max_length=%d)", ", ".join(files), dropped, len(raw),
            cfg.max_length,
        )
    if cfg.packing:
        out = _pack(out, cfg.max_length, files)
    return out


def _builder_for(files: list[str]) -> str:
    builders = {}
    for f in files:
        path = Path(f)
        if not path.is_file():
            raise DataError(f"{f}: file not found" if not path.exists() else f"{f}: not a file")
        ext = path.suffix.lower()
        if ext not in _BUILDERS:
            raise DataError(
                f"{f}: unsupported file type '{ext or '(none)'}'; use .jsonl, .json, "
                f".parquet or .txt"
            )
        builders[f] = _BUILDERS[ext]
    kinds = set(builders.values())
    if len(kinds) > 1:
        listing = ", ".join(f"{f} ({b})" for f, b in builders.items())
        raise DataError(f"all files of a split must have the same type; got {listing}")
    return kinds.pop()


def _file_is_empty(path: str, builder: str) -> bool:
    if builder == "parquet":
        import pyarrow.parquet as pq

        try:
            return pq.ParquetFile(path).metadata.num_rows == 0
        except Exception as e:  # noqa: BLE001
            raise DataError(f"{path}: not a readable Parquet file ({e})") from None
    with open(path, "rb") as f:
        head = b""
        while chunk := f.read(1 << 16):
            head = chunk.strip()
            if head:
                break
        if not head:
            return True
    if builder == "json" and head[:1] == b"[":
        rest = head[1:].strip()
        return rest[:1] == b"]"
    return False


def _fields(cfg: DataConfig, builder: str) -> dict[str, str]:
    if cfg.format == "text":
        return {"text": "text" if builder == "text" else cfg.text_field}
    if cfg.format == "instruction":
        return {"prompt": cfg.prompt_field, "response": cfg.response_field}
    return {"messages": cfg.messages_field}


def _diagnose_load_failure(cfg, files, builder, error: Exception) -> DataError:
    cause = error.__cause__ or error.__context__ or error
    if builder == "json":
        fields = _fields(cfg, builder)
        for f in files:
            problem = _scan_json_file(f, cfg.format, fields)
            if problem:
                return DataError(problem)
    detail = f"{type(cause).__name__}: {cause}" if str(cause) else type(cause).__name__
    return DataError(f"{', '.join(files)}: could not be loaded ({detail})")


def _scan_json_file(path: str, fmt: str, fields: dict[str, str]) -> str | None:
    """Find the first bad record of a JSON / JSON Lines file; return 'FILE:LINE: why'."""
    text = Path(path).read_text(encoding="utf-8", errors="replace")
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            return f"{path}:{e.lineno}: not valid JSON ({e.msg}, column {e.colno})"
        if not isinstance(records, list):
            return f"{path}: expected a JSON array of objects"
        for i, rec in enumerate(records, 1):
            problem = _check_record(rec, fmt, fields)
            if problem:
                return f"{path}: record {i}: {problem}"
        return None
    for lineno, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            return f"{path}:{lineno}: not valid JSON ({e.msg}, column {e.colno})"
        problem = _check_record(rec, fmt, fields)
        if problem:
            return f"{path}:{lineno}: {problem}"
    return None


def _type_name(value: Any) -> str:
    return {dict: "object", list: "list", str: "string", bool: "boolean",
            type(None): "null"}.get(type(value), type(value).__name__)


def _check_record(rec: Any, fmt: str, fields: dict[str, str]) -> str | None:
    """Why this record is unusable for `fmt`, or None. (Emptiness is judged elsewhere.)"""
    if not isinstance(rec, dict):
        return f"expected a JSON object, got {_type_name(rec)}"
    if fmt == "chat":
        return _check_messages(rec.get(fields["messages"]), fields["messages"])
    for name in fields.values():
        value = rec.get(name)
        if value is None:
            return f"missing field '{name}'"
        if not isinstance(value, str):
            return f"field '{name}' must be a string, got {_type_name(value)}"
    return None


def _check_messages(messages: Any, name: str) -> str | None:
    if messages is None:
        return f"missing field '{name}'"
    if not isinstance(messages, list):
        return f"field '{name}' must be a list of {{role, content}} objects, got {_type_name(messages)}"
    if not messages:
        return f"field '{name}' is an empty list"
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            return f"{name}[{i}] must be a {{role, content}} object, got {_type_name(m)}"
        for key in ("role", "content"):
            if m.get(key) is None:
                return f"{name}[{i}]: missing field '{key}'"
            if not isinstance(m[key], str):
                return f"{name}[{i}]: field '{key}' must be a string, got {_type_name(m[key])}"
    if not any(m["role"] == "assistant" for m in messages):
        return f"no assistant turn in '{name}' (nothing to train on)"
    return None


class _Locator:
    """Maps a global record index to 'FILE:LINE' / 'FILE: record N' / 'FILE: row N'.

    Records are numbered in file order, as load_dataset concatenates them. Built lazily:
    only needed when there is an error to report."""

    def __init__(self, files: list[str], builder: str):
        self.files, self.builder = files, builder
        self._table: list[tuple[str, str, list[int] | int]] | None = None

    def _build(self) -> list[tuple[str, str, list[int] | int]]:
        table = []
        for f in self.files:
            if self.builder == "parquet":
                import pyarrow.parquet as pq

                table.append((f, "row", pq.ParquetFile(f).metadata.num_rows))
                continue
            text = Path(f).read_text(encoding="utf-8", errors="replace")
            if self.builder == "json" and text.lstrip().startswith("["):
                try:
                    table.append((f, "record", len(json.loads(text))))
                except (json.JSONDecodeError, TypeError):
                    table.append((f, "record", 0))
            elif self.builder == "json":  # JSON Lines: blank lines hold no record
                lines = [i for i, line in enumerate(text.split("\n"), 1) if line.strip()]
                table.append((f, "line", lines))
            else:  # text: every line is a row (StringIO.readlines semantics)
                n = text.count("\n") + (0 if text.endswith("\n") or not text else 1)
                table.append((f, "line", list(range(1, n + 1))))
        return table

    def where(self, index: int) -> str:
        if self._table is None:
            self._table = self._build()
        for f, kind, spec in self._table:
            count = len(spec) if isinstance(spec, list) else spec
            if index < count:
                if kind == "line":
                    return f"{f}:{spec[index]}"
                return f"{f}: {kind} {index + 1}"
            index -= count
        return f"{', '.join(self.files)}: record {index + 1}"  # should not happen


# ---------------------------------------------------------------------------------------
# Tokenisation


_FEATURES = datasets.Features({
    "input_ids": datasets.List(datasets.Value("int32")),
    "labels": datasets.List(datasets.Value("int32")),
})


class _TokenizerInfo:
    """The tokenizer plus what the map function needs. The map calls pass an explicit
    new_fingerprint (built from `fingerprint`), so datasets never pickles this to hash it."""

    def __init__(self, tokenizer, bos: int | None, eos: int | None, fingerprint: str):
        self.tokenizer, self.bos, self.eos, self.fingerprint = tokenizer, bos, eos, fingerprint

    @classmethod
    def of(cls, tokenizer, cfg: DataConfig) -> _TokenizerInfo:
        bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
        if cfg.format in ("text", "instruction") and eos is None:
            raise DataError(
                f"data.format '{cfg.format}' needs a tokenizer with an eos token to end "
                f"each example; this tokenizer has none"
            )
        if cfg.format == "chat" and not getattr(tokenizer, "chat_template", None):
            raise DataError(
                "data.format 'chat' needs a tokenizer with a chat template; this tokenizer "
                "has none (set one, or use format 'instruction')"
            )
        return cls(tokenizer, bos, eos, _tokenizer_fingerprint(tokenizer))

    def encode(self, texts: list[str]) -> list[list[int]]:
        if not texts:
            return []
        return self.tokenizer(texts, add_special_tokens=False)["input_ids"]


def _tokenizer_fingerprint(tokenizer) -> str:
    parts = [type(tokenizer).__name__, str(tokenizer.bos_token_id), str(tokenizer.eos_token_id),
             str(getattr(tokenizer, "chat_template", None))]
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        parts.append(backend.to_str())
    else:
        parts.append(json.dumps(sorted(tokenizer.get_vocab().items())))
    parts.append(json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str))
    return _hash(*parts)


def _hash(*parts: Any) -> str:
    h = hashlib.blake2b(digest_size=16)
    h.update(_SOURCE_HASH.encode())
    for p in parts:
        h.update(b"\x00" + json.dumps(p, sort_keys=True, default=str).encode())
    return h.hexdigest()


def _tokenize_batch(batch: dict[str, list], indices: list[int], *, cfg_format: str,
                    fields: dict[str, str], max_length: int | None,
                    tok: _TokenizerInfo) -> dict:
    n = len(indices)
    columns = {key: batch.get(name, [None] * n) for key, name in fields.items()}
    if cfg_format == "chat":
        examples = _chat_examples(columns["messages"], indices, fields["messages"], tok)
    elif cfg_format == "instruction":
        examples = _instruction_examples(columns, indices, fields, tok)
    else:
        examples = _text_examples(columns["text"], indices, fields["text"], tok)

    out = {"input_ids": [], "labels": []}
    for ids, labels in examples:
        if max_length is not None:
            ids, labels = ids[:max_length], labels[:max_length]
        if any(label != IGNORE_INDEX for label in labels):
            out["input_ids"].append(ids)
            out["labels"].append(labels)
    return out


def _check_column(values: list, indices: list[int], name: str) -> None:
    for value, index in zip(values, indices):
        if value is None:
            raise _RecordError(index, f"missing field '{name}'")
        if not isinstance(value, str):
            raise _RecordError(index, f"field '{name}' must be a string, got {_type_name(value)}")


def _text_examples(texts, indices, name, tok):
    _check_column(texts, indices, name)
    kept = [t for t in texts if t.strip()]  # empty texts are dropped (and counted)
    bos = [tok.bos] if tok.bos is not None else []
    for ids in tok.encode(kept):
        seq = bos + ids + [tok.eos]
        yield seq, list(seq)


def _instruction_examples(columns, indices, fields, tok):
    _check_column(columns["prompt"], indices, fields["prompt"])
    _check_column(columns["response"], indices, fields["response"])
    for response, index in zip(columns["response"], indices):
        if not response.strip():
            raise _RecordError(index, f"field '{fields['response']}' is empty (nothing to train on)")
    prompts = tok.encode(columns["prompt"])
    responses = tok.encode(columns["response"])
    bos = [tok.bos] if tok.bos is not None else []
    for p, r in zip(prompts, responses):
        prefix = bos + p
        target = r + [tok.eos]
        yield prefix + target, [IGNORE_INDEX] * len(prefix) + target


def _render(tokenizer, messages, index: int, generation_prompt: bool) -> str:
    try:
        text = tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt
        )
    except Exception as e:  # noqa: BLE001 - template errors (e.g. role order) are data errors
        raise _RecordError(index, f"the tokenizer's chat template failed on this record: {e}") from None
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
            raise _RecordError(
                index,
                "the conversation starts with an assistant turn; the prompt before it "
                "cannot be rendered (transformers refuses an empty conversation): put a "
                "system or user turn first",
            )
        before = _render(tokenizer, messages[:k], index, True)
        after = _render(tokenizer, messages[: k + 1], index, False)
        last = boundaries[-1][0] if boundaries else 0
        if not (after.startswith(before) and full.startswith(after)
                and len(before) >= last):
            raise _RecordError(
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


def _chat_examples(column, indices, name, tok):
    per_record = []
    for messages, index in zip(column, indices):
        problem = _check_messages(messages, name)
        if problem:
            raise _RecordError(index, problem)
        clean = [{k: v for k, v in m.items() if v is not None} for m in messages]
        per_record.append(_chat_segments(tok.tokenizer, clean, index))
    flat = [text for segs in per_record for text, _ in segs]
    encoded = iter(tok.encode(flat))
    for segs in per_record:
        ids, labels = [], []
        for _, is_assistant in segs:
            piece = next(encoded)
            ids += piece
            labels += piece if is_assistant else [IGNORE_INDEX] * len(piece)
        yield ids, labels


# ---------------------------------------------------------------------------------------
# Packing


def _pack(ds: datasets.Dataset, length: int, files: list[str]) -> datasets.Dataset:
    """Concatenate all examples in order and cut into chunks of exactly `length` tokens.

    One pass over `ds` (batched map): a batch of examples emits the chunks that START
    inside its token range, reading the following examples when a chunk runs past it."""
    import pyarrow.compute as pc

    lengths = pc.list_value_length(ds.with_format("arrow")["input_ids"]).to_numpy()
    lengths = lengths.astype(np.int64)
    ends = np.cumsum(lengths)
    total = int(ends[-1])
    n_chunks = total // length
    if n_chunks == 0:
        raise DataError(
            f"{', '.join(files)}: only {total} tokens in all, fewer than data.max_length="
            f"{length}; packing cannot fill one sequence"
        )
    packed = ds.map(
        _pack_batch,
        batched=True,
        batch_size=_MAP_BATCH,
        with_indices=True,
        remove_columns=ds.column_names,
        fn_kwargs={"source": ds, "ends": ends, "length": length, "n_chunks": n_chunks},
        features=_FEATURES,
        new_fingerprint=_hash(ds._fingerprint, "pack", length),
        desc="Packing",
    )
    if len(packed) == 0:
        raise DataError(f"{', '.join(files)}: packing left no sequence with a labelled token")
    return packed


def _pack_batch(batch, indices, *, source, ends, length, n_chunks):
    first, last = indices[0], indices[-1]
    start = int(ends[first - 1]) if first else 0  # global token offset of this batch
    stop = int(ends[last])
    c0 = -(-start // length)  # first chunk starting at or after `start`
    chunks = [c for c in range(c0, n_chunks) if c * length < stop]
    out = {"input_ids": [], "labels": []}
    if not chunks:
        return out
    ids = [t for seq in batch["input_ids"] for t in seq]
    labels = [t for seq in batch["labels"] for t in seq]
    need = (chunks[-1] + 1) * length  # global end offset the last chunk needs
    if need > stop:  # read on into the following examples
        upto = int(np.searchsorted(ends, need, side="left"))
        extra = source[last + 1 : upto + 1]
        ids += [t for seq in extra["input_ids"] for t in seq]
        labels += [t for seq in extra["labels"] for t in seq]
    for c in chunks:
        a = c * length - start
        chunk_labels = labels[a : a + length]
        if any(x != IGNORE_INDEX for x in chunk_labels):
            out["input_ids"].append(ids[a : a + length])
            out["labels"].append(chunk_labels)
    return out


# ---------------------------------------------------------------------------------------
# Batching


class BatchLoader:
    """Padded micro-batches of a tokenised dataset for one data-parallel rank.

    Ordering rule. Epoch e uses the permutation `torch.randperm(n, generator=
    torch.Generator().manual_seed(seed + e))` of the n examples (identity when
    shuffle=False). That order is cut into global batches of G = micro_batch_size *
    world_size consecutive examples; in global batch j, rank k takes the examples at
    positions [k*b, (k+1)*b) (b = micro_batch_size), i.e. micro-batch number j*W + k of the
    flat order. So at every step the W ranks together see exactly the examples that one rank
    with micro_batch_size b*W sees (same seed), in the same order when concatenated by rank.

    drop_last=True (training): an incomplete final global batch is dropped, so every rank
    gets n // G micro-batches per epoch. drop_last=False (evaluation): the r leftover
    examples form one more, smaller global batch, split into near-equal contiguous parts
    (rank k gets positions [k*r//W, (k+1)*r//W)); when r < W some ranks get nothing and
    so one micro-batch fewer than the others.

    Batches: `input_ids` (b, T) right-padded with pad_token_id to the longest example of the
    batch, `attention_mask` (1 real, 0 pad) and `labels` (-100 on padding), all int64.

    Position. `state_dict()` is {"epoch", "position"}: micro-batches this rank has already
    taken in that epoch; `load_state_dict` resumes exactly there. `__iter__` yields the rest
    of the current epoch and then moves to the next one; `next_batch` never ends.
    """

    def __init__(self, dataset, micro_batch_size: int, pad_token_id: int, *, seed: int = 0,
                 shuffle: bool = True, drop_last: bool = True, rank: int = 0,
                 world_size: int = 1):
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"bad rank {rank} for world_size {world_size}")
        if pad_token_id is None:
            raise ValueError("pad_token_id is None; pass the tokenizer's pad (or eos) id")
        self.dataset = dataset
        self.micro_batch_size = micro_batch_size
        self.pad_token_id = int(pad_token_id)
        self.seed, self.shuffle, self.drop_last = seed, shuffle, drop_last
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self.position = 0
        self._order_epoch: int | None = None
        self._order: list[int] = []
        self._n = len(dataset)
        if self.batches_per_epoch() == 0:
            g = micro_batch_size * world_size
            if drop_last:
                need = (f"one global batch of {g} (micro_batch_size {micro_batch_size} x "
                        f"{world_size} ranks)")
            else:
                need = f"one example on each of {world_size} ranks"
            raise DataError(f"the dataset has {self._n} examples, too few for {need}")

    # -- layout ---------------------------------------------------------------------------

    def batches_per_epoch(self) -> int:
        """Micro-batches this rank gets per epoch."""
        g = self.micro_batch_size * self.world_size
        full, rest = divmod(self._n, g)
        if self.drop_last or rest == 0:
            return full
        lo, hi = self._tail_bounds(rest)
        return full + (1 if hi > lo else 0)

    def __len__(self) -> int:
        return self.batches_per_epoch()

    def _tail_bounds(self, rest: int) -> tuple[int, int]:
        k, w = self.rank, self.world_size
        return k * rest // w, (k + 1) * rest // w

    def _indices(self, epoch: int, position: int) -> list[int]:
        if self._order_epoch != epoch:
            if self.shuffle:
                gen = torch.Generator().manual_seed(self.seed + epoch)
                self._order = torch.randperm(self._n, generator=gen).tolist()
            else:
                self._order = list(range(self._n))
            self._order_epoch = epoch
        b, g = self.micro_batch_size, self.micro_batch_size * self.world_size
        base = position * g
        if base + g <= self._n:
            lo, hi = self.rank * b, (self.rank + 1) * b
        else:
            lo, hi = self._tail_bounds(self._n - base)
        return self._order[base + lo : base + hi]

    # -- iteration -----------------------------------------------------------------------

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        epoch = self.epoch
        while self.epoch == epoch:
            yield self.next_batch()

    def next_batch(self) -> dict[str, torch.Tensor]:
        batch = self.collate(self._indices(self.epoch, self.position))
        self.position += 1
        if self.position == self.batches_per_epoch():
            self.epoch, self.position = self.epoch + 1, 0
        return batch

    def collate(self, indices: list[int]) -> dict[str, torch.Tensor]:
        if isinstance(self.dataset, datasets.Dataset):
            rows = self.dataset[indices]
            ids, labels = rows["input_ids"], rows.get("labels") or rows["input_ids"]
        else:
            items = [self.dataset[i] for i in indices]
            ids = [it["input_ids"] for it in items]
            labels = [it.get("labels", it["input_ids"]) for it in items]
        width = max(len(x) for x in ids)
        input_ids = torch.full((len(ids), width), self.pad_token_id, dtype=torch.long)
        attention = torch.zeros((len(ids), width), dtype=torch.long)
        label_t = torch.full((len(ids), width), IGNORE_INDEX, dtype=torch.long)
        for i, (x, y) in enumerate(zip(ids, labels)):
            input_ids[i, : len(x)] = torch.as_tensor(x, dtype=torch.long)
            attention[i, : len(x)] = 1
            label_t[i, : len(y)] = torch.as_tensor(y, dtype=torch.long)
        return {"input_ids": input_ids, "attention_mask": attention, "labels": label_t}

    # -- checkpointing -------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        if self.position >= self.batches_per_epoch():
            self.epoch, self.position = self.epoch + 1, 0
