"""theta sharded over K servers (common/shards.py, worker/sharded.py): the plan, exactness, every mode, faults."""
from __future__ import annotations

import json

import numpy as np
import pytest

from common.config import WorkerConfig
from common.shards import MAX_PIECE_ELEMS, ShardPlan, check_identity
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


# -- the command line -----------------------------------------------------------------------------

def test_cluster_with_two_shards_trains_and_merges_checkpoints(tmp_path):
    import torch
    from tests.test_cli import ps
    out = tmp_path / "run"
    r = ps("cluster", "--shards", "2", "--workers", "2", "--steps", "12", "--n-layer", "1", "--n-embd", "32",
           "--n-head", "2", "--context", "32", "--max-bytes", "300000", "--eval-every", "0", "--out", str(out),
           "--sample-bytes", "0", "--threads", "1")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "2 server shards" in r.stdout and "held-out loss" in r.stdout
    shards = [torch.load(out / f"checkpoint-shard{i}.pt") for i in range(2)]
    assert [s["shard"]["index"] for s in shards] == [0, 1] and all(s["version"] == 12 for s in shards)
    assert set(shards[0]["theta"]).isdisjoint(shards[1]["theta"])
    merged = torch.load(out / "checkpoint.pt")
    assert merged["version"] == 12 and merged["shard_versions"] == [12, 12]
    assert set(merged["theta"]) == set(merged["shard_layout"] or shards[0]["shard_layout"])
    assert "exp_avg" in next(iter(merged["optimizer_state"].values()))
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["summary"]["final_eval_loss"] < metrics["summary"]["initial_eval_loss"]
    check_shard_checkpoints(out)


def check_shard_checkpoints(out):
    """The merged checkpoint resumes a single server; a shard checkpoint is refused by the wrong shard; shards
    resumed at different sync steps make the registering worker say so."""
    import logging
    from common.checkpoint import load_checkpoint, save_checkpoint
    from common.config import ConfigError, ServerConfig
    from common.shards import merge_states
    from paramserver.server import Server
    merged = load_checkpoint(str(out / "checkpoint.pt"))
    single = Server(ServerConfig(resume=str(out / "checkpoint.pt"), bind="tcp://127.0.0.1:*", log_level="warning",
                                  num_workers=2))
    assert single.store.version == 12 and set(single.store.theta) == set(merged["theta"])
    assert all(np.array_equal(single.store.theta[n], merged["theta"][n]) for n in merged["theta"])
    with pytest.raises(ConfigError, match="--shard-index 1 --num-shards 2"):
        Server(ServerConfig(resume=str(out / "checkpoint-shard1.pt"), shard_index=0, num_shards=2))
    states = [load_checkpoint(str(out / f"checkpoint-shard{i}.pt")) for i in range(2)]
    with pytest.raises(ValueError, match="give the 2 shard checkpoints in shard order"):
        merge_states(states[::-1])
    states[1]["step"] = 5                                  # as if shard 1 were resumed from an older checkpoint
    save_checkpoint(str(out / "older1.pt"), states[1])
    servers = []
    try:
        from tests.conftest import RunningServer
        servers = [RunningServer(resume=str(out / p), shard_index=i, num_shards=2, num_workers=2, mode="sync")
                   for i, p in enumerate(["checkpoint-shard0.pt", "older1.pt"])]
        records = []
        handler = logging.Handler()
        handler.emit = records.append
        logging.getLogger("worker.sharded").addHandler(handler)
        try:
            with ShardedClient([s.address for s in servers], worker=0, request_timeout=1, server_timeout=10) as ps:
                ps.register({n: np.asarray(t) for n, t in merged["theta"].items()})
        finally:
            logging.getLogger("worker.sharded").removeHandler(handler)
        assert any("different sync steps [12, 5]" in r.getMessage() for r in records)
    finally:
        for srv in servers:
            srv.stop()


def test_status_shows_every_shard(start_server):
    from tests.test_cli import ps
    shards, address = start_shards(start_server, 2, num_workers=1, mode="async")
    r = ps("status", address, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "shard 0 of 2" in r.stdout and "shard 1 of 2" in r.stdout
    r = ps("status", address, "--json", timeout=60)
    assert [s["shard"]["index"] for s in json.loads(r.stdout)] == [0, 1]


# -- a shard killed with SIGKILL and resumed --------------------------------------------------------

def test_kill_one_shard_and_resume(tmp_path):
    import signal
    import subprocess
    import sys
    from common.checkpoint import load_checkpoint
    from paramserver.store import theta_crc32
    from tests.test_faults import ENV, _free_port, _wait_for, counts_add_up
    from worker.client import PSClient
    ports = [_free_port(), _free_port()]
    addresses = [f"tcp://127.0.0.1:{p}" for p in ports]

    def shard(i, *extra):
        args = [sys.executable, "-m", "paramserver", "server", "--bind", addresses[i], "--num-workers", "2",
                "--mode", "sync", "--optimizer", "momentum", "--lr", "0.05", "--shard-index", str(i),
                "--num-shards", "2", "--checkpoint", str(tmp_path / f"shard{i}.pt"), "--checkpoint-every", "0.2",
                *extra]
        return subprocess.Popen(args, env=ENV, stdout=subprocess.DEVNULL,
                                stderr=open(tmp_path / f"shard{i}-{len(extra)}.log", "w"))

    def status(i):
        with PSClient(addresses[i], server_timeout=2, request_timeout=0.5) as ps:
            return ps.status()

    servers = [shard(0), shard(1)]
    cfgs = [WorkerConfig(server=",".join(addresses), rank=r, num_workers=2, batch_size=8, steps=400, eval_every=0,
                         log_every=0, threads=1, heartbeat=0.2, request_timeout=0.3, job="mlp") for r in range(2)]
    procs = [worker_process(c, stdout=subprocess.DEVNULL, stderr=open(tmp_path / f"w{c.rank}.log", "w"))
             for c in cfgs]
    try:
        ckpt = tmp_path / "shard1.pt"
        _wait_for(lambda: ckpt.exists() and status(1)["version"] >= 60, what="a shard checkpoint mid-run")
        servers[1].send_signal(signal.SIGKILL)
        servers[1].wait()
        saved = load_checkpoint(str(ckpt))
        (tmp_path / "resume1.pt").write_bytes(ckpt.read_bytes())
        assert all(p.poll() is None for p in procs)          # the workers wait for the shard
        servers[1] = shard(1, "--resume", str(tmp_path / "resume1.pt"))
        for p in procs:
            assert p.wait(timeout=240) == 0                  # the run finishes
        log = (tmp_path / "shard1-2.log").read_text()
        assert f"at version {saved['version']} " in log and theta_crc32(saved["theta"]) in log
        sts = [status(0), status(1)]
        assert sts[0]["shard"]["plan"] == sts[1]["shard"]["plan"] == saved["shard"]["plan"]
        assert sts[1]["version"] > saved["version"]
        for st in sts:
            counts_add_up(st)
            assert {w["state"] for w in st["workers"].values()} == {"left"}
        # shard 0 applied every step; shard 1 lost (at most) the steps after its checkpoint
        assert sts[0]["version"] == 400 and saved["version"] < sts[1]["version"] <= 400
        print(f"\nshard 1 killed, resumed at version {saved['version']}; final versions "
              f"{sts[0]['version']}, {sts[1]['version']}")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for s in servers:
            if s.poll() is None:
                s.send_signal(signal.SIGTERM)
                s.wait(timeout=30)


@pytest.mark.parametrize("args, needle", [
    (["server", "--shard-index", "2", "--num-shards", "2"], "--shard-index 2 must be in [0, 1] for --num-shards 2"),
    (["worker", "--server", "tcp://127.0.0.1:1,tcp://127.0.0.1:1"], "names the same address twice"),
    (["worker", "--server", "tcp://127.0.0.1:1,"], "has an empty address"),
    (["cluster", "--shards", "0"], "--shards must be at least 1"),
])
def test_bad_shard_flags_are_rejected_with_a_clear_message(args, needle):
    from tests.test_cli import ps
    r = ps(*args, timeout=60)
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


# -- CurveZMQ across shards ---------------------------------------------------------------------------

def test_each_shard_has_its_own_key_and_workers_are_given_every_one(tmp_path):
    """Two shard processes, each with its own CurveZMQ key pair, admitting the same clients: a worker given both
    public keys (in shard order) trains through both; one that offers shard 0's key to shard 1 is refused there."""
    import zmq
    from common.config import ServerConfig
    from common.security import make_keys, server_key_names
    from paramserver.launch import shutdown, start_server
    from tests.test_cli import ps as cli
    from worker.client import ServerUnavailable
    if not zmq.has("curve"):
        pytest.skip("libzmq without CURVE")
    folder = tmp_path / "keys"
    keys = make_keys(str(folder), server_key_names(2) + ("worker0",), admins=("ops",))
    assert sorted(p.name for p in (folder / "clients").iterdir()) == ["ops.key", "worker0.key"]  # no server key
    procs, addresses = [], []
    try:
        for i in range(2):   # processes: one process has one ZAP handler (--auth), so one server with --auth
            proc, address = start_server(ServerConfig(
                bind="tcp://127.0.0.1:*", shard_index=i, num_shards=2, num_workers=1, mode="sync", optimizer="sgd",
                lr=0.5, log_level="warning", curve_secret=keys[f"server-shard{i}"][1], auth=str(folder / "clients")),
                str(tmp_path), log_name=f"shard{i}.log")
            procs.append(proc)
            addresses.append(address)
        both = f"{keys['server-shard0'][0]},{keys['server-shard1'][0]}"
        params = {"w": np.arange(4096, dtype=np.float32), "b": np.zeros(3, np.float32)}
        with ShardedClient(addresses, worker=0, request_timeout=0.5, server_timeout=20, curve_server=both,
                           curve_secret=keys["worker0"][1]) as ps:
            ps.register(params)
            p = ps.pull()
            ps.push({n: np.ones_like(t) for n, t in params.items()}, version=p.version, clock=p.clock)
            got = ps.pull()
            assert all(np.array_equal(got.tensors[n], params[n] - 0.5) for n in params)
            assert [st["version"] for st in ps.status()] == [1, 1]
            ps.leave()
        with ShardedClient(addresses, worker=0, request_timeout=0.2, server_timeout=1.5,
                           curve_server=keys["server-shard0"][0], curve_secret=keys["worker0"][1]) as ps:
            with pytest.raises(ServerUnavailable, match="refusing this key"):
                ps.register(params)             # shard 0 answers; shard 1 does not know shard 0's key
        with pytest.raises(ValueError, match="--curve-server .* names 3 files for 2 shard address"):
            WorkerConfig(server=",".join(addresses), curve_server="a.key,b.key,c.key", curve_secret="w.key_secret")
        r = cli("status", ",".join(addresses), "--curve-server", both, "--curve-secret", keys["ops"][1], timeout=60)
        assert r.returncode == 0 and "shard 0 of 2" in r.stdout and "shard 1 of 2" in r.stdout, r.stdout + r.stderr
        r = cli("status", ",".join(addresses), "--curve-server", f"{both},{both}", "--curve-secret", keys["ops"][1],
                timeout=60)
        assert r.returncode == 2 and "names 4 files for 2 shard address(es)" in r.stderr
    finally:
        for i, (proc, address) in enumerate(zip(procs, addresses)):
            shutdown(address, keys[f"server-shard{i}"][0], keys["ops"][1])
            proc.wait(timeout=30)


def test_cluster_with_shards_and_curve(tmp_path):
    """`paramserver cluster --shards 2 --curve`: a key pair per shard, workers admitted on both by their own keys."""
    import torch
    import zmq.auth
    from tests.test_cli import ps
    out = tmp_path / "run"
    r = ps("cluster", "--shards", "2", "--curve", "--workers", "2", "--steps", "4", "--mode", "sync",
           "--n-layer", "1", "--n-embd", "32", "--n-head", "2", "--context", "32", "--max-bytes", "300000",
           "--eval-every", "0", "--out", str(out), "--sample-bytes", "0", "--threads", "1")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "2 server shards" in r.stdout and "CurveZMQ keys in" in r.stdout
    keys = out / "keys"
    assert sorted(p.name for p in (keys / "clients").iterdir()) == ["cluster.key", "worker0.key", "worker1.key"]
    workers = {str(w): zmq.auth.load_certificate(str(keys / f"worker{w}.key"))[0].decode() for w in range(2)}
    for i in range(2):
        ck = torch.load(out / f"checkpoint-shard{i}.pt", weights_only=False)
        assert ck["version"] == 4 and ck["config"]["curve_secret"] == str(keys / f"server-shard{i}.key_secret")
        assert ck["config"]["auth"] == str(keys / "clients")
        assert {w: info["key"] for w, info in ck["workers"].items()} == workers   # each registered with its key
    assert (out / "checkpoint.pt").exists()


def test_keys_for_shards(tmp_path):
    """`paramserver keys DIR --shards K`: one server key pair per shard, none of them admitted as a client."""
    from tests.test_cli import ps
    r = ps("keys", str(tmp_path / "k"), "--shards", "2", "--clients", "worker0", timeout=60)
    assert r.returncode == 0, r.stderr
    names = sorted(p.name for p in (tmp_path / "k").iterdir() if p.is_file())
    assert names == ["server-shard0.key", "server-shard0.key_secret", "server-shard1.key", "server-shard1.key_secret",
                     "worker0.key", "worker0.key_secret"]
    assert [p.name for p in (tmp_path / "k" / "clients").iterdir()] == ["worker0.key"]
    r = ps("keys", str(tmp_path / "k2"), "--shards", "0", timeout=60)
    assert r.returncode == 2 and "--shards must be at least 1" in r.stderr
