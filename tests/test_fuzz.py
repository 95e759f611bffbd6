"""Protocol fuzzing against a live server: every message gets an answer, the server stays up, and
theta changes only by pushes that are entirely valid.

Three kinds of cases, drawn by hypothesis (derandomized: the same cases on every run, so CI is
reproducible):

* mutations of a valid PUSH from the registered worker 1 (header fields, type, tensor specs, frames,
  flipped or cut header bytes): they exercise the decoder and the request checks;
* raw garbage frames;
* well-formed PUSHes of worker 1 with the right sequence number whose *tensors* are wrong (a wrong
  shape or dtype under a right name, NaN/Inf values, a missing or an extra name) or entirely valid:
  they get past the decoder and the request checks to gradient validation, and the valid ones to
  the consistency policy. Each is checked against an oracle (valid: ACK applied; else ERROR).

The share of messages that reached gradient validation (the server's `received` counter, which
counts rejected gradients as `dropped:invalid`) is printed and has a stated minimum.
"""
from __future__ import annotations

import msgpack
import numpy as np
import pytest
import zmq
from hypothesis import HealthCheck, given, settings, strategies as st

from common.protocol import Message, MsgType, decode, encode
from paramserver.store import theta_crc32
from tests.conftest import counts_add_up
from worker.client import PSClient

EXAMPLES = 3000
MIN_SHARE_VALIDATED = 0.25   # at least this share of the fuzzed messages reaches gradient validation
MIN_SHARE_POLICY = 0.08      # ... and this share passes it to the consistency policy
LAYOUT = {"w": ((2, 3), np.float32), "b": ((2,), np.float32)}

_values = st.one_of(st.integers(-2**40, 2**40), st.none(), st.booleans(), st.floats(allow_nan=True),
                    st.text(max_size=8), st.binary(max_size=8), st.lists(st.integers(-2**63, 2**63 - 1), max_size=2))
# Mutations of a valid PUSH from the registered worker 1: they reach every check behind the decoder.
_LEGIT_ADMIN = (int(MsgType.REGISTER), int(MsgType.SHUTDOWN), int(MsgType.LEAVE))
_type_ids = [int(t) for t in MsgType if int(t) not in _LEGIT_ADMIN]
_mutation = st.one_of(
    st.tuples(st.just("field"), st.sampled_from(["v", "t", "w", "seq", "clk", "ver", "ts", "m"]), _values),
    st.tuples(st.just("type"), st.sampled_from(_type_ids + [0, 8, 99]), st.none()),
    st.tuples(st.just("name"), st.integers(0, 1), st.sampled_from(["zz", "", "w", "b", "w.x"])),
    st.tuples(st.just("dtype"), st.integers(0, 1), st.sampled_from(["float64", "float16", "int32", "uint8", "?"])),
    st.tuples(st.just("shape"), st.integers(0, 1), st.lists(st.integers(-1, 7), max_size=3)),
    st.tuples(st.just("spec"), st.integers(0, 2), _values),
    st.tuples(st.just("drop_spec"), st.integers(0, 1), st.none()),
    st.tuples(st.just("frame"), st.integers(0, 2), st.binary(max_size=40)),
    st.tuples(st.just("drop_frame"), st.integers(0, 1), st.none()),
    st.tuples(st.just("nan"), st.integers(0, 1), st.sampled_from([b"\x00\x00\xc0\x7f", b"\x00\x00\x80\x7f"])),
    st.tuples(st.just("flip"), st.integers(0, 200), st.integers(1, 255)),
    st.tuples(st.just("cut"), st.integers(0, 200), st.none()),
)
# Well-formed pushes with wrong (or right) tensors: what happens to each parameter, and extra names.
_TENSOR_KINDS = ["ok", "shape", "dtype", "nan", "inf", "missing"]
_seed = st.integers(0, 2**32 - 1)                               # seed of the values
_wrong_tensors = st.tuples(
    st.just("tensors"),
    st.fixed_dictionaries({name: st.sampled_from(_TENSOR_KINDS) for name in LAYOUT}),
    st.lists(st.sampled_from(["zz", "w.x", "", "W", "b "]), max_size=1, unique=True),
    st.lists(st.integers(0, 4), min_size=0, max_size=3),      # the wrong shape, when one is asked for
    st.sampled_from(["float64", "float16", "int32", "int64", "uint8", "bool"]),
    _seed,
)
_valid_tensors = st.tuples(st.just("tensors"), st.just({name: "ok" for name in LAYOUT}), st.just([]), st.just([]),
                           st.just("float32"), _seed)
_tensor_case = st.one_of(_wrong_tensors, _valid_tensors)      # about half of them valid gradients
_fuzz_case = st.one_of(
    st.lists(_mutation, min_size=1, max_size=3),
    st.lists(st.binary(max_size=64), min_size=1, max_size=4),   # raw garbage frames
    _tensor_case,
)


def _build(case, seq: int, rng_bytes: bytes) -> list[bytes]:
    """Apply a list of mutations to a valid PUSH (or pass garbage frames through)."""
    if case and isinstance(case[0], bytes):
        return list(case)
    h = {"v": 1, "t": int(MsgType.PUSH), "w": 1, "seq": seq, "clk": 0, "ver": 0,
         "ts": [["w", "float32", [2, 3]], ["b", "float32", [2]]], "m": {"loss": 1.0}}
    frames = [bytearray(rng_bytes[:24]), bytearray(rng_bytes[24:32])]
    post = []
    for kind, a, b in case:
        if kind == "field":
            h[a] = b
        elif kind == "type":
            h["t"] = a
        elif kind in ("name", "dtype", "shape") and isinstance(h["ts"], list) and a < len(h["ts"]) \
                and isinstance(h["ts"][a], list) and len(h["ts"][a]) == 3:
            h["ts"][a][{"name": 0, "dtype": 1, "shape": 2}[kind]] = b
        elif kind == "spec" and isinstance(h["ts"], list):
            h["ts"][a:a + 1] = [b]
        elif kind == "drop_spec" and isinstance(h["ts"], list):
            del h["ts"][a:a + 1]
        elif kind == "frame":
            frames[a:a + 1] = [bytearray(b)]
        elif kind == "drop_frame":
            del frames[a:a + 1]
        elif kind == "nan" and a < len(frames) and len(frames[a]) >= 4:
            frames[a][:4] = b
        else:
            post.append((kind, a, b))
    if h.get("t") in _LEGIT_ADMIN:   # valid administrative requests are not fuzz: make them unknown types
        h["t"] = 99
    header = bytearray(msgpack.packb(h, use_bin_type=True))
    for kind, a, b in post:
        if kind == "flip" and header:
            header[a % len(header)] ^= b
        elif kind == "cut":
            header = header[:a % (len(header) + 1)]
    return [bytes(header)] + [bytes(f) for f in frames]


def _tensors(case) -> tuple[dict[str, np.ndarray], bool]:
    """The gradient of a "tensors" case, and whether it is entirely valid for LAYOUT."""
    _, kinds, extra, bad_shape, bad_dtype, seed = case
    rng = np.random.default_rng(seed)
    grads, valid = {}, not extra
    for name, (shape, dtype) in LAYOUT.items():
        kind = kinds[name]
        if kind == "missing":
            valid = False
            continue
        if kind == "shape" and tuple(bad_shape) != shape:
            shape, valid = tuple(bad_shape), False
        if kind == "dtype":
            dtype, valid = np.dtype(bad_dtype), False
        g = (rng.standard_normal(shape) * 3).astype(dtype)
        if kind in ("nan", "inf") and g.size and g.dtype.kind == "f":
            g.flat[int(rng.integers(g.size))] = np.nan if kind == "nan" else -np.inf
            valid = False
        grads[name] = g
    for name in extra:
        grads[name] = rng.standard_normal(2).astype(np.float32)
    return grads, valid


def _last_seq(server, worker: int) -> int:
    """The sequence number the server holds for `worker` (a fuzzed header may have moved it)."""
    state = server.workers.get(worker)
    return state.last_seq if state is not None else 0


@pytest.fixture(scope="module")
def fuzz_target():
    from tests.conftest import RunningServer
    srv = RunningServer(num_workers=1, mode="async", optimizer="sgd", lr=0.1, worker_timeout=600)
    init = {name: np.arange(np.prod(shape), dtype=dtype).reshape(shape) for name, (shape, dtype) in LAYOUT.items()}
    with PSClient(srv.address, worker=0, server_timeout=10) as ps:
        ps.register(init=init)
        ps.push({name: np.ones(shape, dtype) for name, (shape, dtype) in LAYOUT.items()}, version=0, clock=0)
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(srv.address)
    sock.send_multipart(encode(Message(MsgType.REGISTER, worker=1, seq=1)))   # the fuzzer is worker 1
    assert decode(sock.recv_multipart()).type == MsgType.WELCOME
    counters = srv.server.policy.counters
    state = {"theta": theta_crc32(srv.server.store.theta), "version": srv.server.store.version, "count": 0,
             "valid_pushes": 0, "tensor_cases": 0, "seq": 10,
             "received0": counters["received"], "invalid0": counters["dropped:invalid"]}
    yield srv, sock, state
    sock.close()
    srv.stop()


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
          database=None)   # the same cases on every run: CI is reproducible
@given(case=_fuzz_case, payload=st.binary(min_size=32, max_size=32))
def test_fuzzed_messages_get_answers_and_leave_theta_alone(fuzz_target, case, payload):
    srv, sock, state = fuzz_target
    state["seq"] = max(state["seq"], _last_seq(srv.server, 1)) + 1
    expect = None
    if case and case[0] == "tensors":
        grads, valid = _tensors(case)
        frames = encode(Message(MsgType.PUSH, worker=1, seq=state["seq"], clock=0, version=srv.server.store.version,
                                tensors=grads, meta={"loss": 1.0}))
        expect = "applied" if valid else "rejected"
        state["tensor_cases"] += 1
    else:
        frames = _build(case, state["seq"], payload)
    sock.send_multipart(frames)
    assert sock.poll(5000), f"no answer to {frames!r}"
    reply = decode(sock.recv_multipart())
    assert reply.type in (MsgType.ERROR, MsgType.ACK, MsgType.PARAMS)
    state["count"] += 1
    assert srv.thread.is_alive()
    if expect == "applied":       # the oracle: a well-formed, valid push of a live worker is applied
        assert reply.type == MsgType.ACK and reply.meta.get("status") == "applied", reply
    elif expect == "rejected":    # ... and one with any wrong tensor is refused, naming the problem
        assert reply.type == MsgType.ERROR and reply.meta.get("code") in ("bad_gradient", "malformed"), reply
    if reply.type == MsgType.ACK and reply.meta.get("status") == "applied":
        # a push that is entirely valid (names, shapes, dtypes, finite values) is not malformed
        state["valid_pushes"] += 1
        state["theta"], state["version"] = theta_crc32(srv.server.store.theta), srv.server.store.version
    assert (theta_crc32(srv.server.store.theta), srv.server.store.version) == (state["theta"], state["version"])


def test_fuzz_server_still_serves(fuzz_target):
    srv, sock, state = fuzz_target
    with PSClient(srv.address, server_timeout=5) as ps:
        st_ = ps.status()
    assert st_["version"] == state["version"] and st_["theta_crc32"] == state["theta"]
    assert st_["counters"].get("internal_errors", 0) == 0
    counts_add_up(st_)
    assert state["count"] >= EXAMPLES
    c = st_["counters"]
    validated = c.get("received", 0) - state["received0"]          # reached gradient validation
    to_policy = validated - (c.get("dropped:invalid", 0) - state["invalid0"])   # ... and passed it
    share = validated / state["count"]
    print(f"\nfuzz: {state['count']} messages answered; {validated} ({share:.0%}) reached gradient validation, "
          f"{to_policy} ({to_policy / state['count']:.0%}) the consistency policy ({state['valid_pushes']} applied); "
          f"{state['tensor_cases']} were well-formed pushes with drawn tensors; counters {c}")
    assert share >= MIN_SHARE_VALIDATED, f"only {validated} of {state['count']} fuzzed messages reached validation"
    assert to_policy / state["count"] >= MIN_SHARE_POLICY, f"only {to_policy} fuzzed messages reached the policy"
    assert state["valid_pushes"] == to_policy          # async: every gradient that reached it was applied
