"""A real, throw-away Slurm cluster on this machine, for the Slurm tests.

One munged, one slurmctld and two slurmd (two *logical* nodes on this host, each with its own
port) run under a scratch folder, configured by ``slurm.conf.in`` next to this file. Nothing in
/etc or /run is touched: munged gets its own socket, key copy, pid and log files, and Slurm finds
it through ``AuthInfo=socket=...``. Two nodes because a heterogeneous job stays pending on one.

Every process started here is stopped by its PID (from the pid files the daemons write), never by
name. The daemons carry the marker variable ``GHMPI_SLURM_FIXTURE=<folder>`` in their environment;
job step daemons (slurmstepd) inherit it, so a stray one left behind by a killed job is found and
stopped by PID too.

Usable without pytest, for debugging::

    python tests/slurm/slurm_cluster.py /tmp/slurm-dev        # starts, prints `export SLURM_CONF=...`
    python tests/slurm/slurm_cluster.py /tmp/slurm-dev --stop
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
CONF_TEMPLATE = HERE / "slurm.conf.in"
INSTALL_SCRIPT = HERE / "install_slurm.sh"
MARKER = "GHMPI_SLURM_FIXTURE"
NODES = ("ghn1", "ghn2")  # logical node names; `slurmd -N NAME` must match the conf
BINARIES = ("munged", "munge", "slurmctld", "slurmd", "sbatch", "srun", "sinfo", "squeue", "scancel")
SBIN_DIRS = ("/usr/sbin", "/usr/local/sbin", "/sbin")


class SlurmUnavailable(RuntimeError):
    """Slurm cannot be run here (not installed, not root, a daemon would not start)."""


def which(name: str) -> str | None:
    """Find a binary on PATH or in the sbin folders (often not on a non-root PATH)."""
    path = os.pathsep.join([os.environ.get("PATH", ""), *SBIN_DIRS])
    return shutil.which(name, path=path)


def missing_binaries() -> list[str]:
    return [b for b in BINARIES if which(b) is None]


def pmix_plugin_loadable() -> bool:
    """Slurm's mpi/pmix plugin dlopens libpmix.so (Debian: libpmix-dev / libpmix2)."""
    for d in ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib"):
        if Path(d, "libpmix.so").exists() or Path(d, "pmix2/lib/libpmix.so").exists():
            return True
    return False


def try_install(timeout_s: float = 300.0) -> str:
    """Best effort: run install_slurm.sh (apt-get). Returns its output tail for skip messages."""
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return "not root or no apt-get: cannot install Slurm"
    try:
        p = subprocess.run(["bash", str(INSTALL_SCRIPT)], capture_output=True, text=True,
                           timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return f"{INSTALL_SCRIPT.name} timed out after {timeout_s:.0f} s"
    return (p.stdout + p.stderr)[-500:]


def free_ports(n: int) -> list[int]:
    """n distinct ports free right now (bound then released; a small race we accept in tests)."""
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie is dead for our purposes
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _stop_pid(pid: int, grace_s: float = 10.0) -> None:
    """SIGTERM, wait, SIGTERM again, then SIGKILL: one process, by PID."""
    deadline = time.monotonic() + grace_s
    sent_second = False
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    while _pid_alive(pid):
        if time.monotonic() > deadline:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                return
            time.sleep(0.2)
            return
        if not sent_second and time.monotonic() > deadline - grace_s / 2:
            sent_second = True  # slurmd sometimes ignores the first SIGTERM while a step ends
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                return
        time.sleep(0.1)


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _marked_pids(marker_value: str) -> list[int]:
    """PIDs whose environment holds GHMPI_SLURM_FIXTURE=<marker_value> (our daemons' offspring)."""
    needle = f"{MARKER}={marker_value}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                env = f.read()
        except OSError:
            continue
        if needle in env.split(b"\0"):
            found.append(int(entry))
    return found


@dataclass
class SlurmCluster:
    """A running test cluster. ``env`` is the environment for sbatch/srun/squeue calls."""

    root: Path
    host: str = field(default_factory=socket.gethostname)
    nodes: tuple[str, ...] = NODES
    cpus_per_node: int = 16  # advertised (config_overrides), so 9 tasks fit on a 2-core box

    @property
    def conf(self) -> Path:
        return self.root / "slurm.conf"

    @property
    def munge_socket(self) -> Path:
        return self.root / "munge" / "munge.socket"

    @property
    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["SLURM_CONF"] = str(self.conf)
        env["PATH"] = os.pathsep.join([env.get("PATH", ""), *SBIN_DIRS])
        # keep the submitter's own Slurm job variables (if pytest runs inside a job) out
        for k in [k for k in env if k.startswith(("SLURM_", "SBATCH_", "SRUN_")) and k != "SLURM_CONF"]:
            del env[k]
        return env

    def _daemon_env(self) -> dict[str, str]:
        env = self.env
        env[MARKER] = str(self.root)
        return env

    # ----------------------------------------------------------------------------------- start
    def start(self, timeout_s: float = 60.0) -> "SlurmCluster":
        if os.geteuid() != 0:
            raise SlurmUnavailable("the test cluster runs slurmd as root; not root here")
        missing = missing_binaries()
        if missing:
            raise SlurmUnavailable(f"Slurm binaries missing: {', '.join(missing)}")
        if not pmix_plugin_loadable():
            raise SlurmUnavailable("libpmix.so not found (apt-get install libpmix-dev): "
                                   "srun --mpi=pmix cannot work")
        self.root.mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o755)  # munged checks that every folder above its socket is searchable
        for d in ("state", "log", *(f"spool/{n}" for n in self.nodes), *(f"tmp/{n}" for n in self.nodes)):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        try:
            self._start_munge()
            self._write_conf()
            env = self._daemon_env()
            subprocess.run([which("slurmctld")], env=env, check=True, capture_output=True, timeout=30)
            for n in self.nodes:
                subprocess.run([which("slurmd"), "-N", n], env=env, check=True,
                               capture_output=True, timeout=30)
            self._wait_idle(timeout_s)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired, SlurmUnavailable) as e:
            detail = getattr(e, "stderr", b"") or b""
            if isinstance(detail, bytes):
                detail = detail.decode(errors="replace")
            logs = self.log_tail()
            self.stop()
            raise SlurmUnavailable(f"test Slurm did not start: {e} {detail}\n{logs}") from e
        return self

    def _start_munge(self) -> None:
        mdir = self.root / "munge"
        mdir.mkdir(exist_ok=True)
        shutil.chown(mdir, "munge", "munge")
        mdir.chmod(0o755)
        key = mdir / "munge.key"
        if not key.exists():
            system_key = Path("/etc/munge/munge.key")
            if system_key.exists():
                shutil.copyfile(system_key, key)
            else:
                key.write_bytes(os.urandom(128))
        shutil.chown(key, "munge", "munge")
        key.chmod(0o600)
        cmd = ["runuser", "-u", "munge", "--", which("munged"), f"--socket={self.munge_socket}",
               f"--key-file={key}", f"--pid-file={mdir / 'munged.pid'}",
               f"--log-file={mdir / 'munged.log'}", f"--seed-file={mdir / 'munged.seed'}"]
        subprocess.run(cmd, env=self._daemon_env(), check=True, capture_output=True, timeout=30)
        cred = subprocess.run([which("munge"), "-S", str(self.munge_socket), "-n"],
                              capture_output=True, check=True, timeout=10).stdout
        subprocess.run([which("unmunge"), "-S", str(self.munge_socket)], input=cred,
                       capture_output=True, check=True, timeout=10)

    def _write_conf(self) -> None:
        ctld_port, *node_ports = free_ports(1 + len(self.nodes))
        node_lines = "\n".join(
            f"NodeName={n} NodeHostname={self.host} NodeAddr=127.0.0.1 Port={p} "
            f"CPUs={self.cpus_per_node} RealMemory=4000 State=UNKNOWN"
            for n, p in zip(self.nodes, node_ports))
        text = (CONF_TEMPLATE.read_text()
                .replace("@HOST@", self.host).replace("@DIR@", str(self.root))
                .replace("@CTLD_PORT@", str(ctld_port)).replace("@MUNGE_SOCKET@", str(self.munge_socket))
                .replace("@NODES@", node_lines))
        self.conf.write_text(text)

    def _wait_idle(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        states = ""
        while time.monotonic() < deadline:
            p = subprocess.run([which("sinfo"), "-h", "-N", "-o", "%N %t"], env=self.env,
                               capture_output=True, text=True, timeout=30)
            states = p.stdout.strip()
            lines = [ln.split() for ln in states.splitlines() if ln.strip()]
            if p.returncode == 0 and len(lines) == len(self.nodes) and all(s == "idle" for _, s in lines):
                return
            time.sleep(0.5)
        raise SlurmUnavailable(f"nodes not idle after {timeout_s:.0f} s: {states!r}")

    # ------------------------------------------------------------------------------------ stop
    def cancel_all(self, timeout_s: float = 30.0) -> None:
        """Cancel every job and wait until the queue is empty."""
        if not self.conf.exists():
            return
        subprocess.run([which("scancel") or "scancel", "--full", "--user", "root"], env=self.env,
                       capture_output=True, timeout=30)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            p = subprocess.run([which("squeue") or "squeue", "-h", "-o", "%i"], env=self.env,
                               capture_output=True, text=True, timeout=30)
            if p.returncode != 0 or not p.stdout.strip():
                return
            time.sleep(0.5)

    def stop(self) -> None:
        """Stop every process this cluster started, by PID: jobs, slurmd, slurmctld, munged."""
        try:
            self.cancel_all()
        except (OSError, subprocess.SubprocessError):
            pass
        pid_files = [self.root / f"slurmd-{n}.pid" for n in self.nodes]
        pid_files += [self.root / "slurmctld.pid", self.root / "munge" / "munged.pid"]
        for pf in pid_files:
            pid = _read_pid(pf)
            if pid is not None and _pid_alive(pid) and self._is_ours(pid):
                _stop_pid(pid)
        for pid in _marked_pids(str(self.root)):  # stray slurmstepd / slurmscriptd
            _stop_pid(pid, grace_s=3.0)

    def _is_ours(self, pid: int) -> bool:
        """A pid file may be stale; only stop a process that carries our marker."""
        return pid in _marked_pids(str(self.root)) or self._cmdline_mentions_root(pid)

    def _cmdline_mentions_root(self, pid: int) -> bool:
        try:
            return str(self.root).encode() in Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return False

    def log_tail(self, n_chars: int = 3000) -> str:
        out = []
        for f in sorted((self.root / "log").glob("*.log")) + [self.root / "munge" / "munged.log"]:
            if f.exists():
                out.append(f"--- {f.name}\n{f.read_text(errors='replace')[-n_chars:]}")
        return "\n".join(out)


class SlurmClient:
    """Thin helpers over the Slurm client commands, bound to one test cluster."""

    def __init__(self, cluster: SlurmCluster):
        self.cluster = cluster
        self.env = cluster.env
        # the scripts use this interpreter (its venv has ghmpi's dependencies)
        self.env["GHMPI_PYTHON"] = sys.executable

    def run(self, args: Sequence[str], timeout: float = 120, env: dict[str, str] | None = None,
            cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
        exe = which(args[0]) or args[0]
        return subprocess.run([exe, *args[1:]], env={**self.env, **(env or {})}, cwd=cwd or REPO,
                              capture_output=True, text=True, timeout=timeout)

    def sbatch_wait(self, args: Sequence[str], timeout: float = 240,
                    env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """Literally `sbatch --wait ...`: returns with the job's exit status. Slurm 22.05's sbatch
        polls at 2, 4, 8, .. 32 s, so it can return up to ~30 s after the job ended: use it for
        short jobs, and submit_and_wait for long ones."""
        try:
            return self.run(["sbatch", "--wait", *args], timeout=timeout, env=env)
        except subprocess.TimeoutExpired:
            self.cluster.cancel_all()
            raise

    def submit_and_wait(self, args: Sequence[str], timeout: float = 240,
                        env: dict[str, str] | None = None) -> int:
        """sbatch, then poll the job every 0.3 s; returns the batch script's exit status."""
        job_id = self.submit(args, env=env)
        try:
            state = self.wait_ended(job_id, timeout=timeout)
        except AssertionError:
            self.run(["scancel", job_id], timeout=30)
            raise
        rc, _, sig = (self.job_field(job_id, "ExitCode") or "").partition(":")
        assert rc.isdigit(), f"job {job_id} ended {state} without an exit code"
        return int(rc) if not int(sig or 0) else 128 + int(sig)

    def submit(self, args: Sequence[str], env: dict[str, str] | None = None) -> str:
        p = self.run(["sbatch", "--parsable", *args], timeout=60, env=env)
        assert p.returncode == 0, p.stderr
        return p.stdout.strip().split(";")[0]

    def job_field(self, job_id: str, name: str) -> str | None:
        """One field of `scontrol show job` (kept MinJobAge=300 s after the end)."""
        p = self.run(["scontrol", "show", "job", job_id], timeout=30)
        for tok in p.stdout.split():
            if tok.startswith(name + "="):
                return tok.split("=", 1)[1]
        return None

    def job_state(self, job_id: str) -> str:
        return self.job_field(job_id, "JobState") or "GONE"

    def wait_ended(self, job_id: str, timeout: float = 60) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.job_state(job_id)
            if state not in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "SUSPENDED"):
                return state
            time.sleep(0.3)
        raise AssertionError(f"job {job_id} still {self.job_state(job_id)} after {timeout} s")



def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("root", type=Path, help="scratch folder for the cluster")
    ap.add_argument("--stop", action="store_true", help="stop the cluster running in ROOT")
    args = ap.parse_args(argv)
    cluster = SlurmCluster(args.root.resolve())
    if args.stop:
        cluster.stop()
        return 0
    try:
        cluster.start()
    except SlurmUnavailable as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"export SLURM_CONF={cluster.conf}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
