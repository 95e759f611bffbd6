"""common/config.py: cross-field checks of ServerConfig, through the dataclass and through `paramserver` flags."""
from __future__ import annotations

import dataclasses

import pytest

from common.config import DEFAULT_STALENESS, ServerConfig, from_args, to_argv
from tests.cli_inproc import cli  # noqa: F401  (a pytest fixture)


# -- --staleness: "was it given?" is None, not the default value ----------------------------------

@pytest.mark.parametrize("mode", ["sync", "async"])
@pytest.mark.parametrize("staleness", [0, 2, DEFAULT_STALENESS, 7])
def test_any_staleness_given_outside_ssp_is_refused(mode, staleness):
    with pytest.raises(ValueError, match="^--staleness only applies to --mode ssp$"):
        ServerConfig(mode=mode, staleness=staleness)


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_staleness_3_is_refused_like_2_on_the_command_line(cli, mode):
    for value in ("2", "3"):
        r = cli("server", "--mode", mode, "--staleness", value)
        assert r.returncode == 2
        assert r.stderr.strip().splitlines() == ["paramserver server: error: --staleness only applies to --mode ssp"]
    r = cli("cluster", "--mode", mode, "--staleness", "3")
    assert r.returncode == 2 and "--staleness only applies to --mode ssp" in r.stderr


def test_ssp_without_staleness_gets_the_default_bound_and_other_modes_none():
    assert ServerConfig(mode="ssp").staleness == DEFAULT_STALENESS == 3
    assert ServerConfig(mode="ssp", staleness=0).staleness == 0
    assert ServerConfig(mode="sync").staleness is None and ServerConfig(mode="async").staleness is None
    with pytest.raises(ValueError, match="--staleness must be >= 0"):
        ServerConfig(mode="ssp", staleness=-1)


def test_flags_and_config_copies_keep_staleness_as_given():
    """The cluster passes a server config on as flags (to_argv) and copies it per shard (replace): neither turns
    "not given" into a value that the sync check would then refuse."""
    import argparse

    from common.config import add_arguments
    parser = argparse.ArgumentParser()
    add_arguments(parser, ServerConfig)
    for mode in ("sync", "ssp", "async"):
        cfg = ServerConfig(mode=mode, num_workers=2)
        again = from_args(ServerConfig, parser.parse_args(to_argv(cfg)))
        assert again == cfg
        assert dataclasses.replace(cfg, shard_index=1, num_shards=2).staleness == cfg.staleness
    assert "--staleness" not in to_argv(ServerConfig(mode="sync"))
    assert from_args(ServerConfig, parser.parse_args(["--mode", "ssp", "--staleness", "5"])).staleness == 5


def test_cluster_header_shows_the_resolved_ssp_bound():
    from paramserver.cli import build_parser
    from common.config import ClusterConfig
    args = build_parser().parse_args(["cluster", "--mode", "ssp"])
    ccfg = from_args(ClusterConfig, args)
    scfg = from_args(ServerConfig, args, num_workers=ccfg.workers, bind="tcp://127.0.0.1:0")
    assert scfg.staleness == DEFAULT_STALENESS


# -- --min-workers above the job's workers would hold every sync pull forever ---------------------

def test_min_workers_above_num_workers_is_refused_saying_what_to_change():
    with pytest.raises(ValueError) as exc:
        ServerConfig(num_workers=2, min_workers=3)
    assert str(exc.value) == ("--min-workers 3 is more than the job's 2 workers, so sync would hold every pull "
                              "forever: give --min-workers 1..2")
    assert ServerConfig(num_workers=2, min_workers=2).min_workers == 2      # equal is fine


def test_min_workers_above_the_workers_is_one_line_on_the_command_line(cli):
    r = cli("server", "--num-workers", "2", "--min-workers", "3")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == ["paramserver server: error: --min-workers 3 is more than the job's 2 "
                                             "workers, so sync would hold every pull forever: give --min-workers 1..2"]
    r = cli("cluster", "--workers", "2", "--min-workers", "4")
    assert r.returncode == 2 and "--min-workers 4 is more than the job's 2 workers" in r.stderr


@pytest.mark.parametrize("mode, expected", [("sync", None), ("async", None), ("ssp", DEFAULT_STALENESS)])
def test_an_empty_staleness_is_not_given(mode, expected):
    """The deploy templates pass --staleness=$STALENESS whatever the mode; empty means not given."""
    import argparse
    from common.config import add_arguments
    parser = argparse.ArgumentParser()
    add_arguments(parser, ServerConfig)
    cfg = from_args(ServerConfig, parser.parse_args(["--mode", mode, "--staleness="]))
    assert cfg.staleness == expected
    cfg = from_args(ServerConfig, parser.parse_args(["--mode", "ssp", "--staleness=2"]))
    assert cfg.staleness == 2
    with pytest.raises(SystemExit):   # still an int when given
        parser.parse_args(["--staleness=two"])
