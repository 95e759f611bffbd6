"""Review of issue 20 (local steps): failing tests for bugs found in review (each names what it pins)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.conftest import wait_for


@pytest.mark.parametrize("overlap", [False, True])
def test_async_overlap_local_steps_one_worker_server_theta_is_the_models(start_server, overlap):
    """One worker, async, outer averaging (sgd lr 1), local_steps=3: every round's Δ moves the server's θ onto the
    worker's θ_local, so after close() the server's θ is the model's θ. With overlap=True the async prefetch
    hands the worker, at the next round, the θ fetched at the *start* of the last round (before its own Δ):
    each round restarts from a θ one whole round old and the server adds Δs anchored on stale θs."""
    from worker.api import DistributedOptimizer
    from common.config import ConfigError
    srv = start_server(num_workers=1, mode="async", optimizer="sgd", lr=1.0)
    torch.manual_seed(0)
    if overlap:   # (fixed by refusing the combination: local steps communicate once per round anyway)
        with pytest.raises(ConfigError, match="--overlap"):
            DistributedOptimizer(torch.nn.Linear(4, 1), local_steps=3, server=srv.address, shm=False, overlap=True)
        return
    model = torch.nn.Linear(4, 1)
    opt = DistributedOptimizer(model, inner=torch.optim.SGD(model.parameters(), lr=0.05), local_steps=3,
                               server=srv.address, shm=False, overlap=overlap)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(48, 4, generator=g), torch.randn(48, 1, generator=g)
    for i in range(12):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x[i * 4:i * 4 + 4]), y[i * 4:i * 4 + 4]).backward()
        opt.step()
    opt.close()
    wait_for(lambda: srv.server.store.version == 4, what="4 rounds applied")
    for name, p in model.named_parameters():
        assert np.allclose(srv.server.store.theta[name], p.detach().numpy(), atol=1e-6), name


def test_cluster_outer_lr_default_only_when_neither_optimizer_nor_lr_given():
    """docs/cli.md: 'With --local-steps H > 1 and no --optimizer or --lr given, the cluster's server runs
    --optimizer sgd --lr 1'. `--optimizer adam` alone must not become Adam at lr 1 (nor nesterov at lr 1)."""
    from common.config import outer_defaults
    from paramserver.cli import build_parser
    parse = lambda *a: build_parser().parse_args(["cluster", *a])   # noqa: E731
    assert outer_defaults(parse("--local-steps", "50", "--optimizer", "adam"), 50) == {}
    assert outer_defaults(parse("--local-steps", "50", "--optimizer", "nesterov"), 50) == {}


def test_api_workers_with_different_local_steps_are_refused(start_server):
    """docs/local-steps.md: 'Every worker of a job must use the same H ... a worker with another H is refused'.
    API workers register without job flags, so a local_steps=1 worker (pushing gradients) joins a job of
    local_steps=2 workers (pushing Δs) unchallenged, and the server never warns about outer Adam for them."""
    from worker.api import DistributedOptimizer
    from worker.client import ServerError
    import threading
    srv = start_server(num_workers=2, mode="async", optimizer="sgd", lr=1.0)
    made: dict = {}

    def first():   # its first pull waits at the start gate for the second worker
        made["first"] = DistributedOptimizer(torch.nn.Linear(4, 1), local_steps=2, rank=0, num_workers=2,
                                             server=srv.address, shm=False)
    t = threading.Thread(target=first, daemon=True)
    t.start()
    wait_for(lambda: srv.server.store.initialized, what="theta")
    try:
        with pytest.raises(ServerError, match="local-steps"):
            made["other"] = DistributedOptimizer(torch.nn.Linear(4, 1), rank=1, num_workers=2, server=srv.address,
                                                  shm=False)
    finally:
        t.join(timeout=30)
        for opt in made.values():
            opt.close()


def test_bench_local_samples_exclude_pushes_dropped_after_the_budget():
    """bench local's summarize says 'samples behind the pushes that were applied or held (a push refused after
    the budget trained nothing kept)', but counts every worker's inner_steps, dropped rounds included: the
    recorded async rows say 53600 samples (67 pushes, 64 applied) for a 51200-sample plan, and bytes/sample is
    divided by that."""
    from paramserver.bench.local import LocalBenchConfig, summarize
    cfg = LocalBenchConfig(plan="quick", workers=2, samples=6400, batch_size=16)
    row = lambda status: [0.0, 0, 0, 1.0, 0.1, 0.0, 0.01, 0.0, status, 0.005, 0.005]   # noqa: E731
    workers = [{"inner_steps": 20, "steps": [row("applied"), row("applied")], "evals": [],
                "client": {"bytes_pushed": 100, "bytes_pulled": 100}},
               {"inner_steps": 20, "steps": [row("applied"), row("dropped")], "evals": [],
                "client": {"bytes_pushed": 100, "bytes_pulled": 100}}]
    raw = {"workers": workers, "wall_s": 1.0, "version": 3}
    res = summarize(cfg, {"name": "async avg H=10 straggler"}, raw, 1.0)
    assert res["samples"] == 3 * 10 * 16, res["samples"]     # 3 rounds of H = 10 were kept, not 4
