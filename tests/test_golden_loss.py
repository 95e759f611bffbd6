"""Golden-loss regression: a tiny seeded sync run of the GPT job on a fixed corpus kept in tests/.

The corpus is tests/data/corpus.txt (25 KB of prose and code written for this test), so the bytes
trained on do not depend on the machine or the Python version. The losses are stored in
tests/golden_loss.json and compared with a tight relative tolerance (RTOL): a change that drops or
halves one worker's gradient per step moves them by percents and fails, which
test_dropping_one_gradient_per_step_fails_the_golden_comparison checks by doing exactly that.
Regenerate after an intended change with `python -m tests.test_golden_loss --update` and say why
in the commit.
"""
from __future__ import annotations

import json
import os
import sys
import threading

import numpy as np
import pytest

from common.config import ServerConfig, WorkerConfig

HERE = os.path.dirname(os.path.abspath(__file__))
GOLDEN = os.path.join(HERE, "golden_loss.json")
CORPUS = os.path.join(HERE, "data", "corpus.txt")
N, STEPS = 2, 30
# Same code, seed, corpus and torch give bit-identical losses run to run (2 workers: the sum of two
# gradients does not depend on their arrival order). The tolerance only absorbs float differences
# between machines (other SIMD paths in torch/numpy); dropping one gradient moves losses by ~1e-2.
RTOL = 1e-4


def run_tiny_gpt() -> dict:
    from paramserver.server import Server
    from tests.conftest import run_worker_thread
    server = Server(ServerConfig(bind="tcp://127.0.0.1:*", num_workers=N, mode="sync", optimizer="adam",
                                 lr=0.003, aggregate="mean", log_level="warning"))
    address = server.bind()
    loop = threading.Thread(target=server.serve_forever, daemon=True)
    loop.start()
    results, threads = {}, []
    for rank in range(N):
        cfg = WorkerConfig(server=address, rank=rank, num_workers=N, job="gpt", data=CORPUS, n_layer=1, n_embd=32,
                           n_head=2, context=32, batch_size=8, steps=STEPS, eval_every=10, eval_batches=4,
                           log_every=0, seed=0, threads=1, log_level="warning")
        threads.append(run_worker_thread(cfg, results))
    for t in threads:
        t.join(timeout=300)
    server.stop()
    loop.join(timeout=10)
    server.close()
    for r in results.values():
        if isinstance(r, BaseException):
            raise r
    assert all(len(results[r]["steps"]) == STEPS for r in range(N)), "a worker did not finish its steps"
    train = [[float(s[3]) for s in results[r]["steps"]] for r in range(N)]
    evals = [float(e[3]) for e in results[0]["evals"]]
    return {"corpus": os.path.relpath(CORPUS, os.path.dirname(HERE)), "train_loss": train, "eval_loss": evals}


def compare_with_golden(got: dict) -> None:
    """Raise AssertionError unless `got` matches the stored losses to RTOL."""
    with open(GOLDEN) as f:
        golden = json.load(f)
    np.testing.assert_allclose(got["eval_loss"], golden["eval_loss"], rtol=RTOL, atol=0)
    np.testing.assert_allclose(got["train_loss"], golden["train_loss"], rtol=RTOL, atol=0)


def test_default_job_loss_falls_and_matches_golden():
    got = run_tiny_gpt()
    assert got["eval_loss"][-1] < got["eval_loss"][0] - 0.5, got["eval_loss"]
    assert np.mean(got["train_loss"][0][-5:]) < np.mean(got["train_loss"][0][:5]) - 0.5
    compare_with_golden(got)


def test_dropping_one_gradient_per_step_fails_the_golden_comparison(monkeypatch):
    """The golden test has teeth: a server that loses worker 1's gradient in every step (it still
    counts the push, so the barrier and the counters look normal) no longer matches."""
    from paramserver.consistency import Consistency
    push = Consistency.push

    def dropping_push(self, worker, clock, grads, *args, **kwargs):
        if worker == 1:
            grads = {n: np.zeros_like(g) for n, g in grads.items()}
        return push(self, worker, clock, grads, *args, **kwargs)

    monkeypatch.setattr(Consistency, "push", dropping_push)
    got = run_tiny_gpt()
    with pytest.raises(AssertionError, match="Not equal to tolerance"):
        compare_with_golden(got)
    with open(GOLDEN) as f:
        golden = json.load(f)
    worst_eval = float(np.max(np.abs(np.array(got["eval_loss"]) / golden["eval_loss"] - 1)))
    worst_train = float(np.max(np.abs(np.array(got["train_loss"]) / golden["train_loss"] - 1)))
    print(f"\none gradient dropped per step: eval loss off by up to {worst_eval:.3%}, train loss by up to "
          f"{worst_train:.3%} (tolerance {RTOL:.2%})")


if __name__ == "__main__":
    if "--update" in sys.argv:
        result = run_tiny_gpt()
        with open(GOLDEN, "w") as f:
            json.dump(result, f, indent=1)
            f.write("\n")
        print(f"wrote {GOLDEN}: eval {result['eval_loss']}")
    else:
        print("usage: python -m tests.test_golden_loss --update   (rewrites tests/golden_loss.json)")
