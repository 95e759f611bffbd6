"""What the container deployment (deploy/) relies on: ranks assigned by the server, a server that
resumes from its own checkpoint when restarted, and the PS_* environment of a container."""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
import time

import pytest

from common.config import ConfigError, JobConfig, ServerConfig, WorkerConfig, from_args
from paramserver.server import Server
from tests.conftest import ROOT, run_worker_thread
from worker.models import build_job
from worker.train import run_worker


def _auto_workers(address: str, n: int, steps: int = 10) -> list[WorkerConfig]:
    return [WorkerConfig(server=address, rank=-1, num_workers=n, job="mlp", batch_size=8, steps=steps,
                         eval_every=0, log_every=0, threads=1) for _ in range(n)]


def test_auto_ranks_cover_every_shard_once(start_server):
    """Three workers with --rank -1: the server's ids become their ranks, so the shards are disjoint and
    together the whole data set, and the sync job runs as with ranks given by hand."""
    srv = start_server(num_workers=3, mode="sync", optimizer="sgd", lr=0.05)
    results: list = []
    threads = [threading.Thread(target=lambda c=cfg: results.append(run_worker(c)), daemon=True)
               for cfg in _auto_workers(srv.address, 3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert len(results) == 3
    assert sorted(m["rank"] for m in results) == [0, 1, 2]
    assert all(m["rank"] == m["worker_id"] and len(m["steps"]) == 10 for m in results)
    assert set(srv.server.workers) == {0, 1, 2} and all(s.left for s in srv.server.workers.values())
    assert srv.server.policy.counters["applied"] == 30
    n_train = build_job(JobConfig(job="mlp"), "cpu").n_samples
    assert sum(m["shard_size"] for m in results) == n_train    # three disjoint shards: every sample once


def test_auto_rank_worker_process_reports_its_rank(start_server):
    """`paramserver worker` with PS_RANK=auto (no --rank): registers as -1 and trains as the rank it was given."""
    srv = start_server(num_workers=2, mode="async", optimizer="sgd", lr=0.05)
    env = dict(os.environ, PYTHONPATH=ROOT, PS_RANK="auto", PS_NUM_WORKERS="2", PS_SERVER=srv.address)
    args = [sys.executable, "-m", "paramserver", "worker", "--job", "mlp", "--batch-size", "8", "--steps", "5",
            "--eval-every", "0", "--threads", "1"]
    procs = [subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    done = sorted(line.split()[1] for out in outs for line in out.splitlines() if line.startswith("worker "))
    assert done == ["0", "1"], outs
    assert all("rank assigned by the server" in out for out in outs), outs


def test_ps_rank_auto_and_rank_bounds():
    os.environ["PS_RANK"] = "auto"
    try:
        assert from_args(WorkerConfig, argparse.Namespace(num_workers=3)).rank == -1
    finally:
        del os.environ["PS_RANK"]
    with pytest.raises(ConfigError, match="--rank -2"):
        from_args(WorkerConfig, argparse.Namespace(rank=-2, num_workers=3))
    with pytest.raises(ConfigError, match="--rank 3"):
        from_args(WorkerConfig, argparse.Namespace(rank=3, num_workers=3))


def test_auto_resume_starts_fresh_then_resumes(start_server, tmp_path):
    ckpt = str(tmp_path / "ckpt.pt")
    first = start_server(num_workers=2, mode="sync", optimizer="adam", checkpoint=ckpt, auto_resume=True)
    assert first.server.store.version == 0 and not os.path.exists(ckpt)   # nothing to resume: fresh
    results: dict = {}
    for cfg in _auto_workers(first.address, 2, steps=7):
        run_worker_thread(cfg, results).join(timeout=0)
    deadline = time.monotonic() + 120
    while first.server.policy.counters["applied"] < 14 and time.monotonic() < deadline:
        time.sleep(0.1)
    first.stop()                                   # SIGTERM's path: the final checkpoint is written
    crc, version = first.server.store.checksum(), first.server.store.version
    assert version == 7 and os.path.exists(ckpt)
    again = Server(ServerConfig(bind="tcp://127.0.0.1:*", num_workers=2, optimizer="adam", checkpoint=ckpt,
                                auto_resume=True, log_level="warning"))
    assert again.store.version == version and again.store.checksum() == crc
    assert again.policy.counters["applied"] == 14


def test_auto_resume_needs_checkpoint():
    with pytest.raises(ConfigError, match="--auto-resume"):
        from_args(ServerConfig, argparse.Namespace(auto_resume=True))
    with pytest.raises(ConfigError, match="--auto-resume"):
        from_args(ServerConfig, argparse.Namespace(auto_resume=True, checkpoint="a.pt", resume="b.pt"))
