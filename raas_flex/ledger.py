"""The ledger task: milestones that a recent window cannot rebuild (docs/testbed.md).

On the milestone task (:mod:`raas_flex.testbed`) every line that reads a milestone reveals it, so a
model can recompute a milestone from the last two lines and a recency policy loses nothing it needs
(``python -m raas_flex.oracle --rebuild``). Here a milestone is a *ledger* of ten keyed digits, and a
line multiplies the entry it reads: ``v = (entry * x + i // 10) mod 10``. A product by an odd digit but 5
reveals the entry, by an even one only the entry mod 5, by 5 its parity (0 counts as 1); so the lines
a recent window holds have revealed some entries only in part, and a later read that needs more can
only come from the ledger itself.

Format (one token per character, the testbed vocabulary; ``<s>`` is prepended, ``</s>`` ends)::

    q0:2,...,q9:4;000=8;000!a2b8c6d2e5f6g0h7i6j7;n=137   question: facts, seed (value of line 000),
                        ledger 000, line count
    001:000b*8=4        line i: i:<ledger><key>*x=v, key = letter (i mod 10) of "abcdefghij", x a copy
                        of the previous value, v = (entry(key) * x + tens digit of i) mod 10, x = 0 counts as 1
    005:000f*q0:2=2     phoenix lines (label ending in 5, and the last line): x is question fact
                        q<previous value>, copied from the question
    020!a9b3c9d9e6f9g1h8i9j4   a milestone line (20, 120, ...): a new ledger, entry d = the value of
                        line 01d (the last line whose label ends in d); lines 021..119 read ledger 020
    021:020b*4=4
    A:580               answer: the last three values

``prev`` is the value of the last line with a value (the seed at the start). Every key is read once
every ten lines, so under LRU every page of the current ledger stays hot whatever its alignment. The
tens digit of the label changes the line op every ten lines, so the chain does not fall into a cycle of
ten lines (with the units digit it did: each key then met the same multiplier at every read, and the
lines a recent window holds revealed exactly what later reads need).

Reads (``Trace.reads``): a line's ``x`` copy reads the previous value (a phoenix line's fact key digit
reads it, its fact copy the question's fact); its value reads the entry and the copy in the line; a
ledger entry reads the value it copies; ``A`` reads the line count, each answer digit its value.

Rebuild rule (``Trace.rebuild``, ``Trace.read_rebuild``): a position set rebuilds a token when the token
follows from it by a copy or by one line's op (forwards or inverted), not by re-running the chain (all of
which follows from the question). An entry is determined by the value it copies, that value's copy in
the next line (``x`` or the fact key digit), and the entry and ``x`` of the line that computed it,
whatever a read needs of it: these go to ``Trace.rebuild``. A clean earlier line ``r`` that read the
same entry with multiplier ``x_r`` reveals ``entry * x_r mod 10`` (positions ``{x_r, v_r}``); a read with
multiplier ``x`` needs
``entry * x mod 10``. A set of such lines rebuilds the read when every digit ``d`` that agrees with all
of them (``d * x_r == entry * x_r`` mod 10 for each) gives the same ``d * x``; ``read_rebuild`` lists,
per read, the lines that do so alone and the pairs that do so together (neither alone). The partitions
of the digits by ``d * x mod 10`` are the identity (x = 1, 3, 7, 9, and 0 counted as 1), mod 5 (x = 2,
4, 6, 8) and mod 2 (x = 5), closed under common refinement (mod 5 and mod 2 together: the identity), so
no minimal set has more than two lines (``minimal_sets``; tests check this against brute force). A fact
is determined by its copies.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations

import numpy as np

from .testbed import ANSWER_MARK, EOS, PAD, Chain, Trace, _check_count, _check_int_fields, encode_text, sample

__all__ = ["KEY_LETTERS", "LEDGER_SPEC", "LedgerProblem", "LedgerSpec", "determines", "encode_ledger_batch",
           "ledger_dataset", "minimal_sets"]

KEY_LETTERS = "abcdefghij"  # key d: the entry copied from the line whose label ends in d


@dataclass(frozen=True)
class LedgerSpec:
    """Shape of the ledger task; lines per problem are drawn uniformly from ``min_lines..max_lines``.

    first_milestone, phase_lines: lines ``first_milestone``, ``first_milestone + phase_lines``, ... write a
        new ledger (``iii!``: the values of the last ten lines); the lines after one read it (the lines
        before the first read ledger 000, in the question).
    phoenix_every: lines ``i`` with ``i % phoenix_every == phoenix_every // 2`` (but milestone lines) and
        the last line take question fact ``qK:F`` (K the previous value) as the multiplier.
    heldout_mod: one (facts, seed) pair in about ``heldout_mod`` is held out.
    """

    min_lines: int = 116
    max_lines: int = 176
    first_milestone: int = 20
    phase_lines: int = 100
    phoenix_every: int = 10
    answer_digits: int = 3
    heldout_mod: int = 61

    def __post_init__(self) -> None:
        _check_int_fields(self)
        for name in ("first_milestone", "phase_lines"):
            if getattr(self, name) < 11:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 11 (a ledger copies the ten lines before it)")
        if self.phoenix_every < 2:
            raise ValueError(f"phoenix_every={self.phoenix_every} must be >= 2")
        if self.heldout_mod < 2:
            raise ValueError(f"heldout_mod={self.heldout_mod} must be >= 2")
        if not 1 <= self.answer_digits <= 9:
            raise ValueError(f"answer_digits={self.answer_digits} must be in 1..9")
        if not max(self.first_milestone, 2 * self.answer_digits) <= self.min_lines <= self.max_lines <= 999:
            raise ValueError("need max(first_milestone, 2 * answer_digits) <= min_lines <= max_lines <= 999, got "
                             f"min_lines={self.min_lines}, max_lines={self.max_lines}, "
                             f"first_milestone={self.first_milestone}")

    def line_kind(self, i: int, lines: int) -> str:
        """``"phoenix"``, ``"milestone"`` (writes a ledger) or ``"filler"`` for line ``i`` of ``lines``."""
        milestone = i >= self.first_milestone and (i - self.first_milestone) % self.phase_lines == 0
        if i == lines or (i % self.phoenix_every == self.phoenix_every // 2 and not milestone):
            return "phoenix"
        return "milestone" if milestone else "filler"

    def ledger_of(self, i: int) -> int:
        """Label of the ledger line ``i`` reads (a milestone line: the ledger it replaces)."""
        if i <= self.first_milestone:
            return 0
        return self.first_milestone + self.phase_lines * ((i - 1 - self.first_milestone) // self.phase_lines)

    def cot_tokens(self, lines: int) -> int:
        """Tokens after the prompt: the lines, ``A:`` and the answer, ``</s>`` excluded."""
        width = {"filler": 13, "phoenix": 16, "milestone": 5 + 2 * len(KEY_LETTERS)}
        return sum(width[self.line_kind(i, lines)] for i in range(1, lines + 1)) + len(ANSWER_MARK) + self.answer_digits

    @property
    def prompt_tokens(self) -> int:
        """Tokens of every question, ``<s>`` included (the same for all problems)."""
        return len(format_ledger_question([0] * 10, 0, [0] * 10, self.min_lines)) + 1

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


def _digit(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 0 <= value <= 9:
        raise ValueError(f"{name}={value!r} must be a digit 0..9")
    return int(value)


def determines(entry: int, needed_x: int, known_xs) -> bool:
    """Whether reads of ``entry`` with multipliers ``known_xs`` (each revealing ``entry * x mod 10``)
    determine ``entry * needed_x mod 10``: every digit agreeing with them gives the same product."""
    entry, needed_x = _digit("entry", entry), _digit("needed_x", needed_x)
    xs = [_digit("known_xs item", x) for x in known_xs]
    agree = [d for d in range(10) if all(d * x % 10 == entry * x % 10 for x in xs)]
    return len({d * needed_x % 10 for d in agree}) == 1


def minimal_sets(entry: int, needed_x: int, known_xs) -> list[tuple[int, ...]]:
    """Indices into ``known_xs`` of the reads that determine what a read with ``needed_x`` needs alone,
    and of the pairs that do together (neither alone). No minimal set is larger (module docstring)."""
    xs = list(known_xs)
    single = [j for j in range(len(xs)) if determines(entry, needed_x, [xs[j]])]
    pairs = [(a, b) for a, b in combinations(range(len(xs)), 2)
             if a not in single and b not in single and determines(entry, needed_x, [xs[a], xs[b]])]
    return [(j,) for j in single] + pairs


def _pairs(entries) -> str:
    return "".join(f"{KEY_LETTERS[k]}{int(d)}" for k, d in enumerate(entries))


def format_ledger_question(facts, seed: int, ledger, lines: int) -> str:
    facts_text = ",".join(f"q{k}:{int(f)}" for k, f in enumerate(facts))
    return f"{facts_text};000={int(seed)};000!{_pairs(ledger)};n={int(lines):03d}\n"


def first_ledger(facts, seed: int) -> list[int]:
    """The question's ledger: digits drawn from a generator seeded by (facts, seed), so a problem is a
    function of what :func:`raas_flex.testbed.sample` draws."""
    rng = np.random.default_rng([int(seed), *(int(f) for f in facts)])
    return [int(x) for x in rng.integers(0, 10, size=len(KEY_LETTERS))]


def _ledger_problem(facts, seed: int, lines: int, spec: LedgerSpec, noise=None, rebuilds: bool = True) -> LedgerProblem:
    """One problem; ``noise`` (training): per line a shift 1..9 added to its value, or 0; ``rebuilds=False``
    leaves the trace empty (training batches, which need only the text: faster)."""
    facts, seed, lines = [int(x) for x in facts], int(seed), int(lines)
    ledger0 = first_ledger(facts, seed)
    question = format_ledger_question(facts, seed, ledger0, lines)
    base = 1 + len(question)  # <s> is position 0
    fact_pos = [1 + question.index(f"q{k}:") + 3 for k in range(10)]
    n_pos = 1 + question.index(";n=") + 3
    start0 = 1 + question.index(";000!") + 5
    ledgers = {0: ledger0}
    entry_pos = {0: [start0 + 2 * k + 1 for k in range(10)]}
    values, vpos = {0: seed}, {0: 1 + question.index(";000=") + 5}
    copy_of: dict[int, int] = {}  # line j -> position of the next line's copy of its value
    inputs: dict[int, tuple] = {}  # clean line j -> (its entry, its multiplier): they compute its value
    copied_from: dict[int, int] = {}  # ledger entry position -> the line whose value it copies
    readers: dict[tuple[int, int], list] = {}  # (ledger, key) -> [(x, x position, v position)] of clean reads
    reads, noisy, parts, cur = [], [], [], base
    rebuild: dict[int, list] = {}
    read_rebuild = []
    prev_line = 0
    for i in range(1, lines + 1):
        kind, m = spec.line_kind(i, lines), spec.ledger_of(i)
        prev = values[prev_line]
        if kind == "milestone":  # "iii!" + a new ledger: entry d = value of line i-10..i-1 ending in d
            src = {j % 10: j for j in range(i - 10, i)}
            new = [values[src[d]] for d in range(10)]
            pos = [cur + 4 + 2 * d + 1 for d in range(10)]
            for d in range(10):
                j = src[d]
                reads.append((pos[d], (vpos[j],)))
                copied_from[pos[d]] = j
            ledgers[i], entry_pos[i] = new, pos
            text = f"{i:03d}!{_pairs(new)}\n"
            parts.append(text)
            cur += len(text)
            continue
        key = i % 10
        if kind == "phoenix":  # "iii:mmmK*qD:F=v": the multiplier is fact q<prev>, copied
            x, x_pos = facts[prev], cur + 12
            text = f"{i:03d}:{m:03d}{KEY_LETTERS[key]}*q{prev}:{x}="
            reads.append((cur + 10, (vpos[prev_line],)))  # the fact's key digit copies the previous value
            reads.append((x_pos, (fact_pos[prev],)))  # the fact copy reads the question
            rebuild.setdefault(fact_pos[prev], []).append((x_pos,))
            copy_of[prev_line] = cur + 10
        else:  # "iii:mmmK*x=v": the multiplier copies the previous value
            x, x_pos = prev, cur + 9
            text = f"{i:03d}:{m:03d}{KEY_LETTERS[key]}*{x}="
            reads.append((x_pos, (vpos[prev_line],)))
            copy_of[prev_line] = x_pos
        e_pos, entry = entry_pos[m][key], ledgers[m][key]
        v = (entry * (x or 1) + i // 10) % 10
        vp = cur + len(text)
        text += f"{v}\n"
        if noise is not None and noise[i] > 0:
            v = (v + int(noise[i])) % 10
            text = text[:-2] + f"{v}\n"
            noisy.append(vp)
        else:
            reads.append((vp, tuple(sorted({e_pos, x_pos}))))
            past = readers.setdefault((m, key), [])
            if past and rebuilds:
                sets = [tuple(sorted(q for j in idx for q in past[j][1:]))
                        for idx in minimal_sets(entry, x or 1, [r[0] for r in past])]
                if sets:
                    read_rebuild.append((vp, e_pos, tuple(sets)))
            past.append((x or 1, x_pos, vp))
            inputs[i] = tuple(sorted((e_pos, x_pos)))
        values[i], vpos[i] = v, vp
        prev_line = i
        parts.append(text)
        cur += len(text)
    d = spec.answer_digits
    last = [j for j in range(lines + 1) if j in values and j > 0][-d:]
    answer = "".join(str(values[j]) for j in last)
    reads.append((cur, (n_pos, n_pos + 1, n_pos + 2)))  # stopping ("A") needs the line count
    for k, j in enumerate(last):
        reads.append((cur + 2 + k, (vpos[j],)))
    cot = "".join(parts) + ANSWER_MARK + answer
    for p, j in copied_from.items():  # an entry is its source value, any copy of it, or their inputs
        rebuild[p] = [(vpos[j],)] + ([(copy_of[j],)] if j in copy_of else []) + ([inputs[j]] if j in inputs else [])
    if not rebuilds:  # training text only: no trace
        reads, rebuild = [], {}
    trace = Trace(prompt_len=base, length=base + len(cot) + 1, reads=tuple(reads),
                  rebuild=tuple((p, tuple(sets)) for p, sets in sorted(rebuild.items())),
                  read_rebuild=tuple(read_rebuild))
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
    return _encode_ledger(facts, seeds, lines, spec, noise)


def _encode_ledger(facts, seeds, lines, spec: LedgerSpec, noise=None):
    """``(ids, lengths, noisy)`` of the problems drawn as :func:`raas_flex.testbed.sample` returns them."""
    n = len(seeds)
    ids = np.full((n, spec.seq_len), PAD, dtype=np.int64)
    lengths = np.zeros(n, dtype=np.int64)
    noisy = np.zeros((n, spec.seq_len), dtype=bool)
    for j, (f, s, k) in enumerate(zip(facts, seeds, lines)):
        p = _ledger_problem(f, s, k, spec, None if noise is None else noise[j], rebuilds=False)
        row = np.concatenate([encode_text(p.question + p.cot), [EOS]])
        ids[j, :len(row)] = row
        lengths[j] = len(row)
        noisy[j, list(p.noisy)] = True
    return ids, lengths, noisy
