"""Step time, host memory per rank and communication of LoRA vs ScaLoRA under FSDP2, per world size.

    python tools/benchmarks/bench_distributed.py                          # world sizes 1, 2, 4; CPU, gloo
    python tools/benchmarks/bench_distributed.py --ranks 1,2 --steps 30 --skip-load --skip-alone

Every measurement is a torchrun job (`python -m torch.distributed.run --standalone
--nproc-per-node W`), world size 1 included, so the FSDP2 path is measured everywhere;
OMP_NUM_THREADS = max(1, cores // W) (or --threads) and OMP_WAIT_POLICY=PASSIVE unless set
(busy-waiting OpenMP threads make steps ~10x slower when the cores are shared). Rank 0 of
each job writes a JSON result; the tables come last. Temporary files only, removed at the end.

1. Step time: the variants (lora, scalora I=1, scalora I=10) are set up in the same job and
   their steps interleaved after warm-up (lora, scalora, scalora-I10, lora, ...), so machine
   noise hits them alike; median step time on rank 0 and the ratio to lora (of the medians,
   and the median of the per-round ratios), per world size. Same model and global batch
   everywhere (micro-batch = global batch / W).
2. Host memory per rank: (a) loading, one job per world size on a larger model whose weights
   dominate the Python baseline: ru_maxrss after imports and after `setup()`, the increase,
   this rank's parameter shard, and the peak growth of anonymous and of file-backed memory
   (sampled every 5 ms; ru_maxrss counts the pages of the memory-mapped safetensors file
   too); (b) ru_maxrss after the steps: each variant alone in its own job (ru_maxrss only
   grows), and the interleaved step-time job's (all variants resident at once).
3. Communication in one step, recorded at the dispatcher (a CollectiveRecorder that also sees
   DTensor's own collectives): ScaLoRA's refactor (expected: one all-reduce of
   L x 2 x (2r)^2 float64) next to FSDP2's all-gathers and reduce-scatters of the same step.
   Bytes are each collective's full buffer (an all-gather's output, a reduce-scatter's
   input), not bytes on the wire.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench_step import VARIANTS as METHOD_VARIANTS  # tools/ is on sys.path when a tool runs
from bench_step import interleave, write_data

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

VARIANTS = {
    **{name: METHOD_VARIANTS[name] for name in ("lora", "scalora", "scalora-I10", "full")},
    # 4-bit bases in FSDP2's two placements of the packed codes
    "lora-nf4-sharded": ["adapter.method=lora", "model.load_in_4bit=true"],
    "lora-nf4-replicated": ["adapter.method=lora", "model.load_in_4bit=true", "model.base_placement=replicated"],
    "scalora-nf4-sharded": ["adapter.method=scalora", "model.load_in_4bit=true"],
    "scalora-nf4-replicated": ["adapter.method=scalora", "model.load_in_4bit=true", "model.base_placement=replicated"],
}
MIB = 1024 * 1024


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


THREADS: int | None = None  # --threads


def threads_for(world: int) -> int:
    return THREADS or max(1, cores() // world)


# ---------------------------------------------------------------------------------------------
# Worker side (inside torchrun)
# ---------------------------------------------------------------------------------------------


def overrides_for(args: argparse.Namespace, variant: str, world: int) -> list[str]:
    return [
        f"model.path={args.model_dir}",
        f"data.train_files=[{args.data}]",
        f"data.max_length={args.seq_len}",
        "data.packing=true",
        f"adapter.rank={args.rank}",
        f"adapter.alpha={2 * args.rank}",
        f"adapter.scalora.warmup_steps={args.warmup}",
        f"train.max_steps={args.warmup + args.steps + 1}",
        f"train.micro_batch_size={args.batch_size // world}",
        "train.lr=1e-3",
        f"output.dir={Path(args.out).parent / 'unused-output'}",
        *VARIANTS[variant],
    ]


def rss_now_mib() -> dict[str, float]:
    """Current resident memory, split into anonymous and file-backed pages (Linux)."""
    out = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile"):
                out[key] = int(value.split()[0]) / 1024
    except OSError:
        pass
    return out


def _leaves(tree) -> list:
    import torch

    if isinstance(tree, torch.Tensor):
        return [tree]
    if isinstance(tree, (list, tuple)):
        return [t for item in tree for t in _leaves(item)]
    if isinstance(tree, dict):
        return [t for item in tree.values() for t in _leaves(item)]
    return []


def make_recorder():
    """CollectiveRecorder that also sees DTensor's own collectives: it lets DTensor ops run
    first (as CommDebugMode does), so the functional collectives they issue (`_c10d_functional`,
    e.g. the grad-norm all-reduce in clip_grad_norm_) reach it; they are recorded as
    `funcol.<op>`. The package's CollectiveRecorder counts `c10d` ops only, and a mode never
    sees what runs inside a DTensor op it intercepted."""
    from torch.distributed.tensor import DTensor

    from scalora_dist.distributed import CollectiveRecorder

    class Recorder(CollectiveRecorder):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if any(issubclass(t, DTensor) for t in types):
                return NotImplemented  # let DTensor run and desugar into collectives first (as CommDebugMode)
            kwargs = kwargs or {}
            name = func.__name__.split(".")[0]
            if func.namespace == "_c10d_functional" and not name.startswith("wait"):
                nbytes = max((t.numel() * t.element_size() for t in _leaves((args, kwargs))), default=0)
                self.calls.append((f"funcol.{name}", nbytes))
                return func(*args, **kwargs)
            return super().__torch_dispatch__(func, types, args, kwargs)

    return Recorder()


def measured_step(run, step: int) -> dict:
    """One training step with every collective recorded; ScaLoRA's refactor separately."""
    from scalora_dist.train import train_step

    refactor_calls: list = []
    report_box: dict = {}
    if run.scalora is not None:
        original = run.scalora.refactor

        def recorded_refactor(step=None):
            with make_recorder() as rec:
                report = original(step)
            refactor_calls.extend(rec.calls)
            report_box["reduced_bytes"] = report.reduced_bytes
            report_box["gathered_bytes"] = report.gathered_bytes
            report_box["collectives"] = report.collectives
            return report

        run.scalora.refactor = recorded_refactor
    try:
        with make_recorder() as rec:
            train_step(run, step)
    finally:
        if run.scalora is not None:
            del run.scalora.refactor  # back to the class method
    out = {"step": rec.calls, "refactor": refactor_calls, "report": report_box or None}
    if run.scalora is not None:
        out["layers"] = len(run.scalora.layers)
        out["lora_rank"] = run.cfg.adapter.rank
    return out


def worker_time(args, info) -> dict:
    import torch.distributed as dist

    from scalora_dist.config import load_config
    from scalora_dist.metrics import peak_rss_mib
    from scalora_dist.train import setup

    variants = args.variants.split(",")
    runs = {v: setup(load_config(None, overrides_for(args, v, info.world_size)), info) for v in variants}
    times = interleave(runs, args.warmup, args.steps)
    peak = peak_rss_mib()
    comm_step = args.warmup + args.steps
    comm = {v: measured_step(runs[v], comm_step) for v in ("lora", "scalora") if v in runs}
    peaks = [None] * info.world_size
    dist.all_gather_object(peaks, peak)
    return {
        "times": times,
        "peak_rss_mib": peaks,
        "comm": comm,
        "micro_batch": runs[variants[0]].cfg.train.micro_batch_size,
    }


def worker_alone(args, info) -> dict:
    import torch.distributed as dist

    from scalora_dist.config import load_config
    from scalora_dist.metrics import peak_rss_mib
    from scalora_dist.train import setup, train_step

    run = setup(load_config(None, overrides_for(args, args.variant, info.world_size)), info)
    for step in range(args.warmup + args.steps):
        train_step(run, step)
    peaks = [None] * info.world_size
    dist.all_gather_object(peaks, peak_rss_mib())
    return {"peak_rss_mib": peaks}


def worker_load(args, info, baseline: dict) -> dict:
    import gc

    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    from scalora_dist.config import load_config
    from scalora_dist.metrics import peak_rss_mib
    from scalora_dist.train import setup

    sampled = {"RssAnon": 0.0, "RssFile": 0.0}
    done = threading.Event()

    def sample() -> None:  # ru_maxrss cannot tell anonymous from file-backed (mmap) pages
        while not done.is_set():
            for k, v in rss_now_mib().items():
                if k in sampled:
                    sampled[k] = max(sampled[k], v)
            done.wait(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.perf_counter()
    run = setup(load_config(None, overrides_for(args, "lora", info.world_size)), info)
    seconds = time.perf_counter() - started
    done.set()
    sampler.join()
    gc.collect()
    local = full = 0
    for name, p in run.model.named_parameters():
        t = p.to_local() if isinstance(p, DTensor) else p
        local += t.numel() * t.element_size()
        if not (name.endswith(".lora_A") or name.endswith(".lora_B")):
            full += p.numel() * p.element_size()
    mine = {
        **baseline,
        "after_peak": peak_rss_mib(),
        "after_now": rss_now_mib(),
        "sampled_peak": sampled,
        "local_param_mib": local / MIB,
        "full_base_mib": full / MIB,
        "setup_s": seconds,
    }
    everyone = [None] * info.world_size
    dist.all_gather_object(everyone, mine)
    return {"ranks": everyone}


def worker_main(args) -> None:
    import torch.distributed as dist

    from scalora_dist.distributed import init_distributed
    from scalora_dist.metrics import peak_rss_mib, quiet_libraries

    quiet_libraries()
    import scalora_dist.train  # noqa: F401  (everything setup() needs is imported before the baseline)

    info = init_distributed()
    assert dist.is_initialized(), "the worker must run under torchrun"
    baseline = {"baseline_peak": peak_rss_mib(), "baseline_now": rss_now_mib()}
    if args.worker == "time":
        result = worker_time(args, info)
    elif args.worker == "alone":
        result = worker_alone(args, info)
    else:
        result = worker_load(args, info, baseline)
    result["world_size"] = info.world_size
    if info.is_main:
        Path(args.out).write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------
# Launcher side
# ---------------------------------------------------------------------------------------------


def run_job(world: int, worker_args: list[str], out: Path, env: dict[str, str], label: str) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        str(world),
        str(Path(__file__).resolve()),
        *worker_args,
        "--out",
        str(out),
    ]
    started = time.perf_counter()
    proc = subprocess.run(
        cmd, cwd=REPO, capture_output=True, text=True, env={**env, "OMP_NUM_THREADS": str(threads_for(world))}
    )
    seconds = time.perf_counter() - started
    if proc.returncode != 0 or not out.is_file():
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
        raise SystemExit(f"{label} (world size {world}) failed with exit code {proc.returncode}")
    print(f"  {label}, world size {world}: {seconds:.1f} s", file=sys.stderr, flush=True)
    result = json.loads(out.read_text())
    result["job_s"] = seconds
    return result


def kind(op: str) -> str:
    if op.startswith("funcol."):
        return "functional"
    if "gather" in op:
        return "all-gather"
    if "scatter" in op:
        return "reduce-scatter"
    if "allreduce" in op:
        return "all-reduce"
    return op


def summarise(calls: list) -> dict[str, tuple[int, int]]:
    out: dict[str, tuple[int, int]] = {}
    for op, nbytes in calls:
        k = kind(op)
        n, b = out.get(k, (0, 0))
        out[k] = (n + 1, b + nbytes)
    return out


def fmt_bytes(n: float) -> str:
    if n >= MIB:
        return f"{n / MIB:,.2f} MiB"
    if n >= 1024:
        return f"{n / 1024:,.1f} KiB"
    return f"{n:,.0f} B"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", default="1,2,4", help="world sizes, comma-separated")
    p.add_argument("--steps", type=int, default=20, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (also ScaLoRA warm-up)")
    p.add_argument("--hidden-size", type=int, default=256, help="step-time model")
    p.add_argument("--num-layers", type=int, default=4, help="step-time model")
    p.add_argument("--load-hidden-size", type=int, default=1024, help="loading-memory model")
    p.add_argument("--load-num-layers", type=int, default=8, help="loading-memory model")
    p.add_argument("--load-intermediate-size", type=int, default=2816, help="loading-memory model")
    p.add_argument("--skip-load", action="store_true", help="no loading-memory jobs")
    p.add_argument(
        "--alone-steps",
        type=int,
        default=3,
        help="steps after warm-up in each per-variant peak-RSS job (the peak is reached by "
        "the first optimizer step and refactor)",
    )
    p.add_argument(
        "--skip-alone",
        action="store_true",
        help="no per-variant peak-RSS jobs (report only the interleaved job's peak)",
    )
    p.add_argument("--rank", type=int, default=8, help="LoRA rank r")
    p.add_argument("--batch-size", type=int, default=8, help="global batch (sequences per step)")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--variants", default="lora,scalora,scalora-I10")
    p.add_argument("--threads", type=int, help="OMP threads per rank (default: cores // W, at least 1)")
    # worker-only options
    p.add_argument("--worker", choices=("time", "alone", "load"), help=argparse.SUPPRESS)
    p.add_argument("--variant", help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.worker:
        worker_main(args)
        return
    global THREADS
    THREADS = args.threads

    worlds = [int(w) for w in args.ranks.split(",") if w.strip()]
    variants = args.variants.split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variant(s) {unknown}; choose from {list(VARIANTS)}")
    bad = [w for w in worlds if w < 1 or args.batch_size % w]
    if bad:
        p.error(f"--batch-size {args.batch_size} must divide by every world size (not by {bad})")

    import torch
    from rich.console import Console
    from rich.table import Table

    from scalora_dist.metrics import quiet_libraries

    quiet_libraries()
    from scalora_dist.model.tiny import make_tiny_model

    wall_started = time.perf_counter()
    command = " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv])
    header = (
        f"{datetime.datetime.now().isoformat(timespec='seconds')}  {platform.node()}  "
        f"{platform.platform()}  {platform.processor() or platform.machine()}, "
        f"{cores()} usable cores (os.cpu_count() = {os.cpu_count()})  torch {torch.__version__}  "
        f"python {platform.python_version()}  load average at start {os.getloadavg()[0]:.2f}"
        f"\ncommand: {command}"
        f"\njobs: python -m torch.distributed.run --standalone --nproc-per-node W (W = 1 too: FSDP2 "
        f"everywhere), OMP_NUM_THREADS = {args.threads if args.threads else 'max(1, cores // W)'}, "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'PASSIVE')}"
    )

    results: dict[str, dict[int, dict]] = {"time": {}, "alone": {}, "load": {}}
    with tempfile.TemporaryDirectory(prefix="bench-dist-") as tmp:
        tmp_path = Path(tmp)
        env = {
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "HF_DATASETS_CACHE": str(tmp_path / "datasets-cache"),
            # Busy-waiting OpenMP threads collapse (10x slower steps) when the cores are shared
            # with other work; passive waiting costs little when they are not.
            "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE"),
            "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]),
        }
        data = tmp_path / "bench.jsonl"
        write_data(data)
        print("building models ...", file=sys.stderr, flush=True)
        h = args.hidden_size
        step_model = make_tiny_model(
            tmp_path / "step-model",
            hidden_size=h,
            num_layers=args.num_layers,
            num_heads=max(1, h // 64),
            num_kv_heads=max(1, h // 128),
            intermediate_size=h * 2,
            corpus_files=[str(data)],
        )
        load_model = None
        if not args.skip_load:
            lh = args.load_hidden_size
            load_model = make_tiny_model(
                tmp_path / "load-model",
                hidden_size=lh,
                num_layers=args.load_num_layers,
                num_heads=max(1, lh // 64),
                num_kv_heads=max(1, lh // 128),
                intermediate_size=args.load_intermediate_size,
                corpus_files=[str(data)],
            )
        common = [
            "--model-dir",
            str(step_model),
            "--data",
            str(data),
            "--warmup",
            str(args.warmup),
            "--rank",
            str(args.rank),
            "--batch-size",
            str(args.batch_size),
            "--seq-len",
            str(args.seq_len),
        ]
        for w in worlds:
            results["time"][w] = run_job(
                w,
                ["--worker", "time", "--variants", ",".join(variants), "--steps", str(args.steps), *common],
                tmp_path / f"time-{w}.json",
                env,
                "interleaved step-time job",
            )
        if not args.skip_alone:
            for w in worlds:
                results["alone"][w] = {
                    v: run_job(
                        w,
                        ["--worker", "alone", "--variant", v, "--steps", str(args.alone_steps), *common],
                        tmp_path / f"alone-{w}-{v}.json",
                        env,
                        f"peak-RSS job, {v} alone",
                    )
                    for v in variants
                }
        checkpoint_mib = None
        if load_model is not None:
            checkpoint_mib = sum(f.stat().st_size for f in Path(load_model).glob("*.safetensors")) / MIB
            load_common = [
                "--model-dir",
                str(load_model),
                "--data",
                str(data),
                "--steps",
                "0",
                "--warmup",
                "0",
                "--rank",
                str(args.rank),
                "--batch-size",
                str(args.batch_size),
                "--seq-len",
                str(args.seq_len),
            ]
            for w in worlds:
                results["load"][w] = run_job(
                    w, ["--worker", "load", *load_common], tmp_path / f"load-{w}.json", env, "loading job"
                )
    wall = time.perf_counter() - wall_started

    console = Console(width=max(Console().width, 160))
    console.print(header, highlight=False)

    # 1. step time ------------------------------------------------------------------------------
    t = Table(
        title=(
            f"1. step time: {args.steps} interleaved steps per variant after {args.warmup} warm-up, "
            f"hidden {args.hidden_size} x {args.num_layers} layers, r={args.rank}, global batch "
            f"{args.batch_size}x{args.seq_len} (micro-batch {args.batch_size}/W), FSDP2 on gloo, rank 0's clock. "
            f"Ratio: of the medians, and \\[median of the per-round ratios]"
        )
    )
    t.add_column("W", justify="right")
    t.add_column("threads/rank", justify="right")
    for v in variants:
        t.add_column(f"{v} median (ms)", justify="right")
    for v in variants[1:]:
        t.add_column(f"{v} / {variants[0]}", justify="right")
    t.add_column("job wall (s)", justify="right")
    for w in worlds:
        times = results["time"][w]["times"]
        med = {v: statistics.median(times[v]) for v in variants}
        paired = {v: statistics.median(a / b for a, b in zip(times[v], times[variants[0]])) for v in variants}
        t.add_row(
            str(w),
            str(threads_for(w)),
            *[f"{med[v] * 1e3:.1f}" for v in variants],
            *[f"{med[v] / med[variants[0]]:.3f} \\[{paired[v]:.3f}]" for v in variants[1:]],
            f"{results['time'][w]['job_s']:.0f}",
        )
    console.print(t)

    # 2a. loading memory ------------------------------------------------------------------------
    if results["load"]:
        any_load = next(iter(results["load"].values()))["ranks"][0]
        t = Table(
            title=(
                f"2a. host memory of loading, setup() with lora: hidden {args.load_hidden_size} x "
                f"{args.load_num_layers} layers, intermediate {args.load_intermediate_size}; full base "
                f"weights {any_load['full_base_mib']:.0f} MiB float32 (checkpoint file {checkpoint_mib:.0f} MiB). "
                "MiB per rank. ru_maxrss: baseline after imports + init, peak after setup(). Sampled every 5 ms "
                "during setup(): peak growth of anonymous memory and of file-backed pages (the mmapped "
                "safetensors file), which ru_maxrss adds together"
            )
        )
        for col in (
            "W",
            "rank",
            "ru_maxrss baseline",
            "ru_maxrss after setup()",
            "increase",
            "increase / full",
            "local param shard",
            "sampled peak: anon +",
            "file-backed +",
            "setup (s)",
        ):
            t.add_column(col, justify="right")
        for w in worlds:
            for r, d in enumerate(results["load"][w]["ranks"]):
                inc = d["after_peak"] - d["baseline_peak"]
                base_now, peak = d["baseline_now"], d["sampled_peak"]
                anon = peak["RssAnon"] - base_now.get("RssAnon", 0)
                file = peak["RssFile"] - base_now.get("RssFile", 0)
                t.add_row(
                    str(w),
                    str(r),
                    f"{d['baseline_peak']:.0f}",
                    f"{d['after_peak']:.0f}",
                    f"{inc:.0f}",
                    f"{inc / d['full_base_mib']:.2f}",
                    f"{d['local_param_mib']:.0f}",
                    f"{anon:.0f} ({anon / d['full_base_mib']:.2f} x full)",
                    f"{file:.0f}",
                    f"{d['setup_s']:.1f}",
                )
            t.add_section()
        console.print(t)

    # 2b. peak memory after the steps -----------------------------------------------------------
    t = Table(
        title=(
            "2b. peak host memory per rank (ru_maxrss, MiB, max / min over ranks), step-time model"
            + (
                ""
                if args.skip_alone
                else f"; 'alone': each variant in its own job, {args.warmup}+{args.alone_steps} steps"
            )
            + f"; interleaved: the step-time job, {args.warmup}+{args.steps}+1 steps of each variant"
        )
    )
    t.add_column("W", justify="right")
    if not args.skip_alone:
        for v in variants:
            t.add_column(f"{v} alone", justify="right")
    t.add_column("interleaved job (all variants resident)", justify="right")
    for w in worlds:
        cells = []
        if not args.skip_alone:
            for v in variants:
                pk = results["alone"][w][v]["peak_rss_mib"]
                cells.append(f"{max(pk):.0f} / {min(pk):.0f}")
        pk = results["time"][w]["peak_rss_mib"]
        t.add_row(str(w), *cells, f"{max(pk):.0f} / {min(pk):.0f}")
    console.print(t)

    # 3. communication --------------------------------------------------------------------------
    t = Table(
        title=(
            "3. communication in one training step on rank 0, recorded at the dispatcher (count x bytes; bytes = "
            "each collective's full buffer: an all-gather's output, a reduce-scatter's input, not bytes on the "
            "wire), step-time model. c10d ops as CollectiveRecorder counts them; DTensor's own collectives "
            "(grad-norm) in their own column"
        )
    )
    for col in (
        "W",
        "scope",
        "all-gathers",
        "reduce-scatters",
        "all-reduces",
        "DTensor (funcol)",
        "total",
        "expected L x 2 x (2r)^2 x 8",
        "refactor / FSDP2",
    ):
        t.add_column(col, justify="right")

    def cell(summary: dict, k: str) -> str:
        n, b = summary.get(k, (0, 0))
        return f"{n} x = {fmt_bytes(b)}" if n else "0"

    def total(summary: dict) -> str:
        return f"{sum(n for n, _ in summary.values())} x = {fmt_bytes(sum(b for _, b in summary.values()))}"

    for w in worlds:
        comm = results["time"][w]["comm"]
        fsdp = {}
        for v in ("lora", "scalora"):
            if v in comm:
                s = summarise(comm[v]["step"])
                fsdp[v] = (
                    sum(s.get(k, (0, 0))[0] for k in ("all-gather", "reduce-scatter")),
                    sum(s.get(k, (0, 0))[1] for k in ("all-gather", "reduce-scatter")),
                )
        if "scalora" in comm:
            c = comm["scalora"]
            L, r = c["layers"], c["lora_rank"]
            expected = L * 2 * (2 * r) ** 2 * 8
            ref = summarise(c["refactor"])
            n_ref, b_ref = sum(n for n, _ in ref.values()), sum(b for _, b in ref.values())
            rep = c["report"] or {}
            ok = n_ref == 1 and b_ref == expected == rep.get("reduced_bytes") and not rep.get("gathered_bytes")
            fsdp_n, fsdp_b = fsdp["scalora"]
            t.add_row(
                str(w),
                "ScaLoRA refactor",
                cell(ref, "all-gather"),
                cell(ref, "reduce-scatter"),
                cell(ref, "all-reduce"),
                cell(ref, "functional"),
                total(ref),
                f"{fmt_bytes(expected)} (L={L}, r={r}) {'matches' if ok else 'DIFFERS'}",
                f"{n_ref}/{fsdp_n} ops, {b_ref / fsdp_b:.2%} of bytes" if fsdp_b else "no FSDP2 collectives",
            )
        for v in ("lora", "scalora"):
            if v not in comm:
                continue
            s = summarise(comm[v]["step"])
            t.add_row(
                str(w),
                f"whole {v} step",
                cell(s, "all-gather"),
                cell(s, "reduce-scatter"),
                cell(s, "all-reduce"),
                cell(s, "functional"),
                total(s),
                "",
                "",
            )
        t.add_section()
    console.print(t)
    console.print(f"wall time {wall:.0f} s", highlight=False)


if __name__ == "__main__":
    main()
