"""Training data: sources -> records -> tokenised (and optionally packed) examples -> micro-batches.

* `sources.py`: local files, local dataset folders and hub datasets, read with
  `datasets.load_dataset`, and how each names a record in an error.
* `formats.py`: text / instruction / alpaca / chat / sharegpt records -> input_ids + labels.
* `packing.py`: whole examples side by side, each attending only to itself.
* `loader.py`: padded micro-batches for one data-parallel rank (the ordering rule).

`load_split(cfg, tokenizer, entries)` returns a `datasets.Dataset` with `input_ids` and
`labels` (plus `position_ids` when packed). Without packing, examples are truncated to
`max_length` tokens; an example left with no labelled token (a prompt longer than
`max_length`, say) is dropped and counted. Results are cached by `datasets` under its usual
cache directory, keyed on the source, the data config, the tokenizer and this package's
source.

A user data problem raises `DataError` whose message names the file (or dataset) and the
1-based line, record or row, e.g. `data/train.jsonl:17: missing field 'text'`.
"""

from __future__ import annotations

import logging

import datasets

from scalora_dist.config import DataConfig, DataSource
from scalora_dist.data import packing, sources
from scalora_dist.data.formats import (
    IGNORE_INDEX,
    TOKENISED_FEATURES,
    DataError,
    RecordError,
    TokenizerInfo,
    fields,
    hash_parts,
    tokenize_batch,
)
from scalora_dist.data.loader import BatchLoader, count_tokens, model_inputs

__all__ = [
    "IGNORE_INDEX",
    "BatchLoader",
    "DataError",
    "count_tokens",
    "load_split",
    "model_inputs",
    "truncated_examples",
]

logger = logging.getLogger("scalora_dist.data")


def load_split(cfg: DataConfig, tokenizer, entries: list[str | DataSource]) -> datasets.Dataset:
    """Load, validate and tokenise one split (its sources in order, concatenated).
    Raises DataError for any problem with the sources or their records."""
    entries = [str(e) if not isinstance(e, (str, DataSource)) else e for e in entries]
    if not entries:
        raise DataError("no data files given")
    tok = TokenizerInfo.of(tokenizer, cfg)
    parts = [_tokenised(source, cfg, tok) for source in sources.resolve(entries)]
    out = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    if cfg.packing:
        out = packing.pack(out, cfg.max_length, [s.path if isinstance(s, DataSource) else s for s in entries])
    return out


def _tokenised(source: sources.Source, cfg: DataConfig, tok: TokenizerInfo) -> datasets.Dataset:
    raw, where = sources.load(source, cfg)
    cols = fields(cfg, plain_text=source.plain_text)
    # packing does not truncate: a long example is cut into pieces there
    truncate_to = None if cfg.packing else cfg.max_length
    try:
        out = raw.map(
            tokenize_batch,
            batched=True,
            batch_size=packing.MAP_BATCH,
            with_indices=True,
            remove_columns=raw.column_names,
            fn_kwargs={"cfg_format": cfg.format, "cols": cols, "max_length": truncate_to, "tok": tok},
            features=TOKENISED_FEATURES,
            new_fingerprint=hash_parts(raw._fingerprint, cfg.format, cols, truncate_to, tok.fingerprint),
            desc=f"Tokenising ({cfg.format})",
        )
    except RecordError as e:
        raise DataError(f"{where(e.index)}: {e.message}") from None
    dropped = len(raw) - len(out)
    if len(out) == 0:
        raise DataError(
            f"{source.label}: all {len(raw)} records were dropped: none has a token to "
            f"train on within data.max_length={cfg.max_length} (empty texts, or prompts "
            f"longer than max_length?)"
        )
    if dropped:
        logger.warning(
            "%s: dropped %d of %d records with nothing to train on (empty text, or no "
            "labelled token within max_length=%d)",
            source.label,
            dropped,
            len(raw),
            cfg.max_length,
        )
    truncated = truncated_examples(out, truncate_to)
    if truncated:
        logger.warning(
            "%s: %d of %d examples are longer than data.max_length=%d and were truncated to it (the rest of "
            "each is not trained on; data.packing=true cuts them into pieces instead)",
            source.label,
            truncated,
            len(out),
            cfg.max_length,
        )
    return out


def truncated_examples(split: datasets.Dataset, max_length: int | None) -> int:
    """How many examples of a tokenised, unpacked split were cut to `max_length` tokens (0
    for packed rows: packing cuts long examples into pieces instead, and says so)."""
    if max_length is None or "length" not in split.column_names:
        return 0
    import pyarrow.compute as pc

    return int(pc.sum(pc.greater(split.with_format("arrow")["length"], max_length)).as_py() or 0)
