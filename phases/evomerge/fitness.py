"""EvoMerge's composite fitness: 0.4 perplexity + 0.3 accuracy + 0.2 speed + 0.1 memory.

The weights are the reference analysis'. Each objective is measured on the candidate and turned
into a term where higher is better and the reference scores 1 (accuracy is already in [0, 1]):

- perplexity: ``reference.perplexity / perplexity`` on the fixed held-out windows;
- accuracy: exact-match accuracy on the fixed held-out generated tasks (``tasks/accuracy``);
- speed: ``reference.flops_per_token / flops_per_token``;
- memory: ``reference.weight_bytes / weight_bytes``.

The reference is the parents' mean of each objective (:func:`reference`), fixed for a run, so
parents and children are scored on one scale and "beats the best parent" means something.

Speed and memory are deterministic measures (DESIGN.md, "Determinism"): FLOPs per token are
``2 x`` the weights every token multiplies (every ``nn.Linear``; the pondered block of a
Cognate model counted once per mean ponder step measured on the held-out windows), and memory
is the bytes of the model's distinct tensors. Parameter-space merges of one architecture
leave both unchanged, so only perplexity and accuracy separate them; layouts (frankenmerge,
DFS) change the depth and with it both. Measured timings may be reported beside these, never
used for the decision by default.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

from phases.data.corpus import Corpus, evaluate_perplexity
from phases.data.tasks import Task, task_accuracy

__all__ = ["FITNESS_WEIGHTS", "Objectives", "composite", "flops_per_token", "measure", "reference", "weight_bytes"]

FITNESS_WEIGHTS: dict[str, float] = {"perplexity": 0.4, "accuracy": 0.3, "speed": 0.2, "memory": 0.1}


@dataclass(frozen=True)
class Objectives:
    """What was measured on one model (the ``evomerge/*`` metrics of a candidate)."""

    perplexity: float
    accuracy: float
    flops_per_token: float
    weight_bytes: int
    ponder_steps: float = 1.0

    def to_json(self) -> dict[str, float]:
        return asdict(self)


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's distinct parameters and buffers (tied weights counted once)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for t in (*model.parameters(), *model.buffers()):
        key = (t.untyped_storage().data_ptr(), t.storage_offset())
        if key in seen:
            continue
        seen.add(key)
        total += t.numel() * t.element_size()
    return total


def flops_per_token(model: torch.nn.Module, ponder_steps: float = 1.0) -> float:
    """``2 x`` the multiply-accumulates of every ``nn.Linear`` per token; modules under an
    ``act`` (ACT-pondered) block count ``ponder_steps`` times. Attention's O(sequence) part is
    left out: it is the same for every candidate of one architecture and context length."""
    total = 0.0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            repeats = ponder_steps if ".act." in f".{name}." else 1.0
            total += 2.0 * module.weight.numel() * repeats
    return total


@torch.no_grad()
def measure(model: torch.nn.Module, corpus: Corpus, tasks: Sequence[Task], *, batch_size: int = 8,
            max_batches: int | None = 4) -> Objectives:
    """Measure a model's objectives on the corpus' fixed held-out windows and ``tasks``.

    Raises:
        ValueError: ``tasks`` is empty.
    """
    ppl = evaluate_perplexity(model, corpus, batch_size=batch_size, max_batches=max_batches)
    acc = task_accuracy(model, corpus.tokenizer, tasks, batch_size=64)["tasks/accuracy"]
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        windows = corpus.windows("heldout", max_windows=batch_size).to(device)
        out = model(input_ids=windows[:, :-1])
        steps = getattr(out, "ponder_steps", None)
        ponder = float(steps) if steps is not None else 1.0
    finally:
        model.train(was_training)
    return Objectives(perplexity=ppl, accuracy=float(acc), flops_per_token=flops_per_token(model, ponder),
                      weight_bytes=weight_bytes(model), ponder_steps=ponder)


def reference(parents: Sequence[Objectives]) -> Objectives:
    """The parents' mean of each objective: the scale every candidate of a run is scored on.

    Raises:
        ValueError: no parents.
    """
    if not parents:
        raise ValueError("the fitness reference needs at least one parent")
    n = len(parents)
    return Objectives(perplexity=sum(p.perplexity for p in parents) / n,
                      accuracy=sum(p.accuracy for p in parents) / n,
                      flops_per_token=sum(p.flops_per_token for p in parents) / n,
                      weight_bytes=round(sum(p.weight_bytes for p in parents) / n),
                      ponder_steps=sum(p.ponder_steps for p in parents) / n)


def composite(obj: Objectives, ref: Objectives, weights: dict[str, float] | None = None) -> tuple[float, dict[str, float]]:
    """The weighted fitness and its four terms (each higher-is-better, 1 = the reference)."""
    w = weights or FITNESS_WEIGHTS
    terms = {"perplexity": ref.perplexity / obj.perplexity, "accuracy": obj.accuracy,
             "speed": ref.flops_per_token / obj.flops_per_token, "memory": ref.weight_bytes / obj.weight_bytes}
    return sum(w[k] * v for k, v in terms.items()), terms
