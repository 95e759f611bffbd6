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

This module owns the plan (`ThroughputConfig`, its flags and their checks) and the order of the run
(`run_throughput`); what is measured and how is in paramserver/bench/throughput_measure.py, the tables
the results print as in paramserver/bench/throughput_tables.py.

Usage::

    paramserver bench throughput --sizes 1M,10M,25M --out runs/throughput
    paramserver bench throughput --sizes 25M --wire-dtypes fp32 --shards "" --transports shm,tcp   # capacity only
"""
from __future__ import annotations

import dataclasses
import json
import os
import platform
import tempfile
import time
from dataclasses import dataclass

from common.config import opt
from common.tuning import keep_freed_memory
from paramserver.bench.throughput_measure import apply_and_limits, capacity, convergence, round_trips, source_commit
# still importable from here, where they were before the split (tests/test_tuning.py starts a server with them)
from paramserver.bench.throughput_measure import _start_server, _stop_server, make_theta  # noqa: F401
from paramserver.bench.throughput_tables import shards_table, shm_table, table, time_notes

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


# -- the run ------------------------------------------------------------------------------------

def run_throughput(cfg: ThroughputConfig) -> dict:
    """Every measurement of the plan, in order (each size, then the shard table, then convergence); returns the
    results and writes them to OUT/throughput.json after each size and each shard row."""
    keep_freed_memory()   # this process is the client of the round trips (raw and paramserver alike)
    os.makedirs(cfg.out, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="ps-throughput-")
    machine = {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
               "commit": source_commit(), "load_avg": os.getloadavg()[0]}   # which code, and how busy the machine was
    results = {"config": dataclasses.asdict(cfg), "machine": machine, "sizes": []}
    t_start = time.perf_counter()
    for p in cfg.size_list:
        results["sizes"].append(_measure_size(cfg, p, tmp))
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


def _measure_size(cfg: ThroughputConfig, p: int, tmp: str) -> dict:
    """One entry of results["sizes"]: apply and its limits, the round trips, and the capacity of every lane."""
    r = {"params": p, "theta_mb": round(p * 4 / 2**20, 1)}
    print(f"P = {p:,}: apply and its torch limits, interleaved ...", flush=True)
    r["torch"], r["apply_ms"] = apply_and_limits(p, cfg.tensors, cfg.reps, cfg.optimizer_list)
    shm = "shm" in cfg.transport_list
    lanes = cfg.wire_list + (["fp32 over shm"] if shm else [])
    print(f"P = {p:,}: round trips, raw ZeroMQ and {', '.join(lanes)} interleaved ...", flush=True)
    trips = round_trips(p, cfg.tensors, cfg.reps, cfg.wire_list, tmp, shm=shm)
    r["raw_zmq_ms"], r["server_handle_ms"] = trips["raw_zmq_ms"], trips["server_handle_ms"]
    if "raw_zmq_half_ms" in trips:
        r["raw_zmq_half_ms"] = trips["raw_zmq_half_ms"]
    server = {"max_pushes_in_flight": cfg.max_pushes_in_flight, "snapshot_buffers": cfg.snapshot_buffers,
              "threads": cfg.server_threads}
    r["wire"] = {}
    for wire in cfg.wire_list:
        w = {"bytes": p * WIRE[wire], **trips["wire"][wire]}
        w["capacity"] = {}
        for n in cfg.worker_list:
            print(f"P = {p:,}, wire {wire}: capacity with {n} workers ...", flush=True)
            w["capacity"][str(n)] = capacity(p, cfg.tensors, n, cfg.seconds, wire, tmp, **server)
        r["wire"][wire] = w
    if shm:
        r["shm"] = dict(trips["shm"])
        r["shm"]["capacity"] = {}
        for n in cfg.worker_list:
            print(f"P = {p:,}, shared memory: capacity with {n} workers ...", flush=True)
            r["shm"]["capacity"][str(n)] = capacity(p, cfg.tensors, n, cfg.seconds, "fp32", tmp, transport="shm",
                                                    **server)
    return r


def _write(cfg: ThroughputConfig, results: dict) -> None:
    with open(os.path.join(cfg.out, "throughput.json"), "w") as f:
        json.dump(results, f, indent=1)


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
