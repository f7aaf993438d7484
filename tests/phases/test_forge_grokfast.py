"""The Grokfast gradient filters (phases/forge/grokfast.py) against the reference recurrences
(ironjr/grokfast gradfilter_ema / gradfilter_ma), and their checkpointable state."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from coordinator.errors import ConfigError
from phases.forge.grokfast import GrokfastConfig, GrokfastEMA, GrokfastMA, make_filter

GRADS = [torch.tensor([1.0, 0.0, -2.0]), torch.tensor([3.0, 1.0, 0.0]), torch.tensor([0.0, 0.0, 4.0]),
         torch.tensor([-1.0, 2.0, 1.0])]


def _model() -> nn.Module:
    model = nn.Module()
    model.p = nn.Parameter(torch.zeros(3))
    return model


def _filtered(f, grads) -> list[torch.Tensor]:
    model, out = _model(), []
    for g in grads:
        model.p.grad = g.clone()
        f.apply(model)
        out.append(model.p.grad.clone())
    return out


def test_ema_matches_the_reference_recurrence():
    mu = None
    for g, got in zip(GRADS, _filtered(GrokfastEMA(alpha=0.5, lamb=2.0), GRADS)):
        mu = g.clone() if mu is None else 0.5 * mu + 0.5 * g  # mu_1 = g_1 (not zeros)
        assert torch.allclose(got, g + 2.0 * mu)


def test_ma_waits_for_a_full_window_then_adds_the_window_mean():
    got = _filtered(GrokfastMA(window=2, lamb=5.0), GRADS)
    assert torch.equal(got[0], GRADS[0])  # warm-up: the window is not full yet
    for t in range(1, len(GRADS)):
        assert torch.allclose(got[t], GRADS[t] + 5.0 * (GRADS[t - 1] + GRADS[t]) / 2)
    no_warmup = _filtered(GrokfastMA(window=2, lamb=5.0, warmup=False), GRADS)
    assert torch.allclose(no_warmup[0], GRADS[0] * 6.0)  # mean of a window of one


@pytest.mark.parametrize("make", [lambda: GrokfastEMA(alpha=0.5, lamb=2.0), lambda: GrokfastMA(window=3, lamb=5.0)])
def test_a_restored_filter_continues_exactly(make):
    whole = _filtered(make(), GRADS)
    first = make()
    _filtered(first, GRADS[:2])
    restored = make()
    restored.load_state_dict(first.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(_filtered(restored, GRADS[2:]), whole[2:]))


def test_config_picks_the_filter_and_the_reference_defaults():
    assert make_filter(GrokfastConfig()) is None
    ema = make_filter(GrokfastConfig(enabled=True))
    ma = make_filter(GrokfastConfig(enabled=True, filter="ma"))
    assert isinstance(ema, GrokfastEMA) and (ema.alpha, ema.lamb) == (0.98, 2.0)
    assert isinstance(ma, GrokfastMA) and (ma.window, ma.lamb) == (100, 5.0)
    assert make_filter(GrokfastConfig(enabled=True, filter="ma", lamb=1.5)).lamb == 1.5
    with pytest.raises(ConfigError, match="filter"):
        GrokfastConfig(filter="kalman")
    with pytest.raises(ValueError, match="alpha"):
        GrokfastEMA(alpha=1.0)
