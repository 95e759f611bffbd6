"""worker/ddp.py: DDP over gloo and the sync parameter server are the same math (two systems)."""
from __future__ import annotations

import numpy as np

from common.config import WorkerConfig
from tests.conftest import worker_process
from worker.ddp import launch_ddp

STEPS, N, LR = 5, 2, 0.1


def test_ddp_equals_sync_ps(start_server, tmp_path):
    srv = start_server(num_workers=N, mode="sync", optimizer="sgd", lr=LR, aggregate="mean")
    cfgs = [WorkerConfig(server=srv.address, rank=r, num_workers=N, job="mlp", batch_size=8, steps=STEPS,
                         eval_every=0, log_every=0, seed=5, threads=1) for r in range(N)]
    procs = [worker_process(c) for c in cfgs]
    ddp = launch_ddp(cfgs[0], N, STEPS, str(tmp_path), "sgd", LR, return_theta=True)
    for p in procs:
        assert p.wait(timeout=120) == 0
    ps_theta = srv.server.store.theta
    for rank in range(N):
        for name, values in ddp[rank]["theta"].items():
            np.testing.assert_allclose(np.array(values, np.float32), ps_theta[name], atol=1e-5, rtol=0)
    assert len(ddp[0]["steps"]) == STEPS and ddp[0]["steps"][-1][3] > 0
