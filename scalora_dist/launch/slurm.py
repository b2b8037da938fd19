"""sbatch / torchrun launch scripts from one template.

`scalora-dist slurm CONFIG ...` renders a job script for one run (config, overrides,
interpreter, working directory and #SBATCH values baked in) and the files in `launch/` are
the same template rendered with placeholders taken from the command line of the script
(`sbatch launch/multi_node.sbatch CONFIG.yaml [key=value ...]`). Regenerate them with

    python -m scalora_dist.launch.slurm --write-examples launch/

(tests/test_slurm.py checks that the committed files equal the rendered ones).

What a job does (see `SBATCH_TEMPLATE`):

1. pre-tokenises the train/eval files once, in one process on the first node
   (`scalora_dist.data.load_split` with the model's tokenizer), so N nodes find a warm
   `datasets` cache instead of tokenising the same data at once. The cache
   (HF_DATASETS_CACHE, default ~/.cache/huggingface/datasets) must be on storage every
   node sees; otherwise each node tokenises again.
2. `srun --ntasks-per-node=1`: one launcher per node, each running
   `scalora-dist train CONFIG ... --nnodes $SLURM_NNODES --nproc-per-node G
   --rdzv-endpoint $MASTER_ADDR:$RDZV_PORT --rdzv-id $SLURM_JOB_ID --max-restarts R
   --resume auto`, MASTER_ADDR being the first host of the allocation.
   `--resume auto` makes both torchrun restarts (a lost worker) and SLURM requeues
   (`--requeue`, a lost node) continue from the newest complete checkpoint.
3. The rendezvous join timeout goes to torchrun through its environment: torchrun reads
   every option it is not given from `PET_<OPTION>`, so `PET_RDZV_CONF=join_timeout=S`
   acts as `--rdzv-conf join_timeout=S` (the `train` command has no option for it).
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

from scalora_dist.run.stopping import EXIT_REQUEUE

#: The files of launch/ and how they are rendered (see `example_files`).
EXAMPLE_NAMES = ("single_node.sbatch", "multi_node.sbatch", "torchrun_multi_host.sh")

DEFAULT_JOIN_TIMEOUT_S = 1800
DEFAULT_PORT_BASE = 20000
DEFAULT_SIGNAL_MARGIN_S = 300
"""With no save measured yet: 5 minutes for the step in progress, the save and the exit."""
MIN_WARNING_LEAD_S = 60
"""The time-limit warning must fall at least this long after the job starts."""


class SlurmError(ValueError):
    """Inconsistent `slurm` options; the message names the option."""


@dataclass
class SbatchOptions:
    """What goes into one job script. `config` None renders the generic script of launch/
    (CONFIG and overrides from the script's arguments)."""

    nodes: int = 1
    gpus_per_node: int = 1
    request_gpus: bool = True
    partition: str | None = None
    time: str | None = "24:00:00"
    account: str | None = None
    job_name: str = "scalora"
    cpus_per_task: int | None = None
    mem: str | None = None
    max_restarts: int = 3
    config: str | None = None
    overrides: list[str] = field(default_factory=list)
    output: str | None = None  # --output; default slurm-%j.out in the submit directory
    chdir: str | None = None
    python: str = "python3"
    join_timeout_s: int = DEFAULT_JOIN_TIMEOUT_S
    rdzv_port: int | None = None  # None: DEFAULT_PORT_BASE + (SLURM_JOB_ID + 997 * SLURM_RESTART_COUNT) % 10000
    requeue: bool = True
    signal_margin_s: int = DEFAULT_SIGNAL_MARGIN_S
    """SIGUSR1 this long before the time limit: the run checkpoints and the job requeues."""
    max_requeues: int = 3
    """Requeues in a row without a new checkpoint before the job gives up."""

    def validate(self) -> None:
        if self.nodes < 1:
            raise SlurmError(f"--nodes: must be >= 1, got {self.nodes}")
        if self.gpus_per_node < 1:
            raise SlurmError(f"--gpus-per-node: must be >= 1, got {self.gpus_per_node}")
        if self.max_restarts < 0:
            raise SlurmError(f"--max-restarts: must be >= 0, got {self.max_restarts}")
        if self.cpus_per_task is not None and self.cpus_per_task < 1:
            raise SlurmError(f"--cpus-per-task: must be >= 1, got {self.cpus_per_task}")
        if self.time is not None and not re.fullmatch(
            r"\d+|\d+:\d{1,2}|\d+:\d{1,2}:\d{1,2}|\d+-\d{1,2}(:\d{1,2}(:\d{1,2})?)?", self.time
        ):
            raise SlurmError(f"--time: expected MINUTES, HH:MM:SS, D-HH or D-HH:MM:SS, got {self.time!r}")
        if self.mem is not None and not re.fullmatch(r"\d+[KMGT]?", self.mem):
            raise SlurmError(f"--mem: expected a size like 64G or 500M, got {self.mem!r}")
        if self.join_timeout_s < 1:
            raise SlurmError(f"join timeout: must be >= 1 s, got {self.join_timeout_s}")
        if self.signal_margin_s < 1:
            raise SlurmError(f"--signal-margin: must be >= 1 s, got {self.signal_margin_s}")
        limit = time_limit_seconds(self.time)
        if self.requeue and limit is not None and self.signal_margin_s >= limit:
            raise SlurmError(
                f"--signal-margin: {self.signal_margin_s} s is not shorter than the time limit --time "
                f"{self.time} ({limit} s): the job would be told to stop as soon as it starts"
            )
        if self.requeue and limit is not None and limit - self.signal_margin_s < MIN_WARNING_LEAD_S:
            # --signal signals the job's steps only: a warning sent while the batch script is
            # still starting (SLURM may send it up to a minute early) reaches no process.
            raise SlurmError(
                f"--signal-margin: {self.signal_margin_s} s leaves {limit - self.signal_margin_s} s of the time "
                f"limit --time {self.time} before the warning; SLURM may send it up to {MIN_WARNING_LEAD_S} s "
                "early, before the training has started, and then it is lost. Use a smaller margin, a "
                "longer --time, or --no-requeue"
            )
        if self.max_requeues < 1:
            raise SlurmError(f"--max-requeues: must be >= 1, got {self.max_requeues}")
        if self.rdzv_port is not None and not 0 < self.rdzv_port < 65536:
            raise SlurmError(f"--rdzv-port: must be in 1..65535, got {self.rdzv_port}")
        for name in ("partition", "account", "job_name", "output", "chdir"):
            value = getattr(self, name)
            if value is not None and (not str(value).strip() or re.search(r"[\s'\"$`\\]", str(value))):
                option = "--" + name.replace("_", "-")
                raise SlurmError(
                    f"{option}: {value!r} cannot go on an #SBATCH line (empty, or has spaces, quotes, $ or backslashes)"
                )


# ---------------------------------------------------------------------------------------
# Template. {placeholders} are filled by `render_sbatch`; $VARIABLES are the shell's.

# Downloads a hub model (if model.path is an id) into the Hugging Face cache and tokenises
# the run's data once into the datasets cache (both script kinds run it first).
PRETOKENIZE_PY = """\
import sys
from scalora_dist.config import load_config
from scalora_dist.data import load_split
from scalora_dist.model.hub import resolve_model_dir
from scalora_dist.model.loading import load_tokenizer
cfg = load_config(sys.argv[1], sys.argv[2:])
model_dir = resolve_model_dir(cfg.model)
print(f"model: {model_dir}", flush=True)
tokenizer = load_tokenizer(model_dir)
for name, files in (("train", cfg.data.train_files), ("eval", cfg.data.eval_files)):
    if files:
        print(f"pre-tokenised {name}: {len(load_split(cfg.data, tokenizer, files))} examples", flush=True)
"""

SBATCH_TEMPLATE = """\
#!/bin/bash
{header}
{sbatch_lines}
#
# One srun task per node; each runs one torchrun launcher (`scalora-dist train ... --nnodes`)
# that starts {nproc_desc} worker processes. Rendezvous: c10d on the first node of the
# allocation, id = $SLURM_JOB_ID. A failed worker makes torchrun restart all workers
# (--max-restarts), a requeued job (--requeue) starts again; both resume from the newest
# complete checkpoint in output.dir/checkpoints (--resume auto), so set train.save_every.
set -euo pipefail

{config_block}
# The interpreter that has scalora_dist installed (override: PYTHON=... sbatch ...).
PYTHON=${{PYTHON:-{python}}}
NPROC_PER_NODE=${{NPROC_PER_NODE:-{nproc}}}
MAX_RESTARTS={max_restarts}
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
# A port per job and start, so two jobs sharing a node do not collide, nor a requeued job with
# what its previous start left behind; override with RDZV_PORT=....
RDZV_PORT=${{RDZV_PORT:-{rdzv_port}}}
# torchrun reads options it is not given from PET_<OPTION>: this is --rdzv-conf. A long
# join timeout lets slow nodes (image pulls, busy file systems) join; a misconfigured
# rendezvous (e.g. every node on its own localhost) fails after it with a RendezvousTimeoutError.
export PET_RDZV_CONF=${{PET_RDZV_CONF:-join_timeout={join_timeout}}}
# Workers get a fresh TCPStore per attempt instead of sharing the agent's: with the shared
# store, workers restarted by --max-restarts can read the previous attempt's addresses
# ("Gloo connectFullMesh failed ... Connection refused", seen with torch 2.13).
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=${{TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}}
export OMP_NUM_THREADS=${{OMP_NUM_THREADS:-1}}
export PYTHONUNBUFFERED=1

# --- network settings (opt-in; uncomment what your cluster needs) ---------------------
# export NCCL_SOCKET_IFNAME=ib0        # interface NCCL uses for bootstrap/sockets (e.g. ib0, eth0, ^lo,docker)
# export GLOO_SOCKET_IFNAME=eth0       # interface gloo uses (CPU jobs, and torch's own collectives)
# export NCCL_IB_DISABLE=1             # no InfiniBand: force TCP sockets
# export NCCL_DEBUG=INFO               # log NCCL's choice of transports/interfaces (WARN is quieter)
# export TORCH_NCCL_ASYNC_ERROR_HANDLING=1   # turn NCCL hangs into errors (default in recent torch)

echo "job $SLURM_JOB_ID (restart count ${{SLURM_RESTART_COUNT:-0}}): nodes $SLURM_JOB_NODELIST, $SLURM_NNODES x $NPROC_PER_NODE processes, rendezvous $MASTER_ADDR:$RDZV_PORT"
if [ "$SLURM_NNODES" -gt 1 ]; then
  case "$MASTER_ADDR" in
    localhost|127.*|::1|ip6-localhost)
      echo "error: rendezvous host '$MASTER_ADDR' is a loopback address, but the job spans $SLURM_NNODES nodes" >&2
      exit 2;;
  esac
fi

# --- 1. pre-tokenise once (one process, this node) ------------------------------------
# The datasets cache (HF_DATASETS_CACHE, default ~/.cache/huggingface/datasets) must be on
# storage that all nodes share, or every node tokenises again.
# export HF_DATASETS_CACHE=/shared/cache/datasets
"$PYTHON" - "$CONFIG" "${{OVERRIDES[@]}}" <<'PRETOKENIZE'
{pretokenize}PRETOKENIZE

# --- 2. one torchrun launcher per node --------------------------------------------------
# Time limit, preemption, `scancel --signal=USR1`, `scontrol requeue`: SLURM signals the
# job's processes (SIGUSR1 {signal_margin} s before the limit; SIGTERM, then SIGKILL after
# KillWait, otherwise); every rank finishes its step, one checkpoint is written and the
# launchers exit with {exit_requeue}. This shell then requeues the job, which resumes from that
# checkpoint. A requeued job that has started {max_requeues} times in a row without a newer
# checkpoint (killed before it could save) does not train again.
"$PYTHON" -m scalora_dist.launch.requeue start "$CONFIG" "${{OVERRIDES[@]}}" --max-attempts {max_requeues}
trap 'echo "batch script: $(date +%T) SIGTERM; the training checkpoints and stops"' TERM
set +e
srun --nodes="$SLURM_NNODES" --ntasks-per-node=1 --kill-on-bad-exit=1 ${{SLURM_CPUS_PER_TASK:+--cpus-per-task=$SLURM_CPUS_PER_TASK}} \\
  "$PYTHON" -m scalora_dist.cli train "$CONFIG" "${{OVERRIDES[@]}}" --quiet \\
    --nnodes "$SLURM_NNODES" --nproc-per-node "$NPROC_PER_NODE" \\
    --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$RDZV_PORT" --rdzv-id "$SLURM_JOB_ID" \\
    --max-restarts "$MAX_RESTARTS" --resume auto
rc=$?
set -e
if [ "$rc" -ne 0 ]; then
  # Exit code {exit_requeue} on one node, killed by srun on the others (--kill-on-bad-exit): the
  # run's STOPPED marker says whether it stopped after a checkpoint; then requeue.
  if "$PYTHON" -m scalora_dist.launch.requeue stopped "$CONFIG" "${{OVERRIDES[@]}}"; then
    exit 0
  fi
fi
exit "$rc"
"""

MULTI_HOST_TEMPLATE = """\
#!/bin/bash
# Hand-launched multi-host run (no scheduler): start this script on EVERY host, with the
# same arguments:
#   NNODES=2 MASTER_ADDR=host0 NPROC_PER_NODE=8 launch/torchrun_multi_host.sh CONFIG.yaml [key=value ...]
# MASTER_ADDR is a name or address of the first host that every host can reach (never
# localhost). RDZV_ID must be the same on all hosts and new for each run (default: derived
# from the command line). Pre-tokenise once before starting the hosts (shared cache):
#   PRETOKENIZE_ONLY=1 launch/torchrun_multi_host.sh CONFIG.yaml [key=value ...]
# Generated by `python -m scalora_dist.launch.slurm --write-examples launch/`; edit the template there.
set -euo pipefail

CONFIG=${{1:?usage: NNODES=N MASTER_ADDR=HOST launch/torchrun_multi_host.sh CONFIG.yaml [key=value ...]}}
shift
OVERRIDES=("$@")
PYTHON=${{PYTHON:-python3}}
NNODES=${{NNODES:?set NNODES (number of hosts)}}
NPROC_PER_NODE=${{NPROC_PER_NODE:-1}}
MAX_RESTARTS=${{MAX_RESTARTS:-{max_restarts}}}
RDZV_PORT=${{RDZV_PORT:-29500}}
export PET_RDZV_CONF=${{PET_RDZV_CONF:-join_timeout={join_timeout}}}
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=${{TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}}  # see the sbatch scripts
export OMP_NUM_THREADS=${{OMP_NUM_THREADS:-1}}
# export NCCL_SOCKET_IFNAME=eth0 GLOO_SOCKET_IFNAME=eth0 NCCL_IB_DISABLE=1 NCCL_DEBUG=INFO

if [ "${{PRETOKENIZE_ONLY:-0}}" = 1 ]; then
  exec "$PYTHON" - "$CONFIG" "${{OVERRIDES[@]}}" <<'PRETOKENIZE'
{pretokenize}PRETOKENIZE
fi
MASTER_ADDR=${{MASTER_ADDR:?set MASTER_ADDR (first host, reachable from all hosts)}}
exec "$PYTHON" -m scalora_dist.cli train "$CONFIG" "${{OVERRIDES[@]}}" --quiet \\
  --nnodes "$NNODES" --nproc-per-node "$NPROC_PER_NODE" \\
  --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$RDZV_PORT" ${{RDZV_ID:+--rdzv-id "$RDZV_ID"}} \\
  --max-restarts "$MAX_RESTARTS" --resume auto
"""


def time_limit_seconds(spec: str | None) -> int | None:
    """SLURM's --time (MINUTES, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS) in seconds."""
    if spec is None:
        return None
    days, _, rest = spec.rpartition("-") if "-" in spec else ("", "", spec)
    parts = [int(p) for p in rest.split(":")]
    if days:
        hours, minutes, seconds = (parts + [0, 0])[:3]
    elif len(parts) == 1:
        hours, minutes, seconds = 0, parts[0], 0
    elif len(parts) == 2:
        hours, minutes, seconds = 0, parts[0], parts[1]
    else:
        hours, minutes, seconds = parts
    return ((int(days or 0) * 24 + hours) * 60 + minutes) * 60 + seconds


def _sbatch_lines(o: SbatchOptions) -> list[str]:
    lines = [f"#SBATCH --job-name={o.job_name}", f"#SBATCH --nodes={o.nodes}", "#SBATCH --ntasks-per-node=1"]
    if o.request_gpus:
        lines.append(f"#SBATCH --gpus-per-node={o.gpus_per_node}")
    optional = (
        ("cpus-per-task", o.cpus_per_task),
        ("mem", o.mem),
        ("time", o.time),
        ("partition", o.partition),
        ("account", o.account),
        ("chdir", o.chdir),
    )
    lines += [f"#SBATCH --{flag}={value}" for flag, value in optional if value is not None]
    lines.append(f"#SBATCH --output={o.output or 'slurm-%x-%j.out'}")
    if o.requeue:
        lines += ["#SBATCH --requeue", "#SBATCH --open-mode=append"]  # a requeued job appends to its log
        if o.time is not None:  # a warning before the time limit: checkpoint, then requeue
            lines.append(f"#SBATCH --signal=USR1@{o.signal_margin_s}")
    return lines


def render_sbatch(o: SbatchOptions, header: str | None = None) -> str:
    """The job script for `o` (SlurmError when an option is invalid)."""
    o.validate()
    if o.config is None:
        config_block = (
            "CONFIG=${1:?usage: sbatch " + (header or "SCRIPT") + " CONFIG.yaml [key=value ...]}\n"
            "shift\n"
            'OVERRIDES=("$@")               # key.path=value overrides from the sbatch command line'
        )
        header_text = (
            f"# Usage: sbatch {header} CONFIG.yaml [key=value ...]   (from the project directory)\n"
            "# Edit the #SBATCH lines (partition, account, time, gpus) for your cluster, or generate\n"
            "# a script for one run: scalora-dist slurm CONFIG.yaml --nodes N --gpus-per-node G ...\n"
            "# Generated by `python -m scalora_dist.launch.slurm --write-examples launch/`; edit the template there."
        )
    else:
        config_block = (
            f"CONFIG={shlex.quote(o.config)}\n"
            f"OVERRIDES=({' '.join(shlex.quote(x) for x in o.overrides)}" + (" " if o.overrides else "") + '"$@")'
        )
        header_text = (
            "# Generated by `scalora-dist slurm` for this run; submit with: sbatch THIS_FILE\n"
            "# (extra key=value overrides after the file name are appended)."
        )
    return SBATCH_TEMPLATE.format(
        header=header_text,
        sbatch_lines="\n".join(_sbatch_lines(o)),
        nproc_desc=str(o.gpus_per_node),
        config_block=config_block,
        python=shlex.quote(o.python),
        nproc=o.gpus_per_node,
        max_restarts=o.max_restarts,
        rdzv_port=str(o.rdzv_port)
        if o.rdzv_port
        else f"$(({DEFAULT_PORT_BASE} + (SLURM_JOB_ID + 997 * ${{SLURM_RESTART_COUNT:-0}}) % 10000))",
        join_timeout=o.join_timeout_s,
        pretokenize=PRETOKENIZE_PY,
        signal_margin=o.signal_margin_s,
        max_requeues=o.max_requeues,
        exit_requeue=EXIT_REQUEUE,
    )


def example_files() -> dict[str, str]:
    """File name -> content of the scripts in launch/."""
    single = SbatchOptions(nodes=1, gpus_per_node=8, time="24:00:00", job_name="scalora")
    multi = SbatchOptions(nodes=2, gpus_per_node=8, time="24:00:00", job_name="scalora")
    return {
        "single_node.sbatch": render_sbatch(single, header="launch/single_node.sbatch"),
        "multi_node.sbatch": render_sbatch(multi, header="launch/multi_node.sbatch"),
        "torchrun_multi_host.sh": MULTI_HOST_TEMPLATE.format(
            max_restarts=3, join_timeout=DEFAULT_JOIN_TIMEOUT_S, pretokenize=PRETOKENIZE_PY
        ),
    }


def write_examples(directory: str | Path) -> list[Path]:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in example_files().items():
        path = directory / name
        path.write_text(text)
        path.chmod(0o755)
        written.append(path)
    return written


def parse_job_id(sbatch_stdout: str) -> str | None:
    """The job id from sbatch's output ("Submitted batch job 123" or --parsable "123[;cluster]")."""
    m = re.search(r"Submitted batch job (\d+)", sbatch_stdout) or re.match(r"\s*(\d+)", sbatch_stdout)
    return m.group(1) if m else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write-examples", metavar="DIR", help="(re)write the scripts of launch/ into DIR")
    parser.add_argument("--check", metavar="DIR", help="exit 1 if DIR's scripts differ from the template")
    args = parser.parse_args(argv)
    if args.write_examples:
        for path in write_examples(args.write_examples):
            print(f"wrote {path}")
    if args.check:
        stale = [
            n
            for n, t in example_files().items()
            if not (Path(args.check) / n).is_file() or (Path(args.check) / n).read_text() != t
        ]
        if stale:
            print(
                f"out of date: {', '.join(stale)}; "
                f"run python -m scalora_dist.launch.slurm --write-examples {args.check}"
            )
            return 1
    if not (args.write_examples or args.check):
        parser.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())


def default_signal_margin(run_dir: Path, time_limit: str | None) -> int:
    """measured_signal_margin, but at most half the time limit and at least MIN_WARNING_LEAD_S
    before it (the warning must leave the job time to start and work)."""
    limit = time_limit_seconds(time_limit)
    margin = measured_signal_margin(run_dir)
    return max(1, min(margin, limit // 2, limit - MIN_WARNING_LEAD_S)) if limit else margin


def measured_signal_margin(run_dir: Path) -> int:
    """3 x (the slowest step + the slowest checkpoint save) recorded in run_dir, plus 60 s of
    slack for the exit; 300 s when nothing has been measured there yet."""
    saves = []
    for marker in (run_dir / "checkpoints").glob("step-*/COMPLETE"):
        try:
            saves.append(float(json.loads(marker.read_text()).get("save_seconds", 0)))
        except (OSError, ValueError):
            pass
    steps = []
    if (run_dir / "metrics.jsonl").is_file():
        for line in (run_dir / "metrics.jsonl").read_text().splitlines():
            try:
                steps.append(float(json.loads(line).get("step_time_s", 0)))
            except ValueError:
                pass
    if not saves or not steps:
        return DEFAULT_SIGNAL_MARGIN_S
    return int(3 * (max(saves) + max(steps)) + 60)
