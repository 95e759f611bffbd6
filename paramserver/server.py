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
import zmq
from zmq.utils.monitor import recv_monitor_message

from common.config import ConfigError, ServerConfig
from common.protocol import REQUEST_TYPES, Message, MsgType, ProtocolError, decode, encode, error_reply
from common.security import server_curve
from common.checkpoint import load_checkpoint, save_checkpoint
from paramserver.consistency import Consistency, Contribution
from paramserver.metrics import ServerMetrics
from paramserver.store import ParamStore

log = logging.getLogger("paramserver.server")

MONITORED = (zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
             | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)
_EVENT_NAMES = {zmq.EVENT_HANDSHAKE_FAILED_AUTH: "authentication refused",
                zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "protocol error",
                zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: "no detail"}

#: requests that carry a per-worker sequence number and are deduplicated (a resend is answered once)
SEQUENCED = frozenset({MsgType.PULL, MsgType.PUSH, MsgType.LEAVE})


class RequestError(ValueError):
    """A request that decodes but cannot be served; `code` goes into the ERROR reply."""

    def __init__(self, code: str, text: str):
        super().__init__(text)
        self.code = code


@dataclass
class WorkerState:
    identity: bytes
    last_seen: float
    last_seq: int = 0
    last_reply: list | None = None    # cached ACK of the last push/leave, resent on a duplicate
    alive: bool = True
    left: bool = False


class Server:
    def __init__(self, cfg: ServerConfig, context: zmq.Context | None = None):
        self.cfg = cfg
        self.store = ParamStore(cfg.optimizer, cfg.lr, cfg.momentum, cfg.beta1, cfg.beta2, cfg.eps)
        self.policy = Consistency(self.store, cfg.mode, cfg.num_workers, cfg.staleness, cfg.backup_workers,
                                  cfg.aggregate, min_workers=cfg.min_workers, on_update=self._record_update)
        self.workers: dict[int, WorkerState] = {}
        self.pending: dict[int, tuple[bytes, Message, float]] = {}   # worker -> held pull
        self.held: dict[int, tuple[int, dict]] = {}   # worker -> (version, theta) it computes on
        self.job: dict = {}
        self.record = ServerMetrics()
        self.last_checkpoint: dict = {}
        self._stop = False
        self._ctx = context or zmq.Context.instance()
        self._auth = None        # the ZAP authenticator thread when --auth is on
        self._last_why = ""      # the last reason logged for holding pulls
        self.sock: zmq.Socket | None = None
        self._monitor: zmq.Socket | None = None   # connection events of self.sock
        self.address = ""
        self.handlers = {
            MsgType.REGISTER: self._on_register, MsgType.PULL: self._on_pull, MsgType.PUSH: self._on_push,
            MsgType.LEAVE: self._on_leave, MsgType.HEARTBEAT: self._on_heartbeat,
            MsgType.STATUS: self._on_status, MsgType.SHUTDOWN: self._on_shutdown,
        }
        self.prom = None         # the Prometheus exporter (paramserver/prom.py) when --metrics-port is set
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
            self.sock.setsockopt(zmq.MAXMSGSIZE, int(self.cfg.max_message_mb * 2**20))
            if self.cfg.curve_secret:
                self._auth = server_curve(self.sock, self.cfg.curve_secret, self.cfg.auth, self._ctx)
            self.sock.bind(self.cfg.bind)
            self.address = self.sock.getsockopt(zmq.LAST_ENDPOINT).decode()
            self._monitor = self.sock.get_monitor_socket(MONITORED)
            log.info("listening on %s (mode=%s, workers=%d)", self.address, self.cfg.mode, self.cfg.num_workers)
            if self.cfg.metrics_port:
                from paramserver.prom import PromExporter
                self.prom = PromExporter(self, self.cfg.metrics_port)
        return self.address

    def stop(self) -> None:
        """Ask the loop to finish (safe from another thread or a signal handler)."""
        self._stop = True

    def close(self) -> None:
        """Write the final checkpoint and metrics, then close the socket. Safe to call twice."""
        if self.sock is None:
            return
        self.save_outputs()
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
            ready = dict(poller.poll(100))
            if self._monitor in ready:
                self._connection_events()
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
                self._sweep_dead(now)
                next_sweep = now + min(0.5, self.cfg.worker_timeout / 4)
            if self.cfg.checkpoint_every > 0 and now >= next_ckpt and self.cfg.checkpoint:
                self.write_checkpoint()
                next_ckpt = now + self.cfg.checkpoint_every
            if self.prom is not None:
                self.prom.publish()

    def _connection_events(self) -> None:
        """Say when ZeroMQ drops a connection: it does so without a message for an oversized message
        (--max-message-mb) and for a failed CurveZMQ handshake (an unknown key, or plain text)."""
        while self._monitor.poll(0):
            event = recv_monitor_message(self._monitor)
            what, endpoint = event["event"], event["endpoint"].decode(errors="replace")
            if what == zmq.EVENT_DISCONNECTED:
                self.policy.counters["disconnects"] += 1
                log.info("a peer on %s disconnected (it closed, or sent a message over --max-message-mb %g)",
                          endpoint, self.cfg.max_message_mb)
            else:
                self.policy.counters["handshake_failures"] += 1
                log.warning("refused a connection on %s: CurveZMQ handshake failed (%s); the client has no "
                            "admitted key or speaks plain text", endpoint, _EVENT_NAMES.get(what, what))

    # -- receive and dispatch -----------------------------------------------------------------

    def _send(self, identity: bytes, msg: Message | list) -> None:
        frames = msg if isinstance(msg, list) else encode(msg)
        try:
            self.sock.send_multipart([identity] + frames, copy=False)
        except zmq.ZMQError as exc:  # peer gone or queue full: the client resends
            log.warning("reply to %r not sent: %s", identity, exc)

    def _handle(self, frames) -> None:
        t0 = time.perf_counter()
        try:
            self._dispatch(frames)
        except Exception as exc:   # a bug of ours must not take the server down with it
            self.policy.counters["internal_errors"] += 1
            log.exception("internal error while handling a message from %r", frames[0].bytes[:16])
            self._send(frames[0].bytes, error_reply(None, "internal", f"{type(exc).__name__}: {exc}"))
        finally:
            self.record.handle_s.append(time.perf_counter() - t0)
            if self.prom is not None:
                self.prom.handled(self.record.handle_s[-1])

    def _dispatch(self, frames) -> None:
        identity, body = frames[0].bytes, frames[1:]
        try:
            msg = decode(body)
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
        log.debug("recv %r", msg)
        state = self.workers.get(msg.worker)
        if state is not None:
            state.last_seen = time.monotonic()
            # a resend of a request already handled (a LEAVE's resend also after the worker has left)
            if msg.type in SEQUENCED and msg.seq <= state.last_seq and (state.alive or msg.type == MsgType.LEAVE):
                self._duplicate(identity, msg, state)
                return
        try:
            reply = self.handlers[msg.type](identity, msg)
        except ValueError as exc:   # a request that decodes but does not fit: reply, keep theta
            self.policy.counters["rejected"] += 1
            # a heartbeat racing a worker's goodbye is routine; everything else is worth a line
            log.log(logging.DEBUG if msg.type == MsgType.HEARTBEAT else logging.WARNING, "rejected %r: %s", msg, exc)
            reply = error_reply(msg, getattr(exc, "code", "bad_request"), str(exc))
        if msg.worker in self.workers and msg.type in SEQUENCED:
            state = self.workers[msg.worker]
            state.last_seq = max(state.last_seq, msg.seq)
            if msg.type in (MsgType.PUSH, MsgType.LEAVE) and reply is not None:
                reply = encode(reply)
                state.last_reply = reply
        if reply is not None:
            self._send(identity, reply)
        self._serve_pending()

    def _duplicate(self, identity: bytes, msg: Message, state: WorkerState) -> None:
        """A request we have seen (a resend after a timeout, or a duplicated message)."""
        held = self.pending.get(msg.worker)
        if held and held[1].seq == msg.seq:
            self.pending[msg.worker] = (identity, held[1], held[2])   # answer on the newest route
            return
        if msg.seq == state.last_seq and msg.type in (MsgType.PUSH, MsgType.LEAVE) and state.last_reply:
            self.policy.counters["duplicates"] += 1
            self._send(identity, state.last_reply)
        elif msg.seq == state.last_seq and msg.type == MsgType.PULL:
            reply = self._on_pull(identity, msg)    # idempotent: answer again (the reply was lost)
            if reply is not None:
                self._send(identity, reply)
        else:   # older than the last request: its answer went out long ago; the client ignores this one
            self.policy.counters["duplicates"] += 1
            log.debug("ignored old request %r (last seq %d)", msg, state.last_seq)
            self._send(identity, error_reply(msg, "stale_request", f"seq {msg.seq} is older than this worker's "
                                                                   f"last request ({state.last_seq}); ignored"))

    def _known(self, msg: Message) -> WorkerState:
        state = self.workers.get(msg.worker)
        if state is None or not state.alive:
            raise RequestError("unknown_worker", f"worker {msg.worker} is not registered"
                               f"{' (declared dead or left)' if state else ''}; send REGISTER first")
        return state

    # -- handlers -----------------------------------------------------------------------------

    def _on_register(self, identity: bytes, msg: Message) -> Message:
        if msg.tensors:
            if not self.store.initialized:
                self.store.init(msg.tensors)
                self.job = dict(msg.meta.get("job", {}))
                log.info("theta initialised by worker %d: %d tensors, %d values", msg.worker, len(msg.tensors),
                         sum(t.size for t in msg.tensors.values()))
            elif {n: [t.dtype.name, list(t.shape)] for n, t in msg.tensors.items()} != self.store.layout():
                raise RequestError("model_mismatch", "this worker's model does not match the parameters the "
                                   "server holds (names, shapes or dtypes differ); start it with the same job "
                                   "flags as the others")
        elif not self.store.initialized:
            raise RequestError("no_parameters", "the server holds no parameters yet: the first REGISTER must "
                               "carry the initial parameters")
        worker = msg.worker
        if worker < 0:
            worker = max(self.workers, default=-1) + 1
        state = self.workers.get(worker)
        rejoin = state is not None
        if state is not None and state.alive and not state.left and worker in self.policy.clocks:
            log.info("worker %d registered again (restart?)", worker)
        self.workers[worker] = WorkerState(identity, time.monotonic(), last_seq=msg.seq)
        self.pending.pop(worker, None)
        clock = self.policy.join(worker)
        log.info("worker %d %s at clock %d, version %d (%d live)", worker, "rejoined" if rejoin else "joined",
                 clock, self.store.version, len(self.policy.clocks))
        version, theta = self.store.snapshot()
        return Message(MsgType.WELCOME, worker=worker, seq=msg.seq, clock=clock, version=version, tensors=theta,
                       meta={"layout": self.store.layout(), "mode": self.cfg.mode, "staleness": self.cfg.staleness,
                             "aggregate": self.cfg.aggregate, "num_workers": self.cfg.num_workers})

    @property
    def finished(self) -> bool:
        """The --max-gradients budget is spent: workers are told to stop."""
        return 0 < self.cfg.max_gradients <= self.policy.counters["applied"]

    def _stop_reply(self, msg: Message) -> Message:
        return Message(MsgType.PARAMS, worker=msg.worker, seq=msg.seq, version=self.store.version,
                       meta={"stop": True, "reason": f"{self.cfg.max_gradients} gradients applied"})

    def _on_pull(self, identity: bytes, msg: Message) -> Message | None:
        self._known(msg)
        if self.finished:
            return self._stop_reply(msg)
        if self.policy.pull_ready(msg.worker):
            return self._params_reply(msg, 0.0)
        if msg.worker not in self.pending:
            self.pending[msg.worker] = (identity, msg, time.monotonic())
            self._say_why_waiting()
        return None

    def _say_why_waiting(self) -> None:
        """Log (once per cause) why pulls are being held when it is not the ordinary barrier."""
        live = len(self.policy.clocks)
        if not self.policy.started:   # routine at start-up
            level = logging.INFO
            why = f"waiting for {self.cfg.num_workers} workers to register ({len(self.policy.last_clock)} so far)"
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
        version, theta = self.store.snapshot()
        if self.cfg.track_divergence:
            self.held[msg.worker] = (version, theta)
        return Message(MsgType.PARAMS, worker=msg.worker, seq=msg.seq, clock=clock, version=version,
                       tensors=theta, meta={"wait_s": waited, "min_clock": self.policy.min_clock()})

    def _serve_pending(self) -> None:
        for worker, (identity, msg, since) in list(self.pending.items()):
            if self.finished:
                del self.pending[worker]
                self._send(identity, self._stop_reply(msg))
            elif self.policy.pull_ready(worker):
                del self.pending[worker]
                self._send(identity, self._params_reply(msg, time.monotonic() - since))

    def _on_push(self, identity: bytes, msg: Message) -> Message:
        self._known(msg)
        try:
            self.store.check_gradient(msg.tensors)
        except ValueError as exc:
            self.policy.counters["received"] += 1
            self.policy.counters["dropped:invalid"] += 1
            raise RequestError("bad_gradient", str(exc)) from None
        if self.finished:   # the budget is spent: nothing more is applied
            self.policy.counters["received"] += 1
            self.policy.counters["dropped:budget"] += 1
            return Message(MsgType.ACK, worker=msg.worker, seq=msg.seq, clock=msg.clock, version=self.store.version,
                           meta={"status": "dropped", "reason": "the --max-gradients budget is spent", "stop": True})
        meta = {k: msg.meta[k] for k in ("loss",) if isinstance(msg.meta.get(k), (int, float))}
        meta["divergence"] = self._divergence(msg.worker, msg.version)
        result = self.policy.push(msg.worker, msg.clock, msg.tensors, msg.version, meta)
        return Message(MsgType.ACK, worker=msg.worker, seq=msg.seq, clock=msg.clock, version=result.version,
                       meta={"status": result.status, "reason": result.reason, "stop": self.finished})

    def _divergence(self, worker: int, base_version: int) -> float | None:
        """L2 distance between the theta this gradient was computed on and the server's theta now."""
        held = self.held.get(worker)
        if held is None or held[0] != base_version:
            return None
        if base_version == self.store.version:
            return 0.0
        total = 0.0
        for name, theta in self.store.theta.items():
            d = theta - held[1][name]
            total += float(np.dot(d.ravel(), d.ravel()))
        return total ** 0.5

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
        return Message(MsgType.ACK, worker=msg.worker, seq=msg.seq, version=self.store.version, meta=self.status())

    def _on_shutdown(self, identity: bytes, msg: Message) -> Message:
        log.info("shutdown requested")
        self._stop = True
        return Message(MsgType.ACK, worker=msg.worker, seq=msg.seq, version=self.store.version)

    # -- liveness -----------------------------------------------------------------------------

    def _remove(self, worker: int) -> None:
        """Take a worker out of the job (it left or is dead): no held pull, no barrier, no clock minimum."""
        self.workers[worker].alive = False
        self.pending.pop(worker, None)
        self.held.pop(worker, None)
        self.policy.leave(worker)

    def _sweep_dead(self, now: float) -> None:
        for worker, state in self.workers.items():
            if state.alive and now - state.last_seen > self.cfg.worker_timeout:
                self._remove(worker)
                self.policy.counters["dead"] += 1
                log.warning("worker %d silent for %.1fs: declared dead; %d live", worker, now - state.last_seen,
                            len(self.policy.clocks))
        self._serve_pending()
        if self.pending:
            self._say_why_waiting()

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
                                 "state": "left" if s.left else ("live" if s.alive else "dead"),
                                 "last_seen_s": round(now - s.last_seen, 2)} for w, s in self.workers.items()},
            "live": len(self.policy.clocks), "waiting_pulls": len(self.pending),
            "counters": dict(self.policy.counters), "pending_gradients": self.policy.pending_gradients,
            "checkpoint": self.last_checkpoint, "theta_crc32": self.store.checksum(),
            **self.record.summary(),
        }

    def state_dict(self) -> dict:
        return {**self.store.state_dict(), "optimizer": self.cfg.optimizer, **self.policy.state_dict(),
                "config": dataclasses.asdict(self.cfg), "job": self.job}

    def write_checkpoint(self) -> None:
        if not self.cfg.checkpoint or not self.store.initialized:
            return
        t0 = time.monotonic()
        save_checkpoint(self.cfg.checkpoint, self.state_dict())
        self.last_checkpoint = {"path": self.cfg.checkpoint, "version": self.store.version,
                                "written_s": self.record.elapsed(),
                                "seconds": round(time.monotonic() - t0, 3)}
        log.info("checkpoint at version %d -> %s", self.store.version, self.cfg.checkpoint)

    def _resume(self, path: str) -> None:
        state = load_checkpoint(path)
        if state.get("optimizer", self.cfg.optimizer) != self.cfg.optimizer:
            raise ConfigError(f"checkpoint {path} was written with --optimizer {state['optimizer']}; "
                              f"resume with the same optimizer")
        self.store.load_state_dict(state)
        self.policy.load_state_dict(state)
        self.job = state.get("job", {})
        log.info("resumed from %s at version %d (step %d), theta crc32 %s", path, self.store.version,
                 self.policy.step, self.store.checksum())

    def metrics(self) -> dict:
        return {"config": dataclasses.asdict(self.cfg), "status": self.status(), **self.record.series()}

    def save_outputs(self) -> None:
        self.write_checkpoint()
        if self.cfg.metrics:
            os.makedirs(os.path.dirname(os.path.abspath(self.cfg.metrics)), exist_ok=True)
            tmp = self.cfg.metrics + ".tmp"
            with open(tmp, "w") as f:
                json.dump(self.metrics(), f)
            os.replace(tmp, self.cfg.metrics)
