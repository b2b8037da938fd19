"""Print the config reference (every key, its default and meaning) as a Markdown table.

python tools/generators/config_reference.py            # the table in docs/config.md comes from here
python tools/generators/config_reference.py --write    # replace the table in docs/config.md
"""

import sys
from pathlib import Path

from scalora_dist.config import Config, iter_keys

DOC = Path(__file__).resolve().parents[2] / "docs" / "config.md"


def markdown() -> str:
    rows = ["| key | default | meaning |", "|---|---|---|"]
    for key, default, doc in iter_keys(Config):
        rows.append(f"| `{key}` | `{default!r}` | {doc.replace('|', '/')} |")
    return "\n".join(rows)


def write(doc: Path = DOC) -> None:
    """Replace the first Markdown table of `doc` that starts with the reference's header."""
    lines = doc.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| key | default | meaning |"))
    end = start
    while end < len(lines) and lines[end].startswith("|"):
        end += 1
    lines[start:end] = markdown().splitlines()
    doc.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    if "--write" in sys.argv[1:]:
        write()
    else:
        print(markdown())
