"""A newcomer's walk-through (issue 22): the README's commands from a fresh shell, nothing overwritten, your own
model's checkpoints in eval and sample, errors that point at the right flag (or at the user's own line), a
cluster that checks the job before it starts anything, exit codes. In process where it can be (tests/cli_inproc.py)."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import types

import numpy as np
import pytest

from common.checkpoint import save_checkpoint
from common.config import JobConfig, WorkerConfig
from tests.cli_inproc import cli  # noqa: F401  (a pytest fixture)
from tests.conftest import ROOT

README = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
CLI_MD = open(os.path.join(ROOT, "docs", "cli.md"), encoding="utf-8").read()


def _sh_commands(text: str) -> list[str]:
    """The command lines of a Markdown page's ```sh blocks, in order."""
    blocks = re.findall(r"^```sh\n(.*?)^```", text, flags=re.M | re.S)
    lines = [re.sub(r"\s+#.*$|\s*&$", "", ln).strip() for b in blocks for ln in b.splitlines()]
    return [ln for ln in lines if ln and not ln.startswith("#")]


def _no_start(monkeypatch):
    """The cluster must refuse before it starts a process: starting one fails the test."""
    import paramserver.cluster

    def started(*a, **k):
        raise AssertionError("the cluster started its processes")
    monkeypatch.setattr(paramserver.cluster, "run_cluster", started)


# 1. the venv ---------------------------------------------------------------------------------------------

def test_the_readme_activates_the_venv_before_its_first_bare_command():
    cmds = _sh_commands(README)
    activate = cmds.index("source .venv/bin/activate")
    bare = [i for i, c in enumerate(cmds) if re.match(r"^(\w+=\S+ )*(paramserver|python) ", c)]
    assert bare and activate < bare[0], (cmds[bare[0]], "comes before the README says to activate the venv")


@pytest.mark.skipif(not os.path.exists(os.path.join(ROOT, ".venv", "bin", "activate")), reason="no .venv here")
def test_a_fresh_shell_runs_the_readmes_bare_commands_after_activating():
    """A login shell with nothing of this process's environment: PATH has no venv until `source` adds it."""
    script = ("source .venv/bin/activate && command -v paramserver && paramserver cluster --workers 0; "
              "python -c 'import paramserver, torch; print(paramserver.DistributedOptimizer.__name__)'")
    r = subprocess.run(["env", "-i", "HOME=/tmp", "PATH=/usr/bin:/bin", "bash", "--noprofile", "--norc", "-c",
                        script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert os.path.join(ROOT, ".venv", "bin", "paramserver") in r.stdout, r.stdout + r.stderr
    assert "--workers must be at least 1" in r.stderr and "DistributedOptimizer" in r.stdout, r.stdout + r.stderr


# 2. nothing overwritten ----------------------------------------------------------------------------------

def test_an_out_folder_with_an_earlier_run_is_refused_in_one_line(cli, tmp_path, monkeypatch):
    _no_start(monkeypatch)
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint.pt").write_bytes(b"the first run")
    r = cli("cluster", "--job", "linear", "--out", str(out))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert f"--out {out} holds an earlier run (checkpoint.pt)" in r.stderr
    assert "another folder with --out" in r.stderr and "--overwrite" in r.stderr
    assert (out / "checkpoint.pt").read_bytes() == b"the first run"


def test_overwrite_or_resuming_the_run_in_its_own_folder_is_allowed(tmp_path):
    from common.config import ClusterConfig
    from paramserver.cluster import check_out
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.json").write_text("{}")
    check_out(ClusterConfig(out=str(out), overwrite=True))
    check_out(ClusterConfig(out=str(out)), resume=str(out / "checkpoint.pt"))
    check_out(ClusterConfig(out=str(tmp_path / "new")))
    with pytest.raises(ValueError, match="earlier run"):
        check_out(ClusterConfig(out=str(out)), resume=str(tmp_path / "elsewhere" / "checkpoint.pt"))


def test_the_readmes_cluster_commands_write_to_different_folders():
    """The first command, then "Your own model": each cluster run of the README has a folder of its own."""
    from paramserver.cli import build_parser
    outs = []
    for c in [part.strip().removeprefix(".venv/bin/") for c in _sh_commands(README) for part in c.split("&&")]:
        if c.startswith("paramserver cluster") and "--resume" not in c:
            args = build_parser().parse_args(c.split()[1:])
            outs.append(getattr(args, "out", "runs/cluster"))
    assert len(outs) >= 2 and len(set(outs)) == len(outs), outs


# 3. your own model's checkpoint in eval and sample --------------------------------------------------------

ENTRY = """
import torch
import paramserver as ps

def make_job():
    x = torch.ones(8, 3)
    return ps.UserJob(model=torch.nn.Linear(3, 1), loss=torch.nn.functional.mse_loss, n_samples=8,
                      batch=lambda idx: (x[idx], x[idx, :1]), eval_loss=lambda model: 1.25)
"""


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """A folder with the user's modules, as the current folder (the entry is looked up there)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    yield lambda name, text: (tmp_path / f"{name}.py").write_text(text)
    for name in [m for m in sys.modules if m.startswith("walk_")]:
        del sys.modules[name]


def _entry_checkpoint(path, entry: str) -> None:
    from worker.models import build_job
    from worker.train import _job_meta
    cfg = WorkerConfig(entry=entry)
    job = build_job(JobConfig(entry=entry))
    save_checkpoint(str(path), {"theta": job.params_numpy(), "version": 3, "job": _job_meta(cfg)})


def test_eval_of_an_entry_checkpoint_uses_the_entrys_own_evaluation(cli, user_module, tmp_path):
    user_module("walk_model", ENTRY)
    _entry_checkpoint(tmp_path / "c.pt", "walk_model:make_job")
    r = cli("eval", str(tmp_path / "c.pt"))
    assert r.returncode == 0, r.stderr
    assert "job walk_model:make_job" in r.stdout and "held-out loss 1.2500" in r.stdout, r.stdout
    assert "bits/byte" not in r.stdout and "job gpt" not in r.stdout
    r = cli("eval", str(tmp_path / "c.pt"), "--data", str(tmp_path))
    assert r.returncode == 2 and "its own eval_loss" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_sample_of_an_entry_checkpoint_says_in_one_line_it_is_not_a_text_model(cli, user_module, tmp_path):
    user_module("walk_model2", ENTRY)
    _entry_checkpoint(tmp_path / "c.pt", "walk_model2:make_job")
    r = cli("sample", str(tmp_path / "c.pt"))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "not a text model" in r.stderr, r.stderr


# 4. the user's own error, with the user's own lines -------------------------------------------------------

BROKEN = {
    "walk_raises": ("import torch\n\ndef helper():\n    return {}['missing']\n\ndef make_job():\n    return helper()\n",
                    "raised KeyError: 'missing'", ["line 7, in make_job", "line 4, in helper"]),
    "walk_syntax": ("def make_job(:\n    pass\n", "raised SyntaxError", ["line 1"]),
    "walk_import": ("import walk_no_such_module\n\ndef make_job():\n    pass\n",
                    "raised ModuleNotFoundError: No module named 'walk_no_such_module'", ["line 1, in <module>"]),
}


@pytest.mark.parametrize("module", sorted(BROKEN))
def test_an_entry_that_fails_is_one_line_and_the_users_own_frames(cli, user_module, tmp_path, module,
                                                                   monkeypatch):
    _no_start(monkeypatch)
    text, what, lines = BROKEN[module]
    user_module(module, text)
    r = cli("cluster", "--entry", f"{module}:make_job", "--out", str(tmp_path / "run"))
    assert r.returncode == 2, r.stderr
    first, *frames = r.stderr.strip().splitlines()
    assert first.startswith(f"paramserver cluster: error: --entry '{module}:make_job'") and what in first, first
    assert all(f'File "{tmp_path / module}.py", {ln}' in r.stderr for ln in lines), r.stderr
    assert "Traceback" not in r.stderr and "paramserver/" not in r.stderr and "worker/" not in r.stderr, r.stderr
    assert len(frames) <= 2 * len(lines), r.stderr


# 5. a wrong --server -------------------------------------------------------------------------------------

@pytest.mark.parametrize("flag,cmd", [("--server", "worker"), ("--bind", "server")])
def test_a_port_above_65535_is_refused_at_once(cli, flag, cmd):
    t0 = time.monotonic()
    r = cli(cmd, flag, "tcp://127.0.0.1:99999")
    assert r.returncode == 2 and "port '99999' is not a TCP port" in r.stderr, r.stderr
    assert time.monotonic() - t0 < 10


def test_a_silent_server_is_reported_every_5_seconds(monkeypatch, caplog):
    """On a clock of its own: the lines come at 5, 10, 15, ... s of silence, not with the doubling resends."""
    import worker.client as client_mod
    from common.protocol import Message, MsgType
    clock = [1000.0]

    class Silent:   # a socket to a server that never answers
        def poll(self, ms):
            clock[0] += ms / 1000
            return 0

        def send_multipart(self, *a, **k):
            pass

        def close(self):
            pass
    c = client_mod.PSClient("tcp://127.0.0.1:9", request_timeout=2.0, server_timeout=31.0)
    c.sock.close()
    c.sock = Silent()
    monkeypatch.setattr(client_mod.time, "monotonic", lambda: clock[0])
    c.last_heard = clock[0]
    said = []
    monkeypatch.setattr(client_mod.log, "warning", lambda *a: said.append(clock[0] - 1000.0))
    with pytest.raises(client_mod.ServerUnavailable):
        c._request(Message(MsgType.PULL))
    assert len(said) >= 5 and 5 <= said[0] <= 6.5, said
    assert all(4.5 <= b - a <= 6.5 for a, b in zip(said, said[1:])), said


# 6. errors that point at the right flag ------------------------------------------------------------------

def test_a_server_flag_given_to_a_worker_says_so(cli):
    r = cli("worker", "--lr", "0.1")
    assert r.returncode == 2 and "--lr is a server flag: the workers take the server's" in r.stderr, r.stderr
    assert "did you mean" not in r.stderr
    r = cli("server", "--steps", "10")
    assert r.returncode == 2 and "--steps is a worker flag" in r.stderr, r.stderr


@pytest.mark.parametrize("flag,value", [("--steps", "-1"), ("--batch-size", "0"), ("--accum", "0")])
def test_a_bad_count_names_only_its_own_flag(cli, flag, value):
    r = cli("worker", flag, value)
    err = r.stderr.strip().splitlines()[-1]
    assert r.returncode == 2 and flag in err, r.stderr
    assert [f for f in ("--steps", "--batch-size", "--accum") if f in err] == [flag], err


def test_a_truncated_checkpoint_is_called_truncated(cli, tmp_path):
    path = tmp_path / "c.pt"
    save_checkpoint(str(path), {"theta": {"w": np.zeros(5000, np.float32)}, "version": 1})
    whole = path.read_bytes()
    for cut in (0.3, 0.9):
        path.write_bytes(whole[:int(len(whole) * cut)])
        r = cli("eval", str(path))
        assert r.returncode == 2 and "it is truncated or damaged" in r.stderr, r.stderr
        assert "not a checkpoint written by paramserver" not in r.stderr


# 7. cluster shows only what it accepts --------------------------------------------------------------------

def _cluster_parser():
    from paramserver.cli import build_parser
    sub = next(a for a in build_parser()._actions if hasattr(a, "choices") and a.choices and "cluster" in a.choices)
    return sub.choices["cluster"]


def test_the_cluster_help_names_only_flags_it_takes():
    p = _cluster_parser()
    takes = {o for a in p._actions for o in a.option_strings}
    other = lambda text: re.sub(r"`paramserver [^`]*`", "", text)   # noqa: E731  (another command's flags)
    named = {m for a in p._actions if a.help for m in re.findall(r"--[a-z][a-z0-9-]*", other(a.help))}
    named |= set(re.findall(r"--[a-z][a-z0-9-]*", p.format_usage()))
    assert named - takes == set(), f"cluster --help names flags it refuses: {sorted(named - takes)}"


def test_every_server_and_worker_flag_is_taken_by_the_cluster_or_said_why_not(cli):
    from common.config import ServerConfig
    from paramserver.cli import CLUSTER_SETS, _flags
    takes = {o for a in _cluster_parser()._actions for o in a.option_strings}
    refused = (_flags(ServerConfig) | _flags(WorkerConfig)) - takes - {"--out"}
    assert refused == set(CLUSTER_SETS), refused ^ set(CLUSTER_SETS)
    section = CLI_MD.split("## `paramserver cluster`")[1].split("\n## ")[0]
    assert all(f"`{f}`" in section for f in CLUSTER_SETS), [f for f in CLUSTER_SETS if f"`{f}`" not in section]
    r = cli("cluster", "--num-workers", "3")
    assert r.returncode == 2 and "--num-workers is set by the cluster itself: use --workers N" in r.stderr


# 8. job mismatches before any process starts -----------------------------------------------------------

def _linear_checkpoint(path, workers: int, **job) -> None:
    from worker.models import build_job
    from worker.train import _job_meta
    cfg = WorkerConfig(job="linear", num_workers=workers, **job)
    save_checkpoint(str(path), {"theta": build_job(cfg).params_numpy(), "version": 4, "optimizer": "adam",
                                "config": {"mode": "sync", "aggregate": "mean", "lr": 0.003, "num_workers": workers},
                                "job": _job_meta(cfg)})


def test_resuming_with_other_workers_is_refused_before_anything_starts(cli, tmp_path, monkeypatch):
    _no_start(monkeypatch)
    _linear_checkpoint(tmp_path / "c.pt", workers=2)
    r = cli("cluster", "--job", "linear", "--workers", "3", "--resume", str(tmp_path / "c.pt"),
            "--out", str(tmp_path / "run"))
    assert r.returncode == 2 and "--workers 2 (now 3)" in r.stderr and "--resume-override" in r.stderr, r.stderr


def test_resuming_without_the_jobs_data_is_refused_before_anything_starts(cli, tmp_path, monkeypatch):
    _no_start(monkeypatch)
    (tmp_path / "corpus.txt").write_text("hello world, " * 2000)
    _linear_checkpoint(tmp_path / "c.pt", workers=2, data=str(tmp_path / "corpus.txt"))
    r = cli("cluster", "--job", "linear", "--workers", "2", "--resume", str(tmp_path / "c.pt"),
            "--out", str(tmp_path / "run"))
    assert r.returncode == 2 and f"--data '' (the job has '{tmp_path / 'corpus.txt'}')" in r.stderr, r.stderr


def test_a_corpus_too_small_for_the_context_is_refused_before_anything_starts(cli, tmp_path, monkeypatch):
    _no_start(monkeypatch)
    (tmp_path / "tiny.txt").write_text("too short\n")
    r = cli("cluster", "--data", str(tmp_path / "tiny.txt"), "--context", "64", "--out", str(tmp_path / "run"))
    assert r.returncode == 2 and "corpus too small for --context 64" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


# 9. sample escapes what a terminal would act on --------------------------------------------------------

def test_printable_escapes_control_bytes_and_invalid_utf8():
    from worker.evaluate import printable
    assert printable(b"ab\x1b[2J\x07c\n\td\xff\xc3\xa9\x7f\xc2\x85") == "ab\\x1b[2J\\x07c\n\td\\xff\u00e9\\x7f\\x85"


def test_sample_of_an_untrained_model_prints_no_control_characters(cli, tmp_path):
    from worker.models import build_job
    from worker.train import _job_meta
    (tmp_path / "corpus.txt").write_text("hello world\n" * 400)
    cfg = WorkerConfig(data=str(tmp_path / "corpus.txt"), n_layer=1, n_head=2, n_embd=8, context=16)
    save_checkpoint(str(tmp_path / "c.pt"), {"theta": build_job(cfg).params_numpy(), "version": 0,
                                             "job": _job_meta(cfg)})
    r = cli("sample", str(tmp_path / "c.pt"), "--bytes", "400", "--temperature", "3", "--prompt", "x")
    assert r.returncode == 0, r.stderr
    assert not [c for c in r.stdout if not c.isprintable() and c not in "\n\t"], repr(r.stdout)
    assert "\\x" in r.stdout   # 400 random bytes hold some that were escaped


# 10. exit codes --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("stop,code", [("ctrl-c", 130), ("sigterm", 143)])
def test_an_interrupted_cluster_exits_128_plus_the_signal(tmp_path, monkeypatch, capsys, stop, code):
    import paramserver.cluster as cluster
    from common.config import ClusterConfig, ServerConfig

    def start_server(*a, **k):   # the signal arrives while the server starts
        raise cluster.Terminated if stop == "sigterm" else KeyboardInterrupt
    monkeypatch.setattr(cluster, "start_server", start_server)
    ccfg = ClusterConfig(out=str(tmp_path / "run"), workers=1)
    assert cluster.run_cluster(ccfg, ServerConfig(), WorkerConfig(job="linear")) == code
    out = capsys.readouterr().out
    assert "interrupted" in out and "0 updates applied in this run" in out
    assert "held-out loss: not measured" in out and "checkpoint: none written" in out


def test_every_exit_code_is_documented():
    section = CLI_MD.split("## Exit codes")[1].split("\n## ")[0]
    for code in ("0", "1", "2", "130", "143"):
        assert re.search(rf"^\| `{code}` \|", section, flags=re.M), f"exit code {code} is not in docs/cli.md"
