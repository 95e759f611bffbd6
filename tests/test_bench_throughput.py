"""paramserver/bench/throughput.py: every figure is measured (positive, from real runs), the table prints."""
from __future__ import annotations

import json
import os

import pytest

from paramserver.bench.throughput import ThroughputConfig, run_throughput
from paramserver.bench.throughput_tables import shm_table, table, time_notes


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The suite's `bench throughput` run of one size, its smallest plan that reaches every part of a size: 50K
    values in 4 tensors, 1 and 2 pushing processes, sgd and adam, fp32 and bf16 over tcp and (where /dev/shm is
    writable) fp32 over shared memory. The same bench's shard table and convergence runs are their own plans, in
    tests/test_bench_throughput_shards.py and tests/test_bench_throughput_convergence.py (another test process
    runs each file: together they are the one run this fixture was)."""
    from common import shm
    out = tmp_path_factory.mktemp("throughput")
    cfg = ThroughputConfig(sizes="50K", tensors=4, reps=2, seconds=0.3, workers="1,2", optimizers="sgd,adam",
                           wire_dtypes="fp32,bf16", transports="shm,tcp" if shm.available() else "tcp", shards="",
                           server_threads=1, out=str(out))
    return cfg, run_throughput(cfg), out


def test_tiny_throughput_run(run):
    cfg, r, out = run
    assert json.loads((out / "throughput.json").read_text())["sizes"][0]["params"] == 50_000
    size = r["sizes"][0]
    assert size["raw_zmq_ms"] > 0 and size["torch"]["add_ms"] > 0 and size["torch"]["adam_fused_ms"] > 0
    assert size["raw_zmq_half_ms"] > 0   # a 16-bit wire's limit: raw ZeroMQ at half the bytes, same run
    assert size["apply_ms"]["sgd"] > 0 and size["apply_ms"]["adam"] > 0
    fp32, bf16 = size["wire"]["fp32"], size["wire"]["bf16"]
    assert bf16["bytes"] * 2 == fp32["bytes"] == 200_000
    for w in (fp32, bf16):
        assert w["round_trip_ms"] > 0
        for n in ("1", "2"):
            cap = w["capacity"][n]
            assert cap["applied"] > 0 and cap["pushes_per_s"] > 0 and cap["peak_rss_mb"] > cap["idle_rss_mb"] > 0
            assert cap["peak_anon_over_theta"] > 0 and cap["peak_shmem_over_theta"] >= 0
            # the rate is over the pushing itself, inside the processes' whole run; the server says where its
            # time went and what its snapshot pool did
            assert cap["window_s"] >= cfg.seconds and cap["wall_s"] > 0   # (each process pushes for --seconds)
            assert cap["pushes_per_s"] == pytest.approx(cap["applied"] / cap["window_s"], rel=0.01)
            assert cap["server_time_s"]["busy"] > 0 and cap["server_time_s"]["update"] > 0
            assert {"allocated", "copies", "over_cap"} <= set(cap["snapshots"])
            assert cap["server_threads"] == 1   # --server-threads reached the server
    assert r["machine"]["commit"] and r["machine"]["load_avg"] >= 0   # which code ran, on how busy a machine
    assert "where the time goes" in time_notes(r) and "busy" in time_notes(r)
    text = table(r)
    assert "| 0.05M | bf16 | 0.1 |" in text and "bf16 vs fp32: bytes 0.50x" in text
    assert "raw ZeroMQ at half the bytes" in text


def test_bad_flags_are_named():
    with pytest.raises(ValueError, match="--sizes"):
        ThroughputConfig(sizes="lots")
    with pytest.raises(ValueError, match="--wire-dtypes"):
        ThroughputConfig(wire_dtypes="fp32,int8")
    with pytest.raises(ValueError, match="--server-threads"):
        ThroughputConfig(server_threads=-1)


def test_shared_memory_tables(run):
    """Capacity and round trip over same-host shared memory beside tcp: every figure measured in this run; the shm
    pushers really went through /dev/shm. (The shard table: tests/test_bench_throughput_shards.py.)"""
    cfg, r, out = run
    if "shm" not in cfg.transport_list:
        pytest.skip("no writable /dev/shm")
    size = r["sizes"][0]
    rt = size["shm"]
    # one worker alone: every pull and every push of the round trip went through shared memory
    assert rt["round_trip_ms"] > 0 and rt["shm_share"] == {"pulls": 4, "pushes": 3, "shm_pulls": 4, "shm_pushes": 3}
    for n in ("1", "2"):
        cap = rt["capacity"][n]
        share = cap["shm_share"]
        assert cap["applied"] > 0 and cap["pushes_per_s"] > 0 and cap["processes"] == int(n) + 1
        assert share["pushes"] > 0 and share["shm_pushes"] == share["pushes"] and share["shm_pulls"] > 0
        assert "shm_share" not in size["wire"]["fp32"]["capacity"][n]          # tcp's pushers: the socket
    text = shm_table(r)
    row = next(line for line in text.splitlines() if line.startswith("| 0.05M |"))
    assert f"| {size['wire']['fp32']['round_trip_ms']} / {rt['round_trip_ms']} |" in row and "% / 100% |" in row
    mem = " / ".join(str(rt["capacity"][n]["peak_anon_over_theta"]) for n in ("1", "2"))
    assert f"| {mem} |" in row and rt["capacity"]["1"]["peak_anon_over_theta"] > 0


def test_shard_and_transport_flags_are_checked():
    with pytest.raises(ValueError, match="--transports"):
        ThroughputConfig(transports="shm,udp")
    with pytest.raises(ValueError, match="--shards"):
        ThroughputConfig(shards="0,2")
    with pytest.raises(ValueError, match="--shards"):
        ThroughputConfig(shards="two")
    with pytest.raises(ValueError, match="--shards needs"):
        ThroughputConfig(transports="", shards="1")
    cfg = ThroughputConfig(transports="", shards="")                            # both tables skipped
    assert cfg.transport_list == [] and cfg.shard_list == []


def _bench_target(rank, mode, sync):
    """A bench worker for run_workers: 'ok' reports, 'raise' fails in rank 1, 'exit' dies silently in rank 1."""
    if rank == 1 and mode == "raise":
        raise ValueError("boom")
    if rank == 1 and mode == "exit":
        os._exit(3)
    sync.registered(rank)
    sync.start.wait()
    return {"value": rank * 10}


@pytest.mark.parametrize("mode, needle", [("ok", ""), ("raise", "bench worker 1 failed: ValueError: boom"),
                                          ("exit", "bench worker 1 exited with code 3 without reporting")])
def test_run_workers_collects_results_and_names_a_failed_worker(mode, needle):
    from paramserver.bench.procs import run_workers
    if not needle:
        rows, wall = run_workers(_bench_target, 3, (mode,), timeout=60, start_timeout=60)
        assert [r["value"] for r in rows] == [0, 10, 20] and wall >= 0
        return
    with pytest.raises(RuntimeError, match=needle):       # at once: nobody waits for the start timeout
        run_workers(_bench_target, 3, (mode,), timeout=600, start_timeout=600)


def test_the_tables_ratios_and_notes_from_given_figures():
    """The arithmetic of table() and time_notes() on figures given by hand: every ratio in its direction."""
    cap = {"pushes_per_s": 10.0, "applied": 40, "peak_rss_over_theta": 9.0, "peak_minus_idle_over_theta": 5.0,
           "peak_anon_over_theta": 6.0, "server_time_s": {"busy": 2.0, "update": 1.5, "check": 0.5, "other": 0.0}}
    r = {"config": {"workers": "4"}, "machine": {"cpus": 2},
         "sizes": [{"params": 10_000_000, "raw_zmq_ms": 20.0, "raw_zmq_half_ms": 10.0,
                    "apply_ms": {"sgd": 4.0, "adam": 8.0, "check": 1.0},
                    "torch": {"add_ms": 3.0, "adam_fused_ms": 6.4},
                    "wire": {"fp32": {"bytes": 40e6, "round_trip_ms": 25.0, "capacity": {"4": cap}},
                             "bf16": {"bytes": 20e6, "round_trip_ms": 20.0, "capacity": {"4": dict(cap, pushes_per_s=15.0)}}}}]}
    text = table(r)
    # raw / push+pull 20/25; adam / fused 8/6.4; add_ / sgd 3/4
    assert "| 10M | fp32 | 40 | 20.0 | 25.0 | 0.80x | 4.0 / - / 8.0 (1.0) | 3.0 / 6.4 | 1.25x | 0.75x | 10.0 | 9.0x (5.0x; 6.0x) |" in text
    assert "10M, bf16 vs fp32: bytes 0.50x, round trip 1.25x faster (raw ZeroMQ at half the bytes: 2.00x faster), capacity 4 workers 1.50x" in text
    notes = time_notes(r)
    assert "raw / (raw + the server's sgd apply) = 20 / (20 + 4) = 0.83x at best" in notes and "measured 0.80x" in notes
    assert "10M, fp32 tcp, 4 workers (10.0 pushes/s): server busy 50.00 ms per push: update 75%, check 25%" in notes
