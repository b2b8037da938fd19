"""A throwaway SLURM cluster on this machine, for tests (tests/test_slurm.py).

Variant "netns" (preferred): one slurmctld and two slurmd "nodes" n1/n2, each in its own
network namespace (10.200.0.1 / .11 / .12 on a bridge inside the controller's namespace),
with a private /etc/hosts and hostname (mount + UTS namespaces), so a job that rendezvouses
on localhost really fails. Variant "local": the same daemons on 127.0.0.1 (ports 17001/2),
used when namespaces cannot be made; it cannot catch wrong-host bugs.

    cluster = SlurmCluster(workdir)
    cluster.start()           # SlurmUnavailable (a skip reason) when it cannot run here
    try:
        job = cluster.sbatch(script, env=...)
        state = cluster.wait(job, timeout=120)
    finally:
        cluster.stop()        # kills only the pids it started, deletes only its namespaces

Everything needs root. Clients (sbatch, squeue, scontrol) run inside the controller's
namespace in the netns variant (`cluster.client_cmd`).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

SLURM_BINARIES = ("slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "srun", "munge", "munged")
FINAL_STATES = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "PREEMPTED",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
}


class SlurmUnavailable(RuntimeError):
    """The cluster cannot run on this machine; the message is the skip reason."""


def _run(cmd, check=True, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def unavailable_reason() -> str | None:
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "needs root (slurmd runs jobs as the submitting user; namespaces need CAP_SYS_ADMIN)"
    missing = [b for b in SLURM_BINARIES if shutil.which(b) is None and not Path(f"/usr/sbin/{b}").exists()]
    if missing:
        return (
            f"SLURM/munge binaries missing ({', '.join(missing)}); install slurm-wlm slurmctld "
            "slurmd slurm-client munge (.ci/run does as root)"
        )
    for tool in ("unshare", "nsenter", "ip"):
        if shutil.which(tool) is None:
            return f"{tool} not found (util-linux / iproute2)"
    return None


class SlurmCluster:
    def __init__(self, workdir: Path, variant: str = "auto", tag: str | None = None):
        self.dir = Path(workdir)
        self.variant = variant
        tag = tag or f"{os.getpid() % 100000}"
        self.ns_ctl = f"scl{tag}c"
        self.ns_nodes = [f"scl{tag}n1", f"scl{tag}n2"]
        self.conf = self.dir / "slurm.conf"
        self.made_ns: list[str] = []
        self.started_munged_pid: int | None = None
        self.started = False

    # -- start ---------------------------------------------------------------------------
    def start(self, timeout: float = 60.0) -> None:
        reason = unavailable_reason()
        if reason:
            raise SlurmUnavailable(reason)
        for sub in ("state", "spool/n1", "spool/n2", "log", "run"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        self._start_munge()
        variant = self.variant
        if variant in ("auto", "netns"):
            try:
                self._make_namespaces()
                variant = "netns"
            except Exception as e:  # noqa: BLE001
                self._delete_namespaces()
                if self.variant == "netns":
                    raise SlurmUnavailable(f"cannot make network namespaces: {e}") from None
                variant = "local"
        self.variant = variant
        self._write_conf()
        self.started = True
        if variant == "netns":
            self._ns_daemon(self.ns_ctl, "spctl", f"slurmctld -c -f {self.conf}")
            for i, ns in enumerate(self.ns_nodes, 1):
                self._ns_daemon(ns, f"n{i}", f"slurmd -N n{i} -f {self.conf}")
        else:
            _run(["slurmctld", "-c", "-f", str(self.conf)], env=self._env())
            hosts = self.dir / "hosts"
            _run(
                [
                    "unshare",
                    "--mount",
                    "--propagation",
                    "private",
                    "sh",
                    "-c",
                    f"mount --bind {hosts} /etc/hosts && slurmd -N n1 -f {self.conf} && slurmd -N n2 -f {self.conf}",
                ],
                env=self._env(),
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            proc = self.client(["sinfo", "-h", "-o", "%T"], check=False)
            states = set(proc.stdout.split())
            if proc.returncode == 0 and states == {"idle"}:
                return
            time.sleep(0.2)
        raise RuntimeError(
            f"SLURM nodes not idle after {timeout} s: {self.client(['sinfo', '-N'], check=False).stdout}\n{self.logs()}"
        )

    def _env(self, extra: dict | None = None) -> dict:
        return {**os.environ, "SLURM_CONF": str(self.conf), **(extra or {})}

    def _start_munge(self) -> None:
        if _run(["munge", "-n"], check=False).returncode == 0:
            return  # someone else's munged serves us; leave it alone
        Path("/run/munge").mkdir(exist_ok=True)
        shutil.chown("/run/munge", "munge", "munge")
        _run(["runuser", "-u", "munge", "--", "/usr/sbin/munged"])
        for _ in range(100):
            if _run(["munge", "-n"], check=False).returncode == 0:
                break
            time.sleep(0.1)
        else:
            raise SlurmUnavailable("munged started but `munge -n` fails")
        pidfile = Path("/run/munge/munged.pid")
        if pidfile.is_file():
            self.started_munged_pid = int(pidfile.read_text().split()[0])

    def _make_namespaces(self) -> None:
        ctl = self.ns_ctl
        for ns in [ctl, *self.ns_nodes]:
            if Path(f"/run/netns/{ns}").exists():
                raise RuntimeError(f"namespace {ns} exists already")
        _run(["ip", "netns", "add", ctl])
        self.made_ns.append(ctl)
        _run(["ip", "-n", ctl, "link", "set", "lo", "up"])
        _run(["ip", "-n", ctl, "link", "add", "br0", "type", "bridge"])
        _run(["ip", "-n", ctl, "addr", "add", "10.200.0.1/24", "dev", "br0"])
        _run(["ip", "-n", ctl, "link", "set", "br0", "up"])
        for i, ns in enumerate(self.ns_nodes, 1):
            _run(["ip", "netns", "add", ns])
            self.made_ns.append(ns)
            _run(["ip", "-n", ns, "link", "set", "lo", "up"])
            _run(["ip", "link", "add", f"v{i}", "netns", ctl, "type", "veth", "peer", "name", "eth0", "netns", ns])
            _run(["ip", "-n", ctl, "link", "set", f"v{i}", "master", "br0"])
            _run(["ip", "-n", ctl, "link", "set", f"v{i}", "up"])
            _run(["ip", "-n", ns, "addr", "add", f"10.200.0.1{i}/24", "dev", "eth0"])
            _run(["ip", "-n", ns, "link", "set", "eth0", "up"])

    def _ns_daemon(self, ns: str, hostname: str, command: str) -> None:
        hosts = self.dir / "hosts"
        _run(
            [
                "nsenter",
                f"--net=/run/netns/{ns}",
                "unshare",
                "--uts",
                "--mount",
                "--propagation",
                "private",
                "sh",
                "-c",
                f"hostname {hostname} && mount --bind {hosts} /etc/hosts && {command}",
            ],
            env=self._env(),
        )

    def _write_conf(self) -> None:
        d = self.dir
        host = socket.gethostname().split(".")[0]
        if self.variant == "netns":
            ctl = "SlurmctldHost=spctl(10.200.0.1)"
            nodes = (
                "NodeName=n1 NodeHostname=n1 NodeAddr=10.200.0.11 CPUs=2 RealMemory=2000 State=UNKNOWN\n"
                "NodeName=n2 NodeHostname=n2 NodeAddr=10.200.0.12 CPUs=2 RealMemory=2000 State=UNKNOWN"
            )
            extra_hosts = "10.200.0.1 spctl\n10.200.0.11 n1\n10.200.0.12 n2\n"
            ports = ""
        else:
            ctl = f"SlurmctldHost={host}(127.0.0.1)"
            nodes = (
                f"NodeName=n1 NodeHostname={host} NodeAddr=127.0.0.1 Port=17001 CPUs=2 RealMemory=2000 State=UNKNOWN\n"
                f"NodeName=n2 NodeHostname={host} NodeAddr=127.0.0.1 Port=17002 CPUs=2 RealMemory=2000 State=UNKNOWN"
            )
            extra_hosts = "127.0.0.1 n1 n2\n"
            ports = "SlurmctldPort=16817\n"
        (d / "hosts").write_text(Path("/etc/hosts").read_text().rstrip("\n") + "\n" + extra_hosts)
        self.conf.write_text(f"""\
ClusterName=sctest
MailProg=/bin/true
{ctl}
{ports}SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool/%n
SlurmctldPidFile={d}/run/slurmctld.pid
SlurmdPidFile={d}/run/slurmd-%n.pid
SlurmctldLogFile={d}/log/slurmctld.log
SlurmdLogFile={d}/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
InactiveLimit=0
MinJobAge=300
KillWait=30
MessageTimeout=20
{nodes}
PartitionName=debug Nodes=n[1-2] Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
""")

    # -- clients -------------------------------------------------------------------------
    _pending_since: dict[str, float] = {}

    def client_cmd(self, cmd: list[str]) -> list[str]:
        if self.variant == "netns":
            return ["nsenter", f"--net=/run/netns/{self.ns_ctl}", *cmd]
        return list(cmd)

    def client(self, cmd: list[str], check=True, env: dict | None = None, **kw) -> subprocess.CompletedProcess:
        return _run(self.client_cmd(cmd), check=check, env=self._env(env), **kw)

    def sbatch(self, script: Path, *args: str, env: dict | None = None, cwd: Path | None = None) -> str:
        proc = self.client(["sbatch", "--parsable", str(script), *args], env=env, cwd=cwd)
        return proc.stdout.strip().split(";")[0]

    def job_info(self, job: str) -> dict[str, str]:
        proc = self.client(["scontrol", "-o", "show", "job", job], check=False)
        info = {}
        for item in proc.stdout.split():
            k, sep, v = item.partition("=")
            if sep:
                info.setdefault(k, v)
        return info

    def state(self, job: str) -> str:
        return self.job_info(job).get("JobState", "UNKNOWN")

    def hurry_requeued(self, job: str, settle_s: float = 8.0) -> bool:
        """SLURM holds a requeued job until now + 2 minutes (Reason=BeginTime) before it may
        start again; let it start sooner (the delay is the scheduler's, not what is tested),
        but only `settle_s` after it was requeued: its previous start must be gone first
        (slurmd refuses to launch a job it is still killing). True when it did."""
        info = self.job_info(job)
        if info.get("JobState") == "PENDING" and info.get("Reason") == "BeginTime":
            first = self._pending_since.setdefault(job, time.monotonic())
            if time.monotonic() - first >= settle_s:
                self.client(["scontrol", "update", f"JobId={job}", "StartTime=now"], check=False)
                self._pending_since.pop(job, None)
                return True
        return False

    def wait(self, job: str, timeout: float, poll: float = 0.5) -> str:
        """The job's final state (requeued starts are not held back: hurry_requeued); on
        timeout the job is cancelled and TimeoutError raised."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.state(job)
            if state in FINAL_STATES:
                return state
            self.hurry_requeued(job)
            time.sleep(poll)
        self.client(["scancel", job], check=False)
        raise TimeoutError(f"job {job} still {self.state(job)} after {timeout} s (cancelled)")

    def logs(self) -> str:
        out = []
        for f in sorted((self.dir / "log").glob("*.log")):
            out.append(f"--- {f.name}\n" + "\n".join(f.read_text(errors="replace").splitlines()[-30:]))
        return "\n".join(out)

    # -- stop ----------------------------------------------------------------------------
    def stop(self) -> None:
        if self.started:
            # End jobs first (their processes are not children of slurmd).
            self.client(["scancel", "--full", "--user", "root"], check=False, timeout=30)
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                q = self.client(["squeue", "-h", "-o", "%i"], check=False, timeout=30)
                if q.returncode != 0 or not q.stdout.strip():
                    break
                time.sleep(0.5)
        pids = []
        for name in ("slurmd-n1.pid", "slurmd-n2.pid", "slurmctld.pid"):
            f = self.dir / "run" / name
            if f.is_file():
                try:
                    pids.append(int(f.read_text().split()[0]))
                except ValueError:
                    pass
        # Anything still running inside our namespaces was started by our cluster.
        for ns in self.made_ns:
            proc = _run(["ip", "netns", "pids", ns], check=False)
            pids += [int(p) for p in proc.stdout.split() if p.isdigit()]
        if self.started_munged_pid:
            pids.append(self.started_munged_pid)
        pids = sorted(set(pids) - {os.getpid()})
        for pid in pids:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(_alive(p) for p in pids):
            time.sleep(0.1)
        for pid in pids:
            if _alive(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        self._delete_namespaces()
        self.started = False
        self.started_munged_pid = None

    def _delete_namespaces(self) -> None:
        for ns in reversed(self.made_ns):
            _run(["ip", "netns", "del", ns], check=False)
        self.made_ns = []


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
