"""worker/data.py: shards are disjoint, complete and deterministic; the corpus needs no download."""
from __future__ import annotations

import numpy as np
import pytest

from worker.data import batches, load_corpus, shard_indices


@pytest.mark.parametrize("strategy", ["contiguous", "random", "hash"])
@pytest.mark.parametrize("n, m", [(1000, 4), (17, 3), (5, 5), (1001, 2)])
def test_shards_are_disjoint_and_complete(strategy, n, m):
    shards = [shard_indices(n, m, r, strategy, seed=7) for r in range(m)]
    allidx = np.concatenate(shards)
    assert len(allidx) == n
    assert sorted(allidx.tolist()) == list(range(n))


@pytest.mark.parametrize("strategy", ["random", "hash"])
def test_shards_are_deterministic_under_a_seed(strategy):
    a = shard_indices(500, 3, 1, strategy, seed=3)
    assert np.array_equal(a, shard_indices(500, 3, 1, strategy, seed=3))
    assert not np.array_equal(a, shard_indices(500, 3, 1, strategy, seed=4))


def test_random_shards_are_balanced():
    sizes = [len(shard_indices(1000, 4, r, "random", 0)) for r in range(4)]
    assert sizes == [250, 250, 250, 250]


def test_bad_strategy_is_named():
    with pytest.raises(ValueError, match="choose contiguous, random or hash"):
        shard_indices(10, 2, 0, "roundrobin")


def test_batches_cover_each_epoch_once():
    shard = np.arange(10, 30)
    seen = [idx for epoch, idx in batches(shard, 4, seed=1, epochs=2)]
    assert len(seen) == 10
    assert sorted(np.concatenate(seen[:5]).tolist()) == list(range(10, 30))
    assert not np.array_equal(seen[0], seen[5])       # reshuffled per epoch


def test_default_corpus_is_the_stdlib_and_held_out_is_disjoint():
    train, val, desc = load_corpus("", max_bytes=2_000_000)
    assert len(train) > 1_000_000 and len(val) > 10_000
    assert "standard library" in desc


def test_corpus_from_a_file(tmp_path):
    f = tmp_path / "t.txt"
    f.write_bytes(b"hello world " * 1000)
    train, val, _ = load_corpus(str(f))
    assert len(train) + len(val) == 12000 and len(val) > 0
    with pytest.raises(FileNotFoundError, match="--data"):
        load_corpus(str(tmp_path / "missing"))


def test_data_folder_reads_text_files_only_and_says_what_it_skipped(tmp_path):
    import gzip

    from worker.data import load_corpus
    text = "def f(x):\n    return x + 1\n" * 200
    (tmp_path / "a.txt").write_text(text)
    (tmp_path / "b.txt.gz").write_bytes(gzip.compress(text.encode()))
    (tmp_path / "c.dat").write_bytes(gzip.compress(text.encode()))          # compressed, by content
    (tmp_path / "d").write_bytes(bytes(range(256)) * 20)                     # binary
    train, val, desc = load_corpus(str(tmp_path))
    assert bytes(train) + bytes(val) == text.encode()
    assert "from 1 file(s)" in desc and "skipped 3 non-text files" in desc
    assert "by name" in desc and "by content" in desc and "NUL or control bytes" in desc


def test_a_binary_data_file_or_a_folder_without_text_is_one_clear_error(tmp_path):
    import pytest

    from common.config import ConfigError
    from worker.data import load_corpus
    (tmp_path / "x.bin").write_bytes(b"\0\1\2" * 100)
    with pytest.raises(ConfigError, match="no text files found .skipped: 1 compressed or binary"):
        load_corpus(str(tmp_path))
    (tmp_path / "y").write_bytes(b"\0\1\2" * 100)
    with pytest.raises(ConfigError, match="is not a text file"):
        load_corpus(str(tmp_path / "y"))
