"""Held-out evaluation of tool use with the real inference loop (``tools.run_with_tools``).

For each question the model starts from ``"Q: {question}\\nA:"`` and decodes greedily; when it writes a call
(``<tool>name(arg)</tool>``) the tool runs and its result is appended, and decoding goes on (Toolformer, Schick
et al. 2023, section 2's inference: "we decode until the model produces the -> token ... call the API ... and
continue"). The answer is what the model wrote with every call and result cut out. Two scores:

- tool-call accuracy: the first executed call used the question's tool, ran, and returned the right answer;
- task accuracy: the answer equals the expected answer exactly.

Cost: there is no KV cache (Cognate recomputes the prefix per token), so decoding prompts one by one costs one
forward per prompt per byte. The questions are therefore decoded together: ``run_with_tools`` is replayed for
every question with a ``generate_fn`` that answers from a table of finished continuations and otherwise asks
for one; the requested contexts are decoded in one batch (right-padded: a causal model's last real position
never sees the pads), the table grows, and the loop is replayed, at most ``max_calls + 1`` rounds. Tools are
cheap and deterministic, so replaying them is harmless. The batched argmax equals ``tools.greedy_generate``'s
up to float rounding of batched matmuls (a test checks they agree on a trained tiny model).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .tooldata import ToolQuestion
from .tools import CALL_RE, CallRecord, format_result, run_with_tools

__all__ = ["batched_greedy", "strip_calls", "evaluate_tools"]

STOP = ("</tool>", "\n")


@torch.no_grad()
def batched_greedy(model: torch.nn.Module, tokenizer: Any, texts: Sequence[str], max_new_tokens: int,
                   stop: Sequence[str] = STOP) -> list[str]:
    """``tools.greedy_generate`` for many texts at once: one forward per step over the rows still running.

    Each row is ``[eos] + encode(text)``, stops at eos, at a ``stop`` string (kept) or after ``max_new_tokens``.
    Eval mode for the call, restored after.

    Returns:
        The continuation of each text, in order.
    """
    eos = tokenizer.eos_id
    rows = [[eos] + list(tokenizer.encode(t)) for t in texts]
    new: list[list[int]] = [[] for _ in texts]
    out = [""] * len(texts)
    running = list(range(len(texts)))
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        for _ in range(max_new_tokens):
            if not running:
                break
            width = max(len(rows[i]) for i in running)
            x = torch.full((len(running), width), eos, dtype=torch.long)  # (B, T), right-padded
            for j, i in enumerate(running):
                x[j, :len(rows[i])] = torch.tensor(rows[i])
            last = torch.tensor([len(rows[i]) - 1 for i in running])
            logits = model(input_ids=x.to(device)).logits  # (B, T, V)
            tokens = logits[torch.arange(len(running)), last.to(device)].argmax(-1).tolist()  # (B,)
            still = []
            for i, token in zip(running, tokens):
                if token == eos:
                    continue
                rows[i].append(token)
                new[i].append(token)
                out[i] = tokenizer.decode(new[i])
                if not any(out[i].endswith(s) for s in stop):
                    still.append(i)
            running = still
    finally:
        model.train(was_training)
    return out


def strip_calls(output: str, records: Sequence[CallRecord]) -> str:
    """``output`` with every call cut out, each with the ``" -> result"`` the loop wrote after it (records in
    order; a call the loop did not execute has no result and is cut alone)."""
    pieces, last, k = [], 0, 0
    for m in CALL_RE.finditer(output):
        end = m.end()
        if k < len(records) and (m["name"], m["arg"]) == (records[k].name, records[k].argument) \
                and output.startswith(format_result(records[k].result), end):
            end += len(format_result(records[k].result))
            k += 1
        pieces.append(output[last:m.start()])
        last = end
    pieces.append(output[last:])
    return "".join(pieces)


class _Pending(Exception):
    """Raised by the replay's generate_fn for a context not decoded yet."""

    def __init__(self, text: str):
        super().__init__(text)
        self.text = text


def _summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    n = len(rows)
    correct = [r for r in rows if r["task_correct"]]
    return {
        "n": n,
        "tool_call_accuracy": sum(r["call_correct"] for r in rows) / n if n else None,
        "tool_choice_accuracy": sum(r["choice_correct"] for r in rows) / n if n else None,
        "task_accuracy": len(correct) / n if n else None,
        "calls_per_prompt": sum(r["n_calls"] for r in rows) / n if n else None,
        "calls_when_correct": sum(r["n_calls"] for r in correct) / len(correct) if correct else None,
    }


def evaluate_tools(model: torch.nn.Module, tokenizer: Any, questions: Sequence[ToolQuestion], *,
                   max_new_tokens: int = 48, max_calls: int = 2) -> dict[str, Any]:
    """Run the tool loop greedily on every question and score the calls and the answers.

    Args:
        model: a causal LM, ``model(input_ids=...).logits`` (B, T, V).
        tokenizer: ``encode``, ``decode``, ``eos_id``.
        questions: the (held-out) questions.
        max_new_tokens: tokens per generation step of the loop (between calls).
        max_calls: calls executed at most per question.
    Returns:
        ``{"n", "tool_call_accuracy", "tool_choice_accuracy", "task_accuracy", "calls_per_prompt",
        "calls_when_correct" (None when no answer is correct), "per_tool": {tool: the same six}, "transcripts":
        the first 8 as dicts of prompt, output, answer, expected, calls}``. A call is correct when the first
        call names the question's tool, runs and returns the answer; the choice is correct when it names the
        question's tool (whatever its argument).
    Raises:
        ValueError: no questions.
    """
    if not questions:
        raise ValueError("evaluate_tools needs at least one question")
    table: dict[str, str] = {}

    def generate(text: str) -> str:
        if text in table:
            return table[text]
        raise _Pending(text)

    done: dict[int, tuple[str, list[CallRecord]]] = {}
    waiting = list(range(len(questions)))
    while waiting:
        asks: dict[int, str] = {}
        for i in waiting:
            try:
                done[i] = run_with_tools(generate, questions[i].prompt, max_calls=max_calls)
            except _Pending as p:
                asks[i] = p.text
        contexts = sorted(set(asks.values()))
        table.update(zip(contexts, batched_greedy(model, tokenizer, contexts, max_new_tokens)))
        waiting = sorted(asks)

    rows, transcripts = [], []
    for i, q in enumerate(questions):
        text, records = done[i]
        output = text[len(q.prompt):]
        answer = strip_calls(output, records).strip().split("\n", 1)[0].strip()
        first = records[0] if records else None
        rows.append({"tool": q.tool, "n_calls": len(records), "task_correct": answer == q.answer,
                     "choice_correct": first is not None and first.name == q.tool,
                     "call_correct": first is not None and first.name == q.tool and first.ok
                     and first.result == q.answer})
        if len(transcripts) < 8:
            transcripts.append({"prompt": q.prompt, "output": output, "answer": answer, "expected": q.answer,
                                "calls": [{"name": r.name, "argument": r.argument, "result": r.result, "ok": r.ok}
                                          for r in records]})
    out = _summary(rows)
    out["per_tool"] = {tool: _summary([r for r in rows if r["tool"] == tool])
                       for tool in sorted({q.tool for q in questions})}
    out["transcripts"] = transcripts
    return out
