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

__all__ = ["FeatureProjector", "distill", "feature_loss", "response_loss"]


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


def _final_hidden(model: nn.Module) -> list[torch.Tensor]:
    """Registers a hook catching the final norm's output (the last hidden state) into a list."""
    store: list[torch.Tensor] = []
    norm = getattr(getattr(model, "model", None), "norm", None)
    if norm is None:
        raise ValueError("feature distillation needs model.model.norm (the final hidden state)")
    norm.register_forward_hook(lambda _m, _i, out: store.append(out))
    return store


def distill(teacher: nn.Module, student: nn.Module, corpus, *, steps: int, lr: float = 1e-3, batch_size: int = 8,
            temperature: float = 4.0, alpha: float = 0.7, feature_weight: float = 0.0, seed: int = 0,
            masks: dict[str, torch.Tensor] | None = None) -> dict[str, float]:
    """Train ``student`` in place to match ``teacher`` on the corpus' training batches.

    Loss per step: :func:`response_loss` (soft KL at ``temperature`` weighted ``alpha``, hard
    next-token cross-entropy ``1 - alpha``) plus ``feature_weight`` x MSE of the final hidden
    states (:func:`feature_loss`; the widths must match). AdamW, fixed batches
    ``corpus.batch(step, ...)`` under ``seed``, so the result is a function of the inputs.
    ``masks`` (``name -> bool``, True = kept) are re-applied after every step: pruned weights stay
    zero while the rest heal.

    Returns:
        ``{"distill/loss_initial", "distill/loss", "distill/steps"}`` (means over the first and
        last tenth of the steps).
    """
    from phases.compression.pruning import apply_masks

    if steps == 0:
        return {"distill/steps": 0}
    torch.manual_seed(seed)
    teacher.eval()
    student.train()
    params = dict(student.named_parameters())
    opt = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=0.0)
    s_hidden = _final_hidden(student) if feature_weight else None
    t_hidden = _final_hidden(teacher) if feature_weight else None
    seq_len = corpus.config.seq_len
    losses = []
    for step in range(steps):
        x = corpus.batch(step, batch_size, seq_len, seed)  # (B, T+1)
        with torch.no_grad():
            t_logits = teacher(input_ids=x[:, :-1]).logits
        s_logits = student(input_ids=x[:, :-1]).logits
        loss = response_loss(s_logits, t_logits, x[:, 1:], temperature=temperature, alpha=alpha)
        if feature_weight:
            loss = loss + feature_weight * feature_loss([s_hidden[-1]], [t_hidden[-1]])
            s_hidden.clear()
            t_hidden.clear()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if masks:
            apply_masks(student, {n: m for n, m in masks.items() if n in params})
        losses.append(float(loss.detach()))
    student.eval()
    k = max(1, steps // 10)
    return {"distill/loss_initial": sum(losses[:k]) / k, "distill/loss": sum(losses[-k:]) / k, "distill/steps": steps}
