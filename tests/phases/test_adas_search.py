"""Phase 7's search space, archive, proposer, winner choice and safety gates (pure Python)."""

from __future__ import annotations

import pytest

from coordinator.errors import ConfigError
from phases.adas.profiles import BUILTIN_PROFILES, TargetProfile, resolve_profile
from phases.adas.recipes import Recipe, Space, build_space
from phases.adas.safety import check, reasons
from phases.adas.search import Archive, Candidate, choose, crowding, non_dominated_sort, propose, seed_recipe


def _space(**kw) -> Space:
    base = dict(drop_layers=(0, 1), ffn_keep=(1.0, 0.5), low_rank=(1.0, 0.5), precision=("fp32", "int8"),
                backend=("eager", "onnxruntime"), threads=(1, 2), batch_size=(1,))
    base.update(kw)
    return Space(**base)


# ------------------------------------------------------------------------------------------ profiles

def test_builtin_profiles_hold_the_reference_budgets():
    auto = BUILTIN_PROFILES["automotive-edge"]
    assert auto.call_p99_ms == 10 and auto.target_ms == 8 and auto.hard_deadline
    assert set(BUILTIN_PROFILES) >= {"cloud-gpu", "edge-cpu", "mobile", "automotive-edge"}
    assert BUILTIN_PROFILES["cloud-gpu"].devices == ("cuda",)


def test_custom_profiles_shadow_builtins_and_unknown_names_list_the_known_ones():
    mine = TargetProfile(call_p99_ms=0.01)
    assert resolve_profile("edge-cpu", {"edge-cpu": mine}) is mine
    with pytest.raises(KeyError, match="known: .*automotive-edge.*edge-cpu"):
        resolve_profile("warp-drive")


@pytest.mark.parametrize("bad, field", [({"call_p95_ms": 5, "call_p99_ms": 1}, "call_p95_ms"),
                                        ({"threads": ()}, "threads"), ({"precisions": ("fp8",)}, "precisions"),
                                        ({"hard_deadline": True}, "hard_deadline"), ({"typo": 1}, "typo")])
def test_bad_profiles_name_the_field(bad, field):
    with pytest.raises(ConfigError, match=field):
        TargetProfile(**bad)


# ------------------------------------------------------------------------------------------ recipes

def test_recipe_key_is_stable_and_round_trips():
    r = Recipe(drop_layers=1, precision="int8", backend="onnxruntime")
    assert r.key() == Recipe.from_json(r.to_json()).key() and len(r.key()) == 12
    assert r.key() != Recipe().key()
    with pytest.raises(ValueError, match="unknown \\['bogus'\\]"):
        Recipe.from_json({**r.to_json(), "bogus": 1})


def test_build_space_drops_pairs_this_machine_cannot_run_and_says_why():
    def unsupported(backend, precision, device):
        return "tensorrt not installed" if backend == "tensorrt" else (
            "onnxruntime runs fp32 and int8" if (backend, precision) == ("onnxruntime", "fp16") else None)

    prof = TargetProfile(precisions=("fp32", "fp16"), backends=("eager", "onnxruntime", "tensorrt"), threads=(1, 8))
    space = build_space(prof, plain_layers=3, max_drop=2, ffn_keep=(0.5,), low_rank=(), max_threads=2, device="cpu",
                        unsupported=unsupported)
    assert space.backend == ("eager", "onnxruntime") and space.threads == (1,)
    assert space.drop_layers == (0, 1, 2) and space.ffn_keep == (1.0, 0.5) and space.low_rank == (1.0,)
    assert space.allows(Recipe(precision="fp16", backend="onnxruntime")).endswith("onnxruntime runs fp32 and int8")
    assert space.allows(Recipe(drop_layers=3)).startswith("drop_layers=3")
    assert space.allows(Recipe()) is None
    with pytest.raises(ValueError, match="tensorrt/fp32: tensorrt not installed"):
        build_space(TargetProfile(backends=("tensorrt",), precisions=("fp32",)), plain_layers=1, max_drop=0,
                    ffn_keep=(), low_rank=(), max_threads=2, device="cpu", unsupported=unsupported)


# ------------------------------------------------------------------------------------------ NSGA-II parts

def test_non_dominated_sort_and_crowding_match_hand_values():
    pts = [(1, 1), (2, 0), (0, 2), (0, 0), (1, 0)]
    assert non_dominated_sort(pts) == [0, 0, 0, 2, 1]
    d = crowding([(0.0, 2.0), (1.0, 1.0), (2.0, 0.0)])
    assert d[0] == d[2] == float("inf") and d[1] == pytest.approx(2.0)


def _cand(recipe, passed, **metrics):
    base = dict(accuracy=0.5, flops_per_token=100, disk_bytes=1000, call_p95_ms=1.0, memory_bytes=10)
    base.update(metrics)
    return Candidate(recipe=recipe, generation=0, metrics=base, passed=passed)


def test_archive_front_ranks_feasible_first_and_round_trips():
    a = Archive([_cand(Recipe(), True, accuracy=0.5, disk_bytes=1000),
                 _cand(Recipe(drop_layers=1), True, accuracy=0.4, disk_bytes=500),
                 _cand(Recipe(drop_layers=1, ffn_keep=0.5), True, accuracy=0.3, disk_bytes=600),  # dominated
                 _cand(Recipe(precision="int8"), False, accuracy=0.9, disk_bytes=2000)])
    assert a.front("deterministic") == [0, 1, 3]
    assert a.front("deterministic", passed_only=True) == [0, 1]
    keys, _ = a.ranks("deterministic")
    assert keys == [(0, 0), (0, 0), (0, 1), (1, 0)]
    assert Archive.from_json(a.to_json()).to_json() == a.to_json()
    with pytest.raises(ValueError, match="archived already"):
        a.add(_cand(Recipe(), True))


def test_choose_takes_the_smallest_passing_candidate_and_none_when_nothing_passed():
    a = Archive([_cand(Recipe(), True, disk_bytes=1000), _cand(Recipe(drop_layers=1), True, disk_bytes=500),
                 _cand(Recipe(precision="int8"), False, disk_bytes=10)])
    assert choose(a) == 1
    assert choose(a, "measured") == 1  # equal latency: then the smaller
    a.candidates[0].metrics["call_p95_ms"] = 0.5
    assert choose(a, "measured") == 0
    assert choose(Archive([_cand(Recipe(), False)])) is None


# ------------------------------------------------------------------------------------------ proposer

def test_first_generation_seeds_the_plain_deployment_then_one_gene_changes():
    space = _space()
    out = propose(Archive(), space, n=4, seed=0, generation=0)
    assert out[0].recipe == seed_recipe(space) == Recipe(threads=2)
    assert out[0].origin == "seed"
    for p in out[1:]:
        diff = [g for g, v in p.recipe.to_json().items() if v != out[0].recipe.to_json()[g]]
        assert len(diff) == 1 and p.parents == (out[0].recipe.key(),)


def test_children_are_new_valid_and_deterministic_with_lineage():
    space = _space(excluded=(("onnxruntime", "fp32", "pretend"),))
    archive = Archive()
    for p in propose(archive, space, n=6, seed=1, generation=0):
        archive.add(_cand(p.recipe, True, accuracy=0.5 - 0.01 * p.recipe.drop_layers))
    kids = propose(archive, space, n=8, seed=1, generation=1)
    again = propose(archive, space, n=8, seed=1, generation=1)
    assert [k.recipe for k in kids] == [k.recipe for k in again]
    assert len({k.recipe.key() for k in kids}) == 8
    for k in kids:
        assert space.allows(k.recipe) is None and k.recipe.key() not in archive.keys()
        if k.origin != "random":
            assert k.parents and set(k.parents) <= archive.keys()
    assert propose(archive, space, n=8, seed=2, generation=1) != kids


def test_an_exhausted_space_returns_fewer_proposals():
    space = _space(drop_layers=(0,), ffn_keep=(1.0,), low_rank=(1.0,), precision=("fp32",), backend=("eager",),
                   threads=(1, 2))
    first = propose(Archive(), space, n=5, seed=0, generation=0)
    assert len(first) == 2
    archive = Archive([_cand(p.recipe, True) for p in first])
    assert propose(archive, space, n=3, seed=0, generation=1) == []


# ------------------------------------------------------------------------------------------ safety

def _metrics(**kw):
    base = dict(precision="fp32", backend="eager", call_p95_ms=5.0, call_p99_ms=6.0, call_max_ms=7.0,
                token_p95_ms=2.0, token_p99_ms=3.0, token_max_ms=4.0, memory_bytes=2 ** 20, disk_bytes=2 ** 20,
                parity=0.0, retention=1.0)
    base.update(kw)
    return base


def test_safety_passes_within_every_limit_and_names_each_broken_requirement():
    prof = TargetProfile(call_p95_ms=10, call_p99_ms=10, token_p99_ms=5, memory_cap_mb=2, disk_cap_mb=2,
                         min_accuracy_retention=0.9, max_parity_error=0.01, precisions=("fp32",), backends=("eager",))
    rows = check(prof, _metrics(), evidence="m.json")
    assert all(r.passed for r in rows) and {r.evidence for r in rows} == {"m.json"}
    assert {r.name for r in rows} == {"precision", "backend", "call_p95_ms", "call_p99_ms", "token_p99_ms",
                                      "memory_mb", "disk_mb", "parity", "accuracy_retention"}
    bad = reasons(check(prof, _metrics(call_p99_ms=12.0, retention=0.8, memory_bytes=None, backend="compile"),
                        evidence="m.json"))
    assert len(bad) == 4
    assert any(r.startswith("call_p99_ms = 12 ms breaks p99 latency of one call <= 10 ms") for r in bad)
    assert any("memory_mb: not measurable here" in r for r in bad)
    assert any(r.startswith("accuracy_retention = 0.8") for r in bad)


def test_a_hard_deadline_miss_rejects_even_when_p99_is_inside():
    prof = TargetProfile(call_p99_ms=10, hard_deadline=True)
    ok = check(prof, _metrics(), evidence="e")
    assert all(r.passed for r in ok)
    missed = reasons(check(prof, _metrics(call_p99_ms=9.0, call_max_ms=11.0), evidence="e"))
    assert missed == ["call_deadline_ms = 11 ms breaks slowest timed call (hard deadline) <= 10 ms"]
    assert reasons(check(TargetProfile(call_p99_ms=0.01), _metrics(), evidence="e"))[0].startswith("call_p99_ms")
