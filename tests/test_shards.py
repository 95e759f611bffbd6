"""theta sharded over K servers (common/shards.py, worker/sharded.py): the plan, exactness, every mode, faults
(through the command line and processes: tests/test_shards_cluster.py)."""
from __future__ import annotations

import numpy as np
import pytest

from common.config import WorkerConfig
from common.shards import MAX_PIECE_ELEMS, ShardPlan, check_identity
from tests.cli_inproc import cli  # noqa: F401  (a pytest fixture: `paramserver ARGS` in this process)
from tests.conftest import run_worker_thread, worker_process
from worker.client import ServerError
from worker.sharded import ShardedClient

GPT_SMALL = dict(n_layer=1, n_embd=32, n_head=2, context=16, max_bytes=200_000)


# -- the plan -----------------------------------------------------------------------------------

def test_plan_balances_bytes_and_splits_a_large_table():
    layout = {"emb": ["float32", [50_000, 64]], "w1": ["float32", [64, 64]], "b1": ["float32", [64]],
              "head": ["float32", [64, 10]]}
    plan = ShardPlan.build(layout, 2)
    emb = [p for p in plan.pieces if p.name == "emb"]
    assert len(emb) > 1 and {p.shard for p in emb} == {0, 1}           # the table is spread over both shards
    assert all(p.stop - p.start <= MAX_PIECE_ELEMS for p in plan.pieces)
    sizes = plan.shard_bytes()
    assert sum(sizes) == sum(4 * int(np.prod(s)) for _, s in layout.values())
    assert max(sizes) <= 1.1 * min(sizes)                               # size-balanced
    again = ShardPlan.build(dict(reversed(list(layout.items()))), 2)    # layout order does not matter
    assert again.hash == plan.hash and [p.key for p in again.pieces] == [p.key for p in plan.pieces]
    assert ShardPlan.build(layout, 3).hash != plan.hash


@pytest.mark.parametrize("k", [1, 2, 3])
def test_split_join_round_trip(k):
    rng = np.random.default_rng(0)
    tensors = {"a": rng.standard_normal((300, 40)).astype(np.float32), "b": rng.standard_normal(7).astype(np.float32),
               "c": np.float32(rng.standard_normal(())).reshape(())}
    plan = ShardPlan.from_tensors(tensors, k)
    parts = plan.split(tensors)
    assert sum(len(p) for p in parts) == len(plan.pieces)
    back = plan.join(parts)
    for n in tensors:
        assert back[n].shape == tensors[n].shape and np.array_equal(back[n], tensors[n])


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("wire", ["bf16", "fp16"])
def test_join_keeps_16_bit_pieces_as_they_came(k, wire):
    """A raw pull's pieces (Encoded 16-bit values) are joined without widening; a tensor whose pieces came in
    different encodings (one shard over the socket in 16 bits, one through shared memory in fp32) is widened."""
    from common.protocol import Encoded, decode_wire, encode_wire
    rng = np.random.default_rng(1)
    tensors = {"a": rng.standard_normal((300, 40)).astype(np.float32), "b": rng.standard_normal(7).astype(np.float32),
               "i": np.arange(5, dtype=np.int64)}
    plan = ShardPlan.from_tensors(tensors, k)
    wired = {n: encode_wire(t, wire) if t.dtype == np.float32 else t for n, t in tensors.items()}
    back = plan.join(plan.split(wired))
    for n, t in wired.items():
        if isinstance(t, Encoded):
            assert isinstance(back[n], Encoded) and back[n].wire == wire and np.array_equal(back[n].bits, t.bits)
        else:
            assert np.array_equal(back[n], t)
    if k > 1:   # mixed: the first piece of "a" in float32, the others 16-bit
        parts = plan.split(wired)
        first = next(p for p in plan.pieces if p.name == "a")
        if not first.whole:
            parts[first.shard][first.key] = decode_wire(parts[first.shard][first.key])
            mixed = plan.join(parts)["a"]
            assert mixed.dtype == np.float32 and np.array_equal(mixed, decode_wire(wired["a"]))


def test_check_identity_names_what_differs():
    assert check_identity(0, 1, "", None) == ""
    assert "give the worker all 2 shard addresses" in check_identity(1, 2, "", None)
    assert "shard count differs" in check_identity(0, 2, "", {"index": 0, "count": 3, "plan": "x"})
    assert "shard index differs" in check_identity(0, 2, "", {"index": 1, "count": 2, "plan": "x"})
    assert "plan hash differs" in check_identity(0, 2, "aa", {"index": 0, "count": 2, "plan": "bb"})


# -- running shards ----------------------------------------------------------------------------------

def start_shards(start_server, k, **overrides):
    shards = [start_server(shard_index=i, num_shards=k, **overrides) for i in range(k)]
    return shards, ",".join(s.address for s in shards)


def run_workers(address, n, steps, processes=False, **kw):
    """Run n workers to the end: in threads, or in processes where the initial model must be exactly the
    same on every worker (threads share torch's global generator, so their inits race)."""
    kw.setdefault("job", "mlp")
    cfgs = [WorkerConfig(server=address, rank=r, num_workers=n, batch_size=8, steps=steps, eval_every=0,
                         log_every=0, threads=1, shard="hash", seed=3, log_level="warning", **kw) for r in range(n)]
    if processes:
        procs = [worker_process(c) for c in cfgs]
        assert [p.wait(timeout=300) for p in procs] == [0] * n
        return {}
    results: dict = {}
    threads = [run_worker_thread(c, results) for c in cfgs]
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "a worker hung"
    for r in results.values():
        if isinstance(r, BaseException):
            raise r
    return results


@pytest.mark.parametrize("job, optimizer, wire", [("mlp", "adam", "fp32"), ("gpt", "adam", "fp32"),
                                                  ("mlp", "sgd", "fp32"), ("mlp", "adam", "bf16")])
def test_sync_two_shards_equal_one_server(start_server, job, optimizer, wire):
    # (bf16: the workers pull raw 16-bit pieces from each shard, joined as they came)
    small = GPT_SMALL if job == "gpt" else {}
    if wire != "fp32":
        small = {**small, "wire_dtype": wire}
    one = start_server(num_workers=2, mode="sync", optimizer=optimizer, lr=0.01)
    run_workers(one.address, 2, 5, processes=True, job=job, **small)
    shards, address = start_shards(start_server, 2, num_workers=2, mode="sync", optimizer=optimizer, lr=0.01)
    run_workers(address, 2, 5, processes=True, job=job, **small)
    expected = one.server.store.theta
    plan = ShardPlan.from_tensors(expected, 2)
    assert all(s.server.shard["plan"] == plan.hash for s in shards)
    assert all(len(s.server.store.theta) > 0 for s in shards)        # both shards hold part of theta
    got = plan.join([s.server.store.theta for s in shards])
    worst = max(float(np.abs(got[n] - expected[n]).max()) for n in expected)
    assert worst <= 1e-6, f"max |theta_K2 - theta_K1| = {worst}"
    assert all(s.server.store.version == 5 for s in shards)


def test_ssp_bound_holds_on_every_shard(start_server):
    s = 1
    shards, address = start_shards(start_server, 2, num_workers=2, mode="ssp", staleness=s, optimizer="sgd", lr=0.05)
    cfgs = [WorkerConfig(server=address, rank=r, num_workers=2, batch_size=8, steps=12, eval_every=0, log_every=0,
                         threads=1, job="mlp", shard="random", seed=11, slowdown=6.0 if r == 1 else 1.0,
                         log_level="warning") for r in range(2)]
    results: dict = {}
    threads = [run_worker_thread(c, results) for c in cfgs]
    for t in threads:
        t.join(timeout=300)
    assert all(isinstance(results[r], dict) for r in range(2)), results
    for sh in shards:
        gaps = [clock - min_clock for _, _, clock, min_clock in sh.server.record.gaps]
        assert gaps and max(gaps) <= s and sh.server.policy.max_gap <= s
        assert sh.server.store.version == 24
    assert sum(step[5] for step in results[0]["steps"]) > 0             # the bound held the fast worker back


def test_async_applies_every_push_on_every_shard(start_server):
    shards, address = start_shards(start_server, 2, num_workers=2, mode="async", optimizer="sgd", lr=0.05)
    run_workers(address, 2, 8, job="linear")
    for sh in shards:
        assert sh.server.store.version == 16 and sh.server.policy.counters["applied"] == 16


@pytest.mark.parametrize("uneven", [False, True])
def test_backup_workers_drop_the_same_gradients_on_every_shard(start_server, uneven):
    """Shard 0 decides each step's gradients; also when a worker finishes early (leaves mid-run)."""
    shards, address = start_shards(start_server, 3, num_workers=3, mode="sync", backup_workers=1, optimizer="sgd",
                                   lr=0.05)
    steps = [10, 4, 10] if uneven else [8, 8, 8]
    cfgs = [WorkerConfig(server=address, rank=r, num_workers=3, batch_size=8, steps=steps[r], eval_every=0,
                         log_every=0, threads=1, job="mlp", slowdown=3.0 if r == 2 and uneven else 1.0,
                         log_level="warning") for r in range(3)]
    results: dict = {}
    threads = [run_worker_thread(c, results) for c in cfgs]
    for t in threads:
        t.join(timeout=300)
    assert all(isinstance(results.get(r), dict) for r in range(3)), results
    contributors = []
    for sh in shards:
        c = sh.server.policy.counters
        assert c["received"] == sum(steps) == c["applied"] + c["dropped:backup"] + sh.server.policy.pending_gradients
        by_version: dict = {}
        for row in sh.server.record.updates:   # UPDATE_FIELDS: time, version, worker, ...
            by_version.setdefault(row[1], set()).add(row[2])
        contributors.append(by_version)
    assert c["dropped:backup"] > 0
    assert contributors[0] == contributors[1] == contributors[2]       # every shard applied the same gradients
    assert len({sh.server.store.version for sh in shards}) == 1


def test_accumulation_across_shards(start_server):
    one = start_server(num_workers=2, mode="sync", optimizer="sgd", lr=0.05)
    run_workers(one.address, 2, 4, processes=True, accum=3)
    shards, address = start_shards(start_server, 2, num_workers=2, mode="sync", optimizer="sgd", lr=0.05)
    run_workers(address, 2, 4, processes=True, accum=3)
    plan = ShardPlan.from_tensors(one.server.store.theta, 2)
    got = plan.join([s.server.store.theta for s in shards])
    assert max(float(np.abs(got[n] - one.server.store.theta[n]).max()) for n in got) <= 1e-6


@pytest.mark.parametrize("overlap", [False, True])
def test_a_raw_16_bit_pull_through_shards_and_overlap_stays_16_bit(start_server, overlap):
    """ShardedClient.pull(raw=True) (and through OverlapClient) hands theta over as the shards sent it: 16-bit
    values, joined, equal to the full theta narrowed; without raw, widened to float32 as before."""
    from common.protocol import Encoded, encode_wire
    from worker.overlap import OverlapClient
    rng = np.random.default_rng(5)
    theta = {"w": rng.standard_normal((60, 50)).astype(np.float32), "b": rng.standard_normal(9).astype(np.float32)}
    shards, _ = start_shards(start_server, 2, num_workers=1, mode="async", optimizer="sgd", lr=0.1)
    ps = ShardedClient([s.address for s in shards], worker=0, server_timeout=10, wire_dtype="bf16")
    client = OverlapClient(ps) if overlap else ps
    try:
        client.register(init=theta)
        got = client.pull(raw=True).tensors
        assert all(isinstance(got[n], Encoded) and np.array_equal(got[n].bits, encode_wire(t, "bf16").bits)
                   for n, t in theta.items())
        wide = client.pull().tensors
        assert all(wide[n].dtype == np.float32 and np.array_equal(wide[n], got[n].to_float32()) for n in theta)
    finally:
        client.close()


# -- a worker with the wrong shard map is refused ---------------------------------------------------

def test_mismatched_shard_map_is_refused_with_a_clear_error(start_server):
    shards, address = start_shards(start_server, 2, num_workers=1, mode="async")
    params = {"w": np.ones((4, 3), np.float32), "b": np.zeros(3, np.float32)}
    a0, a1 = address.split(",")
    with ShardedClient([a1, a0], worker=0, request_timeout=0.5, server_timeout=5) as ps:   # wrong order
        with pytest.raises(ServerError, match="shard index differs"):
            ps.register(params)
    from worker.client import PSClient
    with PSClient(a0, worker=0, request_timeout=0.5, server_timeout=5) as ps:             # one address only
        with pytest.raises(ServerError, match="give the worker all 2 shard addresses"):
            ps.register(params)
    single = start_server(num_workers=1, mode="async")
    with ShardedClient([single.address, a1], worker=0, request_timeout=0.5, server_timeout=5) as ps:
        with pytest.raises(ServerError, match="shard count differs"):
            ps.register(params)
    with ShardedClient([a0, a1], worker=0, request_timeout=0.5, server_timeout=5) as ps:   # the right map
        ps.register(params)
        got = ps.pull()
        assert np.array_equal(got.tensors["w"], params["w"])
    other = {"w": np.ones((5, 3), np.float32), "b": np.zeros(3, np.float32)}              # another model
    with ShardedClient([a0, a1], worker=1, request_timeout=0.5, server_timeout=5) as ps:
        with pytest.raises(ServerError, match="plan hash differs"):
            ps.register(other)
    for sh in shards:
        assert sh.server.counters["rejected"] >= 1


# -- the command line (`cluster --shards`, `status`, a shard killed and resumed, CurveZMQ per shard: tests/test_shards_cluster.py) --

@pytest.mark.parametrize("args, needle", [
    (["server", "--shard-index", "2", "--num-shards", "2"], "--shard-index 2 must be in [0, 1] for --num-shards 2"),
    (["worker", "--server", "tcp://127.0.0.1:1,tcp://127.0.0.1:1"], "names the same address twice"),
    (["worker", "--server", "tcp://127.0.0.1:1,"], "has an empty address"),
    (["cluster", "--shards", "0"], "--shards must be at least 1"),
])
def test_bad_shard_flags_are_rejected_with_a_clear_message(cli, args, needle):
    r = cli(*args)   # in this process: each is refused before anything starts
    assert r.returncode == 2 and needle in r.stderr and "Traceback" not in r.stderr


def test_bench_shards_measures_every_configuration(tmp_path, monkeypatch):
    """run_shards' plan: one bench.shards.measure row per shards x workers x transport, in that order, with the
    size, seconds and folder given. The measurement itself (every figure measured, the shm rows through /dev/shm,
    the tcp rows never) runs once in the suite, on these same 8 configurations: `bench throughput`'s shard table,
    tests/test_bench_throughput_shards.py."""
    import paramserver.bench.shards as bench_shards
    from paramserver.bench.shards import ShardsBenchConfig, run_shards
    calls = []

    def measure(k, n, transport, size, seconds, out):
        calls.append((size, seconds, out))
        return {"shards": k, "workers": n, "transport": transport}

    monkeypatch.setattr(bench_shards, "measure", measure)
    rows = run_shards(ShardsBenchConfig(shards="1,2", workers="1,2", size=5000, seconds=0.3, overlap_steps=0,
                                        out=str(tmp_path)))
    assert [(r["shards"], r["workers"], r["transport"]) for r in rows] == [
        (k, n, t) for k in (1, 2) for n in (1, 2) for t in ("shm", "tcp")]
    assert calls == [(5000, 0.3, str(tmp_path))] * 8
