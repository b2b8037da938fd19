"""Synthetic corpus and fine-tuning task of the study (tools/studies/study.py).

Symbols are pronounceable 4-letter words ("bako", "dupe", ...), each one BPE token once the
study's tokenizer is trained on the corpus. A *relation* is a random permutation P of the
symbols, named by a marker word at the start of each line. A line is a noisy walk along P:

    f bako dupe rila ... (each next symbol is P(previous) with probability `follow`,
                          otherwise a uniformly random symbol: a "jump")

so, after the marker, every token is predictable from the previous one up to the jumps'
entropy. Held-out lines are fresh walks of the same relation (new starts and jumps), not
unseen facts: the held-out loss measures how much of P the model has absorbed.

* pre-training corpus: relations `f` and `g` (two random permutations), mixed;
* fine-tuning task: relation `h`, a third, independent random permutation. The ideal update
  re-routes every symbol to a new successor: a bijection on N symbols, whose change from
  the base's maps has rank about N (capped by the hidden size), not r.

Same arguments -> identical files (seeded with numpy's default_rng).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

CONSONANTS = "bdfgklmnprstvz"
VOWELS = "aeiou"
PRETRAIN_RELATIONS = ("f", "g")
FINETUNE_RELATION = "h"


def symbols(n: int, seed: int = 0) -> list[str]:
    """n distinct CVCV words, in a seeded random order."""
    rng = np.random.default_rng(seed)
    words = set()
    while len(words) < n:
        c = rng.choice(list(CONSONANTS), 2)
        v = rng.choice(list(VOWELS), 2)
        words.add(c[0] + v[0] + c[1] + v[1])
    ordered = sorted(words)  # sets iterate in hash order: sort before shuffling
    return [ordered[i] for i in rng.permutation(len(ordered))]


def relations(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    """One random permutation of range(n) per relation name (pre-training and fine-tuning)."""
    rng = np.random.default_rng(seed + 1)
    return {name: rng.permutation(n) for name in (*PRETRAIN_RELATIONS, FINETUNE_RELATION)}


def walk(rng: np.random.Generator, perm: np.ndarray, length: int, follow: float) -> list[int]:
    out = [int(rng.integers(len(perm)))]
    for _ in range(length - 1):
        out.append(int(perm[out[-1]]) if rng.random() < follow else int(rng.integers(len(perm))))
    return out


def lines(
    relation: str, count: int, *, n_symbols: int, length: int, follow: float, seed: int, stream: int
) -> list[str]:
    """`count` walk lines of one relation; `stream` separates train / eval draws."""
    words = symbols(n_symbols, seed)
    perm = relations(n_symbols, seed)[relation]
    rng = np.random.default_rng([seed, stream, ord(relation)])
    return [relation + " " + " ".join(words[i] for i in walk(rng, perm, length, follow)) for _ in range(count)]


def write_jsonl(path: Path, texts: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for t in texts:
            f.write(json.dumps({"text": t}) + "\n")
    return path


def write_study_data(
    out_dir: Path,
    *,
    n_symbols: int = 64,
    length: int = 48,
    follow: float = 0.9,
    pretrain_lines: int = 8000,
    finetune_lines: int = 2000,
    eval_lines: int = 256,
    seed: int = 0,
) -> dict[str, Path]:
    """Write pretrain_{train,eval}.jsonl and finetune_{train,eval}.jsonl; return their paths."""
    out_dir = Path(out_dir)
    kw = dict(n_symbols=n_symbols, length=length, follow=follow, seed=seed)
    pre_train, pre_eval = [], []
    for rel in PRETRAIN_RELATIONS:
        pre_train += lines(rel, pretrain_lines // len(PRETRAIN_RELATIONS), stream=0, **kw)
        pre_eval += lines(rel, eval_lines // len(PRETRAIN_RELATIONS), stream=1, **kw)
    rng = np.random.default_rng(seed + 2)
    pre_train = [pre_train[i] for i in rng.permutation(len(pre_train))]
    return {
        "pretrain_train": write_jsonl(out_dir / "pretrain_train.jsonl", pre_train),
        "pretrain_eval": write_jsonl(out_dir / "pretrain_eval.jsonl", pre_eval),
        "finetune_train": write_jsonl(
            out_dir / "finetune_train.jsonl", lines(FINETUNE_RELATION, finetune_lines, stream=0, **kw)
        ),
        "finetune_eval": write_jsonl(
            out_dir / "finetune_eval.jsonl", lines(FINETUNE_RELATION, eval_lines, stream=1, **kw)
        ),
    }


def entropy_floor(n_symbols: int, follow: float) -> float:
    """Best achievable mean loss (nats) on a walk token given the previous one."""
    p_hit = follow + (1 - follow) / n_symbols
    p_other = (1 - follow) / n_symbols
    return float(-(p_hit * np.log(p_hit) + (n_symbols - 1) * p_other * np.log(p_other)))
