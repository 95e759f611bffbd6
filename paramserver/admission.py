"""Push admission (--max-pushes-in-flight): how many workers may send a gradient at once.

ZeroMQ receives every message whole, so the only way to bound the gradients in the server's memory
is to have workers ask first (a PUSH with meta reserve and no tensors). This part owns the slots
(workers allowed to send now) and the queue (workers waiting, with their held reservation); it
grants a slot through the `grant` callback the server gives it (which sends the reply and caches
it as the answer to the reservation). In sync mode the lowest waiting id goes first, which is
the order the step sums gradients in.

Usage::

    admission = Admission(cfg, events, grant=lambda worker, identity, msg: ...)
    reply = admission.reserve(identity, msg)    # "reserved" ACK now, or None: queued
    admission.release(msg.worker)               # its gradient was handled: the next one may send
"""
from __future__ import annotations

import logging
import time
from collections import Counter
from typing import Callable

from common.config import ServerConfig
from common.protocol import RESERVE_MIN_BYTES, Message, MsgType, wire_bytes

log = logging.getLogger("paramserver.server.admission")   # (under the server's: its level applies)


class Admission:
    """Push slots and the queue of reservations waiting for one (see the module docstring)."""

    def __init__(self, cfg: ServerConfig, events: Counter, grant: Callable[[int, bytes, Message], None]):
        self.cfg, self.events, self._grant = cfg, events, grant
        self.slots: dict[int, float] = {}                            # worker -> when it was admitted
        self.queue: dict[int, tuple[bytes, Message, float]] = {}     # worker -> its held reservation
        self.handling = False   # a message is being handled: slots freed meanwhile are granted after it

    @property
    def limit(self) -> int:
        return self.cfg.max_pushes_in_flight

    def reserve(self, identity: bytes, msg: Message) -> Message | None:
        """A worker asks to send a gradient. At most --max-pushes-in-flight workers may at once; the others
        wait here and are answered in turn (None: queued)."""
        if self.limit <= 0 or msg.worker in self.slots or len(self.slots) < self.limit:
            self.slots[msg.worker] = time.monotonic()
            return self.reserved(msg)
        self.queue[msg.worker] = (identity, msg, time.monotonic())
        return None

    @staticmethod
    def reserved(msg: Message) -> Message:
        """The answer that admits a reservation."""
        return Message(MsgType.ACK, worker=msg.worker, seq=msg.seq, clock=msg.clock, meta={"status": "reserved"})

    def count_unadmitted(self, msg: Message) -> None:
        """A large gradient pushed without asking first (a client that does not reserve): not bounded, counted."""
        if (self.limit > 0 and msg.worker not in self.slots and msg.tensors
                and wire_bytes(msg.tensors) >= RESERVE_MIN_BYTES):
            self.events["unadmitted_pushes"] += 1

    def reroute(self, identity: bytes, msg: Message) -> bool:
        """A resent reservation still waiting: answer it on the newest route (True), else False."""
        queued = self.queue.get(msg.worker)
        if queued and queued[1].seq == msg.seq:
            self.queue[msg.worker] = (identity, queued[1], queued[2])
            return True
        return False

    def release(self, worker: int) -> None:
        """The worker's slot is free (its gradient came, it is gone, or it let the slot lapse): admit the next
        (while a message is being handled: once it is done and its buffers are let go of, see Server._handle)."""
        self.slots.pop(worker, None)
        if not self.handling:
            self.admit_waiting()

    def drop(self, worker: int) -> None:
        """The worker (or its connection) is gone: its waiting reservation and its slot, if any, go too."""
        self.queue.pop(worker, None)
        self.release(worker)

    def admit_waiting(self) -> None:
        """Tell workers waiting for a push slot to send, while slots are free."""
        while self.queue and (self.limit <= 0 or len(self.slots) < self.limit):
            nxt = min(self.queue) if self.cfg.mode == "sync" else next(iter(self.queue))
            identity, msg, _ = self.queue.pop(nxt)
            self.slots[nxt] = time.monotonic()
            self._grant(nxt, identity, msg)

    def sweep(self, now: float) -> None:
        """A slot not used within --worker-timeout (the worker crashed or changed its mind) is given back."""
        for worker, since in list(self.slots.items()):
            if now - since > self.cfg.worker_timeout:
                log.warning("worker %d reserved a push %.1fs ago and sent none: slot given back", worker, now - since)
                self.release(worker)

    def status(self) -> dict:
        return {"in_use": len(self.slots), "waiting": len(self.queue), "limit": self.limit}
