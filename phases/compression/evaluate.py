"""What phase 8's validator measures: held-out quality, retention against the input model, output
parity, and the quality gate a compressed model must pass.

Everything here is computed by running the model on held-out data, never estimated from weight
errors or bit counts:

- :func:`measure_quality`: next-token top-1 accuracy over every predicted position of the
  corpus' fixed held-out windows (the same windows and the same exactly-rounded NLL sum as
  :func:`phases.data.corpus.evaluate_perplexity`, in one pass), perplexity, and exact-match
  accuracy on generated tasks (:func:`phases.data.tasks.task_accuracy`);
- :func:`retention`: "accuracy retention", the reference analysis' headline number, is
  candidate token accuracy / reference token accuracy (the input model is the reference);
- :func:`output_parity`: logit max-abs difference, top-1 agreement and mean KL(a || b) per
  position, the checks used to compare a compressed (or exported) model with its source, as
  in Hinton et al. 2015's use of the teacher distribution as the target;
- :class:`QualityGate`: thresholds on those numbers and a verdict whose reasons name each
  failed threshold and the measured value.

The measurement is deterministic: eval mode, ``torch.no_grad``, fixed windows and tasks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from pydantic import Field

from phases.data.config import FrozenConfig
from phases.data.corpus import Corpus
from phases.data.tasks import Task, task_accuracy

__all__ = ["Quality", "QualityGate", "measure_quality", "output_parity", "retention"]


@dataclass(frozen=True)
class Quality:
    """Held-out quality of one model (what :func:`measure_quality` measured)."""

    token_accuracy: float  # next-token top-1 accuracy over every predicted held-out position
    perplexity: float  # exp(mean NLL) over the same positions
    tokens: int  # predicted positions scored
    task_accuracy: float | None = None  # exact match on the tasks; None when none were given
    tasks: int = 0  # tasks scored

    def to_json(self) -> dict[str, float | int | None]:
        return asdict(self)


@torch.no_grad()
def measure_quality(model: torch.nn.Module, corpus: Corpus, *, batch_size: int = 8, max_batches: int | None = 4,
                    tasks: Sequence[Task] | None = None) -> Quality:
    """Token accuracy and perplexity on the first ``max_batches * batch_size`` held-out windows.

    Args:
        model: causal LM; ``model(input_ids=x).logits`` is (B, T, V).
        corpus: supplies the fixed held-out windows (``corpus.windows("heldout")``).
        batch_size: windows per forward pass.
        max_batches: how many batches of windows; None: every held-out window.
        tasks: generated tasks to score by exact match (e.g. ``corpus.heldout_tasks``); None or
            empty: no task accuracy.
    Returns:
        The :class:`Quality`.
    Raises:
        ValueError: ``batch_size`` or ``max_batches`` < 1.
    """
    if batch_size < 1 or (max_batches is not None and max_batches < 1):
        raise ValueError(f"need batch_size >= 1 and max_batches >= 1 (or None), got {batch_size}, {max_batches}")
    windows = corpus.windows("heldout", max_windows=None if max_batches is None else max_batches * batch_size)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    nll_sums: list[float] = []
    correct = 0
    try:
        for i in range(0, windows.shape[0], batch_size):
            x = windows[i:i + batch_size].to(device)  # (B, T+1)
            logits = model(input_ids=x[:, :-1]).logits  # (B, T, V)
            target = x[:, 1:]  # (B, T)
            nll = F.cross_entropy(logits.transpose(1, 2).double(), target, reduction="none")  # (B, T)
            nll_sums.extend(nll.sum(dim=1).tolist())
            correct += int((logits.argmax(dim=-1) == target).sum())
    finally:
        model.train(was_training)
    tokens = windows.shape[0] * (windows.shape[1] - 1)
    task_acc = None
    if tasks:
        task_acc = float(task_accuracy(model, corpus.tokenizer, list(tasks))["tasks/accuracy"])
    return Quality(token_accuracy=correct / tokens, perplexity=math.exp(math.fsum(nll_sums) / tokens),
                   tokens=tokens, task_accuracy=task_acc, tasks=len(tasks) if tasks else 0)


def retention(candidate: Quality, reference: Quality) -> dict[str, float | None]:
    """How much of the reference's quality the candidate keeps.

    Returns:
        ``retention`` (candidate / reference token accuracy), ``perplexity_ratio`` (candidate /
        reference perplexity; > 1 is worse) and ``task_retention`` (candidate / reference task
        accuracy; None when either has no task accuracy or the reference's is 0).
    Raises:
        ValueError: the reference's token accuracy is 0 (retention is undefined).
    """
    if reference.token_accuracy <= 0:
        raise ValueError("the reference's held-out token_accuracy is 0: retention is undefined "
                         f"(reference measured on {reference.tokens} tokens)")
    task_ret = None
    if candidate.task_accuracy is not None and reference.task_accuracy:
        task_ret = candidate.task_accuracy / reference.task_accuracy
    return {"retention": candidate.token_accuracy / reference.token_accuracy,
            "perplexity_ratio": candidate.perplexity / reference.perplexity,
            "task_retention": task_ret}


@torch.no_grad()
def output_parity(model_a: torch.nn.Module, model_b: torch.nn.Module, input_ids: torch.Tensor) -> dict[str, float]:
    """Compare two models' logits on the same inputs, position by position (in float64).

    Args:
        model_a: the reference (e.g. the input model).
        model_b: the candidate.
        input_ids: LongTensor (B, T).
    Returns:
        ``max_abs_diff`` of the logits, ``top1_agreement`` (fraction of positions whose argmax
        agrees) and ``kl_mean`` (mean over positions of KL(softmax a || softmax b), nats).
    Raises:
        ValueError: the logits' shapes differ.
    """
    logits = []
    for model in (model_a, model_b):
        was_training = model.training
        model.eval()
        try:
            device = next(model.parameters()).device
            logits.append(model(input_ids=input_ids.to(device)).logits.detach().cpu().double())  # (B, T, V)
        finally:
            model.train(was_training)
    a, b = logits
    if a.shape != b.shape:
        raise ValueError(f"output_parity: logits of shape {tuple(a.shape)} and {tuple(b.shape)} do not line up")
    log_pa, log_pb = F.log_softmax(a, dim=-1), F.log_softmax(b, dim=-1)
    kl = (log_pa.exp() * (log_pa - log_pb)).sum(dim=-1)  # (B, T)
    return {"max_abs_diff": float((a - b).abs().max()),
            "top1_agreement": float((a.argmax(-1) == b.argmax(-1)).double().mean()),
            "kl_mean": float(kl.mean())}


class QualityGate(FrozenConfig):
    """Thresholds a compressed model must meet; None switches a check off."""

    min_retention: float = Field(0.95, ge=0.0, le=1.0)  # token accuracy vs the reference
    max_perplexity_ratio: float | None = Field(None, ge=1.0)  # candidate / reference perplexity
    min_top1_agreement: float | None = Field(None, ge=0.0, le=1.0)  # needs output parity

    def verdict(self, ret: dict, parity: dict | None = None) -> tuple[bool, list[str]]:
        """Check :func:`retention` (and :func:`output_parity`) results against the thresholds.

        Returns:
            ``(passed, reasons)``: one reason per failed threshold, naming the measured value
            and the threshold, e.g. ``"retention 0.931 < min_retention 0.95"``; ``passed`` is
            ``not reasons``.
        """
        reasons: list[str] = []
        checks = [("retention", ret["retention"], "<", "min_retention", self.min_retention),
                  ("perplexity_ratio", ret["perplexity_ratio"], ">", "max_perplexity_ratio",
                   self.max_perplexity_ratio)]
        if self.min_top1_agreement is not None:
            if parity is None:
                reasons.append(f"min_top1_agreement {self.min_top1_agreement:.6g} is set but output parity "
                               "was not measured")
            else:
                checks.append(("top1_agreement", parity["top1_agreement"], "<", "min_top1_agreement",
                               self.min_top1_agreement))
        for name, value, fails, limit_name, limit in checks:
            if limit is None:
                continue
            if not math.isfinite(value):  # NaN compares False with everything: fail it explicitly
                reasons.append(f"{name} {value} is not finite ({limit_name} {limit:.6g})")
            elif (value < limit) if fails == "<" else (value > limit):
                reasons.append(f"{name} {value:.6g} {fails} {limit_name} {limit:.6g}")
        return not reasons, reasons
