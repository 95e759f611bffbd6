"""Pushes: a gradient's way from a checked PUSH to the consistency policy.

This part checks a pushed gradient against theta (names, shapes, dtypes, NaN/Inf; a gradient that
does not fit is counted as received and dropped:invalid and refused), widens 16-bit values where
the step holds them (sync), drops it once the --max-gradients budget is spent, measures its
divergence, and hands it to the policy; a PUSH with skip (shards with backup workers: shard 0
dropped this worker's gradient) only moves the worker past the step. Admission (who may send)
and the worker's record are the server's and its sessions' business, not this part's.

Usage::

    pushes = Pushes(cfg, store, policy, divergence, phases, finished=lambda: pulls.finished)
    ack = pushes.gradient(msg)      # ACK with status applied / accumulated / dropped
"""
from __future__ import annotations

from typing import Callable

from common.config import ServerConfig
from common.protocol import Message, MsgType
from paramserver.consistency import Consistency
from paramserver.divergence import Divergence
from paramserver.metrics import PhaseTimes
from paramserver.sessions import RequestError
from paramserver.store import ParamStore
from paramserver.transport import widen


class Pushes:
    """Gradients on their way to the policy (see the module docstring)."""

    def __init__(self, cfg: ServerConfig, store: ParamStore, policy: Consistency, divergence: Divergence,
                 phases: PhaseTimes, finished: Callable[[], bool]):
        self.cfg, self.store, self.policy, self.divergence, self.phases = cfg, store, policy, divergence, phases
        self.finished = finished   # the --max-gradients budget is spent

    def gradient(self, msg: Message) -> Message:
        """Handle a PUSH's gradient (or its skip): the ACK, or RequestError for a gradient that does not fit."""
        if msg.meta.get("skip") is True and not msg.tensors:
            # shards + backup workers: shard 0 dropped this worker's gradient for the step, so this shard
            # must not use it either; the worker only passes the step (see ShardedClient.push)
            if self.cfg.mode != "sync":
                raise RequestError("bad_request", "a PUSH with skip (shard 0 dropped the gradient) only applies to "
                                   f"--mode sync; this server runs --mode {self.cfg.mode}")
            with self.phases.phase("update"):   # (it may complete the step)
                result = self.policy.skip(msg.worker, msg.clock)
            return Message(MsgType.ACK, worker=msg.worker, seq=msg.seq, clock=msg.clock, version=result.version,
                           meta={"status": result.status, "reason": result.reason, "stop": self.finished()})
        with self.phases.phase("check"):
            try:   # (16-bit wire values are checked as they are: widening is exact, and only a gradient that fits is)
                self.store.check_gradient(msg.tensors, msg.checked)
            except ValueError as exc:
                self.policy.counters["received"] += 1   # (gradients are the policy's to count, dropped ones too)
                self.policy.counters["dropped:invalid"] += 1
                raise RequestError("bad_gradient", str(exc)) from None
            if self.cfg.mode == "sync":   # held until the step is complete: float32 copies of its own
                widen(msg)
        # (ssp/async apply it at once: 16-bit wire values go to the store as they are, which adds them for plain
        # SGD and widens them a slice at a time for the fused optimizers, see ParamStore.apply)
        if self.finished():   # the budget is spent: nothing more is applied
            self.policy.counters["received"] += 1
            self.policy.counters["dropped:budget"] += 1
            return Message(MsgType.ACK, worker=msg.worker, seq=msg.seq, clock=msg.clock, version=self.store.version,
                           meta={"status": "dropped", "reason": "the --max-gradients budget is spent", "stop": True})
        meta = {k: msg.meta[k] for k in ("loss",) if isinstance(msg.meta.get(k), (int, float))}
        with self.phases.phase("divergence"):
            meta["divergence"] = self.divergence.measure(msg.worker, msg.version)
        with self.phases.phase("update"):
            result = self.policy.push(msg.worker, msg.clock, msg.tensors, msg.version, meta,
                                      members=msg.meta.get("members"))   # shards + backups: shard 0's step set
        return Message(MsgType.ACK, worker=msg.worker, seq=msg.seq, clock=msg.clock, version=result.version,
                       meta={"status": result.status, "reason": result.reason, "stop": self.finished(),
                             **({"members": result.members} if result.members is not None else {})})
