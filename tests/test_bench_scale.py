"""paramserver/bench/scale.py: the paramserver against single-process training at the same global batch."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from paramserver.bench.scale import ScaleConfig, parse_variant
from paramserver.bench.scale_runs import _throughput
from paramserver.bench.scale_tables import table
from tests.conftest import ROOT

FIELDS = ("samples_per_s", "ratio", "eval_loss", "loss_diff_pct", "step_ms", "compute_ms", "wait_ms", "pull_ms",
          "push_ms", "apply_ms")


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """The suite's one `paramserver bench scale --quick` run on the CPU: single, sync and async at global batch 8,
    made through deploy/gpu-check.sh, the GPU session's one command (flags after the script's own override its
    --device cuda). Returns (what the bench printed: scale.log, the report: scale.json, the script's $OUT)."""
    tmp = tmp_path_factory.mktemp("scale")
    out, runs = tmp / "out", tmp / "runs"
    proc = subprocess.run(["bash", os.path.join(ROOT, "deploy", "gpu-check.sh"), "--quick", "--device", "cpu",
                           "--global-batches", "8", "--variants", "sync;async;sync,local=3", "--steps", "6",
                           "--warmup", "2"],
                          capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, PYTHON=sys.executable, OUT=str(out), SCALE_RUNS=str(runs)))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return (out / "scale.log").read_text(), json.loads((out / "scale.json").read_text()), out


def test_quick_run_prints_the_table_and_writes_every_field(quick):
    stdout, report, _ = quick
    for column in ("variant", "samples/s", "x single", "held-out", "vs single", "compute", "wait", "pull", "push",
                   "apply"):
        assert column in stdout
    assert report["machine"]["device"] == "cpu" and report["model"]["parameters"] > 0
    runs = {r["name"]: r for r in report["runs"]}
    assert set(runs) == {"single", "sync", "async", "sync,local=3"}
    local = runs["sync,local=3"]                   # issue 20's GPU variant: H = 3, outer averaging
    assert local["complete"] and local["samples"] == 6 * 8 and local["gradients_applied"] == 4   # 2 rounds x 2
    assert local["samples_per_s"] > 0 and local["eval_loss"] is not None
    assert "global batch 8: local steps 'sync,local=3' at" in stdout    # the per-step target names per-step sync
    single = runs["single"]
    assert single["samples_per_s"] > 0 and single["ratio"] == 1.0 and single["layout"] == "1 x 8"
    assert single["compute_ms"] > 0 and single["apply_ms"] > 0
    assert "global batch 8: fastest sync variant 'sync' at" in stdout
    for name in ("sync", "async"):
        r = runs[name]
        assert r["complete"] and not r["failure"], r["failure"]
        assert r["layout"] == "2 x 4" and r["samples"] == single["samples"] == 6 * 8
        assert r["same_samples"] is True                 # the workers' batches are the single run's, step by step
        for field in FIELDS:
            assert r[field] is not None, field
        assert r["samples_per_s"] > 0 and r["compute_ms"] > 0 and r["apply_ms"] > 0
        assert r["ratio"] == pytest.approx(r["samples_per_s"] / single["samples_per_s"], rel=1e-3)
        assert r["gradients_applied"] == 2 * 6
        assert r["worker_devices"] == ["cpu"]
    assert runs["sync"]["updates"] == 6 and runs["async"]["updates"] == 12   # async: one update per push


def test_sync_reaches_the_single_process_loss(quick):
    """Sync with mean aggregation is single-process training on the union of the workers' batches: the same
    initial theta (seeded), the same samples each step (checked: same_samples), the mean of equal-size batch
    means = the mean over the union, and the server's Adam equals torch.optim.Adam. No dropout, CPU: only float
    rounding differs, so the held-out losses agree to ~1e-6 while training moved them by ~0.5."""
    _, report, _ = quick
    runs = {r["name"]: r for r in report["runs"]}
    single, sync = runs["single"], runs["sync"]
    assert single["initial_eval_loss"] - single["eval_loss"] > 0.1      # it trained: the comparison means something
    assert sync["eval_loss"] == pytest.approx(single["eval_loss"], abs=1e-4)
    assert abs(sync["loss_diff_pct"]) < 0.01
    # async applies each push on arrival (lr / N each): another trajectory, but the same samples and a real loss
    assert runs["async"]["eval_loss"] < single["initial_eval_loss"]


def test_table_marks_skipped_and_failed_runs():
    base = {"kind": "ps", "batch": 64, "layout": "4 x 16", "variant": {"workers": 4, "shards": 1}}
    report = {"runs": [{"kind": "single", "name": "single", "device": "cuda", "batch": 64, "layout": "1 x 64",
                        "samples_per_s": 3554.0, "ratio": 1.0, "eval_loss": 2.5, "loss_diff_pct": 0.0},
                       {**base, "name": "async", "skipped": True, "failure": "skipped: 3s of --budget 420s left"},
                       {**base, "name": "ssp", "failure": "timeout", "samples_per_s": 50.0}]}
    text = table(report)
    assert "single (cuda)" in text and "3554.0" in text
    assert "skipped (budget)" in text and "timed out" in text


def test_samples_per_s_counts_applied_gradients_after_the_warmup():
    v = parse_variant("sync", workers=2)
    # [time_s, version, worker, staleness, loss, divergence, applied]: 4 steps of 2 gradients, 1 s apart
    updates = [[float(t), t, w, 0, 1.0, 0.0, 2 * t - 1 + w] for t in range(1, 5) for w in (0, 1)]
    cfg = ScaleConfig(quick=True, steps=4, warmup=1, global_batches="8")
    out = _throughput(cfg, v, 8, {"updates": updates, "status": {"apply_s": 0.5}})
    # after the first step: 3 steps x 8 samples in 3 s
    assert out["samples_per_s"] == 8.0 and out["step_ms"] == 1000.0 and out["gradients_applied"] == 8


def test_local_step_variants_count_h_steps_per_push():
    """local=H: a push carries H steps of samples, and the warm-up is counted in pushes (rounded up)."""
    v = parse_variant("sync,local=2,compress=int8", workers=2)
    assert (v.local, v.compress) == (2, "int8")
    # 3 rounds of 2 pushes, 1 s apart; each push = 2 steps x 4 samples
    updates = [[float(t), t, w, 0, 1.0, 0.0, 2 * t - 1 + w] for t in range(1, 4) for w in (0, 1)]
    cfg = ScaleConfig(quick=True, steps=6, warmup=1, global_batches="8")
    out = _throughput(cfg, v, 8, {"updates": updates, "status": {}})
    # skipped: the first round (warm-up 1 step -> 1 round); then 2 rounds x 2 pushes x 8 samples in 2 s
    assert out["samples_per_s"] == 16.0
    with pytest.raises(ValueError, match="bad option 'compress=int4'"):
        parse_variant("sync,compress=int4", 2)


def test_variants_parse_and_bad_ones_are_named():
    v = parse_variant("sync, shards=2, wire=bf16, tcp, overlap, accum=4, batch=256/512", workers=4)
    assert (v.mode, v.shards, v.wire, v.shm, v.overlap, v.accum, v.batches) == ("sync", 2, "bf16", False, True, 4,
                                                                                (256, 512))
    assert parse_variant("ssp,staleness=1", 4).staleness == 1
    with pytest.raises(ValueError, match="bad option 'warp=9'"):
        parse_variant("sync,warp=9", 4)
    with pytest.raises(ValueError, match="start with a mode"):
        parse_variant("fast", 4)
    with pytest.raises(ValueError, match="staleness= only applies to ssp"):
        parse_variant("sync,staleness=2", 4)
    with pytest.raises(ValueError, match="--global-batches 10 is not divisible by workers x accum = 4 x 1"):
        ScaleConfig(global_batches="10")
    with pytest.raises(ValueError, match="--warmup"):
        ScaleConfig(steps=5, warmup=5)


def test_default_plan_is_the_issue_target():
    """The defaults are the GPU measurement: the 25.5M GPT, 4 workers, global batch 64 and 256 (4 x 16 x 4 too)."""
    cfg = ScaleConfig()
    assert (cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.context, cfg.workers) == (8, 512, 8, 64, 4)
    plan = cfg.plan()
    assert [r["batch"] for r in plan if r["kind"] == "single"] == [64, 256]
    layouts = {(r["variant"].text, r["batch"], r["variant"].accum) for r in plan if r["kind"] == "ps"}
    assert ("sync", 64, 1) in layouts and ("sync", 256, 1) in layouts and ("sync,accum=4,batch=256", 256, 4) in layouts


def test_cli_rejects_a_bad_variant_with_one_line():
    proc = subprocess.run([sys.executable, "-m", "paramserver", "bench", "scale", "--variants", "sync;warp"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120, env=dict(os.environ, PYTHONPATH=ROOT))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("paramserver bench: error: --variants 'warp'")


def test_gpu_check_script_writes_its_results_under_out(quick):
    """deploy/gpu-check.sh, the GPU session's one command, run here on the CPU with a tiny plan (the shared quick
    run: flags after the script's own override its --device cuda): env.txt, scale.log, scale.json and logs.tgz
    land in $OUT."""
    _, _, out = quick
    assert sorted(p.name for p in out.iterdir()) == ["env.txt", "logs.tgz", "scale.json", "scale.log"]
    assert "pyzmq" in (out / "env.txt").read_text()
    report = json.loads((out / "scale.json").read_text())
    assert [r["name"] for r in report["runs"]] == ["single", "sync", "async", "sync,local=3"]
    assert report["runs"][1]["complete"]
    assert "fastest sync variant 'sync'" in (out / "scale.log").read_text()
