"""Worker processes for the benchmarks: start N, release them at once, collect one result each, tear down.

`bench throughput` (async capacity) and `bench shards` (aggregate push+pull throughput) both start N
worker processes that connect, register, wait for each other, move theta for a fixed time and report
a dict; this module is that shape once. The parent joins the start barrier, so the wall time it
measures starts when the workers start. A worker that fails reports its error (and breaks the
barrier, so nobody waits for it); the parent raises it as one line. Processes still alive at the end
are killed. (These are measurement functions, not training workers: a bench that trains starts
`paramserver worker` processes the one way the cluster and the tests do, `launch.launch_worker`.)

The target is called as ``target(rank, *args, sync=Sync)`` in a fresh ("spawn") process and returns
the dict to report: it calls ``sync.registered(rank)`` once connected (rank 0 first: it brings theta)
and ``sync.start.wait()`` when ready to go.

Usage::

    rows, wall = run_workers(_pusher, 4, (address, size, seconds), timeout=seconds + 300)
"""
from __future__ import annotations

import multiprocessing as mp
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable


@dataclass
class Sync:
    """What the processes of one measurement share: the start barrier (N workers + the parent) and the
    event rank 0 sets once it has registered (the others register after it: it brings theta)."""

    start: Any
    ready: Any
    timeout: float

    def registered(self, rank: int) -> None:
        """Rank 0: theta is on the server now. Others: wait until it is (call before registering)."""
        if rank == 0:
            self.ready.set()
        elif not self.ready.wait(timeout=self.timeout):
            raise TimeoutError("rank 0 did not register in time")


def _entry(target: Callable[..., dict], rank: int, args: tuple, sync: Sync, results) -> None:
    try:
        out = target(rank, *args, sync=sync)
        results.put({"rank": rank, **out})
    except BaseException as exc:   # reported to the parent, which raises it
        sync.start.abort()         # nobody waits at the barrier for a worker that will not come
        sync.ready.set()
        results.put({"rank": rank, "error": f"failed: {type(exc).__name__}: {exc}",
                     "secondary": isinstance(exc, threading.BrokenBarrierError)})   # another worker's failure


def _silent(procs: list, rows: list[dict], results) -> bool:
    """Did a worker exit without reporting (killed, or dead in start-up)? Then it gets an error row here."""
    done = {r["rank"] for r in rows}
    silent = [(r, p.exitcode) for r, p in enumerate(procs) if r not in done and p.exitcode is not None]
    if not silent:
        return False
    time.sleep(0.5)   # its last words may still be in the queue's pipe
    while True:
        try:
            rows.append(results.get(timeout=0.1))
        except queue.Empty:
            break
    done = {r["rank"] for r in rows}
    for r, code in silent:
        if r not in done:
            rows.append({"rank": r, "error": f"exited with code {code} without reporting"})
    return True


def _join_barrier(sync: Sync, timeout: float) -> None:
    try:
        sync.start.wait(timeout=timeout)
    except threading.BrokenBarrierError:
        pass   # a worker failed before the start: its error is in the queue


def run_workers(target: Callable[..., dict], n: int, args: tuple, timeout: float,
                start_timeout: float = 300.0) -> tuple[list[dict], float]:
    """Run `target` in n processes; returns (their dicts in rank order, seconds from the common start to
    the last result). Raises RuntimeError naming the first worker error."""
    ctx = mp.get_context("spawn")
    sync = Sync(start=ctx.Barrier(n + 1), ready=ctx.Event(), timeout=start_timeout)
    results = ctx.Queue()
    procs = [ctx.Process(target=_entry, args=(target, r, args, sync, results), daemon=True) for r in range(n)]
    rows: list[dict] = []
    try:
        for p in procs:
            p.start()
        # the parent joins the start barrier in a thread, so that a worker dying before it (without a word,
        # e.g. killed) is noticed here: the barrier is then broken and its exit code reported
        released = threading.Thread(target=_join_barrier, args=(sync, start_timeout), daemon=True)
        released.start()
        while released.is_alive():
            released.join(timeout=0.5)
            if released.is_alive() and _silent(procs, rows, results):
                sync.start.abort()
        t0 = time.perf_counter()
        deadline = time.monotonic() + timeout
        while len(rows) < n and not any("error" in r for r in rows):
            try:
                rows.append(results.get(timeout=1.0))
            except queue.Empty:
                if not _silent(procs, rows, results) and time.monotonic() > deadline:
                    raise RuntimeError(f"{n - len(rows)} of {n} bench workers did not report within {timeout:.0f}s")
        wall = time.perf_counter() - t0
        failed = any("error" in r for r in rows)
        give_up = time.monotonic() + 5.0
        while failed and len(rows) < n and time.monotonic() < give_up:   # the others' errors: which came first
            try:
                rows.append(results.get(timeout=0.5))
            except queue.Empty:
                pass
        for p in procs:
            p.join(timeout=1 if failed else 60)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=10)
    errors = sorted((r for r in rows if "error" in r), key=lambda r: r.get("secondary", False))
    if errors:
        raise RuntimeError(f"bench worker {errors[0]['rank']} {errors[0]['error']}")
    return sorted(rows, key=lambda r: r["rank"]), wall
