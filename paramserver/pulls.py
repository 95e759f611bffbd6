"""Pulls: answering a worker's request for theta, now or once the consistency policy allows it.

This part owns the held pulls (`pending`: worker -> (route, request, since)) that the policy holds
back (a pull waiting at the sync barrier, the staleness bound, the start gate or a resume) and
answers them as soon as `policy.pull_ready` says so; it builds the PARAMS reply (theta's snapshot
in the wire dtype asked for, the clock granted, a divergence sample when one is due) and keeps at
most one PARAMS per worker in ZeroMQ's queue, so a client that never reads pins one snapshot.

Usage::

    pulls = Pulls(cfg, store, policy, sessions, divergence, record, phases, send=server._send)
    reply = pulls.answer(identity, msg, state)    # PARAMS now, or None: held
    pulls.serve()                                  # after every message and sweep
"""
from __future__ import annotations

import logging
import time
from typing import Callable

from common.config import ServerConfig
from common.protocol import WIRE_DTYPES, Message, MsgType
from paramserver.consistency import Consistency
from paramserver.divergence import Divergence
from paramserver.metrics import PhaseTimes, ServerMetrics
from paramserver.sessions import Sessions, WorkerState
from paramserver.store import ParamStore

log = logging.getLogger("paramserver.server.pulls")   # (under the server's: its level applies)


class Pulls:
    """Held pulls and PARAMS replies (see the module docstring)."""

    def __init__(self, cfg: ServerConfig, store: ParamStore, policy: Consistency, sessions: Sessions,
                 divergence: Divergence, record: ServerMetrics, phases: PhaseTimes, send: Callable):
        self.cfg, self.store, self.policy, self.sessions = cfg, store, policy, sessions
        self.divergence, self.record, self.phases, self._send = divergence, record, phases, send
        self.pending: dict[int, tuple[bytes, Message, float]] = {}   # worker -> held pull
        self._last_why = ""      # the last reason logged for holding pulls

    @property
    def finished(self) -> bool:
        """The --max-gradients budget is spent: workers are told to stop."""
        return 0 < self.cfg.max_gradients <= self.policy.counters["applied"]

    def stop_reply(self, msg: Message) -> Message:
        return Message(MsgType.PARAMS, worker=msg.worker, seq=msg.seq, version=self.store.version,
                       meta={"stop": True, "reason": f"{self.cfg.max_gradients} gradients applied"})

    def answer(self, identity: bytes, msg: Message, state: WorkerState) -> Message | None:
        """A checked PULL of a live worker: PARAMS now (or the stop answer), else None and the pull is held."""
        if self.finished:
            return self.stop_reply(msg)
        # at most one PARAMS per worker in ZeroMQ's queue: a client that never reads pins one snapshot, not many
        if self.policy.pull_ready(msg.worker) and not self.in_flight(state):
            return self.params_reply(msg, 0.0)
        if msg.worker not in self.pending:
            self.pending[msg.worker] = (identity, msg, time.monotonic())
            self.say_why_waiting()
        return None

    def reroute(self, identity: bytes, msg: Message) -> bool:
        """A resend of a held pull: answer it on the newest route (True), else False."""
        held = self.pending.get(msg.worker)
        if held and held[1].seq == msg.seq:
            self.pending[msg.worker] = (identity, held[1], held[2])
            return True
        return False

    def say_why_waiting(self) -> None:
        """Log (once per cause) why pulls are being held when it is not the ordinary barrier."""
        live = len(self.policy.clocks)
        if self.policy.awaiting:   # a resumed server waits for the workers of its checkpoint
            level = logging.INFO
            why = (f"resumed: holding pulls until workers {', '.join(map(str, sorted(self.policy.awaiting)))} "
                   f"re-register (or --worker-timeout {self.cfg.worker_timeout:g}s passes)")
        elif not self.policy.started:   # routine at start-up
            level = logging.INFO
            why = f"waiting for {self.cfg.num_workers} workers to register ({len(self.policy.joined)} so far)"
        elif self.cfg.mode == "sync" and live < self.cfg.min_workers:
            level = logging.WARNING
            why = f"holding all pulls: {live} live workers, below --min-workers {self.cfg.min_workers}"
        else:
            return
        if why != self._last_why:
            self._last_why = why
            log.log(level, why)

    def params_reply(self, msg: Message, waited: float) -> Message:
        clock = self.policy.grant_clock(msg.worker)
        self.record.record_grant(msg.worker, clock, self.policy.min_clock(), waited)
        wire = msg.meta.get("wire", "fp32")
        if wire not in WIRE_DTYPES:
            wire = "fp32"   # (checked in Server._on_pull; a held pull was checked when it arrived)
        with self.phases.phase("snapshot"):
            version, theta = self.store.snapshot(wire)
        self.divergence.on_pull(msg.worker, version)
        return Message(MsgType.PARAMS, worker=msg.worker, seq=msg.seq, clock=clock, version=version,
                       tensors=theta, snapshot=(version, wire),
                       meta={"wait_s": waited, "min_clock": self.policy.min_clock()})

    def in_flight(self, state: WorkerState) -> bool:
        """Is this worker's last PARAMS still in ZeroMQ's hands? Over inproc (a client in this process) the
        receiver holds the server's own buffers for as long as it keeps the reply, so there is nothing queued
        to bound there and the gate would only stall it."""
        return not self.cfg.bind.startswith("inproc://") and state.params_in_flight()

    def deferred_since(self) -> float | None:
        """When the oldest pull that is ready but held for an in-flight PARAMS arrived (None: there is none)."""
        times = [since for w, (_, _, since) in self.pending.items()
                 if self.in_flight(self.sessions.workers[w]) and self.policy.pull_ready(w)]
        return min(times) if times else None

    def send_params(self, worker: int, identity: bytes, reply: Message) -> None:
        """Send a PARAMS reply and remember it until ZeroMQ has sent it (see `answer`)."""
        tracker = self._send(identity, reply, track=True)
        state = self.sessions.workers.get(worker)
        if state is not None:
            state.params_tracker = tracker

    def serve(self) -> None:
        """Answer the held pulls the policy now allows (or tell them to stop: the budget is spent)."""
        for worker, (identity, msg, since) in list(self.pending.items()):
            if self.finished:
                del self.pending[worker]
                self._send(identity, self.stop_reply(msg))
            elif self.policy.pull_ready(worker) and not self.in_flight(self.sessions.workers[worker]):
                del self.pending[worker]
                self.send_params(worker, identity, self.params_reply(msg, time.monotonic() - since))
