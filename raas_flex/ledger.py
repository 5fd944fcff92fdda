"""The ledger task: milestones that a recent window cannot rebuild (docs/testbed.md).

On the milestone task (:mod:`raas_flex.testbed`) every line that reads a milestone reveals it, so a
model can recompute a milestone from the last two lines and a recency policy loses nothing it needs
(``python -m raas_flex.oracle --rebuild``). Here a milestone is a *ledger*: ``keys`` keyed digits. A
line reads one entry, chosen by the two values before it, so a window of a few dozen lines has seen
only some keys; an entry nobody read recently can only come from the ledger itself.

Format (one token per character, the testbed vocabulary; ``<s>`` is prepended, ``</s>`` ends)::

    q0:1,...,q9:6;000=2;000!a3b7...;n=164   question: facts, seed (value of line 000), ledger 000, lines
    001:000g+000=5      line i: i:<ledger><key>+<operand>=v, v = (entry + value(operand) + i) mod 10
    005:000c+q5:3=1     phoenix lines (label ending in 5, and the last line) add question fact q<prev>
    060!a0b4...         a milestone line: a new ledger, entry k = the value of the k-th of the last
                        `keys` lines with a value (here lines 050..059)
    061:060k+059=8      from line 61 on, lines read ledger 060; the operand is the last line with a value
    A:685               answer: the last three values

``prev`` is the value of the last line with a value (``prev2`` the one before; the seed, then 0, at the
start). A line's key is letter ``(prev + prev2) % keys`` of ``KEY_LETTERS``. Every problem carries
its exact read trace, including the sets of positions that determine a read token without reading it
(``Trace.rebuild``: an entry from any clean line that read it, a fact from its copies), so the oracle can tell a loss from a token a model could recompute.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from .testbed import (ANSWER_MARK, EOS, PAD, Chain, Trace, _check_count, encode_text, sample)

__all__ = ["KEY_LETTERS", "LEDGER_SPEC", "LedgerProblem", "LedgerSpec", "encode_ledger_batch", "ledger_dataset"]

KEY_LETTERS = "abcdefghijklmoprstuvwxyz"  # no "n" or "q": those name the line count and the facts


@dataclass(frozen=True)
class LedgerSpec:
    """Shape of the ledger task; lines per problem are drawn uniformly from ``min_lines..max_lines``.

    phase_lines: lines ``phase_lines``, ``2 * phase_lines``, ... write a new ledger (``iii!``: the
        values of the last ``keys`` lines); the lines after one read it (line 000's is in the question).
    phoenix_every: lines ``i`` with ``i % phoenix_every == phoenix_every // 2`` (and the last line) add a
        question fact (``qK:F``, K the previous value) instead of the previous value.
    keys: entries per ledger (at most ``len(KEY_LETTERS)``).
    heldout_mod: one (facts, seed) pair in about ``heldout_mod`` is held out.
    """

    min_lines: int = 110
    max_lines: int = 170
    phase_lines: int = 60
    phoenix_every: int = 10
    keys: int = 10
    answer_digits: int = 3
    heldout_mod: int = 61

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{f.name} must be an int, got {value!r}")
        if not 2 <= self.keys <= len(KEY_LETTERS):
            raise ValueError(f"keys={self.keys} must be in 2..{len(KEY_LETTERS)}")
        if self.phase_lines <= self.keys or self.phoenix_every < 2 or self.heldout_mod < 2:
            raise ValueError("need phase_lines > keys, phoenix_every >= 2 and heldout_mod >= 2, got "
                             f"phase_lines={self.phase_lines}, keys={self.keys}, phoenix_every={self.phoenix_every}, "
                             f"heldout_mod={self.heldout_mod}")
        if not 1 <= self.answer_digits <= 9:
            raise ValueError(f"answer_digits={self.answer_digits} must be in 1..9")
        if not max(self.phase_lines, 2 * self.answer_digits) <= self.min_lines <= self.max_lines <= 999:
            raise ValueError("need max(phase_lines, 2 * answer_digits) <= min_lines <= max_lines <= 999, got "
                             f"min_lines={self.min_lines}, max_lines={self.max_lines}, phase_lines={self.phase_lines}")

    def line_kind(self, i: int, lines: int) -> str:
        """``"phoenix"``, ``"milestone"`` (writes a ledger) or ``"filler"`` for line ``i`` of ``lines``."""
        if i == lines or i % self.phoenix_every == self.phoenix_every // 2:
            return "phoenix"
        return "milestone" if i % self.phase_lines == 0 else "filler"

    def ledger_of(self, i: int) -> int:
        """Label of the ledger line ``i`` reads (a milestone line: the ledger it updates)."""
        return self.phase_lines * ((i - 1) // self.phase_lines)

    def cot_tokens(self, lines: int) -> int:
        """Tokens after the prompt: the lines, ``A:`` and the answer, ``</s>`` excluded."""
        width = {"filler": 15, "phoenix": 16, "milestone": 5 + 2 * self.keys}
        return sum(width[self.line_kind(i, lines)] for i in range(1, lines + 1)) + len(ANSWER_MARK) + self.answer_digits

    @property
    def prompt_tokens(self) -> int:
        """Tokens of every question, ``<s>`` included (the same for all problems)."""
        return len(format_ledger_question([0] * 10, 0, [0] * self.keys, self.min_lines)) + 1

    @property
    def seq_len(self) -> int:
        """Longest training sequence: prompt + longest chain + ``</s>``."""
        return self.prompt_tokens + max(self.cot_tokens(k) for k in range(self.min_lines, self.max_lines + 1)) + 1


LEDGER_SPEC = LedgerSpec()


@dataclass(frozen=True, kw_only=True)
class LedgerProblem(Chain):
    """One ledger-task problem: facts, the question's ledger, the exact read ``trace`` and, in training,
    the positions of values drawn at random (``noisy``). ``values[i]`` is 0 for milestone lines."""

    facts: tuple[int, ...]
    ledger: tuple[int, ...]
    trace: Trace
    noisy: tuple[int, ...] = ()


def _pairs(entries) -> str:
    return "".join(f"{KEY_LETTERS[k]}{int(d)}" for k, d in enumerate(entries))


def format_ledger_question(facts, seed: int, ledger, lines: int) -> str:
    facts_text = ",".join(f"q{k}:{int(f)}" for k, f in enumerate(facts))
    return f"{facts_text};000={int(seed)};000!{_pairs(ledger)};n={int(lines):03d}\n"


def first_ledger(facts, seed: int, keys: int) -> list[int]:
    """The question's ledger: digits drawn from a generator seeded by (facts, seed), so a problem is a
    function of what :func:`raas_flex.testbed.sample` draws."""
    rng = np.random.default_rng([int(seed), *(int(f) for f in facts)])
    return [int(x) for x in rng.integers(0, 10, size=keys)]


def _ledger_problem(facts, seed: int, lines: int, spec: LedgerSpec, noise=None) -> LedgerProblem:
    facts, seed, lines = [int(x) for x in facts], int(seed), int(lines)
    ledger0 = first_ledger(facts, seed, spec.keys)
    question = format_ledger_question(facts, seed, ledger0, lines)
    base = 1 + len(question)  # <s> is position 0
    fact_pos = [1 + question.index(f"q{k}:") + 3 for k in range(10)]
    n_pos = 1 + question.index(";n=") + 3
    start0 = 1 + question.index(";000!") + 5
    ledgers = {0: ledger0}
    entry_pos = {0: [start0 + 2 * k + 1 for k in range(spec.keys)]}
    values, vpos = {0: seed}, {0: 1 + question.index(";000=") + 5}
    valued = [0]  # labels of the lines with a value, in order
    reads, noisy, parts, cur = [], [], [], base
    rebuild: dict[int, list] = {}
    for i in range(1, lines + 1):
        kind, m = spec.line_kind(i, lines), spec.ledger_of(i)
        p1 = valued[-1]
        prev, prev2 = values[p1], (values[valued[-2]] if len(valued) > 1 else 0)
        if kind == "milestone":  # "iii!" + a new ledger: the values of the last `keys` lines with one
            src = valued[-spec.keys:]
            new = [values[j] for j in src]
            text = f"{i:03d}!{_pairs(new)}\n"
            pos = [cur + 4 + 2 * k + 1 for k in range(spec.keys)]
            for k, j in enumerate(src):
                reads.append((pos[k], (vpos[j],)))
            ledgers[i], entry_pos[i] = new, pos
            parts.append(text)
            cur += len(text)
            continue
        key = (prev + prev2) % spec.keys
        key_reads = tuple(sorted({vpos[p1]} | ({vpos[valued[-2]]} if len(valued) > 1 else set())))
        reads.append((cur + 7, key_reads))
        if kind == "phoenix":  # "iii:mmmK+qD:F=v"
            operand, b_val, b_pos = f"q{prev}:{facts[prev]}", facts[prev], cur + 12
            reads.append((cur + 10, (vpos[p1],)))  # the fact's key digit is the previous value
            reads.append((cur + 12, (fact_pos[prev],)))  # its copy reads the question
            rebuild.setdefault(fact_pos[prev], []).append((cur + 12,))
        else:
            operand, b_val, b_pos = f"{p1:03d}", prev, vpos[p1]
        entry = ledgers[m][key]
        v = (entry + b_val + i) % 10
        text = f"{i:03d}:{m:03d}{KEY_LETTERS[key]}+{operand}={v}\n"
        vp = cur + len(text) - 2
        if noise is not None and noise[i] > 0:
            v = (v + int(noise[i])) % 10
            text = text[:-2] + f"{v}\n"
            noisy.append(vp)
        else:
            reads.append((vp, tuple(sorted({entry_pos[m][key], b_pos}))))
            rebuild.setdefault(entry_pos[m][key], []).append((b_pos, vp))  # entry = v - b - i
        values[i], vpos[i] = v, vp
        valued.append(i)
        parts.append(text)
        cur += len(text)
    d = spec.answer_digits
    last = valued[-d:]
    answer = "".join(str(values[j]) for j in last)
    reads.append((cur, (n_pos, n_pos + 1, n_pos + 2)))  # stopping ("A") needs the line count
    for k, j in enumerate(last):
        reads.append((cur + 2 + k, (vpos[j],)))
    cot = "".join(parts) + ANSWER_MARK + answer
    trace = Trace(prompt_len=base, length=base + len(cot) + 1, reads=tuple(reads),
                  rebuild=tuple((p, tuple(sets)) for p, sets in sorted(rebuild.items())))
    return LedgerProblem(facts=tuple(facts), seed=seed, lines=lines, ledger=tuple(ledger0),
                         values=tuple(values.get(j, 0) for j in range(lines + 1)), question=question, cot=cot,
                         answer=answer, trace=trace, noisy=tuple(noisy))


def _check_spec(spec) -> None:
    if not isinstance(spec, LedgerSpec):
        raise TypeError(f"spec must be a LedgerSpec, got {type(spec).__name__}")


def ledger_dataset(n: int, seed: int = 0, spec: LedgerSpec = LEDGER_SPEC, split: str = "heldout") -> list[LedgerProblem]:
    """``n`` ledger-task problems, deterministic in ``seed``; held-out ones by default."""
    _check_count("n", n)
    _check_spec(spec)
    facts, seeds, lines = sample(np.random.default_rng(seed), n, spec, split)
    return [_ledger_problem(f, s, k, spec) for f, s, k in zip(facts, seeds, lines)]


def encode_ledger_batch(rng: np.random.Generator, n: int, spec: LedgerSpec = LEDGER_SPEC, split: str = "train",
                        value_noise: float = 0.0):
    """Whole problems as token ids: ``(ids [n, spec.seq_len], lengths [n], noisy [n, spec.seq_len] bool)``,
    right padded with ``<pad>``, the layout of :func:`raas_flex.testbed.encode_milestone_batch` (same
    ``value_noise``: a line value replaced by another digit, read as written later, left out of the loss)."""
    _check_spec(spec)
    if isinstance(value_noise, bool) or not isinstance(value_noise, (int, float)) or not 0 <= value_noise < 1:
        raise ValueError(f"value_noise={value_noise!r} must be a number in [0, 1)")
    facts, seeds, lines = sample(rng, n, spec, split)
    noise = None
    if value_noise > 0:
        shift = rng.integers(1, 10, size=(n, spec.max_lines + 1))
        noise = np.where(rng.random(shift.shape) < value_noise, shift, 0)
        for j, k in enumerate(lines):
            noise[j, k - 2 * spec.answer_digits + 1:] = 0  # the answer's lines stay exact
    ids = np.full((n, spec.seq_len), PAD, dtype=np.int64)
    lengths = np.zeros(n, dtype=np.int64)
    noisy = np.zeros((n, spec.seq_len), dtype=bool)
    for j, (f, s, k) in enumerate(zip(facts, seeds, lines)):
        p = _ledger_problem(f, s, k, spec, None if noise is None else noise[j])
        row = np.concatenate([encode_text(p.question + p.cot), [EOS]])
        ids[j, :len(row)] = row
        lengths[j] = len(row)
        noisy[j, list(p.noisy)] = True
    return ids, lengths, noisy
