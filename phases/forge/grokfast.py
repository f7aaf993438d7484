"""Grokfast (Lee, Kang, Kim, Lee 2024, arXiv 2405.20233): amplify the slow component of the
gradients to speed up generalisation. The EMA filter, as in the reference code (ironjr/grokfast
``grokfast.py::gradfilter_ema``; ``../shared/reference/notes-algorithms.md`` section 2), called
between ``loss.backward()`` and ``optimizer.step()``:

    mu_t = alpha * mu_{t-1} + (1 - alpha) * g_t      (mu_1 = g_1, the first gradient)
    g_t <- g_t + lamb * mu_t

Defaults are the reference file's (alpha 0.98, lamb 2.0). Hand-written because no maintained
package provides it (the reference is a script, not a package); the filter's state goes into the
train-state checkpoint (``state_dict``), so a resumed run filters exactly as an uninterrupted one.
Shared by phase 4's QAT and phase 5.
"""

from __future__ import annotations

import torch
from pydantic import Field

from phases.data.config import FrozenConfig

__all__ = ["GrokfastConfig", "GrokfastEMA"]


class GrokfastConfig(FrozenConfig):
    """The Grokfast section of a training phase."""

    enabled: bool = False
    alpha: float = Field(0.98, ge=0.0, lt=1.0)  # EMA momentum
    lamb: float = Field(2.0, ge=0.0)  # amplification of the slow component


class GrokfastEMA:
    """The EMA gradient filter over a model's named parameters (module docstring)."""

    def __init__(self, alpha: float = 0.98, lamb: float = 2.0):
        if not 0.0 <= alpha < 1.0 or lamb < 0.0:
            raise ValueError(f"need 0 <= alpha < 1 and lamb >= 0, got alpha {alpha}, lamb {lamb}")
        self.alpha, self.lamb = alpha, lamb
        self.ema: dict[str, torch.Tensor] = {}

    @classmethod
    def from_config(cls, cfg: GrokfastConfig) -> GrokfastEMA | None:
        """The filter a config asks for, or None when it is disabled."""
        return cls(cfg.alpha, cfg.lamb) if cfg.enabled else None

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
