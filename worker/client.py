"""The push/pull client: named tensors in, named tensors out, over a DEALER socket.

Every request has a sequence number; a request that gets no reply within `request_timeout`
is sent again with exponential backoff (the server answers each sequence number once, so a
resend never applies a gradient twice). The client gives up only when the server has been
silent, heartbeats included, for `server_timeout`. When the server says it does not know this
worker (it restarted, or declared this worker dead) the client registers again on its own and
retries the request, so training continues where it was.

Usage::

    with PSClient("tcp://127.0.0.1:5555", worker=0) as ps:
        welcome = ps.register(init=model_params)
        params = ps.pull()                 # Reply: .tensors, .version, .clock
        ps.push(grads, version=params.version, clock=params.clock, loss=2.3)
"""
from __future__ import annotations

import logging
import random
import threading
import time
from typing import Mapping

import numpy as np
import zmq

from common.protocol import WIRE_DTYPES, Message, MsgType, decode, encode, encode_wire
from common.security import client_curve

log = logging.getLogger("worker.client")


class ServerError(RuntimeError):
    """The server answered with an ERROR reply."""

    def __init__(self, code: str, text: str):
        super().__init__(f"server refused the request ({code}): {text}")
        self.code = code


class ServerUnavailable(RuntimeError):
    """The server has not answered for longer than server_timeout."""


class PSClient:
    def __init__(self, server: str, worker: int = -1, request_timeout: float = 2.0, server_timeout: float = 120.0,
                 heartbeat: float = 0.0, context: zmq.Context | None = None, drop: float = 0.0,
                 duplicate: float = 0.0, fault_seed: int = 0, curve_server: str = "", curve_secret: str = "",
                 wire_dtype: str = "fp32"):
        if wire_dtype not in WIRE_DTYPES:
            raise ValueError(f"unknown --wire-dtype {wire_dtype!r}; choose one of {', '.join(WIRE_DTYPES)}")
        self.server, self.worker = server, worker
        self.wire_dtype = wire_dtype   # how float32 gradients go out and theta comes back
        self._wire_out: dict[str, np.ndarray] = {}   # 16-bit push buffers, reused
        self.curve = (curve_secret, curve_server) if curve_server else None
        self.request_timeout, self.server_timeout = request_timeout, server_timeout
        self.ctx = context or zmq.Context.instance()
        self.sock = self._connect()
        self.seq = 0
        self.last_heard = time.monotonic()
        self.registered = False
        self._register_args: tuple = ()
        self.stats = {"requests": 0, "resends": 0, "reregistrations": 0, "dropped_by_fault": 0}
        # fault injection for tests: drop this fraction of requests and replies, duplicate requests
        self._drop, self._dup, self._rng = drop, duplicate, random.Random(fault_seed)
        self._hb_stop = threading.Event()
        self._hb_thread = None
        if heartbeat > 0:
            self._hb_thread = threading.Thread(target=self._heartbeat_loop, args=(heartbeat,), daemon=True)

    def _connect(self) -> zmq.Socket:
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        if self.curve:
            client_curve(sock, *self.curve)
        sock.connect(self.server)
        return sock

    def __enter__(self) -> "PSClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Stop heartbeats and close the socket. Safe to call twice."""
        self._hb_stop.set()
        if self._hb_thread is not None and self._hb_thread.is_alive():
            self._hb_thread.join(timeout=5)
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    # -- the verbs ----------------------------------------------------------------------------

    def register(self, init: Mapping[str, np.ndarray] | None = None, job: dict | None = None) -> Message:
        """Say hello (with this worker's initial parameters); returns the WELCOME reply."""
        self._register_args = (init, job)
        reply = self._request(Message(MsgType.REGISTER, tensors=dict(init or {}), meta={"job": job or {}}),
                              reregister=False)
        self.worker = reply.worker
        self.registered = True
        if self._hb_thread is not None and not self._hb_thread.is_alive():
            self._hb_thread.start()
        return reply

    def pull(self, clock: int = 0, raw: bool = False) -> Message:
        """theta by name at the version the consistency policy allows (may wait at a barrier). It travels
        in this client's wire dtype; `raw`: 16-bit tensors stay `Encoded` (else they are widened to float32)."""
        meta = {"wire": self.wire_dtype} if self.wire_dtype != "fp32" else {}
        return self._request(Message(MsgType.PULL, clock=clock, meta=meta), raw=raw)

    def push(self, grads: Mapping[str, np.ndarray], version: int, clock: int, **meta) -> Message:
        """Send gradients computed on theta `version` for `clock`; returns the ACK (meta: status, reason).
        float32 gradients go in this client's wire dtype; `Encoded` ones as they are."""
        tensors = dict(grads)
        if self.wire_dtype != "fp32":   # narrow into buffers kept for the next push (free once it is answered)
            for name, g in tensors.items():
                if isinstance(g, np.ndarray) and g.dtype == np.float32:
                    out = self._wire_out.get(name)
                    if out is None or out.shape != g.shape:
                        out = None
                    tensors[name] = encode_wire(g, self.wire_dtype, out=out)
                    self._wire_out[name] = tensors[name].bits
        return self._request(Message(MsgType.PUSH, clock=clock, version=version, tensors=tensors, meta=meta,
                                     wire=self.wire_dtype))

    def leave(self, reason: str = "done") -> None:
        """Leave the job: the server stops waiting for this worker."""
        if self.registered:
            self._request(Message(MsgType.LEAVE, meta={"reason": reason}), reregister=False)
            self.registered = False

    def status(self) -> dict:
        return self._request(Message(MsgType.STATUS), reregister=False).meta

    def shutdown(self) -> None:
        self._request(Message(MsgType.SHUTDOWN), reregister=False)

    # -- plumbing -----------------------------------------------------------------------------

    def _send(self, frames) -> None:
        if self._drop and self._rng.random() < self._drop:
            self.stats["dropped_by_fault"] += 1
            return   # injected loss: the resend path must recover
        for _ in range(2 if self._dup and self._rng.random() < self._dup else 1):
            try:
                self.sock.send_multipart(frames, copy=False, flags=zmq.NOBLOCK)
            except zmq.Again:
                pass  # queue full while the server is away: the resend will try again

    def _request(self, msg: Message, reregister: bool = True, raw: bool = False) -> Message:
        self.seq += 1
        msg.seq, msg.worker = self.seq, self.worker
        frames = encode(msg)
        self.stats["requests"] += 1
        self._send(frames)
        timeout = self.request_timeout
        first_sent = sent_at = time.monotonic()
        while True:
            if self.sock.poll(int(min(timeout, 1.0) * 1000)):
                reply = decode(self.sock.recv_multipart(copy=False), raw=raw)
                self.last_heard = time.monotonic()
                if self._drop and self._rng.random() < self._drop:
                    self.stats["dropped_by_fault"] += 1
                    continue   # injected loss of the reply: the resend must be answered from the first handling
                if reply.seq != msg.seq:
                    continue   # the answer to an earlier resend
                if reply.type == MsgType.ERROR:
                    code = reply.meta.get("code", "error")
                    if code == "unknown_worker" and reregister and self._register_args:
                        self.stats["reregistrations"] += 1
                        log.warning("server does not know worker %d (restarted?): registering again", self.worker)
                        self.register(*self._register_args)
                        return self._request(msg, reregister=False, raw=raw)
                    raise ServerError(code, reply.meta.get("error", ""))
                return reply
            now = time.monotonic()
            if now - max(self.last_heard, first_sent) > self.server_timeout:
                raise ServerUnavailable(f"no answer from {self.server} for {self.server_timeout:.0f}s "
                                        f"({msg.type.name}); is the server running?")
            if now - sent_at >= timeout:
                self.stats["resends"] += 1
                self._send(frames)
                sent_at = now
                timeout = min(timeout * 2, 8 * self.request_timeout)

    def _heartbeat_loop(self, interval: float) -> None:
        sock = self._connect()
        try:
            while not self._hb_stop.wait(interval):
                if not self.registered:
                    continue
                sock.send_multipart(encode(Message(MsgType.HEARTBEAT, worker=self.worker)), flags=zmq.NOBLOCK)
                while sock.poll(0):
                    sock.recv_multipart()
                    self.last_heard = time.monotonic()
        except zmq.ZMQError:
            pass
        finally:
            sock.close()
