"""The server: a ROUTER socket, one receive loop, and the dispatch table.

One thread owns theta, the policy and the socket, so no update ever races a send; replies that
the consistency policy holds back (a pull waiting at the barrier or the staleness bound) wait in
`self.pending` and are answered as soon as `policy.pull_ready` says so. A peer's mistake (a
message that does not decode, a wrong shape, a NaN) gets an ERROR reply and a log line; the
loop keeps serving and theta is untouched.

Usage::

    with Server(ServerConfig(bind="tcp://127.0.0.1:*", num_workers=2)) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        print(server.address)          # workers connect here
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from dataclasses import dataclass

import numpy as np
import torch
import zmq
from zmq.utils.monitor import recv_monitor_message

from common.config import ConfigError, ServerConfig
from common.protocol import (CHUNK_BYTES, MAX_HEADER_BYTES, RESERVE_MIN_BYTES, REQUEST_TYPES, WIRE_DTYPES, Encoded,
                             Message, MsgType, ProtocolError, decode, decode_wire, encode, error_reply, session_of,
                             wire_bytes)
from common.security import server_curve
from common.checkpoint import load_checkpoint, save_checkpoint
from common.shards import ShardPlan, check_identity
from common.tuning import ReusedBuffers, release_free_memory
from common import shm
from paramserver.consistency import Consistency, Contribution
from paramserver.metrics import PhaseTimes, ServerMetrics
from paramserver.store import ParamStore

log = logging.getLogger("paramserver.server")

MONITORED = (zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
             | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)
_EVENT_NAMES = {zmq.EVENT_HANDSHAKE_FAILED_AUTH: "authentication refused",
                zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "protocol error",
                zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: "no detail"}

#: requests that carry a per-worker sequence number and are deduplicated (a resend is answered once)
SEQUENCED = frozenset({MsgType.PULL, MsgType.PUSH, MsgType.LEAVE})
#: requests that act as a worker: only the session that registered the worker id may send them
AS_WORKER = SEQUENCED | {MsgType.HEARTBEAT}
#: refusals of who may do what (counted as refused:<code>; other rejected requests count as "rejected")
REFUSALS = frozenset({"identity", "worker_live", "bad_seq", "too_many_workers", "not_admin"})
#: a sequence number further than this past a worker's last one is refused, not adopted
MAX_SEQ_JUMP = 10_000
#: --divergence-every 0 (auto): pulls take divergence samples while divergence has cost at most this share of the
#: server's apply time so far
DIVERGENCE_BUDGET = 0.05
#: replies queued per connection before ZeroMQ drops more (a client that never reads pins no more than this)
SEND_HWM = 8


#: flags a checkpoint must have been written with to be resumed (unless --resume-override)
RESUME_MUST_MATCH = ("mode", "aggregate", "lr", "num_workers")


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


def _check_writable(flag: str, path: str) -> None:
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


def _user_id(frame) -> str:
    """The CurveZMQ public key (z85) ZeroMQ's authenticator attached to a received frame, or ""."""
    try:
        return frame.get("User-Id") or ""
    except (AttributeError, zmq.ZMQError):
        return ""


def _send_tracked(sock: zmq.Socket, frames: list) -> zmq.MessageTracker:
    """Send a multipart message zero-copy; the tracker is done when ZeroMQ has released every frame
    (send_multipart(track=True) would track only the last one)."""
    parts = [zmq.Frame(f, track=True) for f in frames]
    for part in parts[:-1]:
        sock.send(part, zmq.SNDMORE, copy=False)
    sock.send(parts[-1], copy=False)
    return zmq.MessageTracker(*parts)


class RequestError(ValueError):
    """A request that decodes but cannot be served; `code` goes into the ERROR reply."""

    def __init__(self, code: str, text: str):
        super().__init__(text)
        self.code = code


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


class Server:
    def __init__(self, cfg: ServerConfig, context: zmq.Context | None = None):
        self.cfg = cfg
        self.store = ParamStore(cfg.optimizer, cfg.lr, cfg.momentum, cfg.beta1, cfg.beta2, cfg.eps,
                                spares=cfg.snapshot_buffers, stall_s=cfg.snapshot_wait)
        self.policy = Consistency(self.store, cfg.mode, cfg.num_workers, cfg.staleness, cfg.backup_workers,
                                  cfg.aggregate, min_workers=cfg.min_workers, on_update=self._record_update,
                                  follower=cfg.shard_index > 0)
        self.workers: dict[int, WorkerState] = {}
        self.pending: dict[int, tuple[bytes, Message, float]] = {}   # worker -> held pull
        # worker -> {version: sample of theta} of its last three pulls (with async prefetch a worker pulls the next
        # theta before pushing the gradient of the one before; a resend of a pull may add one more)
        self.held: dict[int, dict[int, dict]] = {}
        self._pulls_unsampled: dict[int, int] = {}   # --divergence-every K: pulls since the worker's last sample
        # push admission (--max-pushes-in-flight): workers allowed to send a gradient now (-> when), and
        # workers waiting for that (-> their held reservation)
        self.push_slots: dict[int, float] = {}
        self.push_queue: dict[int, tuple[bytes, Message, float]] = {}
        self._handling = False   # a message is being handled (push slots freed meanwhile are granted after it)
        self._shm_segments: dict[int, str] = {}   # worker -> its shared-memory gradient segment (same host)
        self.job: dict = {}
        self.shard = {"index": cfg.shard_index, "count": cfg.num_shards, "plan": ""}   # see common/shards.py
        self.transport = shm.ServerTransport() if cfg.shm and shm.available() else None   # same-host shm
        # a gradient tensor over 24 MiB comes in chunks, joined into a reused buffer per tensor: a sync step
        # holds one gradient per worker until it is applied. Only theta's own tensors (name and size, fp32 or
        # 16-bit) are kept: nothing before theta is known, nothing for made-up names (see _allow_joins)
        self._joined = ReusedBuffers(keep=max(2, cfg.num_workers + 1), allowed=set())
        self.shard_layout: dict = {}   # the full model layout the plan was built from (to merge checkpoints)
        self.record = ServerMetrics()
        self.phases = PhaseTimes()   # where this thread's time goes (status time_s)
        self.last_checkpoint: dict = {}
        self.final_checkpoint_failed = False   # the checkpoint at close could not be written (`paramserver server` exits 1)
        self._stop = False
        self._ctx = context or zmq.Context.instance()
        self._auth = None        # the ZAP authenticator thread when --auth is on
        self._last_why = ""      # the last reason logged for holding pulls
        self._admins = load_admin_keys(cfg)   # --auth: public keys (z85) allowed to send SHUTDOWN
        self._resumed_at: float | None = None   # a resumed server holds pulls until its workers are back
        self._timed_step = (-1, 0.0)  # --step-timeout: (sync step, when it became the current one)
        self.resumed_from: dict = {}     # {path, version} of the checkpoint this server resumed
        self._tools: set[bytes] = set()  # connections of tools (status, stop): their disconnects are routine
        self._said_all_left = False
        self.sock: zmq.Socket | None = None
        self._monitor: zmq.Socket | None = None   # connection events of self.sock
        self.address = ""
        self.handlers = {
            MsgType.REGISTER: self._on_register, MsgType.PULL: self._on_pull, MsgType.PUSH: self._on_push,
            MsgType.LEAVE: self._on_leave, MsgType.HEARTBEAT: self._on_heartbeat,
            MsgType.STATUS: self._on_status, MsgType.SHUTDOWN: self._on_shutdown,
        }
        self.prom = None         # the Prometheus exporter (paramserver/prom.py) when --metrics-port is set
        for flag, path in (("--checkpoint", cfg.checkpoint), ("--metrics", cfg.metrics)):
            _check_writable(flag, path)
        if cfg.resume or (cfg.auto_resume and os.path.exists(cfg.checkpoint)):
            self._resume(cfg.resume or cfg.checkpoint)
        elif cfg.auto_resume:
            log.info("--auto-resume: no checkpoint at %s yet; starting fresh", cfg.checkpoint)

    # -- lifecycle ----------------------------------------------------------------------------

    def __enter__(self) -> "Server":
        self.bind()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def bind(self) -> str:
        if self.sock is None:
            self.sock = self._ctx.socket(zmq.ROUTER)
            self.sock.setsockopt(zmq.LINGER, 1000)
            self.sock.setsockopt(zmq.SNDHWM, SEND_HWM)
            # a client reconnecting with its routing id (after a network blip) replaces its old, possibly half-open
            # connection instead of being ignored while its heartbeats (other socket) keep it "live"
            self.sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
            self._set_max_message()
            if self.cfg.curve_secret:
                self._auth = server_curve(self.sock, self.cfg.curve_secret, self.cfg.auth, self._ctx)
            self.sock.bind(self.cfg.bind)
            self.address = self.sock.getsockopt(zmq.LAST_ENDPOINT).decode()
            self._monitor = self.sock.get_monitor_socket(MONITORED)
            log.info("listening on %s (mode=%s, workers=%d%s)", self.address, self.cfg.mode, self.cfg.num_workers,
                     f", shard {self.cfg.shard_index} of {self.cfg.num_shards}" if self.cfg.num_shards > 1 else "")
            if self.cfg.metrics_port:
                from paramserver.prom import PromExporter
                self.prom = PromExporter(self, self.cfg.metrics_port)
        return self.address

    def _set_max_message(self) -> None:
        """ZMQ_MAXMSGSIZE (per frame): the flag's value, or (automatic) the largest frame the protocol sends
        (a CHUNK_BYTES chunk, plus the header limit), lowered to theta's largest tensor when theta is known at
        bind time (a resumed server). ZeroMQ's listener copies its
        options when it binds, so the limit is set once; every message is checked against theta anyway."""
        if self.cfg.max_message_mb > 0:
            limit = int(self.cfg.max_message_mb * 2**20)
        elif self.store.initialized:
            limit = min(max(t.nbytes for t in self.store.theta.values()), CHUNK_BYTES) + MAX_HEADER_BYTES
        else:   # tensors travel in frames of at most CHUNK_BYTES (protocol.encode splits larger ones)
            limit = CHUNK_BYTES + MAX_HEADER_BYTES
        self.sock.setsockopt(zmq.MAXMSGSIZE, limit)

    def stop(self) -> None:
        """Ask the loop to finish (safe from another thread or a signal handler)."""
        self._stop = True

    def close(self) -> None:
        """Write the final checkpoint and metrics, then close the socket. Safe to call twice."""
        if self.sock is None:
            return
        self.save_outputs()
        if self.transport is not None:
            self.transport.close()
        if self.prom is not None:
            self.prom.close()
        self.sock.disable_monitor()
        self._monitor.close()
        self.sock.close()
        self.sock = None
        if self._auth is not None:
            self._auth.stop()
            self._auth = None

    def serve_forever(self) -> None:
        self.bind()
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        poller.register(self._monitor, zmq.POLLIN)
        next_sweep = next_ckpt = time.monotonic()
        if self.cfg.checkpoint_every > 0:
            next_ckpt += self.cfg.checkpoint_every
        while not self._stop:
            # a pull held only because the worker's previous PARAMS is not yet released by ZeroMQ (pyzmq reports
            # that from its own thread, a moment after the send) is retried within a millisecond or two
            deferred = self._deferred_since()
            if deferred is not None:
                ready = dict(poller.poll(1 if time.monotonic() - deferred < 0.2 else 50))
                self._guarded("answering held pulls", self._serve_pending)
            else:
                ready = dict(poller.poll(100))
            if self._monitor in ready:
                self._guarded("reading connection events", self._connection_events)
            if self.sock in ready:
                for _ in range(1000):   # drain what is queued before housekeeping
                    try:
                        frames = self.sock.recv_multipart(zmq.NOBLOCK, copy=False)
                    except zmq.Again:
                        break
                    self._handle(frames)
                    if self._stop:
                        break
            now = time.monotonic()
            if now >= next_sweep:
                self._guarded("sweeping for dead workers", self._sweep_dead, now)
                next_sweep = now + min(0.5, self.cfg.worker_timeout / 4)
            if self.cfg.checkpoint_every > 0 and now >= next_ckpt and self.cfg.checkpoint:
                with self.phases.busy(), self.phases.phase("checkpoint"):
                    self._guarded("writing the periodic checkpoint", self.write_checkpoint)
                next_ckpt = now + self.cfg.checkpoint_every
            if self.prom is not None:
                self._guarded("publishing metrics", self.prom.publish)

    def _guarded(self, what: str, fn, *args) -> None:
        """Housekeeping between messages, under the same rule as a message's handling: an error is logged and
        counted (internal_errors), never the end of the server."""
        try:
            with self.phases.busy():
                fn(*args)
        except Exception:
            self.policy.counters["internal_errors"] += 1
            log.exception("internal error while %s", what)

    def _connection_events(self) -> None:
        """Say when ZeroMQ drops a connection: it does so without a message for an oversized message
        (--max-message-mb) and for a failed CurveZMQ handshake (an unknown key, or plain text)."""
        while self._monitor.poll(0):
            event = recv_monitor_message(self._monitor)
            what, endpoint = event["event"], event["endpoint"].decode(errors="replace")
            if what == zmq.EVENT_DISCONNECTED:
                self.policy.counters["disconnects"] += 1
                self._log_disconnect(endpoint)
            else:
                self.policy.counters["handshake_failures"] += 1
                log.warning("refused a connection on %s: CurveZMQ handshake failed (%s); the client has no "
                            "admitted key or speaks plain text", endpoint, _EVENT_NAMES.get(what, what))

    def _log_disconnect(self, endpoint: str) -> None:
        """A worker that left, a refused worker or a status tool closing its connection is routine (debug);
        a disconnect beyond those (a crash, or a message over --max-message-mb) is worth a warning."""
        gone = sum(1 for s in self.workers.values() if not s.alive)
        expected = 2 * gone + len(self._tools) + self.policy.counters["rejected"]   # a worker has 2 connections
        if self.policy.counters["disconnects"] <= expected:
            log.debug("a peer on %s disconnected", endpoint)
        else:
            log.warning("a peer on %s disconnected without saying goodbye (it crashed, or sent a message over "
                        "--max-message-mb %g)", endpoint, self.cfg.max_message_mb)

    def _note_all_left(self) -> None:
        """A hand-started server does not idle silently once every worker has gone."""
        if self.policy.clocks or not self.workers:
            self._said_all_left = False
        elif not self._said_all_left:
            self._said_all_left = True
            log.info("all %d workers have left or died; the server keeps serving (a worker may still join). "
                     "Stop it with `paramserver stop %s` or Ctrl-C: it writes its checkpoint", len(self.workers),
                     self.address)

    # -- receive and dispatch -----------------------------------------------------------------

    def _send(self, identity: bytes, msg: Message | list, track: bool = False) -> zmq.MessageTracker | None:
        if self.transport is not None and not isinstance(msg, list):
            with self.phases.phase("shm_out"):
                msg = self.transport.outbound(identity, msg)
        frames = msg if isinstance(msg, list) else encode(msg)
        snapshot = None if isinstance(msg, list) else msg.snapshot
        try:
            with self.phases.phase("send"):
                return self._send_frames(identity, frames, snapshot, track)
        except zmq.ZMQError as exc:  # peer gone or queue full: the client resends
            log.warning("reply to %r not sent: %s", identity, exc)
        return None

    def _send_frames(self, identity: bytes, frames: list, snapshot, track: bool) -> zmq.MessageTracker | None:
        if snapshot is not None or track:
            # the tracker says when ZeroMQ no longer needs any of the frames (the reply is sent); theta itself
            # goes out zero-copy and the store recycles it once ZeroMQ is done with it
            tracker = _send_tracked(self.sock, [identity] + frames)
            if snapshot is not None:
                self.store.track(snapshot[0], tracker, snapshot[1])
            return tracker
        self.sock.send_multipart([identity] + frames, copy=False)
        return None

    def _handle(self, frames: list) -> None:
        """Handle one received message. Its frames are let go of here (the list is emptied), before a worker
        waiting for a push slot is told to send: otherwise the next gradient would arrive while this one's
        buffers are still held (two gradients in memory with --max-pushes-in-flight 1)."""
        t0 = time.perf_counter()
        self._handling = True
        try:
            with self.phases.busy():
                self._dispatch(frames)
        except Exception as exc:   # a bug of ours must not take the server down with it
            self.policy.counters["internal_errors"] += 1
            log.exception("internal error while handling a message from %r", frames[0].bytes[:16])
            self._send(frames[0].bytes, error_reply(None, "internal", f"{type(exc).__name__}: {exc}"))
        finally:
            self._handling = False
            frames.clear()
            self._guarded("admitting a waiting push", self._admit_waiting)
            self.record.handle_s.append(time.perf_counter() - t0)
            if self.prom is not None:
                self.prom.handled(self.record.handle_s[-1])

    def _refuse(self, identity: bytes, msg: Message, code: str, text: str) -> None:
        self.policy.counters[f"refused:{code}"] += 1
        # the heartbeats of a client whose worker id was taken over keep coming: not worth a line each
        log.log(logging.DEBUG if msg.type == MsgType.HEARTBEAT else logging.WARNING, "refused %r from %r: %s",
                msg, identity[:16], text)
        self._send(identity, error_reply(msg, code, text))

    def _dispatch(self, frames) -> None:
        identity, body = frames[0].bytes, frames[1:]
        try:
            msg = decode(body, raw=True, pool=self._joined)   # 16-bit tensors stay Encoded (see _push_gradient)
        except ProtocolError as exc:
            self.policy.counters["malformed"] += 1
            log.warning("malformed message from %r: %s", identity[:16], exc)
            self._send(identity, error_reply(None, "malformed", str(exc)))
            return
        if msg.type not in REQUEST_TYPES:
            self.policy.counters["malformed"] += 1
            self._send(identity, error_reply(msg, "not_a_request", f"{msg.type.name} is a reply type; send one "
                                                                   "of " + ", ".join(t.name for t in REQUEST_TYPES)))
            return
        if self.transport is not None:
            try:
                with self.phases.phase("shm_in"):
                    msg = self.transport.inbound(identity, msg)
            except ProtocolError as exc:
                self.policy.counters["malformed"] += 1
                log.warning("shared memory of %r unusable: %s", msg, exc)
                self._send(identity, error_reply(msg, "bad_shm", str(exc)))
                return
        log.debug("recv %r", msg)
        # who sent it: the session of its routing id and, under --auth, its CurveZMQ key
        self._peer = (session_of(identity), _user_id(body[0]) if self.cfg.auth else "")
        state = self.workers.get(msg.worker)
        if state is not None and msg.type in AS_WORKER:
            if state.session != self._peer[0]:
                self._refuse(identity, msg, "identity", f"worker {msg.worker} is bound to another connection; "
                             "only the connection that registered it may act as it (register your own worker)")
                return
            if msg.type in SEQUENCED:
                # (a worker that is not live is told `unknown_worker` by the handler and registers again, which
                # resets the base: after a resume from an old checkpoint its seq may be far past the record)
                if state.alive and msg.seq > max(state.last_seq, state.seq_base) + MAX_SEQ_JUMP:
                    self._refuse(identity, msg, "bad_seq", f"seq {msg.seq} jumps more than {MAX_SEQ_JUMP} past "
                                 f"worker {msg.worker}'s last request ({state.last_seq}); refused")
                    return
            state.last_seen = time.monotonic()
            if msg.type in SEQUENCED:
                state.identity = identity
                # a resend of a request already handled (answered from the record, also across re-registration)
                if msg.seq <= state.last_seq and self._duplicate(identity, msg, state):
                    return
        try:
            reply = self.handlers[msg.type](identity, msg)
        except ValueError as exc:   # a request that decodes but does not fit: reply, keep theta
            code = getattr(exc, "code", "bad_request")
            self.policy.counters[f"refused:{code}" if code in REFUSALS else "rejected"] += 1
            # a heartbeat racing a worker's goodbye is routine; everything else is worth a line
            log.log(logging.DEBUG if msg.type == MsgType.HEARTBEAT else logging.WARNING, "rejected %r: %s", msg, exc)
            reply = error_reply(msg, code, str(exc))
        if msg.worker in self.workers and msg.type in SEQUENCED:
            state = self.workers[msg.worker]
            if state.session == self._peer[0] and (reply is None or reply.type != MsgType.ERROR):
                state.last_seq = max(state.last_seq, msg.seq)
                if msg.type in (MsgType.PUSH, MsgType.LEAVE) and reply is not None:
                    reply = encode(reply)
                    state.remember(reply, msg.seq)
        if isinstance(reply, Message) and reply.type == MsgType.PARAMS:
            self._send_params(msg.worker, identity, reply)
        elif reply is not None:
            self._send(identity, reply)
        self._serve_pending()

    def _duplicate(self, identity: bytes, msg: Message, state: WorkerState) -> bool:
        """A request we have seen (a resend after a timeout, or a duplicated message). Returns False when
        it must be handled as new (a pull of a worker that is no longer live: the handler says so)."""
        queued = self.push_queue.get(msg.worker)
        if queued and queued[1].seq == msg.seq:   # a reservation still waiting: answer on the newest route
            self.push_queue[msg.worker] = (identity, queued[1], queued[2])
            return True
        if (msg.seq == state.last_seq and msg.type in (MsgType.PUSH, MsgType.LEAVE) and state.last_reply
                and state.last_reply_seq == msg.seq):
            # answered from the record even if the worker was declared dead meanwhile: applied exactly once
            self.policy.counters["duplicates"] += 1
            self._send(identity, state.last_reply)
            return True
        if not state.alive or (msg.type == MsgType.PUSH and msg.meta.get("reserve") is True
                               and msg.seq == state.last_seq):
            return False   # (a reservation not answered: its worker was removed while it waited; ask again)
        held = self.pending.get(msg.worker)
        if held and held[1].seq == msg.seq:
            self.pending[msg.worker] = (identity, held[1], held[2])   # answer on the newest route
        elif msg.seq == state.last_seq and msg.type == MsgType.PULL:
            reply = self._on_pull(identity, msg)    # idempotent: answer again (the reply was lost)
            if reply is not None:
                self._send_params(msg.worker, identity, reply)
        else:   # older than the last request: its answer went out long ago; the client ignores this one
            self.policy.counters["duplicates"] += 1
            log.debug("ignored old request %r (last seq %d)", msg, state.last_seq)
            self._send(identity, error_reply(msg, "stale_request", f"seq {msg.seq} is older than this worker's "
                                                                   f"last request ({state.last_seq}); ignored"))
        return True

    def _known(self, msg: Message) -> WorkerState:
        state = self.workers.get(msg.worker)
        if state is None or not state.alive:
            raise RequestError("unknown_worker", f"worker {msg.worker} is not registered"
                               f"{' (declared dead or left)' if state else ''}; send REGISTER first")
        return state

    # -- handlers -----------------------------------------------------------------------------

    def _check_shard(self, msg: Message) -> tuple[str, dict] | None:
        """Refuse a worker whose shard map (count, this server's index, partition plan) differs from ours.
        Returns the (plan hash, layout) the first worker brings, for _on_register to adopt once the
        registration has succeeded (a refused REGISTER must not fix the plan for everyone after it)."""
        offered = msg.meta.get("shard")
        if offered is not None and not isinstance(offered, dict):
            raise RequestError("shard_mismatch", "REGISTER meta 'shard' must be a map {index, count, plan, layout}")
        why = check_identity(self.cfg.shard_index, self.cfg.num_shards, self.shard["plan"], offered)
        adopt = None
        if not why and offered and not self.shard["plan"]:
            try:   # the first worker's plan: recompute it from its layout, so a bad map is caught here
                plan = ShardPlan.build(offered.get("layout") or {}, self.cfg.num_shards)
            except (TypeError, ValueError, AttributeError) as exc:
                raise RequestError("shard_mismatch", f"REGISTER carries an unusable model layout: {exc}") from None
            mine = {p.key: p for p in plan.by_shard[self.cfg.shard_index]}
            if plan.hash != offered.get("plan"):
                why = (f"plan hash differs: the worker says {offered.get('plan')!r} but its layout gives "
                       f"{plan.hash!r} (another paramserver version?)")
            elif msg.tensors and set(msg.tensors) != set(mine):
                why = "the pieces this worker sent are not the ones its plan assigns to this shard"
            else:
                adopt = plan.hash, plan.layout
        if why:
            raise RequestError("shard_mismatch", why)
        return adopt

    def _widen(self, msg: Message) -> None:
        """bf16/fp16 tensors of a request -> float32 (the server keeps theta and sync sums in fp32)."""
        for name, t in msg.tensors.items():
            if isinstance(t, Encoded):
                msg.tensors[name] = decode_wire(t)

    def _on_register(self, identity: bytes, msg: Message) -> Message:
        self._widen(msg)
        plan = self._check_shard(msg)
        self._check_job(msg.meta.get("job") or {})
        worker = self._worker_id_for(msg)
        if msg.tensors:
            if not self.store.initialized:
                self.store.init(msg.tensors)
                self._allow_joins()
                self.job = dict(msg.meta.get("job", {}))
                log.info("theta initialised by worker %d: %d tensors, %d values", worker, len(msg.tensors),
                         sum(t.size for t in msg.tensors.values()))
            elif {n: [t.dtype.name, list(t.shape)] for n, t in msg.tensors.items()} != self.store.layout():
                raise RequestError("model_mismatch", "this worker's model does not match the parameters the "
                                   "server holds (names, shapes or dtypes differ); start it with the same job "
                                   "flags as the others")
        elif not self.store.initialized:
            raise RequestError("no_parameters", "the server holds no parameters yet: the first REGISTER must "
                               "carry the initial parameters")
        if plan is not None:   # the first worker's shard plan: the job's from now on
            self.shard["plan"], self.shard_layout = plan
        session, key = self._peer
        state = self.workers.get(worker)
        rejoin = state is not None
        if state is not None and state.session == session:
            # the same client again (it was declared dead, or the server restarted): its dedup record stays,
            # so a request it retries under its original seq is recognised
            if state.alive and worker in self.policy.clocks:
                log.info("worker %d registered again", worker)
            state.identity, state.alive, state.left = identity, True, False
            state.last_seen, state.seq_base = time.monotonic(), msg.seq
            state.registered_at = state.last_seen
        else:
            if state is not None:
                log.info("worker %d taken over by a new connection (the old one is %s)", worker,
                         "left" if state.left else ("live" if state.alive else "dead"))
                self._drop_admission(worker)   # the old connection's reservation or slot dies with it
            self.workers[worker] = WorkerState(identity, time.monotonic(), session=session, key=key,
                                               seq_base=msg.seq, registered_at=time.monotonic())
        self.pending.pop(worker, None)
        clock = self.policy.join(worker)
        log.info("worker %d %s at clock %d, version %d (%d live)", worker, "rejoined" if rejoin else "joined",
                 clock, self.store.version, len(self.policy.clocks))
        version, theta = self.store.snapshot()
        return Message(MsgType.WELCOME, worker=worker, seq=msg.seq, clock=clock, version=version, tensors=theta,
                       meta={"layout": self.store.layout(), "mode": self.cfg.mode, "staleness": self.cfg.staleness,
                             "aggregate": self.cfg.aggregate, "num_workers": self.cfg.num_workers,
                             "shard": self.shard, "backup_workers": self.cfg.backup_workers,
                             "push_slots": self.cfg.max_pushes_in_flight},
                       snapshot=(version, "fp32"))

    def _worker_id_for(self, msg: Message) -> int:
        """The worker id a REGISTER gets, or RequestError: identity binding and the --max-workers cap."""
        session, key = self._peer
        worker = msg.worker
        mine = [w for w, s in self.workers.items() if s.session == session and s.alive]
        if worker < 0 and mine:   # a resent automatic REGISTER: the id this session already has
            worker = mine[0]
        if worker < 0:
            # automatic: the lowest rank of the job never used, else the lowest id whose worker is dead or left
            # (not one a resumed server is waiting for), else a new id
            unused = [w for w in range(self.cfg.num_workers) if w not in self.workers]
            free = sorted(w for w, s in self.workers.items() if not s.alive and w not in self.policy.awaiting)
            worker = (unused or free or [max(self.workers, default=-1) + 1])[0]
        state = self.workers.get(worker)
        if state is None:
            if len(self.workers) >= self.cfg.max_workers:
                raise RequestError("too_many_workers", f"the server already knows {len(self.workers)} worker ids "
                                   f"(--max-workers {self.cfg.max_workers}); refused worker {worker}")
        elif state.session != session:
            if self.cfg.auth and key != state.key:
                raise RequestError("identity", f"worker {worker} was registered with another key; only the "
                                   "same key may take it over")
            if state.alive:
                raise RequestError("worker_live", f"worker {worker} is live on another connection; it can be taken "
                                   f"over once it leaves or is declared dead (--worker-timeout "
                                   f"{self.cfg.worker_timeout:g}s)")
        return worker

    def _check_job(self, job: dict) -> None:
        """Refuse a worker whose job description (the flags every worker of a job shares) differs from the
        job's (the first worker's, or the resumed checkpoint's), naming each differing flag; and one that
        was started for another number of workers (it would train on the wrong share of the data)."""
        if not isinstance(job, dict):
            return
        diffs = []
        n = job.get("num_workers")
        if isinstance(n, int) and n != self.cfg.num_workers:
            diffs.append(f"--num-workers {n} (the server has --num-workers {self.cfg.num_workers})")
        for key, value in sorted(job.items()):
            if key != "num_workers" and key in self.job and self.job[key] != value:
                diffs.append(f"--{key.replace('_', '-')} {value!r} (the job has {self.job[key]!r})")
        if diffs:
            raise RequestError("job_mismatch", "this worker was started with other job flags than the job it "
                               "joins: " + "; ".join(diffs) + ". Start it with the job's flags")

    @property
    def finished(self) -> bool:
        """The --max-gradients budget is spent: workers are told to stop."""
        return 0 < self.cfg.max_gradients <= self.policy.counters["applied"]

    def _stop_reply(self, msg: Message) -> Message:
        return Message(MsgType.PARAMS, worker=msg.worker, seq=msg.seq, version=self.store.version,
                       meta={"stop": True, "reason": f"{self.cfg.max_gradients} gradients applied"})

    def _on_pull(self, identity: bytes, msg: Message) -> Message | None:
        state = self._known(msg)
        with self.phases.phase("update"):   # (it may complete a sync step: fold and apply)
            self.policy.follow_clock(msg.worker, msg.clock)   # a shard following shard 0 (backup workers) only
        if msg.meta.get("wire", "fp32") not in WIRE_DTYPES:
            raise RequestError("bad_wire", f"unknown wire dtype {msg.meta.get('wire')!r} in PULL; choose one of "
                                           f"{', '.join(WIRE_DTYPES)} (--wire-dtype)")
        if self.finished:
            return self._stop_reply(msg)
        # at most one PARAMS per worker in ZeroMQ's queue: a client that never reads pins one snapshot, not many
        if self.policy.pull_ready(msg.worker) and not self._in_flight(state):
            return self._params_reply(msg, 0.0)
        if msg.worker not in self.pending:
            self.pending[msg.worker] = (identity, msg, time.monotonic())
            self._say_why_waiting()
        return None

    def _say_why_waiting(self) -> None:
        """Log (once per cause) why pulls are being held when it is not the ordinary barrier."""
        live = len(self.policy.clocks)
        if self.policy.awaiting:   # a resumed server waits for the workers of its checkpoint
            level = logging.INFO
            why = (f"resumed: holding pulls until workers {', '.join(map(str, sorted(self.policy.awaiting)))} "
                   f"re-register (or --worker-timeout {self.cfg.worker_timeout:g}s passes)")
        elif not self.policy.started:   # routine at start-up
            level = logging.INFO
            why = f"waiting for {self.cfg.num_workers} workers to register ({len(self.policy.joined)} so far)"
        elif self.cfg.mode == "sync" and live < self.cfg.min_workers:
            level = logging.WARNING
            why = f"holding all pulls: {live} live workers, below --min-workers {self.cfg.min_workers}"
        else:
            return
        if why != self._last_why:
            self._last_why = why
            log.log(level, why)

    def _params_reply(self, msg: Message, waited: float) -> Message:
        clock = self.policy.grant_clock(msg.worker)
        self.record.record_grant(msg.worker, clock, self.policy.min_clock(), waited)
        wire = msg.meta.get("wire", "fp32")
        if wire not in WIRE_DTYPES:
            wire = "fp32"   # (checked in _on_pull; a held pull was checked when it arrived)
        with self.phases.phase("snapshot"):
            version, theta = self.store.snapshot(wire)
        if self._want_sample(msg.worker):
            samples = self.held.setdefault(msg.worker, {})
            samples.pop(version, None)
            with self.phases.phase("divergence"):
                samples[version] = self.store.sample()[1]
            if len(samples) > 3:   # (a resent pull adds one: the push computed on the pull before stays measurable)
                del samples[next(iter(samples))]
        return Message(MsgType.PARAMS, worker=msg.worker, seq=msg.seq, clock=clock, version=version,
                       tensors=theta, snapshot=(version, wire),
                       meta={"wait_s": waited, "min_clock": self.policy.min_clock()})

    def _in_flight(self, state: WorkerState) -> bool:
        """Is this worker's last PARAMS still in ZeroMQ's hands? Over inproc (a client in this process) the
        receiver holds the server's own buffers for as long as it keeps the reply, so there is nothing queued
        to bound there and the gate would only stall it."""
        return not self.cfg.bind.startswith("inproc://") and state.params_in_flight()

    def _deferred_since(self) -> float | None:
        """When the oldest pull that is ready but held for an in-flight PARAMS arrived (None: there is none)."""
        times = [since for w, (_, _, since) in self.pending.items()
                 if self._in_flight(self.workers[w]) and self.policy.pull_ready(w)]
        return min(times) if times else None

    def _send_params(self, worker: int, identity: bytes, reply: Message) -> None:
        """Send a PARAMS reply and remember it until ZeroMQ has sent it (see _on_pull)."""
        tracker = self._send(identity, reply, track=True)
        state = self.workers.get(worker)
        if state is not None:
            state.params_tracker = tracker

    def _serve_pending(self) -> None:
        for worker, (identity, msg, since) in list(self.pending.items()):
            if self.finished:
                del self.pending[worker]
                self._send(identity, self._stop_reply(msg))
            elif self.policy.pull_ready(worker) and not self._in_flight(self.workers[worker]):
                del self.pending[worker]
                self._send_params(worker, identity, self._params_reply(msg, time.monotonic() - since))

    def _on_push(self, identity: bytes, msg: Message) -> Message | None:
        self._known(msg)
        if msg.meta.get("reserve") is True and not msg.tensors:
            return self._reserve(identity, msg)
        shm_ref = msg.meta.get("shm")
        if isinstance(shm_ref, dict) and isinstance(shm_ref.get("name"), str):
            self._shm_segments[msg.worker] = shm_ref["name"]   # came through shared memory, not the socket
        elif (self.cfg.max_pushes_in_flight > 0 and msg.worker not in self.push_slots and msg.tensors
                and wire_bytes(msg.tensors) >= RESERVE_MIN_BYTES):
            self.policy.counters["unadmitted_pushes"] += 1   # a client that does not ask: not bounded
        try:
            return self._push_gradient(msg)
        finally:
            self._release_slot(msg.worker)   # its gradient is handled: the next worker may send

    def _push_gradient(self, msg: Message) -> Message:
        if msg.meta.get("skip") is True and not msg.tensors:
            # shards + backup workers: shard 0 dropped this worker's gradient for the step, so this shard
            # must not use it either; the worker only passes the step (see ShardedClient.push)
            if self.cfg.mode != "sync":
                raise RequestError("bad_request", "a PUSH with skip (shard 0 dropped the gradient) only applies to "
                                   f"--mode sync; this server runs --mode {self.cfg.mode}")
            with self.phases.phase("update"):   # (it may complete the step)
                result = self.policy.skip(msg.worker, msg.clock)
            return Message(MsgType.ACK, worker=msg.worker, seq=msg.seq, clock=msg.clock, version=result.version,
                           meta={"status": result.status, "reason": result.reason, "stop": self.finished})
        with self.phases.phase("check"):
            try:   # (16-bit wire values are checked as they are: widening is exact, and only a gradient that fits is)
                self.store.check_gradient(msg.tensors, msg.checked)
            except ValueError as exc:
                self.policy.counters["received"] += 1
                self.policy.counters["dropped:invalid"] += 1
                raise RequestError("bad_gradient", str(exc)) from None
            if self.cfg.mode == "sync":   # held until the step is complete: float32 copies of its own
                self._widen(msg)
        # (ssp/async apply it at once: 16-bit wire values go to the store as they are, which adds them for plain
        # SGD and widens them a slice at a time for the fused optimizers, see ParamStore.apply)
        if self.finished:   # the budget is spent: nothing more is applied
            self.policy.counters["received"] += 1
            self.policy.counters["dropped:budget"] += 1
            return Message(MsgType.ACK, worker=msg.worker, seq=msg.seq, clock=msg.clock, version=self.store.version,
                           meta={"status": "dropped", "reason": "the --max-gradients budget is spent", "stop": True})
        meta = {k: msg.meta[k] for k in ("loss",) if isinstance(msg.meta.get(k), (int, float))}
        with self.phases.phase("divergence"):
            meta["divergence"] = self._divergence(msg.worker, msg.version)
        with self.phases.phase("update"):
            result = self.policy.push(msg.worker, msg.clock, msg.tensors, msg.version, meta,
                                      members=msg.meta.get("members"))   # shards + backups: shard 0's step set
        return Message(MsgType.ACK, worker=msg.worker, seq=msg.seq, clock=msg.clock, version=result.version,
                       meta={"status": result.status, "reason": result.reason, "stop": self.finished,
                             **({"members": result.members} if result.members is not None else {})})

    # -- push admission: how many workers send a gradient at once ----------------------------------

    def _reserve(self, identity: bytes, msg: Message) -> Message | None:
        """A worker asks to send a gradient (PUSH with meta reserve). At most --max-pushes-in-flight workers may
        at once: ZeroMQ receives every message whole, so this bounds the gradients in the server's memory to
        that many, whatever the number of workers. Others wait here, answered in turn (in sync mode lowest id
        first, which is the order the step sums them in)."""
        limit = self.cfg.max_pushes_in_flight
        if limit <= 0 or msg.worker in self.push_slots or len(self.push_slots) < limit:
            self.push_slots[msg.worker] = time.monotonic()
            return self._reserved(msg)
        self.push_queue[msg.worker] = (identity, msg, time.monotonic())
        return None

    @staticmethod
    def _reserved(msg: Message) -> Message:
        return Message(MsgType.ACK, worker=msg.worker, seq=msg.seq, clock=msg.clock, meta={"status": "reserved"})

    def _release_slot(self, worker: int) -> None:
        """The worker's slot is free (its gradient came, it is gone, or it let the slot lapse): admit the next
        (while a message is being handled: once it is done and its buffers are let go of, see _handle)."""
        self.push_slots.pop(worker, None)
        if not self._handling:
            self._admit_waiting()

    def _drop_admission(self, worker: int) -> None:
        """The worker (or its connection) is gone: its waiting reservation and its slot, if any, go too."""
        self.push_queue.pop(worker, None)
        self._release_slot(worker)

    def _admit_waiting(self) -> None:
        """Tell workers waiting for a push slot to send, while slots are free."""
        limit = self.cfg.max_pushes_in_flight
        while self.push_queue and (limit <= 0 or len(self.push_slots) < limit):
            nxt = min(self.push_queue) if self.cfg.mode == "sync" else next(iter(self.push_queue))
            identity, msg, _ = self.push_queue.pop(nxt)
            self.push_slots[nxt] = time.monotonic()
            reply = encode(self._reserved(msg))
            # a resend of the reservation gets this answer again
            self.workers[nxt].remember(reply, msg.seq)
            self._send(identity, reply)

    def _sweep_slots(self, now: float) -> None:
        """A slot not used within --worker-timeout (the worker crashed or changed its mind) is given back."""
        for worker, since in list(self.push_slots.items()):
            if now - since > self.cfg.worker_timeout:
                log.warning("worker %d reserved a push %.1fs ago and sent none: slot given back", worker, now - since)
                self._release_slot(worker)

    def _want_sample(self, worker: int) -> bool:
        """Does this pull take a divergence sample (store.sample) for the push computed on it? Never in sync
        (theta cannot change between a worker's pull and its applied push: 0, free); in ssp/async every
        --divergence-every-th pull of each worker, or (0, auto) while divergence has cost at most
        DIVERGENCE_BUDGET of the apply time so far: on a big model a sample is a small share of an apply and
        every pull gets one, on a small one (1M values: a third of an Adam apply) only some do."""
        if not self.cfg.track_divergence or self.cfg.mode == "sync":
            return False
        if self.cfg.divergence_every <= 0:   # (before the first apply there is nothing to measure it against)
            return (not self.policy.apply_s
                    or self.phases.seconds["divergence"] <= DIVERGENCE_BUDGET * self.policy.apply_s)
        n = self._pulls_unsampled.get(worker, 0) + 1
        self._pulls_unsampled[worker] = 0 if n >= self.cfg.divergence_every else n
        return n >= self.cfg.divergence_every

    def _allow_joins(self) -> None:
        """theta is known: the join buffers of its tensors (as float32 and as 16-bit wire values) may be kept."""
        self._joined.allowed = {(n, t.nbytes) for n, t in self.store.theta.items()} | {
            (n, t.size * 2) for n, t in self.store.theta.items() if t.dtype == np.float32}
        self._joined.trim()

    def _divergence(self, worker: int, base_version: int) -> float | None:
        """L2 distance between the theta this gradient was computed on and the server's theta now: 0 when
        theta has not changed since (always the case for an applied gradient in sync), else from the sample its
        pull took (see _want_sample; None without one): exact for models up to DIVERGENCE_SAMPLE values, else
        estimated from that many sampled coordinates."""
        if not self.cfg.track_divergence:
            return None
        sample = self.held.get(worker, {}).get(base_version)
        if base_version == self.store.version and (sample is not None or self.cfg.mode == "sync"):
            return 0.0   # (not for an unsampled push in ssp/async: the measured ones would lean to fresh pushes)
        return None if sample is None else self.store.distance(sample)

    def _on_leave(self, identity: bytes, msg: Message) -> Message:
        state = self._known(msg)
        state.left = True
        self._remove(msg.worker)
        log.info("worker %d left (%s); %d live", msg.worker, msg.meta.get("reason", "done"),
                 len(self.policy.clocks))
        return Message(MsgType.ACK, worker=msg.worker, seq=msg.seq, version=self.store.version)

    def _on_heartbeat(self, identity: bytes, msg: Message) -> Message:
        self._known(msg)
        return Message(MsgType.ACK, worker=msg.worker, seq=msg.seq, version=self.store.version)

    def _on_status(self, identity: bytes, msg: Message) -> Message:
        if msg.worker < 0 and len(self._tools) < 100_000:
            self._tools.add(identity)
        return Message(MsgType.ACK, worker=msg.worker, seq=msg.seq, version=self.store.version, meta=self.status())

    def _on_shutdown(self, identity: bytes, msg: Message) -> Message:
        if self.cfg.auth and self._peer[1] not in self._admins:
            raise RequestError("not_admin", "SHUTDOWN needs an admin key (`paramserver keys DIR --admin NAME`); "
                               "this client's key is not among the server's --admins")
        log.info("shutdown requested")
        self._stop = True
        return Message(MsgType.ACK, worker=msg.worker, seq=msg.seq, version=self.store.version)

    # -- liveness -----------------------------------------------------------------------------

    def _remove(self, worker: int) -> None:
        """Take a worker out of the job (it left or is dead): no held pull, no barrier, no clock minimum."""
        self.workers[worker].alive = False
        self.pending.pop(worker, None)
        self.held.pop(worker, None)
        self._pulls_unsampled.pop(worker, None)
        with self.phases.phase("update"):   # (a sync step may complete without it)
            self.policy.leave(worker)
        self._drop_admission(worker)
        segment = self._shm_segments.pop(worker, None)
        if segment and self.transport is not None:   # its gradient segment and buffers go with it
            self.transport.grads.forget(segment)

    def _sweep_dead(self, now: float) -> None:
        for worker, state in self.workers.items():
            if state.alive and now - state.last_seen > self.cfg.worker_timeout:
                self._remove(worker)
                self.policy.counters["dead"] += 1
                log.warning("worker %d silent for %.1fs: declared dead; %d live", worker, now - state.last_seen,
                            len(self.policy.clocks))
        if self.policy.awaiting and self._resumed_at is not None:
            if now - self._resumed_at > self.cfg.worker_timeout:
                for worker in sorted(self.policy.awaiting):
                    log.warning("worker %d has not come back within --worker-timeout %gs of the resume: going on "
                                "without it", worker, self.cfg.worker_timeout)
                    self.policy.give_up(worker)
            else:
                self._say_why_waiting()
        if self.cfg.step_timeout > 0 and self.cfg.mode == "sync":
            self._sweep_hung(now)
        self._sweep_slots(now)
        self._serve_pending()
        if self.pending:
            self._say_why_waiting()
        self._note_all_left()

    def _sweep_hung(self, now: float) -> None:
        """--step-timeout: a live worker that has not pushed for the current sync step in time is treated as
        dead (its heartbeats may go on while it hangs), so the others are not held at the barrier forever."""
        step = self.policy.step
        if self._timed_step[0] != step or not self.policy.started or len(self.policy.clocks) < self.cfg.min_workers:
            self._timed_step = (step, now)
            return
        if now - self._timed_step[1] <= self.cfg.step_timeout:
            return
        late = [w for w, clock in self.policy.clocks.items()
                if clock <= step and now - self.workers[w].registered_at > self.cfg.step_timeout
                and w not in self.push_queue]   # waiting for our own admission is not hanging
        for worker in late:
            self._remove(worker)
            self.policy.counters["dead"] += 1
            self.policy.counters["step_timeouts"] += 1
            log.warning("worker %d has not pushed for step %d within --step-timeout %gs: treated as dead; %d live",
                        worker, step, self.cfg.step_timeout, len(self.policy.clocks))

    # -- metrics, status, checkpoints ---------------------------------------------------------

    def _record_update(self, version: int, contributions: list[Contribution]) -> None:
        self.record.record_update(version, contributions, self.policy.counters["applied"] - len(contributions))

    def status(self) -> dict:
        now = time.monotonic()
        return {
            "version": self.store.version, "mode": self.cfg.mode, "step": self.policy.step,
            "staleness_bound": self.cfg.staleness if self.cfg.mode == "ssp" else None,
            "min_clock": self.policy.min_clock(), "max_gap": self.policy.max_gap,
            "workers": {str(w): {"clock": self.policy.last_clock.get(w, 0),
                                 "state": "left" if s.left else ("live" if s.alive else (
                                     "awaited" if w in self.policy.awaiting else "dead")),
                                 "last_seen_s": round(now - s.last_seen, 2)} for w, s in self.workers.items()},
            "live": len(self.policy.clocks), "waiting_pulls": len(self.pending),
            "push_slots": {"in_use": len(self.push_slots), "waiting": len(self.push_queue),
                           "limit": self.cfg.max_pushes_in_flight},
            "started": self.policy.started, "registered": len(self.policy.last_clock),
            "num_workers": self.cfg.num_workers,
            "counters": dict(self.policy.counters), "pending_gradients": self.policy.pending_gradients,
            "apply_s": round(self.policy.apply_s, 4),
            "time_s": self.phases.summary(),
            "checkpoint": self.last_checkpoint, "theta_crc32": self.store.checksum(),
            "resumed_from": self.resumed_from, "shard": self.shard,
            "snapshots": {"in_flight": self.store.in_flight(), "copies": self.store.copies,
                          "allocated": self.store.allocations, "waited_s": round(self.store.waited_s, 3),
                          "over_cap": self.store.over_cap},
            "threads": torch.get_num_threads(),
            **self.record.summary(),
        }

    def state_dict(self) -> dict:
        workers = {str(w): {"session": s.session.hex(), "key": s.key, "last_seq": s.last_seq,
                            "last_reply": [bytes(f).hex() for f in s.last_reply or []],
                            "last_reply_seq": s.last_reply_seq,
                            "state": "left" if s.left else ("live" if s.alive or w in self.policy.awaiting else "dead")}
                   for w, s in self.workers.items()}
        return {**self.store.state_dict(), "optimizer": self.cfg.optimizer, **self.policy.state_dict(),
                "config": dataclasses.asdict(self.cfg), "job": self.job, "workers": workers,
                "shard": self.shard, "shard_layout": self.shard_layout}

    def write_checkpoint(self) -> bool:
        """Write --checkpoint. A write that fails (a full disk, a folder gone) is logged and counted
        (checkpoint_errors) and returns False; theta stays in memory and the server keeps serving (the next
        write may succeed). True when written or when there is nothing to write."""
        if not self.cfg.checkpoint or not self.store.initialized:
            return True
        t0 = time.monotonic()
        try:
            save_checkpoint(self.cfg.checkpoint, self.state_dict())
        except OSError as exc:
            self.policy.counters["checkpoint_errors"] += 1
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

    def _resume(self, path: str) -> None:
        state = load_checkpoint(path)
        if state.get("optimizer", self.cfg.optimizer) != self.cfg.optimizer:
            raise ConfigError(f"checkpoint {path} was written with --optimizer {state['optimizer']}; "
                              f"resume with the same optimizer")
        shard = state.get("shard", {"index": 0, "count": 1, "plan": ""})
        if (shard["index"], shard["count"]) != (self.cfg.shard_index, self.cfg.num_shards):
            raise ConfigError(f"checkpoint {path} holds shard {shard['index']} of {shard['count']}; resume it with "
                              f"--shard-index {shard['index']} --num-shards {shard['count']}")
        self.shard, self.shard_layout = dict(shard), dict(state.get("shard_layout", {}))
        saved = state.get("config", {})
        changed = [f"--{k.replace('_', '-')} {saved[k]} (now {getattr(self.cfg, k)})" for k in RESUME_MUST_MATCH
                   if k in saved and saved[k] != getattr(self.cfg, k)]
        if changed and not self.cfg.resume_override:
            raise ConfigError(f"checkpoint {path} was written with {', '.join(changed)}; resume with the same "
                              "flags, or add --resume-override to continue under the new ones")
        self.store.load_state_dict(state)
        self._allow_joins()
        self.policy.load_state_dict(state)
        self.job = state.get("job", {})
        now = time.monotonic()
        for w, info in state.get("workers", {}).items():
            # the dedup record survives the restart: a request applied before the crash is not applied again
            self.workers[int(w)] = WorkerState(
                b"", now, session=bytes.fromhex(info["session"]), key=info.get("key", ""),
                last_seq=int(info["last_seq"]), last_reply=[bytes.fromhex(f) for f in info["last_reply"]] or None,
                last_reply_seq=int(info.get("last_reply_seq", info["last_seq"])),
                alive=False, left=info["state"] == "left")
        if state.get("pending_gradients"):
            self._forget_dropped_acks()
        back = sorted(int(w) for w, info in state.get("workers", {}).items() if info["state"] == "live")
        self.policy.await_workers(back)
        self._resumed_at = now
        self.resumed_from = {"path": path, "version": self.store.version}
        log.info("resumed from %s at version %d (step %d), theta crc32 %s", path, self.store.version,
                 self.policy.step, self.store.checksum())
        if back:
            log.info("holding pulls until workers %s re-register (or each has been silent for --worker-timeout "
                     "%gs)", ", ".join(map(str, back)), self.cfg.worker_timeout)

    def _forget_dropped_acks(self) -> None:
        """A resumed sync step starts again without the gradients the checkpoint held for it (they are not in
        it): a worker whose cached answer says its push was accumulated for that step would be told so again
        when it resends, and its gradient would be applied zero times. Forget those answers, so that the resend
        is handled as a new push and accumulated again."""
        for worker, st in self.workers.items():
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

    def metrics(self) -> dict:
        return {"config": dataclasses.asdict(self.cfg), "status": self.status(), **self.record.series()}

    def save_outputs(self) -> None:
        self.final_checkpoint_failed = not self.write_checkpoint()
        if self.cfg.metrics:
            try:
                os.makedirs(os.path.dirname(os.path.abspath(self.cfg.metrics)), exist_ok=True)
                tmp = self.cfg.metrics + ".tmp"
                with open(tmp, "w") as f:
                    json.dump(self.metrics(), f)
                os.replace(tmp, self.cfg.metrics)
            except OSError as exc:
                log.error("metrics NOT written to %s: %s", self.cfg.metrics, exc)
