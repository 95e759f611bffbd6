"""`paramserver bench consistency`: sync vs backup workers vs ssp vs async vs DDP, with and without a straggler.

Every run trains the same seeded job from the same initial theta on the same shards, and ends
when the same number of gradients (the budget) has been applied, so wall-clock time, loss and
throughput compare like with like. Backup workers compute more gradients than they apply (the late
ones are dropped), so the runs are also compared at an equal number of *computed* gradients (samples
processed, dropped ones included). `--repeats R` runs everything R times with seeds seed..seed+R-1
and reports the median and range of every figure; a ranking is stated only where ranges do not
overlap. Everything reported is recorded by the server and the workers while they run (paramserver/server.py `updates`, worker step timings, rank-0 held-out
evaluations); nothing is estimated afterwards.

Usage::

    paramserver bench consistency --quick --out runs/bench
"""
from __future__ import annotations

import dataclasses
import json
import os
import platform
import threading
import time
from dataclasses import dataclass

import numpy as np

from common.config import JobConfig, ServerConfig, WorkerConfig, opt, subset


SCENARIOS = ("none", "straggler", "jitter")


@dataclass
class BenchConfig(JobConfig):
    """Configuration of `paramserver bench consistency` (job flags as for `paramserver worker`)."""

    workers: int = opt(4, "worker processes per run")
    steps: int = opt(250, "sync steps per run: every run stops after steps x workers applied gradients")
    straggler: float = opt(3.0, "slowdown factor of the straggler (the last worker) in the straggler scenarios")
    staleness: str = opt("1,3", "comma-separated ssp staleness bounds to run")
    backup_workers: int = opt(1, "backup workers b for the sync-with-backups run (first N-b gradients per step)")
    modes: str = opt("sync,backup,ssp,async,ddp", "comma-separated modes to run (sync, backup, ssp, async, ddp)")
    scenarios: str = opt("none,straggler,jitter", "comma-separated scenarios: none; straggler (the last worker is "
                                           "always slow); jitter (every worker is slow on a random 1/N of its "
                                           "steps: the same total delay, spread out and transient)")
    optimizer: str = opt("adam", "update rule (server side; the same torch optimizer for DDP)",
                         ("sgd", "momentum", "adam"))
    lr: float = opt(0.003, "learning rate")
    batch_size: int = opt(16, "samples per gradient")
    eval_every: int = opt(10, "rank 0 evaluates held-out loss every this many of its steps")
    eval_batches: int = opt(4, "held-out batches per evaluation")
    out: str = opt("runs/bench", "output folder: results.json, summary.csv, *.png, report.md")
    quick: bool = opt(False, "a one-minute version: a smaller model and budget, and (unless --scenarios is "
                             "changed) only the none and straggler scenarios")
    repeats: int = opt(1, "run everything this many times (seeds seed, seed+1, ...) and report the median and "
                          "range of every figure; rankings are stated only where the ranges do not overlap")

    def __post_init__(self):
        super().__post_init__()
        if self.repeats < 1:
            raise ValueError("--repeats must be at least 1")
        if self.quick:
            self.steps = min(self.steps, 40)
            if self.scenarios == "none,straggler,jitter":
                self.scenarios = "none,straggler"
            self.n_layer, self.n_embd, self.n_head, self.context = 1, 32, 2, 32
            self.max_bytes = min(self.max_bytes or 2_000_000, 2_000_000)
            self.eval_every = min(self.eval_every, 5)
        for mode in self.mode_list:
            if mode not in ("sync", "backup", "ssp", "async", "ddp"):
                raise ValueError(f"unknown mode {mode!r} in --modes; choose from sync, backup, ssp, async, ddp")
        for sc in self.scenario_list:
            if sc not in SCENARIOS:
                raise ValueError(f"unknown scenario {sc!r} in --scenarios; choose from {', '.join(SCENARIOS)}")
        if not 0 < self.backup_workers < self.workers and "backup" in self.mode_list:
            raise ValueError(f"--backup-workers must be in [1, {self.workers - 1}]")
        if self.straggler < 1.0:
            raise ValueError("--straggler must be >= 1.0")

    @property
    def mode_list(self) -> list[str]:
        return [m.strip() for m in self.modes.split(",") if m.strip()]

    @property
    def scenario_list(self) -> list[str]:
        return [s.strip() for s in self.scenarios.split(",") if s.strip()]

    @property
    def staleness_list(self) -> list[int]:
        try:
            return [int(s) for s in self.staleness.split(",") if s.strip()]
        except ValueError:
            raise ValueError(f"--staleness {self.staleness!r} must be comma-separated integers, e.g. 1,3") from None

    @property
    def budget(self) -> int:
        return self.steps * self.workers


def planned_runs(cfg: BenchConfig) -> list[dict]:
    """[{name, mode, server kwargs, scenario}] in the order they run."""
    runs = []
    for scenario in cfg.scenario_list:
        for mode in cfg.mode_list:
            variants = {"sync": [("sync", {"mode": "sync"})],
                        "backup": [(f"sync+{cfg.backup_workers}backup",
                                    {"mode": "sync", "backup_workers": cfg.backup_workers})],
                        "ssp": [(f"ssp s={s}", {"mode": "ssp", "staleness": s}) for s in cfg.staleness_list],
                        "async": [("async", {"mode": "async"})],
                        "ddp": [("ddp", {})]}[mode]
            for name, kw in variants:
                runs.append({"name": name, "mode": mode, "server": kw, "scenario": scenario})
    return runs


def slowdowns(cfg: BenchConfig, scenario: str) -> tuple[dict[int, float] | None, float]:
    """(rank -> slowdown factor, fraction of steps slowed) for a scenario."""
    if scenario == "straggler":
        return {cfg.workers - 1: cfg.straggler}, 1.0
    if scenario == "jitter":
        return {r: cfg.straggler for r in range(cfg.workers)}, 1.0 / cfg.workers
    return None, 1.0


def _worker_cfg(cfg: BenchConfig, steps: int) -> WorkerConfig:
    return subset(cfg, WorkerConfig, steps=steps, num_workers=cfg.workers, rank=0, log_every=0, threads=1,
                  shard="random", device="cpu", heartbeat=1.0, log_level="warning")


def run_ps(cfg: BenchConfig, run: dict, folder: str) -> dict:
    """One parameter-server run: in-process server thread, worker processes; returns raw series."""
    from paramserver.launch import start_workers
    from paramserver.server import Server
    server = Server(ServerConfig(bind="tcp://127.0.0.1:*", num_workers=cfg.workers, optimizer=cfg.optimizer,
                                 lr=cfg.lr, aggregate="mean", max_gradients=cfg.budget, log_level="warning",
                                 worker_timeout=120, divergence_every=1,   # divergence is what it compares
                                 **run["server"]))
    address = server.bind()
    loop = threading.Thread(target=server.serve_forever, daemon=True)
    loop.start()
    slow, prob = slowdowns(cfg, run["scenario"])
    # each worker may need up to the whole budget when the others are slow; the server says when to stop
    procs = start_workers(_worker_cfg(cfg, cfg.budget), cfg.workers, address, folder, slow, threads=1,
                          slowdown_prob=prob)
    codes = [p.wait(timeout=3600) for p in procs]
    server.stop()
    loop.join(timeout=30)
    server.close()
    if any(codes):
        raise RuntimeError(f"run {run['name']}: workers exited with {codes}; see {folder}/worker*.log")
    metrics = server.metrics()
    workers = []
    for r in range(cfg.workers):
        with open(os.path.join(folder, f"worker{r}.json")) as f:
            workers.append(json.load(f))
    return {"server": metrics, "workers": workers, "theta": server.store.theta}


def run_ddp_baseline(cfg: BenchConfig, run: dict, folder: str) -> dict:
    from worker.ddp import launch_ddp
    slow, prob = slowdowns(cfg, run["scenario"])
    workers = launch_ddp(_worker_cfg(cfg, cfg.steps), cfg.workers, cfg.steps, folder, cfg.optimizer, cfg.lr,
                         slowdown=slow, slowdown_prob=prob, return_theta=True)
    theta = {n: np.array(v, np.float32) for n, v in workers[0].pop("theta").items()}
    for w in workers[1:]:
        w.pop("theta", None)
    return {"server": None, "workers": workers, "theta": theta}


def _server_records(srv: dict) -> dict:
    """A parameter-server run's series and counts, from what the server recorded (paramserver/metrics.py)."""
    upd = srv["updates"]
    t0 = srv["t0_epoch"]
    start = srv.get("first_grant_s")                                 # the start gate opened
    if start is None:
        start = min((g[0] for g in srv["pull_gaps"]), default=0.0)
    times = [u[0] - start for u in upd]
    staleness = [u[3] for u in upd]
    losses = [u[4] for u in upd]
    divergence = [u[5] for u in upd if u[5] is not None]
    applied = [u[6] for u in upd]
    versions = [u[1] for u in upd]
    counters = srv["status"]["counters"]
    n_updates = srv["status"]["version"]
    version_to_applied = {}
    for v, a in zip(versions, applied):
        version_to_applied[v] = a
    dropped = sum(v for k, v in counters.items() if k.startswith("dropped"))
    gap_max = srv.get("pull_gap_max", max((g[2] - g[3] for g in srv["pull_gaps"]), default=0))
    # rows are every update_stride-th gradient in a very long run (paramserver/metrics.py): counts come
    # from the exact totals
    n_applied = srv.get("updates_total", len(upd))
    staleness_max = srv.get("staleness_max", max(staleness, default=0))
    per_version = np.bincount(np.asarray(versions, dtype=int)).tolist() if versions else []
    return {"t0": t0, "start": start, "times": times, "losses": losses, "staleness": staleness,
            "divergence": divergence, "applied": applied, "n_updates": n_updates, "counters": counters,
            "version_to_applied": version_to_applied, "dropped": dropped, "gap_max": gap_max,
            "per_version": per_version, "n_applied": n_applied, "staleness_max": staleness_max}


def _ddp_records(workers: list[dict], n: int) -> dict:
    """A DDP run's series and counts: one update per step of N gradients; replicas identical by construction."""
    r0 = workers[0]
    t0, start = r0["t0_epoch"], 0.0
    steps = np.array([[s[0], s[3]] for s in r0["steps"]])
    all_losses = np.mean([[s[3] for s in w["steps"]] for w in workers], axis=0)
    times = list(np.repeat(steps[:, 0], n))
    losses = list(np.repeat(all_losses, n))
    staleness = [0] * (len(r0["steps"]) * n)
    divergence = [0.0] * len(staleness)
    applied = list(range(1, len(staleness) + 1))
    n_updates = len(r0["steps"])
    version_to_applied = {v: v * n for v in range(n_updates + 1)}
    counters = {"received": len(staleness), "applied": len(staleness)}
    dropped = gap_max = 0
    per_version = [0] + [n] * n_updates
    n_applied, staleness_max = len(applied), 0
    return {"t0": t0, "start": start, "times": times, "losses": losses, "staleness": staleness,
            "divergence": divergence, "applied": applied, "n_updates": n_updates, "counters": counters,
            "version_to_applied": version_to_applied, "dropped": dropped, "gap_max": gap_max,
            "per_version": per_version, "n_applied": n_applied, "staleness_max": staleness_max}


def analyse(cfg: BenchConfig, run: dict, raw: dict, final_eval: float, initial_eval: float) -> dict:
    """Turn one run's raw records into its series and summary figures."""
    from worker.train import summarize
    workers = raw["workers"]
    n = cfg.workers
    samples_per_grad = cfg.batch_size
    rec = _server_records(raw["server"]) if raw["server"] is not None else _ddp_records(workers, n)
    t0, start, times, losses, staleness = rec["t0"], rec["start"], rec["times"], rec["losses"], rec["staleness"]
    divergence, applied, n_updates, counters = rec["divergence"], rec["applied"], rec["n_updates"], rec["counters"]
    version_to_applied, dropped, gap_max = rec["version_to_applied"], rec["dropped"], rec["gap_max"]
    per_version, n_applied, staleness_max = rec["per_version"], rec["n_applied"], rec["staleness_max"]
    wall = max(times) if times else 0.0
    # every push a worker made is a computed gradient (applied, accumulated or dropped): when it was made
    pushed = np.sort(np.concatenate([np.array([w["t0_epoch"] + s[0] for s in w["steps"]], dtype=float)
                                     for w in workers] or [np.zeros(0)]))
    origin = t0 + start
    evals = []
    r0 = workers[0]
    for t, step, version, loss in r0.get("evals", []):
        t_rel = (r0["t0_epoch"] + t) - origin
        computed = int(np.searchsorted(pushed, r0["t0_epoch"] + t, side="right"))
        evals.append([round(max(0.0, t_rel), 3), version_to_applied.get(version, version * n), loss, computed])
    evals.append([round(wall, 3), n_applied, final_eval, int(len(pushed))])
    equal = cfg.budget          # compare every run after this many computed gradients
    ev = np.array(evals, dtype=float)
    loss_at_equal = float(np.interp(equal, ev[:, 3], ev[:, 2])) if len(pushed) >= equal else None
    t_equal = float(pushed[equal - 1] - origin) if len(pushed) >= equal else None
    per_worker = [summarize(w) for w in workers]
    tot = {k: sum(p[k] for p in per_worker) for k in ("compute_s", "wait_s", "comm_s", "sleep_s")}
    busy = sum(tot.values()) or 1.0
    hist = np.bincount(np.asarray(staleness, dtype=int)).tolist() if staleness else []
    return {
        "name": run["name"], "mode": run["mode"], "scenario": run["scenario"],
        "summary": {
            "wall_s": round(wall, 3), "updates": n_updates, "gradients_applied": n_applied,
            "gradients_dropped": dropped,
            "gradients_computed": int(len(pushed)), "samples_processed": int(len(pushed)) * samples_per_grad,
            "time_at_equal_computed_s": round(t_equal, 3) if t_equal is not None else None,
            "loss_at_equal_computed": round(loss_at_equal, 4) if loss_at_equal is not None else None,
            "updates_per_s": round(n_updates / wall, 2) if wall else 0.0,
            "samples_per_s": round(n_applied * samples_per_grad / wall, 1) if wall else 0.0,
            "staleness_mean": round(float(np.mean(staleness)), 3) if staleness else 0.0,
            "staleness_max": int(staleness_max),
            "clock_gap_max": int(gap_max),
            "divergence_mean": round(float(np.mean(divergence)), 5) if divergence else None,
            "divergence_max": round(float(np.max(divergence)), 5) if divergence else None,
            "initial_eval_loss": round(initial_eval, 4), "final_eval_loss": round(final_eval, 4),
            "share_compute": round(tot["compute_s"] / busy, 3),
            # DDP cannot tell waiting from transfer: its allreduce time (waiting included) is reported as comm
            "share_wait": None if raw["server"] is None else round(tot["wait_s"] / busy, 3),
            "share_comm": round(tot["comm_s"] / busy, 3), "share_straggler_sleep": round(tot["sleep_s"] / busy, 3),
        },
        "series": {
            "time_s": [round(t, 4) for t in times], "applied": applied, "loss": losses, "staleness": staleness,
            "staleness_hist": hist, "divergence": divergence, "evals": evals,
            "gradients_per_update": per_version[1:],
            "eval_fields": ["time_s", "gradients_applied", "eval_loss", "gradients_computed"],
            "per_worker": per_worker,
        },
        "counters": counters,
    }


def time_to_target(result: dict, target: float) -> float | None:
    for t, _, loss, *_ in result["series"]["evals"]:
        if loss <= target:
            return t
    return None


def machine() -> dict:
    import torch
    return {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpus": os.cpu_count(), "processor": platform.processor() or platform.machine()}


def _median_range(values: list) -> tuple:
    """(median, min, max) of figures where None (e.g. target not reached) counts as worst (+inf)."""
    if all(v is None for v in values):
        return None, None, None
    arr = np.array([np.inf if v is None else float(v) for v in values])
    med = float(np.median(arr))
    return (None if np.isinf(med) else med), float(arr.min()), (None if np.isinf(arr.max()) else float(arr.max()))


def aggregate(results: list[dict], repeats: int) -> list[dict]:
    """One entry per (run, scenario): series and counters of the first repeat, every summary figure as
    the median over the repeats (`summary`) and its range (`range`: [min, max]; None = not reached)."""
    groups: dict = {}
    for r in results:
        groups.setdefault((r["name"], r["scenario"]), []).append(r)
    out = []
    for (name, scenario), rs in groups.items():
        first = dict(rs[0])
        summary, rng = {}, {}
        for key, v0 in rs[0]["summary"].items():
            vals = [r["summary"][key] for r in rs]
            if isinstance(v0, (int, float)) or v0 is None:
                med, lo, hi = _median_range(vals)
                summary[key] = (int(round(med)) if isinstance(v0, int) and med is not None and len(rs) == 1
                                else (round(med, 4) if med is not None else None))
                rng[key] = [lo, hi]
            else:
                summary[key] = v0
        first.update(summary=summary, range=rng, repeats=len(rs),
                     per_repeat=[{"seed": r["seed"], **r["summary"]} for r in rs])
        out.append(first)
    return out


def run_bench(cfg: BenchConfig) -> dict:
    from paramserver.bench.report import print_table, write_report
    from worker.models import build_job
    os.makedirs(cfg.out, exist_ok=True)
    runs = planned_runs(cfg)
    print(f"paramserver bench consistency: {len(runs)} runs x {cfg.repeats} repeat(s), {cfg.workers} workers "
          f"each, job {cfg.entry or cfg.job}, budget {cfg.budget} applied gradients/run, straggler x{cfg.straggler}, "
          f"{os.cpu_count()} CPU cores (the {cfg.workers} workers and the server share them)", flush=True)
    results = []
    t_all = time.time()
    for rep in range(cfg.repeats):
        rcfg = dataclasses.replace(cfg, seed=cfg.seed + rep)   # another init, data order and straggler draws
        job = build_job(subset(rcfg, JobConfig), "cpu")
        initial_eval = job.eval_loss(rcfg.eval_batches, rcfg.batch_size)
        if rep == 0:
            print(f"  job {cfg.entry or cfg.job} ({job.description})", flush=True)
        for i, run in enumerate(runs):
            folder = os.path.join(cfg.out, "runs", (f"r{rep}-" if cfg.repeats > 1 else "") +
                                  f"{i:02d}-{run['name'].replace(' ', '').replace('=', '')}-{run['scenario']}")
            os.makedirs(folder, exist_ok=True)
            t = time.time()
            raw = run_ddp_baseline(rcfg, run, folder) if run["mode"] == "ddp" else run_ps(rcfg, run, folder)
            job.load_params(raw["theta"])
            final_eval = job.eval_loss(rcfg.eval_batches, rcfg.batch_size)
            res = analyse(rcfg, run, raw, final_eval, initial_eval)
            res["seed"] = rcfg.seed
            results.append(res)
            s = res["summary"]
            wait = "in comm" if s["share_wait"] is None else f"{100 * s['share_wait']:4.1f}%"
            print(f"[{len(results):2d}/{len(runs) * cfg.repeats}] seed {rcfg.seed} {run['name']:14s} "
                  f"{run['scenario']:9s} {s['wall_s']:7.2f}s  {s['updates_per_s']:7.1f} upd/s  staleness mean "
                  f"{s['staleness_mean']:.2f} max {s['staleness_max']:3d}  wait {wait}  eval "
                  f"{s['final_eval_loss']:.4f}  ({time.time() - t:.0f}s incl. start-up)", flush=True)
    report = assemble_report(cfg, results, time.time() - t_all)
    write_report(report, cfg.out)
    print_table(report)
    return report


def assemble_report(cfg: BenchConfig, results: list[dict], wall_s: float) -> dict:
    """The report of every run of every repeat (`results`, each with its "seed"): the target loss and each run's
    time to it, one entry per (run, scenario) with medians and ranges over the repeats, and every run's summary."""
    refs = [r for r in results if r["name"] == "sync" and r["scenario"] == "none"] or results[:1]
    ref_final = float(np.median([r["summary"]["final_eval_loss"] for r in refs]))
    ref_init = float(np.median([r["summary"]["initial_eval_loss"] for r in refs]))
    target = round(ref_final + 0.05 * (ref_init - ref_final), 4)
    for r in results:
        ttt = time_to_target(r, target)
        r["summary"]["time_to_target_s"] = round(ttt, 3) if ttt is not None else None
    return {"config": dataclasses.asdict(cfg), "machine": machine(), "target_eval_loss": target,
            "target_rule": f"the {refs[0]['name']} ({refs[0]['scenario']}) run's final held-out loss plus 5% of "
                           "its improvement from the initial loss" + (" (medians over the repeats)"
                                                                      if cfg.repeats > 1 else ""),
            "equal_computed": cfg.budget, "repeats": cfg.repeats,
            "bench_wall_s": round(wall_s, 1), "runs": aggregate(results, cfg.repeats),
            "all_runs": [{k: v for k, v in r.items() if k != "series"} for r in results]}
