"""An EMULATED network link for benchmarks on one machine: `--link-mbps X`.

Nothing here limits a real network. A client (worker/client.py) that is given a `Link` calls
`pace(nbytes)` before it puts a request on its socket and after it receives a reply; the link is
busy for nbytes * 8 / (X * 1e6) seconds per message, and a message that finds it busy waits for the
messages before it (one link per worker: the connections to K shards share it, as they would share
a worker's network card). The time a message spends on the emulated link is counted, never measured
(`paced_s`, reported as the client's stats["link_s"]), so a test can check it against the bytes.

Both directions share one link (half duplex: a request and its reply never overlap anyway, and a
worker's pushes and pulls alternate). Latency is not emulated, only bandwidth.

Usage::

    link = Link(100)                  # 100 Mb/s
    seconds = link.pace(12_500_000)   # sleeps ~1 s; returns the seconds this message was charged
"""
from __future__ import annotations

import threading
import time


class Link:
    """One emulated link of `mbps` megabits per second (see the module docstring)."""

    def __init__(self, mbps: float):
        if mbps <= 0:
            raise ValueError(f"an emulated link needs a positive rate in Mb/s, not {mbps}")
        self.mbps = float(mbps)
        self._busy_until = 0.0
        self._lock = threading.Lock()

    def seconds(self, nbytes: int) -> float:
        """How long `nbytes` occupy this link."""
        return nbytes * 8 / (self.mbps * 1e6)

    def pace(self, nbytes: int) -> float:
        """Hold the caller until `nbytes` would have crossed the link (after anything already on it); returns
        the seconds charged, nbytes * 8 / rate."""
        cost = self.seconds(nbytes)
        with self._lock:
            now = time.monotonic()
            self._busy_until = max(now, self._busy_until) + cost
            done = self._busy_until
        delay = done - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        return cost
