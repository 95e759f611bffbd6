"""A worker without PyTorch: least squares in numpy, through the numpy-only client.

Nothing here imports torch (`paramserver.PSClient`, `connect`, `worker_config` and
`ShardSampler` never do); any language that speaks the wire protocol (docs/protocol.md)
can do the same. Its parameters are named and shaped as torch's `nn.Linear(D, 1)` ("weight"
(1, D), "bias" (1,)), so it can train in the same job as a PyTorch worker.

    paramserver server --num-workers 1 --optimizer sgd --lr 0.1 &
    python examples/numpy_worker.py --steps 100 --rank 0 --num-workers 1
"""
from __future__ import annotations

import argparse
import sys

import numpy as np

import paramserver as ps

D = 8


def make_data(n: int = 1024, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """x (n, D) and y = x.w + b + noise (n, 1), float32, deterministic in seed."""
    rng = np.random.default_rng(seed + 777)
    x = rng.standard_normal((n, D)).astype(np.float32)
    w, b = rng.standard_normal((D, 1)).astype(np.float32), np.float32(0.5)
    return x, (x @ w + b + 0.01 * rng.standard_normal((n, 1))).astype(np.float32)


def init_params(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"weight": (0.1 * rng.standard_normal((1, D))).astype(np.float32), "bias": np.zeros(1, np.float32)}


def loss_and_grads(theta, x: np.ndarray, y: np.ndarray) -> tuple[float, dict[str, np.ndarray]]:
    """Mean squared error of x.W^T + b and its gradient (as torch's F.mse_loss would give)."""
    r = x @ theta["weight"].T + theta["bias"] - y                 # (B, 1)
    grads = {"weight": (2.0 / len(x)) * (r.T @ x), "bias": (2.0 / len(x)) * r.sum(axis=0)}
    return float(np.mean(r ** 2)), {k: v.astype(np.float32) for k, v in grads.items()}


def shard_batches(sampler: "ps.ShardSampler", batch_size: int):
    """Consecutive full batches of the sampler's order, epoch after epoch."""
    while True:
        order = np.fromiter(sampler, dtype=np.int64)
        for start in range(0, len(order) - batch_size + 1, batch_size):
            yield order[start:start + batch_size]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=100, help="pushes to make")
    parser.add_argument("--batch-size", type=int, default=32)
    ps.add_arguments(parser)                         # --server, --rank, --num-workers, --shard, --seed, ...
    args = parser.parse_args(argv)
    cfg = ps.worker_config(args)                     # flags > PS_SERVER / PS_RANK / PS_NUM_WORKERS > defaults
    x, y = make_data()
    losses = []
    with ps.connect(cfg) as client:
        client.register(init=init_params(cfg.seed))  # the first worker's parameters become θ
        sampler = ps.ShardSampler(len(x), client.worker, cfg.num_workers, cfg.shard, cfg.seed)
        batches = shard_batches(sampler, args.batch_size)
        try:
            for _ in range(args.steps):
                theta = client.pull()                    # θ by name, with its version and clock
                if theta.meta.get("stop"):
                    break
                idx = next(batches)
                loss, grads = loss_and_grads(theta.tensors, x[idx], y[idx])
                client.push(grads, version=theta.version, clock=theta.clock, loss=loss)
                losses.append(loss)
        finally:
            client.server_timeout = min(client.server_timeout, 5.0)   # leave, even if the server is gone
            client.leave("done")
    print(f"numpy worker {client.worker}: {len(losses)} steps, loss {losses[0]:.4f} -> {losses[-1]:.4f}"
          f", torch imported: {'torch' in sys.modules}", flush=True)


if __name__ == "__main__":
    main()
