"""The measurements of `paramserver bench throughput` (paramserver/bench/throughput.py runs them in order).

This module owns what is timed and how: theta made of equal float32 tensors (`make_theta`), the limits (a raw
ZeroMQ echo in another process, torch's in-place updates), the server's apply time, the push+pull round trip
per wire dtype and transport, the async server's capacity with its memory and time split, and the convergence
runs of the default GPT job. Every figure is the best of its repetitions (`_best_ms`) and every ratio's two
sides are timed interleaved, so that on a shared machine both see the same moments of load. The tables that
turn these figures into text are in paramserver/bench/throughput_tables.py.
"""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import time

import numpy as np

from common.config import ServerConfig
from common.tuning import keep_freed_memory

def make_theta(p: int, tensors: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    sizes = [p // tensors + (1 if i < p % tensors else 0) for i in range(tensors)]
    return {f"layer{i:03d}.weight": (rng.standard_normal(n, dtype=np.float32) * 0.02) for i, n in enumerate(sizes)}


def source_commit() -> str | None:
    """The git commit of the code being measured ("+dirty" with uncommitted changes); None outside a checkout."""
    import subprocess
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if head.returncode:
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def _best_ms(xs: list[float]) -> float:
    """The best of the repetitions, in ms: on a shared machine other load only ever adds time, so the
    minimum is the steadiest estimate of what the code costs (the same rule for limits and paramserver)."""
    return round(float(np.min(xs)) * 1e3, 3)


# -- limits -------------------------------------------------------------------------------------

def _raw_echo(address_q, p: int, tensors: int) -> None:
    """ROUTER in its own process: answer every request with P float32 (preallocated, zero-copy)."""
    import zmq
    from common.protocol import encode, Message, MsgType
    keep_freed_memory()   # as in paramserver's processes: the limit is what ZeroMQ can do at its best
    theta = make_theta(p, tensors, seed=1)
    sock = zmq.Context.instance().socket(zmq.ROUTER)
    sock.bind("tcp://127.0.0.1:*")
    address_q.put(sock.getsockopt(zmq.LAST_ENDPOINT).decode())
    reply = encode(Message(MsgType.PARAMS, tensors=theta))
    while True:
        frames = sock.recv_multipart(copy=False)
        if len(frames) == 2 and frames[1].bytes == b"stop":
            break
        sock.send_multipart([frames[0]] + reply, copy=False)
    sock.close(linger=0)


class _RawEcho:
    """The limit: a ROUTER in another process answering each request with P float32 (zero-copy)."""

    def __init__(self, p: int, tensors: int):
        import zmq
        from common.protocol import encode, Message, MsgType
        ctx = mp.get_context("spawn")
        q = ctx.Queue()
        self.proc = ctx.Process(target=_raw_echo, args=(q, p, tensors), daemon=True)
        self.proc.start()
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.connect(q.get(timeout=120))
        self.frames = encode(Message(MsgType.PUSH, tensors=make_theta(p, tensors, seed=2)))
        self.once()   # warms up the connection and buffers

    def once(self) -> float:
        """Seconds for one request of P float32 and its reply of P float32."""
        t0 = time.perf_counter()
        self.sock.send_multipart(self.frames, copy=False)
        self.sock.recv_multipart(copy=False)
        return time.perf_counter() - t0

    def close(self) -> None:
        self.sock.send_multipart([b"stop"])
        self.proc.join(timeout=30)
        self.sock.close(linger=0)


class _Limits:
    """torch's own in-place updates on this process's threads: foreach add_ and fused Adam over P float32."""

    def __init__(self, p: int, tensors: int):
        import torch
        self.torch = torch
        self.theta = [torch.from_numpy(a) for a in make_theta(p, tensors).values()]
        self.grads = [torch.from_numpy(a) for a in make_theta(p, tensors, seed=3).values()]
        self.adam_theta = [torch.from_numpy(a) for a in make_theta(p, tensors, seed=4).values()]
        for t, g in zip(self.adam_theta, self.grads):
            t.grad = g
        self.adam = torch.optim.Adam(self.adam_theta, lr=1e-3, fused=True)
        self.times: dict[str, list[float]] = {"add": [], "adam": []}

    def once(self, which: str, keep: bool = True) -> None:
        t0 = time.perf_counter()
        if which == "adam":
            self.adam.step()
        else:
            self.torch._foreach_add_(self.theta, self.grads, alpha=-1e-3)
        if keep:
            self.times[which].append(time.perf_counter() - t0)


def apply_and_limits(p: int, tensors: int, reps: int, optimizers: list[str]) -> tuple[dict, dict]:
    """(limits, apply_ms): best ms of the server's work per push (gradient check + update) per optimizer, in
    process ("check": the gradient check alone), and of torch's in-place update it compares with (add_ for sgd
    and momentum, fused Adam for adam). Each repetition times the limit and then the apply, so that on a
    shared machine both sides of a ratio see the same moments of load (as the round trips do)."""
    from paramserver.store import ParamStore
    limits = _Limits(p, tensors)
    out = {}
    grads = make_theta(p, tensors, seed=3)
    checks = []
    for o in optimizers:
        store = ParamStore(o, lr=1e-3)
        store.init(make_theta(p, tensors))
        which = "adam" if o == "adam" else "add"
        times = []
        for i in range(reps + 1):   # the first one warms up (optimizer state, pages)
            limits.once(which, keep=i > 0)
            t0 = time.perf_counter()
            store.check_gradient(grads)
            t1 = time.perf_counter()
            store.apply(grads)
            times.append(time.perf_counter() - t0)
            checks.append(t1 - t0)
        out[o] = _best_ms(times[1:])
        del store
    out["check"] = _best_ms(checks)
    for which in ("add", "adam"):   # a limit no optimizer was timed against: measured on its own
        if not limits.times[which]:
            for i in range(reps + 1):
                limits.once(which, keep=i > 0)
    return ({"add_ms": _best_ms(limits.times["add"]), "adam_fused_ms": _best_ms(limits.times["adam"]),
             "threads": limits.torch.get_num_threads()}, out)


def _client(address: str, worker: int, wire: str, transport: str = "tcp"):
    from worker.client import PSClient
    from worker.shmclient import ShmClient
    kwargs = {"wire_dtype": wire} if wire != "fp32" else {}
    cls = ShmClient if transport == "shm" else PSClient
    return cls(address, worker=worker, request_timeout=30, server_timeout=120, **kwargs)


def _shm_share(ps, pulls: int, pushes: int) -> dict:
    """How many of a client's pulls and pushes went through shared memory (tcp: none)."""
    st = ps.stats
    return {"pulls": pulls, "pushes": pushes, "shm_pulls": st.get("shm_pulls", 0),
            "shm_pushes": st.get("shm_pushes", 0)}


def _start_server(out: str, num_workers: int, optimizer: str, **server):
    from paramserver.launch import start_server
    scfg = ServerConfig(bind="tcp://127.0.0.1:*", num_workers=num_workers, mode="async", optimizer=optimizer,
                        lr=1e-4, log_level="warning", worker_timeout=600, max_message_mb=4096, **server)
    return start_server(scfg, out)


def _stop_server(proc, address: str) -> dict:
    from paramserver.launch import shutdown
    from worker.client import PSClient
    with PSClient(address, server_timeout=30) as ps:
        status = ps.status()
    mem = _proc_memory(proc.pid)
    shutdown(address)
    proc.wait(timeout=120)
    return {"status": status, **mem}


def _proc_memory(pid: int, fields: tuple = ("VmHWM", "VmRSS")) -> dict:
    """{field_mb: MB} of /proc/PID/status (vmhwm_mb, vmrss_mb, ...); {} when the process is gone."""
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in fields:
                    out[key.lower() + "_mb"] = round(int(value.split()[0]) / 1024, 1)
    except (OSError, ValueError):
        pass
    return out


def round_trips(p: int, tensors: int, reps: int, wires: list[str], out: str, shm: bool = False) -> dict:
    """Best ms of the raw ZeroMQ round trip and of one worker's push (P values) + pull (P values) against a
    server process (async, sgd), per wire dtype over tcp and, with `shm`, in fp32 over same-host shared
    memory (then "shm_share" counts what went through it). The repetitions interleave (raw, then each lane,
    then raw again ...), so that on a shared machine both sides of every ratio see the same moments of load."""
    lanes = [(w, "tcp") for w in wires] + ([("fp32", "shm")] if shm else [])
    proc, address = _start_server(out, len(lanes), "sgd")
    theta = make_theta(p, tensors)
    grads = make_theta(p, tensors, seed=3)
    echo, half, clients, params = None, None, [], []
    times: dict[str, list[float]] = {"raw": [], "raw_half": [], **{_lane(w, t): [] for w, t in lanes}}
    share = {}
    try:
        echo = _RawEcho(p, tensors)
        if any(w != "fp32" for w in wires):   # the limit of a 16-bit wire: raw ZeroMQ moving half the bytes
            half = _RawEcho(p // 2, tensors)
        for rank, (wire, transport) in enumerate(lanes):
            clients.append(_client(address, rank, wire, transport))
            clients[-1].register(init=theta if rank == 0 else None)
        params = [ps.pull(raw=True) for ps in clients]
        for i in range(reps + 1):
            raw = echo.once()
            if half is not None and i:
                times["raw_half"].append(half.once())
            for k, (ps, lane) in enumerate(zip(clients, lanes)):
                t0 = time.perf_counter()
                ps.push(grads, version=params[k].version, clock=params[k].clock)
                params[k] = ps.pull(raw=True)   # as a worker takes theta (worker/transfer.py widens it into the model)
                if i:   # the first one warms up the buffers
                    times[_lane(*lane)].append(time.perf_counter() - t0)
            if i:
                times["raw"].append(raw)
        for ps, (wire, transport) in zip(clients, lanes):
            if transport == "shm":
                share = _shm_share(ps, reps + 2, reps + 1)
            ps.leave()
    finally:
        for ps in clients:
            ps.close()
        for e in (echo, half):
            if e is not None:
                e.close()
        info = _stop_server(proc, address)
    result = {"raw_zmq_ms": _best_ms(times["raw"]),
              **({"raw_zmq_half_ms": _best_ms(times["raw_half"])} if times["raw_half"] else {}),
              "wire": {w: {"round_trip_ms": _best_ms(times[w])} for w in wires},
              "server_handle_ms": info["status"].get("handle_ms", {})}
    if shm:
        result["shm"] = {"round_trip_ms": _best_ms(times["shm"]), "shm_share": share}
    return result


def _lane(wire: str, transport: str) -> str:
    return "shm" if transport == "shm" else wire


def _pusher(rank: int, address: str, p: int, tensors: int, seconds: float, wire: str, transport: str,
            sync) -> dict:
    """One pushing process (run by paramserver/bench/procs.py): pull, push, as fast as the server answers."""
    import torch
    torch.set_num_threads(1)
    keep_freed_memory()   # as `paramserver worker` does
    grads = make_theta(p, tensors, seed=10 + rank)
    n = pulls = pushes = 0
    with _client(address, rank, wire, transport) as ps:
        if rank:
            sync.registered(rank)   # rank 0 brings theta
        ps.register(init=make_theta(p, tensors) if rank == 0 else None)
        if not rank:
            sync.registered(rank)
        # one step before the start, not counted: connections, buffers and (shm) the gradient segment are set
        # up once per worker, which is not the server's capacity
        params = ps.pull(raw=True)
        ps.push(grads, version=params.version, clock=params.clock)
        sync.start.wait()
        t_start = time.monotonic()   # (CLOCK_MONOTONIC: one clock for every process of the machine)
        deadline = t_start + seconds
        while time.monotonic() < deadline:
            params = ps.pull(raw=True)
            ack = ps.push(grads, version=params.version, clock=params.clock)
            pulls, pushes = pulls + 1, pushes + 1
            n += ack.meta.get("status") == "applied"
        t_end = time.monotonic()
        share = _shm_share(ps, pulls + 1, pushes + 1)   # the warm-up step included
        ps.leave()
    return {"applied": n, "t_start": t_start, "t_end": t_end, **share}


class _MemoryWatch:
    """Samples a process's resident memory every 20 ms in a thread: the peaks of its private (anonymous)
    pages and of the shared-memory pages it maps, which VmHWM does not tell apart."""

    def __init__(self, pid: int):
        import threading
        self.pid, self.peak = pid, {"rssanon_mb": 0.0, "rssshmem_mb": 0.0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            now = _proc_memory(self.pid, ("RssAnon", "RssShmem"))
            if not now:
                return
            for key, mb in now.items():
                self.peak[key] = max(self.peak[key], mb)

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join(timeout=5)
        return dict(self.peak)


def capacity(p: int, tensors: int, workers: int, seconds: float, wire: str, out: str, transport: str = "tcp",
             **server) -> dict:
    """Async server (Adam): pushes applied per second with `workers` processes pushing as fast as they can
    (over same-host shared memory with transport "shm": then "shm_share" counts what went through it).
    `server`: more ServerConfig fields (--max-pushes-in-flight, --snapshot-buffers)."""
    from paramserver.bench.procs import run_workers
    proc, address = _start_server(out, workers, "adam", **server)
    idle = _proc_memory(proc.pid).get("vmrss_mb", 0.0)
    watch = _MemoryWatch(proc.pid)
    try:
        rows, wall = run_workers(_pusher, workers, (address, p, tensors, seconds, wire, transport),
                                 timeout=seconds + 300)
    finally:
        peaks = watch.stop()
        info = _stop_server(proc, address)
    applied = sum(r["applied"] for r in rows)
    theta_mb = p * 4 / 2**20
    # over the pushing itself: from the first worker's first pull to the last worker's last ACK (not the
    # processes' start-up, goodbyes and reports, which `wall_s` includes)
    window = max(r["t_end"] for r in rows) - min(r["t_start"] for r in rows)
    snaps = info["status"].get("snapshots", {})
    result = {"pushes_per_s": round(applied / window, 2), "applied": applied, "window_s": round(window, 3),
              "wall_s": round(wall, 3), "snapshots": snaps,
              "peak_anon_over_theta": round(peaks["rssanon_mb"] / theta_mb, 2),
              "peak_shmem_over_theta": round(peaks["rssshmem_mb"] / theta_mb, 2),
              "rss_mb": info.get("vmrss_mb"), "peak_rss_mb": info.get("vmhwm_mb"),
              "idle_rss_mb": idle, "peak_rss_over_theta": round(info.get("vmhwm_mb", 0) / theta_mb, 2),
              "peak_minus_idle_over_theta": round((info.get("vmhwm_mb", 0) - idle) / theta_mb, 2),
              "processes": workers + 1, "cores": os.cpu_count(), "server_threads": info["status"].get("threads"),
              "server_time_s": info["status"].get("time_s", {}),   # where the server thread's time went (all of
              "server_applied": info["status"].get("counters", {}).get("applied", 0)}   # its life: every push)
    if transport == "shm":
        result["shm_share"] = {k: sum(r[k] for r in rows) for k in ("pulls", "pushes", "shm_pulls", "shm_pushes")}
    return result


def convergence(steps: int, wire: str, out: str, seeds: list[int] = (0,)) -> dict:
    """The default GPT job, 4 workers, sync, `steps` steps, once per seed: the final held-out losses with this
    wire dtype (final_eval_loss: their mean)."""
    from common.config import ClusterConfig, WorkerConfig
    from paramserver.cluster import run_cluster
    losses, t0 = [], time.perf_counter()
    for seed in seeds:
        folder = os.path.join(out, f"convergence_{wire}_seed{seed}")
        ccfg = ClusterConfig(workers=4, out=folder, sample_bytes=0, progress_every=1e9)
        scfg = ServerConfig(num_workers=4, log_level="warning")
        extra = {"wire_dtype": wire} if wire != "fp32" else {}
        wcfg = WorkerConfig(num_workers=4, steps=steps, log_every=0, eval_every=0, log_level="warning", seed=seed,
                            **extra)
        run_cluster(ccfg, scfg, wcfg)
        with open(os.path.join(folder, "metrics.json")) as f:
            losses.append(json.load(f)["summary"].get("final_eval_loss"))
    known = [x for x in losses if x is not None]
    return {"final_eval_loss": sum(known) / len(known) if known else None, "losses": losses, "seeds": list(seeds),
            "wall_s": round(time.perf_counter() - t0, 1)}
