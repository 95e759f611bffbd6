"""Same-host shared-memory transport: theta and gradients through /dev/shm, a small message on the socket.

When a worker and a server share a host (and a /dev/shm), copying theta through a TCP socket is
wasted work. Instead (the approach BytePS takes inside a host):

* the server keeps theta in a segment of SLOTS slots; a PARAMS reply carries no tensor frames,
  only meta shm = {slot, seq, version}; the worker copies theta out of the slot and checks the
  slot's sequence number before and after (a seqlock: odd while written), and if the slot was
  rewritten meanwhile it pulls again over the socket;
* each worker keeps its gradient in its own segment; a PUSH carries no tensor frames, only meta
  shm = {name, specs}; the server copies the gradient out before using it (the worker writes the
  segment again only after the ACK).

Detection: the server names its segment and a random token in WELCOME (meta shm); the worker uses
shared memory only if it can open that segment and finds the same token in it, so a worker on
another host (or without the same /dev/shm) falls back to the socket by itself. Segment layout::

    header   64 bytes   magic b"PSSHM001", token (16 bytes), slots (u64), slot_bytes (u64)
    slot i   16 bytes   seq (u64, odd while being written), version (u64)
             then the tensors, each at its spec's offset (8-byte aligned), C order

Usage::

    pub = ThetaSegment.create(layout); ref = pub.publish(version, theta)     # server
    reader = ThetaReader.attach(welcome.meta["shm"]); theta = reader.read(ref)  # worker (None: re-pull)
"""
from __future__ import annotations

import dataclasses
import logging
import math
import mmap
import os
import re
import secrets

import numpy as np

from common.int8 import Int8Blocks
from common.protocol import DTYPES, Encoded, Message, MsgType, ProtocolError, decode_wire, within_bounds
from common.tuning import ReusedBuffers

log = logging.getLogger("common.shm")

SHM_DIR = "/dev/shm"
MAGIC = b"PSSHM001"
HEADER = 64
#: a gradient is copied out of shared memory in blocks of this many values, each checked right after its copy
COPY_BLOCK = 1 << 21
SLOT_HEADER = 16
SLOTS = 3
_NAME = re.compile(r"^ps[tg]-[0-9a-z-]{1,64}$")


def available() -> bool:
    return os.path.isdir(SHM_DIR) and os.access(SHM_DIR, os.W_OK)


def sweep_stale() -> list[str]:
    """Remove segments left by processes of ours that died without closing them (kill -9): a name carries its
    creator's process id. Returns the names removed."""
    removed = []
    try:
        names = os.listdir(SHM_DIR)
    except OSError:
        return removed
    for name in names:
        if not _NAME.match(name):
            continue
        try:
            pid = int(name.split("-")[1])
            os.kill(pid, 0)
        except ProcessLookupError:
            try:
                os.unlink(os.path.join(SHM_DIR, name))
                removed.append(name)
            except OSError:
                pass
        except (ValueError, IndexError, PermissionError):   # not ours to judge (another user's process)
            continue
    return removed


def _specs(tensors_layout: dict[str, list]) -> tuple[list[list], int]:
    """[[name, dtype, shape, offset]] in name order, and the bytes they need (8-byte aligned)."""
    specs, offset = [], 0
    for name in sorted(tensors_layout):
        dtype, shape = tensors_layout[name]
        specs.append([name, dtype, list(shape), offset])
        offset += -(-math.prod(shape) * np.dtype(dtype).itemsize // 8) * 8
    return specs, offset


class Segment:
    """A named file in /dev/shm, mapped into memory. The creator unlinks it on close."""

    def __init__(self, name: str, size: int, create: bool):
        if not _NAME.match(name):
            raise ProtocolError(f"shared-memory segment name {name!r} is not one of ours")
        self.name, self.owner = name, create
        path = os.path.join(SHM_DIR, name)
        flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0)
        fd = os.open(path, flags, 0o600)
        try:
            if create:
                # reserve the pages now: a full /dev/shm (Docker's default is 64 MB) must fail here with
                # ENOSPC, not later with SIGBUS on the first write into the mapping
                try:
                    os.posix_fallocate(fd, 0, size)
                except OSError:
                    os.close(fd)
                    fd = -1
                    os.unlink(path)
                    raise
            else:
                size = os.fstat(fd).st_size
            if size <= 0:
                raise ProtocolError(f"shared-memory segment {name!r} is empty")
            self.map = mmap.mmap(fd, size)
        finally:
            if fd >= 0:
                os.close(fd)
        self.size = size
        self.buf = np.frombuffer(self.map, dtype=np.uint8)

    def view(self, dtype: str, shape: list, offset: int) -> np.ndarray:
        if dtype not in DTYPES:
            raise ProtocolError(f"shared memory: unknown dtype {dtype!r}")
        if (not isinstance(shape, list) or len(shape) > 16
                or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
            raise ProtocolError(f"shared memory: bad shape {shape!r}")
        nbytes = math.prod(shape) * DTYPES[dtype].itemsize
        if not isinstance(offset, int) or offset < 0 or offset + nbytes > self.size:
            raise ProtocolError(f"shared memory: {dtype}{shape} at offset {offset} lies outside the "
                                f"{self.size}-byte segment {self.name!r}")
        return self.buf[offset:offset + nbytes].view(DTYPES[dtype]).reshape(shape)

    def close(self) -> None:
        if self.map is None:
            return
        self.buf = None
        try:
            self.map.close()
        except BufferError:   # a view is still alive somewhere; the mapping goes with it
            pass
        self.map = None
        if self.owner:
            try:
                os.unlink(os.path.join(SHM_DIR, self.name))
            except FileNotFoundError:
                pass


def _counters(seg: Segment, slot: int, slot_bytes: int) -> np.ndarray:
    start = HEADER + slot * slot_bytes
    return seg.buf[start:start + SLOT_HEADER].view(np.uint64)


class ThetaSegment:
    """Server side: theta published into SLOTS slots, one slot per version (the oldest is reused)."""

    def __init__(self, seg: Segment, specs: list[list], slot_bytes: int, token: str):
        self.seg, self.specs, self.slot_bytes, self.token = seg, specs, slot_bytes, token
        self.latest: tuple[int, int, int] | None = None   # (version, slot, seq)
        self.next_slot = 0

    @classmethod
    def create(cls, layout: dict[str, list]) -> "ThetaSegment":
        sweep_stale()
        specs, data = _specs(layout)
        slot_bytes = SLOT_HEADER + data
        token = secrets.token_hex(8)
        seg = Segment(f"pst-{os.getpid()}-{token}", HEADER + SLOTS * slot_bytes, create=True)
        seg.buf[:8] = np.frombuffer(MAGIC, np.uint8)
        seg.buf[8:24] = np.frombuffer(token.encode(), np.uint8)
        seg.buf[24:40].view(np.uint64)[:] = (SLOTS, slot_bytes)
        return cls(seg, specs, slot_bytes, token)

    def info(self) -> dict:
        """What WELCOME tells a worker (meta shm)."""
        return {"name": self.seg.name, "token": self.token, "slots": SLOTS, "slot_bytes": self.slot_bytes,
                "specs": self.specs}

    def publish(self, version: int, theta: dict[str, np.ndarray]) -> dict:
        """Write theta (once per version) into a slot; returns the reference a PARAMS reply carries."""
        if self.latest is None or self.latest[0] != version:
            slot = self.next_slot
            self.next_slot = (slot + 1) % SLOTS
            counters = _counters(self.seg, slot, self.slot_bytes)
            seq = int(counters[0]) + 1
            counters[0] = seq                      # odd: being written
            base = HEADER + slot * self.slot_bytes + SLOT_HEADER
            for name, dtype, shape, offset in self.specs:
                np.copyto(self.seg.view(dtype, shape, base + offset), theta[name], casting="no")
            counters[1] = version
            counters[0] = seq + 1                  # even: complete
            self.latest = (version, slot, seq + 1)
        version, slot, seq = self.latest
        return {"slot": slot, "seq": seq, "version": version}

    def close(self) -> None:
        self.seg.close()


class ThetaReader:
    """Worker side: copies theta out of the server's segment; None when a slot was rewritten meanwhile."""

    def __init__(self, seg: Segment, info: dict):
        self.seg, self.specs, self.slot_bytes = seg, info["specs"], int(info["slot_bytes"])
        self.slots = int(info["slots"])

    @classmethod
    def attach(cls, info: dict | None) -> "ThetaReader | None":
        """Open the segment WELCOME named; None (use the socket) when it is not on this host."""
        if not info or not available():
            return None
        try:
            seg = Segment(str(info["name"]), 0, create=False)
        except (OSError, ProtocolError, KeyError, ValueError):
            return None
        token = str(info.get("token", "")).encode()
        if seg.size < HEADER or bytes(seg.buf[:8]) != MAGIC or bytes(seg.buf[8:8 + len(token)]) != token:
            seg.close()   # a segment of that name, but not this server's: another host's /dev/shm
            return None
        return cls(seg, info)

    def read(self, ref: dict, out: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray] | None:
        slot = int(ref["slot"])
        if not 0 <= slot < self.slots:
            raise ProtocolError(f"shared memory: slot {slot} out of range")
        counters = _counters(self.seg, slot, self.slot_bytes)
        if int(counters[0]) != ref["seq"] or int(counters[1]) != ref["version"]:
            return None
        base = HEADER + slot * self.slot_bytes + SLOT_HEADER
        out = {} if out is None else out
        for name, dtype, shape, offset in self.specs:
            src = self.seg.view(dtype, shape, base + offset)
            if name in out and out[name].shape == src.shape and out[name].dtype == src.dtype:
                np.copyto(out[name], src)
            else:
                out[name] = src.copy()
        if int(counters[0]) != ref["seq"]:   # rewritten while we copied
            return None
        return out

    def close(self) -> None:
        self.seg.close()


class GradientWriter:
    """Worker side: this worker's own segment for gradients; `write` returns the PUSH's meta shm."""

    def __init__(self, layout: dict[str, list]):
        self.specs, size = _specs(layout)
        sweep_stale()
        self.seg = Segment(f"psg-{os.getpid()}-{secrets.token_hex(8)}", max(8, size), create=True)

    def write(self, grads: dict[str, np.ndarray]) -> dict:
        """Copy the gradients into the segment (`Encoded` 16-bit values widened to float32 on the way, `Int8Blocks`
        dequantized: the values the server would have decoded from the socket)."""
        for name, dtype, shape, offset in self.specs:
            g, dst = grads[name], self.seg.view(dtype, shape, offset)
            if isinstance(g, Int8Blocks):
                g.to_float32(out=dst)
            elif isinstance(g, Encoded):
                decode_wire(g, out=dst)
            else:
                np.copyto(dst, g, casting="same_kind")
        return {"name": self.seg.name, "specs": self.specs}

    def close(self) -> None:
        self.seg.close()


def copy_checked(dst: np.ndarray, src: np.ndarray) -> bool:
    """Copy `src` into `dst` (same shape and dtype) and say whether every copied value is finite and within
    +-MAX_GRADIENT, in one pass over memory: torch copies a block on the process's threads, and its smallest
    and largest values are taken while the block is still in the cache (both are within the bounds exactly when
    every value is: NaN fails every comparison). It is `dst` that is
    checked, the copy that will be used, not the shared source, which its writer could change meanwhile.
    Measured at 25M float32 on this 2-core machine: 8.3 ms, against 9.0 for numpy's copy and 2.5 more for a
    separate check."""
    import torch
    if not (dst.flags.c_contiguous and src.flags.c_contiguous):   # (what read() passes always is)
        np.copyto(dst, src)
        return dst.dtype.kind != "f" or within_bounds(dst)
    d, s = torch.from_numpy(dst).view(-1), torch.from_numpy(src).view(-1)
    floating = d.is_floating_point()
    finite = True
    for i in range(0, d.numel(), COPY_BLOCK):
        block = d[i:i + COPY_BLOCK]
        block.copy_(s[i:i + COPY_BLOCK])
        if floating and finite:
            finite = within_bounds(block)
    return finite


class GradientReaders:
    """Server side: the workers' gradient segments, opened on first use; `read` copies a gradient out.

    The copy goes into a buffer from one pool shared by every segment, reused once nothing refers to the
    gradient it held any more (every array handed out is a view of it, so its reference count says so): a
    fresh model-size allocation per push costs its page faults on the server's only thread (measured at 25M on
    this 2-core machine: the copy into fresh memory was most of a shared-memory push's handling). A gradient
    still held (a sync step waiting for the others) is never overwritten: another buffer is used. In ssp/async
    a gradient is applied and let go of before the next push is read, so one buffer serves every worker (it
    was one per worker: 4 workers at 25M held 3 x 95 MB more); the pool keeps at most max(POOL, segments)."""

    POOL = 2

    def __init__(self, limit: int = 1024):
        self.segments: dict[str, Segment] = {}
        self.limit = limit
        self.buffers = ReusedBuffers(self.POOL)

    @property
    def pool(self) -> list:
        """The buffers retained (in use or free)."""
        return [b for held in self.buffers.buffers.values() for b in held]

    @property
    def allocations(self) -> int:
        return self.buffers.allocations

    def _trim(self) -> None:
        """Let go of free buffers beyond what the pool keeps (after a worker is gone)."""
        self.buffers.keep = max(self.POOL, len(self.segments))
        self.buffers.trim()

    def _buffer(self, size: int) -> np.ndarray:
        self.buffers.keep = max(self.POOL, len(self.segments))
        return self.buffers.get(size)

    def read(self, ref: dict, checked: dict | None = None) -> dict[str, np.ndarray]:
        """The gradient `ref` names, copied out of its segment; `checked` (a dict) receives {name: finite?}."""
        if not isinstance(ref, dict) or not isinstance(ref.get("name"), str) or not isinstance(ref.get("specs"), list):
            raise ProtocolError("meta shm of a PUSH must be {name, specs}")
        name = ref["name"]
        seg = self.segments.get(name)
        if seg is None:
            if not name.startswith("psg-"):
                raise ProtocolError(f"shared-memory segment name {name!r} is not a gradient segment")
            try:
                seg = Segment(name, 0, create=False)
            except OSError as exc:
                raise ProtocolError(f"cannot open shared-memory segment {name!r} ({exc.strerror}); the worker is "
                                    "not on this host: it must push over the socket") from None
            if len(self.segments) >= self.limit:
                self.segments.pop(next(iter(self.segments))).close()
            self.segments[name] = seg
        srcs = {}
        for spec in ref["specs"]:
            if not isinstance(spec, list) or len(spec) != 4 or not isinstance(spec[0], str):
                raise ProtocolError(f"bad shared-memory spec {spec!r}: expected [name, dtype, shape, offset]")
            srcs[spec[0]] = (seg.view(spec[1], spec[2], spec[3]), spec[3])   # bounds-checked against the segment
        buf = self._buffer(seg.size)   # the same layout as the segment: every spec fits (checked above)
        out = {}
        for key, (src, offset) in srcs.items():
            dst = buf[offset:offset + src.nbytes].view(src.dtype).reshape(src.shape)
            finite = copy_checked(dst, src)
            if checked is not None:
                checked[key] = finite
            out[key] = dst
        return out

    def forget(self, name: str) -> None:
        """A worker is gone: close its segment; the pool shrinks with the segments (a gradient still held keeps
        its buffer)."""
        seg = self.segments.pop(name, None)
        if seg is not None:
            seg.close()
        self._trim()

    def close(self) -> None:
        for seg in self.segments.values():
            seg.close()
        self.segments = {}
        self.buffers.clear()


class ServerTransport:
    """The server's side of the shared-memory transport, applied to messages as they are decoded
    (`inbound`: a PUSH's gradient is read from the worker's segment) and before they are encoded
    (`outbound`: WELCOME names theta's segment; PARAMS for a pull that asked for it go through it).
    Only peers that offered shared memory in REGISTER are answered through it."""

    MAX_PEERS = 4096

    def __init__(self):
        self.theta: ThetaSegment | None = None
        self.grads = GradientReaders()
        self.peers: dict[bytes, bool] = {}    # routing identity -> its last pull asked for shared memory
        self.failed = ""                      # why theta's segment could not be made (then: sockets only)

    def inbound(self, identity: bytes, msg: Message) -> Message:
        if msg.type == MsgType.REGISTER and msg.meta.get("shm_offer") is True:
            self._peer(identity, False)
        elif msg.type == MsgType.PULL and identity in self.peers:
            self._peer(identity, msg.meta.get("shm") is True)
        elif msg.type == MsgType.PUSH and "shm" in msg.meta and not msg.tensors:
            msg.checked = {}
            msg.tensors = self.grads.read(msg.meta["shm"], msg.checked)
        return msg

    def _peer(self, identity: bytes, shm_pull: bool) -> None:
        """Note a peer, most recent last; beyond MAX_PEERS the least recently heard one is forgotten (it is
        answered over the socket from then on), so refused or restarted clients do not pile up."""
        self.peers.pop(identity, None)
        self.peers[identity] = shm_pull
        if len(self.peers) > self.MAX_PEERS:
            del self.peers[next(iter(self.peers))]

    def outbound(self, identity: bytes, msg: Message) -> Message:
        if identity not in self.peers or not msg.tensors:
            return msg
        if msg.type == MsgType.WELCOME:
            if self.theta is None and not self.failed:
                try:
                    self.theta = ThetaSegment.create({n: [t.dtype.name, list(t.shape)]
                                                      for n, t in msg.tensors.items()})
                except OSError as exc:   # /dev/shm too small or not writable: everyone uses the socket
                    self.failed = f"{exc.strerror or exc}"
                    log.warning("no shared memory for theta (%s): workers on this host use the socket", self.failed)
            if self.theta is None:
                return msg
            return dataclasses.replace(msg, meta={**msg.meta, "shm": self.theta.info()})
        if (msg.type == MsgType.PARAMS and self.peers[identity] and self.theta is not None
                and not any(isinstance(t, Encoded) for t in msg.tensors.values())):
            # (theta's slots hold float32: a pull that asked for a 16-bit wire as well gets it over the socket)
            ref = self.theta.publish(msg.version, msg.tensors)
            return dataclasses.replace(msg, tensors={}, meta={**msg.meta, "shm": ref})
        return msg

    def close(self) -> None:
        if self.theta is not None:
            self.theta.close()
            self.theta = None
        self.grads.close()
