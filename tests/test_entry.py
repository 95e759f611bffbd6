"""`--entry package.module:function` (worker/entry.py): the user's own job in the CLI and the local cluster."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

from common.config import ConfigError, JobConfig, WorkerConfig, subset
from tests.conftest import ROOT, worker_process
from worker.entry import EntryJob
from worker.models import build_job
from worker.train import batch_stream

BAD_MODULE = '''
import paramserver as ps

def wrong_type():
    return {"model": None}

def needs_args(n):
    return None

def not_a_module():
    return ps.UserJob(model="linear", loss=len, batch=len, n_samples=4)

value = 3
'''


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")


BAD = [
    ("no_such_module_xyz:make_job", "no module named 'no_such_module_xyz'"),
    ("bad_entry:missing", "module 'bad_entry' ("),
    ("bad_entry:value", "'value' is not a function"),
    ("bad_entry:needs_args", "needs arguments; an entry function takes none"),
    ("bad_entry:wrong_type", "returned dict; it must return paramserver.UserJob"),
    ("bad_entry:not_a_module", "UserJob.model is str, not a torch.nn.Module"),
    ("bad_entry", "must be package.module:function"),
]


def _one_error_line(stderr: str, command: str, says: str) -> None:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    assert lines[0].startswith(f"paramserver {command}: error: --entry") and says in lines[0], lines[0]


@pytest.mark.parametrize("spec, says", BAD)
def test_bad_entry_is_one_clear_line(tmp_path, monkeypatch, capsys, spec, says):
    """A missing module, a missing function, something that is not a function or a wrong return type:
    `paramserver worker` exits 2 with one error line naming --entry and what is wrong, no traceback."""
    from paramserver import cli
    monkeypatch.setattr(cli, "_setup_logging", lambda level: None)   # leave this process's logging alone
    (tmp_path / "bad_entry.py").write_text(BAD_MODULE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    sys.modules.pop("bad_entry", None)
    sigterm = signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(SystemExit) as exc:
            cli.main(["worker", "--entry", spec, "--steps", "1"])
    finally:
        signal.signal(signal.SIGTERM, sigterm)
        sys.modules.pop("bad_entry", None)
    assert exc.value.code == 2
    _one_error_line(capsys.readouterr().err, "worker", says)


@pytest.mark.parametrize("command, spec, says", [("worker", *BAD[4]), ("cluster", *BAD[4])])
def test_bad_entry_from_the_command_line(tmp_path, command, spec, says):
    """The same through the installed command; `cluster` refuses before it starts any process."""
    (tmp_path / "bad_entry.py").write_text(BAD_MODULE)
    argv = [sys.executable, "-m", "paramserver", command, "--entry", spec, "--steps", "1"]
    if command == "cluster":
        argv += ["--workers", "1", "--out", str(tmp_path / "run")]
    r = subprocess.run(argv, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    _one_error_line(r.stderr, command, says)
    assert not os.path.exists(tmp_path / "run" / "server.log")     # nothing was started


def test_bench_refuses_a_bad_entry_in_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "paramserver", "bench", "consistency", "--entry", "nope_xyz:f",
                        "--out", str(tmp_path)], cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=120)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1 and "no module named 'nope_xyz'" in lines[0], r.stderr


def test_entry_job_batches_from_a_dataset_or_a_function(tmp_path, monkeypatch):
    """UserJob(dataset=...) batches through default_collate exactly as UserJob(batch=...) does."""
    (tmp_path / "two_ways.py").write_text(
        "import torch, paramserver as ps\n"
        "X, Y = torch.arange(40.).reshape(20, 2), torch.arange(20.)[:, None]\n"
        "def by_function():\n"
        "    return ps.UserJob(model=torch.nn.Linear(2, 1), loss=torch.nn.functional.mse_loss,\n"
        "                      batch=lambda idx: (X[torch.from_numpy(idx)], Y[torch.from_numpy(idx)]), n_samples=20)\n"
        "def by_dataset():\n"
        "    return ps.UserJob(model=torch.nn.Linear(2, 1), loss=torch.nn.functional.mse_loss,\n"
        "                      dataset=torch.utils.data.TensorDataset(X, Y))\n")
    monkeypatch.chdir(tmp_path)
    a, b = (EntryJob(JobConfig(entry=f"two_ways:{f}")) for f in ("by_function", "by_dataset"))
    assert a.n_samples == b.n_samples == 20
    idx = np.array([3, 7, 11])
    for ta, tb in zip(a.batch(idx), b.batch(idx)):
        assert torch.equal(ta, tb)
    assert a.params_numpy().keys() == {"weight", "bias"}
    assert a.loss(*a.batch(idx)).item() == pytest.approx(b.loss(*b.batch(idx)).item())   # same seed, same init
    with pytest.raises(ConfigError, match="exactly one of batch= or dataset="):
        (tmp_path / "neither.py").write_text("import torch, paramserver as ps\n"
                                             "def f():\n    return ps.UserJob(model=torch.nn.Linear(1, 1), "
                                             "loss=len, n_samples=3)\n")
        EntryJob(JobConfig(entry="neither:f"))


def test_entry_job_in_sync_equals_single_process_sgd(start_server):
    """`paramserver worker --entry` trains the user's job exactly: 2 worker processes in sync mode end at the θ of
    single-process SGD on the union of their batches."""
    steps, lr = 4, 0.05
    srv = start_server(num_workers=2, mode="sync", optimizer="sgd", lr=lr, aggregate="mean")
    cfgs = [WorkerConfig(server=srv.address, rank=r, num_workers=2, entry="examples.cnn_entry:make_job",
                         batch_size=8, steps=steps, eval_every=0, log_every=0, shard="hash", seed=3, device="cpu",
                         threads=1) for r in range(2)]
    procs = [worker_process(c, cwd=ROOT) for c in cfgs]
    for p in procs:
        assert p.wait(timeout=120) == 0
    assert srv.server.store.version == steps
    job = build_job(subset(cfgs[0], JobConfig))
    init = job.params_numpy()
    streams = [batch_stream(c, job.n_samples)[1] for c in cfgs]
    sgd = torch.optim.SGD(job.model.parameters(), lr=lr)
    for _ in range(steps):
        sgd.zero_grad()
        job.loss(*job.batch(np.concatenate([next(s)[1] for s in streams]))).backward()
        sgd.step()
    theta = srv.server.store.theta
    expected = job.params_numpy()
    worst = max(float(np.abs(theta[n] - expected[n]).max()) for n in expected)
    assert worst <= 1e-5, f"max |theta_ps - theta_sgd| = {worst}"
    assert max(float(np.abs(theta[n] - init[n]).max()) for n in init) > 1e-3


def test_entry_job_through_the_local_cluster(tmp_path):
    """examples/cnn_entry.py through `paramserver cluster --entry`: it trains, and the held-out loss falls."""
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "paramserver", "cluster", "--entry", "examples.cnn_entry:make_job",
                        "--workers", "2", "--steps", "40", "--lr", "0.01", "--out", str(out), "--progress-every", "5"],
                       cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "job examples.cnn_entry:make_job" in r.stdout
    m = re.search(r"held-out loss: ([\d.]+) -> ([\d.]+)", r.stdout)
    assert m, r.stdout
    before, after = float(m.group(1)), float(m.group(2))
    assert after < 0.7 * before, r.stdout
    with open(out / "metrics.json") as f:
        metrics = json.load(f)
    assert metrics["server"]["status"]["version"] == 40
    assert metrics["workers"]["0"]["data"].startswith("SmallCNN")


def test_entry_job_through_the_consistency_benchmark(tmp_path):
    """`paramserver bench consistency --entry` trains the user's model (one short sync run)."""
    r = subprocess.run([sys.executable, "-m", "paramserver", "bench", "consistency", "--entry",
                        "examples.cnn_entry:make_job", "--workers", "2", "--steps", "10", "--modes", "sync",
                        "--scenarios", "none", "--lr", "0.01", "--eval-every", "5", "--out", str(tmp_path)],
                       cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "job examples.cnn_entry:make_job (SmallCNN" in r.stdout
    with open(tmp_path / "results.json") as f:
        results = json.load(f)
    (run,) = results["runs"]
    assert run["counters"]["applied"] == 20
    evals = run["summary"]
    assert evals["final_eval_loss"] < evals["initial_eval_loss"], evals
