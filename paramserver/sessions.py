"""Sessions: who each worker id is, what it last asked, and whether it is still there.

This part owns the server's record of its workers (`WorkerState`, keyed by worker id) and the
rules that tie a request to one: identity binding (only the session that registered a worker id
may act as it; under --auth also only its key may take it over), sequence deduplication with the
cached reply of the last push or leave (a resend is answered from the record, also across a
re-registration or a restart), the choice of a worker id for an automatic REGISTER, and liveness
(workers silent past --worker-timeout, workers hung past --step-timeout, the workers a resumed
server still waits for). It sends nothing and holds no socket: the server asks and acts.

Usage::

    sessions = Sessions(cfg)
    refusal = sessions.gate(identity, msg, peer)       # None, or (code, text) for an ERROR reply
    reply = sessions.record(msg, peer, handler_reply)  # after the handler: last seq, cached ACK
"""
from __future__ import annotations

import logging
import os
import time
from collections import Counter
from collections.abc import Container
from dataclasses import dataclass
from typing import Callable

import zmq

from common.config import ConfigError, ServerConfig
from common.protocol import Message, MsgType, encode
from paramserver.consistency import Consistency

log = logging.getLogger("paramserver.server.sessions")   # (under the server's: its level applies)

#: requests that carry a per-worker sequence number and are deduplicated (a resend is answered once)
SEQUENCED = frozenset({MsgType.PULL, MsgType.PUSH, MsgType.LEAVE})
#: requests that act as a worker: only the session that registered the worker id may send them
AS_WORKER = SEQUENCED | {MsgType.HEARTBEAT}
#: a sequence number further than this past a worker's last one is refused, not adopted
MAX_SEQ_JUMP = 10_000
#: status tools remembered (their disconnects are routine); beyond this they are not
MAX_TOOLS = 100_000


def load_admin_keys(cfg: ServerConfig) -> set[str]:
    """--auth: the public keys (z85 text) allowed to send SHUTDOWN."""
    if not cfg.auth:
        return set()
    folder = cfg.admins or os.path.join(os.path.dirname(os.path.abspath(cfg.auth)), "admins")
    if not os.path.isdir(folder):
        if cfg.admins:
            raise ConfigError(f"--admins folder {cfg.admins!r} does not exist (make admin keys with "
                              "`paramserver keys DIR --admin NAME`)")
        return set()
    import zmq.auth
    return {k.decode() if isinstance(k, bytes) else k for k in zmq.auth.load_certificates(folder)}


class RequestError(ValueError):
    """A request that decodes but cannot be served; `code` goes into the ERROR reply."""

    def __init__(self, code: str, text: str):
        super().__init__(text)
        self.code = code


@dataclass(frozen=True)
class Peer:
    """Who sent a request: the session of its routing id (protocol.session_of) and, under --auth, its
    CurveZMQ public key (z85; "" without --auth)."""
    session: bytes
    key: str = ""


@dataclass
class WorkerState:
    identity: bytes                   # routing identity replies go to (the newest request's)
    last_seen: float
    session: bytes = b""              # the session the worker id is bound to (protocol.session_of)
    key: str = ""                     # --auth: the CurveZMQ public key (z85) that registered it
    last_seq: int = 0                 # highest sequenced request handled (kept across re-registration)
    last_reply: list | None = None    # cached ACK of the last push/leave, resent on a duplicate
    last_reply_seq: int = 0           # the seq that cached ACK answers (a held reservation has none yet)
    seq_base: int = 0                 # the seq of its last REGISTER (a far jump past both is refused)
    alive: bool = True
    left: bool = False
    registered_at: float = 0.0        # when it last registered (--step-timeout counts from here at the latest)
    params_tracker: zmq.MessageTracker | None = None   # the last PARAMS sent, until ZeroMQ has sent it

    def remember(self, reply: list, seq: int) -> None:
        """Cache the encoded answer to request `seq` (a push or leave): a resend of it gets this again."""
        self.last_reply, self.last_reply_seq = reply, seq

    def params_in_flight(self) -> bool:
        return self.params_tracker is not None and not self.params_tracker.done

    def state_name(self, awaited: bool = False) -> str:
        """left, live, awaited (a resumed server waits for it) or dead."""
        return "left" if self.left else ("live" if self.alive else ("awaited" if awaited else "dead"))


class Sessions:
    """The server's workers by id, identity binding, dedup records and liveness (see the module docstring)."""

    def __init__(self, cfg: ServerConfig, events: Counter):
        self.cfg, self.events = cfg, events
        self._said_all_left = False
        self.workers: dict[int, WorkerState] = {}
        self.tools: set[bytes] = set()   # connections of tools (status, stop): their disconnects are routine
        self.resumed_at: float | None = None   # a resumed server holds pulls until its workers are back
        self._timed_step = (-1, 0.0)     # --step-timeout: (sync step, when it became the current one)
        self.admins = load_admin_keys(cfg)   # --auth: public keys (z85) allowed to send SHUTDOWN

    # -- requests -----------------------------------------------------------------------------

    def gate(self, identity: bytes, msg: Message, peer: Peer) -> tuple[str, str] | None:
        """Check a request that acts as a known worker id: (code, text) to refuse it, else None. A request
        let through refreshes the worker's last_seen and (if sequenced) the route its replies take."""
        state = self.workers.get(msg.worker)
        if state is None or msg.type not in AS_WORKER:
            return None
        if state.session != peer.session:
            return "identity", (f"worker {msg.worker} is bound to another connection; only the connection that "
                                "registered it may act as it (register your own worker)")
        # (a worker that is not live is told `unknown_worker` by the handler and registers again, which resets
        # the base: after a resume from an old checkpoint its seq may be far past the record)
        if msg.type in SEQUENCED and state.alive and msg.seq > max(state.last_seq, state.seq_base) + MAX_SEQ_JUMP:
            return "bad_seq", (f"seq {msg.seq} jumps more than {MAX_SEQ_JUMP} past worker {msg.worker}'s last "
                               f"request ({state.last_seq}); refused")
        state.last_seen = time.monotonic()
        if msg.type in SEQUENCED:
            state.identity = identity
        return None

    def seen_before(self, msg: Message) -> WorkerState | None:
        """The worker's state when `msg` is a sequenced request it has sent before (a resend), else None."""
        state = self.workers.get(msg.worker)
        if state is not None and msg.type in SEQUENCED and msg.seq <= state.last_seq:
            return state
        return None

    @staticmethod
    def cached_reply(msg: Message, state: WorkerState) -> list | None:
        """The recorded answer to a resent push or leave (applied exactly once), or None."""
        if (msg.seq == state.last_seq and msg.type in (MsgType.PUSH, MsgType.LEAVE) and state.last_reply
                and state.last_reply_seq == msg.seq):
            return state.last_reply
        return None

    def record(self, msg: Message, peer: Peer, reply: Message | None) -> Message | list | None:
        """After a handler answered a sequenced request of its own session: advance the worker's last seq and
        cache the answer to a push or leave (returned encoded, as it is cached)."""
        state = self.workers.get(msg.worker)
        if state is None or msg.type not in SEQUENCED or state.session != peer.session:
            return reply
        if reply is not None and reply.type == MsgType.ERROR:
            return reply
        state.last_seq = max(state.last_seq, msg.seq)
        if msg.type in (MsgType.PUSH, MsgType.LEAVE) and reply is not None:
            reply = encode(reply)
            state.remember(reply, msg.seq)
        return reply

    def record_grant(self, worker: int, reply: Message, seq: int) -> list:
        """A reservation answered later (admission granted it a slot): cache the answer, so a resend of the
        reservation gets it again; returns it encoded."""
        frames = encode(reply)
        self.workers[worker].remember(frames, seq)
        return frames

    def known(self, msg: Message) -> WorkerState:
        """The live worker a request names, or RequestError (unknown_worker): it must REGISTER first."""
        state = self.workers.get(msg.worker)
        if state is None or not state.alive:
            raise RequestError("unknown_worker", f"worker {msg.worker} is not registered"
                               f"{' (declared dead or left)' if state else ''}; send REGISTER first")
        return state

    def note_tool(self, identity: bytes) -> None:
        """A status tool's connection (worker < 0): its disconnect is routine."""
        if len(self.tools) < MAX_TOOLS:
            self.tools.add(identity)

    def expected_disconnects(self, rejected: int) -> int:
        """Disconnects that are routine: 2 per worker gone (a worker has 2 connections), one per tool, one per
        rejected request."""
        gone = sum(1 for s in self.workers.values() if not s.alive)
        return 2 * gone + len(self.tools) + rejected

    # -- registration -------------------------------------------------------------------------

    def worker_id_for(self, msg: Message, peer: Peer, awaiting: set[int]) -> int:
        """The worker id a REGISTER gets, or RequestError: identity binding and the --max-workers cap."""
        worker = msg.worker
        mine = [w for w, s in self.workers.items() if s.session == peer.session and s.alive]
        if worker < 0 and mine:   # a resent automatic REGISTER: the id this session already has
            worker = mine[0]
        if worker < 0:
            # automatic: the lowest rank of the job never used, else the lowest id whose worker is dead or left
            # (not one a resumed server is waiting for), else a new id
            unused = [w for w in range(self.cfg.num_workers) if w not in self.workers]
            free = sorted(w for w, s in self.workers.items() if not s.alive and w not in awaiting)
            worker = (unused or free or [max(self.workers, default=-1) + 1])[0]
        state = self.workers.get(worker)
        if state is None:
            if len(self.workers) >= self.cfg.max_workers:
                raise RequestError("too_many_workers", f"the server already knows {len(self.workers)} worker ids "
                                   f"(--max-workers {self.cfg.max_workers}); refused worker {worker}")
        elif state.session != peer.session:
            if self.cfg.auth and peer.key != state.key:
                raise RequestError("identity", f"worker {worker} was registered with another key; only the "
                                   "same key may take it over")
            if state.alive:
                raise RequestError("worker_live", f"worker {worker} is live on another connection; it can be taken "
                                   f"over once it leaves or is declared dead (--worker-timeout "
                                   f"{self.cfg.worker_timeout:g}s)")
        return worker

    def bind(self, worker: int, identity: bytes, peer: Peer, seq: int) -> WorkerState | None:
        """Bind `worker` to this peer's session (a checked REGISTER). The same client again keeps its dedup
        record, so a request it retries under its original seq is recognised; another session takes the id
        over with a fresh record. Returns the state it replaced (taken over), else None."""
        state = self.workers.get(worker)
        now = time.monotonic()
        if state is not None and state.session == peer.session:
            state.identity, state.alive, state.left = identity, True, False
            state.last_seen, state.seq_base = now, seq
            state.registered_at = now
            return None
        self.workers[worker] = WorkerState(identity, now, session=peer.session, key=peer.key, seq_base=seq,
                                           registered_at=now)
        return state

    # -- liveness -----------------------------------------------------------------------------

    def sweep_silent(self, now: float, policy: Consistency, remove: Callable[[int], None]) -> None:
        """Declare dead (and `remove`) the live workers not heard from within --worker-timeout; a resumed
        server gives up on the workers of its checkpoint that have not come back within it."""
        for worker, state in self.workers.items():
            if state.alive and now - state.last_seen > self.cfg.worker_timeout:
                remove(worker)
                self.events["dead"] += 1
                log.warning("worker %d silent for %.1fs: declared dead; %d live", worker, now - state.last_seen,
                            len(policy.clocks))
        if policy.awaiting and self.resume_overdue(now):
            for worker in sorted(policy.awaiting):
                log.warning("worker %d has not come back within --worker-timeout %gs of the resume: going on "
                            "without it", worker, self.cfg.worker_timeout)
                policy.give_up(worker)

    def resume_overdue(self, now: float) -> bool:
        """A resumed server has waited --worker-timeout for the workers of its checkpoint."""
        return self.resumed_at is not None and now - self.resumed_at > self.cfg.worker_timeout

    def sweep_hung(self, now: float, policy: Consistency, remove: Callable[[int], None], spared: Container) -> None:
        """--step-timeout (sync): a live worker that has not pushed for the current step in time is treated as
        dead (its heartbeats may go on while it hangs), so the others are not held at the barrier forever.
        `spared`: workers waiting for their own push admission (that is not hanging)."""
        step = policy.step
        if self._timed_step[0] != step or not policy.started or len(policy.clocks) < self.cfg.min_workers:
            self._timed_step = (step, now)
            return
        if now - self._timed_step[1] <= self.cfg.step_timeout:
            return
        late = [w for w, clock in policy.clocks.items()
                if clock <= step and now - self.workers[w].registered_at > self.cfg.step_timeout and w not in spared]
        for worker in late:
            remove(worker)
            self.events["dead"] += 1
            self.events["step_timeouts"] += 1
            log.warning("worker %d has not pushed for step %d within --step-timeout %gs: treated as dead; %d live",
                        worker, step, self.cfg.step_timeout, len(policy.clocks))

    def all_gone(self, live: int, address: str) -> None:
        """A hand-started server does not idle silently once every worker has gone (said once)."""
        if live or not self.workers:
            self._said_all_left = False
        elif not self._said_all_left:
            self._said_all_left = True
            log.info("all %d workers have left or died; the server keeps serving (a worker may still join). "
                     "Stop it with `paramserver stop %s` or Ctrl-C: it writes its checkpoint", len(self.workers),
                     address)

    def status(self, clocks: dict[int, int], awaiting: set[int]) -> dict:
        """Every worker's clock, state and seconds since it was last heard from (status `workers`)."""
        now = time.monotonic()
        return {str(w): {"clock": clocks.get(w, 0), "state": s.state_name(awaited=w in awaiting),
                         "last_seen_s": round(now - s.last_seen, 2)} for w, s in self.workers.items()}

    # -- checkpoint ---------------------------------------------------------------------------

    def state_dict(self, awaiting: set[int]) -> dict:
        """The dedup record of every worker (a request applied before a crash is not applied again)."""
        return {str(w): {"session": s.session.hex(), "key": s.key, "last_seq": s.last_seq,
                         "last_reply": [bytes(f).hex() for f in s.last_reply or []],
                         "last_reply_seq": s.last_reply_seq,
                         "state": "left" if s.left else ("live" if s.alive or w in awaiting else "dead")}
                for w, s in self.workers.items()}

    def load_state_dict(self, workers: dict) -> list[int]:
        """Restore the records of a checkpoint (no worker is live until it registers again); returns the
        workers the checkpoint had live, for the server to wait for."""
        now = time.monotonic()
        for w, info in workers.items():
            self.workers[int(w)] = WorkerState(
                b"", now, session=bytes.fromhex(info["session"]), key=info.get("key", ""),
                last_seq=int(info["last_seq"]), last_reply=[bytes.fromhex(f) for f in info["last_reply"]] or None,
                last_reply_seq=int(info.get("last_reply_seq", info["last_seq"])),
                alive=False, left=info["state"] == "left")
        self.resumed_at = now
        return sorted(int(w) for w, info in workers.items() if info["state"] == "live")
