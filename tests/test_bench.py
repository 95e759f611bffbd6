"""paramserver/bench: the consistency benchmark's figures are measured, and its report files parse."""
from __future__ import annotations

import csv
import json
import os

import pytest

from paramserver.bench.consistency import BenchConfig, run_bench

N, B, S = 3, 1, 1


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    cfg = BenchConfig(job="mlp", workers=N, steps=12, staleness=str(S), backup_workers=B, straggler=4.0,
                      scenarios="none,straggler", modes="sync,backup,ssp,async,ddp", eval_every=4,
                      optimizer="sgd", lr=0.05, out=str(out))
    return run_bench(cfg), out


def _runs(report, name):
    return [r for r in report["runs"] if r["name"] == name]


def test_sync_staleness_is_exactly_zero(report):
    rep, _ = report
    for r in _runs(rep, "sync") + _runs(rep, "ddp"):
        assert r["series"]["staleness"] and set(r["series"]["staleness"]) == {0}
        assert set(r["series"]["gradients_per_update"]) == {N}
        assert r["summary"]["divergence_max"] == 0.0


def test_ssp_never_exceeds_s_and_async_records_real_staleness(report):
    rep, _ = report
    for r in _runs(rep, f"ssp s={S}"):
        assert r["summary"]["clock_gap_max"] <= S
    straggling = [r for r in _runs(rep, "async") if r["scenario"] == "straggler"][0]
    assert straggling["summary"]["staleness_max"] > 0 and straggling["summary"]["staleness_mean"] > 0
    assert straggling["summary"]["divergence_max"] > 0


def test_backups_apply_exactly_n_minus_b_and_count_the_dropped(report):
    rep, _ = report
    for r in _runs(rep, f"sync+{B}backup"):
        assert set(r["series"]["gradients_per_update"]) == {N - B}
        c = r["counters"]
        dropped = sum(v for k, v in c.items() if k.startswith("dropped"))
        assert c["received"] == c["applied"] + dropped
        assert r["summary"]["gradients_dropped"] == dropped
    straggling = [r for r in _runs(rep, f"sync+{B}backup") if r["scenario"] == "straggler"][0]
    assert straggling["counters"].get("dropped:backup", 0) > 0


def test_every_run_spends_the_same_budget(report):
    rep, _ = report
    for r in rep["runs"]:
        assert r["summary"]["gradients_applied"] >= 12 * N
        assert r["summary"]["gradients_applied"] < 12 * N + N


def test_report_files_are_written_parse_and_are_not_constants(report):
    rep, out = report
    data = json.loads((out / "results.json").read_text())
    assert len(data["runs"]) == 2 * 5          # sync, backup, ssp s=1, async, ddp; two scenarios
    with open(out / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 10
    for col in ("wall_s", "upd/s", "samples/s", "eval_loss"):
        values = {row[col] for row in rows}
        assert len(values) > 1, f"column {col} is the same for every run"
    for png in ("loss_vs_time.png", "loss_vs_updates.png", "staleness_hist.png", "throughput_wait.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "report.md").read_text()
    assert "![loss_vs_time.png](loss_vs_time.png)" in md and "| run |" in md
    assert str(data["target_eval_loss"]) in md
    assert "Where each worker's time went" in md and f"worker {N - 1}" in md
    sync_stale = [r["summary"]["staleness_mean"] for r in _runs(data, "sync")]
    async_stale = [r["summary"]["staleness_mean"] for r in _runs(data, "async")]
    assert max(sync_stale) == 0 < max(async_stale)
