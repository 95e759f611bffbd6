"""`paramserver bench throughput`: the server and the wire against their limits, measured in one run.

For each parameter count P (split into `--tensors` equal float32 tensors, like a model's layers) it
measures, in this order and on this machine:

* limits: a raw ZeroMQ round trip (DEALER -> ROUTER in another process: send P float32, receive P
  float32, zero-copy, the same transport and the same frames as paramserver's), and in-place
  updates with torch on the server's thread count (`_foreach_add_`, `Adam(fused=True)`), each timed
  repetition by repetition with what it limits (interleaved: both sides of a ratio see the same load);
* paramserver: the push+pull round trip of one worker against a `paramserver server` process
  (async, sgd); the server's apply time per optimizer (gradient check + update, in process); the
  async server's capacity (pushes applied per second) with 1, 2 and 4 pushing processes (Adam),
  and the server's resident memory (VmHWM) against theta's fp32 size;
* the same round trip and capacity with every `--wire-dtypes` (bf16, fp16: half the bytes);
* with `--transports` naming shm: the same round trip and capacity (fp32) over same-host shared
  memory (worker/shmclient.py: theta read from the server's /dev/shm snapshot, gradients written into
  the worker's own segment, only small messages on the socket), beside tcp's;
* with `--shards`: the aggregate push+pull throughput of K shard processes x N workers for every
  transport (paramserver/bench/shards.py's measurement), with the processes-per-core of each row.

Optionally (`--convergence-steps N`) it trains the default GPT job with 4 workers for N sync steps
per wire dtype and compares the held-out loss. It prints a table and writes `throughput.json`.

Usage::

    paramserver bench throughput --sizes 1M,10M,25M --out runs/throughput
    paramserver bench throughput --sizes 25M --wire-dtypes fp32 --shards "" --transports shm,tcp   # capacity only
"""
from __future__ import annotations

import dataclasses
import json
import multiprocessing as mp
import os
import platform
import tempfile
import time
from dataclasses import dataclass

import numpy as np

from common.config import ServerConfig, opt
from common.tuning import keep_freed_memory

WIRE = {"fp32": 4, "bf16": 2, "fp16": 2}


def _count(text: str) -> int:
    text = text.strip().upper()
    mult = {"K": 10**3, "M": 10**6, "G": 10**9}.get(text[-1:], 1)
    try:
        return int(float(text[:-1] if mult > 1 else text) * mult)
    except ValueError:
        raise ValueError(f"--sizes: {text!r} is not a parameter count (e.g. 1M, 250K, 25000000)") from None


@dataclass
class ThroughputConfig:
    """Configuration of `paramserver bench throughput`."""

    sizes: str = opt("1M,10M,25M", "comma-separated parameter counts (K/M suffixes), each one benchmark")
    tensors: int = opt(16, "theta is split into this many equal float32 tensors")
    reps: int = opt(8, "round trips / applies measured per figure (the best is reported: other load on the "
                       "machine only adds time)")
    seconds: float = opt(4.0, "seconds each capacity measurement pushes for")
    workers: str = opt("1,2,4", "comma-separated numbers of pushing processes for the async capacity")
    optimizers: str = opt("sgd,momentum,adam", "comma-separated optimizers whose apply time is measured")
    wire_dtypes: str = opt("fp32,bf16", "comma-separated wire dtypes for the round trip and capacity")
    transports: str = opt("shm,tcp", "comma-separated transports: shm adds the round trip and capacity over "
                                     "same-host shared memory (fp32) beside tcp's; the shard table measures each "
                                     "(empty: tcp only, no shard table)")
    shards: str = opt("1,2", "comma-separated shard counts K of the shard table (aggregate push+pull of K shards x "
                             "--workers workers per transport; empty: skip it)")
    shard_params: str = opt("10M", "parameter count of theta in the shard table (one float32 tensor, split over "
                                   "the shards)")
    convergence_steps: int = opt(0, "also train the default GPT job (4 workers, sync) this many steps per wire "
                                    "dtype and compare held-out losses (0: skip)")
    convergence_seeds: str = opt("0", "comma-separated seeds (model init, sharding, batch order) of the convergence "
                                      "runs: each wire dtype trains once per seed; with two or more the table "
                                      "also shows fp32's spread between seeds, the noise a difference must beat")
    out: str = opt("runs/throughput", "output folder for throughput.json")
    max_pushes_in_flight: int = opt(2, "the capacity server's --max-pushes-in-flight (memory against speed)")
    snapshot_buffers: int = opt(2, "the capacity server's --snapshot-buffers (memory against speed)")
    server_threads: int = opt(0, "the capacity server's --threads (0: torch's default, one per core; `paramserver "
                                 "cluster` gives cores / (workers + shards): 1 with 4 workers on 2 cores)")

    def __post_init__(self):
        self.size_list  # validates
        if self.tensors < 1 or self.reps < 1 or self.seconds <= 0:
            raise ValueError("--tensors and --reps must be >= 1 and --seconds > 0")
        if self.server_threads < 0:
            raise ValueError(f"--server-threads must be >= 0 (0: torch's default), not {self.server_threads}")
        for w in self.wire_list:
            if w not in WIRE:
                raise ValueError(f"unknown wire dtype {w!r} in --wire-dtypes; choose from {', '.join(WIRE)}")
        for o in self.optimizer_list:
            if o not in ("sgd", "momentum", "adam"):
                raise ValueError(f"unknown optimizer {o!r} in --optimizers; choose from sgd, momentum, adam")
        for t in self.transport_list:
            if t not in ("shm", "tcp"):
                raise ValueError(f"unknown transport {t!r} in --transports; choose from shm, tcp")
        try:
            bad = [k for k in self.shard_list if k < 1]
        except ValueError:
            raise ValueError(f"--shards {self.shards!r} must be comma-separated shard counts, e.g. 1,2") from None
        if bad:
            raise ValueError(f"--shards {self.shards!r}: every shard count must be at least 1")
        if self.shard_list and not self.transport_list:
            raise ValueError("--shards needs at least one of --transports shm,tcp (or give --shards \"\")")
        if _count(self.shard_params) < 1:
            raise ValueError("--shard-params must be at least 1")
        try:
            seeds = self.seed_list
        except ValueError:
            raise ValueError(f"--convergence-seeds {self.convergence_seeds!r} must be comma-separated integers") from None
        if not seeds or len(set(seeds)) != len(seeds):
            raise ValueError(f"--convergence-seeds {self.convergence_seeds!r}: give at least one seed, each once")

    @property
    def size_list(self) -> list[int]:
        return [_count(s) for s in self.sizes.split(",") if s.strip()]

    @property
    def worker_list(self) -> list[int]:
        return [int(s) for s in self.workers.split(",") if s.strip()]

    @property
    def optimizer_list(self) -> list[str]:
        return [s.strip() for s in self.optimizers.split(",") if s.strip()]

    @property
    def wire_list(self) -> list[str]:
        return [s.strip() for s in self.wire_dtypes.split(",") if s.strip()]

    @property
    def transport_list(self) -> list[str]:
        return [s.strip() for s in self.transports.split(",") if s.strip()]

    @property
    def seed_list(self) -> list[int]:
        return [int(s) for s in self.convergence_seeds.split(",") if s.strip()]

    @property
    def shard_list(self) -> list[int]:
        return [int(s) for s in self.shards.split(",") if s.strip()]


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
    from paramserver.cluster import start_server
    scfg = ServerConfig(bind="tcp://127.0.0.1:*", num_workers=num_workers, mode="async", optimizer=optimizer,
                        lr=1e-4, log_level="warning", worker_timeout=600, max_message_mb=4096, **server)
    return start_server(scfg, out)


def _stop_server(proc, address: str) -> dict:
    from paramserver.cluster import shutdown
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


# -- the run ------------------------------------------------------------------------------------

def run_throughput(cfg: ThroughputConfig) -> dict:
    keep_freed_memory()   # this process is the client of the round trips (raw and paramserver alike)
    os.makedirs(cfg.out, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="ps-throughput-")
    machine = {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
               "commit": source_commit(), "load_avg": os.getloadavg()[0]}   # which code, and how busy the machine was
    results = {"config": dataclasses.asdict(cfg), "machine": machine, "sizes": []}
    t_start = time.perf_counter()
    for p in cfg.size_list:
        r = {"params": p, "theta_mb": round(p * 4 / 2**20, 1)}
        print(f"P = {p:,}: apply and its torch limits, interleaved ...", flush=True)
        r["torch"], r["apply_ms"] = apply_and_limits(p, cfg.tensors, cfg.reps, cfg.optimizer_list)
        lanes = cfg.wire_list + (["fp32 over shm"] if "shm" in cfg.transport_list else [])
        print(f"P = {p:,}: round trips, raw ZeroMQ and {', '.join(lanes)} interleaved ...", flush=True)
        trips = round_trips(p, cfg.tensors, cfg.reps, cfg.wire_list, tmp, shm="shm" in cfg.transport_list)
        r["raw_zmq_ms"], r["server_handle_ms"] = trips["raw_zmq_ms"], trips["server_handle_ms"]
        if "raw_zmq_half_ms" in trips:
            r["raw_zmq_half_ms"] = trips["raw_zmq_half_ms"]
        r["wire"] = {}
        for wire in cfg.wire_list:
            w = {"bytes": p * WIRE[wire], **trips["wire"][wire]}
            w["capacity"] = {}
            for n in cfg.worker_list:
                print(f"P = {p:,}, wire {wire}: capacity with {n} workers ...", flush=True)
                w["capacity"][str(n)] = capacity(p, cfg.tensors, n, cfg.seconds, wire, tmp,
                                                 max_pushes_in_flight=cfg.max_pushes_in_flight,
                                                 snapshot_buffers=cfg.snapshot_buffers, threads=cfg.server_threads)
            r["wire"][wire] = w
        if "shm" in cfg.transport_list:
            r["shm"] = dict(trips["shm"])
            r["shm"]["capacity"] = {}
            for n in cfg.worker_list:
                print(f"P = {p:,}, shared memory: capacity with {n} workers ...", flush=True)
                r["shm"]["capacity"][str(n)] = capacity(p, cfg.tensors, n, cfg.seconds, "fp32", tmp, transport="shm",
                                                        max_pushes_in_flight=cfg.max_pushes_in_flight,
                                                        snapshot_buffers=cfg.snapshot_buffers,
                                                        threads=cfg.server_threads)
        results["sizes"].append(r)
        _write(cfg, results)
    if cfg.shard_list:
        from paramserver.bench.shards import measure
        results["shards"] = []
        size = _count(cfg.shard_params)
        for k in cfg.shard_list:
            for n in cfg.worker_list:
                for transport in cfg.transport_list:
                    print(f"shards: {k} shards x {n} workers over {transport}, {size:,} values ...", flush=True)
                    results["shards"].append(measure(k, n, transport, size, cfg.seconds, tmp))
                    _write(cfg, results)
    if cfg.convergence_steps:
        results["convergence"] = {}
        for wire in cfg.wire_list:
            print(f"convergence: default GPT job, {cfg.convergence_steps} sync steps, wire {wire} ...", flush=True)
            results["convergence"][wire] = convergence(cfg.convergence_steps, wire, tmp, cfg.seed_list)
    results["wall_s"] = round(time.perf_counter() - t_start, 1)
    results["machine"]["load_avg_end"] = os.getloadavg()[0]
    _write(cfg, results)
    return results


def _write(cfg: ThroughputConfig, results: dict) -> None:
    with open(os.path.join(cfg.out, "throughput.json"), "w") as f:
        json.dump(results, f, indent=1)


def table(results: dict) -> str:
    """The results as a markdown table (ratios against the limits measured in the same run)."""
    workers = " / ".join(results["config"]["workers"].split(","))
    rows = ["| P | wire | MB per push | raw zmq RT ms | push+pull RT ms | raw / push+pull | apply ms sgd / momentum / "
            "adam (check) | torch add_ / fused Adam ms | adam / fused Adam | add_ / sgd | async pushes/s "
            f"({workers} workers) | server peak RSS / theta (above idle; private pages) |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results["sizes"]:
        ap = r["apply_ms"]
        tl = r["torch"]
        for wire, w in r["wire"].items():
            cap = w["capacity"]
            caps = " / ".join(str(cap[k]["pushes_per_s"]) for k in cap)
            last = cap[list(cap)[-1]] if cap else {}
            adam = f"{ap['adam'] / tl['adam_fused_ms']:.2f}x" if "adam" in ap else "-"
            sgd = f"{tl['add_ms'] / ap['sgd']:.2f}x" if "sgd" in ap else "-"
            rows.append(
                f"| {r['params'] / 1e6:g}M | {wire} | {w['bytes'] / 1e6:g} | {r['raw_zmq_ms']} | "
                f"{w['round_trip_ms']} | {r['raw_zmq_ms'] / w['round_trip_ms']:.2f}x | "
                f"{' / '.join(str(ap.get(o, '-')) for o in ('sgd', 'momentum', 'adam'))} ({ap.get('check', '-')}) | "
                f"{tl['add_ms']} / {tl['adam_fused_ms']} | {adam} | {sgd} | "
                f"{caps} | {last.get('peak_rss_over_theta', '-')}x ({last.get('peak_minus_idle_over_theta', '-')}x; "
                f"{last.get('peak_anon_over_theta', '-')}x) |")
    for r in results["sizes"]:
        fp32 = r["wire"].get("fp32")
        for wire, w in r["wire"].items():
            if wire != "fp32" and fp32:
                caps = ", ".join(f"{k} workers {w['capacity'][k]['pushes_per_s'] / c['pushes_per_s']:.2f}x"
                                 for k, c in fp32["capacity"].items() if k in w["capacity"] and c["pushes_per_s"])
                limit = (f" (raw ZeroMQ at half the bytes: {r['raw_zmq_ms'] / r['raw_zmq_half_ms']:.2f}x faster)"
                         if r.get("raw_zmq_half_ms") else "")
                rows.append(f"\n{r['params'] / 1e6:g}M, {wire} vs fp32: bytes {w['bytes'] / fp32['bytes']:.2f}x, "
                            f"round trip {fp32['round_trip_ms'] / w['round_trip_ms']:.2f}x faster{limit}, "
                            f"capacity {caps}")
    conv = results.get("convergence")
    if conv:
        rows.append("")
        rows.append("| wire | held-out loss after the run (mean of the seeds) | per seed | vs fp32 | wall s |")
        rows.append("|---|---|---|---|---|")
        base = conv.get("fp32", {}).get("final_eval_loss")
        for wire, c in conv.items():
            rel = f"{(c['final_eval_loss'] / base - 1) * 100:+.2f}%" if base and c.get("final_eval_loss") else "-"
            per = " / ".join(f"{x:.4f}" if x is not None else "-" for x in c.get("losses", [c.get("final_eval_loss")]))
            mean = f"{c['final_eval_loss']:.4f}" if c.get("final_eval_loss") is not None else "-"
            rows.append(f"| {wire} | {mean} | {per} | {rel} | {c['wall_s']} |")
        fp32 = [x for x in conv.get("fp32", {}).get("losses", []) if x is not None]
        if len(fp32) > 1:
            rows.append(f"\nfp32's spread between seeds: {(max(fp32) - min(fp32)) / min(fp32) * 100:.2f}% "
                        "(a wire's difference within it is noise)")
    return "\n".join(rows)


def time_notes(results: dict) -> str:
    """Where the time goes, from the same run: the round trip's ceiling (a server that checks and applies the
    whole gradient before it answers adds at least its apply to the raw round trip) and, for each capacity
    lane at its most workers, the server thread's busy time per applied push split by phase (status time_s)."""
    from paramserver.metrics import time_split
    rows = []
    for r in results["sizes"]:
        size = f"{r['params'] / 1e6:g}M"
        fp32, sgd = r["wire"].get("fp32"), r["apply_ms"].get("sgd")
        if fp32 and sgd:
            raw = r["raw_zmq_ms"]
            rows.append(f"- {size}, round trip: raw / (raw + the server's sgd apply) = {raw:g} / ({raw:g} + {sgd:g}) = "
                        f"{raw / (raw + sgd):.2f}x at best for an apply before the answer; measured "
                        f"{raw / fp32['round_trip_ms']:.2f}x (shared memory: {raw / r['shm']['round_trip_ms']:.2f}x)"
                        if "shm" in r else
                        f"- {size}, round trip: raw / (raw + the server's sgd apply) = {raw:g} / ({raw:g} + {sgd:g}) = "
                        f"{raw / (raw + sgd):.2f}x at best for an apply before the answer; measured "
                        f"{raw / fp32['round_trip_ms']:.2f}x")
        lanes = [(f"{wire} tcp", w.get("capacity", {})) for wire, w in r["wire"].items()]
        if "shm" in r:
            lanes.append(("fp32 shm", r["shm"].get("capacity", {})))
        for name, caps in lanes:
            if not caps:
                continue
            n = list(caps)[-1]
            c = caps[n]
            per = c.get("server_applied") or c.get("applied")
            if c.get("server_time_s") and per:
                rows.append(f"- {size}, {name}, {n} workers ({c['pushes_per_s']} pushes/s): server "
                            f"{time_split(c['server_time_s'], per=per)}")
    return ("where the time goes (same run):\n" + "\n".join(rows)) if rows else ""


def _share(share: dict | None) -> str:
    """'100% / 100%': the pulls / pushes that went through shared memory."""
    if not share:
        return "-"
    return (f"{share['shm_pulls'] / max(1, share['pulls']):.0%} / "
            f"{share['shm_pushes'] / max(1, share['pushes']):.0%}")


def shm_table(results: dict) -> str:
    """Same-host shared memory against tcp (fp32, the same run): round trip and async capacity (Adam)."""
    sizes = [r for r in results["sizes"] if "shm" in r and "fp32" in r["wire"]]
    if not sizes:
        return ""
    cpus = results["machine"]["cpus"]
    workers = list(sizes[0]["shm"]["capacity"])
    rows = [f"same-host shared memory vs tcp, fp32 (a step moves theta through /dev/shm: only small messages on the "
            f"socket); capacity = async pushes applied/s, Adam, 1 server + N pushing processes on {cpus} cores",
            "",
            f"| P | push+pull RT ms tcp / shm | shm speed-up | async pushes/s tcp ({' / '.join(workers)} workers) | "
            f"async pushes/s shm | shm / tcp | pulls / pushes via shm | server private memory / theta, shm | "
            f"oversubscribed |",
            "|---|---|---|---|---|---|---|---|---|"]
    for r in sizes:
        tcp, shm = r["wire"]["fp32"], r["shm"]
        caps_t = [tcp["capacity"].get(n, {}).get("pushes_per_s") for n in workers]
        caps_s = [shm["capacity"][n]["pushes_per_s"] for n in workers]
        ratio = " / ".join(f"{b / a:.2f}x" if a else "-" for a, b in zip(caps_t, caps_s))
        over = [n for n in workers if shm["capacity"][n]["processes"] > cpus]
        shares = {"pulls": 0, "pushes": 0, "shm_pulls": 0, "shm_pushes": 0}
        for c in shm["capacity"].values():
            for k in shares:
                shares[k] += c["shm_share"][k]
        rows.append(f"| {r['params'] / 1e6:g}M | {tcp['round_trip_ms']} / {shm['round_trip_ms']} | "
                    f"{tcp['round_trip_ms'] / shm['round_trip_ms']:.2f}x | "
                    f"{' / '.join(str(c) for c in caps_t)} | {' / '.join(str(c) for c in caps_s)} | {ratio} | "
                    f"{_share(shares)} | "
                    f"{' / '.join(str(shm['capacity'][n].get('peak_anon_over_theta', '-')) for n in workers)} | "
                    f"{', '.join(f'{n} workers ({int(n) + 1} processes)' for n in over) or 'no'} |")
    return "\n".join(rows)


def shards_table(results: dict) -> str:
    """The shard table: aggregate push+pull throughput of K shards x N workers, per transport."""
    from paramserver.bench.shards import shm_note
    rows_in = results.get("shards") or []
    if not rows_in:
        return ""
    cpus = results["machine"]["cpus"]
    size = rows_in[0]["size"]
    rows = [f"aggregate push+pull throughput, K shard processes x N worker processes, theta = {size:,} float32 "
            f"({size * 4 / 1e6:g} MB) split over the shards, async sgd, {cpus} cores: a row with more processes than "
            "cores measures an oversubscribed machine",
            "",
            "| shards | workers | transport | steps/s | MB/s (pull + push) | pull ms | push ms | processes / cores "
            "| note |",
            "|---|---|---|---|---|---|---|---|---|"]
    for r in rows_in:
        note = "; ".join(x for x in ("oversubscribed" if r["processes"] > cpus else "", shm_note(r)) if x)
        rows.append(f"| {r['shards']} | {r['workers']} | {r['transport']} | {r['steps_per_s']} | {r['mb_per_s']} | "
                    f"{r['pull_ms']} | {r['push_ms']} | {r['processes']} / {cpus} | {note} |")
    return "\n".join(rows)


def print_throughput(results: dict) -> None:
    m = results["machine"]
    print(f"bench throughput: {m['cpus']} CPUs, torch threads "
          f"{results['sizes'][0]['torch']['threads'] if results['sizes'] else '-'}, wall {results['wall_s']} s, "
          f"commit {m.get('commit') or '-'}, load average {m.get('load_avg', '-')} at the start, "
          f"{m.get('load_avg_end', '-')} at the end")
    if results["sizes"] or results.get("convergence"):
        print(table(results))
    for extra in (shm_table(results), shards_table(results), time_notes(results)):
        if extra:
            print("\n" + extra)
