"""Measuring what thoughts do: held-out loss with and without them (overall and on the hardest
tokens), exact-match accuracy on generated multi-step arithmetic, and sample thoughts to read.

Every number here is computed from the model's predictions on held-out data; nothing is
estimated. Thought sampling is seeded (``ThoughtModel.think`` seeds with 0 when given no
generator), so the same model and data give the same numbers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from phases.data import Task, task_accuracy

__all__ = ["token_nll", "heldout_losses", "arithmetic_problem", "multistep_arithmetic", "exact_match_accuracy",
           "sample_thought_rows"]


@torch.no_grad()
def token_nll(model: torch.nn.Module, windows: torch.Tensor, *, batch_size: int = 8) -> torch.Tensor:
    """Per-token NLL of ``windows[:, 1:]`` given ``windows[:, :-1]``: (W, T) float64.

    ``model(input_ids=x).logits`` gives the predictions: a plain LM (no thoughts) or a
    ``ThoughtModel`` (thought-mixed predictions at every position).
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = []
    try:
        for i in range(0, windows.shape[0], batch_size):
            x = windows[i:i + batch_size].to(device)
            logits = model(input_ids=x[:, :-1]).logits
            out.append(F.cross_entropy(logits.transpose(1, 2).double(), x[:, 1:], reduction="none").cpu())
    finally:
        model.train(was_training)
    return torch.cat(out)


def heldout_losses(nll: torch.Tensor, reference: torch.Tensor, *, hard_fraction: float = 0.1) -> dict[str, float]:
    """Mean NLL overall and on the hardest ``hard_fraction`` of tokens.

    Args:
        nll: (W, T) per-token NLL of the model scored.
        reference: (W, T) per-token NLL that ranks difficulty (e.g. the input model without
            thoughts), so that models compared against each other are scored on the same tokens.
        hard_fraction: share of tokens, by highest ``reference`` NLL, in the "hard" mean.
    Returns:
        ``{"loss": mean, "loss_hard": mean over the hardest tokens}``.
    Raises:
        ValueError: shapes differ or hard_fraction not in (0, 1].
    """
    if nll.shape != reference.shape:
        raise ValueError(f"nll {tuple(nll.shape)} and reference {tuple(reference.shape)} must have the same shape")
    if not 0.0 < hard_fraction <= 1.0:
        raise ValueError(f"hard_fraction must be in (0, 1], got {hard_fraction}")
    flat, ref = nll.reshape(-1), reference.reshape(-1)
    k = max(1, round(hard_fraction * ref.numel()))
    hard = ref.topk(k).indices
    return {"loss": float(flat.mean()), "loss_hard": float(flat[hard].mean())}


def arithmetic_problem(rng: np.random.Generator, *, steps: int, max_operand: int = 9) -> Task:
    """One problem ``a op b op c ... =`` with ``steps`` operations of + and - on operands in
    [0, max_operand], evaluated left to right (also their usual precedence); the answer is exact."""
    nums = [int(v) for v in rng.integers(0, max_operand + 1, size=steps + 1)]
    ops = ["+-"[int(v)] for v in rng.integers(0, 2, size=steps)]
    value = nums[0]
    for op, n in zip(ops, nums[1:]):
        value = value + n if op == "+" else value - n
    return Task("arithmetic", str(nums[0]) + "".join(f"{op}{n}" for op, n in zip(ops, nums[1:])) + "=", str(value))


def multistep_arithmetic(seed: int, count: int, *, steps: int = 2, max_operand: int = 9) -> list[Task]:
    """``count`` distinct generated problems of ``steps`` operations (``arithmetic_problem``).

    Raises:
        ValueError: steps < 1, count < 1, or too small a problem space for ``count`` distinct ones.
    """
    if steps < 1 or count < 1:
        raise ValueError(f"steps and count must be >= 1, got steps={steps}, count={count}")
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x51A7, steps]))
    seen: dict[str, Task] = {}
    for _ in range(100 * count):
        if len(seen) == count:
            break
        task = arithmetic_problem(rng, steps=steps, max_operand=max_operand)
        seen.setdefault(task.prompt, task)
    if len(seen) < count:
        raise ValueError(f"only {len(seen)} distinct {steps}-step problems with operands <= {max_operand}; "
                         f"asked for {count}")
    return list(seen.values())


def exact_match_accuracy(model: torch.nn.Module, tokenizer: Any, tasks: Sequence[Task]) -> float:
    """Greedy exact-match accuracy of the tasks' answers (teacher-forced argmax = greedy decoding)."""
    return task_accuracy(model, tokenizer, tasks, batch_size=32)["tasks/accuracy"]


def sample_thought_rows(rollout: Any, input_ids: torch.Tensor, decode: Any, *, limit: int,
                        context_chars: int = 40) -> list[dict[str, Any]]:
    """Rows to read: the text before a position, the thought sampled there, the true next
    tokens, and the thought's scores and reward, for the first ``limit`` thoughts of row 0.

    Args:
        rollout: a ``model.Rollout``.
        input_ids: (B, L) the ids it was computed on.
        decode: ``decode(ids: list[int]) -> str``.
        limit: rows to return (at most one per (thought, position) of the first sequence).
    """
    rows = []
    n_thoughts, n_pos = rollout.thoughts.shape[1:3]
    k_true = rollout.mixing_weight.shape[-1]
    for p in range(n_pos):
        for t in range(n_thoughts):
            if len(rows) >= limit:
                return rows
            a = int(rollout.anchors[0, p])
            ids = input_ids[0].tolist()
            rows.append({
                "position": a,
                "context": decode(ids[:a + 1])[-context_chars:],
                "thought": decode(rollout.thoughts[0, t, p].tolist()),
                "next_tokens": decode(ids[a + 1:a + 1 + k_true]),
                "coherence": round(float(rollout.scores["coherence"][0, t, p]), 4),
                "reward": round(float(rollout.rewards[0, t, p]), 6),
                "kept": bool(rollout.keep[0, t, p]),
            })
    return rows
