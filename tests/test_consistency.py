"""paramserver/consistency.py: the barrier, the staleness bound and async, as a unit and end to end."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from common.config import WorkerConfig
from common.protocol import Message, MsgType, ProtocolError, decode
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


@pytest.mark.parametrize("mode", ["ssp", "async"])
def test_mean_scales_the_learning_rate_by_the_live_workers(mode):
    """--aggregate mean in ssp/async: each push moves theta lr/N (N live workers) times its gradient,
    so N pushes move it as far as one sync step; closed form with SGD, lr 1."""
    store, policy, _ = _policy(mode, n=4, staleness=100, aggregate="mean")
    for w in range(4):
        policy.join(w)
    policy.push(0, 0, g(2.0), base_version=0)        # 4 live: -2/4
    assert store.theta["w"][0] == -0.5
    policy.leave(3)
    policy.push(1, 0, g(3.0), base_version=1)        # 3 live: -3/3
    assert store.theta["w"][0] == pytest.approx(-1.5, rel=1e-6)
    policy.leave(2)
    policy.leave(1)
    policy.push(0, 1, g(1.0), base_version=2)        # 1 live: -1
    assert store.theta["w"][0] == pytest.approx(-2.5, rel=1e-6)


@pytest.mark.parametrize("mode", ["ssp", "async"])
def test_sum_does_not_scale_the_learning_rate(mode):
    store, policy, _ = _policy(mode, n=4, staleness=100, aggregate="sum")
    for w in range(4):
        policy.join(w)
    policy.push(0, 0, g(2.0), base_version=0)
    assert store.theta["w"][0] == -2.0


def test_mean_scales_the_learning_rate_not_the_gradient():
    """Adam ignores the gradient's scale: only a smaller learning rate makes its step 1/N as long.
    Adam's first step is lr * g / (|g| + eps), so with N = 4 live workers theta moves lr/4."""
    store = ParamStore("adam", lr=0.1)
    store.init({"w": np.zeros(1, np.float32)})
    policy = Consistency(store, mode="async", num_workers=4, aggregate="mean")
    for w in range(4):
        policy.join(w)
    policy.push(0, 0, g(5.0), base_version=0)
    assert store.theta["w"][0] == pytest.approx(-0.1 / 4, rel=1e-5)


def test_mean_lr_scaling_end_to_end(start_server):
    """The same through a live server: 2 registered async workers, SGD lr 0.5, one push of ones."""
    from worker.client import PSClient
    srv = start_server(num_workers=2, mode="async", optimizer="sgd", lr=0.5, aggregate="mean")
    init = {"w": np.zeros(3, np.float32)}
    with PSClient(srv.address, worker=0, server_timeout=10) as a, PSClient(srv.address, worker=1,
                                                                          server_timeout=10) as b:
        a.register(init=init)
        b.register(init=init)
        ack = a.push({"w": np.ones(3, np.float32)}, version=0, clock=0)
        assert ack.meta["status"] == "applied"
        theta = b.pull().tensors["w"]
    np.testing.assert_array_equal(theta, np.full(3, -0.25, np.float32))     # -lr/2 * 1


# -- end to end, worker threads against a live server -------------------------------------------

class ServerObserver:
    """Watches a live server from outside its consistency policy: every request it receives and
    every reply it sends, in the order its single thread handles them. From the replies alone it
    counts each worker's applied pushes (ACKs with status "applied", once per seq), so the staleness
    of every pull it grants is measured without the policy's own clocks, min_clock or max_gap.

    Install before the workers start; it wraps the server's receive (`_handle`) and send (`_send`).
    """

    def __init__(self, server, num_workers: int):
        self.n = num_workers
        self.done: Counter = Counter()         # worker -> its pushes the server has ACKed as applied
        self.acked: set[tuple[int, int]] = set()
        self.registered: set[int] = set()      # workers that got a WELCOME
        self.left: set[int] = set()            # workers whose LEAVE was answered
        self.grants: list[tuple[int, int, int]] = []   # (worker, gap when granted, all registered?)
        self.held: list[tuple[int, int, int]] = []     # (worker, gap when the pull came in, all registered?)
        self.version_mismatches: list[tuple[int, int]] = []
        self._answered: set[tuple[int, int]] = set()  # PULLs (worker, seq) that got PARAMS
        handle, send = server._handle, server._send

        def observed_handle(frames):
            try:
                msg = decode(list(frames)[1:])
            except ProtocolError:
                msg = None
            handle(frames)
            if msg is None:
                return
            key = (msg.worker, msg.seq)
            if msg.type == MsgType.PULL and key not in self._answered:
                self.held.append((msg.worker, self.gap(msg.worker), len(self.registered) == self.n))
            elif msg.type == MsgType.LEAVE:
                self.left.add(msg.worker)

        def observed_send(identity, reply, **kw):
            self._note(reply if isinstance(reply, Message) else decode(reply))
            return send(identity, reply, **kw)

        server._handle, server._send = observed_handle, observed_send

    def gap(self, worker: int) -> int:
        """How many more pushes `worker` has had applied than the slowest other live worker."""
        others = [self.done[o] for o in range(self.n) if o != worker and o not in self.left]
        return self.done[worker] - min(others) if others else 0

    def _note(self, m: Message) -> None:
        key = (m.worker, m.seq)
        if m.type == MsgType.WELCOME:
            self.registered.add(m.worker)
        elif m.type == MsgType.ACK and m.meta.get("status") == "applied" and key not in self.acked:
            self.acked.add(key)
            self.done[m.worker] += 1
        elif m.type == MsgType.PARAMS and not m.meta.get("stop") and key not in self._answered:
            self._answered.add(key)
            self.grants.append((m.worker, self.gap(m.worker), len(self.registered) == self.n))
            if m.version != sum(self.done.values()):   # ssp/async: every applied push is one version
                self.version_mismatches.append((m.version, sum(self.done.values())))


def _run(start_server, mode, slowdown=1.0, staleness=None, steps=12, n=2, job="linear", **server_kw):
    srv = start_server(num_workers=n, mode=mode, staleness=staleness, optimizer="sgd", lr=0.05,
                       aggregate="mean", **server_kw)
    srv.observer = ServerObserver(srv.server, n)
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
    seen = srv.observer
    # from the server's replies alone: a pull is granted only while the worker is at most s pushes
    # ahead of the slowest other live worker, and nothing is granted before all have registered
    assert seen.grants and all(registered for _, _, registered in seen.grants)
    gaps = [gap for _, gap, _ in seen.grants]
    assert max(gaps) <= s, f"a pull was granted {max(gaps)} pushes ahead (bound {s})"
    # and the bound is not stricter than s: a pull waits only when granting it would break the bound
    assert all(gap > s for _, gap, registered in seen.held if registered), seen.held
    assert seen.version_mismatches == []
    assert seen.done[0] == seen.done[1] == 10                  # every push applied
    # the slowed worker really held the fast one back (it never does for s >= its 10 steps)
    assert any(w == 0 and registered for w, _, registered in seen.held)
    # the policy's own account agrees with what was observed
    assert srv.server.policy.max_gap == max(gaps)
    staleness = [u[3] for u in srv.server.record.updates]
    assert max(staleness) <= 2 * (s + 1)          # bounded staleness => bounded version lag


def test_ssp_with_large_s_does_not_block_the_fast_worker(start_server):
    srv, results = _run(start_server, "ssp", slowdown=20.0, staleness=1000, steps=10, job="mlp")
    seen = srv.observer
    # once every worker has registered (the start gate), no pull is ever held: s = 1000 never binds
    assert [h for h in seen.held if h[2]] == []
    assert len(seen.grants) == 20 and seen.done[0] == seen.done[1] == 10


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
