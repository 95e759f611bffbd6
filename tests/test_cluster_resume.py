"""paramserver/cluster.py's --resume: a cluster continues from its own checkpoint (with shards: each shard from its own),
and a resume it cannot make is one line that keeps everything (subprocess runs).

tests/test_cluster.py's resume tests, in a file of their own so that another test process runs them beside the rest
of the cluster's tests."""
from __future__ import annotations

import json

import pytest
import torch

from tests.test_cluster import TINY, ps


@pytest.mark.parametrize("shards", ["1", "2"])
def test_resume_continues_from_the_clusters_own_checkpoint(tmp_path, shards):
    """With shards, each shard resumes from its own checkpoint beside the merged one that --resume names."""
    out = tmp_path / "run"
    r = ps("cluster", "--workers", "2", "--shards", shards, "--steps", "6", *TINY, "--out", str(out))
    assert r.returncode == 0, r.stdout + r.stderr
    assert torch.load(out / "checkpoint.pt")["version"] == 6
    first = json.loads((out / "metrics.json").read_text())["summary"]
    r = ps("cluster", "--workers", "2", "--shards", shards, "--steps", "4", *TINY, "--out", str(out),
           "--resume", str(out / "checkpoint.pt"))
    assert r.returncode == 0, r.stdout + r.stderr
    end = torch.load(out / "checkpoint.pt")["version"]
    assert end > 6
    if shards == "2":
        assert all(torch.load(out / f"checkpoint-shard{i}.pt")["version"] == end for i in range(2))
    # the summary reports this run's updates, and "before" is the resumed model, not a fresh one
    assert f"{end - 6} updates applied in this run (version 6 -> {end}" in r.stdout
    second = json.loads((out / "metrics.json").read_text())["summary"]
    assert second["updates"] == end - 6 and second["start_version"] == 6
    assert abs(second["initial_eval_loss"] - first["final_eval_loss"]) < 1e-9
    assert "before: the resumed model" in r.stdout
    if shards == "2":
        # after a kill -9 there is no merged checkpoint: any shard's checkpoint names the folder
        (out / "checkpoint.pt").unlink()
        r = ps("cluster", "--workers", "2", "--shards", shards, "--steps", "2", *TINY, "--out", str(out),
               "--resume", str(out / "checkpoint-shard0.pt"))
        assert r.returncode == 0 and f"version {end} -> " in r.stdout, r.stdout + r.stderr


def test_a_sharded_resume_without_the_shards_checkpoints_is_one_line_and_keeps_everything(tmp_path):
    out = tmp_path / "run"
    assert ps("cluster", "--workers", "2", "--steps", "3", *TINY, "--out", str(out)).returncode == 0
    before = (out / "checkpoint.pt").read_bytes()
    r = ps("cluster", "--workers", "2", "--shards", "2", "--steps", "3", *TINY, "--out", str(out),
           "--resume", str(out / "checkpoint.pt"))
    assert r.returncode == 1 and "Traceback" not in r.stdout + r.stderr
    assert "each shard resumes from its own checkpoint" in r.stderr and "--shards 1" in r.stderr
    assert (out / "checkpoint.pt").read_bytes() == before and not (out / "server-shard0.log").exists()


def test_a_resume_whose_workers_would_all_be_refused_is_one_line_before_anything_starts(tmp_path):
    """(A run that applied no update reports no held-out loss: tests/test_walkthrough.py, interrupted runs.)"""
    out = tmp_path / "run"
    assert ps("cluster", "--workers", "2", "--steps", "3", *TINY, "--out", str(out)).returncode == 0
    r = ps("cluster", "--workers", "2", "--steps", "3", *TINY, "--out", str(out), "--hidden", "16",
           "--resume", str(out / "checkpoint.pt"))
    assert r.returncode == 2
    assert "--hidden 16 (the job has 32)" in r.stderr           # the words the server would refuse each worker with
    assert r.stdout == "" and torch.load(out / "checkpoint.pt")["version"] == 3
