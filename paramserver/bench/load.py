"""`paramserver bench load`: many lightweight workers against one server, for a bounded time.

A server process (async mode, plain SGD, sum aggregation, lr 1) holds one tensor w = 0. Each of
N worker threads pulls and pushes g = 1 as fast as it can, optionally through injected message
loss and duplication. Every push acknowledged as applied must have moved w by exactly -1, so at
the end w == -applied everywhere: no update lost, none applied twice. Prints throughput and the
client round-trip and server handling latency percentiles.

Usage::

    paramserver bench load --workers 32 --seconds 10 --drop 0.02
"""
from __future__ import annotations

import dataclasses
import json
import os
import threading
import time
from dataclasses import dataclass

import numpy as np

from common.config import ServerConfig, opt


@dataclass
class LoadConfig:
    """Configuration of `paramserver bench load`."""

    workers: int = opt(32, "worker threads")
    seconds: float = opt(10.0, "how long the workers push")
    size: int = opt(1024, "float32 values in the one parameter tensor")
    drop: float = opt(0.0, "fraction of requests and replies each client drops (forces resends)")
    dup: float = opt(0.0, "fraction of requests each client sends twice")
    out: str = opt("", "folder (created if missing) for server.log, the server's metrics (server_metrics.json: "
                       "status, counters, handling times) and load.json (these figures); empty: a temporary folder")

    def __post_init__(self):
        if self.workers < 1 or self.seconds <= 0 or self.size < 1:
            raise ValueError("--workers and --size must be >= 1 and --seconds > 0")


def run_load(cfg: LoadConfig) -> dict:
    import tempfile

    from paramserver.launch import shutdown, start_server
    from worker.client import PSClient
    out = cfg.out or tempfile.mkdtemp(prefix="ps-load-")
    os.makedirs(out, exist_ok=True)
    scfg = ServerConfig(bind="tcp://127.0.0.1:*", num_workers=1, max_workers=max(1, cfg.workers), mode="async", optimizer="sgd", lr=1.0,
                        aggregate="sum", log_level="info", worker_timeout=60,
                        metrics=os.path.join(out, "server_metrics.json"))
    server, address = start_server(scfg, out)
    applied = [0] * cfg.workers
    pushes = [0] * cfg.workers
    lat: dict[str, list[float]] = {"pull": [], "push": []}
    errors: list[BaseException] = []
    lock = threading.Lock()
    start = threading.Barrier(cfg.workers + 1)
    g = {"w": np.ones(cfg.size, np.float32)}

    def worker(rank: int) -> None:
        try:
            with PSClient(address, worker=rank, request_timeout=0.2, server_timeout=30, drop=cfg.drop,
                          duplicate=cfg.dup, fault_seed=rank) as ps:
                ps.register(init={"w": np.zeros(cfg.size, np.float32)})
                start.wait()
                deadline = time.monotonic() + cfg.seconds
                mine = {"pull": [], "push": []}
                while time.monotonic() < deadline:
                    t0 = time.perf_counter()
                    p = ps.pull()
                    t1 = time.perf_counter()
                    ack = ps.push(g, version=p.version, clock=p.clock)
                    t2 = time.perf_counter()
                    mine["pull"].append(t1 - t0)
                    mine["push"].append(t2 - t1)
                    pushes[rank] += 1
                    applied[rank] += ack.meta.get("status") == "applied"
                ps.leave()
                with lock:
                    for k in lat:
                        lat[k] += mine[k]
        except BaseException as exc:
            errors.append(exc)
            start.abort()

    threads = [threading.Thread(target=worker, args=(r,), daemon=True) for r in range(cfg.workers)]
    for t in threads:
        t.start()
    try:
        start.wait(timeout=120)
    except threading.BrokenBarrierError:
        pass
    t0 = time.perf_counter()
    for t in threads:
        t.join(timeout=cfg.seconds + 120)
    wall = time.perf_counter() - t0
    with PSClient(address, server_timeout=10) as ps:
        status = ps.status()
        final = ps.register().tensors["w"].copy()   # a WELCOME carries theta
        ps.leave()
    shutdown(address)
    server.wait(timeout=30)
    if errors:
        raise errors[0]
    total = sum(applied)
    pct = {k: {f"p{q}": round(float(np.percentile(v, q)) * 1e3, 3) for q in (50, 90, 99)} if v else {}
           for k, v in lat.items()}
    result = {"config": dataclasses.asdict(cfg), "wall_s": round(wall, 3), "pushes_acked": sum(pushes),
            "applied_acked": total, "server_applied": status["counters"].get("applied", 0),
            "server_version": status["version"], "duplicates": status["counters"].get("duplicates", 0),
            "theta_exact": bool(np.all(final == -float(total))), "theta_value": float(final[0]),
            "pushes_per_s": round(total / wall, 1), "client_ms": pct, "server_handle_ms": status.get("handle_ms", {}),
            "counters": status["counters"], "out": out}
    with open(os.path.join(out, "load.json"), "w") as f:
        json.dump(result, f, indent=1)
    return result


def print_load(r: dict) -> None:
    c = r["config"]
    print(f"load: {c['workers']} workers x {c['seconds']}s, {c['size']} float32 per push, drop {c['drop']}, "
          f"dup {c['dup']}")
    print(f"  {r['applied_acked']} pushes applied in {r['wall_s']}s = {r['pushes_per_s']} pushes/s "
          f"(server version {r['server_version']}, duplicates ignored {r['duplicates']})")
    print(f"  theta == -applied everywhere: {r['theta_exact']} (w[0] = {r['theta_value']}, applied {r['applied_acked']})")
    for k, v in r["client_ms"].items():
        print(f"  client {k} round trip ms: " + "  ".join(f"{q} {x}" for q, x in v.items()))
    print("  server handling ms per message: " + "  ".join(f"{q} {x}" for q, x in r["server_handle_ms"].items()))
    print(f"  written: {r['out']}/load.json, server_metrics.json, server.log")
