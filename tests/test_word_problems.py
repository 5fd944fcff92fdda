"""benchmarks/word_problems.py: seeded multi-step word problems with exact integer answers.

- Determinism by seed; different seeds give different problems; a dataset has distinct questions.
- Every answer equals an independent re-computation: from the operations (a table of this test's
  own), and from the reference chain's text (each line ``a op b = c`` evaluated, each line starting
  from the previous result); every intermediate is a positive integer <= MAX_VALUE.
- 3 to 8 steps (drawn, or as asked); every operand is stated in the question; one sentence per step.
- The prompt goes through the chat template with the same user message accuracy.py builds, and
  grading uses accuracy.py's answer extraction.
- Bad arguments raise errors naming the parameter.
"""

from __future__ import annotations

import json
import re
import sys
from fractions import Fraction
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
try:
    import accuracy
    import word_problems as wp
finally:
    sys.path.remove(str(ROOT / "benchmarks"))

RECOMPUTE = {  # this test's own reading of each operation
    "pack": lambda x, a: a[0] * a[1],
    "gain": lambda x, a: x + a[0], "earn": lambda x, a: x + a[0],
    "lose": lambda x, a: x - a[0], "spend": lambda x, a: x - a[0],
    "times": lambda x, a: x * a[0], "sell": lambda x, a: x * a[0],
    "share": lambda x, a: Fraction(x, a[0]), "split_money": lambda x, a: Fraction(x, a[0]),
    "rate": lambda x, a: Fraction(x, a[0]),
    "percent": lambda x, a: x - Fraction(x * a[0], 100),
}
LINE = re.compile(r"^(\d+) ([-+*/]) (\d+) = (\d+)$")
PERCENT_LINE = re.compile(r"^(\d+) - (\d+) \* (\d+) / 100 = (\d+)$")


def _check(p: wp.WordProblem) -> None:
    assert wp.MIN_STEPS <= p.n_steps <= wp.MAX_STEPS
    x = 0
    for s in p.steps:
        y = RECOMPUTE[s.op](x, s.args)
        assert y == s.after and s.before == x
        assert isinstance(s.after, int) and 1 <= s.after <= wp.MAX_VALUE
        x = int(y)
    assert x == p.answer
    # the chain's text, evaluated on its own
    prev = None
    for line in p.cot:
        m = PERCENT_LINE.match(line)
        if m:
            a, a2, k, c = map(int, m.groups())
            assert a == a2 and a - Fraction(a * k, 100) == c
        else:
            a, op, b, c = LINE.match(line).groups()
            a, b, c = int(a), int(b), int(c)
            assert {"+": a + b, "-": a - b, "*": a * b, "/": Fraction(a, b)}[op] == c
        assert prev is None or a == prev
        prev = c
    assert prev == p.answer
    # every operand is stated; one sentence per step plus the question
    for s in p.steps:
        for v in s.args:
            assert re.search(rf"\b{v}\b", s.text), (v, s.text)
        assert s.text in p.question
    assert p.question.count("?") == 1 and p.question.endswith("?")
    if p.steps[-1].unit == "hours":
        assert "How many hours" in p.question
    elif p.steps[-1].unit == "dollars":
        assert "How many dollars" in p.question


@given(st.integers(min_value=0, max_value=2**40))
def test_answers_equal_a_recomputation(seed):
    _check(wp.make_problem(seed))


@given(st.integers(min_value=0, max_value=2**31), st.integers(min_value=wp.MIN_STEPS, max_value=wp.MAX_STEPS))
def test_the_step_count_asked_for(seed, steps):
    p = wp.make_problem(seed, steps)
    assert p.n_steps == steps
    _check(p)


def test_every_step_count_and_operation_occurs():
    problems = wp.dataset(600, seed=1)
    assert {p.n_steps for p in problems} == set(range(wp.MIN_STEPS, wp.MAX_STEPS + 1))
    assert {s.op for p in problems for s in p.steps} == set(wp.OPS)
    assert {p.steps[-1].unit for p in problems} >= {"dollars", "hours"}
    assert len({p.answer for p in problems}) > 200


def test_determinism_and_distinct_problems():
    assert wp.make_problem(7) == wp.make_problem(7)
    assert wp.dataset(50, seed=3) == wp.dataset(50, seed=3)
    assert [p.question for p in wp.dataset(50, seed=3)] != [p.question for p in wp.dataset(50, seed=4)]
    problems = wp.dataset(500, seed=0)
    assert len({p.question for p in problems}) == 500
    assert wp.dataset(0) == []


def test_bad_arguments():
    for bad in (2, 9, 0, -3):
        with pytest.raises(ValueError, match=rf"steps={bad} is out of range; allowed values: 3..8"):
            wp.make_problem(0, bad)
    with pytest.raises(TypeError, match="steps must be an int"):
        wp.make_problem(0, "4")
    with pytest.raises(TypeError, match="seed must be an int"):
        wp.make_problem(1.5)
    with pytest.raises(ValueError, match="n=-1 must be >= 0"):
        wp.dataset(-1)
    with pytest.raises(ValueError, match="steps=12"):
        wp.dataset(3, steps=12)
    with pytest.raises(ValueError, match="op='pow'; allowed values"):
        wp.apply_op("pow", 2, (3,))
    with pytest.raises(ValueError, match="not divisible"):
        wp.apply_op("share", 7, (2,))


def test_jsonl_rows_load_in_accuracy(tmp_path):
    path = tmp_path / "p.jsonl"
    assert wp.main(["--n", "4", "--seed", "2", "--out", str(path)]) == 0
    rows = accuracy.load_problems(path)
    problems = wp.dataset(4, seed=2)
    assert [r["question"] for r in rows] == [p.question for p in problems]
    assert [r["answer"] for r in rows] == [str(p.answer) for p in problems]
    assert all("cot" not in r for r in rows)  # would make accuracy.py diagnose them as testbed problems
    assert json.loads(path.read_text().splitlines()[0])["chain"] == problems[0].cot


@pytest.fixture(scope="module")
def chat_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    from transformers import PreTrainedTokenizerFast

    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {c: i for i, c in enumerate(bytes_to_unicode().values())}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>",
                                  additional_special_tokens=["<|im_start|>"])
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                         "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    return tok


def test_prompt_uses_the_chat_template_like_accuracy(chat_tokenizer):
    p = wp.make_problem(11)
    text = wp.build_prompt(chat_tokenizer, p)
    assert text == (f"<|im_start|>user\n{p.question}\n{accuracy.DEFAULT_INSTRUCTION}<|im_end|>\n"
                    "<|im_start|>assistant\n")
    assert "step by step" in text and "\\boxed{}" in text
    ids = chat_tokenizer(text, add_special_tokens=False).input_ids
    row = {"question": p.question, "answer": str(p.answer)}
    assert accuracy.build_prompts(chat_tokenizer, [row], "chat", accuracy.DEFAULT_INSTRUCTION) == [ids]
    assert wp.build_prompt(chat_tokenizer, "What is 2+2?", instruction="Answer.").endswith(
        "user\nWhat is 2+2?\nAnswer.<|im_end|>\n<|im_start|>assistant\n")
    chat_tokenizer_without = type(chat_tokenizer)(tokenizer_object=chat_tokenizer.backend_tokenizer)
    with pytest.raises(ValueError, match="chat_template"):
        wp.build_prompt(chat_tokenizer_without, p)
    with pytest.raises(TypeError, match="problem must be"):
        wp.build_prompt(chat_tokenizer, 3)


def test_grading_uses_accuracy_extraction():
    p = wp.make_problem(5)
    ans = p.answer
    assert wp.is_correct(p, f"... so the total is {ans - 1} at first, then \\boxed{{{ans}}}")
    assert wp.is_correct(p, f"\\boxed{{{ans:,}}}") or ans < 1000
    assert not wp.is_correct(p, f"\\boxed{{{ans + 1}}} although {ans} appeared")
    assert wp.is_correct(p, f"The answer is {ans}.")  # no box: the last number
    assert not wp.is_correct(p, "I don't know")
