"""The runs of `paramserver bench scale` (paramserver/bench/scale.py plans them and compares their figures).

This module owns how one run is made and measured: `run_single` trains in this process on the union of the
workers' batches (`sample_order`: the samples of each step); `run_ps` starts a server (or K shards) and the
workers as `paramserver cluster` does, waits within its time, evaluates the checkpoint, and reads what the
processes recorded into samples/s (`_throughput`, from the server's record of applied gradients) and the
per-step time split (`_split`). The printed table and target lines are in paramserver/bench/scale_tables.py.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import TYPE_CHECKING

import numpy as np

from common.config import LOCAL_SGD_OUTER, JobConfig, ServerConfig, WorkerConfig, subset

if TYPE_CHECKING:
    from paramserver.bench.scale import ScaleConfig, Variant


def _layout_cfgs(cfg: ScaleConfig, workers: int, batch: int, accum: int) -> list[WorkerConfig]:
    """The worker configs of a paramserver run (also what the single-process run draws its batches from)."""
    return [subset(cfg, WorkerConfig, rank=r, num_workers=workers, batch_size=batch // (workers * accum),
                   accum=accum, steps=cfg.steps, shard="random") for r in range(workers)]


def sample_order(cfgs: list[WorkerConfig], n_samples: int, steps: int) -> list[np.ndarray]:
    """Per step, the sorted sample indices all workers of this layout compute on (union of their batches)."""
    from worker.train import batch_stream
    streams = [batch_stream(c, n_samples)[1] for c in cfgs]
    return [np.sort(np.concatenate([next(s)[1] for s, c in zip(streams, cfgs) for _ in range(c.accum)]))
            for _ in range(steps)]


def _sync(device: str) -> None:
    import torch
    if device.startswith("cuda"):
        torch.cuda.synchronize()


#: the single run's samples/s is measured over at least this many seconds: when its --steps are done sooner
#: (a fast GPU: 40 steps in well under a second), it trains on, for timing only, after its held-out evaluation
SINGLE_MIN_S = 3.0


def run_single(cfg: ScaleConfig, batch: int, device: str, workers: int) -> dict:
    """Single-process training at global batch `batch`: held-out loss after --steps, samples/s after the warm-up
    (over at least SINGLE_MIN_S seconds of steps), and the split of a step into compute and apply."""
    import torch
    from worker.ddp import make_optimizer
    from worker.models import build_job
    from worker.train import batch_stream
    job = build_job(subset(cfg, JobConfig), device)
    cfgs = _layout_cfgs(cfg, workers, batch, 1)
    streams = [batch_stream(c, job.n_samples)[1] for c in cfgs]
    opt_ = make_optimizer(job.model.parameters(), cfg.optimizer, cfg.lr)
    initial = job.eval_loss(cfg.eval_batches, cfg.eval_batch_size)
    cuda = device.startswith("cuda")
    # the split (compute: batch, forward, backward; apply: the optimizer) without a synchronisation per step:
    # CUDA events are read after the loop; on a CPU the clock is synchronous anyway
    marks, losses = [], []

    def mark():
        if not cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def step(timed: bool) -> None:
        m0 = mark()
        idx = np.concatenate([next(s)[1] for s in streams])   # the union of the workers' batches
        opt_.zero_grad(set_to_none=True)
        loss = job.loss(*job.batch(idx))
        loss.backward()
        m1 = mark()
        opt_.step()
        m2 = mark()
        losses.append(loss.detach())
        if timed:
            marks.append((m0, m1, m2))

    t_start = time.perf_counter()
    for _ in range(cfg.warmup):
        step(False)
    _sync(device)
    t_warm = time.perf_counter()
    for _ in range(cfg.steps - cfg.warmup):
        step(True)
    _sync(device)
    t_end = time.perf_counter()
    timed_s, timed_n = t_end - t_warm, cfg.steps - cfg.warmup
    final = job.eval_loss(cfg.eval_batches, cfg.eval_batch_size)    # after exactly --steps steps
    if timed_s < SINGLE_MIN_S:   # too short to time reliably: go on, for timing only (the loss is taken)
        extra = max(1, int(timed_n * (SINGLE_MIN_S - timed_s) / timed_s))
        t0 = time.perf_counter()
        for _ in range(extra):
            step(True)
        _sync(device)
        timed_s += time.perf_counter() - t0
        timed_n += extra
    if cuda:
        split = np.array([[a.elapsed_time(b), b.elapsed_time(c)] for a, b, c in marks]).mean(axis=0)
    else:
        split = 1e3 * np.array([[b - a, c - b] for a, b, c in marks]).mean(axis=0)
    result = {"kind": "single", "name": "single", "batch": batch, "layout": f"1 x {batch}", "device": device,
              "steps": cfg.steps, "samples": cfg.steps * batch, "timed_steps": timed_n,
              "samples_per_s": round(timed_n * batch / timed_s, 1), "step_ms": round(1e3 * timed_s / timed_n, 3),
              "wall_s": round(t_end - t_start, 3),
              "compute_ms": round(float(split[0]), 3), "apply_ms": round(float(split[1]), 3),
              "initial_eval_loss": round(initial, 5), "eval_loss": round(final, 6),
              "train_loss_last": round(float(torch.stack(losses[max(0, cfg.steps - 5):cfg.steps]).mean()), 5),
              "complete": True}
    del job, opt_, losses, marks
    if cuda:
        torch.cuda.empty_cache()
    return result


def _wait(workers: list, servers: list, deadline: float) -> str:
    """'' once every worker has exited with 0; else why the run is being stopped."""
    from paramserver.launch import exit_text
    while any(p.poll() is None for p in workers):
        if time.monotonic() > deadline:
            return "timeout"
        for i, s in enumerate(servers):
            if s.poll() is not None:
                return f"server {i} {exit_text(s.returncode)}"
        bad = [r for r, p in enumerate(workers) if p.poll() not in (None, 0)]
        if bad:
            return f"worker {bad[0]} {exit_text(workers[bad[0]].returncode)}"
        time.sleep(0.1)
    bad = [r for r, p in enumerate(workers) if p.returncode != 0]
    return f"worker {bad[0]} {exit_text(workers[bad[0]].returncode)}" if bad else ""


def _read(path: str) -> dict:
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def run_ps(cfg: ScaleConfig, v: Variant, batch: int, device: str, folder: str, seconds: float, evaluate) -> dict:
    """One paramserver run of variant `v` at global batch `batch`, stopped after `seconds` at the latest."""
    from paramserver.cluster import merge_checkpoints, shard_configs
    from paramserver.launch import ClusterError, last_error_line, start_server, start_workers, stop_all
    from common.checkpoint import load_checkpoint
    os.makedirs(folder, exist_ok=True)
    for f in os.listdir(folder):   # an earlier run's files would pass for this one's
        if f.endswith((".json", ".pt", ".log")):
            os.unlink(os.path.join(folder, f))
    threads = cfg.threads or max(1, (os.cpu_count() or 1) // v.workers)
    wcfg = dataclasses.replace(_layout_cfgs(cfg, v.workers, batch, v.accum)[0], device=device, eval_every=0,
                               log_every=0, shm=v.shm, overlap=v.overlap, wire_dtype=v.wire, log_level="warning",
                               local_steps=v.local, inner_lr=cfg.lr, compress=v.compress)
    outer = {"optimizer": cfg.optimizer, "lr": cfg.lr} if v.local == 1 else LOCAL_SGD_OUTER   # local=H: averaging
    scfg = ServerConfig(bind="tcp://127.0.0.1:*", num_workers=v.workers, mode=v.mode,
                        staleness=v.staleness if v.mode == "ssp" else None, **outer,
                        aggregate="mean", shm=v.shm, log_level="warning",
                        threads=max(1, (os.cpu_count() or 1) // (v.workers + v.shards)),   # as `paramserver cluster`
                        checkpoint=os.path.join(folder, "checkpoint.pt"),
                        metrics=os.path.join(folder, "server_metrics.json"))
    scfgs = shard_configs(scfg, v.shards, folder) if v.shards > 1 else [scfg]
    servers, addresses, workers = [], [], []
    failure = ""
    t0 = time.monotonic()
    try:
        for i, c in enumerate(scfgs):
            proc, address = start_server(c, folder, procs=servers, log_name=f"server{i}.log")
            addresses.append(address)
        start_workers(wcfg, v.workers, ",".join(addresses), folder, threads=threads, procs=workers)
        failure = _wait(workers, servers, t0 + seconds)
    except ClusterError as exc:
        failure = str(exc)
    finally:
        stop_all(workers, None, "")
        for proc, address in zip(servers, addresses + [""] * len(servers)):
            stop_all([], proc, address)
    wall = time.monotonic() - t0
    timed_out = failure == "timeout"
    if failure and not timed_out:
        for r in range(len(workers)):
            line = last_error_line(os.path.join(folder, f"worker{r}.log"))
            if f"worker {r} " in failure and line:
                failure += f": {line}"
    shard_metrics = [_read(c.metrics) for c in scfgs]
    workers_m = [_read(os.path.join(folder, f"worker{r}.json")) for r in range(v.workers)]
    res = {"kind": "ps", "name": v.text, "variant": dataclasses.asdict(v), "batch": batch,
           "layout": f"{v.workers} x {batch // (v.workers * v.accum)}" + (f" x {v.accum}" if v.accum > 1 else ""),
           "device": device, "steps": cfg.steps, "samples": cfg.steps * batch, "wall_s": round(wall, 3),
           "complete": not failure, "failure": failure, "threads_per_worker": threads,
           "worker_devices": sorted({m.get("device", "?") for m in workers_m if m})}
    res.update(_throughput(cfg, v, batch, shard_metrics[0]))
    res.update(_split(cfg, workers_m, shard_metrics))
    res["client"] = _client_stats(workers_m)
    ckpts = [c.checkpoint for c in scfgs]
    if all(os.path.exists(p) for p in ckpts):
        path = ckpts[0] if v.shards == 1 else os.path.join(folder, "checkpoint.pt")
        state = load_checkpoint(ckpts[0]) if v.shards == 1 else merge_checkpoints(ckpts, path)
        res["updates"] = int(state.get("version", 0)) if v.shards == 1 else int(min(state["shard_versions"]))
        if not failure:    # the loss after the same samples as the single run; a cut-short run has none
            res["eval_loss"] = round(evaluate(state["theta"]), 6)
        if not cfg.keep_checkpoints:
            for p in set(ckpts + [path]):
                if os.path.exists(p):
                    os.unlink(p)
    if "eval_loss" not in res:
        res["eval_loss"] = None
    return res


def _throughput(cfg: ScaleConfig, v: Variant, batch: int, server: dict) -> dict:
    """Samples/s from the server's record of applied gradients, after the first warmup x workers of them."""
    updates = server.get("updates") or []
    per_grad = batch // v.workers * v.local   # samples behind one push (its micro-batches; local=H: H steps)
    skip = -(-cfg.warmup // v.local) * v.workers   # the warm-up's steps, in pushes
    # (in a very long run the rows are every update_stride-th gradient: their "applied" column, not their
    # positions, counts gradients)
    out = {"gradients_applied": server.get("updates_total", updates[-1][6] if updates else 0), "samples_per_s": None,
           "step_ms": None, "apply_s_total": (server.get("status") or {}).get("apply_s")}
    first = next((u for u in updates if u[6] >= skip), None) if skip > 0 else None
    if first is not None and updates[-1][0] > first[0]:
        last = updates[-1]
        rate = (last[6] - first[6]) * per_grad / (last[0] - first[0])
        out.update(samples_per_s=round(rate, 1), step_ms=round(1e3 * batch / rate, 3))
    elif skip == 0 and len(updates) > 1 and updates[-1][0] > 0:
        rate = updates[-1][6] * per_grad / updates[-1][0]
        out.update(samples_per_s=round(rate, 1), step_ms=round(1e3 * batch / rate, 3))
    return out


def _split(cfg: ScaleConfig, workers_m: list[dict], shards: list[dict]) -> dict:
    """Milliseconds per worker step after the warm-up: compute, wait, pull, push (workers' own records), and
    apply per update (the server's optimizer time; with shards the slowest shard, they apply in parallel)."""
    rows = []
    for m in workers_m:
        fields = m.get("step_fields") or []
        if "pull_s" not in fields:
            continue
        ix = [fields.index(k) for k in ("compute_s", "wait_s", "pull_s", "push_s")]
        rows += [[s[i] for i in ix] for s in m.get("steps", [])[cfg.warmup:]]
    out = {}
    if rows:
        mean = np.mean(np.array(rows, dtype=float), axis=0) * 1e3
        out.update(compute_ms=round(mean[0], 3), wait_ms=round(mean[1], 3), pull_ms=round(mean[2], 3),
                   push_ms=round(mean[3], 3))
    applies = []
    for s in shards:
        st = s.get("status") or {}
        if st.get("apply_s") is not None and st.get("counters", {}).get("updates"):
            applies.append(1e3 * st["apply_s"] / st["counters"]["updates"])
    if applies:
        out["apply_ms"] = round(max(applies), 3)
    return out


def _client_stats(workers_m: list[dict]) -> dict:
    total: dict = {}
    for m in workers_m:
        for k, val in (m.get("client") or {}).items():
            if isinstance(val, (int, float)):
                total[k] = total.get(k, 0) + val
    return total
