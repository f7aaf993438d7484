"""Phase 6 tools (phases/baking/tools.py) and Toolformer's filter (phases/baking/toolformer.py)."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from phases.baking.toolformer import FilterDecision, filter_calls, keep_call, weighted_loss, weights
from phases.baking.tools import (CALL_RE, TOOLS, CallRecord, ToolError, execute_calls, format_call, format_result,
                                 get_tool, greedy_generate, run_with_tools)
from phases.data import byte_tokenizer
from phases.data.tasks import make_task
from tests.phases.tiny_cognate import tiny_cognate

ROOT = Path(__file__).resolve().parents[2]
VOCAB = 258  # the byte tokenizer: 256 bytes, <|endoftext|> = 256, <|pad|> = 257


def calc(expression: str) -> str:
    return get_tool("calculator").run(expression)


# ---------------------------------------------------------------------------------------------- tools

@pytest.mark.parametrize("expression, expected", [
    ("12*7", "84"), ("(2+3)*4", "20"), ("7/2", "3.5"), ("2**10", "1024"), ("-3+5", "2"), ("8/2", "4"),
    ("1/3", "0.333333"), ("10//3", "3"), ("-7 % 3", "2"), ("2**-1", "0.5"), (" 0.1 + 0.2 ", "0.3"),
])
def test_calculator_golden_values(expression, expected):
    assert calc(expression) == expected


@pytest.mark.parametrize("expression, problem", [
    ("__import__('os')", "function calls are not allowed"),
    ("a+1", "names are not allowed"),
    ("x", "names are not allowed"),
    ("(1).real", "attributes are not allowed"),
    ("1/0", "division by zero"),
    ("5 % 0", "division by zero"),
    ("2**10000", "exponent 10000 exceeds"),
    ("1e99 * 1e99", "magnitude limit"),
    ('"x"', "only int and float numbers"),
    ("(-8)**0.5", "no real-number result"),
    ("1 +", "cannot parse"),
    ("", "empty expression"),
])
def test_calculator_rejects_with_a_message_naming_the_problem(expression, problem):
    with pytest.raises(ToolError, match=problem.replace("(", r"\(").replace("*", r"\*")):
        calc(expression)


def test_lookup_matches_case_and_whitespace_insensitively_and_names_unknown_keys():
    lookup = get_tool("lookup")
    assert lookup.run("capital of France") == "Paris"
    assert lookup.run("  CAPITAL   of\tfrance ") == "Paris"
    assert lookup.run("Chemical symbol of gold") == "Au"
    with pytest.raises(ToolError, match=r"'capital of atlantis' is not in the knowledge file knowledge\.json"):
        lookup.run("Capital of Atlantis")


def test_registry_lists_valid_names_for_an_unknown_tool():
    assert {"calculator", "lookup"} <= set(TOOLS)
    assert TOOLS["calculator"].description
    with pytest.raises(ToolError, match="unknown tool 'python'; valid tools: calculator, lookup"):
        get_tool("python")


def test_importing_tools_does_not_import_torch():
    code = "import sys, phases.baking, phases.baking.tools; assert 'torch' not in sys.modules, 'torch imported'"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          check=False)
    assert proc.returncode == 0, proc.stderr


# ---------------------------------------------------------------------------------------------- calls

def test_call_format_matches_the_generated_tool_tasks():
    rng = np.random.default_rng(0)
    for _ in range(20):
        task = make_task("tool", rng, max_operand=99, max_modulus=7)
        assert CALL_RE.fullmatch(task.answer)
        assert execute_calls(task.prompt + task.answer)[0] == task.text  # same call and result format
    assert format_call("calculator", "12*7") + format_result("84") == "<tool>calculator(12*7)</tool> -> 84"


def test_execute_calls_inserts_results_skips_answered_calls_and_reports_errors():
    text = ("A <tool>calculator((2+3)*4)</tool>. B <tool>calculator(1+1)</tool> -> 2. "
            "C <tool>lookup(capital of Peru)</tool><tool>calculator(1/0)</tool><tool>python(1)</tool>")
    out, records = execute_calls(text)
    assert out == ("A <tool>calculator((2+3)*4)</tool> -> 20. B <tool>calculator(1+1)</tool> -> 2. "
                   "C <tool>lookup(capital of Peru)</tool> -> Lima<tool>calculator(1/0)</tool> -> error: calculator: "
                   "division by zero in '1/0'<tool>python(1)</tool> -> error: unknown tool 'python'; valid tools: "
                   "calculator, lookup")
    assert records[:2] == [CallRecord("calculator", "(2+3)*4", "20", True), CallRecord("lookup", "capital of Peru",
                                                                                       "Lima", True)]
    assert [r.ok for r in records] == [True, True, False, False]
    assert execute_calls(out) == (out, [])  # idempotent: every call now has a result


def test_execute_calls_does_not_let_a_broken_call_swallow_the_next():
    out, records = execute_calls("<tool>calculator(1+</tool> and <tool>calculator(2*3)</tool>")
    assert out == "<tool>calculator(1+</tool> and <tool>calculator(2*3)</tool> -> 6"
    assert records == [CallRecord("calculator", "2*3", "6", True)]


def _scripted(continuations: list[str]):
    seen: list[str] = []

    def generate(text: str) -> str:
        seen.append(text)
        return continuations[len(seen) - 1] if len(seen) <= len(continuations) else ""

    return generate, seen


SCRIPT = ["<tool>calculator(12*7)</tool>", " so 84. Also <tool>lookup(capital of France)</tool>", " done.",
          " never reached"]


def test_run_with_tools_executes_calls_in_order():
    generate, seen = _scripted(SCRIPT)
    text, records = run_with_tools(generate, "Q: ")
    assert text == ("Q: <tool>calculator(12*7)</tool> -> 84 so 84. Also <tool>lookup(capital of France)</tool>"
                    " -> Paris done.")
    assert [(r.name, r.result) for r in records] == [("calculator", "84"), ("lookup", "Paris")]
    assert len(seen) == 3 and seen[1].endswith("</tool> -> 84")  # the model sees each result before going on


def test_run_with_tools_stops_at_max_calls():
    generate, seen = _scripted(SCRIPT)
    text, records = run_with_tools(generate, "Q: ", max_calls=1)
    assert [r.result for r in records] == ["84"]
    assert len(seen) == 2 and text.endswith("<tool>lookup(capital of France)</tool>")  # second call not run
    generate, seen = _scripted(SCRIPT)
    assert run_with_tools(generate, "Q: ", max_calls=0) == ("Q: <tool>calculator(12*7)</tool>", [])
    with pytest.raises(ValueError, match="max_calls"):
        run_with_tools(generate, "Q: ", max_calls=-1)


# ---------------------------------------------------------------------------------------------- greedy_generate

class _ScriptLM(torch.nn.Module):
    """Emits ``script[k]`` as its k-th new token (k = input length - ``start``), whatever the context."""

    def __init__(self, script: list[int], start: int):
        super().__init__()
        self.script, self.start = script, start
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    def forward(self, input_ids: torch.Tensor) -> SimpleNamespace:
        logits = torch.zeros(*input_ids.shape, VOCAB)  # (B, T, V)
        k = min(input_ids.shape[1] - self.start, len(self.script) - 1)
        logits[:, -1, self.script[k]] = 1.0
        return SimpleNamespace(logits=logits)


class _Counting(torch.nn.Module):
    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner, self.calls = inner, 0

    def forward(self, input_ids: torch.Tensor):
        self.calls += 1
        return self.inner(input_ids=input_ids)


def test_greedy_generate_on_tiny_cognate_is_deterministic_and_respects_max_new_tokens():
    tok = byte_tokenizer()
    model = _Counting(tiny_cognate())
    model.train()
    out = greedy_generate(model, tok, "What is 12 times 7? ", max_new_tokens=6)
    assert isinstance(out, str) and 1 <= model.calls <= 6
    assert model.training  # mode restored
    assert greedy_generate(model, tok, "What is 12 times 7? ", max_new_tokens=6) == out
    assert greedy_generate(model, tok, "What is 12 times 7? ", max_new_tokens=0) == ""


def test_greedy_generate_stops_at_stop_strings_and_eos():
    tok = byte_tokenizer()
    prompt = "Q: "
    start = 1 + len(tok.encode(prompt))  # eos + prompt
    model = _ScriptLM(tok.encode("calculator(1+2)</tool> more"), start)
    assert greedy_generate(model, tok, prompt, max_new_tokens=50) == "calculator(1+2)</tool>"
    assert greedy_generate(model, tok, prompt, max_new_tokens=4) == "calc"
    model = _ScriptLM(tok.encode("ok") + [tok.eos_id] + tok.encode("zzz"), start)
    assert greedy_generate(model, tok, prompt, max_new_tokens=50) == "ok"


# ---------------------------------------------------------------------------------------------- toolformer

def test_weights_golden_values():
    assert torch.allclose(weights(1), torch.tensor([1.0], dtype=torch.float64))
    assert torch.allclose(weights(3), torch.tensor([1.0, 0.8, 0.6], dtype=torch.float64) / 2.4)
    w7 = weights(7)
    assert torch.allclose(w7, torch.tensor([1.0, 0.8, 0.6, 0.4, 0.2, 0.0, 0.0], dtype=torch.float64) / 3.0)
    assert w7.dtype == torch.float64 and float(w7.sum()) == pytest.approx(1.0) and (w7[5:] == 0).all()
    with pytest.raises(ValueError):
        weights(0)


BOOST = 8.0


class _EightyFourLM(torch.nn.Module):
    """A causal "LM" with a known answer: uniform logits over the byte vocab, except that 'Y' gets logit
    ``BOOST`` at every position whose context (up to and including it) contains the bytes "84" side by side.
    So text after " -> 84" starting with 'Y' is likely only when the result is present."""

    def __init__(self):
        super().__init__()
        self.boost = torch.nn.Parameter(torch.tensor(BOOST))

    def forward(self, input_ids: torch.Tensor) -> SimpleNamespace:
        pair = (input_ids[:, :-1] == ord("8")) & (input_ids[:, 1:] == ord("4"))  # (B, T-1): "84" ends at t+1
        seen = torch.cat([torch.zeros_like(pair[:, :1]), pair], 1).long().cummax(1).values  # (B, T)
        logits = torch.zeros(*input_ids.shape, VOCAB)  # (B, T, V)
        logits[..., ord("Y")] = self.boost * seen
        return SimpleNamespace(logits=logits)


# With "84" in context: p(Y) = e^B / (e^B + 257), any other byte 1 / (e^B + 257); without it 1 / 258.
LOG_Z = math.log(math.exp(BOOST) + VOCAB - 1)


def test_weighted_loss_equals_a_hand_computed_sum():
    model = _EightyFourLM()
    tok = byte_tokenizer()
    prefix = tok.encode("x84")
    # 2 tokens: w = (1, 0.8) / 1.8; -log p(Y) = LOG_Z - BOOST, -log p(Z) = LOG_Z.
    expected = (1.0 * (LOG_Z - BOOST) + 0.8 * LOG_Z) / 1.8
    assert weighted_loss(model, prefix, tok.encode("YZ")) == pytest.approx(expected, rel=1e-12)
    assert weighted_loss(model, tok.encode("x85"), tok.encode("YZ")) == pytest.approx(math.log(VOCAB), rel=1e-12)
    # Past five tokens the weights are zero: "YZYZY" + anything scores the same.
    five = (1.0 * (LOG_Z - BOOST) + 0.8 * LOG_Z + 0.6 * (LOG_Z - BOOST) + 0.4 * LOG_Z + 0.2 * (LOG_Z - BOOST)) / 3.0
    assert weighted_loss(model, prefix, tok.encode("YZYZYZZZ")) == pytest.approx(five, rel=1e-12)
    with pytest.raises(ValueError, match="non-empty"):
        weighted_loss(model, [], tok.encode("Y"))


def test_keep_call_keeps_a_call_whose_result_helps_and_rejects_otherwise():
    model = _EightyFourLM()
    model.train()
    tok = byte_tokenizer()
    before, call, after = "What is 12 times 7? ", format_call("calculator", "12*7"), "YZ"
    decision = keep_call(model, tok, before, call, "84", after)
    with_result = (1.0 * (LOG_Z - BOOST) + 0.8 * LOG_Z) / 1.8
    assert decision.loss_plain == pytest.approx(math.log(VOCAB), rel=1e-12)
    assert decision.loss_no_result == pytest.approx(math.log(VOCAB), rel=1e-12)
    assert decision.loss_with_result == pytest.approx(with_result, rel=1e-12)
    assert decision.gain == pytest.approx(math.log(VOCAB) - with_result, rel=1e-12)
    assert decision.gain > 1.0 and decision.keep  # gain is about 1.92
    assert model.training  # mode restored
    assert not keep_call(model, tok, before, call, "84", after, threshold=2.0).keep  # threshold above the gain
    wrong = keep_call(model, tok, before, call, "85", after)
    assert wrong.gain == pytest.approx(0.0, abs=1e-12) and not wrong.keep
    decisions = filter_calls(model, tok, [(before, call, "84", after), (before, call, "85", after)])
    assert decisions == [decision, wrong] and all(isinstance(d, FilterDecision) for d in decisions)
