"""Local steps (--local-steps H > 1, worker/local.py) with the outer optimizer on the server (paramserver/update.py)."""
from __future__ import annotations

import os
import signal
import subprocess

import numpy as np
import pytest
import torch

from common.config import JobConfig, WorkerConfig, subset
from paramserver.store import ParamStore
from paramserver.update import UpdateRule
from tests.cli_inproc import cli  # noqa: F401  (a pytest fixture)
from tests.conftest import run_worker_thread, wait_for, worker_process
from worker.local import LocalSteps
from worker.models import build_job
from worker.train import batch_stream


def test_pseudo_gradient_points_uphill():
    """Δ = θ_pulled − θ_local: after one inner SGD step θ_local = θ − lr·g, so Δ = +lr·g (a gradient's sign), and
    the server's θ −= lr_outer·Δ moves θ towards θ_local. A wrong sign (θ_local − θ_pulled) would fail here."""
    model = torch.nn.Linear(3, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, -2.0, 0.5]]))
    local = LocalSteps(model, "sgd", lr=0.1)
    local.begin()
    model.weight.grad = torch.tensor([[0.3, -0.6, 1.0]])
    local.step()
    delta = local.delta()["weight"]
    assert torch.allclose(delta, 0.1 * torch.tensor([[0.3, -0.6, 1.0]]), atol=1e-7)
    theta = torch.tensor([[1.0, -2.0, 0.5]]) - 1.0 * delta          # outer sgd, lr 1: averaging of one worker
    assert torch.allclose(theta, model.weight.detach(), atol=1e-7)


def test_inner_state_kept_across_rounds():
    model = torch.nn.Linear(2, 1)
    local = LocalSteps(model, "adamw", lr=0.01)
    for _ in range(2):
        local.begin()
        for _ in range(3):
            model.zero_grad()
            model(torch.ones(1, 2)).sum().backward()
            local.step()
    assert int(local.inner.state[model.weight]["step"]) == 6      # Adam's moments and t were not reset
    assert local.rounds == 2 and local.steps == 3


def _reference(cfgs: list[WorkerConfig], rounds: int, outer: torch.optim.Optimizer | None, lr: float,
               momentum: float, nesterov: bool) -> dict[str, np.ndarray]:
    """One process: each worker's model takes H AdamW steps from θ on its own batches (its AdamW state kept
    across rounds); θ's outer step uses the mean Δ as its gradient (torch's SGD, as the server's)."""
    base = build_job(subset(cfgs[0], JobConfig), "cpu")
    theta = [p for p in base.model.parameters()]
    outer = torch.optim.SGD(theta, lr=lr, momentum=momentum, nesterov=nesterov)
    jobs = [build_job(subset(c, JobConfig), "cpu") for c in cfgs]
    locals_ = [LocalSteps(j.model, c.inner_optimizer, c.inner_lr, c.inner_weight_decay) for j, c in zip(jobs, cfgs)]
    streams = [batch_stream(c, j.n_samples)[1] for c, j in zip(cfgs, jobs)]
    for _ in range(rounds):
        deltas = []
        for job, local, stream, c in zip(jobs, locals_, streams, cfgs):
            with torch.no_grad():
                for p, t in zip(job.model.parameters(), theta):
                    p.copy_(t)
            local.begin()
            for _ in range(c.local_steps):
                job.model.zero_grad(set_to_none=False)
                job.loss(*job.batch(next(stream)[1])).backward()
                local.step()
            deltas.append({n: d.clone() for n, d in local.delta().items()})
        total = {n: deltas[0][n] + deltas[1][n] for n in deltas[0]}        # Σ in worker-id order, then 1/N
        for (n, _), p in zip(base.model.named_parameters(), theta):
            p.grad = total[n] * 0.5
        outer.step()
    return base.params_numpy()


@pytest.mark.parametrize("rule, shards", [("averaging", 1), ("nesterov", 1), ("averaging", 2)])
def test_sync_local_steps_equal_single_process(start_server, tmp_path, rule, shards):
    """Sync with 2 workers and H = 4: the server's θ after 3 rounds equals a one-process run of the same inner
    and outer steps (averaging: outer sgd lr 1; DiLoCo's outer Nesterov lr 0.7 momentum 0.9), θ on one server
    or split over 2 shards. Worker processes: threads would share torch's generator and race on the init."""
    import json
    from common.shards import ShardPlan
    lr, momentum, nesterov = (1.0, 0.0, False) if rule == "averaging" else (0.7, 0.9, True)
    servers = [start_server(num_workers=2, mode="sync", optimizer="sgd" if rule == "averaging" else "nesterov",
                            lr=lr, momentum=0.9, shard_index=i, num_shards=shards) for i in range(shards)]
    cfgs = [WorkerConfig(server=",".join(s.address for s in servers), rank=r, num_workers=2, job="mlp",
                         batch_size=8, steps=12, local_steps=4, inner_lr=0.01, eval_every=0, log_every=0, seed=5,
                         threads=1, out=str(tmp_path)) for r in range(2)]
    procs = [worker_process(c) for c in cfgs]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    metrics = [json.loads((tmp_path / f"worker{r}.json").read_text()) for r in range(2)]
    assert [m["inner_steps"] for m in metrics] == [12, 12]
    assert [len(m["steps"]) for m in metrics] == [3, 3]      # one push per round
    assert all(s.server.store.version == 3 for s in servers)
    theta = servers[0].server.store.theta if shards == 1 else \
        ShardPlan.from_tensors(build_job(subset(cfgs[0], JobConfig)).params_numpy(), shards).join(
            [s.server.store.theta for s in servers])
    expected = _reference(cfgs, 3, None, lr, momentum, nesterov)
    worst = max(float(np.abs(theta[n] - expected[n]).max()) for n in expected)
    assert worst <= 1e-5, f"max |theta_ps - theta_ref| = {worst}"
    init = build_job(subset(cfgs[0], JobConfig)).params_numpy()
    assert max(float(np.abs(expected[n] - init[n]).max()) for n in init) > 1e-3   # it really trained


def test_local_steps_one_is_per_step_training(start_server):
    """H = 1 (the default) takes the per-step path: no inner optimizer, one push per step, gradients pushed."""
    srv = start_server(num_workers=1, mode="sync", optimizer="sgd", lr=0.1)
    cfg = WorkerConfig(server=srv.address, job="linear", steps=5, eval_every=0, log_every=0, threads=1)
    results: dict = {}
    run_worker_thread(cfg, results).join(timeout=60)
    assert "local_steps" not in results[0] and "inner_steps" not in results[0]
    assert len(results[0]["steps"]) == 5 and srv.server.store.version == 5


def test_delayed_nesterov_moves_momentum_every_period_only():
    """Each Δ is applied at once with lr/N; the momentum changes only at every N-th arrival, with the mean of
    the last N Δs, and then adds lr·β·m (one outer Nesterov step per N arrivals)."""
    theta = {"w": np.zeros(3, np.float32)}
    rule = UpdateRule("delayed-nesterov", lr=1.0, momentum=0.5, period=2)
    rule.build(theta, state={}, opt_steps=0)
    d1, d2, d3 = (np.array(v, np.float32) for v in ([1, 0, 0], [0, 2, 0], [0, 0, 4]))
    rule.apply({"w": d1}, 1.0, 0.5)
    assert np.allclose(theta["w"], -0.5 * d1)
    assert not rule.state()["w"]["momentum"].any()                  # not yet: 1 of 2 arrivals
    rule.apply({"w": d2}, 1.0, 0.5)
    m = 0.5 * (d1 + d2)
    assert np.allclose(rule.state()["w"]["momentum"], m)
    assert np.allclose(theta["w"], -0.5 * d1 - 0.5 * d2 - 0.5 * m)
    rule.apply({"w": d3}, 1.0, 0.5)
    assert np.allclose(rule.state()["w"]["momentum"], m)            # unchanged at the 3rd arrival
    assert np.allclose(rule.state()["w"]["pending"], d3)


@pytest.mark.parametrize("optimizer", ["nesterov", "delayed-nesterov"])
def test_outer_state_survives_a_checkpoint_mid_round(optimizer):
    """A store checkpointed after 3 Δs (mid-round for delayed-nesterov with period 2: one Δ pending) and
    resumed ends where an uninterrupted one does."""
    rng = np.random.default_rng(0)
    deltas = [{"w": rng.standard_normal(5).astype(np.float32)} for _ in range(5)]

    def store():
        s = ParamStore(optimizer, lr=0.7, momentum=0.9, period=2)
        s.init({"w": np.ones(5, np.float32)})
        return s
    straight, first = store(), store()
    for d in deltas:
        straight.apply(d, 1.0, 0.5)
    for d in deltas[:3]:
        first.apply(d, 1.0, 0.5)
    saved = first.state_dict()
    assert "momentum" in saved["optimizer_state"]["w"]
    resumed = ParamStore(optimizer, lr=0.7, momentum=0.9, period=2)
    resumed.load_state_dict(saved)
    for d in deltas[3:]:
        resumed.apply(d, 1.0, 0.5)
    assert np.allclose(resumed.theta["w"], straight.theta["w"], atol=1e-6)


def test_api_local_steps_uses_your_optimizer(start_server):
    """DistributedOptimizer(model, inner=..., local_steps=3): your optimizer steps the model; each push carries
    θ_pulled − θ_local, so with one worker and outer averaging (sgd, lr 1) the server's θ is your model's θ."""
    from worker.api import DistributedOptimizer
    from common.config import ConfigError
    srv = start_server(num_workers=1, mode="sync", optimizer="sgd", lr=1.0)
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    with pytest.raises(ConfigError, match="local_steps"):
        DistributedOptimizer(model, inner=torch.optim.SGD(model.parameters(), lr=0.1), server=srv.address)
    opt = DistributedOptimizer(model, inner=torch.optim.SGD(model.parameters(), lr=0.05), local_steps=3,
                               server=srv.address, shm=False)
    x, y = torch.randn(32, 4), torch.randn(32, 1)
    for i in range(7):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x[i * 4:i * 4 + 4]), y[i * 4:i * 4 + 4]).backward()
        opt.step()
    assert srv.server.store.version == 2                 # 2 full rounds of 3 steps
    opt.close()                                          # the 7th step: a last, shorter round
    wait_for(lambda: srv.server.store.version == 3, what="the last round's push")
    for name, p in model.named_parameters():
        assert np.allclose(srv.server.store.theta[name], p.detach().numpy(), atol=1e-6), name


def test_dead_worker_mid_round_is_dropped_and_the_job_goes_on(start_server, tmp_path):
    """A worker killed in the middle of a round (sync, H = 5): the server declares it dead after
    --worker-timeout, the barrier goes on without it, and the other worker finishes its rounds."""
    srv = start_server(num_workers=2, mode="sync", optimizer="sgd", lr=1.0, worker_timeout=2.0)
    common = dict(server=srv.address, num_workers=2, job="mlp", batch_size=8, local_steps=5, eval_every=0,
                  log_every=1, threads=1, shm=False, heartbeat=0.5)
    slow = worker_process(WorkerConfig(rank=1, steps=500, slowdown=30.0, **common),
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    results: dict = {}
    fast = run_worker_thread(WorkerConfig(rank=0, steps=40, **common), results)
    try:
        wait_for(lambda: srv.server.store.version >= 2, timeout=120, what="two rounds")
        os.kill(slow.pid, signal.SIGKILL)   # mid-round: it sleeps 29x its compute after each round's steps
        slow.wait(timeout=10)
        fast.join(timeout=120)
    finally:
        if slow.poll() is None:
            slow.kill()
    assert isinstance(results[0], dict) and results[0]["inner_steps"] == 40, results
    status = srv.server.status()
    assert status["counters"]["dead"] == 1
    assert srv.server.store.version == 8                      # the survivor's 8 rounds were all applied


def test_cluster_defaults_to_outer_averaging_unless_told():
    """`cluster --local-steps 50` runs its server with sgd at lr 1 (averaging); a given --optimizer / --lr wins;
    per-step jobs keep the server's own defaults."""
    from common.config import outer_defaults
    from paramserver.cli import build_parser
    parse = lambda *a: build_parser().parse_args(["cluster", *a])   # noqa: E731
    assert outer_defaults(parse("--local-steps", "50"), 50) == {"optimizer": "sgd", "lr": 1.0}
    assert outer_defaults(parse("--local-steps", "50", "--optimizer", "nesterov", "--lr", "0.7"), 50) == {}
    assert outer_defaults(parse("--local-steps", "50", "--lr", "0.5"), 50) == {"optimizer": "sgd"}
    assert outer_defaults(parse("--local-steps", "50", "--optimizer", "momentum"), 50) == {}   # yours, your --lr
    assert outer_defaults(parse(), 1) == {}


def test_server_warns_when_adam_is_the_outer_optimizer(start_server, caplog):
    import logging
    srv = start_server(num_workers=1, mode="sync")            # the server's default: adam at 0.003
    cfg = WorkerConfig(server=srv.address, job="linear", steps=4, local_steps=2, eval_every=0, log_every=0,
                       threads=1)
    results: dict = {}
    with caplog.at_level(logging.INFO, logger="paramserver.server"):
        run_worker_thread(cfg, results).join(timeout=60)
    assert isinstance(results[0], dict), results
    assert any("--local-steps 2 with the server's --optimizer adam" in r.getMessage() for r in caplog.records)
    assert srv.server.job.flags["local_steps"] == 2


def test_a_worker_with_other_local_steps_is_refused(start_server):
    from worker.client import ServerError
    srv = start_server(num_workers=2, mode="async", optimizer="sgd", lr=1.0)
    results: dict = {}
    base = dict(server=srv.address, num_workers=2, job="linear", steps=4, eval_every=0, log_every=0, threads=1)
    first = run_worker_thread(WorkerConfig(rank=0, local_steps=2, **base), results)
    wait_for(lambda: srv.server.store.initialized, what="theta")
    run_worker_thread(WorkerConfig(rank=1, local_steps=3, **base), results).join(timeout=60)
    assert isinstance(results[1], ServerError) and "--local-steps 3 (the job has 2)" in str(results[1])
    run_worker_thread(WorkerConfig(rank=1, local_steps=2, **base), results).join(timeout=60)   # the right one
    first.join(timeout=60)
    assert results[0]["inner_steps"] == results[1]["inner_steps"] == 4


@pytest.mark.parametrize("case", ["bf16", "backup", "entry", "ssp"])
def test_local_steps_work_with_the_other_features(start_server, case):
    """H = 3 with a 16-bit wire, with backup workers (3 workers, the first 2 Δs of each round form the step),
    with your own --entry model, and under ssp: every round is pushed and applied (or dropped as late)."""
    n = 3 if case == "backup" else 2
    server = {"backup": {"backup_workers": 1}, "ssp": {"mode": "ssp", "staleness": 1}}.get(case, {})
    srv = start_server(num_workers=n, **{"mode": "sync", "optimizer": "sgd", "lr": 1.0, **server})
    worker = {"bf16": {"wire_dtype": "bf16"}, "entry": {"entry": "examples.cnn_entry:make_job"}}.get(case, {})
    cfgs = [WorkerConfig(server=srv.address, rank=r, num_workers=n, job="mlp", batch_size=8, steps=9, local_steps=3,
                         eval_every=0, log_every=0, threads=1, **worker) for r in range(n)]
    results: dict = {}
    for t in [run_worker_thread(c, results) for c in cfgs]:
        t.join(timeout=120)
    assert all(isinstance(results[r], dict) and results[r]["inner_steps"] == 9 for r in range(n)), results
    c = srv.server.status()["counters"]
    assert c["received"] == 3 * n
    if case == "backup":
        assert srv.server.store.version == 3 and c["applied"] == 6 and c["dropped:backup"] == 3
    elif case == "ssp":
        assert srv.server.store.version == 6
    else:
        assert srv.server.store.version == 3 and c["applied"] == 6


def test_the_readmes_local_steps_cluster_trains_with_outer_averaging(cli, tmp_path):
    """`paramserver cluster --local-steps H` (the README's command, on a small job): the server runs outer
    averaging (sgd, lr 1), every worker pushes once per round, and the run applies one outer step per round."""
    import json
    out = tmp_path / "local"
    r = cli("cluster", "--local-steps", "5", "--workers", "2", "--job", "mlp", "--steps", "20", "--eval-every", "0",
            "--sample-bytes", "0", "--out", str(out))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "optimizer sgd lr 1" in r.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    workers = [metrics["workers"][k] for k in sorted(metrics["workers"])]
    assert [w["inner_steps"] for w in workers] == [20, 20] and [len(w["steps"]) for w in workers] == [4, 4]
    assert torch.load(out / "checkpoint.pt", weights_only=False)["version"] == 4
