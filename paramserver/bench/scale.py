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

This module owns the plan (`ScaleConfig`, `--variants` parsed into `Variant`s) and the run in order within
--budget, with every run's ratios against single (`run_scale`); how one run is made and measured is in
paramserver/bench/scale_runs.py, the printed line, table and target in paramserver/bench/scale_tables.py.

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

from common.config import MODES, JobConfig, opt, subset
from paramserver.bench.scale_runs import _layout_cfgs, run_ps, run_single, sample_order
from paramserver.bench.scale_tables import _line, print_scale

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
                        "workers=N, batch=B[/B2] (run only at these global batches), local=H (--local-steps H with "
                        "outer averaging: the server runs sgd at lr 1, the workers AdamW/--optimizer's lr), "
                        "compress=int8")
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
    local: int = 1            # --local-steps H (the server then runs outer averaging: sgd at lr 1)
    compress: str = "none"    # --compress


def parse_variant(text: str, workers: int) -> Variant:
    """Parse one --variants entry; a bad token raises ValueError naming it and what is allowed."""
    tokens = [t.strip() for t in text.split(",") if t.strip()]
    mode, kw = tokens[0], {"workers": workers}
    if mode not in MODES:
        raise ValueError(f"--variants {text!r}: start with a mode ({', '.join(MODES)}), not {mode!r}")
    allowed = ("shards=K, wire=fp32|bf16|fp16, shm, tcp, overlap, accum=A, staleness=S, workers=N, batch=B[/B2], "
               "local=H, compress=int8")
    for tok in tokens[1:]:
        key, eq, value = tok.partition("=")
        try:
            if tok in ("shm", "tcp"):
                kw["shm"] = tok == "shm"
            elif tok == "overlap":
                kw["overlap"] = True
            elif eq and key == "compress" and value in ("none", "int8"):
                kw["compress"] = value
            elif eq and key in ("shards", "accum", "staleness", "workers", "local"):
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


def _interrupted(signum, frame):   # pragma: no cover - SIGTERM while benchmarking: clean up the children
    raise KeyboardInterrupt


def main_scale(cfg: ScaleConfig) -> dict:
    signal.signal(signal.SIGTERM, _interrupted)
    report = run_scale(cfg)
    print_scale(report)
    return report
