"""Generated tasks with known answers: arithmetic, modular arithmetic and calculator tool calls.

DESIGN.md ("Data") asks for tasks that exist offline and whose answers are known, so that a
model's skill is measured rather than assumed. Three kinds, each a :class:`Task` with a
``prompt``, the scored ``answer`` span and a ``suffix`` that training text carries after it:

- arithmetic: ``"12+35="`` -> ``"47"`` (+, -, *);
- modular:    ``"(17*5) mod 7 = "`` -> ``"1"`` (+, *);
- tool:       ``"What is 12 times 7? "`` -> ``"<tool>calculator(12*7)</tool>"``, suffix
  ``" -> 84"`` (the call format of Toolformer, Schick et al. 2023, with the tool's result).

Generation is a pure function of a ``numpy.random.Generator``, so everything is deterministic
under a seed. :func:`task_accuracy` scores exact match teacher-forced: a task counts as solved
when the argmax of every answer position equals the answer token given the true prefix. That
is exactly the condition under which greedy decoding emits the answer tokens, so it equals
greedy exact match on the answer span (without needing a stop token), in one batched forward.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .tokenizer import Tokenizer

__all__ = ["TASK_KINDS", "Task", "make_task", "heldout_task_set", "encode_task", "pack_tasks",
           "task_accuracy"]

TASK_KINDS = ("arithmetic", "modular", "tool")
_WORDS = {"+": "plus", "-": "minus", "*": "times"}
_HELDOUT_TAG = 0x7A5C  # separates the held-out task stream from every training stream


@dataclass(frozen=True)
class Task:
    """One generated problem. ``text`` is what training sees; ``answer`` is what is scored."""

    kind: str
    prompt: str
    answer: str
    suffix: str = ""

    @property
    def text(self) -> str:
        return self.prompt + self.answer + self.suffix


def _apply(op: str, a: int, b: int) -> int:
    return a + b if op == "+" else a - b if op == "-" else a * b


def make_task(kind: str, rng: np.random.Generator, *, max_operand: int, max_modulus: int) -> Task:
    """Draw one task of ``kind``.

    Args:
        kind: one of ``TASK_KINDS``.
        rng: the generator to draw from (advanced by this call).
        max_operand: operands are uniform in [0, max_operand].
        max_modulus: modular tasks draw the modulus from [2, max_modulus].
    Raises:
        ValueError: for an unknown kind (the message lists the valid ones).
    """
    a, b = (int(x) for x in rng.integers(0, max_operand + 1, size=2))
    if kind == "arithmetic":
        op = "+-*"[int(rng.integers(3))]
        return Task(kind, f"{a}{op}{b}=", str(_apply(op, a, b)))
    if kind == "modular":
        op = "+*"[int(rng.integers(2))]
        m = int(rng.integers(2, max_modulus + 1))
        return Task(kind, f"({a}{op}{b}) mod {m} = ", str(_apply(op, a, b) % m))
    if kind == "tool":
        op = "+-*"[int(rng.integers(3))]
        return Task(kind, f"What is {a} {_WORDS[op]} {b}? ", f"<tool>calculator({a}{op}{b})</tool>",
                    f" -> {_apply(op, a, b)}")
    raise ValueError(f"unknown task kind {kind!r}; valid kinds: {', '.join(TASK_KINDS)}")


def heldout_task_set(seed: int, per_kind: int, *, max_operand: int, max_modulus: int) -> tuple[Task, ...]:
    """The fixed held-out tasks: ``per_kind`` distinct prompts of every kind, in a fixed order.

    Training streams reject these prompts (see :func:`pack_tasks`), so they stay unseen. When
    the problem space is smaller than ``per_kind`` the set holds every prompt that was found.
    """
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), _HELDOUT_TAG]))
    out: list[Task] = []
    for kind in TASK_KINDS:
        seen: set[str] = set()
        for _ in range(50 * per_kind):
            if len(seen) == per_kind:
                break
            task = make_task(kind, rng, max_operand=max_operand, max_modulus=max_modulus)
            if task.prompt not in seen:
                seen.add(task.prompt)
                out.append(task)
    return tuple(out)


def encode_task(tokenizer: Tokenizer, task: Task, with_suffix: bool = False) -> tuple[list[int], int, int]:
    """Ids ``[eos] + prompt + answer (+ suffix)`` and the answer span ``[start, end)``.

    Parts are encoded separately and concatenated (training packs them the same way), so
    the answer span is exact for BPE as well as for bytes.
    """
    prompt, answer = tokenizer.encode(task.prompt), tokenizer.encode(task.answer)
    ids = [tokenizer.eos_id] + prompt + answer
    start, end = 1 + len(prompt), 1 + len(prompt) + len(answer)
    if with_suffix and task.suffix:
        ids += tokenizer.encode(task.suffix)
    return ids, start, end


def pack_tasks(rng: np.random.Generator, tokenizer: Tokenizer, length: int, kind_probs: Mapping[str, float],
               *, max_operand: int, max_modulus: int, exclude: frozenset[str] = frozenset(),
               spans: list[tuple[int, int]] | None = None) -> list[int]:
    """One row of ``length`` ids: ``<eos> task <eos> task <eos> ...``, cut to length.

    Args:
        rng: generator for this row (a pure function of the batch's seed and step).
        tokenizer: encodes the parts.
        length: ids in the row.
        kind_probs: probability of each task kind (keys from TASK_KINDS).
        max_operand, max_modulus: see :func:`make_task`.
        exclude: prompts never to emit (the held-out set).
        spans: when given, the answer span ``[start, end)`` of every task whose answer lies
            wholly inside the row is appended to it (phase 5 scores its training tasks).
    Raises:
        ValueError: if the task space is exhausted by ``exclude`` (1000 rejections in a row).
    """
    kinds = list(kind_probs)
    probs = np.asarray([kind_probs[k] for k in kinds], dtype=np.float64)
    ids = [tokenizer.eos_id]
    rejected = 0
    while len(ids) < length:
        kind = kinds[int(rng.choice(len(kinds), p=probs))]
        task = make_task(kind, rng, max_operand=max_operand, max_modulus=max_modulus)
        if task.prompt in exclude:
            rejected += 1
            if rejected >= 1000:
                raise ValueError("every generated task is held out; raise max_operand or lower heldout_tasks")
            continue
        rejected = 0
        encoded, start, end = encode_task(tokenizer, task, with_suffix=True)
        if spans is not None and len(ids) - 1 + end <= length:
            spans.append((len(ids) - 1 + start, len(ids) - 1 + end))
        ids += encoded[1:] + [tokenizer.eos_id]
    return ids[:length]


@torch.no_grad()
def task_accuracy(model: torch.nn.Module, tokenizer: Tokenizer, tasks: Sequence[Task], *,
                  batch_size: int = 64) -> dict[str, float]:
    """Teacher-forced exact-match accuracy (== greedy exact match of the answer span).

    Args:
        model: a causal LM whose ``forward(input_ids=...)`` returns ``.logits`` (B, T, V).
        tokenizer: the model's tokenizer.
        tasks: the tasks to score, in a fixed order (batches are fixed slices of it).
        batch_size: tasks per forward pass.
    Returns:
        ``{"tasks/accuracy": all kinds, "tasks/accuracy/<kind>": per kind present}``.
    Raises:
        ValueError: if ``tasks`` is empty.
    """
    if not tasks:
        raise ValueError("task_accuracy needs at least one task")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    solved = {k: 0 for k in TASK_KINDS}
    total = {k: 0 for k in TASK_KINDS}
    try:
        for i in range(0, len(tasks), batch_size):
            chunk = tasks[i:i + batch_size]
            encoded = [encode_task(tokenizer, t) for t in chunk]
            width = -(-max(len(ids) for ids, _, _ in encoded) // 8) * 8  # few distinct shapes: fewer kernel set-ups
            # Right padding: a causal model's predictions at real positions never see the pads.
            x = torch.full((len(chunk), width), tokenizer.pad_id, dtype=torch.long)
            for j, (ids, _, _) in enumerate(encoded):
                x[j, :len(ids)] = torch.tensor(ids, dtype=torch.long)
            pred = model(input_ids=x.to(device)).logits.argmax(-1).cpu()  # (B, T)
            for j, (task, (_, start, end)) in enumerate(zip(chunk, encoded)):
                # The token at position p is predicted by the logits at p - 1.
                ok = bool(torch.equal(pred[j, start - 1:end - 1], x[j, start:end]))
                solved[task.kind] += int(ok)
                total[task.kind] += 1
    finally:
        model.train(was_training)
    out = {"tasks/accuracy": sum(solved.values()) / sum(total.values())}
    out.update({f"tasks/accuracy/{k}": solved[k] / total[k] for k in TASK_KINDS if total[k]})
    return out
