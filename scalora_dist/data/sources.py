"""Where records come from: local files, local dataset folders, hub datasets.

An entry of `data.train_files` / `data.eval_files` is a string or a mapping
`{path, split, name, revision}` (config.DataSource). Its `path` is, tried in this order:

* a local file: `.jsonl` / `.json` -> datasets' "json" builder (JSON Lines, or one JSON
  array of records), `.parquet` -> "parquet", `.txt` -> "text" (one record per line, field
  `text`; blank lines are skipped). Consecutive files of the same type are read together.
* a local folder laid out as the hub stores a dataset (data files plus a README whose YAML
  may declare configs and splits): read by `datasets.load_dataset(folder, name, split)`.
* a hub dataset id (`org/name`): fetched by huggingface_hub into its cache (HF_HOME,
  HF_TOKEN; from the cache when HF_HUB_OFFLINE=1), then read as a local folder.

Every loaded source knows how to name a record in an error: `FILE:LINE` (JSON Lines,
text), `FILE: record N` (JSON array), `FILE: row N` (Parquet), `ID[split]: row N`.
Malformed JSON is only looked for (by re-reading the file line by line) when
`load_dataset` fails, so the normal path reads each file once.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import datasets

from scalora_dist.config import DataConfig, DataSource
from scalora_dist.data.formats import DataError, check_record, fields

BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".txt": "text"}


@dataclass
class Source:
    """One thing load_dataset reads: a group of local files of one type, or a dataset."""

    label: str
    """How errors name it: the files, or `ID[split]`."""
    files: list[str] | None = None
    builder: str | None = None
    dataset_dir: Path | None = None
    spec: DataSource | None = None

    @property
    def plain_text(self) -> bool:
        return self.builder == "text"


def as_source(entry: str | DataSource) -> DataSource:
    return DataSource(path=entry) if isinstance(entry, str) else entry


def resolve(entries: list[str | DataSource]) -> list[Source]:
    """Group and resolve the entries of one split (no records read yet)."""
    sources: list[Source] = []
    for spec in map(as_source, entries):
        path = Path(spec.path).expanduser()
        if path.is_file():
            builder = _builder_of(spec.path)
            last = sources[-1] if sources else None
            if last is not None and last.builder == builder and last.spec.split == spec.split:
                last.files.append(spec.path)
                last.label = ", ".join(last.files)
            else:
                sources.append(Source(spec.path, files=[spec.path], builder=builder, spec=spec))
        elif path.is_dir():
            sources.append(Source(_dataset_label(spec), dataset_dir=path, spec=spec))
        else:
            sources.append(Source(_dataset_label(spec), dataset_dir=_hub_dataset(spec, path), spec=spec))
    return sources


def _dataset_label(spec: DataSource) -> str:
    return f"{spec.path}[{spec.split}" + (f", {spec.name}" if spec.name else "") + "]"


def _builder_of(path: str) -> str:
    ext = Path(path).suffix.lower()
    if ext not in BUILDERS:
        raise DataError(f"{path}: unsupported file type '{ext or '(none)'}'; use .jsonl, .json, .parquet or .txt")
    return BUILDERS[ext]


def _hub_dataset(spec: DataSource, local: Path) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(spec.path)
    except HFValidationError:
        raise DataError(f"{spec.path}: file not found (looked for {local.resolve()})") from None
    if spec.path.startswith((".", "/", "~")) or Path(spec.path).suffix.lower() in BUILDERS:
        raise DataError(f"{spec.path}: file not found (looked for {local.resolve()})")
    download = f"hf download --repo-type dataset {spec.path}" + (
        f" --revision {spec.revision}" if spec.revision else ""
    )
    try:
        return Path(snapshot_download(spec.path, repo_type="dataset", revision=spec.revision or None))
    except LocalEntryNotFoundError:
        from scalora_dist.model.hub import unreachable_hub_reason

        reason = unreachable_hub_reason()
        raise DataError(
            f"{spec.path}: not a local file or folder (looked for {local.resolve()}) and not a "
            f"dataset in the Hugging Face cache, and {reason}; download it on a connected "
            f"machine with `{download}` (with the same HF_HOME)"
        ) from None
    except GatedRepoError:
        raise DataError(f"{spec.path}: a gated dataset: accept its terms on the hub and set HF_TOKEN") from None
    except RepositoryNotFoundError:
        raise DataError(
            f"{spec.path}: not a local file or folder (looked for {local.resolve()}) nor a dataset "
            "on the hub you can access"
        ) from None


# ---------------------------------------------------------------------------------------
# Reading


def load(source: Source, cfg: DataConfig) -> tuple[datasets.Dataset, Callable[[int], str]]:
    """The raw records of a source and a function naming record i of it in errors."""
    if source.files is not None:
        return _load_files(source, cfg)
    try:
        raw = datasets.load_dataset(
            str(source.dataset_dir),
            name=source.spec.name or None,
            split=source.spec.split,
        )
    except ValueError as e:
        raise DataError(f"{source.label}: {e}") from None
    except Exception as e:  # noqa: BLE001 - every failure becomes a DataError naming the dataset
        raise DataError(f"{source.label}: could not be loaded ({type(e).__name__}: {e})") from None
    if len(raw) == 0:
        raise DataError(f"{source.label}: no records")
    return raw, lambda index: f"{source.label}: row {index + 1}"


def _load_files(source: Source, cfg: DataConfig) -> tuple[datasets.Dataset, Callable[[int], str]]:
    files, builder = source.files, source.builder
    if builder == "text" and cfg.format != "text":
        raise DataError(
            f"{files[0]}: plain-text files only support data.format 'text' "
            f"(format '{cfg.format}' needs JSON Lines, JSON or Parquet records)"
        )
    for f in files:
        if _file_is_empty(f, builder):
            raise DataError(f"{f}: no records")
    try:
        raw = datasets.load_dataset(builder, data_files=files, split=source.spec.split)
    except Exception as e:  # noqa: BLE001 - every failure becomes a DataError naming files
        raise _diagnose_load_failure(cfg, files, builder, e) from None
    if len(raw) == 0:
        raise DataError(f"{', '.join(files)}: no records")
    return raw, _Locator(files, builder).where


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


def _diagnose_load_failure(cfg: DataConfig, files: list[str], builder: str, error: Exception) -> DataError:
    cause = error.__cause__ or error.__context__ or error
    if builder == "json":
        cols = fields(cfg)
        for f in files:
            problem = _scan_json_file(f, cfg.format, cols)
            if problem:
                return DataError(problem)
    detail = f"{type(cause).__name__}: {cause}" if str(cause) else type(cause).__name__
    return DataError(f"{', '.join(files)}: could not be loaded ({detail})")


def _scan_json_file(path: str, fmt: str, cols: dict[str, str]) -> str | None:
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
            problem = check_record(rec, fmt, cols)
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
        problem = check_record(rec, fmt, cols)
        if problem:
            return f"{path}:{lineno}: {problem}"
    return None


class _Locator:
    """Maps a record index to 'FILE:LINE' / 'FILE: record N' / 'FILE: row N'.

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
