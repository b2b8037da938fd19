"""Small helpers shared by the tests (import with `from helpers import ...`; tests/ is on
sys.path under pytest's default rootdir-based import mode)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def write_jsonl(path: str | Path, records: list[Any]) -> Path:
    """One JSON value per line. A record that is a str is written verbatim (for malformed
    lines and blank lines)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for rec in records:
            f.write((rec if isinstance(rec, str) else json.dumps(rec)) + "\n")
    return path


def write_json(path: str | Path, records: list[Any], indent: int | None = 1) -> Path:
    """A JSON array of records."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records, indent=indent), encoding="utf-8")
    return path


def write_parquet(path: str | Path, records: list[dict]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(records), path)
    return path


def write_text(path: str | Path, lines: list[str]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path
