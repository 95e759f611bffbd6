"""paramserver/bench/throughput.py's convergence runs (`--convergence-steps`, `--convergence-seeds`): the default GPT
job trained per wire dtype and seed, and the table that shows the spread between seeds.

Its own file (and module fixture) so that another test process runs it beside tests/test_bench_throughput.py's
sizes and tests/test_bench_throughput_shards.py's shard table."""
from __future__ import annotations

import pytest

from paramserver.bench.throughput import ThroughputConfig, run_throughput
from paramserver.bench.throughput_tables import table


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """`bench throughput`'s convergence runs alone: 2 sync steps of the default GPT job per wire (fp32, bf16) and
    seed (0, 1)."""
    out = tmp_path_factory.mktemp("throughput_convergence")
    cfg = ThroughputConfig(sizes="", wire_dtypes="fp32,bf16", transports="", shards="", convergence_steps=2,
                           convergence_seeds="0,1", out=str(out))
    return cfg, run_throughput(cfg), out


def test_convergence_trains_each_wire_per_seed_and_the_table_shows_the_spread(run):
    _, r, _ = run
    for wire in ("fp32", "bf16"):
        c = r["convergence"][wire]
        assert c["seeds"] == [0, 1] and len(c["losses"]) == 2 and all(x > 0 for x in c["losses"])
        assert c["final_eval_loss"] == pytest.approx(sum(c["losses"]) / 2)
    assert r["convergence"]["fp32"]["losses"][0] != r["convergence"]["fp32"]["losses"][1]   # the seeds differ
    given = {"config": {"workers": "1"}, "machine": {"cpus": 2}, "sizes": [],
             "convergence": {"fp32": {"final_eval_loss": 2.0, "losses": [1.9, 2.1], "wall_s": 1.0},
                             "bf16": {"final_eval_loss": 2.02, "losses": [2.0, 2.04], "wall_s": 1.0}}}
    text = table(given)
    assert "| fp32 | 2.0000 | 1.9000 / 2.1000 | +0.00% | 1.0 |" in text
    assert "| bf16 | 2.0200 | 2.0000 / 2.0400 | +1.00% | 1.0 |" in text
    assert "fp32's spread between seeds: 10.53%" in text
    with pytest.raises(ValueError, match="--convergence-seeds"):
        ThroughputConfig(convergence_seeds="0,0")
