"""paramserver/store.py: the update rules match torch.optim step for step."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from paramserver.store import ParamStore


@pytest.mark.parametrize("optimizer", ["sgd", "momentum", "adam"])
def test_update_rule_matches_torch(optimizer):
    rng = np.random.default_rng(1)
    theta0 = {"a": rng.standard_normal((4, 3)).astype(np.float32), "b": rng.standard_normal(3).astype(np.float32)}
    store = ParamStore(optimizer=optimizer, lr=0.05, momentum=0.9)
    store.init(theta0)
    params = [torch.nn.Parameter(torch.from_numpy(theta0[n].copy())) for n in ("a", "b")]
    opt = {"sgd": lambda: torch.optim.SGD(params, lr=0.05),
           "momentum": lambda: torch.optim.SGD(params, lr=0.05, momentum=0.9),
           "adam": lambda: torch.optim.Adam(params, lr=0.05)}[optimizer]()
    for step in range(10):
        g = {"a": rng.standard_normal((4, 3)).astype(np.float32), "b": rng.standard_normal(3).astype(np.float32)}
        store.apply(g)
        for p, n in zip(params, ("a", "b")):
            p.grad = torch.from_numpy(g[n].copy())
        opt.step()
    assert store.version == 10
    for p, n in zip(params, ("a", "b")):
        np.testing.assert_allclose(store.theta[n], p.detach().numpy(), atol=1e-6)


def test_closed_form_push_k_times():
    store = ParamStore("sgd", lr=0.5)
    store.init({"w": np.zeros(3, np.float32)})
    for _ in range(8):
        store.apply({"w": np.ones(3, np.float32)}, scale=0.25)
    np.testing.assert_allclose(store.theta["w"], -0.5 * 0.25 * 8 * np.ones(3))


def test_snapshot_is_stable_while_theta_changes():
    store = ParamStore("sgd", lr=1.0)
    store.init({"w": np.zeros(2, np.float32)})
    version, snap = store.snapshot()
    store.apply({"w": np.ones(2, np.float32)})
    assert version == 0 and snap["w"].tolist() == [0.0, 0.0]
    assert store.snapshot()[1]["w"].tolist() == [-1.0, -1.0]


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
