"""Packing: whole examples side by side in rows of at most `data.max_length` tokens.

Examples are placed in file order, next-fit: an example goes into the current row if it
fits, else it starts a new row (rows are padded to the longest of their micro-batch). An
example longer than `max_length` is cut into pieces of at most that length, each placed
like an example of its own (a warning counts them). Every row carries `position_ids` that
restart at 0 at each example (or piece), and the model gets no attention mask: transformers
then keeps every example to itself (a block-diagonal causal mask for sdpa and eager,
variable-length kernels for flash_attention_2), so no example sees another, and each
example's first token is no target, exactly as unpacked. Rows with no labelled token are
dropped. Output columns: `input_ids`, `labels`, `position_ids`.
"""

from __future__ import annotations

import logging
from typing import Any

import datasets
import numpy as np

from scalora_dist.data.formats import FEATURES, IGNORE_INDEX, DataError, hash_parts

logger = logging.getLogger("scalora_dist.data")

MAP_BATCH = 1000
PACKED_FEATURES = datasets.Features({**FEATURES, "position_ids": datasets.List(datasets.Value("int32"))})


def pack(ds: datasets.Dataset, length: int, files: list[str]) -> datasets.Dataset:
    """Pack whole examples into rows of at most `length` tokens, each example keeping its
    own attention and positions (see the module docstring). One pass over `ds`."""
    import pyarrow.compute as pc

    lengths = pc.list_value_length(ds.with_format("arrow")["input_ids"]).to_numpy().astype(np.int64)
    plan = _plan_rows(lengths, length)
    split = int((lengths > length).sum())
    if split:
        logger.warning(
            "%s: %d of %d examples are longer than data.max_length=%d and were split into "
            "pieces of at most that length (a piece does not see the one before it)",
            ", ".join(files),
            split,
            len(lengths),
            length,
        )
    rows = datasets.Dataset.from_dict({"row": np.arange(plan["n_rows"], dtype=np.int64)})
    packed = rows.map(
        _pack_rows,
        batched=True,
        batch_size=MAP_BATCH,
        remove_columns=["row"],
        fn_kwargs={"source": ds, "plan": plan},
        features=PACKED_FEATURES,
        new_fingerprint=hash_parts(ds._fingerprint, "pack-documents", length),
        desc="Packing",
    )
    if len(packed) == 0:
        raise DataError(f"{', '.join(files)}: packing left no sequence with a labelled token")
    return packed


def _plan_rows(lengths: np.ndarray, length: int) -> dict[str, Any]:
    """Next-fit, in file order: each example (cut into pieces of at most `length` tokens when
    longer) goes into the current row if it fits, else starts a new row. One entry per
    piece: its example, token range and row."""
    doc, start, stop, row = [], [], [], []
    current, used = 0, 0
    for d, n in enumerate(lengths.tolist()):
        for s in range(0, n, length):
            e = min(s + length, n)
            if used + (e - s) > length:
                current, used = current + 1, 0
            doc.append(d), start.append(s), stop.append(e), row.append(current)
            used += e - s
    return {
        "doc": np.asarray(doc, dtype=np.int64),
        "start": np.asarray(start, dtype=np.int64),
        "stop": np.asarray(stop, dtype=np.int64),
        "row": np.asarray(row, dtype=np.int64),
        "n_rows": current + 1 if doc else 0,
    }


def _pack_rows(batch, *, source, plan):
    rows = batch["row"]
    first = int(np.searchsorted(plan["row"], rows[0], side="left"))
    last = int(np.searchsorted(plan["row"], rows[-1], side="right"))
    d0, d1 = int(plan["doc"][first]), int(plan["doc"][last - 1])
    examples = source[d0 : d1 + 1]
    out = {"input_ids": [], "labels": [], "position_ids": []}
    ids, labels, positions, row = [], [], [], rows[0]
    for i in range(first, last):
        if plan["row"][i] != row:
            _emit(out, ids, labels, positions)
            ids, labels, positions, row = [], [], [], plan["row"][i]
        d, s, e = int(plan["doc"][i]) - d0, int(plan["start"][i]), int(plan["stop"][i])
        piece_labels = examples["labels"][d][s:e]
        # nothing before a piece's first token in its row belongs to it, so it is no target
        # (exactly as the first token of an unpacked sequence)
        piece_labels[0] = IGNORE_INDEX
        ids += examples["input_ids"][d][s:e]
        labels += piece_labels
        positions += range(e - s)
    _emit(out, ids, labels, positions)
    return out


def _emit(out: dict, ids: list, labels: list, positions: list) -> None:
    if any(x != IGNORE_INDEX for x in labels):
        out["input_ids"].append(ids)
        out["labels"].append(labels)
        out["position_ids"].append(positions)
