"""`paramserver bench local`: per-step sync against local steps (local SGD, DiLoCo), async local steps and
int8 pushes with error feedback, at an equal number of trained samples.

Every run trains the same seeded job (the default GPT unless told otherwise) from the same initial θ on the
same shards, `--workers` worker processes with `--samples` trained samples in all (each worker `samples /
(workers * batch_size)` steps; with --local-steps H a push every H of them). For each run it reports what the
server and the workers recorded while it ran: the held-out loss of the final θ, bytes pushed and pulled per
trained sample (counted by each worker's client: every frame of every PUSH and of every reply that carried θ),
the share of worker time spent communicating (pull and push, barrier waits excluded), wall time, and the
time to a target loss that every run reached (rank 0 evaluates the server's θ every `--eval-every` steps).
Runs marked "@N Mb/s" pace every worker's bytes through an EMULATED link of N Mb/s (worker/link.py: the
client sleeps as long as the bytes would take; nothing limits a real network). Runs marked "straggler" slow
the last worker by `--straggler`. In async runs the samples are a budget the workers share (the server's
--max-gradients: samples / (batch x H) pushes, then every worker is told to stop), so faster workers train
more of them, as a straggler-tolerant system should; sync runs train `samples / workers` each. Through the socket only (--no-shm): bytes are what a network would carry.
`--repeats R` runs everything with seeds seed..seed+R-1; tables give the median and [min, max].

Usage::

    paramserver bench local --quick --out runs/bench-local
"""
from __future__ import annotations

import dataclasses
import json
import os
import threading
import time
from dataclasses import dataclass

import numpy as np

from common.config import JobConfig, ServerConfig, WorkerConfig, opt, subset


@dataclass
class LocalBenchConfig(JobConfig):
    """Configuration of `paramserver bench local` (job flags as for `paramserver worker`)."""

    workers: int = opt(4, "worker processes per run")
    samples: int = opt(51_200, "trained samples per run, all workers together (equal for every run)")
    batch_size: int = opt(16, "samples per step")
    lr: float = opt(0.003, "per-step runs: the server's Adam learning rate; local-step runs: the inner AdamW's")
    h_values: str = opt("10,50", "comma-separated H of the local-step runs with outer averaging")
    nesterov_lrs: str = opt("0.1,0.3,0.7", "outer Nesterov (momentum 0.9) learning rates tried at the largest H")
    link: float = opt(100.0, "the emulated link of the '@ Mb/s' runs (0: no such runs)")
    straggler: float = opt(2.0, "slowdown of the last worker in the straggler runs (1: no such runs)")
    eval_every: int = opt(50, "rank 0 evaluates the server's θ every this many steps")
    eval_batches: int = opt(8, "held-out batches per evaluation (and for the final θ)")
    plan: str = opt("full", "full: every run below; quick: a small model, 6.4k samples and fewer runs",
                    ("full", "quick"))
    only: str = opt("", "comma-separated run names (as printed, e.g. 'sync H=1,avg H=50'): run just these")
    repeats: int = opt(1, "run everything this many times (seeds seed, seed+1, ...): medians and ranges")
    out: str = opt("runs/bench-local", "output folder: results.json, report.md, loss_vs_bytes.png, "
                                       "loss_vs_time.png, runs/*/worker*.json")

    def __post_init__(self):
        super().__post_init__()
        if self.plan == "quick":
            self.n_layer, self.n_embd, self.n_head, self.context = 1, 32, 2, 32
            self.max_bytes = min(self.max_bytes or 2_000_000, 2_000_000)
            self.samples = min(self.samples, 6_400)
            self.h_values = ",".join(h for h in self.h_values.split(",") if int(h) <= 10) or "10"
            self.nesterov_lrs = self.nesterov_lrs.split(",")[-1]
            self.eval_every = min(self.eval_every, 10)
        if self.repeats < 1 or self.workers < 2:
            raise ValueError("--repeats must be >= 1 and --workers >= 2")
        if self.steps_per_worker < max(self.h_list):
            raise ValueError(f"--samples {self.samples} gives each of {self.workers} workers "
                             f"{self.steps_per_worker} steps of --batch-size {self.batch_size}: fewer than "
                             f"--h-values {max(self.h_list)}")
        if self.straggler < 1.0 or self.link < 0:
            raise ValueError("--straggler must be >= 1 and --link >= 0")

    @property
    def h_list(self) -> list[int]:
        return [int(h) for h in self.h_values.split(",") if h.strip()]

    @property
    def steps_per_worker(self) -> int:
        return self.samples // (self.workers * self.batch_size)


def planned_runs(cfg: LocalBenchConfig) -> list[dict]:
    """[{name, server: ServerConfig kwargs, worker: WorkerConfig kwargs, straggler}] in the order they run."""
    per_step = {"optimizer": "adam", "lr": cfg.lr}
    avg = {"optimizer": "sgd", "lr": 1.0}
    h_max = max(cfg.h_list)

    def run(name, server, worker=None, straggler=False, mode="sync"):
        return {"name": name, "server": {"mode": mode, **server}, "worker": dict(worker or {}),
                "straggler": straggler}
    runs = [run("sync H=1", per_step), run("sync H=1 bf16", per_step, {"wire_dtype": "bf16"}),
            run("sync H=1 int8+EF", per_step, {"compress": "int8"})]
    runs += [run(f"avg H={h}", avg, {"local_steps": h}) for h in cfg.h_list]
    runs += [run(f"nesterov H={h_max} lr={lr}", {"optimizer": "nesterov", "lr": float(lr), "momentum": 0.9},
                 {"local_steps": h_max}) for lr in cfg.nesterov_lrs.split(",") if lr.strip()]
    runs.append(run(f"avg H={h_max} int8+EF", avg, {"local_steps": h_max, "compress": "int8"}))
    if cfg.straggler > 1.0:
        runs += [run(f"avg H={h_max} straggler", avg, {"local_steps": h_max}, straggler=True),
                 run(f"async avg H={h_max} straggler", avg, {"local_steps": h_max}, True, "async"),
                 run(f"async dN H={h_max} straggler", {"optimizer": "delayed-nesterov", "lr": 0.3,
                                                       "momentum": 0.9}, {"local_steps": h_max}, True, "async")]
    if cfg.link > 0:
        link = {"link_mbps": cfg.link}
        runs += [run(f"sync H=1 @{cfg.link:g}Mb/s", per_step, link),
                 run(f"avg H={h_max} @{cfg.link:g}Mb/s", avg, {"local_steps": h_max, **link})]
    if cfg.plan == "quick":
        keep = {"sync H=1", "sync H=1 int8+EF", f"avg H={h_max}", f"async avg H={h_max} straggler",
                f"avg H={h_max} @{cfg.link:g}Mb/s"}
        runs = [r for r in runs if r["name"] in keep]
    if cfg.only:
        wanted = [n.strip() for n in cfg.only.split(",") if n.strip()]
        unknown = [n for n in wanted if n not in {r["name"] for r in runs}]
        if unknown:
            raise ValueError(f"--only: no run named {', '.join(map(repr, unknown))}; the plan has "
                             f"{', '.join(r['name'] for r in runs)}")
        runs = [r for r in runs if r["name"] in wanted]
    return runs


def run_one(cfg: LocalBenchConfig, run: dict, folder: str) -> dict:
    """One run: the server in this process (a thread), the workers as processes; returns what they recorded."""
    from paramserver.launch import start_workers
    from paramserver.server import Server
    h = run["worker"].get("local_steps", 1)
    shared = run["server"]["mode"] != "sync"   # async: a budget of pushes the workers share (module docstring)
    budget = cfg.steps_per_worker * cfg.workers // h if shared else 0
    server = Server(ServerConfig(bind="tcp://127.0.0.1:*", num_workers=cfg.workers, aggregate="mean",
                                 log_level="warning", worker_timeout=120, threads=1, max_gradients=budget,
                                 **run["server"]))
    address = server.bind()
    loop = threading.Thread(target=server.serve_forever, daemon=True)
    loop.start()
    steps = cfg.steps_per_worker * (cfg.workers if shared else 1)   # shared: the server says when to stop
    wcfg = subset(cfg, WorkerConfig, steps=steps, num_workers=cfg.workers, rank=0, log_every=0,
                  threads=1, device="cpu", heartbeat=1.0, log_level="warning", shm=False, inner_lr=cfg.lr,
                  **run["worker"])
    slow = {cfg.workers - 1: cfg.straggler} if run["straggler"] else None
    t0 = time.time()
    procs = start_workers(wcfg, cfg.workers, address, folder, slow, threads=1)
    codes = [p.wait(timeout=7200) for p in procs]
    wall = time.time() - t0
    server.stop()
    loop.join(timeout=30)
    server.close()
    if any(codes):
        raise RuntimeError(f"run {run['name']}: workers exited with {codes}; see {folder}/worker*.log")
    workers = []
    for r in range(cfg.workers):
        with open(os.path.join(folder, f"worker{r}.json")) as f:
            workers.append(json.load(f))
    return {"workers": workers, "theta": server.store.theta, "wall_s": wall, "version": server.store.version,
            "server_bytes": server.status().get("bytes", {})}


def summarize(cfg: LocalBenchConfig, run: dict, raw: dict, final_eval: float) -> dict:
    """The figures of one run, from the workers' metrics (see the module docstring)."""
    ws = raw["workers"]
    # samples behind the pushes the server kept: a round whose push came after an async budget was spent (its
    # row's status "dropped") trained nothing that θ kept (a round's steps: the worker's steps per row)
    trained = cfg.batch_size * sum(_kept_steps(w) for w in ws)
    pushed = sum(w["client"].get("bytes_pushed", 0) for w in ws)
    pulled = sum(w["client"].get("bytes_pulled", 0) for w in ws)
    shares = []
    for w in ws:
        rows = np.array([s[4:8] for s in w["steps"]], dtype=float) if w["steps"] else np.zeros((1, 4))
        total = rows.sum()
        shares.append(float(rows[:, 2].sum() / total) if total > 0 else 0.0)
    evals = [(e[0], e[3], e[1]) for e in ws[0]["evals"]]   # (time_s, loss, steps trained by rank 0)
    return {"name": run["name"], "final_eval_loss": final_eval, "wall_s": raw["wall_s"], "samples": trained,
            "pushes": sum(len(w["steps"]) for w in ws), "updates": raw["version"],
            "worker_steps": [w.get("inner_steps", len(w["steps"])) for w in ws],
            "push_bytes_per_sample": pushed / max(1, trained), "bytes_per_sample": (pushed + pulled) / max(1, trained),
            "comm_share": float(np.mean(shares)), "link_s": float(np.mean([w["client"].get("link_s", 0.0) for w in ws])),
            "evals": evals}


def _kept_steps(w: dict) -> int:
    steps = w.get("inner_steps", len(w["steps"]))
    dropped = sum(1 for row in w["steps"] if str(row[8]).startswith("dropped"))
    return round(steps * (1 - dropped / len(w["steps"]))) if w["steps"] else steps


def time_to(evals: list, target: float) -> float | None:
    """Seconds (rank 0's clock) until the server's θ first evaluated at or below `target`."""
    return next((t for t, loss, _ in evals if loss <= target), None)


def run_bench(cfg: LocalBenchConfig) -> dict:
    from paramserver.bench.local_report import print_tables, write_report
    from worker.models import build_job
    os.makedirs(cfg.out, exist_ok=True)
    runs = planned_runs(cfg)
    print(f"paramserver bench local: {len(runs)} runs x {cfg.repeats} repeat(s), {cfg.workers} workers, "
          f"{cfg.samples} samples per run ({cfg.steps_per_worker} steps of {cfg.batch_size} per worker), "
          f"{os.cpu_count()} CPU cores shared by the workers and the server; links marked @ are EMULATED",
          flush=True)
    results = []
    for rep in range(cfg.repeats):
        rcfg = dataclasses.replace(cfg, seed=cfg.seed + rep)
        job = build_job(subset(rcfg, JobConfig), "cpu")
        for i, run in enumerate(runs):
            folder = os.path.join(cfg.out, "runs", f"s{rcfg.seed}-{i:02d}-" + "".join(
                c if c.isalnum() or c in "=." else "_" for c in run["name"]))
            os.makedirs(folder, exist_ok=True)
            raw = run_one(rcfg, run, folder)
            job.load_params(raw["theta"])
            res = summarize(rcfg, run, raw, job.eval_loss(rcfg.eval_batches, rcfg.batch_size))
            res["seed"] = rcfg.seed
            results.append(res)
            print(f"[{len(results):2d}/{len(runs) * cfg.repeats}] seed {rcfg.seed} {run['name']:32s} eval "
                  f"{res['final_eval_loss']:.4f}  {res['bytes_per_sample']:9.0f} B/sample  comm "
                  f"{100 * res['comm_share']:5.1f}%  {res['wall_s']:6.1f}s", flush=True)
    report = {"config": dataclasses.asdict(cfg), "runs": results, "cores": os.cpu_count()}
    write_report(report, cfg.out)
    print_tables(report)
    return report
