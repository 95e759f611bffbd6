"""paramserver/bench/throughput.py: every figure is measured (positive, from real runs), the table prints."""
from __future__ import annotations

import json

import pytest

from paramserver.bench.throughput import ThroughputConfig, run_throughput, table


def test_tiny_throughput_run(tmp_path):
    cfg = ThroughputConfig(sizes="50K", tensors=4, reps=2, seconds=0.5, workers="1,2", optimizers="sgd,adam",
                           wire_dtypes="fp32,bf16", out=str(tmp_path))
    r = run_throughput(cfg)
    assert json.loads((tmp_path / "throughput.json").read_text())["sizes"][0]["params"] == 50_000
    size = r["sizes"][0]
    assert size["raw_zmq_ms"] > 0 and size["torch"]["add_ms"] > 0 and size["torch"]["adam_fused_ms"] > 0
    assert size["apply_ms"]["sgd"] > 0 and size["apply_ms"]["adam"] > 0
    fp32, bf16 = size["wire"]["fp32"], size["wire"]["bf16"]
    assert bf16["bytes"] * 2 == fp32["bytes"] == 200_000
    for w in (fp32, bf16):
        assert w["round_trip_ms"] > 0
        for n in ("1", "2"):
            cap = w["capacity"][n]
            assert cap["applied"] > 0 and cap["pushes_per_s"] > 0 and cap["peak_rss_mb"] > cap["idle_rss_mb"] > 0
            assert cap["peak_anon_over_theta"] > 0 and cap["peak_shmem_over_theta"] >= 0
    text = table(r)
    assert "| 0.05M | bf16 | 0.1 |" in text and "bf16 vs fp32: bytes 0.50x" in text


def test_bad_flags_are_named():
    with pytest.raises(ValueError, match="--sizes"):
        ThroughputConfig(sizes="lots")
    with pytest.raises(ValueError, match="--wire-dtypes"):
        ThroughputConfig(wire_dtypes="fp32,int8")
