"""paramserver/cli.py and cluster.py: flags, environment, and a tiny cluster run end to end."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from tests.cli_inproc import cli  # noqa: F401  (a pytest fixture: `paramserver ARGS` in this process)
from tests.conftest import ROOT

ENV = dict(os.environ, PYTHONPATH=ROOT)


def ps(*args, env=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "paramserver", *args], capture_output=True, text=True,
                          env={**ENV, **(env or {})}, timeout=timeout, cwd=ROOT)


@pytest.mark.parametrize("args, needle", [
    (["server", "--mode", "syncc"], "invalid choice: 'syncc' (choose from 'sync', 'ssp', 'async')"),
    (["server", "--optimiser", "adam"], "unrecognized arguments: --optimiser"),
    (["worker", "--shard", "roundrobin"], "choose from 'contiguous', 'random', 'hash'"),
    (["server", "--num-workers", "two"], "invalid int value: 'two'"),
    (["server", "--mode", "ssp", "--backup-workers", "1", "--num-workers", "3"], "only applies to --mode sync"),
    (["worker", "--rank", "4", "--num-workers", "2"], "--rank 4 must be in [0, 1]"),
])
def test_bad_flags_are_rejected_with_a_clear_message(cli, args, needle):
    r = cli(*args)
    assert r.returncode == 2
    assert needle in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("args, needle", [
    (["server", "--mode", "syncc"], "invalid choice: 'syncc' (choose from 'sync', 'ssp', 'async')"),
    (["worker", "--sever", "tcp://127.0.0.1:5555"], "did you mean --server?"),
    (["cluster", "--step", "10"], "did you mean --steps?"),
])
def test_a_typo_through_the_real_command_is_one_line(args, needle):
    """End to end, one per command (the tables here check the rest in process): `python -m paramserver` exits 2
    with the one line and the command's short usage, no traceback, no 40 lines of usage."""
    r = ps(*args, timeout=60)
    _one_line(r, needle)
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) <= 2
    assert r.stderr.startswith(f"usage: paramserver {args[0]}") and f"paramserver {args[0]}: error: " in r.stderr


def test_every_flag_has_help(cli):
    r = cli("cluster", "--help")
    assert r.returncode == 0
    for flag in ("--mode", "--staleness", "--workers", "--aggregate", "--optimizer", "--shard", "--accum",
                 "--device", "--straggler"):
        assert flag in r.stdout


def test_environment_carries_identity(cli):
    from common.config import WorkerConfig, env_overrides
    os.environ.update(PS_RANK="1", PS_NUM_WORKERS="3", PS_SERVER="tcp://10.0.0.1:5555")
    try:
        assert env_overrides(WorkerConfig) == {"rank": 1, "num_workers": 3, "server": "tcp://10.0.0.1:5555"}
    finally:
        for k in ("PS_RANK", "PS_NUM_WORKERS", "PS_SERVER"):
            del os.environ[k]
    r = cli("--mode", "nope", env={"PS_ROLE": "server"})   # PS_ROLE picks the subcommand
    assert r.returncode == 2 and "invalid choice: 'nope'" in r.stderr


def test_status_command(start_server):
    srv = start_server(num_workers=1, mode="async")
    r = ps("status", srv.address, "--json", timeout=60)
    assert r.returncode == 0, r.stderr
    st = json.loads(r.stdout)
    assert st["mode"] == "async" and st["version"] == 0
    r = ps("status", "tcp://127.0.0.1:9", "--timeout", "1", timeout=60)
    assert r.returncode == 1 and "no answer" in r.stderr


def test_cluster_trains_and_writes_checkpoint_and_metrics(tmp_path):
    out = tmp_path / "run"
    r = ps("cluster", "--workers", "2", "--steps", "15", "--n-layer", "1", "--n-embd", "32", "--n-head", "2",
           "--context", "32", "--max-bytes", "500000", "--eval-every", "5", "--out", str(out),
           "--progress-every", "1", "--sample-bytes", "40")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "held-out loss" in r.stdout and "sample from the trained model" in r.stdout
    ckpt = torch.load(out / "checkpoint.pt")           # plain torch.load (weights_only) works
    assert ckpt["version"] == 15 and ckpt["optimizer"] == "adam" and ckpt["config"]["mode"] == "sync"
    assert "exp_avg" in next(iter(ckpt["optimizer_state"].values()))
    assert all(isinstance(t, torch.Tensor) for t in ckpt["theta"].values())
    metrics = json.loads((out / "metrics.json").read_text())
    s = metrics["summary"]
    assert s["final_eval_loss"] < s["initial_eval_loss"]
    assert len(metrics["server"]["updates"]) == 30
    srv = metrics["server"]   # a short run: every gradient has its row; the exact totals agree
    assert srv["update_stride"] == srv["pull_gap_stride"] == 1 and srv["updates_total"] == 30
    assert srv["pull_gaps_total"] == len(srv["pull_gaps"]) and srv["first_grant_s"] == srv["pull_gaps"][0][0]
    # the server's torch threads: the cores shared by the workers and the server, as it ran with them
    server = json.loads((out / "server_metrics.json").read_text())
    assert server["status"]["threads"] == server["config"]["threads"] == max(1, (os.cpu_count() or 1) // 3)
    assert set(metrics["workers"]) == {"0", "1"}
    assert np.isfinite(s["final_bits_per_byte"])


def test_cluster_stops_cleanly_on_ctrl_c(tmp_path):
    import signal
    import time
    out = tmp_path / "run"
    p = subprocess.Popen([sys.executable, "-m", "paramserver", "cluster", "--workers", "2", "--steps", "100000",
                          "--n-layer", "1", "--n-embd", "32", "--n-head", "2", "--context", "32", "--max-bytes",
                          "300000", "--eval-every", "0", "--out", str(out), "--progress-every", "0.5",
                          "--sample-bytes", "0"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         env=ENV, cwd=ROOT)
    try:
        for line in p.stdout:
            if "live 2/2" in line and int(line.split("version")[1].split("|")[0]) > 0:
                break                                    # both workers train and an update has been applied
        p.send_signal(signal.SIGINT)
        rest = p.communicate(timeout=120)[0]
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 130 and "interrupted" in rest
    ckpt = torch.load(out / "checkpoint.pt")
    assert ckpt["version"] > 0
    time.sleep(0.5)
    left = subprocess.run(["pgrep", "-f", str(out)], capture_output=True, text=True).stdout.split()
    assert left == [], "processes of the cluster are still running"


# -- every failure is one clear line ------------------------------------------------------------

def _one_line(r, needle):
    assert r.returncode != 0
    assert needle in r.stderr + r.stdout, r.stdout + r.stderr
    assert "Traceback" not in r.stderr + r.stdout
    assert "weights_only" not in r.stderr     # torch's advice to unpickle anything is not ours to give


@pytest.mark.parametrize("args, needle", [
    (["cluster", "--step", "10"], "did you mean --steps?"),
    (["server", "--workers", "2"], "did you mean --num-workers?"),
    (["server", "--bind", "127.0.0.1:5621"], "has no transport: write tcp://127.0.0.1:5621"),
    (["worker", "--server", "127.0.0.1:5555"], "has no transport: write tcp://127.0.0.1:5555"),
    (["server", "--mode", "sync", "--staleness", "2"], "--staleness only applies to --mode ssp"),
    (["server", "--mode", "async", "--min-workers", "2"], "--min-workers only applies to --mode sync"),
    (["server", "--mode", "async", "--divergence-every", "-1"], "--divergence-every must be >= 0"),
    (["cluster", "--mode", "ssp", "--step-timeout", "5"], "--step-timeout only applies to --mode sync"),
    (["server", "--resume", ROOT], "is a folder"),
    (["server", "--resume", os.path.join(ROOT, "README.md")], "not a checkpoint written by paramserver"),
    (["worker", "--server", "tcp://no-such-host.invalid:5555"], "does not resolve"),
])
def test_a_mistake_gets_one_line_naming_what_to_change(cli, args, needle):
    r = cli(*args)
    _one_line(r, needle)
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) <= 2      # no 40 lines of usage


def test_a_subcommand_typo_gets_that_subcommands_usage(cli):
    r = cli("cluster", "--step", "10")
    assert "usage: paramserver cluster" in r.stderr


def test_truncated_checkpoint_and_empty_data_folder_are_one_line(cli, tmp_path):
    torch.save({"theta": {"w": torch.zeros(3)}, "version": 1}, tmp_path / "ok.pt")
    blob = (tmp_path / "ok.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(blob[: len(blob) // 2])
    _one_line(cli("server", "--resume", str(tmp_path / "cut.pt")), "truncated or damaged")
    (tmp_path / "empty").mkdir()
    _one_line(cli("worker", "--data", str(tmp_path / "empty")), "no text files found")
    # the cluster checks both before it starts any process
    r = cli("cluster", "--resume", str(tmp_path / "cut.pt"), "--out", str(tmp_path / "c"))
    _one_line(r, "truncated or damaged")
    assert not (tmp_path / "c" / "server.log").exists()


def test_port_in_use_is_one_line(start_server):
    srv = start_server(num_workers=1)
    _one_line(ps("server", "--bind", srv.address, timeout=60), "Address already in use")


def test_unreachable_server_is_logged_while_retrying_then_one_line():
    r = ps("worker", "--job", "mlp", "--server", "tcp://127.0.0.1:9", "--server-timeout", "7", timeout=120)
    assert r.returncode == 1
    assert "still trying" in r.stderr and "tcp://127.0.0.1:9" in r.stderr
    _one_line(r, "no answer from tcp://127.0.0.1:9")


@pytest.mark.parametrize("shards", ["1", "2"])
def test_cluster_prints_the_failing_workers_own_error_line(tmp_path, shards):
    # what the cluster checks before it starts (a corpus too small, ...) cannot fail a worker: this entry fails in
    # the worker processes only
    (tmp_path / "fails_in_workers.py").write_text(
        "import sys\nimport torch\nimport paramserver as ps\n\ndef make_job():\n"
        "    if 'worker' in sys.argv:\n        raise ValueError('no data here')\n    x = torch.ones(8, 3)\n"
        "    return ps.UserJob(model=torch.nn.Linear(3, 1), loss=torch.nn.functional.mse_loss, n_samples=8,\n"
        "                      batch=lambda idx: (x[idx], x[idx, :1]))\n")
    r = ps("cluster", "--workers", "2", "--shards", shards, "--entry", "fails_in_workers:make_job",
           "--out", str(tmp_path / "c"), env={"PYTHONPATH": f"{ROOT}{os.pathsep}{tmp_path}"}, timeout=120)
    assert r.returncode == 1
    assert "exited with code 2: paramserver worker: error: --entry 'fails_in_workers:make_job' raised ValueError: " \
           "no data here" in r.stdout, r.stdout
    assert "Traceback" not in r.stdout + r.stderr
    assert ("checkpoint: none written" if shards == "1" else "checkpoints: none written") in r.stdout


# -- mismatches are caught, not trained through -------------------------------------------------

def _worker(cli, address, *flags):
    """`paramserver worker` in this process (the server is in this process too)."""
    return cli("worker", "--server", address, "--job", "mlp", "--steps", "3", "--eval-every", "0", "--log-every", "0",
               "--server-timeout", "20", *flags)


def test_a_worker_for_another_num_workers_is_refused_naming_the_flag(cli, start_server, tmp_path):
    srv = start_server(num_workers=2, mode="sync")
    r = _worker(cli, srv.address, "--num-workers", "3", "--out", str(tmp_path))
    _one_line(r, "--num-workers 3 (the server has --num-workers 2)")
    assert not srv.server.store.initialized or srv.server.store.version == 0
    # its metrics file is written on this way out too, saying why
    exit_text = json.loads((tmp_path / "worker0.json").read_text())["exit"]
    assert exit_text.startswith("error: ServerError") and "job_mismatch" in exit_text


def test_a_worker_with_other_job_flags_is_refused_naming_each_flag(cli, start_server):
    srv = start_server(num_workers=1, mode="async")
    assert _worker(cli, srv.address).returncode == 0     # the job: mlp, seed 0, hidden 32
    version = srv.server.store.version
    r = _worker(cli, srv.address, "--seed", "1", "--hidden", "16")
    _one_line(r, "--hidden 16 (the job has 32)")
    assert "--seed 1 (the job has 0)" in r.stderr
    assert srv.server.store.version == version           # nothing trained through


def test_a_waiting_worker_says_what_it_waits_for(start_server):
    import subprocess as sp
    srv = start_server(num_workers=2, mode="sync")
    p = sp.Popen([sys.executable, "-m", "paramserver", "worker", "--server", srv.address, "--job", "mlp",
                  "--num-workers", "2", "--steps", "3", "--eval-every", "0"], stdout=sp.PIPE, stderr=sp.STDOUT,
                 text=True, env=ENV, cwd=ROOT)
    try:
        for line in p.stdout:
            if "waiting for the other workers to register: 1 of 2 workers registered" in line:
                break
        else:
            raise AssertionError("the waiting worker never said what it waits for")
    finally:
        p.kill()
        p.wait()


def test_cluster_refuses_a_resume_with_another_optimizer_before_starting(cli, tmp_path):
    torch.save({"theta": {"w": torch.zeros(3)}, "version": 4, "optimizer": "adam"}, tmp_path / "adam.pt")
    r = cli("cluster", "--optimizer", "sgd", "--resume", str(tmp_path / "adam.pt"), "--out", str(tmp_path / "c"))
    _one_line(r, "the checkpoint was written with --optimizer adam")
    assert not (tmp_path / "c" / "server.log").exists()


def test_the_readme_and_docs_document_every_flag_of_every_command():
    """The README and docs/ are the user's manual: every --flag of every (sub)command appears in them
    (docs/cli.md lists them all)."""
    import argparse
    import glob
    import re
    from paramserver.cli import build_parser
    pages = [os.path.join(ROOT, "README.md"), *sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))]
    manual = "\n".join(open(p).read() for p in pages)

    def flags(parser):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    yield from flags(sub)
            for opt in action.option_strings:
                if opt.startswith("--") and opt != "--help":
                    yield opt
    missing = sorted({f for f in flags(build_parser()) if not re.search(rf"(?<![\w-]){re.escape(f)}(?![\w-])", manual)})
    assert not missing, f"flags neither the README nor docs/ document: {missing}"
