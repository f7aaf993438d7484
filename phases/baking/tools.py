"""Tools that really execute, the Toolformer call syntax, and the inference loop that runs them.

Toolformer (Schick et al. 2023, "Toolformer: Language Models Can Teach Themselves to Use
Tools", arXiv 2302.04761) writes an API call into the text and the API's result after it. We
use the format of our generated tool tasks (``phases/data/tasks.py``)::

    What is 12 times 7? <tool>calculator(12*7)</tool> -> 84

Tools live in a registry (:data:`TOOLS`, filled by :func:`register_tool`); each maps one string
argument to one string result and raises :class:`ToolError` with a message for bad input:

- ``calculator``: + - * / // % ** and parentheses over int and float literals, evaluated by
  walking the ``ast`` (never ``eval``/``exec``), with bounded exponents and magnitudes;
- ``lookup``: facts from the small local file ``knowledge.json`` next to this module.

There is deliberately no code-execution tool: running model-written code needs a sandbox, and
none is safe in-process without an extra dependency (a subprocess with resource limits still
shares the file system and network), so it is left out.

:func:`execute_calls` fills in the results of the calls in a text; :func:`run_with_tools` is the
inference loop (generate until a call, execute it, append the result, generate on), independent
of torch: a ``generate_fn(text) -> continuation`` hides the model. :func:`greedy_generate` is one
such function for our causal LMs (torch is imported inside it, so importing this module is light).
"""

from __future__ import annotations

import ast
import json
import math
import operator
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from coordinator.errors import AgentForgeError, ArtifactError

__all__ = [
    "ToolError", "Tool", "TOOLS", "register_tool", "get_tool", "KNOWLEDGE_PATH", "CALL_RE", "RESULT_SEP",
    "CallRecord", "format_call", "format_result", "execute_calls", "run_with_tools", "greedy_generate",
]

KNOWLEDGE_PATH = Path(__file__).with_name("knowledge.json")
RESULT_SEP = " -> "
# ARG runs to the last ")" before "</tool>" (the lazy group stops at the first ")</tool>"), so it may hold
# parentheses; it never spans another "<tool>" or "</tool>", so a malformed call cannot swallow the next one.
CALL_RE = re.compile(r"<tool>(?P<name>[A-Za-z_][A-Za-z0-9_]*)\((?P<arg>(?:(?!</?tool>).)*?)\)</tool>")

_MAX_EXPONENT = 64  # |b| in a ** b
_MAX_MAGNITUDE = 1e100  # of every literal and intermediate result
_MAX_EXPRESSION = 200  # characters: keeps the ast (and its recursion) small


class ToolError(AgentForgeError, ValueError):
    """A tool got input it cannot handle (bad expression, unknown key, unknown tool)."""


@dataclass(frozen=True)
class Tool:
    """One tool: ``run(argument) -> result``, both strings."""

    name: str
    description: str
    run: Callable[[str], str]


TOOLS: dict[str, Tool] = {}


def register_tool(name: str, description: str = "") -> Callable[[Callable[[str], str]], Callable[[str], str]]:
    """Decorator: register ``fn(argument: str) -> str`` as the tool ``name``.

    Args:
        name: the name used in calls (``<tool>name(arg)</tool>``).
        description: one line for prompts and docs; defaults to the first line of ``fn``'s docstring.
    Raises:
        ValueError: if ``name`` is taken or is not an identifier (CALL_RE could not match it).
    """
    if not name.isidentifier():
        raise ValueError(f"tool name must be an identifier, got {name!r}")

    def wrap(fn: Callable[[str], str]) -> Callable[[str], str]:
        if name in TOOLS:
            raise ValueError(f"tool {name!r} is already registered")
        doc_lines = (fn.__doc__ or "").strip().splitlines()
        TOOLS[name] = Tool(name, description or (doc_lines[0] if doc_lines else ""), fn)
        return fn

    return wrap


def get_tool(name: str) -> Tool:
    """The registered tool ``name``.

    Raises:
        ToolError: for an unknown name (the message lists the valid ones).
    """
    try:
        return TOOLS[name]
    except KeyError:
        raise ToolError(f"unknown tool {name!r}; valid tools: {', '.join(sorted(TOOLS))}") from None


# ---------------------------------------------------------------------------------------------- calculator

_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}


def _checked(value: Any, expression: str) -> int | float:
    if isinstance(value, complex) or not isinstance(value, (int, float)):  # e.g. (-8) ** 0.5 is complex
        raise ToolError(f"calculator: {expression!r} has no real-number result")
    if not math.isfinite(value) or abs(value) > _MAX_MAGNITUDE:
        raise ToolError(f"calculator: a value in {expression!r} exceeds the magnitude limit {_MAX_MAGNITUDE:g}")
    return value


def _evaluate(node: ast.AST, expression: str) -> int | float:
    if isinstance(node, ast.Expression):
        return _evaluate(node.body, expression)
    if isinstance(node, ast.Constant):
        if isinstance(node.value, bool) or not isinstance(node.value, (int, float)):
            raise ToolError(f"calculator: only int and float numbers are allowed, got {node.value!r}")
        return _checked(node.value, expression)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _checked(_UNARY[type(node.op)](_evaluate(node.operand, expression)), expression)
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _evaluate(node.left, expression), _evaluate(node.right, expression)
        if isinstance(node.op, ast.Pow) and abs(right) > _MAX_EXPONENT:
            raise ToolError(f"calculator: exponent {right!r} exceeds the limit |exponent| <= {_MAX_EXPONENT}")
        try:
            value = _BINARY[type(node.op)](left, right)
        except ZeroDivisionError:
            raise ToolError(f"calculator: division by zero in {expression!r}") from None
        except OverflowError:
            raise ToolError(f"calculator: overflow in {expression!r}") from None
        return _checked(value, expression)
    what = {ast.Name: "names", ast.Call: "function calls", ast.Attribute: "attributes"}.get(type(node))
    what = what or f"{type(node).__name__} expressions"
    raise ToolError(f"calculator: {what} are not allowed (only numbers, + - * / // % ** and parentheses)")


def _format_number(value: float) -> str:
    """``84`` for ints; floats rounded to 6 decimals with trailing zeros stripped (``3.5``, ``4``), or in
    scientific notation with 6 significant digits when tiny (< 1e-6) or huge (>= 1e15)."""
    if isinstance(value, int):
        return str(value)
    if value == 0:
        return "0"
    if 1e-6 <= abs(value) < 1e15:
        text = f"{value:.6f}".rstrip("0").rstrip(".")
        return "0" if text in ("-0", "") else text
    return f"{value:.6g}"


@register_tool("calculator", "Arithmetic: + - * / // % ** and parentheses over numbers, e.g. calculator((2+3)*4).")
def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression safely (an ``ast`` walk, never ``eval``).

    Args:
        expression: e.g. ``"12*7"`` or ``"(2+3)*4"``.
    Returns:
        The value: ints as ints (``"84"``), floats rounded (see ``_format_number``).
    Raises:
        ToolError: for syntax errors, names, calls, attributes, non-numbers, |exponent| > 64, values over
            1e100, division by zero, or a complex result.
    """
    text = expression.strip()
    if not text:
        raise ToolError("calculator: empty expression")
    if len(text) > _MAX_EXPRESSION:
        raise ToolError(f"calculator: expression is {len(text)} characters, the limit is {_MAX_EXPRESSION}")
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError) as e:
        raise ToolError(f"calculator: cannot parse {text!r}: {e.msg if isinstance(e, SyntaxError) else e}") from None
    return _format_number(_evaluate(tree, text))


# ---------------------------------------------------------------------------------------------- lookup

def _normalise_key(key: str) -> str:
    key = key.strip()
    if len(key) >= 2 and key[0] == key[-1] and key[0] in "'\"":  # lookup("capital of France") quotes it
        key = key[1:-1]
    return " ".join(key.lower().split())


@lru_cache(maxsize=1)
def _knowledge() -> dict[str, str]:
    """The knowledge file as ``{normalised key: fact}``, read once."""
    try:
        raw = json.loads(KNOWLEDGE_PATH.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ArtifactError(str(KNOWLEDGE_PATH), f"cannot read the knowledge file: {e}") from None
    if not isinstance(raw, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in raw.items()):
        raise ArtifactError(str(KNOWLEDGE_PATH), "the knowledge file must be one JSON object of string -> string")
    facts = {_normalise_key(k): v for k, v in raw.items()}
    if len(facts) != len(raw):
        raise ArtifactError(str(KNOWLEDGE_PATH), "two keys are equal after lower-casing and whitespace normalisation")
    return facts


@register_tool("lookup", "A fact from the local knowledge file, e.g. lookup(capital of France).")
def lookup(key: str) -> str:
    """The fact stored under ``key`` (case-insensitive, whitespace-normalised exact match).

    Raises:
        ToolError: if the key is not in the knowledge file.
    """
    facts = _knowledge()
    norm = _normalise_key(key)
    if norm not in facts:
        raise ToolError(f"lookup: {norm!r} is not in the knowledge file {KNOWLEDGE_PATH.name}")
    return facts[norm]


# ---------------------------------------------------------------------------------------------- calls

@dataclass(frozen=True)
class CallRecord:
    """One executed call: the tool's ``result``, or the error message when ``ok`` is False."""

    name: str
    argument: str
    result: str
    ok: bool


def format_call(name: str, argument: str) -> str:
    """``<tool>name(argument)</tool>``."""
    return f"<tool>{name}({argument})</tool>"


def format_result(result: str) -> str:
    """``" -> " + result``, the text written right after a call's ``</tool>``."""
    return RESULT_SEP + result


def _run_call(name: str, argument: str) -> CallRecord:
    try:
        return CallRecord(name, argument, get_tool(name).run(argument), True)
    except ToolError as e:
        return CallRecord(name, argument, f"error: {e}", False)


def execute_calls(text: str) -> tuple[str, list[CallRecord]]:
    """Run every call in ``text`` not yet followed by ``" -> "`` and insert its result after ``</tool>``.

    A call whose tool raises :class:`ToolError` (unknown tool included) gets ``" -> error: <message>"``.
    Calls that already have a result are left alone and not recorded.

    Returns:
        ``(text with results, one CallRecord per executed call, in text order)``.
    """
    pieces: list[str] = []
    records: list[CallRecord] = []
    last = 0
    for m in CALL_RE.finditer(text):
        if text.startswith(RESULT_SEP, m.end()):
            continue
        record = _run_call(m["name"], m["arg"])
        records.append(record)
        pieces += [text[last:m.end()], format_result(record.result)]
        last = m.end()
    pieces.append(text[last:])
    return "".join(pieces), records


def run_with_tools(generate_fn: Callable[[str], str], prompt: str, *,
                   max_calls: int = 4) -> tuple[str, list[CallRecord]]:
    """The inference loop: generate; when the continuation ends with a call, run it, append the result, go on.

    Args:
        generate_fn: ``text -> continuation`` (e.g. ``functools.partial(greedy_generate, model, tokenizer,
            max_new_tokens=64)``); it should stop after ``</tool>`` and owns the per-step token budget.
        prompt: the starting text.
        max_calls: calls executed at most; a call generated after that is left without a result. The loop
            calls ``generate_fn`` at most ``max_calls + 1`` times.
    Returns:
        ``(prompt + everything generated + inserted results, the executed calls in order)``.
    Raises:
        ValueError: if ``max_calls`` is negative.
    """
    if max_calls < 0:
        raise ValueError(f"max_calls must be >= 0, got {max_calls}")
    text, records = prompt, []
    while True:
        continuation = generate_fn(text)
        text += continuation
        if not continuation or len(records) >= max_calls or not text.endswith("</tool>"):
            return text, records
        match = _final_call(text)
        if match is None:
            return text, records
        record = _run_call(match["name"], match["arg"])
        records.append(record)
        text += format_result(record.result)


def _final_call(text: str) -> re.Match | None:
    """The call that ends exactly at the end of ``text``, if any."""
    match = None
    for match in CALL_RE.finditer(text):
        pass
    return match if match is not None and match.end() == len(text) else None


def greedy_generate(model: Any, tokenizer: Any, text: str, max_new_tokens: int,
                    stop: Sequence[str] = ("</tool>",)) -> str:
    """Greedy (argmax) decoding without a KV cache: one full forward per new token.

    The input is ``[eos] + tokenizer.encode(text)`` when the tokenizer has ``eos_id`` (our training rows start
    with ``<|endoftext|>``, see ``phases/data/tasks.encode_task``). Decoding stops at ``eos``, when the decoded
    continuation ends with a ``stop`` string, or after ``max_new_tokens`` tokens.

    Args:
        model: a causal LM whose ``model(input_ids=...)`` returns ``.logits`` (B, T, V); set to eval mode
            for the call and restored after.
        tokenizer: ``encode(str) -> list[int]``, ``decode(list[int]) -> str``, optional ``eos_id``.
        text: the context.
        max_new_tokens: the most tokens to generate.
        stop: strings that end generation (kept in the output).
    Returns:
        The decoded continuation (without the context and without eos).
    Raises:
        ValueError: if ``max_new_tokens`` is negative.
    """
    import torch  # lazily: importing this module must stay light

    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    eos = getattr(tokenizer, "eos_id", None)
    ids = ([eos] if eos is not None else []) + list(tokenizer.encode(text))
    if not ids:
        raise ValueError("greedy_generate needs a non-empty context (text is empty and the tokenizer has no eos_id)")
    param = next(iter(model.parameters()), None)
    x = torch.tensor([ids], dtype=torch.long, device=param.device if param is not None else None)  # (1, T)
    new: list[int] = []
    continuation = ""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for _ in range(max_new_tokens):
                token = int(model(input_ids=x).logits[0, -1].argmax())
                if eos is not None and token == eos:
                    break
                new.append(token)
                x = torch.cat([x, x.new_tensor([[token]])], dim=1)
                continuation = tokenizer.decode(new)
                if any(continuation.endswith(s) for s in stop):
                    break
    finally:
        model.train(was_training)
    return continuation
