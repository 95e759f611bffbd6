"""Sync mode equals single-process SGD on the union of the workers' batches (2 worker processes)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from common.config import JobConfig, WorkerConfig, subset
from tests.conftest import worker_process
from worker.models import build_job
from worker.train import batch_stream

STEPS, LR, N = 6, 0.1, 2


def reference_sgd(cfgs: list[WorkerConfig], aggregate: str) -> dict[str, np.ndarray]:
    """Single process: one model, each step one SGD update on the union of the workers' batches
    (with --accum k, a worker's batch is its k micro-batches)."""
    job = build_job(subset(cfgs[0], JobConfig), "cpu")
    streams = [batch_stream(c, job.n_samples)[1] for c in cfgs]
    opt = torch.optim.SGD(job.model.parameters(), lr=LR)
    for _ in range(STEPS):
        batches = [np.concatenate([next(s)[1] for _ in range(c.accum)]) for s, c in zip(streams, cfgs)]
        opt.zero_grad()
        if aggregate == "mean":   # mean over the union = data-parallel SGD
            loss = job.loss(*job.batch(np.concatenate(batches)))
        else:                     # the seed formula: theta -= lr * sum_i grad L(theta; D_i)
            loss = sum(job.loss(*job.batch(b)) for b in batches)
        loss.backward()
        opt.step()
    return job.params_numpy()


@pytest.mark.parametrize("aggregate, job, accum", [("mean", "mlp", 1), ("sum", "mlp", 1), ("mean", "gpt", 1),
                                                   ("sum", "gpt", 1), ("mean", "mlp", 3)])
def test_sync_equals_single_process_sgd(start_server, aggregate, job, accum):
    srv = start_server(num_workers=N, mode="sync", optimizer="sgd", lr=LR, aggregate=aggregate)
    small = dict(n_layer=1, n_embd=32, n_head=2, context=16, max_bytes=200_000) if job == "gpt" else {}
    cfgs = [WorkerConfig(server=srv.address, rank=r, num_workers=N, job=job, batch_size=8, steps=STEPS,
                         accum=accum, eval_every=0, log_every=0, shard="hash", seed=3, threads=1, **small)
            for r in range(N)]
    procs = [worker_process(c) for c in cfgs]
    for p in procs:
        assert p.wait(timeout=120) == 0
    server = srv.server
    assert server.store.version == STEPS
    assert all(u[3] == 0 for u in server.record.updates)            # sync: staleness exactly 0
    expected = reference_sgd(cfgs, aggregate)
    assert set(expected) == set(server.store.theta)
    worst = max(float(np.abs(server.store.theta[n] - expected[n]).max()) for n in expected)
    assert worst <= 1e-5, f"max |theta_ps - theta_sgd| = {worst}"
    moved = max(float(np.abs(server.store.theta[n] - build_job(subset(cfgs[0], JobConfig)).params_numpy()[n]).max())
                for n in expected)
    assert moved > 1e-3                                      # it really trained
