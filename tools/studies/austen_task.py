"""A real domain-adaptation text task: Jane Austen's prose. Train on paragraphs of five of
her six novels, hold out the sixth (Persuasion) whole, so the held-out loss measures the
style and vocabulary learned, not memorised passages (data.format=text: loss on every token).

    python tools/studies/austen_task.py OUT_DIR [--min-words 30] [--max-words 160]

The novels come from Debian's r-cran-janeaustenr package (Project Gutenberg's texts, stored
as R data): the tool fetches it with `apt-get download` into ~/.cache/scalora-dist (or takes
`--deb FILE` / a folder it was unpacked into) and reads it with the `rdata` package (pip
install rdata). Writes OUT_DIR/train.jsonl and OUT_DIR/eval.jsonl, {"text": paragraph} per
line, deterministic.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import re
import subprocess
import sys
import tempfile
import warnings
import zlib
from pathlib import Path

TOOLS = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(TOOLS / d) for d in ("generators", "benchmarks", "studies")]  # sibling tools

from real_models import cache_root  # noqa: E402

PACKAGE = "r-cran-janeaustenr"
DATA = Path("usr/lib/R/site-library/janeaustenr/data")
HELD_OUT = "persuasion"


def unpacked(deb: Path | None = None) -> Path:
    """The folder holding the package's R data: `deb` itself when it is a folder, else the
    cache, filled from `deb` or from a fresh `apt-get download` (Debian's archive; no root
    needed), unpacked atomically."""
    if deb is not None and not deb.exists():
        raise SystemExit(f"--deb {deb}: no such file or folder")
    if deb is not None and deb.is_dir():
        return deb
    out = cache_root() / "janeaustenr"
    if (out / DATA / "Rdata.rdb").is_file():
        return out
    with tempfile.TemporaryDirectory() as tmp:
        if deb is None:
            got = subprocess.run(["apt-get", "download", PACKAGE], cwd=tmp, capture_output=True, text=True)
            debs = list(Path(tmp).glob(f"{PACKAGE}_*.deb"))
            if got.returncode != 0 or not debs:
                raise SystemExit(
                    f"could not fetch {PACKAGE} with apt-get download (run apt-get update first?): "
                    f"{got.stderr.strip()[-300:]}; or pass --deb FILE"
                )
            deb = debs[0]
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp_out = out.with_name(out.name + f".tmp-{os.getpid()}")
        subprocess.run(["dpkg", "-x", str(deb), str(tmp_out)], check=True)
        os.replace(tmp_out, out)
    return out


def novels(root: Path) -> dict[str, list[str]]:
    """Each novel's lines, as the R package stores them (a character vector per novel in a
    lazy-load database: the .rdx index gives each one's offset and length in the .rdb, where
    it is a 4-byte length and zlib data)."""
    import rdata

    data = root / DATA
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # rdata: "Unknown file type: assumed RDS", which it is
        index = rdata.conversion.convert(rdata.parser.parse_data(gzip.open(data / "Rdata.rdx").read()))
        blob = (data / "Rdata.rdb").read_bytes()
        out = {}
        for name, (offset, length) in index["variables"].items():
            record = blob[offset : offset + length]
            lines = rdata.conversion.convert(rdata.parser.parse_data(zlib.decompress(record[4:])))
            out[str(name)] = [str(line) for line in lines]
    return out


HEADING = re.compile(r"^(CHAPTER|Chapter|VOLUME|Volume)\b|^[IVXLC]+\.?$")


def paragraphs(lines: list[str], min_words: int, max_words: int) -> list[str]:
    """Blank-line separated paragraphs, wrapped lines joined; headings and short ones
    (titles, "THE END") dropped, long ones cut at a sentence end near `max_words`."""
    out, current = [], []
    for line in [*lines, ""]:
        if line.strip():
            current.append(line.strip())
            continue
        text = " ".join(current)
        current = []
        words = text.split()
        if len(words) < min_words or HEADING.match(text):
            continue
        while len(words) > max_words:
            cut = next(
                (i + 1 for i in range(max_words - 1, min_words, -1) if words[i].endswith((".", "!", "?", '."'))),
                max_words,
            )
            out.append(" ".join(words[:cut]))
            words = words[cut:]
        if len(words) >= min_words:
            out.append(" ".join(words))
    return out


def write(out_dir: Path, deb: Path | None = None, min_words: int = 30, max_words: int = 160) -> tuple[Path, Path]:
    books = novels(unpacked(deb))
    out_dir.mkdir(parents=True, exist_ok=True)
    train, held_out = [], []
    for name in sorted(books):
        (held_out if name == HELD_OUT else train).extend(paragraphs(books[name], min_words, max_words))
    paths = out_dir / "train.jsonl", out_dir / "eval.jsonl"
    for path, rows in zip(paths, (train, held_out)):
        path.write_text("".join(json.dumps({"text": t}) + "\n" for t in rows))
    return paths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--deb", type=Path, help=f"the {PACKAGE} .deb, or a folder it was unpacked into")
    ap.add_argument("--min-words", type=int, default=30)
    ap.add_argument("--max-words", type=int, default=160)
    args = ap.parse_args()
    train, held_out = write(args.out_dir, args.deb, args.min_words, args.max_words)
    for path in (train, held_out):
        print(f"{path}: {sum(1 for _ in path.open())} paragraphs")


if __name__ == "__main__":
    main()
