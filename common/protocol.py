"""The wire protocol: the one place that builds and decodes frames.

Every message is one ZeroMQ multipart message::

    frame 0        msgpack map (the header)
                     "v"   int    protocol version (PROTOCOL_VERSION); another major version is refused
                     "t"   int    MsgType
                     "w"   int    worker id (-1 for tools such as `paramserver status`)
                     "seq" int    per-client request number; a reply carries the request's seq
                     "clk" int    the sender's clock (sync step / ssp clock) or, in replies, the server's
                     "ver" int    version of theta: the one a gradient was computed on (PUSH) or the one
                                  sent (WELCOME / PARAMS)
                     "ts"  list   one spec per tensor frame, in frame order: [name, dtype, shape]
                     "m"   map    free-form metadata (loss, timings, error code and text, ...)
    frame 1..n     raw tensor bytes, C order, little endian, exactly prod(shape) * itemsize bytes

Between a worker (DEALER) and the server (ROUTER) ZeroMQ adds the routing identity on the
server side. A client sets that routing id itself: a random session id of SESSION_BYTES bytes plus
one role byte (``R`` for the request socket, ``H`` for the heartbeat socket; `routing_id`). The
server binds a worker id to the session that registered it (`session_of`), so another connection
cannot act as that worker; a client that sets no routing id is its own session (then send
heartbeats on the request socket). Tensors are keyed by parameter *name*, never by
position. Tensor frames are sent without copying (``copy=False``) and decoded as read-only
numpy views of the received frames. Nothing is ever pickled.

Usage::

    frames = encode(Message(MsgType.PUSH, worker=0, seq=7, tensors={"w": grad}))
    sock.send_multipart(frames, copy=False)
    msg = decode(sock.recv_multipart(copy=False))   # raises ProtocolError on bad input
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, Sequence

import msgpack
import numpy as np

PROTOCOL_VERSION = 1

#: dtypes allowed on the wire, by their wire name. Byte order is always little endian.
DTYPES: dict[str, np.dtype] = {
    name: np.dtype(name).newbyteorder("<")
    for name in ("float32", "float64", "float16", "int64", "int32", "int16", "int8", "uint8", "bool")
}

#: refuse absurd headers before allocating anything (tensors are limited by the socket's MAXMSGSIZE)
MAX_HEADER_BYTES = 1 << 20
MAX_TENSORS = 100_000
MAX_NDIM = 16
MAX_DIM = 1 << 40          # no real tensor has a dimension this large; a bigger one is a malformed spec
MAX_ELEMENTS = 1 << 40     # nor this many elements (4 TiB of float32)

#: a client's session id: random bytes, the same on its request and heartbeat sockets
SESSION_BYTES = 15
ROLE_REQUESTS, ROLE_HEARTBEAT = b"R", b"H"


def new_session() -> bytes:
    """A fresh random session id for one client object."""
    import os
    return os.urandom(SESSION_BYTES)


def routing_id(session: bytes, role: bytes) -> bytes:
    """The ZeroMQ routing id a client sets on its socket for `role` (ROLE_REQUESTS or ROLE_HEARTBEAT)."""
    return session + role


def session_of(identity: bytes) -> bytes:
    """The session a routing identity belongs to (the identity itself for clients that set none)."""
    if len(identity) == SESSION_BYTES + 1 and identity[-1:] in (ROLE_REQUESTS, ROLE_HEARTBEAT):
        return identity[:-1]
    return identity


class MsgType(IntEnum):
    """Closed set of message kinds. Requests go worker -> server, replies server -> worker."""

    # requests
    REGISTER = 1   # hello: optional initial tensors; reply WELCOME with layout, theta, version, clock
    PULL = 2       # ask for theta at clock "clk"; reply PARAMS (may be held back by the consistency policy)
    PUSH = 3       # gradients by name, computed on version "ver", for clock "clk"; reply ACK
    LEAVE = 4      # goodbye: the worker is removed from barriers and clock minima; reply ACK
    HEARTBEAT = 5  # liveness only; reply ACK
    STATUS = 6     # reply ACK whose meta holds the server's status
    SHUTDOWN = 7   # stop the server cleanly (checkpoint + metrics); reply ACK
    # replies
    WELCOME = 20
    PARAMS = 21
    ACK = 22
    ERROR = 23


REQUEST_TYPES = frozenset({MsgType.REGISTER, MsgType.PULL, MsgType.PUSH, MsgType.LEAVE,
                           MsgType.HEARTBEAT, MsgType.STATUS, MsgType.SHUTDOWN})


class ProtocolError(ValueError):
    """A message that cannot be decoded or does not fit the protocol. The text says what is wrong."""


@dataclass
class Message:
    type: MsgType
    worker: int = -1
    seq: int = 0
    clock: int = 0
    version: int = 0
    tensors: dict[str, np.ndarray] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def __repr__(self) -> str:  # compact: never the contents
        nbytes = sum(t.nbytes for t in self.tensors.values())
        extra = f" err={self.meta.get('code')}" if self.type == MsgType.ERROR else ""
        return (f"<{self.type.name} w={self.worker} seq={self.seq} clk={self.clock} ver={self.version} "
                f"tensors={len(self.tensors)} bytes={nbytes}{extra}>")


def encode(msg: Message) -> list:
    """Message -> list of frames (header bytes, then one buffer per tensor, not copied)."""
    specs, buffers = [], []
    for name, arr in msg.tensors.items():
        arr = np.asarray(arr)
        wire = arr.dtype.name
        if wire not in DTYPES:
            raise ProtocolError(f"tensor {name!r}: dtype {wire} cannot go on the wire; use one of {sorted(DTYPES)}")
        if arr.dtype.byteorder == ">":
            arr = arr.astype(DTYPES[wire])
        if not arr.flags.c_contiguous:
            arr = arr.copy(order="C")   # (np.ascontiguousarray would turn a 0-d array into 1-d)
        specs.append([name, wire, list(arr.shape)])
        buffers.append(memoryview(arr).cast("B") if arr.size else b"")
    header = {"v": PROTOCOL_VERSION, "t": int(msg.type), "w": int(msg.worker), "seq": int(msg.seq),
              "clk": int(msg.clock), "ver": int(msg.version), "ts": specs, "m": msg.meta}
    return [msgpack.packb(header, use_bin_type=True)] + buffers


def _buffer(frame) -> memoryview:
    return frame.buffer if hasattr(frame, "buffer") else memoryview(frame)


def _int(header: dict, key: str) -> int:
    value = header.get(key, 0)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ProtocolError(f"header field {key!r} must be an integer, got {type(value).__name__}")
    return value


def decode(frames: Sequence) -> Message:
    """Frames (bytes or zmq.Frame) -> Message; raises ProtocolError naming the problem."""
    if not frames:
        raise ProtocolError("empty message: expected a msgpack header frame")
    head = _buffer(frames[0])
    if len(head) > MAX_HEADER_BYTES:
        raise ProtocolError(f"header frame is {len(head)} bytes; the limit is {MAX_HEADER_BYTES}")
    try:
        header = msgpack.unpackb(head, raw=False, strict_map_key=True, max_array_len=MAX_TENSORS,
                                 max_map_len=10_000)
    except Exception as exc:  # msgpack raises several unrelated types
        raise ProtocolError(f"header frame is not valid msgpack ({type(exc).__name__}: {exc})") from None
    if not isinstance(header, dict):
        raise ProtocolError(f"header must be a msgpack map, got {type(header).__name__}")
    version = header.get("v")
    if version != PROTOCOL_VERSION:
        raise ProtocolError(f"protocol version {version!r} is not supported; this peer speaks version "
                            f"{PROTOCOL_VERSION} (upgrade the older side)")
    try:
        mtype = MsgType(_int(header, "t"))
    except ValueError:
        raise ProtocolError(f"unknown message type {header.get('t')!r}; known: "
                            f"{', '.join(f'{t.value}={t.name}' for t in MsgType)}") from None
    specs = header.get("ts", [])
    meta = header.get("m", {})
    if not isinstance(specs, list):
        raise ProtocolError("header field 'ts' must be a list of [name, dtype, shape]")
    if not isinstance(meta, dict):
        raise ProtocolError("header field 'm' must be a map")
    if len(frames) - 1 != len(specs):
        raise ProtocolError(f"header announces {len(specs)} tensor frame(s) but {len(frames) - 1} followed "
                            "(truncated or extra frames)")
    tensors: dict[str, np.ndarray] = {}
    for spec, frame in zip(specs, frames[1:]):
        if (not isinstance(spec, list) or len(spec) != 3 or not isinstance(spec[0], str)
                or not isinstance(spec[1], str) or not isinstance(spec[2], list)):
            raise ProtocolError(f"bad tensor spec {spec!r}: expected [name, dtype, shape]")
        name, dtype_name, shape = spec
        if name in tensors:
            raise ProtocolError(f"tensor {name!r} appears twice")
        if dtype_name not in DTYPES:
            raise ProtocolError(f"tensor {name!r}: unknown dtype {dtype_name!r}; use one of {sorted(DTYPES)}")
        if len(shape) > MAX_NDIM or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                            for d in shape):
            raise ProtocolError(f"tensor {name!r}: bad shape {shape!r}; expected up to {MAX_NDIM} "
                                "non-negative integers")
        if any(d > MAX_DIM for d in shape) or math.prod(d for d in shape if d) > MAX_ELEMENTS:
            raise ProtocolError(f"tensor {name!r}: shape {shape!r} is absurdly large (a dimension over "
                                f"{MAX_DIM} or over {MAX_ELEMENTS} elements)")
        dtype = DTYPES[dtype_name]
        buf = _buffer(frame)
        expected = math.prod(shape) * dtype.itemsize
        if len(buf) != expected:
            raise ProtocolError(f"tensor {name!r}: frame has {len(buf)} bytes but {dtype_name}{shape} needs "
                                f"{expected} (truncated frame?)")
        try:
            tensors[name] = np.frombuffer(buf, dtype=dtype).reshape(shape)
        except ValueError as exc:   # e.g. [0, 2**40, 2**40]: no bytes, but numpy cannot index it
            raise ProtocolError(f"tensor {name!r}: shape {shape!r} cannot be represented ({exc})") from None
    return Message(mtype, worker=_int(header, "w"), seq=_int(header, "seq"), clock=_int(header, "clk"),
                   version=_int(header, "ver"), tensors=tensors, meta=meta)


def error_reply(request: Message | None, code: str, text: str) -> Message:
    """The ERROR reply to `request` (None when the request could not even be decoded)."""
    return Message(MsgType.ERROR, worker=request.worker if request else -1,
                   seq=request.seq if request else 0, meta={"code": code, "error": text})
