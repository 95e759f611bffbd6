"""worker/evaluate.py, `paramserver eval CKPT` and `paramserver sample CKPT`: a trained model is usable."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch

from common.config import WorkerConfig
from tests.cli_inproc import cli  # noqa: F401  (a pytest fixture: `paramserver ARGS` in this process)
from tests.conftest import ROOT, RunningServer, run_worker_thread

ENV = dict(os.environ, PYTHONPATH=ROOT)
TEXT = "".join(f"line {i}: the quick brown fox jumps over the lazy dog {i * 7 % 13}\n" for i in range(3000))


def ps(*args):
    """`paramserver ARGS` through a real process: one end-to-end run each of eval and sample."""
    return subprocess.run([sys.executable, "-m", "paramserver", *args], capture_output=True, text=True, env=ENV,
                          cwd=ROOT, timeout=300)


@pytest.fixture(scope="module")
def gpt_checkpoint(tmp_path_factory):
    d = tmp_path_factory.mktemp("eval")
    (d / "corpus.txt").write_text(TEXT)
    srv = RunningServer(num_workers=1, mode="async", checkpoint=str(d / "ckpt.pt"), lr=0.01)
    results: dict = {}
    cfg = WorkerConfig(server=srv.address, job="gpt", data=str(d / "corpus.txt"), n_layer=1, n_embd=16, n_head=2,
                       context=16, steps=30, eval_every=0, log_every=0, threads=1)
    run_worker_thread(cfg, results).join(timeout=300)
    srv.stop()
    assert isinstance(results[0], dict), results
    return d


def test_eval_reports_the_held_out_loss_of_the_checkpoint(cli, gpt_checkpoint):
    from worker.evaluate import evaluate_checkpoint
    ckpt = str(gpt_checkpoint / "ckpt.pt")
    r = ps("eval", ckpt, "--json")
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert got["version"] == 30 and got["job"] == "gpt"
    ref = evaluate_checkpoint(ckpt, WorkerConfig(eval_batches=8, batch_size=16))
    assert got["eval_loss"] == pytest.approx(ref["final_eval_loss"])
    assert got["eval_loss"] < ref["initial_eval_loss"]              # it learned something
    assert got["bits_per_byte"] == pytest.approx(got["eval_loss"] / 0.6931471805599453)
    text = cli("eval", ckpt).stdout
    assert "held-out loss" in text and "bits/byte" in text


def test_sample_continues_a_prompt_and_defaults_to_one_from_the_corpus(cli, gpt_checkpoint):
    ckpt = str(gpt_checkpoint / "ckpt.pt")
    r = ps("sample", ckpt, "--prompt", "line 12", "--bytes", "40")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("line 12") and len(r.stdout.encode()) >= 40
    default = cli("sample", ckpt, "--bytes", "20").stdout
    assert default.split(" ")[0] in TEXT and not default.startswith("def ")   # the prompt comes from the data
    again = cli("sample", ckpt, "--bytes", "20").stdout
    assert default == again                                                   # seeded


def test_eval_and_sample_refuse_bad_input_in_one_line(cli, gpt_checkpoint, tmp_path):
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    for args in (["eval", str(tmp_path / "junk.pt")], ["sample", str(tmp_path / "nope.pt")],
                 ["sample", str(gpt_checkpoint / "ckpt.pt"), "--bytes", "0"]):
        r = cli(*args)
        assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_the_docs_document_every_checkpoint_key(gpt_checkpoint):
    ckpt = torch.load(gpt_checkpoint / "ckpt.pt")
    page = open(os.path.join(ROOT, "docs", "checkpoints.md")).read()      # the README links it
    section = page.split("# Checkpoints", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"^\| `([a-z_]+)` \|", section, flags=re.M))
    assert documented == set(ckpt), f"docs/checkpoints.md's table: {sorted(documented)} vs file: {sorted(ckpt)}"
