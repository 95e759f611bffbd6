"""Starting and stopping the processes of a run: `paramserver server` and `paramserver worker` children.

The one way a worker or server process is started, for the cluster (paramserver/cluster.py), the benches
and the tests: `start_server` (waits for its "listening on" line), `launch_worker` (runs a WorkerConfig
exactly), `start_workers` (N of them, with stragglers and keys), and their orderly end, `stop_all`
(workers SIGTERM, the server a SHUTDOWN so that it checkpoints). Every child gets identity only from its
flags (no PS_* variables) and, on Linux, dies with its parent.
"""
from __future__ import annotations

import dataclasses
import os
import select
import signal
import subprocess
import sys
import time

from common.config import ServerConfig, WorkerConfig, to_argv


class ClusterError(RuntimeError):
    """A process of the cluster failed; the message carries its own error line and exit code."""


def _die_with_parent() -> None:
    """In the child, before exec: get SIGTERM when the cluster process dies, however it dies (Linux)."""
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)   # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


#: the folder that holds the `paramserver` package: children import the same code as this process
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _spawn(args: list[str], log_path: str | None = None, **popen) -> subprocess.Popen:
    """`python -m paramserver ARGS`, identity (PS_*) only from flags. With `log_path`: a child of the cluster
    (output to that log unless `popen` says otherwise, its own session, gone with its parent)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join(p for p in (_ROOT, os.environ.get("PYTHONPATH", "")) if p))
    for var in ("PS_ROLE", "PS_SERVER", "PS_BIND", "PS_RANK", "PS_NUM_WORKERS", "PS_SHARD_INDEX", "PS_NUM_SHARDS"):
        env.pop(var, None)   # the cluster passes identity as flags
    argv = [sys.executable, "-m", "paramserver"] + args
    if log_path is None:
        return subprocess.Popen(argv, env=env, **popen)
    with open(log_path, "w") as log:   # the child keeps its own copy of the descriptor
        popen.setdefault("stdout", log)
        # a session of its own: a Ctrl-C in the terminal reaches the cluster only, which stops the children
        # in order (workers first, then the server with a checkpoint)
        return subprocess.Popen(argv, stderr=log, env=env, start_new_session=True,
                                preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None, **popen)


def last_error_line(log_path: str) -> str:
    """The line a failed process said last (its one-line error), from its log."""
    try:
        with open(log_path, errors="replace") as f:
            lines = [ln.strip() for ln in f.read().splitlines()[-50:] if ln.strip()]
    except OSError:
        return ""
    for ln in reversed(lines):    # the command line's own error line first (a user's frames may follow it)
        if ": error: " in ln:
            return ln
    for ln in reversed(lines):    # prefer the error line over a trailing usage hint
        if "error" in ln.lower() or "Error" in ln:
            return ln
    return lines[-1] if lines else ""


def exit_text(code: int) -> str:
    if code is not None and code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with code {code}"


def start_server(scfg: ServerConfig, out: str, timeout: float = 60.0,
                 procs: list | None = None, log_name: str = "server.log") -> tuple[subprocess.Popen, str]:
    """Start `paramserver server` and return (process, the address it listens on).

    If it exits first, raise ClusterError with its own error line and exit code. `procs`, when given,
    gets the process appended at once (so that whoever cleans up knows it even if this raises)."""
    log_path = os.path.join(out, log_name)
    proc = _spawn(["server"] + to_argv(scfg), log_path, stdout=subprocess.PIPE)
    if procs is not None:
        procs.append(proc)
    deadline = time.monotonic() + timeout
    line = ""
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 0.2)
        if ready:
            line = proc.stdout.readline().decode()
            if "listening on" in line or not line:
                break
        elif proc.poll() is not None:
            break
    if "listening on" not in line:
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise ClusterError(f"the server did not start within {timeout:.0f}s; see {log_path}") from None
        raise ClusterError(f"the server {exit_text(proc.returncode)}: {last_error_line(log_path)}")
    return proc, line.rsplit(" ", 1)[-1].strip()


def launch_worker(cfg: WorkerConfig, log_path: str | None = None, **popen) -> subprocess.Popen:
    """The one way a `paramserver worker` process starts: the cluster's, the benches' and the tests' workers.

    The process runs `cfg` exactly (its flags, the rank always). With `log_path` it is a child of the cluster
    (output to that log, its own session, gone with its parent); without, `popen` (stdout, stderr, cwd) says
    where its output goes, as a test wants.

        proc = launch_worker(WorkerConfig(server=address, rank=1, num_workers=2), "out/worker1.log")
    """
    return _spawn(["worker"] + to_argv(cfg, skip=("rank",)) + ["--rank", str(cfg.rank)], log_path, **popen)


def start_workers(wcfg: WorkerConfig, n: int, address: str, out: str, slowdown: dict[int, float] | None = None,
                  threads: int = 0, slowdown_prob: float = 1.0, procs: list | None = None,
                  keys: str = "") -> list[subprocess.Popen]:
    """Start n `paramserver worker` processes; `slowdown` maps rank -> straggler factor. `procs`, when
    given, is the list the processes are appended to as they start (and is returned). With `keys` (a
    folder from cluster_keys) worker r talks CurveZMQ with its own key workerR.key_secret (and, to K shards,
    each shard's public key server-shardI.key). Each worker runs `wcfg` with its identity and these settings."""
    from common.security import server_key_names
    procs = [] if procs is None else procs
    servers = server_key_names(len(address.split(",")))   # one server public key per shard, in address order
    for rank in range(n):
        slow = (slowdown or {}).get(rank, 1.0) > 1.0
        cfg = dataclasses.replace(
            wcfg, server=address, rank=rank, num_workers=n, out=out, threads=threads,
            slowdown=slowdown[rank] if slow else 1.0, slowdown_prob=slowdown_prob if slow else 1.0,
            curve_server=",".join(os.path.join(keys, s + ".key") for s in servers) if keys else "",
            curve_secret=os.path.join(keys, f"worker{rank}.key_secret") if keys else "")
        procs.append(launch_worker(cfg, os.path.join(out, f"worker{rank}.log")))
    return procs


def stop_all(procs: list[subprocess.Popen], server: subprocess.Popen | None, address: str,
             curve: dict | None = None, worker_wait: float = 10.0) -> None:
    """Workers get SIGTERM (they say goodbye and write their metrics), the server a SHUTDOWN (it
    checkpoints); a server that does not answer gets SIGTERM, which also makes it checkpoint."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=worker_wait)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    if server is not None and server.poll() is None:
        if address:
            shutdown(address, **(curve or {}))
        try:
            server.wait(timeout=30 if address else 0.1)
        except subprocess.TimeoutExpired:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()


def shutdown(address: str, curve_server: str = "", curve_secret: str = "") -> bool:
    """Send SHUTDOWN; True when the server acknowledged it."""
    from worker.client import PSClient, ServerError, ServerUnavailable
    with PSClient(address, server_timeout=5.0, request_timeout=1.0, curve_server=curve_server,
                  curve_secret=curve_secret) as ps:
        try:
            ps.shutdown()
            return True
        except (ServerUnavailable, ServerError):
            return False


class _Signals:
    """While the children are stopped, a second Ctrl-C or SIGTERM does not abort the cleanup: it is
    noted (the waits are bounded anyway: 10 s per worker, 30 s for the server's checkpoint)."""

    def __init__(self):
        self.again = 0

    def __enter__(self):
        self.old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        for s in self.old:
            signal.signal(s, self._note)
        return self

    def _note(self, signum, frame):
        self.again += 1
        print(f"already stopping ({signal.Signals(signum).name} noted): the server is writing its checkpoint",
              flush=True)

    def __exit__(self, *exc):
        for s, h in self.old.items():
            signal.signal(s, h)
