"""Seeded grade-school word problems with 3 to 8 arithmetic steps and exact integer answers.

    python benchmarks/word_problems.py --n 200 --seed 0 --out problems.jsonl   # for accuracy.py --problems
    python benchmarks/word_problems.py --n 3 --seed 0                         # print a few

Each problem follows one person through a chain of operations on a running quantity: buying packs of
items (a product), gifts and losses (sums, differences), growth (a multiple), sharing into equal boxes
(an exact quotient), selling a percentage, selling everything at a price (the unit becomes dollars,
then spending and sharing money), or working through the items at a rate per hour (the unit becomes
hours; always last). Every step is one operation whose result is a positive integer <= ``MAX_VALUE``,
so the answer and every intermediate are exact. ``steps`` counts the operations.

:func:`build_prompt` renders a problem with the tokenizer's chat template, in the same user message
as ``benchmarks/accuracy.py`` (question, newline, "Please reason step by step, and put your final
answer within \\boxed{}."); :func:`is_correct` grades a model's output with ``accuracy.extract_answer``
and ``accuracy.answers_match`` (last ``\\boxed{}``, else the last number).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

MIN_STEPS, MAX_STEPS = 3, 8
MAX_VALUE = 5000

NAMES = [("Maya", "she"), ("Liam", "he"), ("Sofia", "she"), ("Noah", "he"), ("Aisha", "she"), ("Ethan", "he"),
         ("Priya", "she"), ("Mateo", "he"), ("Hana", "she"), ("Omar", "he"), ("Elena", "she"), ("Kofi", "he"),
         ("Grace", "she"), ("Diego", "he"), ("Yuki", "she"), ("Lucas", "he"), ("Amara", "she"), ("Ravi", "he"),
         ("Chloe", "she"), ("Jonas", "he")]
# (singular, plural, container)
ITEMS = [("marble", "marbles", "bag"), ("sticker", "stickers", "sheet"), ("apple", "apples", "crate"),
         ("pencil", "pencils", "box"), ("cookie", "cookies", "tray"), ("card", "cards", "pack"),
         ("bead", "beads", "jar"), ("egg", "eggs", "carton"), ("book", "books", "shelf"),
         ("shell", "shells", "bucket"), ("cupcake", "cupcakes", "batch"), ("stamp", "stamps", "album page")]
THINGS = ["a new backpack", "lunch", "a bus ticket", "a birthday gift", "paint", "a movie ticket", "seeds",
          "a kite"]
CHORES = ["washing cars", "walking dogs", "mowing lawns", "babysitting", "tutoring"]
PERCENTS = (10, 20, 25, 40, 50, 75)

OPS = ("pack", "gain", "lose", "times", "share", "percent", "sell", "spend", "earn", "split_money", "rate")


@dataclass(frozen=True)
class Step:
    op: str              # one of OPS
    args: tuple          # the integers the operation uses (besides the running value)
    before: int          # the running value before this step (0 for the first)
    after: int           # the running value after it
    unit: str            # the unit of ``after``: the item plural, "dollars" or "hours"
    text: str            # the sentence stating the step
    line: str            # the reference arithmetic, e.g. "48 - 7 = 41"


@dataclass(frozen=True)
class WordProblem:
    seed: int
    question: str
    answer: int
    steps: tuple[Step, ...] = field(repr=False)

    @property
    def n_steps(self) -> int:
        return len(self.steps)

    @property
    def cot(self) -> list[str]:
        return [s.line for s in self.steps]

    def to_json(self) -> dict:
        """A row for ``accuracy.py --problems``: question, answer (a string) and the reference chain (key "chain": a "cot" key would make accuracy.py treat the row as a testbed problem)."""
        return {"question": self.question, "answer": str(self.answer), "steps": self.n_steps, "seed": self.seed,
                "chain": self.cot, "ops": [[s.op, list(s.args)] for s in self.steps]}


def apply_op(op: str, value: int, args: tuple) -> int:
    """The result of one step (raises ValueError when it is not a positive integer)."""
    if op == "pack":
        out = args[0] * args[1]
    elif op in ("gain", "earn"):
        out = value + args[0]
    elif op in ("lose", "spend"):
        out = value - args[0]
    elif op == "times":
        out = value * args[0]
    elif op in ("share", "split_money", "rate"):
        if value % args[0]:
            raise ValueError(f"{op}: {value} is not divisible by {args[0]}")
        out = value // args[0]
    elif op == "percent":
        if value * args[0] % 100:
            raise ValueError(f"percent: {args[0]}% of {value} is not an integer")
        out = value - value * args[0] // 100
    elif op == "sell":
        out = value * args[0]
    else:
        raise ValueError(f"op={op!r}; allowed values: {OPS}")
    if out <= 0:
        raise ValueError(f"{op}{args} on {value} gives {out}, not a positive integer")
    return out


def _check_steps(name: str, value) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if not MIN_STEPS <= value <= MAX_STEPS:
        raise ValueError(f"{name}={value} is out of range; allowed values: {MIN_STEPS}..{MAX_STEPS}")
    return value


def _candidates(rng: random.Random, unit_kind: str, x: int, last: bool, sold: bool):
    """(op, args) proposals valid for the running value ``x``."""
    out = []
    if unit_kind == "items":
        if x + 2 <= MAX_VALUE:
            out.append(("gain", (rng.randint(2, min(40, MAX_VALUE - x)),)))
        if x > 2:
            out.append(("lose", (rng.randint(1, min(x - 1, 40)),)))
        if x * 5 <= MAX_VALUE:
            out.append(("times", (rng.randint(2, min(5, MAX_VALUE // x)),)))
        divisors = [k for k in range(2, 10) if x % k == 0 and x // k >= 2]
        if divisors:
            out.append(("share", (rng.choice(divisors),)))
        pcts = [p for p in PERCENTS if x * p % 100 == 0 and x - x * p // 100 >= 1]
        if pcts:
            out.append(("percent", (rng.choice(pcts),)))
        if not sold and x * 2 <= MAX_VALUE and rng.random() < 0.5:
            out.append(("sell", (rng.randint(2, min(12, MAX_VALUE // x)),)))
        rates = [r for r in range(2, 13) if x % r == 0]
        if last and rates:
            out.append(("rate", (rng.choice(rates),)))
    else:  # dollars
        if x + 5 <= MAX_VALUE:
            out.append(("earn", (rng.randint(5, min(60, MAX_VALUE - x)),)))
        if x > 5:
            out.append(("spend", (rng.randint(1, min(x - 1, 60)),)))
        divisors = [k for k in range(2, 7) if x % k == 0]
        if divisors:
            out.append(("split_money", (rng.choice(divisors),)))
    return out


def make_problem(seed: int, steps: int | None = None) -> WordProblem:
    """One problem, a function of ``seed`` (and ``steps``: drawn from 3..8 when None)."""
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    rng = random.Random(seed)
    n = rng.randint(MIN_STEPS, MAX_STEPS) if steps is None else _check_steps("steps", steps)
    (name, he), *others = rng.sample(NAMES, 4)
    friends = [o[0] for o in others]
    his = {"she": "her", "he": "his"}[he]
    him = {"she": "her", "he": "him"}[he]
    He = he.capitalize()
    item, items, box = rng.choice(ITEMS)
    a, b = rng.randint(2, 12), rng.randint(3, 24)
    x = apply_op("pack", 0, (a, b))
    boxes = box + ("es" if box.endswith(("x", "ch", "sh")) else "s")
    if box == "shelf":
        boxes = "shelves"
    chain = [Step("pack", (a, b), 0, x, items, f"{name} has {a} {boxes} of {items} with {b} {items} on each {box}."
                  if box == "shelf" else f"{name} buys {a} {boxes} of {items}, and each {box} holds {b} {items}.",
                  f"{a} * {b} = {x}")]
    unit_kind, sold = "items", False
    for i in range(1, n):
        last = i == n - 1
        op, args = rng.choice(_candidates(rng, unit_kind, x, last, sold))
        y = apply_op(op, x, args)
        k = args[0]
        friend = rng.choice(friends)
        text, unit = {
            "gain": (f"{friend} gives {him} {k} more {items}.", items),
            "lose": (rng.choice([f"{He} gives {k} {items} to {friend}.", f"{He} loses {k} of the {items}."]), items),
            "times": (f"By the end of the month {he} has {k} times as many {items} as that.", items),
            "share": (f"{He} splits the {items} equally among {k} people, including {him}self, and keeps {his} share.",
                      items),
            "percent": (f"{He} sells {k}% of the {items} at a school fair.", items),
            "sell": (f"{He} then sells all of {his} {items} for {k} dollars each.", "dollars"),
            "spend": (f"{He} spends {k} dollars on {rng.choice(THINGS)}.", "dollars"),
            "earn": (f"{He} earns {k} more dollars {rng.choice(CHORES)}.", "dollars"),
            "split_money": (f"{He} shares the money equally among {k} people, including {him}self, and keeps {his} part.",
                            "dollars"),
            "rate": (f"{He} wraps the {items} as gifts at a steady rate of {k} {items} per hour until all are wrapped.",
                     "hours"),
        }[op]
        sign = {"gain": "+", "earn": "+", "lose": "-", "spend": "-", "times": "*", "sell": "*", "share": "/",
                "split_money": "/", "rate": "/"}.get(op)
        line = f"{x} - {x} * {k} / 100 = {y}" if op == "percent" else f"{x} {sign} {k} = {y}"
        chain.append(Step(op, args, x, y, unit, text, line))
        x = y
        if op == "sell":
            unit_kind, sold = "dollars", True
    final = chain[-1]
    question = {
        "dollars": f"How many dollars does {name} have now?",
        "hours": f"How many hours does {name} spend wrapping?",
    }.get(final.unit, f"How many {items} does {name} have now?")
    text = " ".join(s.text for s in chain) + " " + question
    return WordProblem(seed=seed, question=text, answer=x, steps=tuple(chain))


def dataset(n: int, seed: int = 0, steps: int | None = None) -> list[WordProblem]:
    """``n`` distinct problems (by question text), a function of ``seed``; problem ``i`` is
    ``make_problem(seed * 1_000_003 + j)`` for increasing ``j``, skipping repeats."""
    if not isinstance(n, int) or isinstance(n, bool):
        raise TypeError(f"n must be an int, got {type(n).__name__}")
    if n < 0:
        raise ValueError(f"n={n} must be >= 0")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    if steps is not None:
        _check_steps("steps", steps)
    out, seen, j = [], set(), 0
    while len(out) < n:
        p = make_problem(seed * 1_000_003 + j, steps)
        j += 1
        if p.question not in seen:
            seen.add(p.question)
            out.append(p)
    return out


def _accuracy():
    here = str(Path(__file__).resolve().parent)
    if here not in sys.path:
        sys.path.insert(0, here)
    import accuracy

    return accuracy


def build_prompt(tokenizer, problem: WordProblem | str, instruction: str | None = None) -> str:
    """The chat-template text (generation prompt included) asking for step-by-step reasoning and a
    ``\\boxed{}`` answer; the user message is ``accuracy.py``'s: question, newline, instruction."""
    question = problem.question if isinstance(problem, WordProblem) else problem
    if not isinstance(question, str):
        raise TypeError(f"problem must be a WordProblem or str, got {type(problem).__name__}")
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("tokenizer has no chat_template; build_prompt needs one")
    instruction = _accuracy().DEFAULT_INSTRUCTION if instruction is None else instruction
    return tokenizer.apply_chat_template([{"role": "user", "content": f"{question}\n{instruction}".strip()}],
                                         tokenize=False, add_generation_prompt=True)


def is_correct(problem: WordProblem, output: str) -> bool:
    """Whether ``output``'s final answer (accuracy.extract_answer) equals the problem's."""
    acc = _accuracy()
    return acc.answers_match(acc.extract_answer(output), str(problem.answer))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=None, help=f"{MIN_STEPS}..{MAX_STEPS} (default: drawn per problem)")
    ap.add_argument("--out", type=Path, help="write JSONL rows for accuracy.py --problems")
    args = ap.parse_args(argv)
    problems = dataset(args.n, args.seed, args.steps)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            for p in problems:
                f.write(json.dumps(p.to_json()) + "\n")
        print(f"{len(problems)} problems -> {args.out}")
    else:
        for p in problems:
            print(f"[{p.n_steps} steps] {p.question}\n  " + "; ".join(p.cot) + f"  => {p.answer}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
