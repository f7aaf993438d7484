"""Knowledge distillation losses for phase 8 (Hinton et al. 2015; FitNets, Romero et al. 2015).
Plain PyTorch; the distillation loop that uses them belongs to the KnowledgeDistiller agent.

- Response-based: ``alpha x T^2 x KL(softmax(teacher / T) || softmax(student / T)) +
  (1 - alpha) x CE(student, labels)``, with the reference's T = 4.0 and alpha = 0.7; the T^2
  keeps the soft term's gradient scale independent of T.
- Feature-based: mean squared error between the student's hidden states (through a learned
  linear map when the widths differ) and the teacher's, averaged over the chosen layer pairs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["FeatureProjector", "feature_loss", "response_loss"]


def response_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor | None = None, *,
                  temperature: float = 4.0, alpha: float = 0.7, ignore_index: int = -100) -> torch.Tensor:
    """Response-based distillation loss over (..., vocab) logits; ``labels`` (...) for the hard
    term (ignored when None, i.e. alpha acts as 1)."""
    if temperature <= 0 or not 0.0 <= alpha <= 1.0:
        raise ValueError(f"need temperature > 0 and 0 <= alpha <= 1, got {temperature}, {alpha}")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ")
    v = student_logits.shape[-1]
    s = F.log_softmax(student_logits.reshape(-1, v).float() / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.reshape(-1, v).float().detach() / temperature, dim=-1)
    soft = F.kl_div(s, t, log_target=True, reduction="batchmean") * temperature**2
    if labels is None:
        return soft
    hard = F.cross_entropy(student_logits.reshape(-1, v).float(), labels.reshape(-1), ignore_index=ignore_index)
    return alpha * soft + (1.0 - alpha) * hard


class FeatureProjector(nn.Module):
    """Linear maps from the student's hidden width to the teacher's, one per layer pair
    (identity when the widths match)."""

    def __init__(self, student_width: int, teacher_width: int, pairs: int):
        super().__init__()
        self.maps = nn.ModuleList(nn.Identity() if student_width == teacher_width
                                  else nn.Linear(student_width, teacher_width, bias=False) for _ in range(pairs))

    def forward(self, i: int, hidden: torch.Tensor) -> torch.Tensor:
        return self.maps[i](hidden)


def feature_loss(student_hidden: Sequence[torch.Tensor], teacher_hidden: Sequence[torch.Tensor],
                 projector: FeatureProjector | None = None) -> torch.Tensor:
    """Mean over layer pairs of MSE(project(student_i), teacher_i)."""
    if len(student_hidden) != len(teacher_hidden) or not student_hidden:
        raise ValueError(f"need the same number (>= 1) of student and teacher layers, got "
                         f"{len(student_hidden)} and {len(teacher_hidden)}")
    losses = []
    for i, (s, t) in enumerate(zip(student_hidden, teacher_hidden)):
        s = projector(i, s) if projector is not None else s
        if s.shape != t.shape:
            raise ValueError(f"pair {i}: student {tuple(s.shape)} vs teacher {tuple(t.shape)}; pass a FeatureProjector")
        losses.append(F.mse_loss(s.float(), t.float().detach()))
    return torch.stack(losses).mean()
