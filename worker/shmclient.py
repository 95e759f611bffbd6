"""PSClient over the same-host shared-memory transport (common/shm.py), with the socket as fallback.

It offers shared memory in REGISTER; if the server's WELCOME names a segment this process can open
(same host, same /dev/shm, the server's token inside), pulls ask for theta through it and pushes
write the gradient into this worker's own segment, so only small messages cross the socket.
Otherwise, or if the server cannot read this worker's segment, everything goes over the socket.

Usage::

    with ShmClient("tcp://127.0.0.1:5555", worker=0) as ps:     # same verbs as PSClient
        ps.register(init=params); p = ps.pull(); ps.push(grads, version=p.version, clock=p.clock)
"""
from __future__ import annotations

import logging
from typing import Mapping

import numpy as np

from common.int8 import Int8Blocks
from common.protocol import Encoded, Message, MsgType
from common.shm import GradientWriter, ThetaReader
from worker.client import PSClient, ServerError

log = logging.getLogger("worker.shmclient")


class ShmClient(PSClient):
    def __init__(self, server: str, worker: int = -1, **kwargs):
        super().__init__(server, worker, **kwargs)
        self.reader: ThetaReader | None = None
        self.writer: GradientWriter | None = None
        self.push_shm = True          # False once the server could not read our gradient segment
        # bytes copied through shared memory (float32 gradients written, theta read), apart from the socket's
        self.stats.update(shm_pulls=0, shm_pushes=0, shm_repulls=0, shm_bytes_pushed=0, shm_bytes_pulled=0)

    def register(self, init: Mapping[str, np.ndarray] | None = None, job: dict | None = None,
                 meta: dict | None = None) -> Message:
        reply = super().register(init, job, {**(meta or {}), "shm_offer": True})
        if self.reader is not None:
            self.reader.close()
        self.reader = ThetaReader.attach(reply.meta.get("shm"))
        if self.reader is None and reply.meta.get("shm"):
            log.info("server %s is not on this host (its shared memory cannot be opened): using the socket",
                     self.server)
        return reply

    @property
    def transport(self) -> str:
        return "shm" if self.reader is not None else "tcp"

    def pull(self, clock: int = 0, raw: bool = False) -> Message:
        if self.reader is None:
            return super().pull(clock, raw=raw)
        reply = self._request(Message(MsgType.PULL, clock=clock, meta={"shm": True}))
        ref = reply.meta.get("shm")
        if ref is None:
            return reply            # a stop, or the server answered over the socket
        theta = self.reader.read(ref) if self.reader is not None else None
        if theta is None:          # the slot was rewritten before we copied it: ask over the socket
            self.stats["shm_repulls"] += 1
            return super().pull(clock, raw=raw)
        self.stats["shm_pulls"] += 1
        self.stats["shm_bytes_pulled"] += sum(t.nbytes for t in theta.values())
        reply.tensors = theta
        return reply

    def push(self, grads: Mapping[str, np.ndarray], version: int, clock: int, **meta) -> Message:
        if self.reader is None or not self.push_shm:
            return super().push(grads, version, clock, **meta)
        if self.writer is None:
            try:   # 16-bit wire values (--wire-dtype) are written widened, int8 ones (--compress) dequantized: no
                # socket to save bytes on here (the worker's error feedback is the same: D(C(g + e)) is what arrives)
                self.writer = GradientWriter({n: ["float32" if isinstance(g, (Encoded, Int8Blocks))
                                                  else np.asarray(g).dtype.name,
                                                  list(np.shape(g))] for n, g in grads.items()})
            except OSError as exc:   # /dev/shm full or not writable
                log.warning("no shared memory for gradients (%s): pushing over the socket", exc.strerror or exc)
                self.push_shm = False
                return super().push(grads, version, clock, **meta)
        ref = self.writer.write(grads)
        try:
            ack = self._request(Message(MsgType.PUSH, clock=clock, version=version, meta={**meta, "shm": ref}))
        except ServerError as exc:
            if exc.code != "bad_shm":
                raise
            log.warning("the server cannot read this worker's shared memory (%s): pushing over the socket", exc)
            self.push_shm = False
            return super().push(grads, version, clock, **meta)
        self.stats["shm_pushes"] += 1
        self.stats["shm_bytes_pushed"] += sum(np.dtype(d).itemsize * int(np.prod(s)) for _, d, s, _ in self.writer.specs)
        return ack

    def close(self) -> None:
        super().close()
        for part in (self.reader, self.writer):
            if part is not None:
                part.close()
        self.reader = self.writer = None
