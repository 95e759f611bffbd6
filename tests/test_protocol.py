"""common/protocol.py: round trips, and every kind of bad message against a live server."""
from __future__ import annotations

import msgpack
import numpy as np
import pytest
import zmq

from common.protocol import DTYPES, PROTOCOL_VERSION, Message, MsgType, ProtocolError, decode, encode
from worker.client import PSClient, ServerError

SHAPES = [(), (0,), (5,), (3, 4), (2, 3, 4)]


@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("shape", SHAPES)
def test_round_trip(dtype, shape):
    rng = np.random.default_rng(0)
    arr = (rng.standard_normal(shape) * 10).astype(dtype)
    msg = Message(MsgType.PUSH, worker=3, seq=9, clock=4, version=7, tensors={"a.b": arr, "z": np.asarray(arr).copy()},
                  meta={"loss": 1.5})
    back = decode([bytes(memoryview(f)) for f in encode(msg)])
    assert (back.type, back.worker, back.seq, back.clock, back.version) == (MsgType.PUSH, 3, 9, 4, 7)
    assert back.meta == {"loss": 1.5}
    assert list(back.tensors) == ["a.b", "z"]
    for name in msg.tensors:
        assert back.tensors[name].dtype == np.dtype(dtype)
        assert back.tensors[name].shape == shape
        np.testing.assert_array_equal(back.tensors[name], msg.tensors[name])


def test_non_contiguous_and_big_endian_are_sent_correctly():
    arr = np.arange(12, dtype=">f4").reshape(3, 4).T
    back = decode([bytes(memoryview(f)) for f in encode(Message(MsgType.PUSH, tensors={"x": arr}))])
    np.testing.assert_array_equal(back.tensors["x"], arr)


def test_repr_is_compact():
    r = repr(Message(MsgType.PUSH, worker=1, seq=2, tensors={"x": np.zeros(1000, np.float32)}))
    assert r == "<PUSH w=1 seq=2 clk=0 ver=0 tensors=1 bytes=4000>"


def _header(**kw):
    h = {"v": PROTOCOL_VERSION, "t": int(MsgType.PUSH), "w": 0, "seq": 1, "clk": 0, "ver": 0, "ts": [], "m": {}}
    h.update(kw)
    return msgpack.packb(h)


@pytest.mark.parametrize("frames, needle", [
    ([], "empty"),
    ([b"\xc1garbage"], "not valid msgpack"),
    ([msgpack.packb([1, 2])], "must be a msgpack map"),
    ([_header(v=99)], "protocol version 99"),
    ([_header(t=77)], "unknown message type 77"),
    ([_header(ts=[["x", "float32", [4]]])], "announces 1 tensor frame(s) but 0"),
    ([_header(ts=[["x", "float32", [4]]]), b"\0" * 15], "needs 16"),
    ([_header(ts=[["x", "complex64", [1]]]), b"\0" * 8], "unknown dtype"),
    ([_header(ts=[["x", "float32", [-1]]]), b""], "bad shape"),
    ([_header(ts=[["x", "float32"]]), b""], "bad tensor spec"),
    ([_header(seq="one")], "must be an integer"),
    ([_header(ts=[["x", "float32", [0, 2**62, 2**62]]]), b""], "absurdly large"),   # 0 bytes, numpy chokes
    ([_header(ts=[["x", "float32", [0, 2**39, 2**39]]]), b""], "absurdly large"),
])
def test_decode_rejects(frames, needle):
    with pytest.raises(ProtocolError, match=None) as info:
        decode(frames)
    assert needle in str(info.value)


# -- against a live server ----------------------------------------------------------------------

@pytest.fixture
def live(start_server):
    srv = start_server(num_workers=1, mode="async", optimizer="sgd", lr=0.1)
    ps = PSClient(srv.address, worker=0, request_timeout=1.0, server_timeout=10)
    ps.register(init={"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(2, np.float32)})
    yield srv, ps
    ps.close()


def _theta(srv):
    return {n: t.tobytes() for n, t in srv.server.store.theta.items()}


def _raw(address, frames):
    with zmq.Context.instance().socket(zmq.DEALER) as s:
        s.setsockopt(zmq.LINGER, 0)
        s.connect(address)
        s.send_multipart(frames)
        assert s.poll(5000), "the server did not answer"
        return decode(s.recv_multipart())


@pytest.mark.parametrize("frames, code", [
    ([_header(v=2)], "malformed"),
    ([b"not msgpack \xc1"], "malformed"),
    ([_header(ts=[["w", "float32", [2, 3]]]), b"\0" * 10], "malformed"),           # truncated frame
    ([_header(ts=[["w", "float32", [2, 3]], ["b", "float32", [2]]]), b"\0" * 24], "malformed"),  # missing frame
    ([_header(t=99)], "malformed"),                                                  # unknown type
    ([_header(t=int(MsgType.ACK))], "not_a_request"),
])
def test_bad_frames_get_error_reply_and_theta_is_unchanged(live, frames, code):
    srv, ps = live
    before = _theta(srv)
    reply = _raw(srv.address, frames)
    assert reply.type == MsgType.ERROR and reply.meta["code"] == code
    assert reply.meta["error"]
    assert _theta(srv) == before
    assert ps.status()["version"] == 0          # still serving


@pytest.mark.parametrize("grads, needle", [
    ({"w": np.zeros((3, 2), np.float32), "b": np.zeros(2, np.float32)}, "wrong shape for 'w'"),
    ({"w": np.zeros((2, 3), np.float64), "b": np.zeros(2, np.float32)}, "wrong dtype for 'w'"),
    ({"w": np.zeros((2, 3), np.float32), "b": np.zeros(2, np.float32), "nope": np.zeros(1, np.float32)},
     "unknown parameter name(s): nope"),
    ({"w": np.zeros((2, 3), np.float32)}, "missing 1 parameter(s): b"),
    ({"w": np.full((2, 3), np.nan, np.float32), "b": np.zeros(2, np.float32)}, "non-finite"),
])
def test_bad_gradients_are_refused(live, grads, needle):
    srv, ps = live
    before = _theta(srv)
    with pytest.raises(ServerError) as info:
        ps.push(grads, version=0, clock=0)
    assert needle in str(info.value)
    assert _theta(srv) == before
    # the server still applies a good gradient afterwards
    ps.push({"w": np.ones((2, 3), np.float32), "b": np.ones(2, np.float32)}, version=0, clock=0)
    assert ps.pull().version == 1


def test_unknown_worker_is_refused(live):
    srv, _ = live
    before = _theta(srv)
    reply = _raw(srv.address, encode(Message(MsgType.PUSH, worker=42, seq=1,
                                             tensors={"w": np.zeros((2, 3), np.float32),
                                                      "b": np.zeros(2, np.float32)})))
    assert reply.type == MsgType.ERROR and reply.meta["code"] == "unknown_worker"
    assert _theta(srv) == before


def test_model_mismatch_on_register(live):
    srv, _ = live
    with PSClient(srv.address, worker=1, server_timeout=5) as other:
        with pytest.raises(ServerError, match="model_mismatch"):
            other.register(init={"w": np.zeros(3, np.float32)})


def test_welcome_carries_layout_theta_and_version(live):
    srv, _ = live
    with PSClient(srv.address, worker=1, server_timeout=5) as other:
        welcome = other.register()
    assert welcome.type == MsgType.WELCOME
    assert welcome.meta["layout"] == {"w": ["float32", [2, 3]], "b": ["float32", [2]]}
    np.testing.assert_array_equal(welcome.tensors["w"], np.arange(6, dtype=np.float32).reshape(2, 3))
    assert welcome.version == 0
