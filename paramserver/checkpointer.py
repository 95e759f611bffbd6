"""Checkpoints of the server: what is saved, writing it, resuming from it, and what a resume forgets.

A checkpoint holds theta and the optimizer state (the store), the policy's position and counters,
the server's event counters (saved with the policy's, as one `counters` map), the config, the
job and its shard map, and every worker's dedup record (a request applied before a crash is not
applied again after it). A resume checks the flags it must match (RESUME_MUST_MATCH, unless
--resume-override), restores all of it, and holds pulls until the checkpoint's live workers are
back. A sync step that was unfinished is redone: the gradients it held are not in the checkpoint,
so the cached answers that said "accumulated" are forgotten and their resends accumulated again.

Usage::

    ckpt = Checkpointer(cfg, store, policy, sessions, job, events, record)
    ckpt.resume(path)           # at start-up (ConfigError when it does not fit this server)
    ckpt.write()                # False when it could not be written (logged, counted)
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections import Counter
from typing import Callable

from common.checkpoint import load_checkpoint, save_checkpoint
from common.config import ConfigError, ServerConfig
from common.protocol import MsgType, ProtocolError, decode
from common.tuning import release_free_memory
from paramserver.consistency import Consistency
from paramserver.job import Job
from paramserver.metrics import ServerMetrics, merge_counters
from paramserver.sessions import Sessions
from paramserver.store import ParamStore

log = logging.getLogger("paramserver.server.checkpointer")   # (under the server's: its level applies)

#: flags a checkpoint must have been written with to be resumed (unless --resume-override)
RESUME_MUST_MATCH = ("mode", "aggregate", "lr", "num_workers")
#: the policy's counters (it counts gradients: received, applied, updates, dropped:<reason>); every other counter of
#: a checkpoint is one of the server's own events (malformed, refused:<code>, dead, disconnects, ...), so an event
#: added later needs no list to go back onto the server's counter at a resume
POLICY_COUNTERS = frozenset({"received", "applied", "updates"})


def is_server_event(key: str) -> bool:
    return key not in POLICY_COUNTERS and not key.startswith("dropped:")


def check_writable(flag: str, path: str) -> None:
    """Refuse at start-up an output file whose folder cannot be made or written (not at the first write)."""
    if not path:
        return
    if os.path.isdir(path):
        raise ConfigError(f"{flag} {path} is a folder; give a file path in it")
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"{flag} {path}: cannot create its folder {folder} ({exc.strerror})") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ConfigError(f"{flag} {path}: its folder {folder} is not writable")


class Checkpointer:
    """Saves and restores the server's state (see the module docstring)."""

    def __init__(self, cfg: ServerConfig, store: ParamStore, policy: Consistency, sessions: Sessions, job: Job,
                 events: Counter, record: ServerMetrics):
        self.cfg, self.store, self.policy, self.sessions, self.job = cfg, store, policy, sessions, job
        self.events, self.record = events, record
        self.last_checkpoint: dict = {}   # {path, version, written_s, seconds} of the last one written
        self.resumed_from: dict = {}      # {path, version} of the checkpoint this server resumed
        self.final_checkpoint_failed = False   # the checkpoint at close could not be written (exit 1)
        for flag, path in (("--checkpoint", cfg.checkpoint), ("--metrics", cfg.metrics)):
            check_writable(flag, path)

    def state_dict(self) -> dict:
        policy = self.policy.state_dict()
        policy["counters"] = merge_counters(policy.get("counters", {}), self.events)
        return {**self.store.state_dict(), "optimizer": self.cfg.optimizer, **policy,
                "config": dataclasses.asdict(self.cfg), "job": self.job.flags,
                "workers": self.sessions.state_dict(self.policy.awaiting),
                "shard": self.job.shard, "shard_layout": self.job.layout}

    def write(self) -> bool:
        """Write --checkpoint. A write that fails (a full disk, a folder gone) is logged and counted
        (checkpoint_errors) and returns False; theta stays in memory and the server keeps serving (the next
        write may succeed). True when written or when there is nothing to write."""
        if not self.cfg.checkpoint or not self.store.initialized:
            return True
        t0 = time.monotonic()
        try:
            save_checkpoint(self.cfg.checkpoint, self.state_dict())
        except OSError as exc:
            self.events["checkpoint_errors"] += 1
            log.error("checkpoint at version %d NOT written to %s: %s; the server keeps serving (theta is in memory)",
                      self.store.version, self.cfg.checkpoint, exc)
            return False
        finally:
            release_free_memory()   # the checkpoint's copies of theta and optimizer state go back to the system
        self.last_checkpoint = {"path": self.cfg.checkpoint, "version": self.store.version,
                                "written_s": self.record.elapsed(),
                                "seconds": round(time.monotonic() - t0, 3)}
        log.info("checkpoint at version %d -> %s", self.store.version, self.cfg.checkpoint)
        return True

    def save_outputs(self, metrics: Callable[[], dict]) -> None:
        """At close: the final checkpoint, and --metrics (`metrics()`, written whole or not at all)."""
        self.final_checkpoint_failed = not self.write()
        if self.cfg.metrics:
            try:
                os.makedirs(os.path.dirname(os.path.abspath(self.cfg.metrics)), exist_ok=True)
                tmp = self.cfg.metrics + ".tmp"
                with open(tmp, "w") as f:
                    json.dump(metrics(), f)
                os.replace(tmp, self.cfg.metrics)
            except OSError as exc:
                log.error("metrics NOT written to %s: %s", self.cfg.metrics, exc)

    def _check_fits(self, path: str, state: dict) -> None:
        """ConfigError naming the flag to change when the checkpoint was written by another kind of server."""
        if state.get("optimizer", self.cfg.optimizer) != self.cfg.optimizer:
            raise ConfigError(f"checkpoint {path} was written with --optimizer {state['optimizer']}; "
                              f"resume with the same optimizer")
        shard = state.get("shard", {"index": 0, "count": 1, "plan": ""})
        if (shard["index"], shard["count"]) != (self.cfg.shard_index, self.cfg.num_shards):
            raise ConfigError(f"checkpoint {path} holds shard {shard['index']} of {shard['count']}; resume it with "
                              f"--shard-index {shard['index']} --num-shards {shard['count']}")
        saved = state.get("config", {})
        changed = [f"--{k.replace('_', '-')} {saved[k]} (now {getattr(self.cfg, k)})" for k in RESUME_MUST_MATCH
                   if k in saved and saved[k] != getattr(self.cfg, k)]
        if changed and not self.cfg.resume_override:
            raise ConfigError(f"checkpoint {path} was written with {', '.join(changed)}; resume with the same "
                              "flags, or add --resume-override to continue under the new ones")

    def resume(self, path: str) -> None:
        """Restore the server from the checkpoint at `path` and hold pulls until its live workers are back."""
        state = load_checkpoint(path)
        self._check_fits(path, state)
        self.job.shard = dict(state.get("shard", {"index": 0, "count": 1, "plan": ""}))
        self.job.layout = dict(state.get("shard_layout", {}))
        self.store.load_state_dict(state)
        self.policy.load_state_dict(state)
        for key in [k for k in self.policy.counters if is_server_event(k)]:   # the server's events are its own
            self.events[key] += self.policy.counters.pop(key)
        self.job.flags = state.get("job", {})
        back = self.sessions.load_state_dict(state.get("workers", {}))
        if state.get("pending_gradients"):
            self.forget_dropped_acks()
        self.policy.await_workers(back)
        self.resumed_from = {"path": path, "version": self.store.version}
        log.info("resumed from %s at version %d (step %d), theta crc32 %s", path, self.store.version,
                 self.policy.step, self.store.checksum())
        if back:
            log.info("holding pulls until workers %s re-register (or each has been silent for --worker-timeout "
                     "%gs)", ", ".join(map(str, back)), self.cfg.worker_timeout)

    def forget_dropped_acks(self) -> None:
        """A resumed sync step starts again without the gradients the checkpoint held for it (they are not in
        it): a worker whose cached answer says its push was accumulated for that step would be told so again
        when it resends, and its gradient would be applied zero times. Forget those answers, so that the resend
        is handled as a new push and accumulated again."""
        for worker, st in self.sessions.workers.items():
            if not st.last_reply or st.last_reply_seq != st.last_seq:
                continue
            try:
                ack = decode(st.last_reply)
            except ProtocolError:
                continue
            if ack.type == MsgType.ACK and ack.meta.get("status") == "accumulated" and ack.clock == self.policy.step:
                st.last_reply, st.last_seq = None, st.last_seq - 1
                log.info("worker %d's push for step %d was held in the unfinished step: its resend is accumulated "
                         "again", worker, ack.clock)
