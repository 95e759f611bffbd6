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
                     "ts"  list   one spec per tensor, in frame order: [name, dtype, shape] or
                                  [name, "float32", shape, enc]: a float32 tensor sent as enc, "bf16" (the
                                  upper 16 bits of each float32, rounded to nearest even) or "fp16";
                                  or [name, "float32", shape, "int8", phase]: 8-bit blocks (common/int8.py)
                     "ck"  int    optional: chunk size in bytes; a tensor whose bytes exceed it takes
                                  ceil(bytes / ck) frames of ck bytes (the last one shorter)
                     "m"   map    free-form metadata (loss, timings, error code and text, ...)
    frame 1..n     raw tensor bytes, C order, little endian: prod(shape) * itemsize bytes per tensor
                   (2 bytes per value when enc is given), in one frame or in chunks; an int8 tensor
                   takes two parts, its float32 scales then its int8 values, each in one frame or in chunks

Between a worker (DEALER) and the server (ROUTER) ZeroMQ adds the routing identity on the
server side. A client sets that routing id itself: a random session id of SESSION_BYTES bytes plus
one role byte (``R`` for the request socket, ``H`` for the heartbeat socket; `routing_id`). The
server binds a worker id to the session that registered it (`session_of`), so another connection
cannot act as that worker; a client that sets no routing id is its own session (then send
heartbeats on the request socket). Tensors are keyed by parameter *name*, never by
position. Tensor frames are sent without copying (``copy=False``) and decoded as read-only
numpy views of the received frames; a chunked tensor is joined into one array and a 16-bit one
widened to float32 (or, with ``decode(..., raw=True)``, left as `Encoded` bits); an int8 one is always
dequantized to float32 (its scales checked first). No frame exceeds
CHUNK_BYTES (libzmq takes a fresh mmap for every received frame over 32 MiB). Nothing is ever pickled.

Usage::

    frames = encode(Message(MsgType.PUSH, worker=0, seq=7, tensors={"w": grad}))
    sock.send_multipart(frames, copy=False)
    msg = decode(sock.recv_multipart(copy=False))   # raises ProtocolError on bad input
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, Sequence

import msgpack
import numpy as np

from common.int8 import BLOCK as INT8_BLOCK, Int8Blocks, check_scales, dequantize_part, n_blocks

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

#: the largest tensor frame sent; bigger tensors go in chunks of this size
CHUNK_BYTES = 24 << 20
#: a client asks the server before sending a gradient of at least this many bytes (push admission, see the
#: server's --max-pushes-in-flight); smaller ones cost less to hold than a round trip
RESERVE_MIN_BYTES = 1 << 20
#: the server refuses a gradient with a value beyond +-this (as it refuses NaN and Inf): its square would overflow
#: Adam's second moment in float32 (at 1.8e19), and finite values near float32's limit overflow a sync step's sum
MAX_GRADIENT = 1e18
#: how float32 tensors may travel: as they are, or as 16-bit values (half the bytes)
WIRE_DTYPES = ("fp32", "bf16", "fp16")


def within_bounds(values) -> bool:
    """Every value finite and within +-MAX_GRADIENT? A numpy array is checked by numpy; a torch tensor by its
    smallest and largest value, one read-only pass (NaN fails every comparison, +-Inf shows in an extreme)."""
    if isinstance(values, np.ndarray):
        return bool(np.isfinite(values).all()) and float(np.abs(values).max(initial=0)) <= MAX_GRADIENT
    if not values.numel():
        return True
    lo, hi = _torch().aminmax(values)
    return -MAX_GRADIENT <= lo.item() and hi.item() <= MAX_GRADIENT


def wire_bytes(tensors) -> int:
    """Bytes a message's tensors take on the wire (`Encoded` ones as their 16-bit values, `Int8Blocks` as theirs)."""
    return sum(getattr(t, "bits", t).nbytes for t in tensors.values())


def frames_bytes(frames) -> int:
    """Bytes of a message's frames as they cross the socket (header and tensor frames; not ZeroMQ's routing id)."""
    return sum(f.nbytes if isinstance(f, memoryview) else len(f) for f in frames)


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


class Encoded:
    """A float32 tensor as 16-bit wire values: `bits` is uint16 (bf16 patterns) or float16 (fp16)."""

    __slots__ = ("bits", "wire")

    def __init__(self, bits: np.ndarray, wire: str):
        self.bits, self.wire = bits, wire

    @property
    def shape(self) -> tuple:
        return self.bits.shape

    @property
    def nbytes(self) -> int:
        return self.bits.nbytes

    def to_float32(self, out: np.ndarray | None = None) -> np.ndarray:
        return decode_wire(self, out)

    def as_torch(self):
        """A torch tensor of dtype bfloat16 / float16 viewing these values (no copy): torch computes with it
        directly, e.g. theta.add_(g) widens each value on the fly, exactly as decode_wire would."""
        torch = _torch()
        bits = _contiguous(self.bits)
        with warnings.catch_warnings():   # read-only frames: torch only reads them
            warnings.simplefilter("ignore", UserWarning)
            return torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16) if self.wire == "bf16" \
                else torch.from_numpy(bits)


def _contiguous(a: np.ndarray) -> np.ndarray:
    """`a`, copied only when it is not C-contiguous (np.ascontiguousarray would make a 0-d array 1-d)."""
    return a if a.flags.c_contiguous else a.copy()


def _torch():
    import torch   # only for 16-bit conversions: torch does them in one vectorised, multi-threaded pass
    return torch


def encode_wire(arr: np.ndarray, wire: str, out: np.ndarray | None = None) -> Encoded:
    """float32 -> 16-bit wire values (round to nearest even; NaN stays NaN, overflow becomes Inf).
    `out`: a reusable array of the result's dtype and shape."""
    if wire not in ("bf16", "fp16"):
        raise ProtocolError(f"unknown wire encoding {wire!r}; use bf16 or fp16")
    torch = _torch()
    dtype = np.uint16 if wire == "bf16" else np.float16
    if out is None:
        out = np.empty(np.shape(arr), dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        src = torch.from_numpy(_contiguous(np.asarray(arr, dtype=np.float32)))
    if wire == "bf16":
        torch.from_numpy(out.view(np.int16)).view(torch.bfloat16).copy_(src)
    else:
        torch.from_numpy(out).copy_(src)
    return Encoded(out, wire)


def decode_wire(enc: Encoded, out: np.ndarray | None = None) -> np.ndarray:
    """16-bit wire values -> float32 (exact: every bf16 and fp16 value is a float32)."""
    torch = _torch()
    if out is None:
        out = np.empty(enc.bits.shape, np.float32)
    torch.from_numpy(out).copy_(enc.as_torch())
    return out


@dataclass
class Message:
    type: MsgType
    worker: int = -1
    seq: int = 0
    clock: int = 0
    version: int = 0
    tensors: dict[str, np.ndarray] = field(default_factory=dict)   # values may be `Encoded`
    meta: dict[str, Any] = field(default_factory=dict)
    wire: str = "fp32"    # encode: how float32 tensors travel; decode: the encoding that was received
    #: sender's bookkeeping, never on the wire: (version, wire) of the server snapshot in `tensors`
    snapshot: tuple | None = field(default=None, repr=False, compare=False)
    #: receiver's bookkeeping, never on the wire: {name: all values finite?} for tensors already checked as they
    #: were copied into memory of the receiver's own (a gradient read out of shared memory, common/shm.py)
    checked: dict | None = field(default=None, repr=False, compare=False)

    def __repr__(self) -> str:  # compact: never the contents
        nbytes = sum(t.nbytes for t in self.tensors.values())
        extra = f" err={self.meta.get('code')}" if self.type == MsgType.ERROR else ""
        return (f"<{self.type.name} w={self.worker} seq={self.seq} clk={self.clock} ver={self.version} "
                f"tensors={len(self.tensors)} bytes={nbytes}{extra}>")


def encode(msg: Message) -> list:
    """Message -> list of frames (header bytes, then the tensors' buffers, not copied; tensors over
    CHUNK_BYTES in several frames). float32 tensors go as `msg.wire`; `Encoded` values as they are."""
    if msg.wire not in WIRE_DTYPES:
        raise ProtocolError(f"unknown wire dtype {msg.wire!r}; use one of {', '.join(WIRE_DTYPES)}")
    specs, buffers = [], []
    chunked = False
    for name, arr in msg.tensors.items():
        enc = None
        if isinstance(arr, Int8Blocks):   # two parts: the scales, then the values
            specs.append([name, "float32", list(arr.shape), "int8", int(arr.phase)])
            chunked |= _append(buffers, _contiguous(arr.scales)) | _append(buffers, _contiguous(arr.q))
            continue
        if not isinstance(arr, Encoded) and msg.wire != "fp32" and np.asarray(arr).dtype == np.float32:
            arr = encode_wire(arr, msg.wire)
        if isinstance(arr, Encoded):
            enc, arr = arr.wire, np.asarray(arr.bits)
            wire = "float32"
        else:
            arr = np.asarray(arr)
            wire = arr.dtype.name
            if wire not in DTYPES:
                raise ProtocolError(f"tensor {name!r}: dtype {wire} cannot go on the wire; use one of {sorted(DTYPES)}")
            if arr.dtype.byteorder == ">":
                arr = arr.astype(DTYPES[wire])
        arr = _contiguous(arr)
        specs.append([name, wire, list(arr.shape)] + ([enc] if enc else []))
        chunked |= _append(buffers, arr)
    header = {"v": PROTOCOL_VERSION, "t": int(msg.type), "w": int(msg.worker), "seq": int(msg.seq),
              "clk": int(msg.clock), "ver": int(msg.version), "ts": specs, "m": msg.meta}
    if chunked:
        header["ck"] = CHUNK_BYTES
    return [msgpack.packb(header, use_bin_type=True)] + buffers


def _append(buffers: list, arr: np.ndarray) -> bool:
    """Append a contiguous array's bytes as one frame, or as CHUNK_BYTES chunks (True) when larger."""
    if not arr.size:
        buffers.append(b"")
        return False
    view = memoryview(arr.reshape(-1)).cast("B")
    if len(view) <= CHUNK_BYTES:
        buffers.append(view)
        return False
    buffers.extend(view[i:i + CHUNK_BYTES] for i in range(0, len(view), CHUNK_BYTES))
    return True


def _buffer(frame) -> memoryview:
    return frame.buffer if hasattr(frame, "buffer") else memoryview(frame)


def _int(header: dict, key: str) -> int:
    value = header.get(key, 0)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ProtocolError(f"header field {key!r} must be an integer, got {type(value).__name__}")
    return value


def decode(frames: Sequence, raw: bool = False, pool=None) -> Message:
    """Frames (bytes or zmq.Frame) -> Message; raises ProtocolError naming the problem. 16-bit
    tensors come back as float32 arrays, or with `raw` as `Encoded` bits. A tensor sent in chunks is joined
    into a buffer from `pool` (a common.tuning.ReusedBuffers, keyed by the tensor's name) when given, else
    into a fresh array. Three steps: the header (_read_header), what it announces (_tensor_plan), the tensors
    themselves (_read_tensors)."""
    header, mtype = _read_header(frames)
    specs, meta, chunk = header.get("ts", []), header.get("m", {}), header.get("ck")
    if not isinstance(specs, list):
        raise ProtocolError("header field 'ts' must be a list of [name, dtype, shape]")
    if not isinstance(meta, dict):
        raise ProtocolError("header field 'm' must be a map")
    if chunk is not None and (not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 1):
        raise ProtocolError(f"header field 'ck' must be a positive integer (chunk bytes), got {chunk!r}")
    plan = _tensor_plan(specs, chunk)
    announced = sum(p[5] for p in plan)
    if len(frames) - 1 != announced:
        raise ProtocolError(f"header announces {announced} tensor frame(s) but {len(frames) - 1} followed "
                            "(truncated or extra frames)")
    tensors, wire_seen = _read_tensors(frames, plan, chunk, raw, pool)
    return Message(mtype, worker=_int(header, "w"), seq=_int(header, "seq"), clock=_int(header, "clk"),
                   version=_int(header, "ver"), tensors=tensors, meta=meta, wire=wire_seen)


def _read_header(frames: Sequence) -> tuple[dict, MsgType]:
    """The msgpack header frame -> (header map, message type), checked for size, version and type."""
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
    return header, mtype


def _tensor_plan(specs: list, chunk: int | None) -> list[tuple]:
    """The header's tensor specs -> [(name, dtype, shape, enc, expected bytes, frames)], each spec checked
    before any byte of a tensor is looked at. An int8 tensor is two entries: its scales (enc "scales",
    shape [blocks]), then its values (enc ("int8", phase))."""
    plan = []
    for spec in specs:
        if (not isinstance(spec, list) or len(spec) not in (3, 4, 5) or not isinstance(spec[0], str)
                or not isinstance(spec[1], str) or not isinstance(spec[2], list)):
            raise ProtocolError(f"bad tensor spec {spec!r}: expected [name, dtype, shape(, enc(, phase))]")
        name, dtype_name, shape = spec[:3]
        enc = spec[3] if len(spec) >= 4 else None
        if dtype_name not in DTYPES:
            raise ProtocolError(f"tensor {name!r}: unknown dtype {dtype_name!r}; use one of {sorted(DTYPES)}")
        if len(shape) > MAX_NDIM or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                            for d in shape):
            raise ProtocolError(f"tensor {name!r}: bad shape {shape!r}; expected up to {MAX_NDIM} "
                                "non-negative integers")
        if any(d > MAX_DIM for d in shape) or math.prod(d for d in shape if d) > MAX_ELEMENTS:
            raise ProtocolError(f"tensor {name!r}: shape {shape!r} is absurdly large (a dimension over "
                                f"{MAX_DIM} or over {MAX_ELEMENTS} elements)")
        if enc is not None and (enc not in (("bf16", "fp16"), ("int8",))[len(spec) - 4] or dtype_name != "float32"):
            raise ProtocolError(f"tensor {name!r}: encoding {', '.join(map(repr, spec[3:]))} is not bf16, fp16 or "
                                "int8 with its phase for a float32 tensor")
        if enc == "int8":
            phase = spec[4]
            if not isinstance(phase, int) or isinstance(phase, bool) or not 0 <= phase < INT8_BLOCK:
                raise ProtocolError(f"tensor {name!r}: int8 phase {phase!r} is not an integer in [0, {INT8_BLOCK})")
            blocks = n_blocks(math.prod(shape), phase)
            plan.append(_planned(name, np.dtype("<f4"), [blocks], "scales", chunk))
            enc = ("int8", phase)
        dtype = (DTYPES[dtype_name] if enc is None else np.dtype("<i1") if enc[0] == "int8"
                 else np.dtype("<u2" if enc == "bf16" else "<f2"))
        plan.append(_planned(name, dtype, shape, enc, chunk))
    return plan


def _planned(name: str, dtype: np.dtype, shape: list, enc, chunk: int | None) -> tuple:   # a _tensor_plan entry
    expected = math.prod(shape) * dtype.itemsize
    return name, dtype, shape, enc, expected, 1 if chunk is None or expected <= chunk else -(-expected // chunk)


def _read_tensors(frames: Sequence, plan: list[tuple], chunk: int | None, raw: bool, pool) -> tuple[dict, str]:
    """The tensor frames -> ({name: array or Encoded}, the encoding seen or "fp32"); a single frame is viewed in
    place, a chunked tensor joined (the one copy it costs); int8 values are dequantized into float32 part by part."""
    tensors: dict = {}
    pos = 1
    wire_seen = "fp32"
    scales = None   # an int8 tensor's checked scales, read just before its values
    for name, dtype, shape, enc, expected, n_frames in plan:
        if name in tensors:
            raise ProtocolError(f"tensor {name!r} appears twice")
        parts = [_buffer(f) for f in frames[pos:pos + n_frames]]
        pos += n_frames
        got = sum(len(b) for b in parts)
        if got != expected or (n_frames > 1 and any(len(b) != chunk for b in parts[:-1])):
            what = "int8 scales" if enc == "scales" else "int8 values" if isinstance(enc, tuple) else enc or dtype.name
            raise ProtocolError(f"tensor {name!r}: frame has {got} bytes but {what}{shape} needs {expected}"
                                f"{f' in chunks of {chunk}' if n_frames > 1 else ''} (truncated frame?)")
        if isinstance(enc, tuple):   # int8 values: dequantized chunk by chunk, nothing joined
            wire_seen = "int8"
            out = (pool.get(4 * expected, name) if pool is not None else np.empty(4 * expected, np.uint8)).view("<f4")
            at = 0
            for b in parts:
                at += dequantize_part(np.frombuffer(b, np.int8), scales, enc[1] + at, out[at:at + len(b)])
            tensors[name] = out.reshape(shape)
            continue
        arr = _array(parts, name, dtype, shape, expected, pool)
        if enc == "scales":
            problem = check_scales(arr)
            if problem:
                raise ProtocolError(f"tensor {name!r}: int8 {problem}")
            scales = arr
            continue
        if enc is not None:
            wire_seen = enc
            arr = Encoded(arr, enc) if raw else decode_wire(Encoded(arr, enc))
        tensors[name] = arr
    return tensors, wire_seen


def _array(parts: list, name: str, dtype: np.dtype, shape: list, expected: int, pool) -> np.ndarray:
    """A tensor's frames as one array: the frame itself (a view), or its chunks joined."""
    if len(parts) == 1:
        try:
            return np.frombuffer(parts[0], dtype=dtype).reshape(shape)
        except ValueError as exc:   # e.g. [0, 2**40, 2**40]: no bytes, but numpy cannot index it
            raise ProtocolError(f"tensor {name!r}: shape {shape!r} cannot be represented ({exc})") from None
    flat = pool.get(expected, name) if pool is not None else np.empty(expected, np.uint8)
    at = 0
    for b in parts:
        flat[at:at + len(b)] = np.frombuffer(b, np.uint8)
        at += len(b)
    return flat.view(dtype).reshape(shape)


def error_reply(request: Message | None, code: str, text: str) -> Message:
    """The ERROR reply to `request` (None when the request could not even be decoded)."""
    return Message(MsgType.ERROR, worker=request.worker if request else -1,
                   seq=request.seq if request else 0, meta={"code": code, "error": text})
