"""paramserver/bench: the consistency benchmark's figures are measured, and its report files parse."""
from __future__ import annotations

import csv
import json

import pytest

from paramserver.bench.consistency import BenchConfig, run_bench

N, B, S = 3, 1, 1


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """The suite's one consistency-bench run: every mode, without and with a straggler, 12 steps of 3 workers."""
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


def test_bench_load_out_creates_the_folder_and_writes_the_servers_metrics(tmp_path):
    from paramserver.bench.load import LoadConfig, run_load
    out = tmp_path / "missing" / "load"
    r = run_load(LoadConfig(workers=2, seconds=0.5, size=8, out=str(out)))
    assert r["theta_exact"]
    srv = json.loads((out / "server_metrics.json").read_text())
    assert srv["status"]["counters"]["applied"] == r["server_applied"] and srv["updates"]
    assert json.loads((out / "load.json").read_text())["applied_acked"] == r["applied_acked"]
    assert "listening on" in (out / "server.log").read_text()


def test_report_ranks_only_where_repeat_ranges_do_not_overlap():
    from paramserver.bench.report import verdict
    a = {"repeats": 3, "summary": {"wall_s": 10}, "range": {"wall_s": [9.0, 11.0]}}
    b = {"repeats": 3, "summary": {"wall_s": 12}, "range": {"wall_s": [10.5, 13.0]}}
    c = {"repeats": 3, "summary": {"wall_s": 20}, "range": {"wall_s": [19.0, 21.0]}}
    assert verdict(a, b, "wall_s") == "within run-to-run noise (ranges overlap)"
    assert verdict(a, c, "wall_s").startswith("lower in every repeat")
    assert verdict(c, a, "wall_s").startswith("higher in every repeat")
    one = {"repeats": 1, "summary": {"wall_s": 1}, "range": {"wall_s": [1.0, 1.0]}}
    assert "no ranking" in verdict(one, c, "wall_s")
    never = {"repeats": 3, "summary": {"t": None}, "range": {"t": [None, None]}}
    assert verdict({"repeats": 3, "range": {"t": [1.0, 2.0]}}, never, "t").startswith("lower")


def _results_of(rep: dict) -> list[dict]:
    """The shared run's results as run_bench holds them before it aggregates (one repeat, seed 0): copies."""
    return [dict({k: v for k, v in r.items() if k not in ("range", "repeats", "per_repeat")},
                 summary=dict(r["summary"]), seed=r["per_repeat"][0]["seed"]) for r in rep["runs"]]


def test_repeats_report_median_and_range_and_equal_computed_gradients(report, tmp_path):
    """--repeats 2 from given figures (nothing runs again): the shared run's results as the first repeat and, as
    the second (seed 1), the same with every wall time 1.5x; then, on the shared run itself, the computed
    gradients of backup workers and of sync."""
    from paramserver.bench.consistency import assemble_report
    from paramserver.bench.report import write_report
    rep, _ = report
    first = _results_of(rep)
    second = [dict(r, summary=dict(r["summary"], wall_s=r["summary"]["wall_s"] * 1.5), seed=1) for r in first]
    cfg = BenchConfig(**dict(rep["config"], repeats=2, out=str(tmp_path)))
    two = assemble_report(cfg, first + second, wall_s=1.0)
    assert two["repeats"] == 2 and len(two["all_runs"]) == 2 * len(first)
    assert {r["seed"] for r in two["all_runs"]} == {0, 1}
    for r in two["runs"]:
        walls = [p["wall_s"] for p in r["per_repeat"]]
        assert r["range"]["wall_s"] == [min(walls), max(walls)]
        assert r["summary"]["wall_s"] == pytest.approx(sorted(walls)[0] / 2 + sorted(walls)[1] / 2, abs=1e-3)
    write_report(two, str(tmp_path))
    md = (tmp_path / "report.md").read_text()
    assert "median over 2 repeats" in md and f"At equal computed gradients ({12 * N} computed" in md
    assert "[" in md.split("At equal applied gradients")[1]      # ranges are shown
    # backup workers compute more gradients than they apply; sync computes exactly what it applies
    backup = [r for r in _runs(rep, f"sync+{B}backup") if r["scenario"] == "straggler"][0]
    sync = [r for r in _runs(rep, "sync") if r["scenario"] == "straggler"][0]
    assert backup["summary"]["gradients_computed"] > backup["summary"]["gradients_applied"]
    assert sync["per_repeat"][0]["gradients_computed"] == sync["per_repeat"][0]["gradients_applied"] == 12 * N
    assert backup["summary"]["loss_at_equal_computed"] is not None


def test_wait_counts_only_what_the_policy_imposes_not_the_start_gate(report):
    _, out = report
    for folder in (out / "runs").iterdir():
        if "ddp" in folder.name:
            continue
        for f in folder.glob("worker*.json"):
            w = json.loads(f.read_text())
            if w["steps"]:
                assert "start_gate_s" in w and w["steps"][0][5] == 0.0     # the gate is recorded apart
