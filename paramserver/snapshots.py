"""Snapshots of theta for pulls: copy on write, recycled buffers, 16-bit wire copies.

A pull is answered from `take()`: (version, read-only views of theta). Nothing is copied per
version: the server hands the tracker of every send of a snapshot to `track()`, and an update that
finds theta still being sent (or handed out untracked) first moves theta to a recycled buffer
(`writable()`, copy on write), leaving the old one frozen until ZeroMQ has let go of it. So a pull
never sees theta change under it, and memory stays theta + optimizer state + the snapshots in
flight. `take(..., "bf16")` / `take(..., "fp16")` give 16-bit wire copies, one per version, pooled
the same way. This part owns the buffers and their counters; theta itself is the store's.

Usage (paramserver/store.py does this)::

    snaps = Snapshots(spares=2, stall_s=0.5); snaps.reset(theta, version=0)
    version, views = snaps.take(theta, 0); snaps.track(version, sock.send_multipart(..., track=True))
    moved = snaps.writable(theta)      # before theta changes: None, or the arrays theta must move to
"""
from __future__ import annotations

import time

import numpy as np

from common.protocol import WIRE_DTYPES, Encoded, encode_wire

#: free 16-bit wire snapshot buffers kept for reuse (more are released to the allocator)
POOL_KEEP = 2


class Buffer:
    """One set of theta-shaped arrays and the sends that still read it."""

    __slots__ = ("arrays", "version", "trackers", "leases")

    def __init__(self, arrays: dict, version: int = -1):
        self.arrays, self.version, self.leases = arrays, version, 0
        self.trackers: list = []   # (MessageTracker, when the send began)

    def busy(self) -> bool:
        """Somebody may still read it: an untracked hand-out, or a send ZeroMQ has not finished."""
        if self.leases:
            return True
        self.trackers = [(t, t0) for t, t0 in self.trackers if not t.done]
        return bool(self.trackers)

    def stalled(self, now: float, after: float) -> bool:
        """Has one of its sends been going on for over `after` seconds (a slow or stalled reader)?"""
        return any(now - t0 > after for t, t0 in self.trackers if not t.done)

    def wait(self, after: float) -> float:
        """Until no send reads it any more or one of them has taken `after` s; returns the seconds waited."""
        t0 = time.monotonic()
        while self.busy() and not self.stalled(time.monotonic(), after):
            time.sleep(0.0005)
        return time.monotonic() - t0


class Snapshots:
    """theta's buffers: the live one (theta itself), former ones still being sent (frozen), free ones kept
    for reuse, and the 16-bit wire copies of each kind; with the counters the server's status reports."""

    def __init__(self, spares: int = 2, stall_s: float = 0.5):
        if spares < 0:
            raise ValueError(f"--snapshot-buffers must be >= 0, not {spares}")
        self.spares = spares    # theta-sized buffers that sends in flight may hold besides theta itself
        # a send of theta older than this belongs to a slow or stalled reader: an update no longer waits for it,
        # and its buffer no longer counts against `spares` (so one stalled worker cannot make every update wait)
        self.stall_s = stall_s
        self.waited_s = 0.0     # time updates spent waiting for a send to release a buffer (the cap)
        self.over_cap = 0       # buffers allocated beyond the cap because the sends were slow (pinned)
        self.copies = 0         # copy-on-write moves of theta (a send was still reading it)
        self.allocations = 0    # snapshot buffers allocated (not recycled)
        self.reset({}, 0)

    def reset(self, theta: dict[str, np.ndarray], version: int) -> None:
        """theta (new arrays, nothing sending them) is the live buffer; every other buffer is forgotten."""
        self.live = Buffer(theta, version)  # the buffer theta lives in
        self._frozen: list[Buffer] = []     # former theta buffers still being sent
        self._free: list[dict] = []         # theta-shaped buffers ready for reuse
        self._wire: dict[str, Buffer] = {}  # wire dtype -> 16-bit snapshot of the current version
        self._wire_frozen: list[tuple[str, Buffer]] = []
        self._wire_free: dict[str, list[dict]] = {}

    def take(self, theta: dict[str, np.ndarray], version: int, wire: str = "fp32") -> tuple[int, dict]:
        """(version, theta) for a reply: read-only views that never change. Pass the send's
        MessageTracker to `track(version, tracker, wire)`; an untracked snapshot is never recycled.
        With wire "bf16" / "fp16" the values are `Encoded` 16-bit copies, made once per version."""
        if wire == "fp32":
            self.live.leases += 1
            return version, _readonly(theta)
        if wire not in WIRE_DTYPES:
            raise ValueError(f"unknown wire dtype {wire!r}; choose one of {', '.join(WIRE_DTYPES)}")
        buf = self._wire.get(wire)
        if buf is None or buf.version != version:
            if buf is not None:
                self._wire_frozen.append((wire, buf))
            self._recycle()
            free = self._wire_free.setdefault(wire, [])
            reuse = free.pop() if free else None
            if reuse is None:
                self.allocations += 1
            arrays = {n: _narrow(t, wire, reuse[n] if reuse else None) for n, t in theta.items()}
            buf = self._wire[wire] = Buffer(arrays, version)
        buf.leases += 1
        return version, {n: Encoded(_readonly({n: e.bits})[n], e.wire) if isinstance(e, Encoded)
                         else _readonly({n: e})[n] for n, e in buf.arrays.items()}

    def track(self, version: int, tracker, wire: str = "fp32") -> None:
        """The snapshot of `version` handed out by `take()` is being sent; `tracker.done` says
        when ZeroMQ no longer reads it (pyzmq's MessageTracker). Unknown versions are ignored."""
        buf = self._buffer(version, wire)
        if buf is not None and buf.leases:
            buf.leases -= 1
            buf.trackers.append((tracker, time.monotonic()))

    def _buffer(self, version: int, wire: str) -> Buffer | None:
        if wire == "fp32":
            for b in [self.live] + self._frozen:
                if b.version == version:
                    return b
            return None
        cur = self._wire.get(wire)
        if cur is not None and cur.version == version:
            return cur
        return next((b for w, b in self._wire_frozen if w == wire and b.version == version), None)

    def writable(self, theta: dict[str, np.ndarray], copy: bool = True) -> dict | None:
        """Before theta changes: None if nobody may still read the live buffer (theta is written in place), else
        the arrays theta must move to, now the live buffer (copy on write: filled with theta's values, or left
        for the caller to fill with `copy=False`); the old buffer stays frozen until its sends are done."""
        self._recycle()
        if not self.live.busy():
            return None
        if self.spares == 0 and not self.live.leases:   # no spare buffer: wait for the sends instead
            self.waited_s += self.live.wait(self.stall_s)
            if not self.live.busy():
                return None
        arrays = self._spare(theta)
        if copy:
            for n, t in theta.items():
                np.copyto(arrays[n], t)
            self.copies += 1
        if self.live.leases == 0:      # tracked: it comes back to the pool when its sends are done
            self._frozen.append(self.live)
        self.live = Buffer(arrays, self.live.version)
        return arrays

    def _spare(self, theta: dict[str, np.ndarray]) -> dict:
        """A theta-shaped buffer to move theta into. At most `spares` buffers are held by sends in flight
        (frozen) or kept free: when all are taken, the update waits for the oldest send to finish (ZeroMQ's
        I/O thread is copying it out at memory speed), except that a buffer sent for over `stall_s` (a slow or
        stalled reader) is not waited for and no longer counts. So memory is theta + optimizer state +
        `spares` buffers + one per stalled reader (at most one PARAMS per worker is ever in flight)."""
        if self._free:
            return self._free.pop()
        while self.spares:
            young = [b for b in self._frozen if not b.stalled(time.monotonic(), self.stall_s)]
            if len(young) < self.spares:
                break
            self.waited_s += young[0].wait(self.stall_s)
            self._recycle()
            if self._free:
                return self._free.pop()
        self.allocations += 1
        self.over_cap += len(self._frozen) >= self.spares
        return {n: np.empty_like(t) for n, t in theta.items()}

    def _recycle(self) -> None:
        still, done = [], []
        for b in self._frozen:
            (still if b.busy() else done).append(b)
        self._frozen = still
        for b in done:   # frozen + free never exceed the cap
            if len(self._free) + len(still) < self.spares:
                self._free.append(b.arrays)
        wstill = []
        for w, b in self._wire_frozen:
            if b.leases:    # handed out untracked: never reused
                continue
            if b.busy():
                wstill.append((w, b))
            elif len(self._wire_free.setdefault(w, [])) < POOL_KEEP:
                self._wire_free[w].append({n: e.bits if isinstance(e, Encoded) else e for n, e in b.arrays.items()})
        self._wire_frozen = wstill

    def in_flight(self) -> int:
        """Snapshot buffers (theta-sized, fp32 or 16-bit) that sends still read, the live one included."""
        self._recycle()
        return self.live.busy() + len(self._frozen) + len(self._wire_frozen)


def _readonly(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    out = {}
    for n, a in arrays.items():
        v = a.view()
        v.flags.writeable = False
        out[n] = v
    return out


def _narrow(t: np.ndarray, wire: str, out: np.ndarray | None):
    """theta tensor -> its wire copy: float32 narrowed to 16 bits, other dtypes copied as they are."""
    if t.dtype == np.float32:
        return encode_wire(t, wire, out=out)
    if out is None:
        return t.copy()
    np.copyto(out, t)
    return out
