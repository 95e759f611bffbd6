"""Sync, bounded staleness (SSP) and async as one policy object: where the barrier lives.

Every live worker has a clock: the number of gradients it has pushed (in sync mode, the step
it works on). The policy answers two questions for the server loop:

* `pull_ready(w, clock)`: may worker w get theta now, to compute its gradient for `clock`?
    - sync:  when the server has applied `clock` steps (the barrier: everyone finished step clock-1)
    - ssp:   when clock - min(live clocks) <= staleness  (Bösen/Angel vector clock)
    - async: always
  Nothing is answered before `num_workers` workers have registered (the start gate); a resumed
  server instead waits for the workers its checkpoint had live (`await_workers`).
* `push(w, clock, grads, ...)`: what happens to a gradient?
    - sync:  held for the step; when all live workers (or N - backup_workers of them) have pushed,
             the sum (or mean) is applied once. Gradients are summed in worker-id order, never in
             arrival order, so theta is bit-identical from run to run whatever the timing
    - ssp / async: applied on arrival, with learning rate lr/N (N live workers) under mean aggregation
  The update rule itself (the sum, the 1/N and the step, written out): paramserver/update.py.

A worker that leaves (or is declared dead) is removed from the barrier and from the minimum
clock at once, so the others never wait for it.

Usage::

    policy = Consistency(store, mode="sync", num_workers=2)
    policy.join(0); policy.join(1)
    policy.push(0, clock=0, grads=g0, base_version=0)   # accumulated
    policy.push(1, clock=0, grads=g1, base_version=0)   # step applied; policy.step == 1
"""
from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Mapping

import numpy as np

from paramserver.store import ParamStore
from paramserver.update import step_scales


@dataclass
class Contribution:
    """One gradient that went into an applied update."""
    worker: int
    clock: int
    base_version: int
    staleness: int = 0
    meta: dict = field(default_factory=dict)


@dataclass
class PushResult:
    status: str            # "applied", "accumulated" or "dropped"
    reason: str = ""       # why it was dropped
    version: int = 0       # server version after handling the push
    members: list | None = None   # sync: the workers whose gradients formed the step this push completed


class Consistency:
    def __init__(self, store: ParamStore, mode: str = "sync", num_workers: int = 1, staleness: int = 0,
                 backup_workers: int = 0, aggregate: str = "mean", min_workers: int = 1,
                 on_update: Callable[[int, list[Contribution]], None] | None = None, follower: bool = False):
        self.store, self.mode, self.num_workers = store, mode, num_workers
        self.staleness, self.backup_workers, self.aggregate = staleness, backup_workers, aggregate
        self.min_workers = min_workers
        # a shard other than shard 0 with backup workers: shard 0 decides which gradients form a step (see
        # _maybe_complete_step); this shard follows. _members: the set shard 0 applied for the current step
        self.follower = follower and mode == "sync" and backup_workers > 0
        self._members: set[int] | None = None
        self._last_members: list[int] = []
        self.on_update = on_update or (lambda version, contributions: None)
        self.clocks: dict[int, int] = {}          # live workers -> clock
        self.last_clock: dict[int, int] = {}      # every worker ever seen -> its last clock
        self.joined: set[int] = set()             # workers registered since this process started
        self.awaiting: set[int] = set()           # after a resume: workers of the checkpoint not back yet
        self._resumed_with_workers = False
        self.started = False
        self.step = 0                             # sync: steps applied
        self._acc: dict[str, np.ndarray] | None = None   # sync: the step's gradients summed so far, in id order
        self._held: dict[int, Mapping[str, np.ndarray]] = {}   # sync: gradients waiting for a lower id
        self._contrib: list[Contribution] = []
        self.counters: Counter = Counter()        # received, applied, dropped:<reason>, ...
        self.max_gap = 0                          # largest clock - min_clock granted to a pull
        self.apply_s = 0.0                        # seconds spent in store.apply (this process), for benchmarks

    # -- membership -------------------------------------------------------------------------

    def join(self, worker: int) -> int:
        """Add a live worker (new or coming back); returns the clock it continues from."""
        if self.mode == "sync":
            # a worker whose gradient is already in the current step waits for the next one
            clock = self.step + 1 if any(c.worker == worker for c in self._contrib) else self.step
        elif self.clocks:
            # rejoin at the current position: never behind the slowest live worker
            clock = max(self.last_clock.get(worker, 0), self.min_clock())
        else:
            clock = self.last_clock.get(worker, 0)
        self.clocks[worker] = clock
        self.last_clock[worker] = clock
        self.joined.add(worker)
        self.awaiting.discard(worker)
        self._maybe_start()
        return clock

    def await_workers(self, workers) -> None:
        """After a resume: hold every pull until these workers are back (or given up with `give_up`)."""
        self.started = False
        self.awaiting = set(workers)
        self._resumed_with_workers = bool(self.awaiting)

    def give_up(self, worker: int) -> None:
        """Stop waiting for a worker of the checkpoint (it stayed silent)."""
        self.awaiting.discard(worker)
        self._maybe_start()

    def _maybe_start(self) -> None:
        if self.started or self.awaiting:
            return
        if self._resumed_with_workers or len(self.joined) >= self.num_workers:
            self.started = True

    def leave(self, worker: int) -> None:
        """Remove a worker from the barrier and the clock minimum (finished, said goodbye or dead)."""
        self.clocks.pop(worker, None)
        if self._members is not None:
            self._members.discard(worker)
        self._fold()
        self._maybe_complete_step()

    def min_clock(self) -> int:
        return min(self.clocks.values()) if self.clocks else 0

    # -- pulls --------------------------------------------------------------------------------

    def pull_ready(self, worker: int) -> bool:
        """May live worker `worker` get theta now? Uses the server's clock for it, not the request's."""
        if not self.started or not self.store.initialized or worker not in self.clocks:
            return False
        clock = self.clocks[worker]
        if self.mode == "sync":
            return self.step >= clock and len(self.clocks) >= self.min_workers
        if self.mode == "ssp":
            return clock - self.min_clock() <= self.staleness
        return True

    def follow_clock(self, worker: int, clock: int) -> None:
        """A follower shard (backup workers): the worker's pull says which step shard 0 granted it; its pull
        here is held until this shard has applied that many steps, so it computes on theta of one step."""
        if self.follower and worker in self.clocks and clock > self.clocks[worker]:
            self.clocks[worker] = self.last_clock[worker] = clock
            self._maybe_complete_step()

    def grant_clock(self, worker: int) -> int:
        """Called when a pull is answered; returns the clock the worker now computes for."""
        clock = self.clocks[worker]
        self.max_gap = max(self.max_gap, clock - self.min_clock())
        return clock

    # -- pushes -------------------------------------------------------------------------------

    def push(self, worker: int, clock: int, grads: Mapping[str, np.ndarray], base_version: int,
             meta: dict | None = None, members: list | None = None) -> PushResult:
        """Handle a gradient that the server has already checked against theta."""
        self.counters["received"] += 1
        contribution = Contribution(worker, clock, base_version, meta=meta or {})
        if self.mode != "sync":
            if worker in self.clocks:
                self.clocks[worker] = max(self.clocks[worker], clock + 1)
                self.last_clock[worker] = self.clocks[worker]
            # mean: each push moves theta 1/N as far (learning rate lr/N), so N pushes ~ one sync step
            scale, lr_scale = step_scales(self.mode, self.aggregate, len(self.clocks))
            self._apply(grads, [contribution], scale, lr_scale)
            return PushResult("applied", version=self.store.version)

        if clock != self.step:
            reason = "late" if clock < self.step else "ahead"
            if self.backup_workers and clock < self.step:
                reason = "backup"  # a step already applied with the first N-b gradients
            self.counters[f"dropped:{reason}"] += 1
            if worker in self.clocks:
                self.clocks[worker] = self.step
            return PushResult("dropped", reason=f"{reason}: gradient for step {clock}, server is at step "
                                                f"{self.step}", version=self.store.version)
        if any(c.worker == worker for c in self._contrib):
            self.counters["dropped:twice"] += 1
            return PushResult("dropped", reason=f"worker {worker} already pushed for step {clock}",
                              version=self.store.version)
        self._held[worker] = grads
        self._contrib.append(contribution)
        if worker in self.clocks:
            self.clocks[worker] = clock + 1
            self.last_clock[worker] = clock + 1
        if self.follower and isinstance(members, list) and all(isinstance(m, int) for m in members):
            self._members = set(members) & (set(self.clocks) | {c.worker for c in self._contrib})
        self._fold()
        if self._maybe_complete_step():
            return PushResult("applied", version=self.store.version, members=self._last_members)
        return PushResult("accumulated", version=self.store.version)

    def skip(self, worker: int, clock: int) -> PushResult:
        """Sync with shards and backup workers: shard 0 dropped this worker's gradient for `clock`, so this
        shard drops it too (it never sees it): the worker only moves past the step, counted as dropped."""
        self.counters["received"] += 1
        self.counters["dropped:backup"] += 1
        if worker in self.clocks:
            self.clocks[worker] = max(self.clocks[worker], clock + 1)
            self.last_clock[worker] = self.clocks[worker]
        self._fold()
        self._maybe_complete_step()
        return PushResult("dropped", reason=f"backup: shard 0 dropped the gradient for step {clock}",
                          version=self.store.version)

    @property
    def pending_gradients(self) -> int:
        """Sync: gradients accumulated for the current step, not applied yet."""
        return len(self._contrib)

    def needed(self) -> int:
        """Sync: gradients that complete the current step."""
        live = len(self.clocks) + sum(1 for c in self._contrib if c.worker not in self.clocks)
        return max(1, live - self.backup_workers)

    def _fold(self, final: bool = False) -> None:
        """Sum held gradients into the step's accumulator in worker-id order. The lowest held id is added
        once no live worker with a lower id can still push for this step, so that the sum's order (and so
        its rounding) never depends on arrival order; memory holds only the gradients that arrived early.
        This is the Σ of the update rule (paramserver/update.py)."""
        while self._held:
            w = min(self._held)
            if not final and any(x < w and c <= self.step for x, c in self.clocks.items()):
                return
            self._acc = self.store.accumulate(self._acc, self._held.pop(w))

    def _maybe_complete_step(self) -> bool:
        if self.mode != "sync" or not self._contrib:
            return False
        waiting = [w for w, c in self.clocks.items() if c <= self.step]  # live, not yet pushed
        if self.follower:
            # complete when every live worker has pushed or skipped (each one's fate was decided by shard 0),
            # or as soon as all the gradients shard 0 applied for this step are here
            done = {c.worker for c in self._contrib}
            if waiting and not (self._members is not None and self._members <= done):
                return False
        elif waiting and len(self._contrib) < self.needed():
            return False
        self._fold(final=True)
        self._last_members = sorted(c.worker for c in self._contrib)
        self._members = None
        scale, lr_scale = step_scales(self.mode, self.aggregate, len(self._contrib))   # mean: the sum times 1/k
        acc, contrib = self._acc, self._contrib
        self._acc, self._contrib = None, []
        self.step += 1
        self._apply(acc, contrib, scale, lr_scale)
        return True

    def _apply(self, grads, contributions: list[Contribution], scale: float = 1.0, lr_scale: float = 1.0) -> None:
        version = self.store.version
        for c in contributions:
            c.staleness = version - c.base_version
        t0 = time.perf_counter()
        self.store.apply(grads, scale, lr_scale)
        self.apply_s += time.perf_counter() - t0
        self.counters["applied"] += len(contributions)
        self.counters["updates"] += 1
        self.on_update(self.store.version, contributions)

    # -- checkpoint ---------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {"step": self.step, "clocks": {str(w): c for w, c in self.last_clock.items()},
                "counters": dict(self.counters), "pending_gradients": self.pending_gradients}

    def load_state_dict(self, sd: Mapping) -> None:
        self.step = int(sd.get("step", 0))
        self.last_clock = {int(w): int(c) for w, c in sd.get("clocks", {}).items()}
        self.counters = Counter(sd.get("counters", {}))
        # gradients summed for an unfinished sync step are not in the checkpoint: the step is redone
        if sd.get("pending_gradients"):
            self.counters["dropped:restart"] += int(sd["pending_gradients"])

