"""Toolformer's data step (phases/baking/tooldata.py) and the held-out tool evaluation (phases/baking/evaluate.py):
generated questions, rule-based candidates, the filter on a model that learned to use results, the result mask of
the fine-tune, and the batched inference loop against the one-prompt-at-a-time loop."""

from __future__ import annotations

from functools import partial
from types import SimpleNamespace

import pytest
import torch

from phases.baking.evaluate import evaluate_tools, strip_calls
from phases.baking.tooldata import (ToolQuestion, augmented_text, candidate_calls, encode_with_loss_mask,
                                    finetune_texts, make_questions, split_keys, toolformer_data)
from phases.baking.tools import CallRecord, _knowledge, execute_calls, get_tool, greedy_generate, run_with_tools
from phases.data import byte_tokenizer
from tests.phases.tiny_cognate import tiny_cognate

TOK = byte_tokenizer()


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def calc_q(a: int, word: str, b: int) -> ToolQuestion:
    op = {"plus": "+", "minus": "-", "times": "*"}[word]
    return ToolQuestion("calculator", f"What is {a} {word} {b}?", get_tool("calculator").run(f"{a}{op}{b}"),
                        f"{a}{op}{b}")


def lookup_q(key: str) -> ToolQuestion:
    return ToolQuestion("lookup", f"What is the {key}?", get_tool("lookup").run(key), key)


# Six questions a tiny model learns to answer through their calls (see the `trained` fixture).
QUESTIONS = [calc_q(12, "times", 7), calc_q(30, "plus", 5), calc_q(9, "minus", 4), calc_q(6, "times", 8),
             lookup_q("capital of france"), lookup_q("chemical symbol of gold")]


@pytest.fixture(scope="module")
def trained():
    """A tiny Cognate fine-tuned on the six questions' augmented texts (calls with results), results masked out
    of the loss: it learns to write the call and to copy the answer after the result."""
    model = tiny_cognate(0)
    texts = [augmented_text(q, q.tool, q.argument, q.answer) for q in QUESTIONS]
    losses = finetune_texts(model, TOK, texts, steps=150, lr=1e-2, batch_size=6, seed=0)
    return model, losses


def test_split_keys_deterministic_disjoint_and_complete():
    train, held = split_keys(0, 0.3)
    assert (train, held) == split_keys(0, 0.3)
    assert split_keys(1, 0.3) != (train, held)
    assert train and held and not set(train) & set(held)
    assert set(train) | set(held) == set(_knowledge())
    assert len(held) == round(0.3 * len(_knowledge()))
    assert len(split_keys(0, 0.001)[1]) == 1 and len(split_keys(0, 0.999)[0]) == 1
    with pytest.raises(ValueError, match="heldout_fraction"):
        split_keys(0, 1.0)


def test_make_questions_deterministic_balanced_correct_and_respects_exclude():
    train_keys, held_keys = split_keys(0, 0.3)
    held = make_questions(1, 10, keys=held_keys, max_operand=50)
    assert held == make_questions(1, 10, keys=held_keys, max_operand=50)
    assert held != make_questions(2, 10, keys=held_keys, max_operand=50)
    assert sorted(q.tool for q in held) == ["calculator"] * 5 + ["lookup"] * 5
    assert len({q.question for q in held}) == 10
    for q in held:
        assert get_tool(q.tool).run(q.argument) == q.answer
        assert q.prompt == f"Q: {q.question}\nA:" and q.text == f"Q: {q.question}\nA: {q.answer}\n"
        if q.tool == "lookup":
            assert q.argument in held_keys and q.question == f"What is the {q.argument}?"
    exclude = {q.question for q in held}
    train = make_questions(3, 60, keys=train_keys, max_operand=50, exclude=exclude)
    assert len(train) == 60 and not exclude & {q.question for q in train}
    assert not {q.argument for q in train if q.tool == "lookup"} & set(held_keys)
    few = make_questions(0, 6, keys=["capital of france", "capital of italy"], max_operand=9)  # lookups run out
    assert [q.tool for q in few].count("lookup") == 2 and [q.tool for q in few].count("calculator") == 4
    with pytest.raises(ValueError, match="only 4 distinct questions of 5"):  # 0+0, 0-0, 0*0 and one lookup
        make_questions(0, 5, keys=["capital of france"], max_operand=0)
    with pytest.raises(ValueError, match="calculator, lookup"):
        make_questions(0, 2, keys=train_keys, max_operand=9, tools=("python",))


def test_candidate_calls_propose_one_call_per_matching_tool_including_the_wrong_one():
    assert candidate_calls(calc_q(12, "times", 7)) == [("calculator", "12*7"), ("lookup", "12 times 7")]
    assert candidate_calls(calc_q(3, "minus", 10)) == [("calculator", "3-10"), ("lookup", "3 minus 10")]
    assert candidate_calls(lookup_q("capital of france")) == [("lookup", "capital of france")]
    _, (wrong,) = execute_calls("<tool>lookup(12 times 7)</tool>")
    assert not wrong.ok and "not in the knowledge file" in wrong.result


def test_loss_mask_leaves_out_exactly_the_tool_result():
    text = "Q: What is 12 times 7?\nA:<tool>calculator(12*7)</tool> -> 84 84\n"
    ids, target = encode_with_loss_mask(TOK, text)
    assert ids == [TOK.eos_id] + TOK.encode(text) and len(target) == len(ids)
    masked = "".join(TOK.decode([i]) for i, t in zip(ids[1:], target[1:]) if not t)
    assert masked == " -> 84" and not target[0]
    assert sum(not t for t in target) == 1 + len(" -> 84")
    kept = TOK.decode([i for i, t in zip(ids, target) if t])
    assert kept == "Q: What is 12 times 7?\nA:<tool>calculator(12*7)</tool> 84\n"
    _, unmasked = encode_with_loss_mask(TOK, text, mask_results=False)
    assert unmasked == [False] + [True] * (len(ids) - 1)
    _, no_result = encode_with_loss_mask(TOK, "A:<tool>calculator(1+1)</tool> 2\n")  # the model writes all of it
    assert no_result == [False] + [True] * len("A:<tool>calculator(1+1)</tool> 2\n")
    two = "<tool>lookup(capital of italy)</tool> -> Rome, <tool>calculator(2*3)</tool> -> 6 ok"
    ids2, target2 = encode_with_loss_mask(TOK, two)
    assert "".join(TOK.decode([i]) for i, t in zip(ids2[1:], target2[1:]) if not t) == " -> Rome -> 6"
    with pytest.raises(ValueError, match="not the tool's"):
        encode_with_loss_mask(TOK, "<tool>calculator(12*7)</tool> -> 85 85\n")


def test_finetune_texts_lowers_the_loss_repeats_under_the_seed_and_restores_the_mode(trained):
    _, losses = trained
    assert len(losses) == 150 and sum(losses[-10:]) / 10 < 0.5 * sum(losses[:10]) / 10
    texts = [q.text for q in QUESTIONS]
    runs = []
    for seed in (0, 0, 1):
        model = tiny_cognate(3)
        runs.append((finetune_texts(model, TOK, texts, steps=4, lr=1e-3, batch_size=2, seed=seed), model))
        assert not model.training
    assert runs[0][0] == runs[1][0] and torch.equal(runs[0][1].lm_head.weight, runs[1][1].lm_head.weight)
    assert runs[0][0] != runs[2][0]  # another seed, another batch order
    with pytest.raises(ValueError, match="steps"):
        finetune_texts(tiny_cognate(3), TOK, texts, steps=-1, lr=1e-3, batch_size=2, seed=0)


def test_toolformer_data_keeps_the_calls_the_model_uses_and_drops_the_others(trained):
    model, _ = trained
    data = toolformer_data(model, TOK, QUESTIONS, threshold=1.0)
    assert data.candidates == 4 * 2 + 2 and data.errors == 4  # each calculator question also proposes a lookup
    by_call = {(d["question"], d["tool"]): d for d in data.decisions}
    for q in QUESTIONS:
        right = by_call[(q.question, q.tool)]
        print(q.question, {k: round(v, 3) for k, v in right.items() if k.startswith(("loss", "gain"))})
        assert right["ok"] and right["result"] == q.answer and right["gain"] >= 1.0 and right["kept"]
        assert right["gain"] == pytest.approx(min(right["loss_plain"], right["loss_no_result"])
                                              - right["loss_with_result"])
        if q.tool == "calculator":
            wrong = by_call[(q.question, "lookup")]
            assert not wrong["ok"] and not wrong["kept"]
            assert wrong["gain"] < right["gain"]  # the error message helps less than the result
    assert data.kept == 6 and data.kept_by_tool == {"calculator": 4, "lookup": 2}
    assert data.texts == [augmented_text(q, q.tool, q.argument, q.answer) for q in QUESTIONS]
    summary = data.to_json()
    assert summary["kept"] == 6 and summary["errors"] == 4 and len(summary["decisions"]) == 10
    # The same filter on the untrained model keeps nothing: its results do not lower the loss by tau_f.
    base = toolformer_data(tiny_cognate(0), TOK, QUESTIONS, threshold=1.0)
    assert base.kept == 0 and base.texts == [q.text for q in QUESTIONS]
    assert toolformer_data(tiny_cognate(0), TOK, QUESTIONS, threshold=-1e9).kept == 6  # errors never kept


def test_strip_calls_cuts_calls_with_their_results():
    calc = CallRecord("calculator", "2+3", "5", True)
    assert strip_calls("<tool>calculator(2+3)</tool> -> 5 5\n", [calc]) == " 5\n"
    assert strip_calls("x <tool>calculator(2+3)</tool> -> 5 y <tool>lookup(a)</tool>", [calc]) == "x  y "
    assert strip_calls(" 5 -> 5", []) == " 5 -> 5"


class ScriptedLM(torch.nn.Module):
    """A fake causal LM over bytes: after a known prompt it writes its script byte by byte (the tool loop inserts
    the results, which the scripts contain), then eos."""

    def __init__(self, scripts: dict[str, str]):
        super().__init__()
        self.scripts = scripts
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # for the device

    def forward(self, input_ids, **_):
        logits = torch.zeros(*input_ids.shape, 258)
        for b, row in enumerate(input_ids.tolist()):
            for p in range(len(row)):
                text, nxt = TOK.decode(row[1:p + 1]), TOK.eos_id
                for prompt, script in self.scripts.items():
                    done = text[len(prompt):]
                    if text.startswith(prompt) and script.startswith(done) and len(done) < len(script):
                        nxt = TOK.encode(script[len(done)])[0]
                logits[b, p, nxt] = 1.0
        return SimpleNamespace(logits=logits)


def test_evaluate_tools_scores_scripted_transcripts_exactly():
    q1, q2, q3, q4 = calc_q(2, "plus", 3), lookup_q("capital of france"), calc_q(3, "times", 4), calc_q(3, "plus", 4)
    wrong, _ = execute_calls("<tool>lookup(3 plus 4)</tool>")
    model = ScriptedLM({q1.prompt: "<tool>calculator(2+3)</tool> -> 5 5\n",  # right call, right answer
                        q2.prompt: "<tool>lookup(capital of france)</tool> -> Paris Rome\n",  # right call, wrong answer
                        q3.prompt: " 12\n",  # no call, right answer
                        q4.prompt: wrong + "<tool>calculator(3+4)</tool> -> 7 7\n"})  # wrong tool first
    r = evaluate_tools(model, TOK, [q1, q2, q3, q4])
    assert [t["answer"] for t in r["transcripts"]] == ["5", "Rome", "12", "7"]
    assert (r["n"], r["tool_call_accuracy"], r["task_accuracy"]) == (4, 0.5, 0.75)
    assert r["tool_choice_accuracy"] == 0.5  # q3 made no call, q4's first call named the wrong tool
    assert (r["calls_per_prompt"], r["calls_when_correct"]) == (1.0, 1.0)
    assert r["per_tool"]["lookup"] == {"n": 1, "tool_call_accuracy": 1.0, "tool_choice_accuracy": 1.0,
                                       "task_accuracy": 0.0, "calls_per_prompt": 1.0, "calls_when_correct": None}
    assert r["per_tool"]["calculator"]["tool_call_accuracy"] == pytest.approx(1 / 3)
    assert [len(t["calls"]) for t in r["transcripts"]] == [1, 1, 0, 2] and not r["transcripts"][3]["calls"][0]["ok"]
    limited = evaluate_tools(model, TOK, [q4], max_calls=1)  # the second call is written but not executed
    assert limited["calls_per_prompt"] == 1.0 and limited["transcripts"][0]["output"].endswith("calculator(3+4)</tool>")


def test_evaluate_tools_on_a_trained_tiny_model_matches_the_one_prompt_loop(trained):
    model, _ = trained
    r = evaluate_tools(model, TOK, QUESTIONS)
    print({k: v for k, v in r.items() if k != "transcripts"})
    gen = partial(greedy_generate, model, TOK, max_new_tokens=48, stop=("</tool>", "\n"))
    for q, t in zip(QUESTIONS, r["transcripts"]):
        text, records = run_with_tools(gen, q.prompt, max_calls=2)
        assert t["output"] == text[len(q.prompt):]
        assert [c["result"] for c in t["calls"]] == [rec.result for rec in records]
    assert r["tool_call_accuracy"] >= 0.5 and r["calls_per_prompt"] >= 0.5  # the six questions were trained
    n_correct = sum(t["answer"] == t["expected"] for t in r["transcripts"])
    assert r["task_accuracy"] == n_correct / 6
    fresh = evaluate_tools(tiny_cognate(0), TOK, QUESTIONS[:2], max_new_tokens=8)
    assert fresh["tool_call_accuracy"] == 0.0 and fresh["calls_when_correct"] is None
