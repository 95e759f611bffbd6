"""paramserver/store.py: the gradient check, checkpoints, checksums and divergence samples (the update rule
itself: tests/test_update.py; snapshots: tests/test_snapshots.py)."""
from __future__ import annotations

import numpy as np
import pytest

from common.protocol import MAX_GRADIENT, encode_wire
from paramserver.store import ParamStore


def test_check_gradient_names_the_problem():
    store = ParamStore()
    store.init({"w": np.zeros(2, np.float32)})
    with pytest.raises(ValueError, match="wrong shape"):
        store.check_gradient({"w": np.zeros(3, np.float32)})
    with pytest.raises(ValueError, match="non-finite"):
        store.check_gradient({"w": np.array([np.inf, 0], np.float32)})


def test_state_dict_round_trip():
    store = ParamStore("adam", lr=0.1)
    store.init({"w": np.ones(2, np.float32)})
    store.apply({"w": np.ones(2, np.float32)})
    other = ParamStore("adam", lr=0.1)
    other.load_state_dict(store.state_dict())
    store.apply({"w": np.ones(2, np.float32)})
    other.apply({"w": np.ones(2, np.float32)})
    np.testing.assert_array_equal(store.theta["w"], other.theta["w"])
    assert other.version == 2


def test_checksum_follows_every_change_of_theta():
    from paramserver.store import theta_crc32
    store = ParamStore("sgd", lr=1.0)
    empty = store.checksum()
    store.init({"w": np.zeros(2, np.float32)})
    at_init = store.checksum()
    assert at_init != empty and at_init == theta_crc32(store.theta)
    store.apply({"w": np.ones(2, np.float32)})
    assert store.checksum() != at_init and store.checksum() == theta_crc32(store.theta)


@pytest.mark.parametrize("optimizer", ["momentum", "adam"])
def test_state_dict_round_trip_continues_identically(optimizer):
    rng = np.random.default_rng(3)
    store = ParamStore(optimizer, lr=0.05)
    store.init({"w": rng.standard_normal((4, 4)).astype(np.float32)})
    for _ in range(3):
        store.apply({"w": rng.standard_normal((4, 4)).astype(np.float32)})
    other = ParamStore(optimizer, lr=0.05)
    other.load_state_dict(store.state_dict())
    for _ in range(3):
        g = {"w": rng.standard_normal((4, 4)).astype(np.float32)}
        store.apply(g)
        other.apply(g)
    np.testing.assert_array_equal(store.theta["w"], other.theta["w"])


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_anywhere_is_rejected(bad):
    store = ParamStore()
    store.init({"w": np.zeros(100_000, np.float32), "h": np.zeros(3, np.float16)})
    for where in (0, 54_321, 99_999):
        g = {"w": np.zeros(100_000, np.float32), "h": np.zeros(3, np.float16)}
        g["w"][where] = bad
        with pytest.raises(ValueError, match="non-finite"):
            store.check_gradient(g)
    g = {"w": np.zeros(100_000, np.float32), "h": np.array([0, bad, 0], np.float16)}
    with pytest.raises(ValueError, match="non-finite"):
        store.check_gradient(g)
    # values up to +-MAX_GRADIENT are accepted (the check looks at the extremes, not at a sum) ...
    store.check_gradient({"w": np.full(100_000, MAX_GRADIENT, np.float32), "h": np.full(3, 60000, np.float16)})
    store.check_gradient({"w": np.full(100_000, -MAX_GRADIENT, np.float32), "h": np.full(3, -60000, np.float16)})


@pytest.mark.parametrize("size", [10, 100_000])   # numpy's check below 64K values, torch's above
@pytest.mark.parametrize("value", [3e38, -3e38, 2e18])
def test_finite_values_beyond_max_gradient_are_rejected(size, value):
    """... and beyond it refused like NaN, theta untouched: finite values near float32's limit would overflow a
    sync step's sum or Adam's second moment (g^2 > 3.4e38 from |g| > 1.8e19)."""
    store = ParamStore("adam", lr=0.1)
    store.init({"w": np.zeros(size, np.float32)})
    g = np.zeros(size, np.float32)
    g[size // 2] = value
    with pytest.raises(ValueError, match=r"beyond \+-1e\+18"):
        store.check_gradient({"w": g})
    with pytest.raises(ValueError, match="beyond"):   # the same bound for 16-bit wire values
        store.check_gradient({"w": encode_wire(g, "bf16")})
    assert store.version == 0 and not store.theta["w"].any()


@pytest.mark.parametrize("dtype", [np.float16, np.float64])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_is_rejected_in_large_tensors_of_every_float_dtype(bad, dtype):
    store = ParamStore()
    store.init({"w": np.zeros((300, 1000), dtype)})
    g = {"w": np.ones((300, 1000), dtype)}
    store.check_gradient(g)
    g["w"][299, 999] = bad
    with pytest.raises(ValueError, match="non-finite"):
        store.check_gradient(g)


def test_divergence_is_exact_for_small_models_and_estimated_for_large():
    from paramserver import store as store_mod
    store = ParamStore("sgd", lr=1.0)
    store.init({"w": np.zeros(100, np.float32)})
    _, sample = store.sample()
    store.apply({"w": np.full(100, 0.5, np.float32)})
    assert store.distance(sample) == pytest.approx(5.0)         # sqrt(100 * 0.25), exact
    big = ParamStore("sgd", lr=1.0)
    big.init({"a": np.zeros(store_mod.DIVERGENCE_SAMPLE * 3, np.float32), "b": np.zeros(1001, np.float32)})
    _, sample = big.sample()
    assert sum(s.size for s in sample.values()) <= store_mod.DIVERGENCE_SAMPLE + 2
    big.apply({"a": np.full(store_mod.DIVERGENCE_SAMPLE * 3, 2.0, np.float32), "b": np.full(1001, 2.0, np.float32)})
    exact = 2.0 * np.sqrt(store_mod.DIVERGENCE_SAMPLE * 3 + 1001)
    assert big.distance(sample) == pytest.approx(exact, rel=1e-3)


# -- 16-bit wire gradients taken as they are --------------------------------------------------------


@pytest.mark.parametrize("wire", ["bf16", "fp16"])
def test_16_bit_wire_gradients_are_checked_like_float32_ones(wire):
    store = ParamStore("sgd", lr=0.1)
    store.init({"w": np.zeros((300, 400), np.float32), "h": np.zeros(3, np.float16)})
    for bad in (np.nan, np.inf, -np.inf):
        g = np.zeros((300, 400), np.float32)
        g[299, 399] = bad
        with pytest.raises(ValueError, match="non-finite"):
            store.check_gradient({"w": encode_wire(g, wire), "h": np.zeros(3, np.float16)})
    with pytest.raises(ValueError, match="wrong shape"):
        store.check_gradient({"w": encode_wire(np.zeros((400, 300), np.float32), wire), "h": np.zeros(3, np.float16)})
    with pytest.raises(ValueError, match="wrong dtype"):   # only float32 parameters travel as 16-bit values
        store.check_gradient({"w": np.zeros((300, 400), np.float32), "h": encode_wire(np.zeros(3, np.float32), wire)})
    assert not store.theta["w"].any()


def test_divergence_sample_covers_every_tensor_end_to_end_without_repeats():
    from paramserver import store as store_mod
    sizes = {"emb": 3_000_000, "a": 69_400, "b": 600, "tiny": 3}
    store = ParamStore("sgd", lr=1.0)
    store.init({n: np.zeros(k, np.float32) for n, k in sizes.items()})
    at = store._coordinates()
    total = 0
    for name, k in sizes.items():
        idx = at[name]
        idx = np.arange(k) if idx is None else idx
        assert len(np.unique(idx)) == len(idx) and idx.min() == 0 and idx.max() == k - 1   # distinct, both ends
        total += len(idx)
    assert store_mod.DIVERGENCE_SAMPLE / 2 <= total <= store_mod.DIVERGENCE_SAMPLE + len(sizes)
    # a change in one place only is seen (scaled up by total / sampled) when it falls in a sampled run
    _, sample = store.sample()
    g = {n: np.zeros(k, np.float32) for n, k in sizes.items()}
    g["emb"][-1] = -1.0                       # the very last value: always sampled
    store.apply(g)
    scale = np.sqrt(sum(sizes.values()) / total)
    assert store.distance(sample) == pytest.approx(scale, rel=1e-6)
