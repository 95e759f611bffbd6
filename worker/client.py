"""The push/pull client: named tensors in, named tensors out, over a DEALER socket.

Every request has a sequence number; a request that gets no reply within `request_timeout`
is sent again with exponential backoff (the server answers each sequence number once, so a
resend never applies a gradient twice). The client gives up only when the server has been
silent, heartbeats included, for `server_timeout`. When the server says it does not know this
worker (it restarted, or declared this worker dead) the client registers again on its own and
retries the request under its original sequence number, so the server recognises a request it
has already applied (its answer is kept across the re-registration) and training continues where
it was. Both sockets of a client carry one random session id in their routing ids: the server
binds the worker id to it, and refuses that worker id from any other connection.

`stats` counts the bytes of every message as it crosses the socket (all frames, header included):
bytes_sent / bytes_received for every request and reply, bytes_pushed for PUSH requests (each resend
again) and bytes_pulled for replies that carry theta (PARAMS, WELCOME); heartbeats are not counted.
With a `link` (worker/link.py, --link-mbps: an emulated link) every request and reply is paced and
the seconds charged are added up in link_s.

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

from common.protocol import (RESERVE_MIN_BYTES, ROLE_HEARTBEAT, ROLE_REQUESTS, WIRE_DTYPES, Message, MsgType, decode,
                             encode, encode_wire, frames_bytes, new_session, routing_id, wire_bytes)
from common.security import client_curve
from common.tuning import ReusedBuffers

log = logging.getLogger("worker.client")


#: seconds between the "no answer from ...; still trying" lines while the server is silent
SILENCE_EVERY = 5.0


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
                 wire_dtype: str = "fp32", link=None):
        if wire_dtype not in WIRE_DTYPES:
            raise ValueError(f"unknown --wire-dtype {wire_dtype!r}; choose one of {', '.join(WIRE_DTYPES)}")
        self.server, self.worker = server, worker
        self.wire_dtype = wire_dtype   # how float32 gradients go out and theta comes back
        self._wire_out: dict[str, np.ndarray] = {}   # 16-bit push buffers, reused
        # a pulled tensor over 24 MiB comes in chunks, joined into a reused buffer (the caller still holds the
        # last pull's theta while the next arrives; async prefetch may hold one more)
        self._joined = ReusedBuffers(keep=3)
        self.curve = (curve_secret, curve_server) if curve_server else None
        self.request_timeout, self.server_timeout = request_timeout, server_timeout
        self.ctx = context or zmq.Context.instance()
        self.session = new_session()
        self.sock = self._connect(ROLE_REQUESTS)
        self.seq = 0
        self.last_heard = time.monotonic()
        self.registered = False
        self.push_slots = 0   # the server admits this many senders of gradients at once (0: no limit, no asking)
        self._register_args: tuple = ()
        self.stats = {"requests": 0, "resends": 0, "reregistrations": 0, "dropped_by_fault": 0, "bytes_sent": 0,
                      "bytes_received": 0, "bytes_pushed": 0, "bytes_pulled": 0, "link_s": 0.0}
        self.link = link   # an emulated link (worker/link.py Link), shared by a worker's shard connections
        # fault injection for tests: drop this fraction of requests and replies, duplicate requests
        self._drop, self._dup, self._rng = drop, duplicate, random.Random(fault_seed)
        self._hb_stop = threading.Event()
        self._hb_thread = None
        if heartbeat > 0:
            self._hb_thread = threading.Thread(target=self._heartbeat_loop, args=(heartbeat,), daemon=True)

    def _connect(self, role: bytes) -> zmq.Socket:
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.ROUTING_ID, routing_id(self.session, role))
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

    def register(self, init: Mapping[str, np.ndarray] | None = None, job: dict | None = None,
                 meta: dict | None = None) -> Message:
        """Say hello (with this worker's initial parameters); returns the WELCOME reply. `meta` adds
        fields to the REGISTER (a shard's identity, see worker/sharded.py)."""
        self._register_args = (init, job, meta)
        msg = Message(MsgType.REGISTER, tensors=dict(init or {}), meta={"job": job or {}, **(meta or {})})
        waited_since = time.monotonic()
        while True:
            try:
                reply = self._request(msg, reregister=False)
                break
            except ServerError as exc:
                # the id is still bound to a live connection (this worker restarted before the server noticed
                # the old one died): the server frees it after --worker-timeout of silence
                if exc.code != "worker_live" or time.monotonic() - waited_since > self.server_timeout:
                    raise
                log.warning("%s; retrying", exc)
                time.sleep(min(2.0, self.request_timeout))
                msg.seq = 0
        self.worker = reply.worker
        self.registered = True
        self.push_slots = int(reply.meta.get("push_slots") or 0)
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
        msg = Message(MsgType.PUSH, clock=clock, version=version, tensors=tensors, meta=meta, wire=self.wire_dtype)
        if self.push_slots and wire_bytes(tensors) >= RESERVE_MIN_BYTES:
            # ask first (the server lets --max-pushes-in-flight workers send at once); the answer may wait
            self._request(Message(MsgType.PUSH, clock=clock, version=version, meta={"reserve": True}))
        return self._request(msg)

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

    def _transmit(self, frames, push: bool) -> None:
        """Count a request's bytes, hold it on the emulated link if there is one, and send it."""
        nbytes = frames_bytes(frames)
        self.stats["bytes_sent"] += nbytes
        self.stats["bytes_pushed"] += nbytes if push else 0
        if self.link is not None:   # (emulated: the bytes reach the server once they would have crossed the link)
            self.stats["link_s"] += self.link.pace(nbytes)
        self._send(frames)

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
        if not msg.seq:   # a retry keeps the sequence number it was first sent with
            self.seq += 1
            msg.seq = self.seq
        msg.worker = self.worker
        frames = encode(msg)
        self.stats["requests"] += 1
        push = msg.type == MsgType.PUSH
        self._transmit(frames, push)
        timeout = self.request_timeout
        first_sent = sent_at = time.monotonic()
        while True:
            if self.sock.poll(int(min(timeout, 1.0) * 1000)):
                received = self.sock.recv_multipart(copy=False)
                reply = decode(received, raw=raw, pool=self._joined)
                self._count_reply(frames_bytes(received), reply.type)
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
                        # the same seq: if the server had applied this request before forgetting the worker,
                        # it answers from its record instead of applying it again
                        return self._request(msg, reregister=False, raw=raw)
                    raise ServerError(code, reply.meta.get("error", ""))
                return reply
            now = time.monotonic()
            if now - max(self.last_heard, first_sent) > self.server_timeout:
                raise ServerUnavailable(self._silence_text(msg, now - max(self.last_heard, first_sent)))
            self._note_silence(msg, now - max(self.last_heard, first_sent))   # every 5 s, between resends too
            if now - sent_at >= timeout:
                self.stats["resends"] += 1
                self._transmit(frames, push)
                sent_at = now
                timeout = min(timeout * 2, 8 * self.request_timeout)

    def _count_reply(self, nbytes: int, mtype: MsgType) -> None:
        self.stats["bytes_received"] += nbytes
        if mtype in (MsgType.PARAMS, MsgType.WELCOME):   # the replies that carry theta
            self.stats["bytes_pulled"] += nbytes
        if self.link is not None:
            self.stats["link_s"] += self.link.pace(nbytes)

    def _silence_text(self, msg: Message, silent: float) -> str:
        why = ("the server may be refusing this key (CurveZMQ: is its public key in the server's --auth folder?), "
               "or it is not running" if self.curve else "is the server running, at this address?")
        return f"no answer from {self.server} for {silent:.0f}s ({msg.type.name}): {why}"

    def _note_silence(self, msg: Message, silent: float) -> None:
        """Say every SILENCE_EVERY seconds that the server is silent and that we keep trying (not 120 s of
        nothing): once it has been silent that long, then again each time as long again has passed."""
        now = time.monotonic()
        if silent >= SILENCE_EVERY and now - getattr(self, "_said_silent", -SILENCE_EVERY) >= SILENCE_EVERY - 0.05:
            self._said_silent = now
            log.warning("%s; still trying (giving up after %.0fs, --server-timeout)", self._silence_text(msg, silent),
                        self.server_timeout)

    def _heartbeat_loop(self, interval: float) -> None:
        sock = self._connect(ROLE_HEARTBEAT)
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
