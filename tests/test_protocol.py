"""common/protocol.py: round trips, and every kind of bad message against a live server."""
from __future__ import annotations

import msgpack
import numpy as np
import pytest
import zmq

from common.protocol import (DTYPES, PROTOCOL_VERSION, Message, MsgType, ProtocolError, decode, decode_wire, encode,
                             encode_wire)
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


# -- chunked frames and 16-bit wire dtypes ---------------------------------------------------------

@pytest.fixture
def small_chunks(monkeypatch):
    import common.protocol as protocol
    monkeypatch.setattr(protocol, "CHUNK_BYTES", 40)
    return 40


@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("shape", SHAPES + [(41,), (3, 7, 5)])
def test_chunked_round_trip(small_chunks, dtype, shape):
    rng = np.random.default_rng(1)
    arr = (rng.standard_normal(shape) * 10).astype(dtype)
    small = np.arange(3, dtype=np.int8)
    frames = encode(Message(MsgType.PARAMS, tensors={"big": arr, "small": small}))
    nbytes = arr.nbytes
    assert len(frames) == 1 + max(1, -(-nbytes // small_chunks)) + 1
    assert all(len(memoryview(f)) <= small_chunks for f in frames[1:])
    back = decode([bytes(memoryview(f)) for f in frames])
    assert back.tensors["big"].dtype == np.dtype(dtype) and back.tensors["big"].shape == shape
    np.testing.assert_array_equal(back.tensors["big"], arr)
    np.testing.assert_array_equal(back.tensors["small"], small)


def test_chunked_frames_are_checked(small_chunks):
    frames = [bytes(memoryview(f)) for f in encode(Message(MsgType.PUSH, tensors={"x": np.zeros(25, np.float32)}))]
    assert len(frames) == 4                                      # 100 bytes in chunks of 40
    with pytest.raises(ProtocolError, match="announces 3 tensor frame"):
        decode(frames[:-1])
    with pytest.raises(ProtocolError, match="in chunks of 40"):
        decode(frames[:1] + [frames[1][:-4], frames[2] + frames[2][:4], frames[3]])
    header = msgpack.unpackb(frames[0])
    header["ck"] = 0
    with pytest.raises(ProtocolError, match="'ck' must be a positive integer"):
        decode([msgpack.packb(header)] + frames[1:])


@pytest.mark.parametrize("raw_wire", [None, "bf16"])
def test_chunked_tensors_are_joined_into_reused_buffers(small_chunks, raw_wire):
    """With a pool, a chunked tensor lands in a buffer of the pool: the same one again once the last message's
    tensors are let go of, never one whose tensors are still held (they keep their values)."""
    from common.tuning import ReusedBuffers
    pool = ReusedBuffers(keep=2)
    rng = np.random.default_rng(3)

    def msg(k):
        x = (rng.standard_normal((7, 9)) + k).astype(np.float32)
        frames = encode(Message(MsgType.PUSH, tensors={"x": x, "b": np.arange(3, dtype=np.int8)},
                                wire=raw_wire or "fp32"))
        got = decode([bytes(memoryview(f)) for f in frames], raw=raw_wire is not None, pool=pool).tensors["x"]
        return x, got, (got.bits if raw_wire else got)

    x1, got1, arr1 = msg(1)
    x2, got2, arr2 = msg(2)                                     # 1 is still held: another buffer
    assert not np.shares_memory(arr1, arr2) and pool.allocations == 2
    np.testing.assert_array_equal(got1.to_float32() if raw_wire else got1, decode_wire(encode_wire(x1, raw_wire))
                                  if raw_wire else x1)
    address = arr1.__array_interface__["data"][0]
    del got1, arr1
    x3, got3, arr3 = msg(3)                                     # 1 was let go of: its buffer again
    assert arr3.__array_interface__["data"][0] == address and pool.allocations == 2
    np.testing.assert_array_equal(got2.to_float32() if raw_wire else got2, decode_wire(encode_wire(x2, raw_wire))
                                  if raw_wire else x2)
    held = [msg(k)[1] for k in range(4, 8)]                     # more held at once than it keeps: fresh ones
    assert pool.allocations == 6 and len(pool.buffers[("x", x1.nbytes // (2 if raw_wire else 1))]) == 2
    assert all(h.shape == (7, 9) for h in held)


def test_same_size_tensors_each_reuse_a_buffer_and_only_allowed_ones_are_kept(small_chunks):
    from common.tuning import ReusedBuffers
    pool = ReusedBuffers(keep=1)
    layers = {f"layer{i}": np.full(30, i, np.float32) for i in range(4)}   # 4 same-size tensors, chunked
    frames = [bytes(memoryview(f)) for f in encode(Message(MsgType.PUSH, tensors=layers))]
    for _ in range(3):
        got = decode(frames, pool=pool).tensors
        assert all(np.array_equal(got[n], layers[n]) for n in layers)
        del got
    assert pool.allocations == 4                     # one per tensor, then reused: not one per message
    only = ReusedBuffers(keep=1, allowed={("layer0", 120)})
    for _ in range(3):
        decode(frames, pool=only)
    assert only.allocations == 1 + 3 * 3 and set(only.buffers) == {("layer0", 120)}   # the others: never kept


def test_real_chunk_size_keeps_frames_under_25mb():
    from common.protocol import CHUNK_BYTES
    arr = np.zeros(60 << 20 >> 2, np.float32)                   # 60 MiB in one tensor
    frames = encode(Message(MsgType.PARAMS, tensors={"x": arr}))
    assert len(frames) == 4 and max(len(memoryview(f)) for f in frames[1:]) == CHUNK_BYTES <= 25 << 20   # ~25 MB
    back = decode(frames)
    assert back.tensors["x"].shape == arr.shape


@pytest.mark.parametrize("wire, rel, top", [("bf16", 2 ** -8, 3e38), ("fp16", 2 ** -11, 6e4)])
@pytest.mark.parametrize("chunked", [False, True])
def test_wire_dtype_round_trip_error_bound(monkeypatch, wire, rel, top, chunked):
    import common.protocol as protocol
    if chunked:
        monkeypatch.setattr(protocol, "CHUNK_BYTES", 64)
    rng = np.random.default_rng(2)
    smallest = 1e-30 if wire == "bf16" else 6.2e-5              # the normal range of each format
    mag = np.exp(rng.uniform(np.log(smallest), np.log(top), 5000))
    x = (mag * rng.choice([-1, 1], 5000)).astype(np.float32).reshape(50, 100)
    ids = np.arange(4, dtype=np.int64)
    frames = encode(Message(MsgType.PUSH, tensors={"x": x, "ids": ids}, wire=wire))
    assert sum(len(memoryview(f)) for f in frames[1:]) == x.size * 2 + ids.nbytes   # half the bytes
    back = decode(frames)
    assert back.wire == wire and back.tensors["x"].dtype == np.float32 and back.tensors["ids"].dtype == np.int64
    np.testing.assert_allclose(back.tensors["x"], x, rtol=rel, atol=0)
    raw = decode(frames, raw=True).tensors["x"]
    assert raw.bits.dtype == (np.uint16 if wire == "bf16" else np.float16) and raw.bits.shape == x.shape
    special = np.array([np.nan, np.inf, -np.inf, 0.0, -0.0, 1.0], np.float32)
    out = decode(encode(Message(MsgType.PUSH, tensors={"s": special}, wire=wire))).tensors["s"]
    assert np.isnan(out[0]) and out[1] == np.inf and out[2] == -np.inf and list(out[3:]) == [0, 0, 1]
    if wire == "fp16":   # beyond fp16's range a value becomes Inf (and the server refuses it)
        over = decode(encode(Message(MsgType.PUSH, tensors={"s": np.array([7e4], np.float32)}, wire=wire)))
        assert over.tensors["s"][0] == np.inf


def test_bf16_is_round_to_nearest_even():
    from common.protocol import encode_wire
    # 1 + 2^-8 is halfway between two bf16 values: rounds to the even one (1.0); a hair more rounds up
    x = np.array([1 + 2 ** -8, 1 + 2 ** -8 + 2 ** -20, 1 + 3 * 2 ** -8], np.float32)
    bits = encode_wire(x, "bf16").bits
    assert list(bits) == [0x3F80, 0x3F81, 0x3F82]


@pytest.mark.parametrize("wire", ["bf16", "fp16"])
def test_a_0_d_tensor_keeps_its_shape_on_a_16_bit_wire(wire):
    """A scalar parameter (shape ()) used to come back 1-d, and could not be decoded into its place."""
    import torch
    from worker.transfer import _host_view
    enc = encode_wire(np.array(1.5, np.float32), wire)
    assert enc.shape == () and decode_wire(enc).shape == () and float(decode_wire(enc)) == 1.5
    assert enc.as_torch().shape == torch.Size([]) and _host_view(enc).shape == torch.Size([])
    back = decode(encode(Message(MsgType.PUSH, tensors={"s": np.array(2.5, np.float32)}, wire=wire)))
    assert back.tensors["s"].shape == () and float(back.tensors["s"]) == 2.5


def test_bad_wire_is_named():
    with pytest.raises(ProtocolError, match="unknown wire dtype 'fp8'"):
        encode(Message(MsgType.PUSH, tensors={"x": np.zeros(2, np.float32)}, wire="fp8"))
    header = _header(ts=[["x", "float32", [2], "fp8"]])
    with pytest.raises(ProtocolError, match="encoding 'fp8'"):
        decode([header, b"\0" * 4])
    with pytest.raises(ValueError, match="--wire-dtype"):
        PSClient("tcp://127.0.0.1:1", wire_dtype="int8")


@pytest.mark.parametrize("wire", ["bf16", "fp16"])
def test_server_decodes_16_bit_pushes_and_keeps_fp32_theta(start_server, wire):
    from common.protocol import decode_wire, encode_wire
    srv = start_server(num_workers=1, mode="async", optimizer="sgd", lr=1.0, aggregate="sum")
    theta0 = np.linspace(-1, 1, 300, dtype=np.float32)
    g = np.linspace(0.001, 3, 300, dtype=np.float32)
    with PSClient(srv.address, worker=0, server_timeout=10, wire_dtype=wire) as ps:
        ps.register(init={"w": theta0})
        p = ps.pull()
        np.testing.assert_array_equal(p.tensors["w"], decode_wire(encode_wire(theta0, wire)))
        ps.push({"w": g}, version=p.version, clock=p.clock)
        expected = theta0 - decode_wire(encode_wire(g, wire))   # exactly what was sent, applied in fp32
        theta = srv.server.store.theta["w"]
        assert theta.dtype == np.float32
        np.testing.assert_array_equal(theta, expected)
        raw = ps.pull(raw=True)
        assert raw.version == 1 and raw.tensors["w"].wire == wire
        np.testing.assert_array_equal(raw.tensors["w"].to_float32(), decode_wire(encode_wire(expected, wire)))
        with pytest.raises(ServerError, match="non-finite"):   # NaN survives the 16-bit trip and is refused
            ps.push({"w": np.full(300, np.nan, np.float32)}, version=1, clock=1)
        np.testing.assert_array_equal(srv.server.store.theta["w"], expected)


def test_unknown_wire_in_pull_is_refused(live):
    srv, ps = live
    ps.wire_dtype = "fp8"    # as if an other client asked for it
    with pytest.raises(ServerError, match="bad_wire"):
        ps.pull()


# -- a slow reader never sees theta change ---------------------------------------------------------

def test_slow_reader_never_sees_a_torn_theta(start_server):
    """Over inproc the reader's frames are the server's own buffer (zero-copy all the way), held for as
    long as the reader keeps the reply: the updates meanwhile must land elsewhere."""
    import gc
    srv = start_server(bind="inproc://ps-slow-reader", num_workers=2, mode="async", optimizer="sgd", lr=1.0,
                       aggregate="sum")
    n = 100_000
    g = {"w": np.ones(n, np.float32), "b": np.ones(3, np.float32)}
    with PSClient(srv.address, worker=0, server_timeout=10) as reader, \
            PSClient(srv.address, worker=1, server_timeout=10) as pusher:
        reader.register(init={"w": np.zeros(n, np.float32), "b": np.zeros(3, np.float32)})
        pusher.register()
        held = [reader.pull()]
        assert np.shares_memory(held[0].tensors["w"], srv.server.store.theta["w"])   # really zero-copy
        for k in range(12):
            p = pusher.pull()
            pusher.push(g, version=p.version, clock=p.clock)
            if k % 4 == 3:
                held.append(reader.pull())     # more readers of later versions, all held
        for h in held:
            for t in h.tensors.values():
                assert (t == -float(h.version)).all(), f"theta of version {h.version} changed under its reader"
        store = srv.server.store
        assert store.allocations >= len(held) - 1    # each held version kept its own buffer (sgd writes around it)
        del held, h, t, p
        gc.collect()
        assert pusher.pull().version == 12
        assert store.in_flight() <= 2
