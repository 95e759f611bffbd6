"""Data sharding for your own data set: the built-in jobs' `contiguous | random | hash` shards as a sampler.

`ShardSampler` yields the indices of one worker's shard, in a new seeded order each epoch: exactly
the order `worker.data.batches` gives the built-in jobs (with `drop_last=True` a DataLoader's
batches are the same batches). It needs only numpy, so a numpy worker can use it too; a
`torch.utils.data.DataLoader` takes it as its `sampler`.

Usage::

    sampler = ShardSampler(len(dataset), rank=1, num_workers=4, shard="hash", seed=0)
    loader = DataLoader(dataset, batch_size=32, sampler=sampler, drop_last=True)
    for x, y in loader: ...          # every epoch reshuffles the shard (or call sampler.set_epoch(e))
"""
from __future__ import annotations

from typing import Iterator

import numpy as np

from worker.data import shard_indices


class ShardSampler:
    """The sample indices worker `rank` of `num_workers` trains on, reshuffled every epoch.

    `data` is a data set (anything with `len()`) or its size. The shard is
    `shard_indices(n, num_workers, rank, shard, seed)`; the order within an epoch is the same
    seeded permutation the built-in jobs use (seed `seed + 1000 * rank`, then the epoch), so
    the shards of all workers are disjoint and together cover the data set. Each `iter()` uses
    the order of `epoch` and then moves to the next epoch; `set_epoch()` picks one.
    """

    def __init__(self, data, rank: int = 0, num_workers: int = 1, shard: str = "random", seed: int = 0,
                 shuffle: bool = True):
        n = data if isinstance(data, (int, np.integer)) else len(data)
        self.indices = shard_indices(int(n), num_workers, rank, shard, seed)
        self.rank, self.num_workers, self.shuffle = rank, num_workers, shuffle
        self.order_seed = seed + 1000 * rank   # as worker.train.batch_stream
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Use the order of `epoch` for the next iteration (as torch's DistributedSampler.set_epoch)."""
        self.epoch = epoch

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The shard's indices in the order of `epoch`."""
        if not self.shuffle:
            return self.indices
        return np.random.default_rng([self.order_seed, epoch]).permutation(self.indices)

    def __iter__(self) -> Iterator[int]:
        order = self.epoch_order(self.epoch)
        self.epoch += 1
        return iter(order.tolist())

    def __len__(self) -> int:
        return len(self.indices)

    def __repr__(self) -> str:
        return f"ShardSampler(rank={self.rank}/{self.num_workers}, {len(self)} samples, epoch {self.epoch})"
