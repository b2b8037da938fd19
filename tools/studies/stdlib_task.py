"""A real instruction task from text already on every machine: Python standard-library
docstring -> function. Each example is a chat: the user asks for a function by its signature
and the first paragraph of its docstring; the assistant answers with the function's source
(docstring removed). The loss is on the answer only (data.format=chat).

    python tools/studies/stdlib_task.py OUT_DIR [--max-chars 600] [--eval-fraction 0.1]

writes OUT_DIR/train.jsonl and OUT_DIR/eval.jsonl (split by module, so no module is in
both), deterministic for one Python version.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import sys
import sysconfig
import textwrap
from pathlib import Path


def stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "idlelib", "lib2to3", "site-packages", "turtledemo", "ensurepip", "tkinter"}
    return sorted(p for p in root.rglob("*.py") if not skip & set(p.relative_to(root).parts))


def examples_of(path: Path, max_chars: int) -> list[dict]:
    try:
        source = path.read_text(encoding="utf-8")
        tree = ast.parse(source)
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return []
    out = []
    for node in tree.body:
        if not isinstance(node, ast.FunctionDef) or node.name.startswith("_"):
            continue
        doc = ast.get_docstring(node)
        if not doc or len(node.body) < 2:
            continue
        summary = doc.strip().split("\n\n")[0].replace("\n", " ").strip()
        if len(summary) < 20:
            continue
        body = node.body[1:]  # without the docstring
        signature = f"def {node.name}({ast.unparse(node.args)}):"
        code = signature + "\n" + textwrap.indent("\n".join(ast.unparse(s) for s in body), "    ")
        if len(code) > max_chars:
            continue
        out.append(
            {
                "messages": [
                    {"role": "user", "content": f"Write the Python function `{signature[4:-1]}`. {summary}"},
                    {"role": "assistant", "content": code},
                ],
                "module": path.stem,
            }
        )
    return out


def build(max_chars: int = 600, eval_fraction: float = 0.1) -> tuple[list[dict], list[dict]]:
    train, held_out = [], []
    for path in stdlib_files():
        examples = examples_of(path, max_chars)
        bucket = int(hashlib.sha1(str(path.name).encode()).hexdigest(), 16) % 1000
        (held_out if bucket < eval_fraction * 1000 else train).extend(examples)
    return train, held_out


def write(out_dir: Path, max_chars: int = 600, eval_fraction: float = 0.1) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    train, held_out = build(max_chars, eval_fraction)
    paths = []
    for name, rows in (("train", train), ("eval", held_out)):
        path = out_dir / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        paths.append(path)
    return paths[0], paths[1]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--max-chars", type=int, default=600)
    ap.add_argument("--eval-fraction", type=float, default=0.1)
    args = ap.parse_args(argv)
    train, held_out = write(args.out_dir, args.max_chars, args.eval_fraction)
    for p in (train, held_out):
        print(f"{p}: {sum(1 for _ in p.open())} examples")


if __name__ == "__main__":
    sys.exit(main())
