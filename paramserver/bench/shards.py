"""`paramserver bench shards`: aggregate push+pull throughput over K server shards x N workers, shm vs tcp.

For each configuration, K shard processes (async mode, plain SGD, a tiny learning rate) hold one
float32 tensor of --size values (split over the shards by the partition plan), and N worker
processes pull and push it as fast as they can for --seconds. Throughput counts the payload moved
(every pull brings --size floats, every push sends --size floats), summed over workers, measured
in the same run for every configuration. Worker and server processes share this machine's cores:
when they outnumber the cores the figures measure an oversubscribed machine, and the table says so.

Usage::

    paramserver bench shards --shards 1 2 --workers 1 2 4 --size 1000000 --seconds 3
    rows = run_shards(ShardsBenchConfig())       # list of dicts, one per (shards, workers, transport)
"""
from __future__ import annotations

import dataclasses
import os
import tempfile
import time
from dataclasses import dataclass

import numpy as np

from common.config import ServerConfig, opt
from paramserver.bench.procs import run_workers


@dataclass
class ShardsBenchConfig:
    """Configuration of `paramserver bench shards`."""

    shards: str = opt("1,2", "shard counts to measure, comma-separated")
    workers: str = opt("1,2,4", "worker counts to measure, comma-separated")
    transports: str = opt("shm,tcp", "transports to measure, comma-separated (shm: same-host shared memory)")
    size: int = opt(1_000_000, "float32 values in theta (one tensor, split over the shards)")
    seconds: float = opt(3.0, "how long the workers push in each configuration")
    out: str = opt("", "folder for the servers' logs (empty: a temporary folder)")
    overlap_steps: int = opt(60, "steps per worker of the --overlap comparison (small GPT, 2 workers; 0: skip it)")

    def __post_init__(self):
        if self.size < 1 or self.seconds <= 0:
            raise ValueError("--size must be >= 1 and --seconds > 0")
        for name in ("shards", "workers"):
            values = _ints(getattr(self, name), name)
            if not values or min(values) < 1:
                raise ValueError(f"--{name} must list counts >= 1, e.g. 1,2")
        bad = set(self.transports.split(",")) - {"shm", "tcp"}
        if bad:
            raise ValueError(f"unknown --transports {', '.join(sorted(bad))}; choose shm, tcp")


def _ints(text: str, name: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--{name} {text!r} must be comma-separated integers, e.g. 1,2,4") from None


def _worker(rank: int, addresses: list[str], size: int, seconds: float, use_shm: bool, sync) -> dict:
    """One bench worker (run by paramserver/bench/procs.py): pull and push theta for `seconds`."""
    from worker.client import PSClient
    from worker.sharded import ShardedClient
    from worker.shmclient import ShmClient
    cls = ShmClient if use_shm else PSClient
    kwargs = dict(worker=rank, request_timeout=5.0, server_timeout=60)
    client = ShardedClient(addresses, client=cls, **kwargs) if len(addresses) > 1 else cls(addresses[0], **kwargs)
    try:
        if rank:
            sync.registered(rank)   # rank 0 brings theta
        client.register(init={"w": np.zeros(size, np.float32)})
        if not rank:
            sync.registered(rank)
        g = {"w": np.full(size, 1e-9, np.float32)}
        p = client.pull()   # one step before the start, not counted: buffers and (shm) segments are set up once
        client.push(g, version=p.version, clock=p.clock)
        sync.start.wait()
        n, t0 = 0, time.perf_counter()
        pull_s = push_s = 0.0
        while time.perf_counter() - t0 < seconds:
            a = time.perf_counter()
            p = client.pull()
            b = time.perf_counter()
            client.push(g, version=p.version, clock=p.clock)
            push_s += time.perf_counter() - b
            pull_s += b - a
            n += 1
        wall = time.perf_counter() - t0
        stats = client.stats
        client.leave()
        k = len(addresses)   # the warm-up step's pull and push, on every shard connection, left out
        return {"steps": n, "wall_s": wall, "pull_s": pull_s, "push_s": push_s,
                "shm_pulls": max(0, stats.get("shm_pulls", 0) - k),
                "shm_pushes": max(0, stats.get("shm_pushes", 0) - k)}
    finally:
        client.close()


def start_servers(scfg: ServerConfig, shards: int, out: str, log_name: str = "bench") -> tuple[list, list[str]]:
    """K server processes for `scfg` (one unsharded server for K = 1), without checkpoints or metrics files;
    returns (processes, addresses in shard order). Stop them with `stop_servers`."""
    from paramserver.cluster import shard_configs
    from paramserver.launch import start_server
    cfgs = shard_configs(scfg, shards, out) if shards > 1 else [scfg]
    procs, addresses = [], []
    try:
        for i, c in enumerate(cfgs):
            proc, address = start_server(dataclasses.replace(c, checkpoint="", metrics=""), out,
                                         log_name=f"{log_name}-shard{i}.log")
            procs.append(proc)
            addresses.append(address)
    except BaseException:
        stop_servers(procs, addresses)
        raise
    return procs, addresses


def stop_servers(procs: list, addresses: list[str]) -> None:
    from paramserver.launch import shutdown
    for proc, address in zip(procs, addresses):
        if proc.poll() is None:
            shutdown(address)
        try:
            proc.wait(timeout=30)
        except Exception:
            proc.kill()
            proc.wait()


def measure(shards: int, workers: int, transport: str, size: int, seconds: float, out: str) -> dict:
    """One row: K shard processes and N worker processes moving theta for `seconds`. Every figure sums the
    workers' own loops; "shm_pull_share" / "shm_push_share": the fraction that went through shared memory."""
    scfg = ServerConfig(bind="tcp://127.0.0.1:*", num_workers=workers, mode="async", optimizer="sgd", lr=1e-6,
                        log_level="warning", worker_timeout=60, track_divergence=False, shm=transport == "shm")
    procs, addresses = start_servers(scfg, shards, out)
    try:
        rows, _ = run_workers(_worker, workers, (addresses, size, seconds, transport == "shm"),
                              timeout=seconds + 180)
    finally:
        stop_servers(procs, addresses)
    steps = sum(r["steps"] for r in rows)
    if not steps:
        raise RuntimeError(f"no bench worker completed a step in {seconds}s ({shards} shards, {workers} workers, "
                           f"{transport}): give more --seconds")
    wall = max(r["wall_s"] for r in rows)
    moved = steps * 2 * size * 4   # each step: one pull and one push of `size` float32
    return {"shards": shards, "workers": workers, "transport": transport, "size": size,
            "steps": steps, "wall_s": round(wall, 3), "steps_per_s": round(steps / wall, 1),
            "mb_per_s": round(moved / wall / 1e6, 1),
            "pull_ms": round(1e3 * sum(r["pull_s"] for r in rows) / steps, 2),
            "push_ms": round(1e3 * sum(r["push_s"] for r in rows) / steps, 2),
            # the share of pulls and pushes (over every shard connection) that went through shared memory
            "shm_pull_share": round(sum(r["shm_pulls"] for r in rows) / (steps * shards), 3),
            "shm_push_share": round(sum(r["shm_pushes"] for r in rows) / (steps * shards), 3),
            "processes": shards + workers, "cores": os.cpu_count()}


def run_shards(cfg: ShardsBenchConfig) -> list[dict]:
    out = cfg.out or tempfile.mkdtemp(prefix="ps-bench-shards-")
    os.makedirs(out, exist_ok=True)
    rows = []
    for k in _ints(cfg.shards, "shards"):
        for n in _ints(cfg.workers, "workers"):
            for transport in cfg.transports.split(","):
                rows.append(measure(k, n, transport, cfg.size, cfg.seconds, out))
    return rows


def measure_overlap(mode: str, overlap: bool, shards: int, steps: int, out: str) -> dict:
    """Training with 2 worker processes on a small GPT, with or without --overlap: steps/s and time split."""
    import json

    from common.config import WorkerConfig
    from paramserver.launch import start_workers
    scfg = ServerConfig(bind="tcp://127.0.0.1:*", num_workers=2, mode=mode, log_level="warning")
    procs, addresses = start_servers(scfg, shards, out, log_name="ov")
    run = os.path.join(out, f"overlap-{mode}-{overlap}-{shards}")
    os.makedirs(run, exist_ok=True)
    wcfg = WorkerConfig(job="gpt", n_layer=2, n_embd=64, n_head=4, context=64, max_bytes=500_000, steps=steps,
                        eval_every=0, log_every=0, overlap=overlap, num_workers=2)
    try:
        workers = start_workers(wcfg, 2, ",".join(addresses), run, threads=1)
        codes = [w.wait(timeout=600) for w in workers]
    finally:
        stop_servers(procs, addresses)
    if codes != [0, 0]:
        raise RuntimeError(f"overlap bench workers exited with {codes}; see {run}")
    ms = [json.load(open(os.path.join(run, f"worker{r}.json"))) for r in range(2)]
    rows = np.array([s[4:8] for m in ms for s in m["steps"]], dtype=float)
    # steady state: from each worker's first step to its last (start-up and registration left out)
    rate = sum((len(m["steps"]) - 1) / (m["steps"][-1][0] - m["steps"][0][0]) for m in ms)
    return {"mode": mode, "overlap": overlap, "shards": shards, "steps_per_s": round(rate, 2),
            "compute_ms": round(1e3 * rows[:, 0].mean(), 2), "wait_ms": round(1e3 * rows[:, 1].mean(), 2),
            "comm_ms": round(1e3 * rows[:, 2].mean(), 2)}


def run_overlap(cfg: ShardsBenchConfig) -> list[dict]:
    out = cfg.out or tempfile.mkdtemp(prefix="ps-bench-overlap-")
    return [measure_overlap(mode, overlap, shards, cfg.overlap_steps, out)
            for mode in ("sync", "async") for shards in (1, 2) for overlap in (False, True)]


def print_overlap(rows: list[dict]) -> None:
    if not rows:
        return
    print("training with --overlap vs without: 2 workers, GPT 2x64, batch 16, adam (comm excludes barrier wait; "
          "with --overlap a push's time is hidden and partly shows up in the next pull)")
    print(f"{'mode':>5} {'shards':>6} {'overlap':>7} {'steps/s':>8} {'compute ms':>10} {'wait ms':>8} {'comm ms':>8}")
    for r in rows:
        print(f"{r['mode']:>5} {r['shards']:>6} {str(r['overlap']):>7} {r['steps_per_s']:>8} {r['compute_ms']:>10} "
              f"{r['wait_ms']:>8} {r['comm_ms']:>8}")


def shm_note(r: dict) -> str:
    """'' when a shm row moved everything through shared memory, else what went over the socket."""
    if r["transport"] != "shm" or min(r["shm_pull_share"], r["shm_push_share"]) >= 1:
        return ""
    if r["shm_pull_share"] == r["shm_push_share"] == 0:
        return "shm not used (fell back to tcp)"
    return f"shm for {r['shm_pull_share']:.0%} of pulls, {r['shm_push_share']:.0%} of pushes (rest: tcp)"


def print_shards(rows: list[dict]) -> None:
    if not rows:
        return
    cores = rows[0]["cores"]
    print(f"aggregate push+pull throughput, theta = {rows[0]['size']:,} float32 ({rows[0]['size'] * 4 / 1e6:.1f} MB), "
          f"async, {cores} cores on this machine")
    print(f"{'shards':>6} {'workers':>7} {'transport':>9} {'steps/s':>8} {'MB/s':>8} {'pull ms':>8} {'push ms':>8}  note")
    for r in rows:
        note = f"oversubscribed: {r['processes']} processes on {cores} cores" if r["processes"] > cores else ""
        if shm_note(r):
            note = (note + "; " if note else "") + shm_note(r)
        print(f"{r['shards']:>6} {r['workers']:>7} {r['transport']:>9} {r['steps_per_s']:>8} {r['mb_per_s']:>8} "
              f"{r['pull_ms']:>8} {r['push_ms']:>8}  {note}")
