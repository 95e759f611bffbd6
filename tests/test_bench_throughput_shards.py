"""paramserver/bench/throughput.py's shard table (`--shards`): K shard processes x N workers x transport, each row
paramserver/bench/shards.py's measurement, every figure measured; the table says where processes oversubscribe.

Its own file (and module fixture) so that another test process runs it beside tests/test_bench_throughput.py's
sizes; these rows are also the suite's one real run of `bench shards`' measurement (tests/test_shards.py checks
run_shards' plan, the same configurations in the same order)."""
from __future__ import annotations

import json
import os

import pytest

from paramserver.bench.throughput import ThroughputConfig, run_throughput
from paramserver.bench.throughput_tables import shards_table


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """`bench throughput`'s shard table alone: 1 and 2 shards of 5K values, 1 and 2 workers, shm (where /dev/shm
    is writable) and tcp, 0.3 s each."""
    from common import shm
    out = tmp_path_factory.mktemp("throughput_shards")
    cfg = ThroughputConfig(sizes="", seconds=0.3, workers="1,2", wire_dtypes="fp32",
                           transports="shm,tcp" if shm.available() else "tcp", shards="1,2", shard_params="5K",
                           out=str(out))
    return cfg, run_throughput(cfg), out


def test_shard_table(run):
    """The shard table (K x N x transport): every figure measured in this run; the shm rows really went through
    /dev/shm, the tcp rows never; oversubscription is said."""
    cfg, r, out = run
    if "shm" not in cfg.transport_list:
        pytest.skip("no writable /dev/shm")
    assert json.loads((out / "throughput.json").read_text())["shards"] == r["shards"]
    rows = r["shards"]
    assert [(x["shards"], x["workers"], x["transport"]) for x in rows] == [
        (k, n, t) for k in (1, 2) for n in (1, 2) for t in ("shm", "tcp")]
    for x in rows:
        assert x["size"] == 5000 and x["steps"] > 0 and x["mb_per_s"] > 0
        assert x["processes"] == x["shards"] + x["workers"]
        assert (x["shm_push_share"] == 1.0) == (x["transport"] == "shm")
        if x["transport"] == "shm":   # a pull whose slot was rewritten meanwhile goes by tcp
            assert x["shm_push_share"] == 1.0 and x["shm_pull_share"] > 0.5
        else:
            assert x["shm_pull_share"] == x["shm_push_share"] == 0.0
    assert len({x["steps"] for x in rows}) > 1                                  # measured, not constants
    lines = [line for line in shards_table(r).splitlines() if line.startswith("| 1 |") or line.startswith("| 2 |")]
    assert len(lines) == len(rows)
    for x, line in zip(rows, lines):
        assert f"| {x['processes']} / {os.cpu_count()} |" in line
        assert ("oversubscribed" in line) == (x["processes"] > os.cpu_count())
