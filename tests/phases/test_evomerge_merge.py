"""Merge operators: golden values for the math, errors, and equality with mergekit."""

from __future__ import annotations

import math

import pytest
import torch

from phases.evomerge import METHODS, MergeError, merge, merge_tensor


def sd(seed: int, scale: float = 1.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"layers.0.w": torch.randn(16, 8, generator=g) * scale, "layers.0.b": torch.randn(8, generator=g) * scale,
            "emb": torch.randn(32, 8, generator=g) * scale, "steps": torch.tensor([3, 4])}


def test_linear_is_the_weighted_mean():
    a, b = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 6.0])
    out = merge_tensor("linear", [a, b], parameters={"weight": [1.0, 3.0]})
    assert torch.allclose(out, torch.tensor([2.5, 5.0]))
    raw = merge_tensor("linear", [a, b], parameters={"weight": [1.0, 3.0], "normalize": False})
    assert torch.allclose(raw, torch.tensor([10.0, 20.0]))


def test_slerp_endpoints_arc_and_colinear_fallback():
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])
    assert torch.allclose(merge_tensor("slerp", [a, b], base=0, parameters={"t": 0.0}), a)
    assert torch.allclose(merge_tensor("slerp", [a, b], base=0, parameters={"t": 1.0}), b)
    mid = merge_tensor("slerp", [a, b], base=0, parameters={"t": 0.5})
    s = math.sin(math.pi / 4) / math.sin(math.pi / 2)
    assert torch.allclose(mid, s * a + s * b), "sin-weighted on the arc, not (a+b)/2"
    assert torch.allclose(merge_tensor("slerp", [a, 3 * a], base=0, parameters={"t": 0.5}), 2 * a), "lerp when colinear"
    # base picks the t=0 end
    assert torch.allclose(merge_tensor("slerp", [a, b], base=1, parameters={"t": 0.0}), b)


def test_task_arithmetic_adds_weighted_task_vectors():
    base, x1, x2 = torch.zeros(3), torch.tensor([1.0, 0.0, 2.0]), torch.tensor([0.0, 4.0, -2.0])
    out = merge_tensor("task_arithmetic", [base, x1, x2], base=0, parameters={"weight": [0, 0.5, 0.25]})
    assert torch.allclose(out, torch.tensor([0.5, 1.0, 0.5]))
    lam = merge_tensor("task_arithmetic", [base, x1, x2], base=0, parameters={"weight": [0, 0.5, 0.25], "lambda": 2.0})
    assert torch.allclose(lam, 2 * out)


def test_ties_trims_elects_the_sign_and_takes_the_disjoint_mean():
    base = torch.zeros(4)
    x1 = torch.tensor([3.0, -1.0, 0.1, 2.0])
    x2 = torch.tensor([1.0, 2.0, -0.2, -5.0])
    out = merge_tensor("ties", [base, x1, x2], base=0, parameters={"weight": [0, 1, 1], "density": [1, 0.5, 0.5]})
    # trim: x1 keeps {3, 2} (top 2 of 4), x2 keeps {2, -5}; signs: +, +, 0, -; entry 3: 2 - 5 < 0 -> minus
    assert torch.allclose(out, torch.tensor([3.0, 2.0, 0.0, -5.0]))
    # without normalize the agreeing deltas are summed, not averaged
    x3 = torch.tensor([1.0, 1.0, 1.0, 1.0])
    summed = merge_tensor("ties", [base, x3, x3], base=0, parameters={"weight": 1.0, "normalize": False})
    assert torch.allclose(summed, 2 * x3)


def test_dare_rescale_keeps_the_l1_norm_and_is_unbiased():
    base, x = torch.zeros(2000), torch.randn(2000, generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(0)
    one = merge_tensor("dare_linear", [base, x], base=0, parameters={"weight": [0, 1], "density": [1, 0.3]}, generator=g)
    assert 0.2 < (one != 0).float().mean() < 0.4
    assert one.abs().sum() == pytest.approx(x.abs().sum(), rel=1e-5)
    mean = torch.stack([merge_tensor("dare_linear", [base, x], base=0, parameters={"weight": [0, 1], "density": [1, 0.5]},
                                     generator=g) for _ in range(400)]).mean(0)
    assert torch.corrcoef(torch.stack([mean, x]))[0, 1] > 0.99
    # density 1: DARE is task arithmetic
    full = merge_tensor("dare_ties", [base, x], base=0, parameters={"weight": [0, 1], "density": 1.0})
    assert torch.equal(full, x)


def test_dare_is_reproducible_under_a_seed():
    models = [sd(0), sd(1), sd(2)]
    p = {"weight": [0, 0.6, 0.4], "density": [1, 0.5, 0.5]}
    a = merge("dare_ties", models, base=0, parameters=p, seed=7)
    b = merge("dare_ties", models, base=0, parameters=p, seed=7)
    c = merge("dare_ties", models, base=0, parameters=p, seed=8)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["layers.0.w"], c["layers.0.w"])


def test_state_dict_merge_keeps_keys_dtypes_and_copies_integer_buffers():
    models = [{k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in sd(i).items()} for i in range(2)]
    out = merge("linear", models, parameters={"weight": [1, 1]})
    assert list(out) == list(models[0]) and out["emb"].dtype == torch.bfloat16
    assert torch.equal(out["steps"], torch.tensor([3, 4]))


def test_per_tensor_overrides():
    models = [sd(0), sd(1)]
    out = merge("linear", models, parameters={"weight": [1, 0]},
                per_tensor=lambda name: {"weight": [0, 1]} if name == "emb" else None)
    assert torch.equal(out["emb"], models[1]["emb"]) and torch.equal(out["layers.0.w"], models[0]["layers.0.w"])


@pytest.mark.parametrize("method, kwargs, match", [
    ("nope", {}, "unknown merge method 'nope'; methods: linear"),
    ("slerp", {"base": 0, "parameters": {"t": 0.5}}, "exactly two models"),
    ("ties", {"parameters": {"weight": 1.0}}, "needs base="),
    ("linear", {"parameters": {}}, "'weight' is required"),
    ("linear", {"parameters": {"weight": [1.0, 2.0]}}, "2 values for 3 models"),
    ("ties", {"base": 0, "parameters": {"weight": 1.0, "density": 0.0}}, "density of model 1 must be in"),
    ("ties", {"base": 0, "parameters": {"weight": 1.0, "t": 0.3}}, "unknown parameters \\['t'\\]"),
    ("linear", {"parameters": {"weight": float("nan")}}, "finite number"),
])
def test_bad_input_is_a_clear_error(method, kwargs, match):
    with pytest.raises(MergeError, match=match):
        merge(method, [sd(0), sd(1), sd(2)], **kwargs)


def test_mismatched_models_are_refused():
    a, b = sd(0), sd(1)
    b["emb"] = torch.zeros(31, 8)
    with pytest.raises(MergeError, match=r"emb: shapes differ"):
        merge("linear", [a, b], parameters={"weight": 1.0})
    del b["emb"]
    with pytest.raises(MergeError, match="missing \\['emb'\\]"):
        merge("linear", [a, b], parameters={"weight": 1.0})


def test_methods_list():
    assert set(METHODS) == {"linear", "slerp", "task_arithmetic", "ties", "dare_ties", "dare_linear", "passthrough"}


# --- equality with mergekit (the reference for merge math) --------------------------------------

def _models(n: int, shape=(64, 48)) -> list[dict[str, torch.Tensor]]:
    out = []
    for seed in range(n):
        g = torch.Generator().manual_seed(100 + seed)
        out.append({"w": torch.randn(*shape, generator=g), "b": torch.randn(shape[-1], generator=g),
                    "n": torch.randn(shape[-1], generator=g) * 0.01})
    return out


@pytest.mark.parametrize("method, base, params", [
    ("linear", None, {"weight": [0.5, 0.3, 0.2]}),
    ("linear", None, {"weight": [2.0, -1.0, 0.5], "normalize": False}),
    ("task_arithmetic", 0, {"weight": [0.7, 0.4]}),
    ("task_arithmetic", 1, {"weight": [0.7, 0.4], "normalize": True}),
    ("ties", 0, {"weight": [0.7, 0.4], "density": [0.5, 0.3]}),
    ("ties", 2, {"weight": [1.0, 0.6], "density": [0.8, 0.2], "normalize": False}),
    ("slerp", 0, {"t": 0.3}),
    ("slerp", 1, {"t": 0.85}),
    ("passthrough", None, {}),
])
def test_deterministic_methods_equal_mergekit(method, base, params):
    """Within 1e-6 in float32 (mergekit.merge_methods.merge_state_dicts, the in-memory API)."""
    mk = pytest.importorskip("mergekit.merge_methods")
    n = {"slerp": 2, "passthrough": 1}.get(method, 3)
    models = _models(n)
    ref = mk.merge_state_dicts(models, method, parameters=params, base=base)
    ours = merge(method, models, base=base, parameters=params)
    for key in ref:
        assert ours[key].dtype == ref[key].dtype
        assert torch.allclose(ours[key], ref[key], rtol=1e-6, atol=1e-6), (key, (ours[key] - ref[key]).abs().max())


@pytest.mark.parametrize("method", ["dare_ties", "dare_linear"])
def test_dare_matches_mergekit_in_distribution(method):
    """DARE is random: over 300 merges each, every entry's mean agrees with mergekit's within its
    standard error (z-scores ~ N(0, 1)), and so do the spread and the fraction of entries dropped."""
    mk = pytest.importorskip("mergekit.merge_methods")
    models = _models(3, shape=(24, 16))
    params = {"weight": [0.7, 0.4], "density": [0.5, 0.3]}
    torch.manual_seed(0)  # mergekit draws from torch's global generator
    ref = torch.stack([mk.merge_state_dicts(models, method, parameters=params, base=0)["w"] for _ in range(300)])
    ours = torch.stack([merge(method, models, base=0, parameters=params, seed=s)["w"] for s in range(300)])
    se = ((ref.var(0) + ours.var(0)) / 300).sqrt().clamp_min(1e-6)
    z = ((ref.mean(0) - ours.mean(0)) / se).flatten()
    assert abs(z.mean()) < 0.15 and 0.8 < z.std() < 1.2, (z.mean(), z.std())
    assert ours.std(0).mean() == pytest.approx(ref.std(0).mean(), rel=0.05)
    kept = lambda t: (t != models[0]["w"]).float().mean()  # noqa: E731
    assert kept(ours) == pytest.approx(kept(ref), abs=0.01)


def test_ties_keeps_at_least_one_entry_of_a_tiny_tensor():
    base, x = torch.zeros(3), torch.tensor([0.1, -2.0, 0.5])
    out = merge_tensor("ties", [base, x], base=0, parameters={"weight": 1.0, "density": 0.1})
    assert torch.equal(out, torch.tensor([0.0, -2.0, 0.0]))
