"""The chaos section: parsing --chaos, validation, and the coordinator's fault draws."""

from __future__ import annotations

import pytest

from coordinator.chaos import DEFAULT_PROFILE, ChaosConfig, ChaosError, CoordinatorChaos, parse_chaos_flag
from coordinator.cli import _config, build_parser
from coordinator.config import parse_config
from coordinator.errors import ConfigError


def test_default_profile_and_pairs():
    assert parse_chaos_flag("default") == [f"chaos.{k}={v}" for k, v in DEFAULT_PROFILE.items()]
    assert parse_chaos_flag("kill_rate=0.2, seed=3") == ["chaos.kill_rate=0.2", "chaos.seed=3"]


@pytest.mark.parametrize("bad, match", [("kill_rate", "key=value"), ("kil_rate=0.1", "unknown key 'kil_rate'")])
def test_bad_flags_name_the_problem(bad, match):
    with pytest.raises(ConfigError, match=match):
        parse_chaos_flag(bad)


def test_the_cli_flag_lands_in_the_config():
    args = build_parser().parse_args(["run", "--chaos", "kill_rate=0.25,node_kill_rate=0.5,seed=9"])
    cfg = _config(args, None)
    assert (cfg.chaos.kill_rate, cfg.chaos.node_kill_rate, cfg.chaos.seed) == (0.25, 0.5, 9)
    assert cfg.chaos.active
    bare = _config(build_parser().parse_args(["run", "--chaos"]), None)
    assert bare.chaos.kill_rate == DEFAULT_PROFILE["kill_rate"]
    off = _config(build_parser().parse_args(["run"]), None)
    assert not off.chaos.active


def test_validation_names_the_field():
    with pytest.raises(ConfigError, match="chaos.kill_rate"):
        parse_config({"chaos": {"kill_rate": 1.5}})
    with pytest.raises(ConfigError, match="one agent-side fault per call"):
        parse_config({"chaos": {"crash_rate": 0.6, "raise_rate": 0.6}})
    with pytest.raises(ConfigError, match="chaos.kil_rate"):
        parse_config({"chaos": {"kil_rate": 0.1}})


def test_agent_plan_carries_the_agent_side_rates():
    assert ChaosConfig(kill_rate=0.3).agent_plan() is None
    plan = ChaosConfig(seed=4, raise_rate=0.2, delay_rate=0.1, delay_s=0.3, only_roles=("a",)).agent_plan()
    assert (plan.seed, plan.raise_rate, plan.delay_rate, plan.delay_s, plan.only_roles) == (4, 0.2, 0.1, 0.3, ("a",))


def _node_draws(seed: int, n: int = 50, **kw) -> list[str]:
    killed: list[str] = []
    chaos = CoordinatorChaos(ChaosConfig(seed=seed, node_kill_rate=0.3, **kw), node_killer=killed.append)
    for i in range(n):
        chaos.after_dispatch("r", f"t{i}", handle=None, node_id=f"n{i}")
    return killed


def test_node_kills_replay_under_a_seed_and_are_bounded():
    assert _node_draws(1, max_node_kills=100) == _node_draws(1, max_node_kills=100)
    assert _node_draws(1, max_node_kills=100) != _node_draws(2, max_node_kills=100)
    many = _node_draws(1, max_node_kills=100)
    assert 5 <= len(many) <= 25, "about 30% of 50 draws"
    assert _node_draws(1, max_node_kills=2) == many[:2], "the bound stops kills, not draws"


def test_a_refused_node_kill_is_recorded_as_skipped():
    def refuse(node_id):
        raise ChaosError(f"node {node_id} hosts this driver")

    chaos = CoordinatorChaos(ChaosConfig(node_kill_rate=1.0, max_node_kills=3), node_killer=refuse)
    (event,) = chaos.after_dispatch("r", "t", handle=None, node_id="n0")
    assert event["fault"] == "node_kill_skipped" and "driver" in event["reason"] and chaos.node_kills == 0


def test_only_roles_limits_the_targets():
    killed: list[str] = []
    chaos = CoordinatorChaos(ChaosConfig(node_kill_rate=1.0, max_node_kills=9, only_roles=("b",)), node_killer=killed.append)
    chaos.after_dispatch("a", "t1", handle=None, node_id="n1")
    chaos.after_dispatch("b", "t2", handle=None, node_id="n2")
    assert killed == ["n2"]
