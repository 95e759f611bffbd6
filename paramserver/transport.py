"""The server's transport: the ROUTER socket and everything that moves its bytes.

This part owns the socket (options, CurveZMQ authenticator, bind, close), its monitor (ZeroMQ's
connection events: disconnects and failed handshakes, counted on the server's events), the frame
limit (ZMQ_MAXMSGSIZE), zero-copy sends whose tracker says when ZeroMQ has let go of every frame,
and the same-host shared-memory side (`shm`: common.shm.ServerTransport, or None). It knows
nothing of workers or theta: the server decides what to send and to whom. It counts the bytes
(`bytes`): every message's frames as they cross the socket (the routing id left out), received and
sent; pushed (PUSH requests that decode, duplicates included: a message that does not decode is only
received) and pulled (replies that carry theta: PARAMS, WELCOME); and what went through shared
memory instead (shm_pushed: gradients read from a segment, as float32; shm_pulled: theta handed to a
PARAMS through the segment).

Usage::

    transport = Transport(cfg, zmq.Context.instance(), events, phases)
    address = transport.bind(largest_tensor=None)
    tracker = transport.send(identity, reply, track=True)
"""
from __future__ import annotations

import logging
from collections import Counter
from typing import Callable

import msgpack
import numpy as np
import zmq
from zmq.utils.monitor import recv_monitor_message

from common import shm
from common.config import ServerConfig
from common.protocol import (CHUNK_BYTES, MAX_HEADER_BYTES, REQUEST_TYPES, Encoded, Message, MsgType, ProtocolError,
                             decode, decode_wire, encode, error_reply, frames_bytes, wire_bytes)
from common.security import server_curve
from common.tuning import ReusedBuffers
from paramserver.metrics import PhaseTimes

log = logging.getLogger("paramserver.server.transport")   # (under the server's: its level applies)

MONITORED = (zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
             | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)
_EVENT_NAMES = {zmq.EVENT_HANDSHAKE_FAILED_AUTH: "authentication refused",
                zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "protocol error",
                zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: "no detail"}
#: replies queued per connection before ZeroMQ drops more (a client that never reads pins no more than this)
SEND_HWM = 8


def user_id(frame) -> str:
    """The CurveZMQ public key (z85) ZeroMQ's authenticator attached to a received frame, or ""."""
    try:
        return frame.get("User-Id") or ""
    except (AttributeError, zmq.ZMQError):
        return ""


def send_tracked(sock: zmq.Socket, frames: list) -> zmq.MessageTracker:
    """Send a multipart message zero-copy; the tracker is done when ZeroMQ has released every frame
    (send_multipart(track=True) would track only the last one)."""
    parts = [zmq.Frame(f, track=True) for f in frames]
    for part in parts[:-1]:
        sock.send(part, zmq.SNDMORE, copy=False)
    sock.send(parts[-1], copy=False)
    return zmq.MessageTracker(*parts)


def _type_of(frames: list) -> int | None:
    """The message type in an encoded reply's header (a cached reply, resent as it was)."""
    try:
        return msgpack.unpackb(frames[0], raw=False).get("t")
    except Exception:
        return None


def widen(msg: Message) -> None:
    """bf16/fp16 tensors of a request -> float32 (the server keeps theta and sync sums in fp32)."""
    for name, t in msg.tensors.items():
        if isinstance(t, Encoded):
            msg.tensors[name] = decode_wire(t)


def frame_limit(cfg: ServerConfig, largest_tensor: int | None) -> int:
    """ZMQ_MAXMSGSIZE (per frame): --max-message-mb, or (automatic) the largest frame the protocol sends (a
    CHUNK_BYTES chunk, plus the header limit), lowered to theta's largest tensor when theta is known at bind
    time (a resumed server)."""
    if cfg.max_message_mb > 0:
        return int(cfg.max_message_mb * 2**20)
    if largest_tensor is not None:
        return min(largest_tensor, CHUNK_BYTES) + MAX_HEADER_BYTES
    return CHUNK_BYTES + MAX_HEADER_BYTES   # tensors travel in frames of at most CHUNK_BYTES (protocol.encode)


class Transport:
    """The ROUTER socket, its monitor, tracked sends and the shared-memory side (see the module docstring)."""

    def __init__(self, cfg: ServerConfig, context: zmq.Context, events: Counter, phases: PhaseTimes):
        self.cfg, self.events, self.phases = cfg, events, phases
        self._ctx = context
        self.shm = shm.ServerTransport() if cfg.shm and shm.available() else None   # same-host shared memory
        self.sock: zmq.Socket | None = None
        self.monitor: zmq.Socket | None = None   # connection events of self.sock
        self._auth = None        # the ZAP authenticator thread when --auth is on
        self.address = ""
        self._segments: dict[int, str] = {}   # worker -> its shared-memory gradient segment (same host)
        # a gradient tensor over 24 MiB comes in chunks, joined into a reused buffer per tensor: a sync step
        # holds one gradient per worker until it is applied. Only theta's own tensors (name and size, fp32 or
        # 16-bit) are kept: nothing before theta is known, nothing for made-up names (see allow_joins)
        self.joined = ReusedBuffers(keep=max(2, cfg.num_workers + 1), allowed=set())
        self.bytes: Counter = Counter(received=0, sent=0, pushed=0, pulled=0, shm_pushed=0, shm_pulled=0)

    @property
    def bound(self) -> bool:
        return self.sock is not None

    def bind(self, largest_tensor: int | None) -> str:
        """Open, configure and bind the socket (once); returns the address workers connect to. ZeroMQ's
        listener copies its options when it binds, so the frame limit is set here, once (every message is
        checked against theta anyway)."""
        if self.sock is not None:
            return self.address
        self.sock = self._ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 1000)
        self.sock.setsockopt(zmq.SNDHWM, SEND_HWM)
        # a client reconnecting with its routing id (after a network blip) replaces its old, possibly half-open
        # connection instead of being ignored while its heartbeats (other socket) keep it "live"
        self.sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
        self.sock.setsockopt(zmq.MAXMSGSIZE, frame_limit(self.cfg, largest_tensor))
        if self.cfg.curve_secret:
            self._auth = server_curve(self.sock, self.cfg.curve_secret, self.cfg.auth, self._ctx)
        self.sock.bind(self.cfg.bind)
        self.address = self.sock.getsockopt(zmq.LAST_ENDPOINT).decode()
        self.monitor = self.sock.get_monitor_socket(MONITORED)
        return self.address

    def close(self) -> None:
        """Close the shared memory, the monitor and the socket. Safe to call twice."""
        if self.sock is None:
            return
        if self.shm is not None:
            self.shm.close()
        self.sock.disable_monitor()
        self.monitor.close()
        self.sock.close()
        self.sock = None
        if self._auth is not None:
            self._auth.stop()
            self._auth = None

    def recv(self) -> list | None:
        """The next queued message's frames (not copied), or None when nothing is queued."""
        try:
            return self.sock.recv_multipart(zmq.NOBLOCK, copy=False)
        except zmq.Again:
            return None

    def allow_joins(self, theta: dict) -> None:
        """theta is known: the join buffers of its tensors (as float32 and as 16-bit wire values) may be kept."""
        self.joined.allowed = {(n, t.nbytes) for n, t in theta.items()} | {
            (n, t.size * 2) for n, t in theta.items() if t.dtype == np.float32}
        self.joined.trim()

    def decode(self, identity: bytes, body: list) -> tuple[Message | None, Message | None]:
        """(the request in a message's frames, None), its gradient read from shared memory if it came that way;
        or (None, the ERROR reply) for a message that does not decode, is not a request, or whose shared memory
        is unusable (counted as malformed). 16-bit tensors stay Encoded (see Pushes.gradient)."""
        nbytes = frames_bytes(body)
        self.bytes["received"] += nbytes
        try:
            msg = decode(body, raw=True, pool=self.joined)
        except ProtocolError as exc:
            self.events["malformed"] += 1
            log.warning("malformed message from %r: %s", identity[:16], exc)
            return None, error_reply(None, "malformed", str(exc))
        if msg.type not in REQUEST_TYPES:
            self.events["malformed"] += 1
            return None, error_reply(msg, "not_a_request", f"{msg.type.name} is a reply type; send one of "
                                     + ", ".join(t.name for t in REQUEST_TYPES))
        if msg.type == MsgType.PUSH:
            self.bytes["pushed"] += nbytes
        if self.shm is None:
            return msg, None
        try:
            with self.phases.phase("shm_in"):
                msg = self.shm.inbound(identity, msg)
                if msg.checked is not None:   # (set when the gradient was read from shared memory)
                    self.bytes["shm_pushed"] += wire_bytes(msg.tensors)
                return msg, None
        except ProtocolError as exc:
            self.events["malformed"] += 1
            log.warning("shared memory of %r unusable: %s", msg, exc)
            return None, error_reply(msg, "bad_shm", str(exc))

    def outbound(self, identity: bytes, msg: Message) -> Message:
        """The shared-memory side of a reply (theta through its segment, for a peer on this host)."""
        if self.shm is None:
            return msg
        with self.phases.phase("shm_out"):
            out = self.shm.outbound(identity, msg)
        if msg.tensors and not out.tensors:   # theta went through the segment
            self.bytes["shm_pulled"] += wire_bytes(msg.tensors)
        return out

    def note_segment(self, worker: int, msg: Message) -> bool:
        """Remember the shared-memory segment a PUSH's gradient came through (True), else False: it came
        through the socket."""
        ref = msg.meta.get("shm")
        if isinstance(ref, dict) and isinstance(ref.get("name"), str):
            self._segments[worker] = ref["name"]
            return True
        return False

    def forget_worker(self, worker: int) -> None:
        """A gone worker's gradient segment and its buffers are let go of."""
        segment = self._segments.pop(worker, None)
        if segment and self.shm is not None:
            self.shm.grads.forget(segment)

    def send(self, identity: bytes, msg: Message | list, track: bool = False) -> zmq.MessageTracker | None:
        """Send a reply (a Message, or frames already encoded). With `track`, zero-copy with a tracker that
        says when ZeroMQ no longer needs any of the frames. A send that fails (peer gone, queue full: the
        client resends) is logged and returns None."""
        frames = msg if isinstance(msg, list) else encode(msg)
        nbytes = frames_bytes(frames)
        self.bytes["sent"] += nbytes
        if (msg.type if isinstance(msg, Message) else _type_of(frames)) in (MsgType.PARAMS, MsgType.WELCOME):
            self.bytes["pulled"] += nbytes
        try:
            with self.phases.phase("send"):
                if track:
                    return send_tracked(self.sock, [identity] + frames)
                self.sock.send_multipart([identity] + frames, copy=False)
        except zmq.ZMQError as exc:
            log.warning("reply to %r not sent: %s", identity, exc)
        return None

    def connection_events(self, on_disconnect: Callable[[str], None]) -> None:
        """Read ZeroMQ's connection events: it drops a connection without a message for an oversized message
        (--max-message-mb) and for a failed CurveZMQ handshake (an unknown key, or plain text). Counts both
        (disconnects, handshake_failures) and logs the failed handshakes; a disconnect's endpoint goes to
        `on_disconnect` as it is counted (the server says whether it was routine)."""
        while self.monitor.poll(0):
            event = recv_monitor_message(self.monitor)
            what, endpoint = event["event"], event["endpoint"].decode(errors="replace")
            if what == zmq.EVENT_DISCONNECTED:
                self.events["disconnects"] += 1
                on_disconnect(endpoint)
            else:
                self.events["handshake_failures"] += 1
                log.warning("refused a connection on %s: CurveZMQ handshake failed (%s); the client has no "
                            "admitted key or speaks plain text", endpoint, _EVENT_NAMES.get(what, what))
