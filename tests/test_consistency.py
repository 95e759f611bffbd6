"""paramserver/consistency.py: the barrier, the staleness bound and async, as a unit and end to end."""
from __future__ import annotations

import numpy as np
import pytest

from common.config import WorkerConfig
from paramserver.consistency import Consistency
from paramserver.store import ParamStore
from tests.conftest import run_worker_thread


def _policy(mode, n=2, **kw):
    store = ParamStore("sgd", lr=1.0)
    store.init({"w": np.zeros(1, np.float32)})
    log = []
    policy = Consistency(store, mode=mode, num_workers=n, on_update=lambda v, c: log.append((v, c)), **kw)
    return store, policy, log


def g(x):
    return {"w": np.array([x], np.float32)}


def test_sync_barrier_applies_once_per_step():
    store, policy, log = _policy("sync", aggregate="sum")
    policy.join(0)
    assert not policy.pull_ready(0)              # start gate: 1 of 2 registered
    policy.join(1)
    assert policy.pull_ready(0) and policy.pull_ready(1)
    assert policy.push(0, 0, g(1.0), base_version=0).status == "accumulated"
    assert not policy.pull_ready(0)              # waits for worker 1
    assert policy.push(1, 0, g(2.0), base_version=0).status == "applied"
    assert store.theta["w"][0] == -3.0 and policy.step == 1
    assert [c.staleness for c in log[0][1]] == [0, 0]
    assert policy.pull_ready(0) and policy.pull_ready(1)


def test_sync_mean_and_leave():
    store, policy, _ = _policy("sync", n=3, aggregate="mean")
    for w in range(3):
        policy.join(w)
    policy.push(0, 0, g(3.0), 0)
    policy.push(1, 0, g(6.0), 0)
    policy.leave(2)                               # the step completes without the worker that left
    assert policy.step == 1 and store.theta["w"][0] == pytest.approx(-4.5)


def test_sync_backup_workers_drop_the_slowest():
    store, policy, log = _policy("sync", n=3, backup_workers=1, aggregate="sum")
    for w in range(3):
        policy.join(w)
    policy.push(0, 0, g(1.0), 0)
    assert policy.push(1, 0, g(1.0), 0).status == "applied"       # N - b = 2 gradients
    late = policy.push(2, 0, g(100.0), 0)
    assert late.status == "dropped" and "backup" in late.reason
    assert store.theta["w"][0] == -2.0
    assert policy.counters["dropped:backup"] == 1 and policy.counters["applied"] == 2
    assert policy.pull_ready(2)                   # the late worker continues at the current step


def test_ssp_bound():
    _, policy, _ = _policy("ssp", staleness=2)
    policy.join(0)
    policy.join(1)
    for clock in range(3):                        # worker 0 runs ahead while worker 1 stays at 0
        assert policy.pull_ready(0)
        policy.push(0, clock, g(0.0), base_version=clock)
    assert policy.clocks[0] == 3 and not policy.pull_ready(0)
    policy.push(1, 0, g(0.0), 0)
    assert policy.pull_ready(0)
    policy.leave(1)                               # a departed worker no longer holds anyone back
    policy.push(0, 3, g(0.0), 3)
    policy.push(0, 4, g(0.0), 4)
    assert policy.pull_ready(0)


def test_async_applies_every_push_and_measures_staleness():
    store, policy, log = _policy("async", aggregate="sum")
    policy.join(0)
    policy.join(1)
    policy.push(0, 0, g(1.0), base_version=0)
    policy.push(1, 0, g(1.0), base_version=0)     # computed on version 0, applied at version 1
    assert store.version == 2 and [c[0].staleness for _, c in log] == [0, 1]


# -- end to end, worker threads against a live server -------------------------------------------

def _run(start_server, mode, slowdown=1.0, staleness=3, steps=12, n=2, job="linear", **server_kw):
    srv = start_server(num_workers=n, mode=mode, staleness=staleness, optimizer="sgd", lr=0.05,
                       aggregate="mean", **server_kw)
    results, threads = {}, []
    for rank in range(n):
        cfg = WorkerConfig(server=srv.address, rank=rank, num_workers=n, job=job, batch_size=16, steps=steps,
                           eval_every=0, log_every=0, slowdown=slowdown if rank == n - 1 else 1.0,
                           heartbeat=0.5, log_level="warning")
        threads.append(run_worker_thread(cfg, results))
    for t in threads:
        t.join(timeout=120)
    for r in results.values():
        if isinstance(r, BaseException):
            raise r
    return srv, results


@pytest.mark.parametrize("s", [0, 1, 3])
def test_ssp_gap_never_exceeds_s_with_a_slow_worker(start_server, s):
    srv, results = _run(start_server, "ssp", slowdown=20.0, staleness=s, steps=10, job="mlp")
    server = srv.server
    gaps = [clock - min_clock for _, _, clock, min_clock in server.record.gaps]
    assert max(gaps) <= s and server.policy.max_gap <= s
    fast_wait = sum(step[5] for step in results[0]["steps"])
    assert fast_wait > 0                          # the bound did hold the fast worker back
    staleness = [u[3] for u in server.record.updates]
    assert max(staleness) <= 2 * (s + 1)          # bounded staleness => bounded version lag


def test_ssp_with_large_s_does_not_block_the_fast_worker(start_server):
    srv, results = _run(start_server, "ssp", slowdown=20.0, staleness=1000, steps=10, job="mlp")
    fast = results[0]["steps"]
    assert sum(step[5] for step in fast) < 0.05   # seconds held at the bound
    # the fast worker finished long before the slow one: it was never made to wait for it
    assert results[0]["wall_s"] < 0.6 * results[1]["wall_s"]


def test_async_converges_on_a_convex_problem(start_server):
    srv, results = _run(start_server, "async", steps=150, n=2, job="linear", slowdown=2.0)
    server = srv.server
    losses = [u[4] for u in server.record.updates]
    assert server.store.version == 300            # every push applied on arrival
    assert np.mean(losses[-20:]) < 0.1 * np.mean(losses[:5])
    assert max(u[3] for u in server.record.updates) >= 1  # real staleness recorded


def test_uneven_workers_do_not_hang_the_barrier(start_server):
    srv = start_server(num_workers=3, mode="sync", optimizer="sgd", lr=0.05)
    results, threads = {}, []
    for rank, steps in enumerate([20, 5, 20]):
        cfg = WorkerConfig(server=srv.address, rank=rank, num_workers=3, job="linear", batch_size=8,
                           steps=steps, eval_every=0, log_every=0, heartbeat=0.5, log_level="warning")
        threads.append(run_worker_thread(cfg, results))
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads), "a worker hung at the barrier"
    assert [len(results[r]["steps"]) for r in range(3)] == [20, 5, 20]
    assert srv.server.policy.step == 20
    counters = srv.server.policy.counters
    assert counters["received"] == counters["applied"] == 45


# -- determinism: sync sums in worker-id order -----------------------------------------------------

def test_sync_sum_is_bit_identical_whatever_the_arrival_order():
    """float32 addition is not associative: 1e8 + 1 - 1e8 + 1 depends on the order. The step's sum is
    taken in worker-id order, so every arrival order of 4 workers gives the same theta bit for bit."""
    import itertools
    values = [1e8, 1.0, -1e8, 1.0, 3.0]
    thetas = set()
    for order in itertools.permutations(range(4)):
        store, policy, _ = _policy("sync", n=4, aggregate="sum")
        for w in range(4):
            policy.join(w)
        for w in order:
            policy.push(w, 0, g(values[w]), base_version=0)
        assert policy.step == 1
        thetas.add(store.theta["w"].tobytes())
    expected = np.float32(0)
    for v in values[:4]:
        expected = np.float32(expected + np.float32(v))
    assert thetas == {np.array([-expected], np.float32).tobytes()}


def test_sync_order_holds_when_a_lower_worker_dies_mid_step():
    store, policy, _ = _policy("sync", n=4, aggregate="sum")
    for w in range(4):
        policy.join(w)
    for w, v in ((3, 1.0), (2, -1e8), (1, 1e8)):   # arrival order would give (1 - 1e8) + 1e8 = 0
        policy.push(w, 0, g(v), base_version=0)
    policy.leave(0)                               # the step completes with 1, 2, 3, summed in that order
    assert policy.step == 1
    assert store.theta["w"][0] == -1.0


def test_a_worker_that_rejoins_a_step_it_pushed_for_waits_for_the_next_step():
    store, policy, _ = _policy("sync", n=2, aggregate="sum")
    policy.join(0)
    policy.join(1)
    policy.push(0, 0, g(1.0), base_version=0)
    assert policy.join(0) == 1                    # its gradient is in step 0: it continues at step 1
    assert not policy.pull_ready(0)               # so it waits, instead of spinning on `dropped:twice`
    policy.push(1, 0, g(2.0), base_version=0)
    assert policy.step == 1 and policy.pull_ready(0)
    assert policy.counters["dropped:twice"] == 0 and store.theta["w"][0] == -3.0
