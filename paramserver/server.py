"""The server: one receive loop, the dispatch table, and the handlers' glue to the policy and the store.

One thread owns theta, the policy and the socket, so no update ever races a send. A peer's mistake
(a message that does not decode, a wrong shape, a NaN) gets an ERROR reply and a log line; the loop
keeps serving and theta is untouched. The server is made of parts, each owning one thing:

==================  ===========================================================================
`transport`         the ROUTER socket, its monitor, tracked zero-copy sends, frame limits, shm
`sessions`          worker records: identity binding, sequence dedup and cached replies, liveness
`admission`         push slots (--max-pushes-in-flight): reserve, release, queue, sweep
`pulls`             held pulls (`pending`) and PARAMS replies
`pushes`            a gradient's way to the policy: its check, the budget, its divergence
`divergence`        samples of theta taken by pulls, and the divergence of pushes
`job`               the job's flags and shard map, checked at REGISTER
`checkpointer`      state_dict, checkpoints, resume
==================  ===========================================================================

The server's own events (malformed, refused:<code>, rejected, dead, ...) are counted on `events`;
the policy counts gradients (received, applied, dropped:<reason>); `counters` shows both.

Usage::

    with Server(ServerConfig(bind="tcp://127.0.0.1:*", num_workers=2)) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        print(server.address)          # workers connect here
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections import Counter

import torch
import zmq

from common.config import ServerConfig
from common.protocol import WIRE_DTYPES, Message, MsgType, error_reply, session_of
from paramserver.admission import Admission
from paramserver.checkpointer import Checkpointer
from paramserver.consistency import Consistency, Contribution
from paramserver.divergence import Divergence
from paramserver.job import Job
from paramserver.metrics import CounterView, PhaseTimes, ServerMetrics
from paramserver.pulls import Pulls
from paramserver.pushes import Pushes
from paramserver.sessions import Peer, RequestError, Sessions, WorkerState
from paramserver.store import ParamStore
from paramserver.transport import Transport, user_id, widen

log = logging.getLogger("paramserver.server")

#: refusals of who may do what (counted as refused:<code>; other rejected requests count as "rejected")
REFUSALS = frozenset({"identity", "worker_live", "bad_seq", "too_many_workers", "not_admin"})


class Server:
    """The receive loop and the handlers; its parts own the rest (see the module docstring)."""

    def __init__(self, cfg: ServerConfig, context: zmq.Context | None = None):
        self.cfg = cfg
        self.store = ParamStore(cfg.optimizer, cfg.lr, cfg.momentum, cfg.beta1, cfg.beta2, cfg.eps,
                                spares=cfg.snapshot_buffers, stall_s=cfg.snapshot_wait, period=cfg.num_workers)
        self.policy = Consistency(self.store, cfg.mode, cfg.num_workers, cfg.staleness, cfg.backup_workers,
                                  cfg.aggregate, min_workers=cfg.min_workers, on_update=self._record_update,
                                  follower=cfg.shard_index > 0)
        self.events: Counter = Counter()   # the server's own events (the policy counts gradients)
        self.record = ServerMetrics()
        self.phases = PhaseTimes()   # where this thread's time goes (status time_s)
        send = lambda *args, **kw: self._send(*args, **kw)   # noqa: E731 (looked up per call: tests spy on it)
        self.transport = Transport(cfg, context or zmq.Context.instance(), self.events, self.phases)
        self.sessions = Sessions(cfg, self.events)
        self.admission = Admission(cfg, self.events, grant=self._grant_slot)
        self.divergence = Divergence(cfg, self.store, self.policy, self.phases)
        self.pulls = Pulls(cfg, self.store, self.policy, self.sessions, self.divergence, self.record, self.phases,
                           send)
        self.pushes = Pushes(cfg, self.store, self.policy, self.divergence, self.phases,
                             finished=lambda: self.pulls.finished)
        self.job = Job(cfg)
        self.checkpointer = Checkpointer(cfg, self.store, self.policy, self.sessions, self.job, self.events,
                                         self.record)
        self._stop = False
        self.handlers = {
            MsgType.REGISTER: self._on_register, MsgType.PULL: self._on_pull, MsgType.PUSH: self._on_push,
            MsgType.LEAVE: self._on_leave, MsgType.HEARTBEAT: self._on_heartbeat,
            MsgType.STATUS: self._on_status, MsgType.SHUTDOWN: self._on_shutdown,
        }
        self.prom = None         # the Prometheus exporter (paramserver/prom.py) when --metrics-port is set
        if cfg.resume or (cfg.auto_resume and os.path.exists(cfg.checkpoint)):
            self.checkpointer.resume(cfg.resume or cfg.checkpoint)
            self.transport.allow_joins(self.store.theta)
        elif cfg.auto_resume:
            log.info("--auto-resume: no checkpoint at %s yet; starting fresh", cfg.checkpoint)

    # -- the parts' state, as it was read before they were parts ---------------------------------

    workers = property(lambda self: self.sessions.workers)
    pending = property(lambda self: self.pulls.pending)
    shard = property(lambda self: self.job.shard)
    address = property(lambda self: self.transport.address)
    last_checkpoint = property(lambda self: self.checkpointer.last_checkpoint)
    resumed_from = property(lambda self: self.checkpointer.resumed_from)
    final_checkpoint_failed = property(lambda self: self.checkpointer.final_checkpoint_failed)
    finished = property(lambda self: self.pulls.finished, doc="The --max-gradients budget is spent.")

    @property
    def counters(self) -> CounterView:
        """The policy's gradient counters and the server's event counters, as one live read-only map."""
        return CounterView(lambda: self.policy.counters, lambda: self.events)

    # -- lifecycle ----------------------------------------------------------------------------

    def __enter__(self) -> "Server":
        self.bind()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def bind(self) -> str:
        if not self.transport.bound:
            theta = self.store.theta if self.store.initialized else None   # (a resumed server knows theta)
            self.transport.bind(max(t.nbytes for t in theta.values()) if theta else None)
            log.info("listening on %s (mode=%s, workers=%d%s)", self.address, self.cfg.mode, self.cfg.num_workers,
                     f", shard {self.cfg.shard_index} of {self.cfg.num_shards}" if self.cfg.num_shards > 1 else "")
            if self.cfg.metrics_port:
                from paramserver.prom import PromExporter
                self.prom = PromExporter(self, self.cfg.metrics_port)
        return self.address

    def stop(self) -> None:
        """Ask the loop to finish (safe from another thread or a signal handler)."""
        self._stop = True

    def close(self) -> None:
        """Write the final checkpoint and metrics, then close the socket. Safe to call twice."""
        if not self.transport.bound:
            return
        self.save_outputs()
        if self.prom is not None:
            self.prom.close()
        self.transport.close()

    def serve_forever(self) -> None:
        self.bind()
        poller = zmq.Poller()
        poller.register(self.transport.sock, zmq.POLLIN)
        poller.register(self.transport.monitor, zmq.POLLIN)
        next_sweep = next_ckpt = time.monotonic()
        if self.cfg.checkpoint_every > 0:
            next_ckpt += self.cfg.checkpoint_every
        while not self._stop:
            # a pull held only because the worker's previous PARAMS is not yet released by ZeroMQ (pyzmq reports
            # that from its own thread, a moment after the send) is retried within a millisecond or two
            deferred = self.pulls.deferred_since()
            if deferred is not None:
                ready = dict(poller.poll(1 if time.monotonic() - deferred < 0.2 else 50))
                self._guarded("answering held pulls", self.pulls.serve)
            else:
                ready = dict(poller.poll(100))
            if self.transport.monitor in ready:
                self._guarded("reading connection events", self.transport.connection_events, self._log_disconnect)
            if self.transport.sock in ready:
                for _ in range(1000):   # drain what is queued before housekeeping
                    frames = self.transport.recv()
                    if frames is None:
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
            self.events["internal_errors"] += 1
            log.exception("internal error while %s", what)

    def _log_disconnect(self, endpoint: str) -> None:
        """A worker that left, a refused worker or a status tool closing its connection is routine (debug);
        a disconnect beyond those (a crash, or a message over --max-message-mb) is worth a warning."""
        if self.events["disconnects"] <= self.sessions.expected_disconnects(self.events["rejected"]):
            log.debug("a peer on %s disconnected", endpoint)
        else:
            log.warning("a peer on %s disconnected without saying goodbye (it crashed, or sent a message over "
                        "--max-message-mb %g)", endpoint, self.cfg.max_message_mb)

    # -- receive and dispatch -----------------------------------------------------------------

    def _send(self, identity: bytes, msg: Message | list, track: bool = False) -> zmq.MessageTracker | None:
        if not isinstance(msg, list):
            msg = self.transport.outbound(identity, msg)
        snapshot = None if isinstance(msg, list) else msg.snapshot
        tracker = self.transport.send(identity, msg, track=track or snapshot is not None)
        if tracker is not None and snapshot is not None:   # theta went out zero-copy: recycled once ZeroMQ is done
            self.store.track(snapshot[0], tracker, snapshot[1])
        return tracker

    def _handle(self, frames: list) -> None:
        """Handle one received message. Its frames are let go of here (the list is emptied), before a worker
        waiting for a push slot is told to send: otherwise the next gradient would arrive while this one's
        buffers are still held (two gradients in memory with --max-pushes-in-flight 1)."""
        t0 = time.perf_counter()
        self.admission.handling = True
        try:
            with self.phases.busy():
                self._dispatch(frames)
        except Exception as exc:   # a bug of ours must not take the server down with it
            self.events["internal_errors"] += 1
            log.exception("internal error while handling a message from %r", frames[0].bytes[:16])
            self._send(frames[0].bytes, error_reply(None, "internal", f"{type(exc).__name__}: {exc}"))
        finally:
            self.admission.handling = False
            frames.clear()
            self._guarded("admitting a waiting push", self.admission.admit_waiting)
            self.record.handle_s.append(time.perf_counter() - t0)
            if self.prom is not None:
                self.prom.handled(self.record.handle_s[-1])

    def _refuse(self, identity: bytes, msg: Message, code: str, text: str) -> None:
        self.events[f"refused:{code}"] += 1
        # the heartbeats of a client whose worker id was taken over keep coming: not worth a line each
        log.log(logging.DEBUG if msg.type == MsgType.HEARTBEAT else logging.WARNING, "refused %r from %r: %s",
                msg, identity[:16], text)
        self._send(identity, error_reply(msg, code, text))

    def _dispatch(self, frames) -> None:
        identity, body = frames[0].bytes, frames[1:]
        msg, error = self.transport.decode(identity, body)
        if error is not None:   # it does not decode, is not a request, or its shared memory is unusable
            self._send(identity, error)
            return
        log.debug("recv %r", msg)
        # who sent it: the session of its routing id and, under --auth, its CurveZMQ key
        peer = Peer(session_of(identity), user_id(body[0]) if self.cfg.auth else "")
        refusal = self.sessions.gate(identity, msg, peer)
        if refusal is not None:
            self._refuse(identity, msg, *refusal)
            return
        state = self.sessions.seen_before(msg)   # a resend of a request already handled?
        if state is not None and self._duplicate(identity, msg, peer, state):
            return
        try:
            reply = self.handlers[msg.type](identity, msg, peer)
        except ValueError as exc:   # a request that decodes but does not fit: reply, keep theta
            code = getattr(exc, "code", "bad_request")
            self.events[f"refused:{code}" if code in REFUSALS else "rejected"] += 1
            # a heartbeat racing a worker's goodbye is routine; everything else is worth a line
            log.log(logging.DEBUG if msg.type == MsgType.HEARTBEAT else logging.WARNING, "rejected %r: %s", msg, exc)
            reply = error_reply(msg, code, str(exc))
        reply = self.sessions.record(msg, peer, reply)
        if isinstance(reply, Message) and reply.type == MsgType.PARAMS:
            self.pulls.send_params(msg.worker, identity, reply)
        elif reply is not None:
            self._send(identity, reply)
        self.pulls.serve()

    def _duplicate(self, identity: bytes, msg: Message, peer: Peer, state: WorkerState) -> bool:
        """A request we have seen (a resend after a timeout, or a duplicated message), answered from the record
        (True). Returns False when it must be handled as new (a pull of a worker that is no longer live: the
        handler says so)."""
        if self.admission.reroute(identity, msg):   # a reservation still waiting: answer on the newest route
            return True
        cached = self.sessions.cached_reply(msg, state)
        if cached is not None:
            # answered from the record even if the worker was declared dead meanwhile: applied exactly once
            self.events["duplicates"] += 1
            self._send(identity, cached)
            return True
        if not state.alive or (msg.type == MsgType.PUSH and msg.meta.get("reserve") is True
                               and msg.seq == state.last_seq):
            return False   # (a reservation not answered: its worker was removed while it waited; ask again)
        if self.pulls.reroute(identity, msg):   # a held pull: it is answered on the newest route
            return True
        if msg.seq == state.last_seq and msg.type == MsgType.PULL:
            reply = self._on_pull(identity, msg, peer)    # idempotent: answer again (the reply was lost)
            if reply is not None:
                self.pulls.send_params(msg.worker, identity, reply)
            return True
        # older than the last request: its answer went out long ago; the client ignores this one
        self.events["duplicates"] += 1
        log.debug("ignored old request %r (last seq %d)", msg, state.last_seq)
        self._send(identity, error_reply(msg, "stale_request", f"seq {msg.seq} is older than this worker's "
                                                               f"last request ({state.last_seq}); ignored"))
        return True

    # -- handlers: each gets the route, the request and its sender ------------------------------

    def _on_register(self, identity: bytes, msg: Message, peer: Peer) -> Message:
        widen(msg)
        plan = self.job.check_shard(msg)
        self.job.check_flags(msg.meta.get("job") or {})
        worker = self.sessions.worker_id_for(msg, peer, self.policy.awaiting)
        if self.job.check_model(msg, self.store, worker):   # the first REGISTER's theta initialised the store
            self.transport.allow_joins(self.store.theta)
        self.job.adopt(plan)   # the first worker's shard plan: the job's from now on
        state = self.workers.get(worker)
        rejoin = state is not None
        if state is not None and state.session == peer.session and state.alive and worker in self.policy.clocks:
            log.info("worker %d registered again", worker)
        replaced = self.sessions.bind(worker, identity, peer, msg.seq)
        if replaced is not None:
            log.info("worker %d taken over by a new connection (the old one is %s)", worker, replaced.state_name())
            self.admission.drop(worker)   # the old connection's reservation or slot dies with it
        self.pulls.pending.pop(worker, None)
        clock = self.policy.join(worker)
        log.info("worker %d %s at clock %d, version %d (%d live)", worker, "rejoined" if rejoin else "joined",
                 clock, self.store.version, len(self.policy.clocks))
        version, theta = self.store.snapshot()
        return Message(MsgType.WELCOME, worker=worker, seq=msg.seq, clock=clock, version=version, tensors=theta,
                       meta={"layout": self.store.layout(), "mode": self.cfg.mode, "staleness": self.cfg.staleness,
                             "aggregate": self.cfg.aggregate, "num_workers": self.cfg.num_workers,
                             "shard": self.job.shard, "backup_workers": self.cfg.backup_workers,
                             "push_slots": self.cfg.max_pushes_in_flight},
                       snapshot=(version, "fp32"))

    def _on_pull(self, identity: bytes, msg: Message, peer: Peer) -> Message | None:
        state = self.sessions.known(msg)
        with self.phases.phase("update"):   # (it may complete a sync step: fold and apply)
            self.policy.follow_clock(msg.worker, msg.clock)   # a shard following shard 0 (backup workers) only
        if msg.meta.get("wire", "fp32") not in WIRE_DTYPES:
            raise RequestError("bad_wire", f"unknown wire dtype {msg.meta.get('wire')!r} in PULL; choose one of "
                                           f"{', '.join(WIRE_DTYPES)} (--wire-dtype)")
        return self.pulls.answer(identity, msg, state)

    def _on_push(self, identity: bytes, msg: Message, peer: Peer) -> Message | None:
        self.sessions.known(msg)
        if msg.meta.get("reserve") is True and not msg.tensors:
            return self.admission.reserve(identity, msg)
        if not self.transport.note_segment(msg.worker, msg):   # (a gradient through shared memory: not the socket)
            self.admission.count_unadmitted(msg)   # a client that does not ask: not bounded
        try:
            return self.pushes.gradient(msg)
        finally:
            self.admission.release(msg.worker)   # its gradient is handled: the next worker may send

    def _grant_slot(self, worker: int, identity: bytes, msg: Message) -> None:
        """Admission lets a waiting worker send: answer its reservation (a resend of it gets this again)."""
        reply = self.sessions.record_grant(worker, Admission.reserved(msg), msg.seq)
        self._send(identity, reply)

    def _on_leave(self, identity: bytes, msg: Message, peer: Peer) -> Message:
        state = self.sessions.known(msg)
        state.left = True
        self._remove(msg.worker)
        log.info("worker %d left (%s); %d live", msg.worker, msg.meta.get("reason", "done"),
                 len(self.policy.clocks))
        return Message(MsgType.ACK, worker=msg.worker, seq=msg.seq, version=self.store.version)

    def _on_heartbeat(self, identity: bytes, msg: Message, peer: Peer) -> Message:
        self.sessions.known(msg)
        return Message(MsgType.ACK, worker=msg.worker, seq=msg.seq, version=self.store.version)

    def _on_status(self, identity: bytes, msg: Message, peer: Peer) -> Message:
        if msg.worker < 0:
            self.sessions.note_tool(identity)
        return Message(MsgType.ACK, worker=msg.worker, seq=msg.seq, version=self.store.version, meta=self.status())

    def _on_shutdown(self, identity: bytes, msg: Message, peer: Peer) -> Message:
        if self.cfg.auth and peer.key not in self.sessions.admins:
            raise RequestError("not_admin", "SHUTDOWN needs an admin key (`paramserver keys DIR --admin NAME`); "
                               "this client's key is not among the server's --admins")
        log.info("shutdown requested")
        self._stop = True
        return Message(MsgType.ACK, worker=msg.worker, seq=msg.seq, version=self.store.version)

    # -- liveness -----------------------------------------------------------------------------

    def _remove(self, worker: int) -> None:
        """Take a worker out of the job (it left or is dead): no held pull, no barrier, no clock minimum."""
        self.workers[worker].alive = False
        self.pulls.pending.pop(worker, None)
        self.divergence.forget(worker)
        with self.phases.phase("update"):   # (a sync step may complete without it)
            self.policy.leave(worker)
        self.admission.drop(worker)
        self.transport.forget_worker(worker)   # its shared-memory gradient segment and buffers go with it

    def _sweep_dead(self, now: float) -> None:
        self.sessions.sweep_silent(now, self.policy, self._remove)
        if self.policy.awaiting and self.sessions.resumed_at is not None:
            self.pulls.say_why_waiting()
        if self.cfg.step_timeout > 0 and self.cfg.mode == "sync":
            self.sessions.sweep_hung(now, self.policy, self._remove, spared=self.admission.queue)
        self.admission.sweep(now)
        self.pulls.serve()
        if self.pulls.pending:
            self.pulls.say_why_waiting()
        self.sessions.all_gone(len(self.policy.clocks), self.address)

    # -- metrics, status, checkpoints ---------------------------------------------------------

    def _record_update(self, version: int, contributions: list[Contribution]) -> None:
        self.record.record_update(version, contributions, self.policy.counters["applied"] - len(contributions))

    def status(self) -> dict:
        return {
            "version": self.store.version, "mode": self.cfg.mode, "step": self.policy.step,
            "staleness_bound": self.cfg.staleness if self.cfg.mode == "ssp" else None,
            "min_clock": self.policy.min_clock(), "max_gap": self.policy.max_gap,
            "workers": self.sessions.status(self.policy.last_clock, self.policy.awaiting),
            "live": len(self.policy.clocks), "waiting_pulls": len(self.pulls.pending),
            "push_slots": self.admission.status(),
            "started": self.policy.started, "registered": len(self.policy.last_clock),
            "num_workers": self.cfg.num_workers,
            "counters": self.counters.copy(), "pending_gradients": self.policy.pending_gradients,
            "apply_s": round(self.policy.apply_s, 4),
            "time_s": self.phases.summary(), "bytes": dict(self.transport.bytes),
            "checkpoint": self.last_checkpoint, "theta_crc32": self.store.checksum(),
            "resumed_from": self.resumed_from, "shard": self.job.shard,
            "snapshots": {"in_flight": self.store.in_flight(), "copies": self.store.copies,
                          "allocated": self.store.allocations, "waited_s": round(self.store.waited_s, 3),
                          "over_cap": self.store.over_cap},
            "threads": torch.get_num_threads(),
            **self.record.summary(),
        }

    def state_dict(self) -> dict:
        return self.checkpointer.state_dict()

    def write_checkpoint(self) -> bool:
        """Write --checkpoint (see Checkpointer.write): False when it could not be written (logged, counted)."""
        return self.checkpointer.write()

    def metrics(self) -> dict:
        return {"config": dataclasses.asdict(self.cfg), "status": self.status(), **self.record.series()}

    def save_outputs(self) -> None:
        self.checkpointer.save_outputs(self.metrics)
