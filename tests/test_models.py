"""worker/models.py: jobs are built reproducibly, also by workers that run as threads of one process."""
from __future__ import annotations

import os
import threading

import numpy as np

from common.config import JobConfig
from worker.models import build_job

CORPUS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "corpus.txt")


def test_jobs_built_in_threads_get_the_same_initial_model():
    """Seeding torch's global RNG and drawing the initial weights is one step: two workers built at
    once in one process (tests, in-process workers) must not interleave their draws."""
    cfg = JobConfig(job="gpt", data=CORPUS, n_layer=1, n_embd=32, n_head=2, context=32)
    reference = build_job(cfg).params_numpy()
    for _ in range(20):
        built = [None, None]

        def build(k):
            built[k] = build_job(cfg).params_numpy()

        threads = [threading.Thread(target=build, args=(k,)) for k in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for params in built:
            assert set(params) == set(reference)
            for name in reference:
                np.testing.assert_array_equal(params[name], reference[name], err_msg=name)
