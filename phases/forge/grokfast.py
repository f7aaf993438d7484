"""Grokfast (Lee, Kang, Kim, Lee 2024, arXiv 2405.20233): amplify the slow component of the
gradients to speed up generalisation. The two filters of the reference code (ironjr/grokfast
``grokfast.py``; ``../shared/reference/notes-algorithms.md`` section 2), called between
``loss.backward()`` and ``optimizer.step()``:

- EMA (``gradfilter_ema``): mu_t = alpha * mu_{t-1} + (1 - alpha) * g_t (mu_1 = g_1, the first
  gradient); g_t <- g_t + lamb * mu_t. Defaults alpha 0.98, lamb 2.0.
- MA (``gradfilter_ma``, filter type "mean"): the mean of the last ``window`` gradients;
  g_t <- g_t + lamb * mean. With ``warmup`` (the reference's default) nothing is added until the
  window is full. Defaults window 100, lamb 5.0.

Hand-written because no maintained package provides them (the reference is a script, not a
package). A filter's state goes into the train-state checkpoint (``state_dict``: the EMA per
parameter, or the MA window stacked per parameter), so a resumed run filters exactly as an
uninterrupted one. Shared by phase 4's QAT and phase 5.
"""

from __future__ import annotations

from collections import deque
from typing import Literal

import torch
from pydantic import Field

from phases.data.config import FrozenConfig

__all__ = ["GrokfastConfig", "GrokfastEMA", "GrokfastMA", "make_filter"]

_DEFAULT_LAMB = {"ema": 2.0, "ma": 5.0}  # the reference file's defaults per filter


class GrokfastConfig(FrozenConfig):
    """The Grokfast section of a training phase."""

    enabled: bool = False
    filter: Literal["ema", "ma"] = "ema"
    alpha: float = Field(0.98, ge=0.0, lt=1.0)  # EMA momentum
    window: int = Field(100, ge=1)  # MA window (gradients averaged)
    lamb: float | None = Field(None, ge=0.0)  # amplification; None: 2.0 for EMA, 5.0 for MA

    @property
    def amplification(self) -> float:
        return _DEFAULT_LAMB[self.filter] if self.lamb is None else self.lamb


def make_filter(cfg: GrokfastConfig) -> GrokfastEMA | GrokfastMA | None:
    """The filter a config asks for, or None when it is disabled."""
    if not cfg.enabled:
        return None
    if cfg.filter == "ema":
        return GrokfastEMA(cfg.alpha, cfg.amplification)
    return GrokfastMA(cfg.window, cfg.amplification)


class GrokfastEMA:
    """The EMA gradient filter over a model's named parameters (module docstring)."""

    def __init__(self, alpha: float = 0.98, lamb: float = 2.0):
        if not 0.0 <= alpha < 1.0 or lamb < 0.0:
            raise ValueError(f"need 0 <= alpha < 1 and lamb >= 0, got alpha {alpha}, lamb {lamb}")
        self.alpha, self.lamb = alpha, lamb
        self.ema: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def apply(self, model: torch.nn.Module) -> None:
        """Update the EMA with the current gradients and add ``lamb`` times it to them, in place."""
        for name, p in model.named_parameters():
            if not p.requires_grad or p.grad is None:
                continue
            mu = self.ema.get(name)
            if mu is None:
                self.ema[name] = mu = p.grad.detach().clone()
            else:
                mu.mul_(self.alpha).add_(p.grad, alpha=1.0 - self.alpha)
            p.grad.add_(mu, alpha=self.lamb)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: t.clone() for name, t in self.ema.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.ema = {name: t.clone() for name, t in state.items()}


class GrokfastMA:
    """The moving-average gradient filter over a model's named parameters (module docstring)."""

    def __init__(self, window: int = 100, lamb: float = 5.0, *, warmup: bool = True):
        if window < 1 or lamb < 0.0:
            raise ValueError(f"need window >= 1 and lamb >= 0, got window {window}, lamb {lamb}")
        self.window, self.lamb, self.warmup = window, lamb, warmup
        self.grads: dict[str, deque[torch.Tensor]] = {}

    @torch.no_grad()
    def apply(self, model: torch.nn.Module) -> None:
        """Append the current gradients to the window; once it is full (or without warmup) add
        ``lamb`` times the window's mean to them, in place."""
        for name, p in model.named_parameters():
            if not p.requires_grad or p.grad is None:
                continue
            window = self.grads.setdefault(name, deque(maxlen=self.window))
            window.append(p.grad.detach().clone())
            if not self.warmup or len(window) == self.window:
                p.grad.add_(torch.stack(list(window)).mean(dim=0), alpha=self.lamb)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: torch.stack(list(window)) for name, window in self.grads.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.grads = {name: deque((g.clone() for g in t.unbind(0)), maxlen=self.window) for name, t in state.items()}
