"""Golden-loss regression: a tiny seeded sync run of the default GPT job on the default corpus.

The losses are stored in tests/golden_loss.json; regenerate after an intended change with
`python -m tests.test_golden_loss --update` and say why in the commit.
"""
from __future__ import annotations

import json
import os
import sys
import threading

import numpy as np

from common.config import ServerConfig, WorkerConfig

GOLDEN = os.path.join(os.path.dirname(__file__), "golden_loss.json")
N, STEPS = 2, 30


def run_tiny_gpt() -> dict:
    from paramserver.server import Server
    from tests.conftest import run_worker_thread
    server = Server(ServerConfig(bind="tcp://127.0.0.1:*", num_workers=N, mode="sync", optimizer="adam",
                                 lr=0.003, log_level="warning"))
    address = server.bind()
    loop = threading.Thread(target=server.serve_forever, daemon=True)
    loop.start()
    results, threads = {}, []
    for rank in range(N):
        cfg = WorkerConfig(server=address, rank=rank, num_workers=N, job="gpt", n_layer=1, n_embd=32, n_head=2,
                           context=32, max_bytes=1_000_000, batch_size=8, steps=STEPS, eval_every=10,
                           eval_batches=4, log_every=0, seed=0, threads=1, log_level="warning")
        threads.append(run_worker_thread(cfg, results))
    for t in threads:
        t.join(timeout=300)
    server.stop()
    loop.join(timeout=10)
    server.close()
    for r in results.values():
        if isinstance(r, BaseException):
            raise r
    train = [[round(s[3], 5) for s in results[r]["steps"]] for r in range(N)]
    evals = [round(e[3], 5) for e in results[0]["evals"]]
    return {"train_loss": train, "eval_loss": evals}


def test_default_job_loss_falls_and_matches_golden():
    got = run_tiny_gpt()
    assert got["eval_loss"][-1] < got["eval_loss"][0] - 0.5, got["eval_loss"]
    assert np.mean(got["train_loss"][0][-5:]) < np.mean(got["train_loss"][0][:5]) - 0.5
    with open(GOLDEN) as f:
        golden = json.load(f)
    # same code, seed and torch: identical up to float noise; a different stdlib (Python version) shifts
    # the corpus slightly, hence a tolerance rather than bit equality
    np.testing.assert_allclose(got["eval_loss"], golden["eval_loss"], rtol=0.03)
    np.testing.assert_allclose(got["train_loss"], golden["train_loss"], rtol=0.05)


if __name__ == "__main__":
    if "--update" in sys.argv:
        result = run_tiny_gpt()
        with open(GOLDEN, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {GOLDEN}: eval {result['eval_loss']}")
