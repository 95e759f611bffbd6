"""theta sharded over K servers, through the command line and processes: `cluster --shards 2` (merged and per-shard
checkpoints), `status` of every shard, a shard killed with SIGKILL and resumed, CurveZMQ with a key pair per shard
(by hand and through `cluster --shards 2 --curve`), `keys --shards`.

tests/test_shards.py's process-heavy half, in a file of its own so that another test process runs it beside the
plan, exactness and modes there."""
from __future__ import annotations

import json

import numpy as np
import pytest

from common.config import WorkerConfig
from tests.conftest import worker_process
from tests.test_shards import start_shards
from worker.sharded import ShardedClient


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
