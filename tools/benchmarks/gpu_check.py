"""What only a GPU can show, in one command: bf16 exactness under FSDP2, bitsandbytes' 4-bit
kernels, attention implementations, throughput / MFU on an 8B shape, peak memory of the 12B
4-bit recipe's shape against the memory plan.

    python tools/benchmarks/gpu_check.py --out gpu-check              # on a CUDA machine (< 8 minutes on an H200)
    python tools/benchmarks/gpu_check.py --device cpu --tiny --out /tmp/gpu-check   # the same code paths on CPU (CI)

Checks, in order (each prints as it goes; the results land in OUT/gpu_check.json and .md):

1. exactness: ScaLoRA under FSDP2 (torchrun, one process) with bf16 compute and float32
   masters: every refactor keeps the effective weight W0 + s B A to float32 round-off; and
   the bf16 run's update is the float32 CPU run's within bf16 tolerance.
2. bitsandbytes: NF4 and FP4 layers: output = x @ deq(W)^T + adapter; gradients reach the
   adapters; FSDP2-wrapped under the training policy, the model's logits are unchanged.
3. attention: eager, sdpa and flash_attention_2 (when flash-attn imports) on packed rows:
   logits and gradients agree.
4. throughput: an 8B-shaped Llama (Llama-3-8B's widths and vocabulary, random weights,
   --llama-layers blocks): tokens/s and MFU of LoRA, ScaLoRA I=1, ScaLoRA-I I=10 and full
   fine-tuning on the same batches, steps interleaved (tools/benchmarks/bench_step.py's code).
5. memory: Gemma-3-12B's widths and vocabulary, 4-bit, ScaLoRA r 16 as the single-GPU recipe,
   1 and 2 blocks: peak CUDA memory against tools/generators/memory_plan.py for the same blocks, and
   both extrapolated to 48 blocks.
6. loss_kernels: Gemma-3's loss head (hidden 640, vocabulary 262,144, 2048 bf16 tokens):
   transformers' plain loss, our chunked kernel and Liger's fused kernel (when liger-kernel
   imports): peak CUDA memory, time, and the loss and hidden-state gradient against plain.
7. offload: the 8B-shaped Llama of check 4, LoRA r 16, gradient checkpointing, one sequence
   of --offload-seq-len tokens, model.offload_activations off and on: peak CUDA memory (the
   plan says (blocks - 2) x tokens x hidden x 2 bytes less), step time, the same losses.

The checks' sizes have knobs; before each check the script compares its estimate with the
time left (--budget-s) and skips, saying so, what would not fit.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

TOOLS = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(TOOLS / d) for d in ("generators", "benchmarks", "studies")]  # sibling tools
REPO = TOOLS.parent

U32 = 2.0**-24
ROUND_OFF_FACTOR = 16  # a refactor's change of W0 + sBA, in units of u32 (||W0|| + ||sBA||)
BF16_TOL = 3e-2
FP32_TOL = 1e-4


@dataclass
class Context:
    args: argparse.Namespace
    work: Path
    started: float = field(default_factory=time.monotonic)

    @property
    def device(self) -> str:
        return self.args.device

    @property
    def tiny(self) -> bool:
        return self.args.tiny

    def left_s(self) -> float:
        return self.args.budget_s - (time.monotonic() - self.started)


# ---------------------------------------------------------------------------------------
# Models


def tiny_llama(ctx: Context) -> Path:
    from scalora_dist.model.tiny import make_tiny_model

    path = ctx.work / "tiny-llama"
    if not path.is_dir():
        width = 64 if ctx.tiny else 256
        make_tiny_model(
            path,
            hidden_size=width,
            num_layers=2 if ctx.tiny else 4,
            num_heads=max(2, width // 64),
            num_kv_heads=max(1, width // 128),
            intermediate_size=2 * width,
        )
    return path


def shaped_model(ctx: Context, name: str, config) -> Path:
    """A random-weight checkpoint of `config` (a real model's widths and vocabulary), with the
    tiny model's tokenizer (its ids are all below any real vocabulary size)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = ctx.work / name
    if not path.is_dir():
        with torch.device(ctx.device):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        model.save_pretrained(path)
        AutoTokenizer.from_pretrained(tiny_llama(ctx)).save_pretrained(path)
        del model
    return path


def llama_8b_shape(ctx: Context, layers: int):
    from transformers import LlamaConfig

    if ctx.tiny:
        return LlamaConfig(
            hidden_size=64,
            intermediate_size=224,
            num_attention_heads=4,
            num_key_value_heads=2,
            num_hidden_layers=layers,
            vocab_size=1024,
            max_position_embeddings=4096,
        )
    return LlamaConfig(
        hidden_size=4096,
        intermediate_size=14336,
        num_attention_heads=32,
        num_key_value_heads=8,
        num_hidden_layers=layers,
        vocab_size=128256,
        max_position_embeddings=8192,
        rope_theta=500000.0,
    )


def gemma3_12b_shape(ctx: Context, layers: int):
    from transformers import Gemma3TextConfig

    if ctx.tiny:
        return Gemma3TextConfig(
            hidden_size=64,
            intermediate_size=256,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            num_hidden_layers=layers,
            vocab_size=2048,
            sliding_window=32,
            max_position_embeddings=4096,
        )
    return Gemma3TextConfig(
        hidden_size=3840,
        intermediate_size=15360,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=256,
        num_hidden_layers=layers,
        vocab_size=262144,
        sliding_window=1024,
        max_position_embeddings=8192,
    )


def data_file(ctx: Context) -> Path:
    return REPO / "configs/data/quickstart_train.jsonl"


def base_overrides(model: Path, ctx: Context, *extra: str) -> list[str]:
    return [
        f"model.path={model}",
        f"data.train_files=[{data_file(ctx)}]",
        "data.max_length=64",
        "data.packing=true",
        "adapter.rank=4",
        "adapter.alpha=8",
        "adapter.use_rslora=true",
        "adapter.scalora.warmup_steps=2",
        "train.max_steps=8",
        "train.micro_batch_size=4",
        "train.lr=1e-2",
        f"output.dir={ctx.work / 'run'}",
        *extra,
    ]


# ---------------------------------------------------------------------------------------
# 1. exactness


def _full(t):
    from torch.distributed.tensor import DTensor

    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().double().cpu()


def train_masters(overrides: list[str]) -> tuple[list[float], dict]:
    """Train with `overrides` through the recipe; per refactor, the largest change of any
    layer's effective float32 weight in units of its round-off bound; and the final
    effective weights (float64, on the CPU)."""
    from scalora_dist.config import load_config
    from scalora_dist.model.lora import lora_layers
    from scalora_dist.train import setup, train_step

    run = setup(load_config(None, overrides))
    layers = lora_layers(run.model)

    def effective(layer):
        merged = _full(layer.weight) if layer.acc_U is None else _full(layer.acc_U) @ _full(layer.acc_V).T
        adapter = layer.scale * _full(layer.lora_B) @ _full(layer.lora_A)
        return merged, adapter

    ratios = []
    for step in range(run.cfg.train.max_steps):
        if run.scalora.is_due(step):
            before = {n: effective(l) for n, l in layers.items()}
            original = run.scalora.refactor

            def observed(step_=None, _orig=original):  # measure around the refactor inside the real step
                report = _orig(step_)
                worst = 0.0
                for name, layer in layers.items():
                    merged, adapter = effective(layer)
                    change = ((merged + adapter) - sum(before[name])).norm().item()
                    bound = U32 * (before[name][0].norm().item() + before[name][1].norm().item())
                    worst = max(worst, change / max(bound, 1e-30))
                ratios.append(worst)
                return report

            run.scalora.refactor = observed
            train_step(run, step)
            run.scalora.refactor = original
        else:
            train_step(run, step)
    weights = {n: sum(effective(l)) for n, l in layers.items()}
    return ratios, weights


def exactness_worker(args: argparse.Namespace) -> None:
    """Under torchrun: FSDP2 on one process, bf16 compute, float32 masters."""
    import torch

    from scalora_dist.distributed import destroy_distributed, init_distributed

    info = init_distributed()
    ctx = Context(args, Path(args.work))
    ratios, weights = train_masters(base_overrides(args.model, ctx, "model.dtype=bfloat16"))
    if info.is_main:
        torch.save({"ratios": ratios, "weights": weights, "distributed": info.distributed}, args.result)
    destroy_distributed(wait_for_peers=True)


def check_exactness(ctx: Context) -> dict:
    import torch

    model = tiny_llama(ctx)
    result = ctx.work / "exactness.pt"
    _torchrun(ctx, "exactness", model, result)
    bf16 = torch.load(result)
    # the reference: float32, one process, on the CPU
    _, reference = train_masters(base_overrides(model, ctx, "model.dtype=float32", f"output.dir={ctx.work / 'ref'}"))
    from safetensors.torch import load_file

    base = {k: v.double() for k, v in load_file(str(model / "model.safetensors")).items()}
    update_err = 0.0
    for name, w in reference.items():
        w0 = base[f"{name}.weight"]
        update_err = max(update_err, ((bf16["weights"][name] - w).norm() / (w - w0).norm()).item())
    worst = max(bf16["ratios"])
    ok = bf16["distributed"] and worst <= ROUND_OFF_FACTOR and update_err <= 0.25
    return {
        "passed": ok,
        "refactors": len(bf16["ratios"]),
        "worst_change_in_u32_bounds": worst,
        "bf16_vs_fp32_update_rel_err": update_err,
        "fsdp2": bf16["distributed"],
        "limits": f"change <= {ROUND_OFF_FACTOR} bounds; update within 25% (bf16 compute over 8 steps)",
    }


# ---------------------------------------------------------------------------------------
# 2. bitsandbytes


def _quant_model(ctx: Context, quant_type: str, mesh=None):
    import torch

    from scalora_dist.config import load_config
    from scalora_dist.model.build import build_model

    cfg = load_config(
        None,
        base_overrides(
            tiny_llama(ctx),
            ctx,
            "model.dtype=bfloat16",
            "model.load_in_4bit=true",
            f"model.quant_type={quant_type}",
            "adapter.method=lora",
        ),
    )
    model = build_model(tiny_llama(ctx), cfg.model, cfg.adapter, torch.device(ctx.device), seed=0, mesh=mesh)
    torch.manual_seed(1)
    from scalora_dist.model.lora import lora_layers

    for layer in lora_layers(model).values():  # a non-zero adapter, so its path is checked too
        with torch.no_grad():
            local = layer.lora_B.to_local() if hasattr(layer.lora_B, "to_local") else layer.lora_B
            local.copy_(torch.randn_like(local) * 0.02)
    return model


def fsdp4bit_worker(args: argparse.Namespace) -> None:
    import torch
    from torch.distributed.device_mesh import init_device_mesh

    from scalora_dist.distributed import destroy_distributed, init_distributed

    info = init_distributed()
    ctx = Context(args, Path(args.work))
    ids = torch.arange(1, 33, device=ctx.device)[None] % 200
    out = {}
    for qt in ("nf4", "fp4"):
        plain = _quant_model(ctx, qt)
        wrapped = _quant_model(ctx, qt, mesh=init_device_mesh(info.device.type, (info.world_size,)))
        with torch.no_grad():
            a, b = plain(input_ids=ids).logits.float(), wrapped(input_ids=ids).logits.float()
        out[qt] = ((a - b).norm() / a.norm()).item()
    if info.is_main:
        Path(args.result).write_text(json.dumps(out))
    destroy_distributed(wait_for_peers=True)


def check_bitsandbytes(ctx: Context) -> dict:
    try:
        import bitsandbytes.functional as bnbf
    except ImportError:
        return {"skipped": "bitsandbytes is not installed (carry its wheel: tools/benchmarks/gpu_wheels.sh)"}
    import torch

    from scalora_dist.model.lora import lora_layers

    out: dict = {}
    for qt in ("nf4", "fp4"):
        model = _quant_model(ctx, qt)
        worst, grads_ok = 0.0, True
        for name, layer in lora_layers(model).items():
            x = torch.randn(16, layer.in_features, device=ctx.device, dtype=torch.bfloat16)
            y = layer(x).float()
            deq = bnbf.dequantize_4bit(layer.weight, layer.quant_state).float()
            ref = x.float() @ deq.T + layer.scale * (x.float() @ layer.lora_A.float().T) @ layer.lora_B.float().T
            worst = max(worst, ((y - ref).norm() / ref.norm()).item())
            y.square().sum().backward()
            grads_ok &= all(
                p.grad is not None and bool(torch.isfinite(p.grad).all()) and p.grad.abs().sum() > 0
                for p in (layer.lora_A, layer.lora_B)
            )
        out[qt] = {"worst_layer_rel_err": worst, "adapter_grads": grads_ok}
    result = ctx.work / "fsdp4bit.json"
    _torchrun(ctx, "fsdp4bit", tiny_llama(ctx), result)
    fsdp = json.loads(result.read_text())
    for qt in out:
        out[qt]["fsdp2_logits_rel_err"] = fsdp[qt]
    out["passed"] = all(
        v["worst_layer_rel_err"] <= BF16_TOL and v["adapter_grads"] and v["fsdp2_logits_rel_err"] <= BF16_TOL
        for v in out.values()
        if isinstance(v, dict)
    )
    return out


# ---------------------------------------------------------------------------------------
# 3. attention


def check_attention(ctx: Context) -> dict:
    import importlib.util

    import torch
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if ctx.device == "cuda" else torch.float32
    tol = BF16_TOL if dtype == torch.bfloat16 else FP32_TOL
    impls = ["sdpa", "eager"]
    if ctx.device == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        impls.append("flash_attention_2")
    # three examples packed in one row: position_ids restart at each
    lengths = [20, 28, 16]
    ids = (torch.arange(sum(lengths)) * 7 % 300 + 3)[None].to(ctx.device)
    pos = torch.cat([torch.arange(n) for n in lengths])[None].to(ctx.device)
    results = {}
    for impl in impls:
        model = AutoModelForCausalLM.from_pretrained(tiny_llama(ctx), dtype=dtype, attn_implementation=impl).to(
            ctx.device
        )
        out = model(input_ids=ids, position_ids=pos, labels=ids)
        out.loss.backward()
        grads = torch.cat([p.grad.float().flatten() for p in model.parameters() if p.grad is not None])
        results[impl] = (out.logits.float().detach(), grads)
    ref_logits, ref_grads = results["sdpa"]
    out = {"implementations": impls}
    for impl, (logits, grads) in results.items():
        out[impl] = {
            "logits_rel_err": ((logits - ref_logits).norm() / ref_logits.norm()).item(),
            "grads_rel_err": ((grads - ref_grads).norm() / ref_grads.norm()).item(),
        }
    if "flash_attention_2" not in impls:
        out["note"] = "flash-attn not importable here: flash_attention_2 not compared"
    out["passed"] = all(
        v["logits_rel_err"] <= tol and v["grads_rel_err"] <= 10 * tol for k, v in out.items() if isinstance(v, dict)
    )
    return out


# ---------------------------------------------------------------------------------------
# 4. throughput


def check_throughput(ctx: Context) -> dict:
    import statistics

    import bench_step

    model = shaped_model(ctx, f"llama8b-shape-{ctx.args.llama_layers}", llama_8b_shape(ctx, ctx.args.llama_layers))
    bench_args = argparse.Namespace(
        seq_len=ctx.args.seq_len, rank=16, warmup=3, steps=ctx.args.steps, batch_size=1, peak_tflops=None
    )
    data = ctx.work / "bench.jsonl"
    bench_step.write_data(data)
    variants = ["lora", "scalora", "scalora-I10", "full"]
    times, flops = bench_step.time_interleaved(bench_args, variants, model, data)
    peak = bench_step.peak_tflops(ctx.args.peak_tflops)
    base = statistics.median(times["lora"])
    out: dict = {"model": f"Llama-3-8B widths, {ctx.args.llama_layers} blocks", "peak_tflops": peak}
    for v in variants:
        step = statistics.median(times[v])
        achieved = flops[v] / step / 1e12
        out[v] = {
            "step_s": step,
            "ratio_to_lora": step / base,
            "tokens_per_s": ctx.args.seq_len / step,
            "tflops": achieved,
            "mfu": achieved / peak if peak else None,
        }
    out["goals"] = {
        "lora_mfu>=0.5": (out["lora"]["mfu"] or 0) >= 0.5,
        "scalora<=1.15x": out["scalora"]["ratio_to_lora"] <= 1.15,
        "scalora-I10<=1.03x": out["scalora-I10"]["ratio_to_lora"] <= 1.03,
    }
    out["passed"] = all(out["goals"].values()) if peak else None
    return out


# ---------------------------------------------------------------------------------------
# 5. memory


def _train(ctx: Context, overrides: list[str], steps: int) -> dict:
    """`steps` training steps of the run `overrides` describe, in this process: its peak CUDA
    memory (GiB; None on CPU), its losses, and the median time of the steps after the first."""
    import statistics

    import torch

    from scalora_dist.config import load_config
    from scalora_dist.train import setup, train_step

    if ctx.device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    run = setup(load_config(None, overrides))
    losses, times = [], []
    for step in range(steps):
        started = time.perf_counter()
        losses.append(train_step(run, step).loss)
        times.append(time.perf_counter() - started)
    peak = torch.cuda.max_memory_allocated() / 2**30 if ctx.device == "cuda" else None
    del run
    return {"peak_gib": peak, "step_s": statistics.median(times[1:] or times), "losses": losses}


def check_memory(ctx: Context) -> dict:
    import memory_plan

    rows = {}
    for layers in (1, 2):
        model = shaped_model(ctx, f"gemma12b-shape-{layers}", gemma3_12b_shape(ctx, layers))
        overrides = [
            f"model.path={model}",
            "model.dtype=bfloat16",
            "model.load_in_4bit=true",
            "model.quant_type=nf4",
            "model.double_quant=true",
            "model.gradient_checkpointing=true",
            "adapter.method=scalora",
            "adapter.rank=16",
            "adapter.alpha=32",
            "adapter.use_rslora=true",
            "adapter.scalora.accumulator_rank=64",
            "adapter.scalora.warmup_steps=1",
            f"data.train_files=[{data_file(ctx)}]",
            f"data.max_length={ctx.args.seq_len}",
            "data.packing=true",
            "train.micro_batch_size=1",
            "train.max_steps=3",
            "train.optimizer=adamw",
            f"output.dir={ctx.work / 'mem'}",
        ]
        measured = _train(ctx, overrides, steps=3)["peak_gib"]
        shape = memory_plan.SHAPES["gemma3-12b"]
        if ctx.tiny:
            shape = memory_plan.Shape("tiny-gemma3", "gemma3", layers, 64, 256, 4, 2, 16, 2048, True)
        shape = memory_plan.Shape(**{**shape.__dict__, "layers": layers})
        planned = next(
            r
            for r in memory_plan.plan(shape, rank=16, acc_rank=64, seq_len=ctx.args.seq_len, gpu_counts=(1,))
            if r.base == "nf4" and r.method == "scalora"
        )
        rows[layers] = {"measured_gib": measured, "planned_gib": planned.total / 2**30}
    out: dict = {"blocks": rows}
    if ctx.device == "cuda":
        per_block = {k: rows[2][k] - rows[1][k] for k in ("measured_gib", "planned_gib")}
        out["extrapolated_48_blocks_gib"] = {k: rows[1][k] + 47 * per_block[k] for k in per_block}
        worst = max(abs(r["measured_gib"] / r["planned_gib"] - 1) for r in rows.values())
        out["worst_relative_gap"] = worst
        out["passed"] = worst <= 0.10
    else:
        out["note"] = "no CUDA device: peak CUDA memory is not measurable; the plan's figures only"
        out["passed"] = None
    return out


# ---------------------------------------------------------------------------------------
# 6. loss kernels


def _head_loss(kernel: str, h, weight, labels, n):
    from transformers.loss.loss_utils import ForCausalLMLoss

    from scalora_dist.model.chunked_loss import chunked_causal_lm_loss, liger_causal_lm_loss

    if kernel == "plain":
        return ForCausalLMLoss(h @ weight.T, labels, weight.shape[0], num_items_in_batch=n)
    if kernel == "liger":
        return liger_causal_lm_loss(h, weight, labels, n)
    return chunked_causal_lm_loss(h, weight, labels, n)


def check_loss_kernels(ctx: Context) -> dict:
    import statistics

    import torch

    from scalora_dist.config import ConfigError
    from scalora_dist.model.chunked_loss import resolve_loss_kernel

    hidden, vocab, tokens = (64, 2048, 64) if ctx.tiny else (640, 262144, 2048)
    g = torch.Generator(device=ctx.device).manual_seed(0)
    h0 = torch.randn(1, tokens, hidden, device=ctx.device, dtype=torch.bfloat16, generator=g)
    weight = torch.randn(vocab, hidden, device=ctx.device, dtype=torch.bfloat16, generator=g) / hidden**0.5
    labels = torch.randint(0, vocab, (1, tokens), device=ctx.device, generator=g)
    labels[:, : tokens // 8] = -100  # a prompt
    n = (labels[:, 1:] != -100).sum()
    kernels = ["plain", "torch"]
    try:  # the run's own rule: installed, and on CUDA (or under Triton's interpreter)
        kernels.append(resolve_loss_kernel("liger", torch.device(ctx.device)))
    except ConfigError:
        pass
    out: dict = {"head": f"hidden {hidden}, vocab {vocab}, {tokens} bf16 tokens"}
    grads = {}
    for kernel in kernels:
        times, peak = [], None
        for _ in range(1 if ctx.tiny else 3):
            h = h0.clone().requires_grad_()
            if ctx.device == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                before = torch.cuda.memory_allocated()
            started = time.perf_counter()
            loss = _head_loss(kernel, h, weight, labels, n)
            loss.backward()
            if ctx.device == "cuda":
                torch.cuda.synchronize()
                peak = (torch.cuda.max_memory_allocated() - before) / 2**20
            times.append(time.perf_counter() - started)
        grads[kernel] = h.grad.float()
        out[kernel] = {"loss": loss.item(), "seconds": statistics.median(times), "peak_mib": peak}
    for kernel in kernels[1:]:
        ref = grads["plain"]
        out[kernel]["loss_rel_gap"] = abs(out[kernel]["loss"] / out["plain"]["loss"] - 1)
        out[kernel]["grad_rel_gap"] = ((grads[kernel] - ref).norm() / ref.norm()).item()
    out["liger"] = out.get("liger", "liger-kernel not installed or no CUDA: not run")
    out["passed"] = all(out[k]["loss_rel_gap"] < 1e-3 and out[k]["grad_rel_gap"] < 2e-2 for k in kernels[1:])
    return out


# ---------------------------------------------------------------------------------------
# 7. activation offload


def check_offload(ctx: Context) -> dict:
    layers = ctx.args.llama_layers
    model = shaped_model(ctx, f"llama8b-shape-{layers}", llama_8b_shape(ctx, layers))
    seq_len = 64 if ctx.tiny else ctx.args.offload_seq_len
    rows = {}
    for offload in (False, True):
        overrides = [
            f"model.path={model}",
            "model.dtype=bfloat16",
            "model.gradient_checkpointing=true",
            f"model.offload_activations={str(offload).lower()}",
            "adapter.method=lora",
            "adapter.rank=16",
            "adapter.alpha=32",
            f"data.train_files=[{data_file(ctx)}]",
            f"data.max_length={seq_len}",
            "data.packing=true",
            "train.micro_batch_size=1",
            "train.max_steps=3",
            f"output.dir={ctx.work / f'offload-{offload}'}",
        ]
        rows[offload] = _train(ctx, overrides, steps=3)
    hidden = llama_8b_shape(ctx, layers).hidden_size
    planned_saving = max(0, layers - 2) * seq_len * hidden * 2 / 2**30
    # the host copies are exact; on CUDA, attention's backward kernels may add in another order
    tol = 1e-3 if ctx.device == "cuda" else 0.0
    gap = max(abs(a / b - 1) for a, b in zip(rows[True]["losses"], rows[False]["losses"]))
    out: dict = {
        "model": f"Llama-3-8B widths, {layers} blocks, {seq_len} tokens",
        "off": rows[False],
        "on": rows[True],
        "planned_saving_gib": planned_saving,
        "step_time_ratio": rows[True]["step_s"] / rows[False]["step_s"],
        "loss_rel_gap": gap,
    }
    out["passed"] = gap <= tol
    if ctx.device == "cuda":
        out["measured_saving_gib"] = rows[False]["peak_gib"] - rows[True]["peak_gib"]
        out["passed"] = out["passed"] and out["measured_saving_gib"] >= 0.8 * planned_saving
    else:
        out["note"] = "no CUDA device: the host copies are checked, not the device memory they free"
    return out


# ---------------------------------------------------------------------------------------
# Driver

CHECKS = {  # name: (function, estimated seconds on an H200, tiny CPU estimate)
    "exactness": (check_exactness, 40, 40),
    "bitsandbytes": (check_bitsandbytes, 30, 30),
    "attention": (check_attention, 20, 10),
    "throughput": (check_throughput, 180, 60),
    "memory": (check_memory, 120, 40),
    "loss_kernels": (check_loss_kernels, 20, 15),
    "offload": (check_offload, 90, 30),
}


def _torchrun(ctx: Context, worker: str, model: Path, result: Path) -> None:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node=1",
        __file__,
        "--worker",
        worker,
        "--model",
        str(model),
        "--result",
        str(result),
        "--work",
        str(ctx.work),
        "--device",
        ctx.device,
        *(["--tiny"] if ctx.tiny else []),
    ]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=max(60, ctx.left_s())
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{worker} worker failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")


def markdown(results: dict, args: argparse.Namespace) -> str:
    lines = [
        f"# GPU check ({time.strftime('%Y-%m-%d')}, device {results['device']}, "
        f"`python tools/benchmarks/gpu_check.py {' '.join(args.argv)}`)",
        "",
        "| check | result | seconds | figures |",
        "|---|---|---|---|",
    ]
    for name, r in results["checks"].items():
        status = "skipped" if "skipped" in r else {True: "pass", False: "FAIL", None: "ran"}[r.get("passed")]
        figures = {k: v for k, v in r.items() if k not in ("passed", "seconds")}
        lines.append(f"| {name} | {status} | {r.get('seconds', 0):.0f} | `{json.dumps(figures, default=_short)}` |")
    return "\n".join(lines) + "\n"


def _short(x):
    return round(x, 4) if isinstance(x, float) else str(x)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cuda", "cpu"], default=None, help="default: cuda when available")
    p.add_argument("--tiny", action="store_true", help="tiny sizes: the code paths in minutes on a CPU")
    p.add_argument("--out", type=Path, default=Path("gpu-check"))
    p.add_argument("--budget-s", type=float, default=450.0, help="skip checks that would end past this")
    p.add_argument("--only", default=",".join(CHECKS), help="checks to run, in order")
    p.add_argument("--llama-layers", type=int, default=4, help="blocks of the 8B-shaped model (throughput)")
    p.add_argument("--seq-len", type=int, default=2048, help="tokens per micro-batch (throughput, memory)")
    p.add_argument("--steps", type=int, default=6, help="timed steps per variant (throughput)")
    p.add_argument("--offload-seq-len", type=int, default=8192, help="tokens of the offload check's sequence")
    p.add_argument("--peak-tflops", type=float, help="the device's bf16 peak (default: known GPUs)")
    p.add_argument("--worker", choices=["exactness", "fsdp4bit"], help=argparse.SUPPRESS)
    p.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    import torch

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.tiny:
        args.seq_len, args.llama_layers, args.steps = (
            min(args.seq_len, 64),
            min(args.llama_layers, 2),
            min(args.steps, 2),
        )
    if args.worker:
        {"exactness": exactness_worker, "fsdp4bit": fsdp4bit_worker}[args.worker](args)
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device here (use --device cpu --tiny for the code paths)")

    from scalora_dist.metrics import quiet_libraries

    quiet_libraries()
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict = {
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "torch": torch.__version__,
        "checks": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        ctx = Context(args, Path(tmp))
        for name in args.only.split(","):
            fn, gpu_estimate, cpu_estimate = CHECKS[name]
            estimate = cpu_estimate if args.device == "cpu" else gpu_estimate
            if ctx.left_s() < estimate:
                results["checks"][name] = {"skipped": f"{ctx.left_s():.0f} s left of --budget-s, needs ~{estimate} s"}
                print(f"[{name}] skipped: {results['checks'][name]['skipped']}", flush=True)
                continue
            print(f"[{name}] running (~{estimate} s) ...", flush=True)
            started = time.monotonic()
            try:
                r = fn(ctx)
            except Exception as e:  # a failed check must not hide the others' results
                r = {"passed": False, "error": f"{type(e).__name__}: {e}"[-3000:]}
            r["seconds"] = time.monotonic() - started
            results["checks"][name] = r
            (args.out / "gpu_check.json").write_text(json.dumps(results, indent=1, default=str))
            print(
                f"[{name}] {'skipped' if 'skipped' in r else r.get('passed')} in {r['seconds']:.0f} s: "
                f"{json.dumps({k: v for k, v in r.items() if k != 'seconds'}, default=_short)[:600]}",
                flush=True,
            )
    (args.out / "gpu_check.json").write_text(json.dumps(results, indent=1, default=str))
    (args.out / "gpu_check.md").write_text(markdown(results, args))
    print(markdown(results, args))
    return 0 if all(r.get("passed") is not False for r in results["checks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
