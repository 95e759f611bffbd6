"""`paramserver cluster`: one server process and N worker processes on this machine.

It shows progress while they train, stops them all cleanly on Ctrl-C or when the workers are
done (the server writes its checkpoint and metrics on the way out), then evaluates the final
checkpoint on held-out data and, for the GPT job, prints a sample generated from it.

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


def _spawn(args: list[str], log_path: str, stdout=None) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    for var in ("PS_ROLE", "PS_SERVER", "PS_BIND", "PS_RANK", "PS_NUM_WORKERS", "PS_SHARD_INDEX", "PS_NUM_SHARDS"):
        env.pop(var, None)   # the cluster passes identity as flags
    with open(log_path, "w") as log:   # the child keeps its own copy of the descriptor
        return subprocess.Popen([sys.executable, "-m", "paramserver"] + args, stdout=stdout or log, stderr=log,
                                env=env, start_new_session=True)


def start_server(scfg: ServerConfig, out: str, timeout: float = 60.0,
                 log_name: str = "server.log") -> tuple[subprocess.Popen, str]:
    """Start `paramserver server` and return (process, the address it listens on)."""
    proc = _spawn(["server"] + to_argv(scfg), os.path.join(out, log_name), stdout=subprocess.PIPE)
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    line = proc.stdout.readline().decode() if ready else ""
    if "listening on" not in line:
        proc.kill()
        raise RuntimeError(f"the server did not start within {timeout:.0f}s; see {os.path.join(out, log_name)}")
    return proc, line.rsplit(" ", 1)[-1].strip()


def start_workers(wcfg: WorkerConfig, n: int, address: str, out: str, slowdown: dict[int, float] | None = None,
                  threads: int = 0, slowdown_prob: float = 1.0) -> list[subprocess.Popen]:
    """Start n `paramserver worker` processes; `slowdown` maps rank -> straggler factor."""
    procs = []
    for rank in range(n):
        argv = to_argv(wcfg, skip=("server", "rank", "num_workers", "out", "slowdown", "slowdown_prob", "threads"))
        argv += ["--server", address, "--rank", str(rank), "--num-workers", str(n), "--out", out]
        if slowdown and slowdown.get(rank, 1.0) > 1.0:
            argv += ["--slowdown", str(slowdown[rank]), "--slowdown-prob", str(slowdown_prob)]
        if threads:
            argv += ["--threads", str(threads)]
        procs.append(_spawn(["worker"] + argv, os.path.join(out, f"worker{rank}.log")))
    return procs


def stop_all(procs: list[subprocess.Popen], server: subprocess.Popen | None, address: str) -> None:
    """Workers get SIGTERM (they say goodbye), the server a SHUTDOWN (it checkpoints)."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
    if server is not None and server.poll() is None:
        shutdown(address)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=30)


def shutdown(address: str) -> None:
    from worker.client import PSClient, ServerUnavailable
    with PSClient(address, server_timeout=5.0, request_timeout=1.0) as ps:
        try:
            ps.shutdown()
        except ServerUnavailable:
            pass


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


def run_cluster(ccfg: ClusterConfig, scfg: ServerConfig, wcfg: WorkerConfig) -> int:
    from worker.client import PSClient
    from worker.evaluate import evaluate_checkpoint
    out = ccfg.out
    os.makedirs(out, exist_ok=True)
    for stale in ("checkpoint.pt", "server_metrics.json", "metrics.json"):
        if os.path.exists(os.path.join(out, stale)):
            os.unlink(os.path.join(out, stale))
    scfg.checkpoint = os.path.join(out, "checkpoint.pt")
    scfg.metrics = os.path.join(out, "server_metrics.json")
    scfg.bind = "tcp://127.0.0.1:*"
    threads = max(1, (os.cpu_count() or 1) // ccfg.workers)
    servers_text = "1 server" if ccfg.shards == 1 else f"{ccfg.shards} server shards"
    print(f"paramserver cluster: {servers_text} + {ccfg.workers} workers, job {wcfg.job}, mode {scfg.mode}, "
          f"{wcfg.steps} steps/worker, optimizer {scfg.optimizer} lr {scfg.lr}, output in {out}/", flush=True)
    t0 = time.time()
    if ccfg.shards > 1:
        return _run_sharded(ccfg, scfg, wcfg, threads, t0)
    server, address = start_server(scfg, out)
    slow = {ccfg.workers - 1: ccfg.straggler} if ccfg.straggler > 1.0 else None
    workers = start_workers(wcfg, ccfg.workers, address, out, slow, threads)
    interrupted = False
    next_tick = time.time() + ccfg.progress_every
    monitor = PSClient(address, server_timeout=2.0, request_timeout=1.0)   # one connection for all status calls
    try:
        while any(p.poll() is None for p in workers):
            time.sleep(0.2)
            if time.time() >= next_tick:
                next_tick += ccfg.progress_every
                print(_progress(monitor, t0, ccfg.workers), flush=True)
            if server.poll() is not None:
                print(f"the server exited with code {server.returncode}; see {out}/server.log", flush=True)
                break
    except KeyboardInterrupt:
        interrupted = True
        print("\ninterrupted: stopping workers and server (the server writes its checkpoint)", flush=True)
    finally:
        monitor.close()
        stop_all(workers, server, address)
    failed = [r for r, p in enumerate(workers) if p.returncode not in (0, -signal.SIGTERM, 143)]
    for r in failed:
        print(f"worker {r} exited with code {workers[r].returncode}; see {out}/worker{r}.log", flush=True)
    wall = time.time() - t0
    summary = {"wall_s": round(wall, 2), "interrupted": interrupted, "failed_workers": failed}
    if os.path.exists(scfg.checkpoint):
        summary.update(evaluate_checkpoint(scfg.checkpoint, wcfg, ccfg.sample_bytes, out))
    server_metrics = _read_json(scfg.metrics)
    workers_m = {str(r): _read_json(os.path.join(out, f"worker{r}.json")) for r in range(ccfg.workers)}
    with open(os.path.join(out, "metrics.json"), "w") as f:
        json.dump({"summary": summary, "server": server_metrics, "workers": workers_m}, f)
    st = server_metrics.get("status", {})
    print(f"done in {wall:.1f}s: {st.get('version', 0)} updates applied, counters {st.get('counters', {})}")
    if "final_eval_loss" in summary:
        first = summary.get("initial_eval_loss")
        print(f"held-out loss: {first:.4f} -> {summary['final_eval_loss']:.4f}"
              + (f" ({summary['final_bits_per_byte']:.3f} bits/byte)" if "final_bits_per_byte" in summary else ""))
    if summary.get("sample"):
        print("sample from the trained model:\n" + "-" * 60 + "\n" + summary["sample"] + "\n" + "-" * 60)
    print(f"checkpoint: {scfg.checkpoint}   metrics: {os.path.join(out, 'metrics.json')}", flush=True)
    return 1 if failed or interrupted else 0


def shard_configs(scfg: ServerConfig, shards: int, out: str) -> list[ServerConfig]:
    """One server config per shard: its index, and its own checkpoint and metrics files."""
    return [dataclasses.replace(scfg, shard_index=i, num_shards=shards,
                                checkpoint=os.path.join(out, f"checkpoint-shard{i}.pt"),
                                metrics=os.path.join(out, f"server_metrics-shard{i}.json")) for i in range(shards)]


def merge_checkpoints(paths: list[str], path: str) -> dict:
    """Merge the shards' checkpoints into one unsharded checkpoint at `path` (see common/shards.merge_states)."""
    from common.checkpoint import load_checkpoint, save_checkpoint
    from common.shards import merge_states
    merged = merge_states([load_checkpoint(p) for p in paths])
    save_checkpoint(path, merged)
    return merged


def _run_sharded(ccfg: ClusterConfig, scfg: ServerConfig, wcfg: WorkerConfig, threads: int, t0: float) -> int:
    """`paramserver cluster --shards K`: K server processes, workers given all K addresses."""
    from worker.client import PSClient
    from worker.evaluate import evaluate_checkpoint
    out = ccfg.out
    cfgs = shard_configs(scfg, ccfg.shards, out)
    for c in cfgs:
        for stale in (c.checkpoint, c.metrics):
            if os.path.exists(stale):
                os.unlink(stale)
    servers, addresses = [], []
    try:
        for i, c in enumerate(cfgs):
            proc, address = start_server(c, out, log_name=f"server-shard{i}.log")
            servers.append(proc)
            addresses.append(address)
    except BaseException:
        for proc in servers:
            proc.kill()
        raise
    address = ",".join(addresses)
    slow = {ccfg.workers - 1: ccfg.straggler} if ccfg.straggler > 1.0 else None
    workers = start_workers(wcfg, ccfg.workers, address, out, slow, threads)
    interrupted = False
    next_tick = time.time() + ccfg.progress_every
    monitors = [PSClient(a, server_timeout=2.0, request_timeout=1.0) for a in addresses]
    try:
        while any(p.poll() is None for p in workers):
            time.sleep(0.2)
            if time.time() >= next_tick:
                next_tick += ccfg.progress_every
                print(" | ".join(f"shard {i} " + _progress(m, t0, ccfg.workers) for i, m in enumerate(monitors)),
                      flush=True)
            dead = [i for i, s in enumerate(servers) if s.poll() is not None]
            if dead:
                print(f"server shard {dead[0]} exited with code {servers[dead[0]].returncode}; see "
                      f"{out}/server-shard{dead[0]}.log", flush=True)
                break
    except KeyboardInterrupt:
        interrupted = True
        print("\ninterrupted: stopping workers and server shards (each writes its checkpoint)", flush=True)
    finally:
        for m in monitors:
            m.close()
        stop_all(workers, None, "")
        for proc, a in zip(servers, addresses):
            stop_all([], proc, a)
    failed = [r for r, p in enumerate(workers) if p.returncode not in (0, -signal.SIGTERM, 143)]
    for r in failed:
        print(f"worker {r} exited with code {workers[r].returncode}; see {out}/worker{r}.log", flush=True)
    wall = time.time() - t0
    summary = {"wall_s": round(wall, 2), "interrupted": interrupted, "failed_workers": failed, "shards": ccfg.shards}
    if all(os.path.exists(c.checkpoint) for c in cfgs):
        merged = merge_checkpoints([c.checkpoint for c in cfgs], scfg.checkpoint)
        summary["shard_versions"] = merged["shard_versions"]
        summary.update(evaluate_checkpoint(scfg.checkpoint, wcfg, ccfg.sample_bytes, out))
    servers_m = [_read_json(c.metrics) for c in cfgs]
    workers_m = {str(r): _read_json(os.path.join(out, f"worker{r}.json")) for r in range(ccfg.workers)}
    with open(os.path.join(out, "metrics.json"), "w") as f:
        json.dump({"summary": summary, "server": servers_m[0], "shards": servers_m, "workers": workers_m}, f)
    for i, m in enumerate(servers_m):
        st = m.get("status", {})
        print(f"shard {i}: {st.get('version', 0)} updates applied, counters {st.get('counters', {})}")
    print(f"done in {wall:.1f}s")
    if "final_eval_loss" in summary:
        first = summary.get("initial_eval_loss")
        print(f"held-out loss: {first:.4f} -> {summary['final_eval_loss']:.4f}"
              + (f" ({summary['final_bits_per_byte']:.3f} bits/byte)" if "final_bits_per_byte" in summary else ""))
    if summary.get("sample"):
        print("sample from the trained model:\n" + "-" * 60 + "\n" + summary["sample"] + "\n" + "-" * 60)
    print(f"checkpoints: {', '.join(c.checkpoint for c in cfgs)} (merged: {scfg.checkpoint})   "
          f"metrics: {os.path.join(out, 'metrics.json')}", flush=True)
    return 1 if failed or interrupted else 0
