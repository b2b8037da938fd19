"""A checkpoint's manifest: every file it holds, with its size and an xxh3-64 checksum.

The manifest goes into the COMPLETE marker, which is written last, before the directory is
renamed into place: a checkpoint that has a marker has a manifest of exactly what was written.
Before a checkpoint is loaded (resume, export) its files are checked against it: the sizes
first (one stat per file: a truncated or half-copied checkpoint fails here at no cost), then,
if the sizes agree, the checksums (one read of every file: bit rot, a file overwritten in
place). xxh3-64 hashes at memory speed, so the read from disk is the whole cost.

With several processes each rank hashes the files it wrote itself (still in its page cache)
and checks a share of the files on load; the findings meet in one all-gather.
"""

from __future__ import annotations

import re
from pathlib import Path

import xxhash

CHUNK_BYTES = 8 << 20
_RANK_FILE = re.compile(r"^(?:__(\d+)_\d+\.distcp|rng-rank(\d+)\.safetensors)$")


def file_checksum(path: Path) -> str:
    """The xxh3-64 digest of a file's bytes, as 16 hex digits."""
    digest = xxhash.xxh3_64()
    with open(path, "rb") as f:
        while block := f.read(CHUNK_BYTES):
            digest.update(block)
    return digest.hexdigest()


def writer_rank(name: str) -> int:
    """The rank that wrote a checkpoint file: DCP's `__R_N.distcp` and `rng-rankR` are rank
    R's; everything else (DCP's .metadata, app_state.json) is rank 0's."""
    match = _RANK_FILE.match(name)
    return int(match.group(1) or match.group(2)) if match else 0


def describe(directory: Path, names: list[str]) -> dict[str, dict]:
    """{name: {"size", "xxh3_64"}} of the given files of `directory`."""
    return {
        name: {"size": (directory / name).stat().st_size, "xxh3_64": file_checksum(directory / name)} for name in names
    }


def problems(
    directory: Path, manifest: dict[str, dict], names: list[str] | None = None, *, checksums: bool = True
) -> list[str]:
    """What is wrong with `names` (default: every file the manifest lists) of `directory`:
    missing, of another size, or (once every size agrees, and with `checksums`) of another
    checksum. Empty when they verify."""
    names = sorted(manifest) if names is None else names
    found = []
    for name in names:
        path = directory / name
        if not path.is_file():
            found.append(f"{name} is missing")
        elif path.stat().st_size != manifest[name]["size"]:
            found.append(
                f"{name} is {path.stat().st_size:,} bytes, the manifest says {manifest[name]['size']:,} "
                "(truncated or overwritten)"
            )
    if found or not checksums:
        return found
    return [
        f"{name} does not match its checksum (its content changed after the save)"
        for name in names
        if file_checksum(directory / name) != manifest[name]["xxh3_64"]
    ]
