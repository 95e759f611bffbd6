"""`paramserver bench scale`: the parameter server against single-process training at the same global batch.

For each global batch B (--global-batches) the benchmark trains the same seeded model in two ways:

* **single**: one process on one device (--device), the torch optimizer equal to the server's
  (worker/ddp.make_optimizer), one update per step on a batch of B samples: the union of the batches
  the workers of a cluster would take (worker/train.batch_stream), so both see the same samples.
* **paramserver**: a server process (or K shard processes) and W worker processes sharing the device,
  each computing on B / (W x accum) samples per micro-batch, in each variant of --variants (mode,
  shards, wire dtype, shared memory, overlap, accumulation). These are the processes `paramserver
  cluster` starts (paramserver/cluster.py start_server / start_workers).

Every run makes --steps steps (ssp/async: each worker pushes --steps gradients, the same number of
samples), so the held-out loss is compared after the same samples; samples/s is measured after
--warmup steps, from the server's own record of applied gradients. The per-step time split comes from
what the workers record (compute, wait at the barrier or bound, pull, push) and the server's time in
its optimizer (apply). Sync mode computes the same update as single-process training, so its held-out
loss matches up to float rounding (and the wire dtype's rounding with bf16/fp16).

Usage::

    paramserver bench scale --device cuda                    # the 25.5M GPT, global batch 64 and 256
    paramserver bench scale --quick --device cpu             # a small model, about two minutes on a laptop
    report = run_scale(ScaleConfig(quick=True))              # dict; also written to OUT/scale.json
"""
from __future__ import annotations

import dataclasses
import json
import os
import platform
import signal
import time
from dataclasses import dataclass

import numpy as np

from common.config import MODES, JobConfig, ServerConfig, WorkerConfig, opt, subset

WIRES = ("fp32", "bf16", "fp16")
#: quick preset: field -> value, applied to the fields left at their default
QUICK = {"n_layer": 1, "n_embd": 32, "n_head": 2, "context": 32, "max_bytes": 300_000, "workers": 2,
         "global_batches": "8,16", "steps": 8, "warmup": 2, "eval_batches": 4,
         "variants": "sync;sync,shards=2,overlap;sync,wire=bf16,tcp;ssp;async", "run_timeout": 120.0, "budget": 600.0}


@dataclass
class ScaleConfig(JobConfig):
    """Configuration of `paramserver bench scale` (job flags as for `paramserver worker`)."""

    n_layer: int = opt(8, "gpt: transformer blocks (default: the 25.5M GPT of issue 10)")
    n_head: int = opt(8, "gpt: attention heads")
    n_embd: int = opt(512, "gpt: embedding width")
    device: str = opt("auto", "where single-process training and the workers compute: auto picks cuda when "
                              "available (the workers share the one device)", ("auto", "cpu", "cuda"))
    workers: int = opt(4, "worker processes of each paramserver run (a variant's workers=N overrides it)")
    global_batches: str = opt("64,256", "comma-separated global batches per update; each is B/(workers x accum) "
                                        "samples per worker micro-batch")
    variants: str = opt("sync;sync,accum=4,batch=256;sync,shards=4;sync,shards=4,wire=bf16;async;ssp",
                        "paramserver runs, separated by ';': a mode (sync, ssp, async), then comma-separated "
                        "options: shards=K, wire=fp32|bf16|fp16, shm or tcp, overlap, accum=A, staleness=S (ssp), "
                        "workers=N, batch=B[/B2] (run only at these global batches)")
    steps: int = opt(40, "updates of the global batch per run (ssp/async: gradients pushed per worker); the held-out "
                         "loss is compared after these samples")
    warmup: int = opt(5, "first steps left out of samples/s (start gate, allocation, CUDA warm-up)")
    optimizer: str = opt("adam", "update rule: the server's --optimizer and the same torch optimizer in the "
                                 "single-process run", ("sgd", "momentum", "adam"))
    lr: float = opt(0.003, "learning rate")
    eval_batches: int = opt(8, "held-out batches of the final evaluation")
    eval_batch_size: int = opt(16, "samples per held-out batch")
    threads: int = opt(0, "CPU threads per worker (0: cores / workers, as `paramserver cluster`)")
    run_timeout: float = opt(90.0, "seconds a paramserver run may take; a run stopped by it reports samples/s so "
                                   "far and no loss")
    budget: float = opt(420.0, "seconds for the whole benchmark: runs that would start after it are skipped "
                               "(reported as skipped), and a run gets at most what is left")
    out: str = opt("runs/scale", "folder for scale.json and each run's logs")
    keep_checkpoints: bool = opt(False, "keep each run's server checkpoint (deleted once evaluated: a 25M model "
                                        "with Adam state is ~300 MB)")
    quick: bool = opt(False, "a small preset for a CPU: GPT 1x32, 2 workers, global batches 8 and 16, 8 steps "
                             "(fields left at their defaults take the preset's values)")

    def __post_init__(self):
        if self.quick:
            defaults = {f.name: f.default for f in dataclasses.fields(ScaleConfig)}
            for name, value in QUICK.items():
                if getattr(self, name) == defaults[name]:
                    setattr(self, name, value)
        super().__post_init__()
        if self.workers < 1 or self.steps < 1 or self.warmup < 0 or self.eval_batches < 1 or self.eval_batch_size < 1:
            raise ValueError("--workers, --steps, --eval-batches and --eval-batch-size must be >= 1, --warmup >= 0")
        if self.warmup >= self.steps:
            raise ValueError(f"--warmup {self.warmup} must be below --steps {self.steps} (samples/s is measured "
                             "after the warm-up)")
        if self.lr <= 0 or self.run_timeout <= 0 or self.budget <= 0:
            raise ValueError("--lr, --run-timeout and --budget must be positive")
        self.plan()   # every variant parses and every batch divides: errors now, not halfway through a run

    @property
    def batch_list(self) -> list[int]:
        try:
            values = [int(b) for b in self.global_batches.split(",") if b.strip()]
        except ValueError:
            raise ValueError(f"--global-batches {self.global_batches!r} must be comma-separated integers, "
                             "e.g. 64,256") from None
        if not values or min(values) < 1:
            raise ValueError("--global-batches must list batch sizes >= 1, e.g. 64,256")
        return values

    @property
    def variant_list(self) -> list["Variant"]:
        texts = [v.strip() for v in self.variants.split(";") if v.strip()]
        if not texts:
            raise ValueError("--variants is empty; give e.g. 'sync;async'")
        return [parse_variant(t, self.workers) for t in texts]

    def plan(self) -> list[dict]:
        """The runs in the order they run: every single-process baseline first (they are short), then each
        variant at each global batch (so that a budget that runs out cuts the last variants, not a batch)."""
        batches = self.batch_list
        runs = [{"kind": "single", "batch": b} for b in batches]
        for v in self.variant_list:
            for b in batches:
                if v.batches and b not in v.batches:
                    continue
                if b % (v.workers * v.accum):
                    raise ValueError(f"--global-batches {b} is not divisible by workers x accum = {v.workers} x "
                                     f"{v.accum} of variant {v.text!r}; change --global-batches or the variant")
                runs.append({"kind": "ps", "batch": b, "variant": v})
        return runs


@dataclass(frozen=True)
class Variant:
    """One paramserver configuration of --variants, e.g. "sync,shards=2,wire=bf16,overlap"."""

    text: str
    mode: str
    workers: int
    shards: int = 1
    wire: str = "fp32"
    shm: bool = True
    overlap: bool = False
    accum: int = 1
    staleness: int = 3
    batches: tuple[int, ...] = ()


def parse_variant(text: str, workers: int) -> Variant:
    """Parse one --variants entry; a bad token raises ValueError naming it and what is allowed."""
    tokens = [t.strip() for t in text.split(",") if t.strip()]
    mode, kw = tokens[0], {"workers": workers}
    if mode not in MODES:
        raise ValueError(f"--variants {text!r}: start with a mode ({', '.join(MODES)}), not {mode!r}")
    allowed = "shards=K, wire=fp32|bf16|fp16, shm, tcp, overlap, accum=A, staleness=S, workers=N, batch=B[/B2]"
    for tok in tokens[1:]:
        key, eq, value = tok.partition("=")
        try:
            if tok in ("shm", "tcp"):
                kw["shm"] = tok == "shm"
            elif tok == "overlap":
                kw["overlap"] = True
            elif eq and key in ("shards", "accum", "staleness", "workers"):
                kw[key] = int(value)
                if kw[key] < (0 if key == "staleness" else 1):
                    raise ValueError
            elif eq and key == "wire" and value in WIRES:
                kw["wire"] = value
            elif eq and key == "batch":
                kw["batches"] = tuple(int(b) for b in value.split("/"))
            else:
                raise ValueError
        except ValueError:
            raise ValueError(f"--variants {text!r}: bad option {tok!r}; options: {allowed}") from None
    if "staleness" in kw and mode != "ssp":
        raise ValueError(f"--variants {text!r}: staleness= only applies to ssp")
    return Variant(text=",".join(tokens), mode=mode, **kw)


# ---------------------------------------------------------------------------------------------
# the runs


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
    from paramserver.cluster import exit_text
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
    from paramserver.cluster import (ClusterError, last_error_line, merge_checkpoints, shard_configs, start_server,
                                     start_workers, stop_all)
    from common.checkpoint import load_checkpoint
    os.makedirs(folder, exist_ok=True)
    for f in os.listdir(folder):   # an earlier run's files would pass for this one's
        if f.endswith((".json", ".pt", ".log")):
            os.unlink(os.path.join(folder, f))
    threads = cfg.threads or max(1, (os.cpu_count() or 1) // v.workers)
    wcfg = dataclasses.replace(_layout_cfgs(cfg, v.workers, batch, v.accum)[0], device=device, eval_every=0,
                               log_every=0, shm=v.shm, overlap=v.overlap, wire_dtype=v.wire, log_level="warning")
    scfg = ServerConfig(bind="tcp://127.0.0.1:*", num_workers=v.workers, mode=v.mode,
                        staleness=v.staleness if v.mode == "ssp" else None, optimizer=cfg.optimizer, lr=cfg.lr,
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
    per_grad = batch // v.workers   # samples behind one pushed gradient (all its micro-batches)
    skip = cfg.warmup * v.workers
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


def machine(device: str) -> dict:
    import torch
    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpus": os.cpu_count(), "device": device}
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def run_scale(cfg: ScaleConfig) -> dict:
    """Run every planned run within --budget; returns the report (also written to OUT/scale.json after each run)."""
    import torch
    from worker.models import build_job, pick_device
    device = pick_device(cfg.device)
    os.makedirs(cfg.out, exist_ok=True)
    plan = cfg.plan()
    evaluator = build_job(subset(cfg, JobConfig), device)

    def evaluate(theta) -> float:
        evaluator.load_params(theta)
        return evaluator.eval_loss(cfg.eval_batches, cfg.eval_batch_size)

    report = {"config": dataclasses.asdict(cfg), "machine": machine(device),
              "model": {"parameters": sum(p.numel() for p in evaluator.model.parameters()),
                        "data": evaluator.description},
              "runs": []}
    print(f"paramserver bench scale: job {cfg.entry or cfg.job} ({report['model']['parameters']:,} parameters), "
          f"device {device}{' (' + report['machine']['gpu'] + ')' if 'gpu' in report['machine'] else ''}, "
          f"{os.cpu_count()} CPU cores, {len(plan)} runs, {cfg.steps} steps each (samples/s after {cfg.warmup}), "
          f"optimizer {cfg.optimizer} lr {cfg.lr}, budget {cfg.budget:.0f}s", flush=True)
    t_all = time.monotonic()
    baselines: dict[int, dict] = {}
    for i, run in enumerate(plan):
        left = cfg.budget - (time.monotonic() - t_all)
        b = run["batch"]
        if run["kind"] == "single":
            res = run_single(cfg, b, device, cfg.workers)
            baselines[b] = res
        elif left < min(20.0, cfg.run_timeout):
            v = run["variant"]
            res = {"kind": "ps", "name": v.text, "variant": dataclasses.asdict(v), "batch": b, "skipped": True,
                   "failure": f"skipped: {left:.0f}s of --budget {cfg.budget:.0f}s left", "complete": False,
                   "samples_per_s": None, "eval_loss": None}
        else:
            v = run["variant"]
            folder = os.path.join(cfg.out, "runs", f"{i:02d}-b{b}-" + "".join(c if c.isalnum() else "_" for c in v.text))
            res = run_ps(cfg, v, b, device, folder, min(cfg.run_timeout, left), evaluate)
            res["same_samples"] = _same_samples(cfg, v, b, evaluator.n_samples)
        _compare(res, baselines.get(b))
        report["runs"].append(res)
        report["bench_wall_s"] = round(time.monotonic() - t_all, 1)
        _write(report, cfg.out)
        print(f"[{i + 1:2d}/{len(plan)}] " + _line(res), flush=True)
    del evaluator
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return report


def _same_samples(cfg: ScaleConfig, v: Variant, batch: int, n_samples: int) -> bool:
    """Do this variant's workers compute on exactly the samples of the single run, step by step?"""
    ps = sample_order(_layout_cfgs(cfg, v.workers, batch, v.accum), n_samples, cfg.steps)
    single = sample_order(_layout_cfgs(cfg, cfg.workers, batch, 1), n_samples, cfg.steps)
    return all(np.array_equal(a, b) for a, b in zip(ps, single))


def _compare(res: dict, base: dict | None) -> None:
    """Ratios against the single-process run at the same global batch."""
    res["ratio"] = res["loss_diff_pct"] = None
    if base is None or res["kind"] == "single":
        if res["kind"] == "single":
            res["ratio"], res["loss_diff_pct"] = 1.0, 0.0
        return
    if res.get("samples_per_s") and base.get("samples_per_s"):
        res["ratio"] = round(res["samples_per_s"] / base["samples_per_s"], 4)
    if res.get("eval_loss") is not None and base.get("eval_loss"):
        res["loss_diff_pct"] = round(100.0 * (res["eval_loss"] - base["eval_loss"]) / base["eval_loss"], 4)


def _write(report: dict, out: str) -> None:
    path = os.path.join(out, "scale.json")
    with open(path + ".tmp", "w") as f:
        json.dump(report, f, indent=1)
    os.replace(path + ".tmp", path)


def _fmt(value, spec: str, none: str = "-") -> str:
    return none if value is None else format(value, spec)


def _line(r: dict) -> str:
    what = f"{r['name']} at global batch {r['batch']}"
    if r.get("skipped"):
        return f"{what}: {r['failure']}"
    text = (f"{what} ({r.get('layout')}): {_fmt(r.get('samples_per_s'), '.1f')} samples/s, held-out loss "
            f"{_fmt(r.get('eval_loss'), '.4f')}")
    if r["kind"] == "ps":
        text += f", x{_fmt(r.get('ratio'), '.3f')} of single, loss {_fmt(r.get('loss_diff_pct'), '+.2f')}%"
    if r.get("failure"):
        text += f"  [{r['failure']}]"
    return text


COLUMNS = ("variant", "B", "layout", "samples/s", "x single", "held-out", "vs single", "step ms", "compute", "wait",
           "pull", "push", "apply")


def table(report: dict) -> str:
    """The result table (times are milliseconds per step; apply: per server update)."""
    rows = []
    for r in report["runs"]:
        note = ""
        if r.get("skipped"):
            note = "skipped (budget)"
        elif r.get("failure"):
            note = "timed out" if r["failure"] == "timeout" else "failed: " + r["failure"][:60]
        elif r["kind"] == "ps" and r.get("same_samples") is False:
            note = "other samples than single"
        rows.append([r["name"] if r["kind"] == "ps" else f"single ({r.get('device')})", str(r["batch"]),
                     r.get("layout", "-"), _fmt(r.get("samples_per_s"), ".1f"), _fmt(r.get("ratio"), ".3f"),
                     _fmt(r.get("eval_loss"), ".4f"), _fmt(r.get("loss_diff_pct"), "+.2f", "-") +
                     ("%" if r.get("loss_diff_pct") is not None else ""),
                     _fmt(r.get("step_ms"), ".1f"), _fmt(r.get("compute_ms"), ".1f"), _fmt(r.get("wait_ms"), ".1f"),
                     _fmt(r.get("pull_ms"), ".1f"), _fmt(r.get("push_ms"), ".1f"), _fmt(r.get("apply_ms"), ".1f"),
                     note])
    widths = [max(len(c), *(len(row[i]) for row in rows)) if rows else len(c) for i, c in enumerate(COLUMNS)]
    fmt = lambda cells: "  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    lines = [fmt(COLUMNS), fmt(["-" * w for w in widths])]
    lines += [fmt(row[:-1]) + (f"  {row[-1]}" if row[-1] else "") for row in rows]
    return "\n".join(lines)


def print_scale(report: dict) -> None:
    m, c = report["machine"], report["config"]
    print()
    print(f"paramserver vs single-process training, same model ({report['model']['parameters']:,} parameters), "
          f"same optimizer ({c['optimizer']}, lr {c['lr']}), same samples ({c['steps']} steps), device {m['device']}"
          + (f" ({m['gpu']})" if m.get("gpu") else "") + f", {m['cpus']} CPU cores")
    print(table(report))
    print("samples/s after the warm-up; x single: against the single-process run at the same global batch B; "
          "held-out loss after the same samples and its difference from single; times in ms per worker step "
          "(compute: theta into the model, forward, backward, gradients out; wait: held at the barrier or "
          "staleness bound; pull/push: communication; apply: the optimizer per update, the server's or the "
          "single run's)")
    for line in target_lines(report):
        print(line)
    procs = max((r.get("variant", {}).get("workers", 0) + r.get("variant", {}).get("shards", 0)
                 for r in report["runs"]), default=0)
    if m["cpus"] and procs > m["cpus"]:
        print(f"note: up to {procs} processes (workers + server shards) on {m['cpus']} cores: oversubscribed, "
              "the figures measure contention as much as the parameter server")
    print(f"results: {os.path.join(c['out'], 'scale.json')}", flush=True)


#: issue 10's target for sync mode on a GPU: at least this fraction of single-process samples/s, and the
#: held-out loss within this many percent of the single run's
TARGET_RATIO, TARGET_LOSS_PCT = 0.5, 2.0


def target_lines(report: dict) -> list[str]:
    """Per global batch: the fastest complete sync variant against the target (TARGET_RATIO, TARGET_LOSS_PCT)."""
    lines = []
    for b in sorted({r["batch"] for r in report["runs"]}):
        syncs = [r for r in report["runs"] if r["batch"] == b and r["kind"] == "ps" and r.get("ratio") is not None
                 and r["variant"]["mode"] == "sync" and r.get("loss_diff_pct") is not None]
        if not syncs:
            continue
        best = max(syncs, key=lambda r: r["ratio"])
        met = best["ratio"] >= TARGET_RATIO and abs(best["loss_diff_pct"]) <= TARGET_LOSS_PCT
        lines.append(f"global batch {b}: fastest sync variant {best['name']!r} at {best['ratio']:.3f}x single, loss "
                     f"{best['loss_diff_pct']:+.2f}% (issue 10's GPU target >= {TARGET_RATIO}x and within {TARGET_LOSS_PCT:g}%: "
                     f"{'met' if met else 'missed'})")
    return lines


def _interrupted(signum, frame):   # pragma: no cover - SIGTERM while benchmarking: clean up the children
    raise KeyboardInterrupt


def main_scale(cfg: ScaleConfig) -> dict:
    signal.signal(signal.SIGTERM, _interrupted)
    report = run_scale(cfg)
    print_scale(report)
    return report
