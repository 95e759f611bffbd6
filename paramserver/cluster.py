"""`paramserver cluster`: one server process and N worker processes on this machine.

It shows progress while they train, stops them all cleanly on Ctrl-C or when the workers are
done (the server writes its checkpoint and metrics on the way out), then evaluates the final
checkpoint on held-out data and, for the GPT job, prints a sample generated from it.

Nothing is orphaned: on any way out of the cluster (done, Ctrl-C, a second Ctrl-C, SIGTERM, its
own crash) the workers get SIGTERM and the server a SHUTDOWN; and every child is started with a
parent-death signal (Linux), so even a `kill -9` of the cluster stops the server with a checkpoint.

Usage::

    paramserver cluster --workers 4 --mode sync --steps 200
"""
from __future__ import annotations

import dataclasses
import json
import os
import select
import signal
import subprocess
import sys
import time

from common.config import ClusterConfig, ServerConfig, WorkerConfig, to_argv
from common.shards import merge_states


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


def _progress(ps, t0: float, n: int) -> str:
    from worker.client import ServerUnavailable
    try:
        st = ps.status()
    except ServerUnavailable:
        return f"[{time.time() - t0:6.1f}s] server not answering"
    loss = f"{st['loss']:.4f}" if st["loss"] is not None else "-"
    return (f"[{time.time() - t0:6.1f}s] version {st['version']:5d} | live {st['live']}/{n} | "
            f"train loss {loss} | {st['updates_per_s']:.1f} updates/s | waiting pulls {st['waiting_pulls']}")


def _read_json(path: str) -> dict:
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def preflight(scfg: ServerConfig, wcfg: WorkerConfig) -> None:
    """Check, before any process starts, what would make the server or every worker fail at once (the
    resumed checkpoint, the data folder); raises ConfigError / FileNotFoundError with one line."""
    from common.checkpoint import load_checkpoint
    from common.config import ConfigError
    from worker.data import text_files
    if wcfg.job == "gpt" and wcfg.data and not text_files(wcfg.data):
        raise ConfigError(f"--data {wcfg.data!r}: no text files found")
    if scfg.resume:
        state = load_checkpoint(scfg.resume)
        if state.get("optimizer", scfg.optimizer) != scfg.optimizer:
            raise ConfigError(f"--resume {scfg.resume}: the checkpoint was written with --optimizer "
                              f"{state['optimizer']}; resume with the same optimizer")


def cluster_keys(folder: str, n: int, shards: int = 1) -> list[dict]:
    """The CurveZMQ keys of a cluster run in `folder`: one server key pair per server (`server`, or
    `server-shard0..K-1` with K shards), worker0..n-1 and an admin key `cluster` for the cluster's own
    monitor and SHUTDOWN; those missing are created. Returns, per server in shard order, the client kwargs
    of the cluster's own connections to it."""
    from common.security import make_keys, server_key_names
    have = lambda name: os.path.exists(os.path.join(folder, name + ".key_secret"))   # noqa: E731
    servers = server_key_names(shards)
    missing = [name for name in list(servers) + [f"worker{r}" for r in range(n)] if not have(name)]
    admins = () if have("cluster") else ("cluster",)
    if missing or admins:
        make_keys(folder, tuple(missing), admins=admins)
    return [{"curve_server": os.path.join(folder, name + ".key"),
             "curve_secret": os.path.join(folder, "cluster.key_secret")} for name in servers]


def _prepare_out(out: str, keep: list[str]) -> None:
    """Remove the outputs of an earlier run in `out` (its checkpoints, shards' included, and metrics), except
    the checkpoints being resumed."""
    os.makedirs(out, exist_ok=True)
    keep_real = {os.path.realpath(k) for k in keep if k}
    for stale in ["checkpoint.pt", "server_metrics.json", "metrics.json", "eval.json"] + \
            [f for f in os.listdir(out) if (f.startswith("worker") and f.endswith(".json"))
             or (f.startswith("checkpoint-shard") and f.endswith(".pt"))
             or (f.startswith("server_metrics-shard") and f.endswith(".json"))]:
        path = os.path.join(out, stale)
        if os.path.exists(path) and os.path.realpath(path) not in keep_real:
            os.unlink(path)


def shard_resumes(resume: str, shards: int) -> list[str]:
    """--resume PATH with --shards K: shard i resumes from checkpoint-shardI.pt beside PATH (a `cluster --shards K`
    run writes them there, with the merged checkpoint.pt). Raises ClusterError naming what is missing."""
    folder = os.path.dirname(os.path.abspath(resume))
    paths = [os.path.join(folder, f"checkpoint-shard{i}.pt") for i in range(shards)]
    missing = [p for p in paths if not os.path.exists(p)]
    if missing:
        raise ClusterError(f"--resume {resume} with --shards {shards}: each shard resumes from its own checkpoint, "
                           f"written beside the merged one by a `paramserver cluster --shards {shards}` run; "
                           f"missing {', '.join(missing)} (a checkpoint of a run with one server resumes with "
                           "--shards 1)")
    return paths


def _written_since(path: str, t0: float) -> bool:
    return os.path.exists(path) and os.path.getmtime(path) >= t0 - 1.0


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


def run_cluster(ccfg: ClusterConfig, scfg: ServerConfig, wcfg: WorkerConfig) -> int:
    """One server (or --shards K server shards) and --workers worker processes, to the end of the run."""
    from common.checkpoint import load_checkpoint
    from common.security import server_key_names
    from worker.client import PSClient
    from worker.evaluate import evaluate_checkpoint
    out, k = ccfg.out, ccfg.shards
    resumes = ([scfg.resume] if k == 1 else shard_resumes(scfg.resume, k)) if scfg.resume else []
    # read before it is overwritten: the model the run starts from ("before" in the held-out loss)
    start_state = None
    if resumes:
        start_state = load_checkpoint(resumes[0]) if k == 1 else merge_states([load_checkpoint(p) for p in resumes])
    start_version = int(start_state["version"]) if start_state is not None else 0
    _prepare_out(out, [scfg.resume] + resumes)
    scfg.checkpoint = os.path.join(out, "checkpoint.pt")
    scfg.metrics = os.path.join(out, "server_metrics.json")
    scfg.bind = "tcp://127.0.0.1:*"
    keys = ccfg.keys or (os.path.join(out, "keys") if ccfg.curve else "")
    curves: list[dict] = [{} for _ in range(k)]
    if keys:
        curves = cluster_keys(keys, ccfg.workers, k)
        scfg.curve_secret = os.path.join(keys, "server.key_secret")
        scfg.auth = os.path.join(keys, "clients")
    threads = wcfg.threads or max(1, (os.cpu_count() or 1) // ccfg.workers)
    scfg.threads = scfg.threads or max(1, (os.cpu_count() or 1) // (ccfg.workers + k))
    cfgs = [scfg]
    if k > 1:   # each shard: its index, its own checkpoint, metrics, key pair, resumed file and metrics port
        cfgs = [dataclasses.replace(c, resume=resumes[i] if resumes else "",
                                    **({"curve_secret": os.path.join(keys, name + ".key_secret")} if keys else {}))
                for i, (c, name) in enumerate(zip(shard_configs(scfg, k, out), server_key_names(k)))]
    logs = ["server.log"] if k == 1 else [f"server-shard{i}.log" for i in range(k)]
    mode = scfg.mode + (f" (staleness bound {scfg.staleness})" if scfg.mode == "ssp" else "") + \
        (f" ({scfg.backup_workers} backup workers)" if scfg.backup_workers else "")
    straggler = (f", straggler: worker {ccfg.workers - 1} x{ccfg.straggler:g}"
                 + (f" on {wcfg.slowdown_prob:.0%} of its steps" if wcfg.slowdown_prob < 1 else "")
                 if ccfg.straggler > 1.0 else "")
    servers_text = "1 server" if k == 1 else f"{k} server shards"
    print(f"paramserver cluster: {servers_text} + {ccfg.workers} workers, job {wcfg.entry or wcfg.job}, mode {mode}, "
          f"{wcfg.steps} steps/worker, optimizer {scfg.optimizer} lr {scfg.lr}{straggler}"
          f"{', CurveZMQ keys in ' + keys if keys else ''}, output in {out}/", flush=True)
    t0 = time.time()
    servers: list[subprocess.Popen] = []   # in shard order, appended as they start
    addresses: list[str] = []
    workers: list[subprocess.Popen] = []
    monitors: list = []
    interrupted, failure = False, ""
    try:
        for i, c in enumerate(cfgs):
            try:
                addresses.append(start_server(c, out, procs=servers, log_name=logs[i])[1])
            except ClusterError as exc:
                raise ClusterError(f"shard {i}: {exc}" if k > 1 else str(exc)) from None
        slow = {ccfg.workers - 1: ccfg.straggler} if ccfg.straggler > 1.0 else None
        start_workers(wcfg, ccfg.workers, ",".join(addresses), out, slow, threads, wcfg.slowdown_prob,
                      procs=workers, keys=keys)
        next_tick = time.time() + ccfg.progress_every
        # one connection per server for all status calls
        monitors = [PSClient(a, server_timeout=2.0, request_timeout=1.0, **c) for a, c in zip(addresses, curves)]
        while any(p.poll() is None for p in workers):
            time.sleep(0.2)
            if time.time() >= next_tick:
                next_tick += ccfg.progress_every
                print(_progress(monitors[0], t0, ccfg.workers) if k == 1 else
                      " | ".join(f"shard {i} " + _progress(m, t0, ccfg.workers) for i, m in enumerate(monitors)),
                      flush=True)
            dead = [i for i, proc in enumerate(servers) if proc.poll() is not None]
            if dead:
                i = dead[0]
                failure = (f"the server{f' shard {i}' if k > 1 else ''} {exit_text(servers[i].returncode)}: "
                           f"{last_error_line(os.path.join(out, logs[i]))}")
                break
            bad = [r for r, p in enumerate(workers) if p.poll() not in (None, 0)]
            if bad:   # the others would wait for it (the start gate, the barrier): stop the run
                r = bad[0]
                failure = (f"worker {r} {exit_text(workers[r].returncode)}: "
                           f"{last_error_line(os.path.join(out, f'worker{r}.log'))}")
                break
    except KeyboardInterrupt:
        interrupted = True
        print(f"\ninterrupted: stopping workers and {'server' if k == 1 else 'server shards'} (each server writes "
              "its checkpoint)", flush=True)
    except ClusterError as exc:
        failure = str(exc)
    finally:
        with _Signals() as sigs:
            for m in monitors:
                m.close()
            stop_all(workers, None, "")
            for i, proc in enumerate(servers):
                stop_all([], proc, addresses[i] if i < len(addresses) else "", curves[i])
            if sigs.again:
                interrupted = True
    if failure:
        print(failure, flush=True)
    failed = [r for r, p in enumerate(workers) if p.returncode not in (0, -signal.SIGTERM, 143)]
    for r in failed:
        if not failure.startswith(f"worker {r} "):
            print(f"worker {r} {exit_text(workers[r].returncode)}; see {out}/worker{r}.log", flush=True)
    wall = time.time() - t0
    summary = {"wall_s": round(wall, 2), "interrupted": interrupted, "failed_workers": failed,
               "failure": failure, **({"shards": k} if k > 1 else {})}
    written = bool(servers) and all(_written_since(c.checkpoint, t0) for c in cfgs)
    if written and k > 1:   # one unsharded checkpoint for evaluate and for --resume with --shards 1
        summary["shard_versions"] = merge_checkpoints([c.checkpoint for c in cfgs], scfg.checkpoint)["shard_versions"]
    servers_m = [_read_json(c.metrics) for c in cfgs]
    st = servers_m[0].get("status", {})
    end_version = int(st.get("version", start_version))
    summary.update(start_version=start_version, end_version=end_version, updates=end_version - start_version)
    if written and end_version > start_version:   # a run that trained nothing has no "after" to report
        summary.update(evaluate_checkpoint(scfg.checkpoint, wcfg, ccfg.sample_bytes, out, start_state=start_state))
    workers_m = {str(r): _read_json(os.path.join(out, f"worker{r}.json")) for r in range(ccfg.workers)}
    with open(os.path.join(out, "metrics.json"), "w") as f:
        json.dump({"summary": summary, "server": servers_m[0], **({"shards": servers_m} if k > 1 else {}),
                   "workers": workers_m}, f)
    if k > 1:
        for i, m in enumerate(servers_m):
            sst = m.get("status", {})
            print(f"shard {i}: version {sst.get('version', 0)}, counters {sst.get('counters', {})}")
    resumed = f" (version {start_version} -> {end_version}, resumed from {scfg.resume})" if scfg.resume else ""
    print(f"done in {wall:.1f}s: {end_version - start_version} updates applied in this run{resumed}"
          + (f", counters {st.get('counters', {})}" if k == 1 else ""))
    if "final_eval_loss" in summary:
        first = summary.get("initial_eval_loss")
        print(f"held-out loss: {first:.4f} -> {summary['final_eval_loss']:.4f}"
              + (f" ({summary['final_bits_per_byte']:.3f} bits/byte)" if "final_bits_per_byte" in summary else "")
              + (" (before: the resumed model)" if start_state is not None else ""))
    else:
        print("held-out loss: not measured (no update was applied in this run)")
    if summary.get("sample"):
        print(f"sample from the trained model (prompt {summary['prompt']!r} from the held-out text):\n"
              + "-" * 60 + "\n" + summary["sample"] + "\n" + "-" * 60)
    if not written:
        where = "none written"
    elif k == 1:
        where = scfg.checkpoint
    else:
        where = f"{', '.join(c.checkpoint for c in cfgs)} (merged: {scfg.checkpoint})"
    print(f"checkpoint{'s' if k > 1 else ''}: {where}   metrics: {os.path.join(out, 'metrics.json')}", flush=True)
    return 1 if failed or interrupted or failure else 0


def shard_configs(scfg: ServerConfig, shards: int, out: str) -> list[ServerConfig]:
    """One server config per shard: its index, its own checkpoint and metrics files, and (--metrics-port P)
    its own Prometheus port P + index."""
    return [dataclasses.replace(scfg, shard_index=i, num_shards=shards,
                                checkpoint=os.path.join(out, f"checkpoint-shard{i}.pt"),
                                metrics=os.path.join(out, f"server_metrics-shard{i}.json"),
                                metrics_port=scfg.metrics_port + i if scfg.metrics_port else 0)
            for i in range(shards)]


def merge_checkpoints(paths: list[str], path: str) -> dict:
    """Merge the shards' checkpoints into one unsharded checkpoint at `path` (see common/shards.merge_states)."""
    from common.checkpoint import load_checkpoint, save_checkpoint
    merged = merge_states([load_checkpoint(p) for p in paths])
    save_checkpoint(path, merged)
    return merged
