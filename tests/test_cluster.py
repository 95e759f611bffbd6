"""paramserver/cluster.py: nothing orphaned, nothing lost, every failure one line (subprocess runs)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from tests.conftest import ROOT

ENV = dict(os.environ, PYTHONPATH=ROOT)
TINY = ["--job", "mlp", "--eval-every", "0", "--sample-bytes", "0", "--progress-every", "0.5"]


def ps(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "paramserver", *args], capture_output=True, text=True, env=ENV,
                          timeout=timeout, cwd=ROOT)


def _start(out, *extra):
    return subprocess.Popen([sys.executable, "-m", "paramserver", "cluster", "--workers", "2", "--steps", "100000",
                             *TINY, "--out", str(out), *extra], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=ENV, cwd=ROOT)


def _wait_live(p, n=2):
    """Until both workers are live and training (a progress line with version >= 3)."""
    for line in p.stdout:
        if f"live {n}/{n}" in line and int(line.split("version")[1].split("|")[0]) >= 3:
            return
    raise AssertionError("the cluster never reported its workers live")


def _leftovers(out) -> list[str]:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        left = subprocess.run(["pgrep", "-f", str(out)], capture_output=True, text=True).stdout.split()
        if not left:
            return []
        time.sleep(0.2)
    return left


def test_a_second_ctrl_c_still_stops_every_child_and_the_server_checkpoints(tmp_path):
    out = tmp_path / "run"
    p = _start(out)
    try:
        _wait_live(p)
        p.send_signal(signal.SIGINT)
        time.sleep(0.3)
        p.send_signal(signal.SIGINT)
        rest = p.communicate(timeout=120)[0]
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 130 and "interrupted" in rest, rest
    assert _leftovers(out) == [], "processes of the cluster are still running"
    assert torch.load(out / "checkpoint.pt")["version"] > 0
    metrics = json.loads((out / "metrics.json").read_text())
    for r in ("0", "1"):    # workers stopped by a signal still wrote their metrics
        assert metrics["workers"][r]["exit"] == "interrupted" and metrics["workers"][r]["steps"]


def test_kill_9_of_the_cluster_still_stops_the_server_with_a_checkpoint(tmp_path):
    out = tmp_path / "run"
    p = _start(out)
    try:
        _wait_live(p)
        p.kill()
        p.wait(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
    assert _leftovers(out) == [], "the server or a worker outlived the cluster"
    assert torch.load(out / "checkpoint.pt")["version"] > 0
    assert json.loads((out / "worker0.json").read_text())["exit"] == "interrupted"


def test_cluster_with_curve_keys_trains_monitors_and_shuts_down(tmp_path):
    out = tmp_path / "run"
    r = ps("cluster", "--curve", "--workers", "2", "--steps", "8", *TINY, "--out", str(out))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "live 2/2" in r.stdout or "live 0/2" in r.stdout    # the monitor is answered (it has a key)
    assert "server not answering" not in r.stdout
    st = json.loads((out / "metrics.json").read_text())["server"]["status"]
    assert st["version"] == 8 and st["counters"].get("handshake_failures", 0) == 0
    assert "shutdown requested" in (out / "server.log").read_text()     # the cluster's admin key stopped it
    for name in ("server", "worker0", "worker1", "cluster"):
        assert (out / "keys" / f"{name}.key_secret").stat().st_mode & 0o077 == 0
    assert (out / "keys" / "admins" / "cluster.key").exists()
    assert not (out / "keys" / "clients" / "server.key").exists()


@pytest.mark.parametrize("shards", ["1", "2"])
def test_cluster_passes_slowdown_prob_and_threads_to_the_workers(tmp_path, shards):
    out = tmp_path / "run"
    r = ps("cluster", "--workers", "2", "--shards", shards, "--steps", "30", *TINY, "--out", str(out),
           "--straggler", "3", "--slowdown-prob", "0.5", "--threads", "2")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "straggler: worker 1 x3 on 50% of its steps" in r.stdout
    workers = json.loads((out / "metrics.json").read_text())["workers"]
    assert workers["0"]["threads"] == workers["1"]["threads"] == 2
    slept = [s[7] for s in workers["1"]["steps"]]
    assert 0 < sum(x > 0 for x in slept) < len(slept)      # some steps slowed, not all
    assert all(s[7] == 0 for s in workers["0"]["steps"])


def test_bf16_wire_trains_the_same_over_shared_memory_sockets_and_shards(tmp_path):
    """--wire-dtype bf16 with the same-host shared memory (the default), over the socket, and over 2 shards:
    the gradients are the same bf16 values every way (shared memory carries them widened). Through shared
    memory theta comes back in fp32 (no bytes to save there), over the socket in bf16: so the shm runs agree
    exactly and the socket run within bf16's rounding. bf16 with shared memory or with shards used to stop
    every worker."""
    losses = {}
    for name, extra in {"shm": [], "tcp": ["--no-shm"], "shards": ["--shards", "2"]}.items():
        out = tmp_path / name
        r = ps("cluster", "--workers", "2", "--steps", "5", "--n-layer", "1", "--n-embd", "32", "--n-head", "2",
               "--context", "32", "--max-bytes", "200000", "--eval-every", "0", "--sample-bytes", "0",
               "--wire-dtype", "bf16", "--out", str(out), *extra)
        assert r.returncode == 0, r.stdout + r.stderr
        summary = json.loads((out / "metrics.json").read_text())["summary"]
        assert summary["final_eval_loss"] < summary["initial_eval_loss"]
        losses[name] = summary["final_eval_loss"]
    assert abs(losses["shards"] - losses["shm"]) < 1e-6, losses
    assert abs(losses["shm"] - losses["tcp"]) < 1e-3 * losses["tcp"], losses


def test_each_shard_gets_its_own_files_and_metrics_port():
    from common.config import ServerConfig
    from paramserver.cluster import shard_configs
    cfgs = shard_configs(ServerConfig(metrics_port=9100), 3, "out")
    assert [(c.shard_index, c.num_shards, c.metrics_port) for c in cfgs] == [(0, 3, 9100), (1, 3, 9101), (2, 3, 9102)]
    assert [c.checkpoint for c in cfgs] == [os.path.join("out", f"checkpoint-shard{i}.pt") for i in range(3)]
    assert all(c.metrics_port == 0 for c in shard_configs(ServerConfig(), 2, "out"))


def test_cluster_keys_dir_uses_the_keys_there_and_makes_the_missing_ones(tmp_path):
    keys, out = tmp_path / "keys", tmp_path / "run"
    assert ps("keys", str(keys), "--clients", "worker0").returncode == 0
    mine = {name: (keys / name).read_bytes() for name in ("server.key_secret", "worker0.key_secret")}
    r = ps("cluster", "--keys", str(keys), "--workers", "2", "--steps", "4", *TINY, "--out", str(out))
    assert r.returncode == 0, r.stdout + r.stderr
    assert all((keys / name).read_bytes() == data for name, data in mine.items())     # used, not replaced
    assert (keys / "worker1.key_secret").exists() and (keys / "admins" / "cluster.key").exists()
    st = json.loads((out / "metrics.json").read_text())["server"]["status"]
    assert st["version"] == 4 and st["counters"].get("handshake_failures", 0) == 0
    assert not (out / "keys").exists()                                               # not --curve's folder


def test_start_workers_launches_each_worker_on_its_own_config(monkeypatch, tmp_path):
    """start_workers goes through launch_worker (the tests' way to start a worker too): each worker's flags
    give back exactly the config it should run (its identity, the cluster's settings, the wcfg's others)."""
    import argparse
    from common.config import ENV_VARS, WorkerConfig, add_arguments, from_args
    from paramserver import launch
    for var in ENV_VARS:
        monkeypatch.delenv(var, raising=False)
    seen = []
    monkeypatch.setattr(launch, "_spawn", lambda args, log_path=None, **popen: seen.append((args, log_path)))
    wcfg = WorkerConfig(job="mlp", steps=7, threads=5, slowdown=9.0, wire_dtype="bf16")
    launch.start_workers(wcfg, 3, "tcp://h:1", str(tmp_path), slowdown={2: 3.0}, threads=2, slowdown_prob=0.5)
    assert len(seen) == 3
    for rank, (args, log_path) in enumerate(seen):
        assert args[0] == "worker" and log_path == os.path.join(str(tmp_path), f"worker{rank}.log")
        parser = argparse.ArgumentParser()
        add_arguments(parser, WorkerConfig)
        cfg = from_args(WorkerConfig, parser.parse_args(args[1:]))
        assert cfg == WorkerConfig(job="mlp", steps=7, wire_dtype="bf16", server="tcp://h:1", rank=rank,
                                   num_workers=3, out=str(tmp_path), threads=2,
                                   slowdown=3.0 if rank == 2 else 1.0, slowdown_prob=0.5 if rank == 2 else 1.0)
