"""The baseline users would otherwise pick: PyTorch DDP over torch.distributed (gloo).

Same job, same shards and batch order (`batch_stream`), same global batch, same optimizer math as
the parameter server's sync mode with mean aggregation: DDP averages the gradients with an
allreduce, then every rank applies the same torch optimizer. Each step records the same timing
fields as a PS worker; the allreduce time (which includes waiting for the slowest rank) is
measured by a communication hook and reported as communication.

Usage (one process per rank; `launch_ddp` starts them)::

    python -m worker.ddp '{"worker": {...WorkerConfig fields...}, "world": 4, "init": "file:///tmp/rendezvous",
                           "optimizer": "sgd", "lr": 0.1, "steps": 100}'
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import subprocess
import sys
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from common.config import JobConfig, WorkerConfig, subset
from worker.models import build_job
from worker.train import EVAL_FIELDS, STEP_FIELDS, batch_stream, straggler_rng


def make_optimizer(params, optimizer: str, lr: float, momentum: float = 0.9, beta1: float = 0.9,
                   beta2: float = 0.999, eps: float = 1e-8) -> torch.optim.Optimizer:
    """The torch optimizer equal to the server's `--optimizer` (paramserver/store.py)."""
    if optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr)
    if optimizer == "momentum":
        return torch.optim.SGD(params, lr=lr, momentum=momentum)
    return torch.optim.Adam(params, lr=lr, betas=(beta1, beta2), eps=eps)


def run_ddp(spec: dict) -> dict:
    cfg = WorkerConfig(**spec["worker"])
    world = spec["world"]
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    dist.init_process_group("gloo", init_method=spec["init"], rank=cfg.rank, world_size=world)
    try:
        job = build_job(subset(cfg, JobConfig), "cpu")
        model = DDP(job.model)
        timing = {"comm": 0.0}

        def timed_allreduce(state, bucket):
            t = time.perf_counter()
            buf = bucket.buffer()
            dist.all_reduce(buf)
            buf.div_(world)
            timing["comm"] += time.perf_counter() - t
            fut = torch.futures.Future()
            fut.set_result(buf)
            return fut

        model.register_comm_hook(None, timed_allreduce)
        opt = make_optimizer(model.parameters(), spec["optimizer"], spec["lr"], spec.get("momentum", 0.9),
                             spec.get("beta1", 0.9), spec.get("beta2", 0.999), spec.get("eps", 1e-8))
        _, stream = batch_stream(cfg, job.n_samples)
        m = {"rank": cfg.rank, "device": "cpu", "data": job.description, "steps": [], "evals": [],
             "step_fields": STEP_FIELDS, "eval_fields": EVAL_FIELDS}
        t_start, last_compute = time.time(), 0.0
        slow_rng = straggler_rng(cfg)
        for step in range(spec["steps"]):
            if cfg.rank == 0 and cfg.eval_every and step % cfg.eval_every == 0:
                m["evals"].append([round(time.time() - t_start, 4), step, step,
                                   job.eval_loss(cfg.eval_batches, cfg.batch_size)])
            timing["comm"] = 0.0
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            loss_sum, slept = 0.0, 0.0
            for k in range(cfg.accum):
                x, y = job.batch(next(stream)[1])
                with model.no_sync() if k < cfg.accum - 1 else contextlib.nullcontext():
                    loss = job.loss(x, y, model) / cfg.accum   # through the wrapper: its hooks allreduce
                    if k == cfg.accum - 1 and cfg.slowdown > 1.0 and slow_rng.random() < cfg.slowdown_prob:
                        # straggler: slower hardware delays this rank's part of the allreduce
                        slept = (cfg.slowdown - 1.0) * last_compute
                        time.sleep(slept)
                    loss.backward()
                loss_sum += loss.item()
            opt.step()
            t1 = time.perf_counter()
            compute = (t1 - t0) - slept - timing["comm"]
            last_compute = compute
            m["steps"].append([round(time.time() - t_start, 4), step, step, loss_sum, round(compute, 5), 0.0,
                               round(timing["comm"], 5), round(slept, 5), "applied"])
        if cfg.rank == 0 and cfg.eval_every:
            m["evals"].append([round(time.time() - t_start, 4), spec["steps"], spec["steps"],
                               job.eval_loss(cfg.eval_batches, cfg.batch_size)])
        m["wall_s"] = round(time.time() - t_start, 3)
        m["t0_epoch"] = t_start
        m["theta"] = {n: p.detach().numpy().tolist() for n, p in job.model.named_parameters()} \
            if spec.get("return_theta") else None
        dist.barrier()   # every rank is done before any tears gloo down (a rank that tore down early aborted)
        return m
    finally:
        dist.destroy_process_group()


def launch_ddp(cfg: WorkerConfig, world: int, steps: int, out: str, optimizer: str, lr: float,
               slowdown: dict[int, float] | None = None, slowdown_prob: float = 1.0, return_theta: bool = False,
               **opt_kw) -> list[dict]:
    """Run `world` DDP ranks as processes; returns each rank's metrics (also written to out/ddp{r}.json)."""
    os.makedirs(out, exist_ok=True)
    # rendezvous through a file, not a port: a port picked free and released can be taken (e.g. as another
    # connection's source port) before rank 0 binds it
    store = os.path.abspath(os.path.join(out, "ddp-rendezvous"))
    if os.path.exists(store):
        os.unlink(store)
    init = f"file://{store}"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    procs = []
    for rank in range(world):
        wcfg = dataclasses.replace(cfg, rank=rank, num_workers=world,
                                   slowdown=(slowdown or {}).get(rank, 1.0), slowdown_prob=slowdown_prob)
        spec = {"worker": dataclasses.asdict(wcfg), "world": world, "init": init, "optimizer": optimizer,
                "lr": lr, "steps": steps, "out": os.path.join(out, f"ddp{rank}.json"),
                "return_theta": return_theta, **opt_kw}
        log = open(os.path.join(out, f"ddp{rank}.log"), "w")
        procs.append(subprocess.Popen([sys.executable, "-m", "worker.ddp", json.dumps(spec)], stdout=log,
                                      stderr=subprocess.STDOUT, env=env))
    codes = [p.wait(timeout=3600) for p in procs]
    if any(codes):
        raise RuntimeError(f"DDP ranks exited with {codes}; see {out}/ddp*.log")
    results = []
    for rank in range(world):
        with open(os.path.join(out, f"ddp{rank}.json")) as f:
            results.append(json.load(f))
    return results


def main() -> int:
    spec = json.loads(sys.argv[1])
    m = run_ddp(spec)
    tmp = spec["out"] + ".tmp"
    with open(tmp, "w") as f:
        json.dump(m, f)
    os.replace(tmp, spec["out"])
    return 0


if __name__ == "__main__":
    code = main()
    # Leave without running interpreter teardown: gloo's threads, destroyed by C++ static destructors at exit,
    # sometimes abort the process ("terminate called without an active exception", SIGABRT) after the results
    # are written, which made a finished rank look failed.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
