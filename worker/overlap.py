"""Communication overlapped with computation (worker --overlap): a wrapper around PSClient or ShardedClient.

* push returns at once: the push runs in a background thread while the worker goes on (metrics,
  evaluation, preparing the next batch); the next pull first waits for that push's ACK. The push
  and the pull go out in that order on the same connection(s), so the server sees exactly what it
  sees without overlap: sync and ssp give the same theta, bit for bit.
* async only: the next theta is fetched while the current gradient is computed (prefetch). That
  theta lacks this worker's own last gradient (one more version of staleness), which async allows
  and ssp's clock would not, so ssp and sync never prefetch.

A pushed gradient is read by the background push (zero-copy, by ZeroMQ's I/O thread) until its ACK comes.
Without prefetch the next pull waits for that ACK, and the worker computes the next gradient only after
that pull, so the push sends the caller's arrays as they are. With prefetch the next pull returns at once
and the worker then zeroes and refills its `.grad` buffers while the push may still be reading them, so the
gradient is first copied into buffers of this client's own (one set, reused: a push waits for the last).

The ACK that `push` returns says status "sent"; the server's answer (applied, dropped, stop) is
taken by the next pull, which returns a stop reply when the push said stop.

Usage::

    ps = OverlapClient(PSClient(address, worker=0)); ps.register(init=params)
    p = ps.pull(); ps.push(grads, version=p.version, clock=p.clock)   # returns before the ACK
"""
from __future__ import annotations

import dataclasses
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Mapping

import numpy as np

from common.int8 import Int8Blocks
from common.protocol import Encoded, Message, MsgType


class OverlapClient:
    def __init__(self, inner):
        self.inner = inner
        # every call to the inner client goes through this one thread: its sockets stay in one thread
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="ps-overlap")
        self._push: Future | None = None
        self._prefetch: Future | None = None
        self.prefetch = False
        self.last_ack: Message | None = None
        self._owned: dict[str, np.ndarray] = {}   # prefetch: the copy of the gradient in flight
        self._returned: Message | None = None      # the last pull reply handed to the caller

    def _call(self, fn, *args, **kwargs):
        return self._pool.submit(fn, *args, **kwargs).result()

    def __enter__(self) -> "OverlapClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def stats(self) -> dict:
        return self.inner.stats

    @property
    def server_timeout(self) -> float:
        return self.inner.server_timeout

    @server_timeout.setter
    def server_timeout(self, value: float) -> None:
        self.inner.server_timeout = value

    @property
    def request_timeout(self) -> float:
        return self.inner.request_timeout

    @request_timeout.setter
    def request_timeout(self, value: float) -> None:
        self.inner.request_timeout = value

    @property
    def worker(self) -> int:
        return self.inner.worker

    def register(self, init: Mapping[str, np.ndarray] | None = None, job: dict | None = None) -> Message:
        welcome = self._call(self.inner.register, init, job)
        self.prefetch = welcome.meta.get("mode") == "async"
        return welcome

    def _settle(self) -> Message | None:
        """Wait for the push in flight; its ACK when it asked the worker to stop."""
        if self._push is None:
            return None
        ack, self._push = self._push.result(), None
        self.last_ack = ack
        return ack if ack.meta.get("stop") else None

    def pull(self, clock: int = 0, raw: bool = False) -> Message:
        """As the inner client's, `raw` passed on (a prefetched pull was asked with the `raw` of the call
        before: its 16-bit values are widened here if this call is not raw)."""
        kw = {"raw": raw}
        if self._prefetch is not None:
            fut, self._prefetch = self._prefetch, None
            reply = fut.result()
            if not raw and any(isinstance(t, Encoded) for t in reply.tensors.values()):
                reply = dataclasses.replace(reply, tensors={n: t.to_float32() if isinstance(t, Encoded) else t
                                                            for n, t in reply.tensors.items()})
        else:
            stop = self._settle()
            if stop is not None:
                return Message(MsgType.PARAMS, worker=stop.worker, seq=stop.seq, version=stop.version,
                               meta={"stop": True, "reason": "the server said stop in its last ACK"})
            reply = self._call(self.inner.pull, clock, **kw)
        if self.prefetch and not reply.meta.get("stop"):
            self._prefetch = self._pool.submit(self.inner.pull, clock, **kw)   # goes out before the next push
        self._returned = reply
        return reply

    def push(self, grads: Mapping[str, np.ndarray], version: int, clock: int, **meta) -> Message:
        stop = self._settle()
        if stop is not None:
            return stop
        grads = self._own(grads) if self.prefetch else dict(grads)
        shards = self._returned.meta.get("shards") if self._returned is not None else None
        if shards:   # a ShardedClient: each shard's tags of the pull this gradient was computed on (not the prefetch's)
            meta["pulled"] = shards
        self._push = self._pool.submit(self.inner.push, grads, version, clock, **meta)
        return Message(MsgType.ACK, worker=self.worker, clock=clock, version=version, meta={"status": "sent"})

    def _own(self, grads: Mapping) -> dict:
        """The gradient copied into this client's buffers (the last push is settled: they are free)."""
        out = {}
        for name, g in grads.items():
            if isinstance(g, Int8Blocks):   # its values and scales, each into a buffer of their own
                q, s = self._copy(name, g.q), self._copy(name + "\0scales", g.scales)
                out[name] = Int8Blocks(q, s, g.phase)
                continue
            buf = self._copy(name, g.bits if isinstance(g, Encoded) else np.asarray(g))
            out[name] = Encoded(buf, g.wire) if isinstance(g, Encoded) else buf
        return out

    def _copy(self, key: str, src: np.ndarray) -> np.ndarray:
        buf = self._owned.get(key)
        if buf is None or buf.shape != src.shape or buf.dtype != src.dtype:
            buf = self._owned[key] = np.empty_like(src)
        np.copyto(buf, src)
        return buf

    def leave(self, reason: str = "done") -> None:
        try:
            self._settle()
            if self._prefetch is not None:
                self._prefetch.result()
                self._prefetch = None
        finally:
            self._call(self.inner.leave, reason)

    def status(self):
        return self._call(self.inner.status)

    def close(self) -> None:
        """Close the inner client (in its thread). Safe to call twice."""
        if self._pool is None:
            return
        for fut in (self._push, self._prefetch):
            if fut is not None:
                fut.cancel()
        self._call(self.inner.close)
        self._pool.shutdown(wait=True)
        self._pool = None
