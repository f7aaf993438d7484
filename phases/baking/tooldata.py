"""Toolformer's data step on generated questions: propose calls, execute them, keep the useful ones, fine-tune.

Schick et al. 2023, "Toolformer: Language Models Can Teach Themselves to Use Tools" (arXiv 2302.04761),
section 2: (1) sample candidate API calls at positions of a text, (2) execute them, (3) keep a call only if its
result lowers the weighted loss of the following tokens by at least tau_f (``toolformer.keep_call``), (4) fine-tune
the LM on the texts with the kept calls written in (the augmented corpus, which includes the texts left without a
call).

The texts are generated questions with known answers (:class:`ToolQuestion`)::

    Q: What is 12 times 7?
    A:<tool>calculator(12*7)</tool> -> 84 84

Step (1) differs from the paper. Toolformer prompts the LM itself with a few-shot demonstration of the API and
samples calls at the positions where ``<API>`` is likely. A 150K-parameter byte-level model cannot follow a
few-shot prompt (it has no in-context learning to speak of), so its samples would be noise and the filter would
keep nothing. Instead :func:`candidate_calls` proposes calls with one rule-based extractor per tool, reading the
question text: an arithmetic expression from ``"{a} {plus|minus|times} {b}"`` for the calculator, the phrase
after ``"What is (the) "`` for the lookup. Every tool whose extractor finds something proposes a call, so a
calculator question also proposes ``lookup(12 times 7)``, which the tool rejects: the filter (steps 2-3,
unchanged from the paper) has to drop it, as it would drop a bad sampled call. The position is fixed (right after
``"A:"``), where the answer starts.

The filter model. The paper filters with the LM being taught, GPT-J, which already copies a result it has
just read. The tiny models here do not: the tiny preset's phase-5 model judged every one of 240 valid calls
harmful (every gain below 0, so tau_f kept nothing; measured by the phase, reported as
``baking/tool_data/kept_by_input``). So the judge is the input model after a short warm-up
(``baking.filter_warmup_steps``) on :func:`warmup_texts` (every candidate that ran without error, written in,
mixed with plain text): it has learnt the call format and to read a result, not which calls help. The filter
then still decides per call, and the fine-tune (step 4) starts from the input model, not from the judge.

:func:`finetune_texts` is step (4). By default it leaves the tokens of each ``" -> result"`` out of the loss: at
inference the tool writes them (``tools.run_with_tools``), so the model needs to learn to write the call and to
use the result, not to predict it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from phases.training import adamw, derived_seed, epoch_order

from .toolformer import keep_call
from .tools import CALL_RE, RESULT_SEP, _knowledge, execute_calls, format_call, format_result, get_tool

__all__ = ["ToolQuestion", "ToolData", "EXTRACTORS", "split_keys", "make_questions", "candidate_calls",
           "augmented_text", "warmup_texts", "toolformer_data", "encode_with_loss_mask", "finetune_texts"]

_OPS = {"+": "plus", "-": "minus", "*": "times"}
_WORD_OPS = {w: op for op, w in _OPS.items()}
_ARITH_RE = re.compile(r"(-?\d+(?:\.\d+)?) (plus|minus|times) (-?\d+(?:\.\d+)?)")
_PHRASE_RE = re.compile(r"^What is (?:the )?(?P<phrase>[^?]+)\?")
_QUESTION_TAG = 0x70B1  # the question stream's tag in the SeedSequence


@dataclass(frozen=True)
class ToolQuestion:
    """A question whose answer one tool call gives: ``tool(argument) == answer``."""

    tool: str
    question: str
    answer: str
    argument: str

    @property
    def prompt(self) -> str:
        """``"Q: {question}\\nA:"``: where generation starts."""
        return f"Q: {self.question}\nA:"

    @property
    def text(self) -> str:
        """The plain text, without a call: ``prompt + " {answer}\\n"``."""
        return self.prompt + f" {self.answer}\n"


def augmented_text(q: ToolQuestion, tool: str, argument: str, result: str) -> str:
    """``prompt + <tool>tool(argument)</tool> + " -> result" + " {answer}\\n"``: the text with a call written in."""
    return q.prompt + format_call(tool, argument) + format_result(result) + f" {q.answer}\n"


# ---------------------------------------------------------------------------------------------- questions

def split_keys(seed: int, heldout_fraction: float) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Split the knowledge file's keys into training and held-out keys.

    Args:
        seed: seeds the permutation.
        heldout_fraction: share of keys held out, in (0, 1); rounded, at least one key on each side.
    Returns:
        ``(train_keys, heldout_keys)``, disjoint, both non-empty, each sorted.
    Raises:
        ValueError: a fraction outside (0, 1).
    """
    if not 0.0 < heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in (0, 1), got {heldout_fraction!r}")
    keys = sorted(_knowledge())
    n_held = min(len(keys) - 1, max(1, round(heldout_fraction * len(keys))))
    order = np.random.default_rng(derived_seed(seed, "tool-key-split")).permutation(len(keys))
    held = {keys[i] for i in order[:n_held]}
    return tuple(k for k in keys if k not in held), tuple(sorted(held))


def _calculator_question(rng: np.random.Generator, max_operand: int) -> ToolQuestion:
    a, b = (int(x) for x in rng.integers(0, max_operand + 1, size=2))
    op = "+-*"[int(rng.integers(3))]
    argument = f"{a}{op}{b}"
    return ToolQuestion("calculator", f"What is {a} {_OPS[op]} {b}?", get_tool("calculator").run(argument), argument)


def _lookup_question(rng: np.random.Generator, keys: Sequence[str]) -> ToolQuestion:
    key = keys[int(rng.integers(len(keys)))]
    return ToolQuestion("lookup", f"What is the {key}?", get_tool("lookup").run(key), key)


def make_questions(seed: int, n: int, *, keys: Sequence[str], max_operand: int,
                   tools: Sequence[str] = ("calculator", "lookup"),
                   exclude: Collection[str] = frozenset()) -> list[ToolQuestion]:
    """``n`` distinct generated questions, split evenly over ``tools`` (the first tools take the remainder;
    when a tool runs out of distinct questions, e.g. lookups over few keys, the other tools make up the
    rest), shuffled; a pure function of the arguments.

    Args:
        seed: seeds the question stream.
        n: questions to make.
        keys: knowledge keys the lookup questions may ask about (e.g. one side of :func:`split_keys`).
        max_operand: calculator operands are uniform in [0, max_operand]; the operation is +, - or *.
        tools: which kinds to make, from ``("calculator", "lookup")``.
        exclude: question texts never to emit (keeps held-out questions out of a training set).
    Returns:
        The questions.
    Raises:
        ValueError: an unknown tool, n < 0, or fewer distinct questions than asked for.
    """
    makers: dict[str, Callable[[np.random.Generator], ToolQuestion]] = {
        "calculator": lambda rng: _calculator_question(rng, max_operand),
        "lookup": lambda rng: _lookup_question(rng, keys),
    }
    bad = [t for t in tools if t not in makers]
    if bad or not tools or n < 0:
        raise ValueError(f"need n >= 0 and tools from {', '.join(makers)}; got n={n}, tools={list(tools)}")
    if "lookup" in tools and not keys:
        raise ValueError("lookup questions need at least one knowledge key")
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), _QUESTION_TAG]))
    out: list[ToolQuestion] = []
    seen = set(exclude)

    def draw(tool: str, want: int) -> int:
        made = 0
        for _ in range(50 * want + 100):
            if made == want:
                break
            q = makers[tool](rng)
            if q.question not in seen:
                seen.add(q.question)
                out.append(q)
                made += 1
        return made

    short, full = 0, []
    for i, tool in enumerate(tools):
        want = n // len(tools) + (i < n % len(tools))
        made = draw(tool, want)
        short += want - made
        if made == want:
            full.append(tool)
    for tool in full:  # a tool whose questions ran out (few knowledge keys): the others make up the rest
        short -= draw(tool, short) if short else 0
    if short:
        raise ValueError(f"only {n - short} distinct questions of {n} could be made; raise max_operand or pass more "
                         "keys (excluded questions do not count)")
    return [out[i] for i in rng.permutation(len(out))]


# ---------------------------------------------------------------------------------------------- candidates

def _calculator_candidate(question: str) -> str | None:
    m = _ARITH_RE.search(question)
    return None if m is None else f"{m[1]}{_WORD_OPS[m[2]]}{m[3]}"


def _lookup_candidate(question: str) -> str | None:
    m = _PHRASE_RE.search(question)
    return None if m is None else m["phrase"].strip()


# Per-tool extractors (question text -> argument or None); they replace Toolformer's few-shot sampling (see the
# module docstring).
EXTRACTORS: dict[str, Callable[[str], str | None]] = {"calculator": _calculator_candidate, "lookup": _lookup_candidate}


def candidate_calls(q: ToolQuestion) -> list[tuple[str, str]]:
    """``(tool, argument)`` proposals read from ``q.question``, one per tool whose extractor finds something, in
    :data:`EXTRACTORS` order. Wrong-tool proposals are expected (``lookup(12 times 7)``): the filter drops them."""
    out = []
    for tool, extract in EXTRACTORS.items():
        argument = extract(q.question)
        if argument:
            out.append((tool, argument))
    return out


# ---------------------------------------------------------------------------------------------- filter

@dataclass(frozen=True)
class ToolData:
    """The augmented corpus and every filter decision behind it.

    ``texts[i]`` is question i's text with its best kept call (largest gain), or its plain text when no call was
    kept. ``decisions`` holds one dict per candidate: question, tool, argument, result, ok, loss_plain,
    loss_no_result, loss_with_result, gain, kept.
    """

    texts: list[str]
    decisions: list[dict[str, Any]] = field(repr=False)

    @property
    def candidates(self) -> int:
        return len(self.decisions)

    @property
    def kept(self) -> int:
        return sum(d["kept"] for d in self.decisions)

    @property
    def kept_by_tool(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for d in self.decisions:
            out[d["tool"]] = out.get(d["tool"], 0) + int(d["kept"])
        return out

    @property
    def errors(self) -> int:
        return sum(not d["ok"] for d in self.decisions)

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable summary with every decision."""
        return {"candidates": self.candidates, "kept": self.kept, "kept_by_tool": self.kept_by_tool,
                "errors": self.errors, "texts": list(self.texts), "decisions": [dict(d) for d in self.decisions]}


def warmup_texts(questions: Sequence[ToolQuestion]) -> list[str]:
    """Every candidate call of every question that runs without error, written into its question's text: the
    warm-up data of the filter model (see the module docstring). An erroring call is left out."""
    out = []
    for q in questions:
        for tool, argument in candidate_calls(q):
            _, (record,) = execute_calls(format_call(tool, argument))
            if record.ok:
                out.append(augmented_text(q, tool, argument, record.result))
    return out


def toolformer_data(model: torch.nn.Module, tokenizer: Any, questions: Sequence[ToolQuestion], *,
                    threshold: float = 1.0) -> ToolData:
    """Steps (2)-(3) of Toolformer on ``questions``: execute every candidate call and filter it with the model.

    A call is kept iff it ran without error and ``min(L_plain, L_no_result) - L_with_result >= threshold``
    (``toolformer.keep_call`` with text_before = the prompt, text_after = ``" {answer}\\n"``). An erroring call is
    never kept: its "result" is an error message, not an API response (its losses are still recorded).

    Args:
        model: the causal LM that judges the calls (eval mode for the forwards, restored).
        tokenizer: ``encode``, ``eos_id``.
        questions: the questions.
        threshold: tau_f (the paper: 1.0).
    Returns:
        :class:`ToolData`.
    """
    texts, decisions = [], []
    for q in questions:
        best: tuple[float, str] | None = None
        for tool, argument in candidate_calls(q):
            call = format_call(tool, argument)
            _, (record,) = execute_calls(call)
            d = keep_call(model, tokenizer, q.prompt, call, record.result, f" {q.answer}\n", threshold=threshold)
            kept = record.ok and d.keep
            decisions.append({"question": q.question, "tool": tool, "argument": argument, "result": record.result,
                              "ok": record.ok, "loss_plain": d.loss_plain, "loss_no_result": d.loss_no_result,
                              "loss_with_result": d.loss_with_result, "gain": d.gain, "kept": kept})
            if kept and (best is None or d.gain > best[0]):
                best = (d.gain, augmented_text(q, tool, argument, record.result))
        texts.append(q.text if best is None else best[1])
    return ToolData(texts, decisions)


# ---------------------------------------------------------------------------------------------- fine-tune

def encode_with_loss_mask(tokenizer: Any, text: str, *, mask_results: bool = True) -> tuple[list[int], list[bool]]:
    """Ids ``[eos] + text`` and, per id, whether it is a loss target.

    The leading eos is never a target. With ``mask_results`` the tokens of each ``" -> result"`` that follows a
    call are not targets either: the call is re-executed and the text must continue with exactly what the tool
    writes. The text is encoded part by part (before / result / after) and the ids concatenated, as
    ``toolformer.keep_call`` does, so the boundaries are exact for BPE as well as bytes.

    Raises:
        ValueError: a call's written result differs from the tool's (the text was not made by the tools).
    """
    parts: list[tuple[str, bool]] = []  # (text, is a target)
    last = 0
    if mask_results:
        for m in CALL_RE.finditer(text):
            if not text.startswith(RESULT_SEP, m.end()):
                continue  # a call without a result: the model writes all of it
            _, (record,) = execute_calls(m[0])
            written = format_result(record.result)
            if not text.startswith(written, m.end()):
                raise ValueError(f"the result after {m[0]!r} in {text!r} is not the tool's {written!r}")
            parts += [(text[last:m.end()], True), (written, False)]
            last = m.end() + len(written)
    parts.append((text[last:], True))
    ids, target = [tokenizer.eos_id], [False]
    for part, is_target in parts:
        if part:
            enc = tokenizer.encode(part)
            ids += enc
            target += [is_target] * len(enc)
    return ids, target


def finetune_texts(model: torch.nn.Module, tokenizer: Any, texts: Sequence[str], *, steps: int, lr: float,
                   batch_size: int, seed: int, mask_results: bool = True, weight_decay: float = 0.0,
                   plain_rows: Sequence[Sequence[int]] = (), plain_per_batch: int = 0) -> list[float]:
    """LM fine-tune of ``model`` on ``texts``, in place (AdamW, ``phases.training.adamw``).

    Rows are ``[eos] + text`` (see :func:`encode_with_loss_mask`), right-padded with eos; pads and masked tokens
    are not targets. The loss is the mean next-token cross-entropy over the targets of the batch. Right padding
    needs no attention mask: a causal model's real positions never see the pads. Whatever module is given is
    trained (BitLinear QAT layers included), in train mode during the steps, restored after.

    Args:
        model: a causal LM, ``model(input_ids=...).logits`` (B, T, V).
        tokenizer: ``encode``, ``eos_id``.
        texts: the training texts (e.g. ``ToolData.texts``).
        steps, lr, batch_size, weight_decay: AdamW steps, learning rate, rows per step, decoupled decay.
        seed: the batch order (epoch permutations); same seed -> same losses and weights.
        mask_results: leave the tool results out of the loss.
        plain_rows, plain_per_batch: token rows of plain training text (every token a target, no eos added) and
            how many of each batch's ``batch_size`` rows come from them (their own epoch permutations): the rest
            of the augmented corpus, which keeps the language model from being overwritten.
    Returns:
        The loss of every step.
    Raises:
        ValueError: no texts, steps < 0, batch_size < 1, or plain_per_batch outside [0, batch_size) or
            without plain_rows.
    """
    if not texts or steps < 0 or batch_size < 1:
        raise ValueError(f"need texts, steps >= 0, batch_size >= 1; got {len(texts)} texts, steps={steps}, "
                         f"batch_size={batch_size}")
    if not 0 <= plain_per_batch < batch_size or (plain_per_batch and not plain_rows):
        raise ValueError(f"plain_per_batch must be in [0, batch_size={batch_size}) and needs plain_rows; got "
                         f"{plain_per_batch} with {len(plain_rows)} rows")
    rows = [encode_with_loss_mask(tokenizer, t, mask_results=mask_results) for t in texts]
    plain = [(list(r), [True] * len(r)) for r in plain_rows]
    device = next(model.parameters()).device
    opt = adamw(model, lr, weight_decay)
    losses = []
    was_training = model.training
    model.train()
    try:
        for step in range(steps):
            text_rows = epoch_order(len(rows), batch_size - plain_per_batch, seed, step, "tooldata-order")
            batch = [rows[i] for i in text_rows]
            if plain_per_batch:
                plain_seed = derived_seed(seed, "plain")
                batch += [plain[i] for i in epoch_order(len(plain), plain_per_batch, plain_seed, step, "tooldata-order")]
            width = max(len(ids) for ids, _ in batch)
            x = torch.full((len(batch), width), tokenizer.eos_id, dtype=torch.long)  # (B, T)
            labels = torch.full((len(batch), width), -100, dtype=torch.long)
            for j, (ids, target) in enumerate(batch):
                x[j, :len(ids)] = torch.tensor(ids)
                labels[j, :len(ids)] = torch.where(torch.tensor(target), torch.tensor(ids), -100)
            logits = model(input_ids=x.to(device)).logits  # (B, T, V)
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                   labels[:, 1:].reshape(-1).to(device), ignore_index=-100)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
    finally:
        model.train(was_training)
    return losses
