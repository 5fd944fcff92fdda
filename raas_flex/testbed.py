"""Synthetic multi-step reasoning tasks with milestone and phoenix tokens, and their tokenizer.

Two tasks share the tokenizer: the lag task below (:class:`TaskSpec`), where recency keeps everything
a step needs, and the milestone task (:class:`MilestoneSpec`, :func:`milestone_dataset`; docs/testbed.md),
where milestones are read by name over a whole phase, filler once, and question facts after long gaps,
with an exact read trace per problem for :mod:`raas_flex.oracle`. The rest of this docstring is the lag task.

The question gives a lookup table ``T`` of ten digits, a seed digit ``v`` and a line count ``n``::

    T:0>7,1>3,2>0,3>9,4>4,5>1,6>6,7>2,8>8,9>5;v=5;n=117

The chain of thought computes ``v_1 .. v_n`` one fixed-width line each (10 characters, one token per
character), then states the last three values and stops::

    001:5+1=6        line 1..lag: b = T[a]        (the table, read from the question)
    002:6+6=2
    ...
    011:3+6=9        otherwise:   b = v_{i-lag}   (the value written lag lines earlier)
    ...
    020:7+2=9        every phoenix_every-th line: b = T[a] again
    ...
    117:1+4=5
    A:045            answer: v_{n-2} v_{n-1} v_n, then end of sequence

with ``a = v_{i-1}`` and ``v_i = (a + b) mod 10`` on line ``i``. So:

- **milestones**: each value is read by the next line and once more ``lag`` lines (``10 * lag``
  tokens) later, and never again: a KV cache that keeps a recent window of a little more than
  ``10 * lag`` tokens has everything the chain needs from the chain itself;
- **phoenix tokens**: the question's table is read on the first ``lag`` lines and then on every
  ``phoenix_every``-th line until the end, by content (the entry whose key is ``a``), more than a
  thousand tokens after it was written. A cache that drops the prompt (StreamingLLM) loses it, and
  with it the line count that says when to stop.

With the default :class:`TaskSpec` the chain is 1,005..1,305 tokens (100..130 lines + ``A:xyz``) after
a 53-token prompt (``<s>`` included). Every token of the chain is determined by the question, so a
model that has learned the rule makes no error at all; one wrong value changes every later value,
so exact-answer accuracy measures whether every step was right (chance: 1 in 1,000).

Problems are split into train and held-out sets by a hash of (table, seed) (:func:`is_heldout`):
:func:`encode_batch` with ``split="train"`` never produces a held-out question.

    from raas_flex.testbed import build_tokenizer, dataset, encode_batch, write_jsonl
    tok = build_tokenizer()                       # character level; save_pretrained / AutoTokenizer
    problems = dataset(200, seed=0)               # held-out problems (dataclasses with .question ...)
    write_jsonl(problems, "testbed.jsonl")        # {"question", "answer", "cot"} per line
    ids, lengths = encode_batch(np.random.default_rng(0), 128)  # training batch, numpy, vectorised
"""

from __future__ import annotations

import dataclasses
import json
import string
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "BOS",
    "DEFAULT_SPEC",
    "EOS",
    "PAD",
    "VOCAB",
    "Problem",
    "TaskSpec",
    "build_tokenizer",
    "dataset",
    "encode_batch",
    "encode_text",
    "is_heldout",
    "make_problem",
    "parse_answer",
    "sample",
    "window_mask",
    "write_jsonl",
    "MILESTONE_SPEC",
    "MilestoneProblem",
    "MilestoneSpec",
    "encode_milestone_batch",
    "make_milestone_problem",
    "milestone_dataset",
]

# -- vocabulary ---------------------------------------------------------------------------------------
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")
PAD, BOS, EOS, UNK = 0, 1, 2, 3
_CHARS = string.digits + "\n " + string.punctuation + string.ascii_lowercase + string.ascii_uppercase
VOCAB: tuple[str, ...] = SPECIAL_TOKENS + tuple(_CHARS)  # 100 tokens; digits are ids 4..13
_CHAR_ID = np.full(128, UNK, dtype=np.int64)  # ASCII -> token id, for vectorised encoding
for _i, _c in enumerate(VOCAB[len(SPECIAL_TOKENS):], start=len(SPECIAL_TOKENS)):
    _CHAR_ID[ord(_c)] = _i
_DIGIT = _CHAR_ID[ord("0")] + np.arange(10)
LINE_WIDTH = 10  # "iii:a+b=v\n"
ANSWER_MARK = "A:"


def build_tokenizer():
    """Character-level ``transformers`` tokenizer (one token per character, ``<s>`` prepended).

    Unknown characters map to ``<unk>``. ``save_pretrained(path)`` writes ``tokenizer.json`` so that
    ``AutoTokenizer.from_pretrained(path)`` loads it back; decoding joins characters without spaces.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel({t: i for i, t in enumerate(VOCAB)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tk.decoder = decoders.Fuse()
    tk.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", BOS)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        clean_up_tokenization_spaces=False, model_max_length=8192,
    )


def encode_text(text: str, bos: bool = True) -> np.ndarray:
    """Token ids of ``text`` exactly as :func:`build_tokenizer` encodes it (numpy, no tokenizer needed)."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.int64)
    ids = np.where(codes < 128, _CHAR_ID[np.minimum(codes, 127)], UNK)
    return np.concatenate([[BOS], ids]) if bos else ids


# -- task ---------------------------------------------------------------------------------------------
def _check_int_fields(spec) -> None:
    """TypeError naming the first field of the dataclass ``spec`` that is not an int (bool is not one)."""
    for f in dataclasses.fields(spec):
        value = getattr(spec, f.name)
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{f.name} must be an int, got {value!r}")


@dataclass(frozen=True)
class TaskSpec:
    """Shape of the task. Lines per problem are drawn uniformly from ``min_lines..max_lines``.

    lag: line i reads the value of line i - lag (the milestone distance is ``10 * lag`` tokens).
    phoenix_every: lines whose number is a multiple of it read the table instead.
    heldout_mod: one (table, seed) pair in about ``heldout_mod`` is held out (:func:`is_heldout`).
    """

    min_lines: int = 100
    max_lines: int = 130
    lag: int = 10
    phoenix_every: int = 10
    answer_digits: int = 3
    heldout_mod: int = 61

    def __post_init__(self) -> None:
        _check_int_fields(self)
        if not 2 <= self.lag:
            raise ValueError(f"lag={self.lag} must be >= 2 (lag 1 would read the line just written)")
        if not 2 <= self.phoenix_every:
            raise ValueError(f"phoenix_every={self.phoenix_every} must be >= 2")
        if not 1 <= self.answer_digits <= 9:
            raise ValueError(f"answer_digits={self.answer_digits} must be in 1..9")
        if not max(self.lag, self.answer_digits) <= self.min_lines <= self.max_lines <= 999:
            raise ValueError(
                f"need max(lag, answer_digits) <= min_lines <= max_lines <= 999 (3-digit line numbers), got "
                f"min_lines={self.min_lines}, max_lines={self.max_lines}, lag={self.lag}"
            )
        if self.heldout_mod < 2:
            raise ValueError(f"heldout_mod={self.heldout_mod} must be >= 2")

    @property
    def prompt_tokens(self) -> int:
        """Tokens of every question, ``<s>`` included (the same for all problems)."""
        return len(format_question(np.zeros(10, dtype=np.int64), 0, self.min_lines)) + 1

    def cot_tokens(self, lines: int) -> int:
        """Tokens after the prompt: the lines, ``A:`` and the answer, ``</s>`` excluded."""
        return LINE_WIDTH * lines + len(ANSWER_MARK) + self.answer_digits

    @property
    def seq_len(self) -> int:
        """Longest training sequence: prompt + longest chain + ``</s>``."""
        return self.prompt_tokens + self.cot_tokens(self.max_lines) + 1

    def reads_table(self, line: int) -> bool:
        """Whether line ``line`` (1-based) reads the table (b = T[a]) rather than v_{line - lag}."""
        return line <= self.lag or line % self.phoenix_every == 0


DEFAULT_SPEC = TaskSpec()
SPLITS = ("train", "heldout", "any")


@dataclass(frozen=True)
class Chain:
    """What every task's problem has: ``values[i]`` is the value of line i (``values[0]`` the seed),
    ``question + cot`` the full text, ``answer`` the digits after the answer mark."""

    seed: int
    lines: int
    values: tuple[int, ...]
    question: str
    cot: str
    answer: str

    def to_json(self) -> dict:
        return {"question": self.question, "answer": self.answer, "cot": self.cot}


@dataclass(frozen=True, kw_only=True)
class Problem(Chain):
    """One lag-task problem: its lookup table besides the chain."""

    table: tuple[int, ...]


def format_question(table, seed: int, lines: int) -> str:
    pairs = ",".join(f"{k}>{int(t)}" for k, t in enumerate(table))
    return f"T:{pairs};v={int(seed)};n={int(lines):03d}\n"


def is_heldout(table: np.ndarray, seed: np.ndarray, spec: TaskSpec = DEFAULT_SPEC) -> np.ndarray:
    """bool [...]: whether (table [..., 10], seed [...]) belongs to the held-out split."""
    table = np.asarray(table, dtype=np.int64)
    key = table @ (10 ** np.arange(1, 11, dtype=np.int64)) + np.asarray(seed, dtype=np.int64)
    return key % spec.heldout_mod == 0


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is not supported; allowed: {', '.join(map(repr, SPLITS))}")


def _check_count(name: str, n) -> None:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {n!r}")
    if n < 1:
        raise ValueError(f"{name} must be >= 1, got {n}")


def sample(rng: np.random.Generator, n: int, spec: TaskSpec = DEFAULT_SPEC, split: str = "train"):
    """(table [n, 10], seed [n], lines [n]) drawn from ``rng``, restricted to ``split``."""
    _check_count("n", n)
    _check_split(split)
    tables, seeds, lines, have = [], [], [], 0
    while have < n:
        m = max(2 * (n - have), 64) * (spec.heldout_mod if split == "heldout" else 1)
        t = rng.integers(0, 10, size=(m, 10))
        s = rng.integers(0, 10, size=m)
        k = rng.integers(spec.min_lines, spec.max_lines + 1, size=m)
        if split != "any":
            keep = is_heldout(t, s, spec) == (split == "heldout")
            t, s, k = t[keep], s[keep], k[keep]
        tables.append(t)
        seeds.append(s)
        lines.append(k)
        have += len(s)
    return np.concatenate(tables)[:n], np.concatenate(seeds)[:n], np.concatenate(lines)[:n]


def _run(table: np.ndarray, seed: np.ndarray, spec: TaskSpec):
    """a, b, v [n, max_lines + 1] (index = line number; v[:, 0] is the seed) for every line up to max_lines."""
    n, L = len(seed), spec.max_lines
    v = np.zeros((n, L + 1), dtype=np.int64)
    a = np.zeros_like(v)
    b = np.zeros_like(v)
    v[:, 0] = seed
    rows = np.arange(n)
    for i in range(1, L + 1):
        a[:, i] = v[:, i - 1]
        b[:, i] = table[rows, a[:, i]] if spec.reads_table(i) else v[:, i - spec.lag]
        v[:, i] = (a[:, i] + b[:, i]) % 10
    return a, b, v


def encode_batch(rng: np.random.Generator, n: int, spec: TaskSpec = DEFAULT_SPEC, split: str = "train"):
    """A batch of whole problems as token ids, vectorised (no tokenizer, no per-problem Python loop).

    Returns ``(ids [n, spec.seq_len] int64, lengths [n])``: ``<s>`` question chain ``</s>``, right
    padded with ``<pad>``; the first ``spec.prompt_tokens`` tokens are the question.
    """
    table, seed, lines = sample(rng, n, spec, split)
    return _encode(table, seed, lines, spec)


def _encode(table, seed, lines, spec: TaskSpec):
    n, L, P = len(seed), spec.max_lines, spec.prompt_tokens
    a, b, v = _run(table, seed, spec)
    # question: fixed layout, only the digits change
    q = encode_text(format_question(np.zeros(10, dtype=np.int64), 0, spec.min_lines))
    ids = np.full((n, spec.seq_len), PAD, dtype=np.int64)
    ids[:, :P] = q
    dig = [i + 1 for i, c in enumerate(format_question(range(10), 0, 100)) if c.isdigit()]
    # digit positions in the question (after <s>): keys 0..9 are constant; values, seed, count change
    value_pos = [dig[2 * k + 1] for k in range(10)]
    ids[:, value_pos] = _DIGIT[table]
    ids[:, dig[20]] = _DIGIT[seed]
    ids[:, dig[21:24]] = _DIGIT[np.stack([lines // 100, lines // 10 % 10, lines % 10], axis=1)]
    # lines 1..max_lines, all of them (the tail past each problem's count is overwritten below)
    num = np.arange(1, L + 1)
    body = np.empty((n, L, LINE_WIDTH), dtype=np.int64)
    body[:, :, 0] = _DIGIT[num // 100]
    body[:, :, 1] = _DIGIT[num // 10 % 10]
    body[:, :, 2] = _DIGIT[num % 10]
    body[:, :, 3] = _CHAR_ID[ord(":")]
    body[:, :, 4] = _DIGIT[a[:, 1:]]
    body[:, :, 5] = _CHAR_ID[ord("+")]
    body[:, :, 6] = _DIGIT[b[:, 1:]]
    body[:, :, 7] = _CHAR_ID[ord("=")]
    body[:, :, 8] = _DIGIT[v[:, 1:]]
    body[:, :, 9] = _CHAR_ID[ord("\n")]
    ids[:, P:P + L * LINE_WIDTH] = body.reshape(n, -1)
    # answer: "A:" + last values + </s>, then padding
    d = spec.answer_digits
    tail = np.empty((n, len(ANSWER_MARK) + d + 1), dtype=np.int64)
    tail[:, 0] = _CHAR_ID[ord("A")]
    tail[:, 1] = _CHAR_ID[ord(":")]
    tail[:, 2:2 + d] = _DIGIT[v[np.arange(n)[:, None], lines[:, None] - d + 1 + np.arange(d)]]
    tail[:, -1] = EOS
    start = P + LINE_WIDTH * lines
    np.put_along_axis(ids, start[:, None] + np.arange(tail.shape[1]), tail, axis=1)
    lengths = start + tail.shape[1]
    ids[np.arange(spec.seq_len)[None, :] >= lengths[:, None]] = PAD
    return ids, lengths


def _problems(table, seed, lines, spec: TaskSpec) -> list[Problem]:
    a, b, v = _run(table, seed, spec)
    out = []
    for j in range(len(seed)):
        m = int(lines[j])
        body = "".join(f"{i:03d}:{a[j, i]}+{b[j, i]}={v[j, i]}\n" for i in range(1, m + 1))
        answer = "".join(str(x) for x in v[j, m - spec.answer_digits + 1:m + 1])
        out.append(
            Problem(
                table=tuple(int(x) for x in table[j]), seed=int(seed[j]), lines=m,
                values=tuple(int(x) for x in v[j, :m + 1]), question=format_question(table[j], seed[j], m),
                cot=body + ANSWER_MARK + answer, answer=answer,
            )
        )
    return out


def make_problem(rng: np.random.Generator, spec: TaskSpec = DEFAULT_SPEC, split: str = "any") -> Problem:
    """One problem drawn from ``rng`` (a ``numpy.random.Generator``)."""
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    return _problems(*sample(rng, 1, spec, split), spec)[0]


def dataset(n: int, seed: int = 0, spec: TaskSpec = DEFAULT_SPEC, split: str = "heldout") -> list[Problem]:
    """``n`` problems, deterministic in ``seed``; held-out ones by default (never seen in training)."""
    _check_count("n", n)
    return _problems(*sample(np.random.default_rng(seed), n, spec, split), spec)


def write_jsonl(problems, path) -> Path:
    """Write ``{"question", "answer", "cot"}`` per line (the harness reads question and answer)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for p in problems:
            f.write(json.dumps(p.to_json() if isinstance(p, Problem) else dict(p)) + "\n")
    return path


def parse_answer(text: str) -> str | None:
    """The digits after the last ``A:`` marker of a generated chain, or None when there is none."""
    i = text.rfind(ANSWER_MARK)
    if i < 0:
        return None
    digits = ""
    for c in text[i + len(ANSWER_MARK):]:
        if not c.isdigit():
            break
        digits += c
    return digits or None


def window_mask(windows, seq_len: int, prompt_tokens: int):
    """Training attention mask that lets each sequence see only its question and a recent window.

    ``windows``: int tensor ``[B]``; row ``b`` may attend from query ``i`` to key ``j`` when ``j <= i``
    and either ``j < prompt_tokens`` (the question) or ``i - j < windows[b]`` (the last ``windows[b]``
    tokens, the query itself included). A window ``>= seq_len`` is plain causal attention. Returns a
    bool tensor ``[B, 1, seq_len, seq_len]`` (True = attend) on ``windows.device``, the 4D form
    ``transformers`` passes to SDPA unchanged.

    A model trained under these masks computes every step from the question and the last few lines,
    which is the information flow the task has (see the module docstring); one trained on plain
    causal attention is free to lean on the whole chain (for example to count lines).
    """
    import torch

    if not isinstance(windows, torch.Tensor) or windows.dim() != 1 or windows.dtype.is_floating_point:
        raise TypeError(f"windows must be a 1-D integer tensor, got {windows!r}")
    for name, value in (("seq_len", seq_len), ("prompt_tokens", prompt_tokens)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {value!r}")
    if seq_len < 1 or not 0 <= prompt_tokens <= seq_len:
        raise ValueError(f"need seq_len >= 1 and 0 <= prompt_tokens <= seq_len, got seq_len={seq_len}, "
                         f"prompt_tokens={prompt_tokens}")
    if bool((windows < 1).any()):
        raise ValueError(f"windows must all be >= 1, got min {int(windows.min())}")
    pos = torch.arange(seq_len, device=windows.device)
    dist = pos[:, None] - pos[None, :]  # query i - key j
    causal = dist >= 0
    recent = dist[None] < windows[:, None, None]
    prompt = (pos < prompt_tokens)[None, None, :]
    return (causal[None] & (recent | prompt))[:, None]


def spec_dict(spec: TaskSpec = DEFAULT_SPEC) -> dict:
    return dataclasses.asdict(spec)


# -- the milestone task -------------------------------------------------------------------------------
# A second task whose information flow is the RaaS paper's (docs/testbed.md): long-lived milestones,
# filler read once, and question facts read again after long gaps, every read by name.
@dataclass(frozen=True)
class MilestoneSpec:
    """Shape of the milestone task. Lines per problem are drawn uniformly from ``min_lines..max_lines``.

    phase_lines: lines ``phase_lines``, ``2 * phase_lines``, ... define milestones (written ``iii!``
        instead of ``iii:``, so the next line sees the new phase); every line of a phase reads the
        phase's milestone (line 0 is the question's seed ``000``).
    phoenix_every: lines ``i`` with ``i % phoenix_every == phoenix_every // 2`` (and the last line) read a
        question fact instead of the previous line: the line names the fact (``qK``, K the previous value),
        copies it from the question (``qK:F``) and adds the copy.
    heldout_mod: one (facts, seed) pair in about ``heldout_mod`` is held out (:func:`is_heldout`).
    """

    min_lines: int = 110
    max_lines: int = 170
    phase_lines: int = 60
    phoenix_every: int = 10
    answer_digits: int = 3
    heldout_mod: int = 61

    def __post_init__(self) -> None:
        for name in ("min_lines", "max_lines", "phase_lines", "phoenix_every", "answer_digits", "heldout_mod"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, got {value!r}")
        if self.phase_lines < 2:
            raise ValueError(f"phase_lines={self.phase_lines} must be >= 2")
        if self.phoenix_every < 2:
            raise ValueError(f"phoenix_every={self.phoenix_every} must be >= 2")
        if not 1 <= self.answer_digits <= 9:
            raise ValueError(f"answer_digits={self.answer_digits} must be in 1..9")
        if not max(self.phase_lines, self.answer_digits) <= self.min_lines <= self.max_lines <= 999:
            raise ValueError(
                "need max(phase_lines, answer_digits) <= min_lines <= max_lines <= 999 (3-digit labels), got "
                f"min_lines={self.min_lines}, max_lines={self.max_lines}, phase_lines={self.phase_lines}"
            )
        if self.heldout_mod < 2:
            raise ValueError(f"heldout_mod={self.heldout_mod} must be >= 2")

    @property
    def prompt_tokens(self) -> int:
        """Tokens of every question, ``<s>`` included (the same for all problems)."""
        return len(format_milestone_question(np.zeros(10, dtype=np.int64), 0, self.min_lines)) + 1

    def line_kind(self, i: int, lines: int) -> str:
        """``"phoenix"`` (reads a fact), ``"milestone"`` (defines one) or ``"filler"`` for line ``i`` of ``lines``."""
        if i == lines or i % self.phoenix_every == self.phoenix_every // 2:
            return "phoenix"
        return "milestone" if i % self.phase_lines == 0 else "filler"

    def milestone_of(self, i: int) -> int:
        """Label of the milestone line ``i`` reads (0: the question's seed)."""
        return self.phase_lines * ((i - 1) // self.phase_lines)

    def cot_tokens(self, lines: int) -> int:
        """Tokens after the prompt: the lines, ``A:`` and the answer, ``</s>`` excluded."""
        phoenix = sum(self.line_kind(i, lines) == "phoenix" for i in range(1, lines + 1))
        return 14 * lines + phoenix + len(ANSWER_MARK) + self.answer_digits

    @property
    def seq_len(self) -> int:
        """Longest training sequence: prompt + longest chain + ``</s>``."""
        return self.prompt_tokens + max(self.cot_tokens(k) for k in range(self.min_lines, self.max_lines + 1)) + 1


MILESTONE_SPEC = MilestoneSpec()


@dataclass(frozen=True)
class Trace:
    """What one sequence reads. ``reads``: ``(step, positions)`` pairs, each position ``< step``;
    ``length``: tokens of the whole sequence (prompt, chain and ``</s>``); steps run from
    ``prompt_len`` to ``length - 1``. ``rebuild``: ``(position, sets)`` pairs: each set of positions
    determines the token at ``position`` without reading it (a step can use a set once all of it is
    written), so a model may recompute that token from them. ``read_rebuild``: ``(step, position, sets)``
    triples, sets that determine what that one step needs from ``position`` (not the whole token)."""

    prompt_len: int
    length: int
    reads: tuple[tuple[int, tuple[int, ...]], ...]
    rebuild: tuple[tuple[int, tuple[tuple[int, ...], ...]], ...] = ()
    read_rebuild: tuple[tuple[int, int, tuple[tuple[int, ...], ...]], ...] = ()

    def __post_init__(self) -> None:
        for name in ("prompt_len", "length"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, got {value!r}")
        if not 1 <= self.prompt_len <= self.length:
            raise ValueError(f"need 1 <= prompt_len <= length, got prompt_len={self.prompt_len}, length={self.length}")
        for step, positions in self.reads:
            if not self.prompt_len <= step < self.length:
                raise ValueError(f"read step {step} is outside the decode steps {self.prompt_len}..{self.length - 1}")
            for p in positions:
                if not 0 <= p < step:
                    raise ValueError(f"step {step} reads position {p}; allowed: 0..{step - 1} (already written)")
        for p, sets in (*self.rebuild, *((p, sets) for _, p, sets in self.read_rebuild)):
            for q in (p, *(q for group in sets for q in group)):
                if not 0 <= q < self.length:
                    raise ValueError(f"rebuild of position {p} names position {q}; allowed: 0..{self.length - 1}")

    @property
    def chain_tokens(self) -> int:
        """Tokens generated after the prompt (``</s>`` included): what a fractional budget scales."""
        return self.length - self.prompt_len


@dataclass(frozen=True, kw_only=True)
class MilestoneProblem(Chain):
    """One milestone-task problem: its question facts and ``trace``, the exact reads of every decode
    step (positions count ``<s>`` as 0), besides the chain."""

    facts: tuple[int, ...]
    trace: Trace
    noisy: tuple[int, ...] = ()  # positions of values drawn at random instead of by the rule (training noise)


def format_milestone_question(facts, seed: int, lines: int) -> str:
    pairs = ",".join(f"q{k}:{int(f)}" for k, f in enumerate(facts))  # ":" as in a line label, never "q<d>=" (a chain line)
    return f"{pairs};000={int(seed)};n={int(lines):03d}\n"


def _milestone_problem(facts, seed: int, lines: int, spec: MilestoneSpec, noise=None) -> MilestoneProblem:
    """One problem. ``noise`` (training only, see :func:`encode_milestone_batch`): per line a shift 1..9
    added to the line's value (mod 10), or 0 to keep the rule's; the shifted values' positions go to
    ``noisy`` and read nothing in the trace, and later lines read the values as written."""
    facts = [int(x) for x in facts]
    question = format_milestone_question(facts, seed, lines)
    base = 1 + len(question)  # position of the chain's first token (<s> is position 0)
    fact_pos = [1 + question.index(f"q{k}:") + 3 for k in range(10)]
    seed_pos = 1 + question.index(";000=") + 5
    n_pos = 1 + question.index(";n=") + 3
    vpos = {0: seed_pos}  # line label -> position of its value token
    values = [int(seed)]
    parts, reads, noisy, cur = [], [], [], base
    rebuild = {}  # position -> the position sets that determine its token (Trace.rebuild)
    for i in range(1, lines + 1):
        a = spec.milestone_of(i)
        prev = values[i - 1]
        kind = spec.line_kind(i, lines)
        if kind == "phoenix":  # "iii:mmm+qK:F=v": key K = previous value, F copied fact K
            operand, b_val, b_pos = f"q{prev}:{facts[prev]}", facts[prev], cur + 11
            reads.append((cur + 9, (vpos[i - 1],)))  # writing the fact's key digit needs the previous value
            reads.append((cur + 11, (fact_pos[prev],)))  # copying the fact reads the question
            rebuild.setdefault(fact_pos[prev], []).append((cur + 11,))  # ... or an earlier copy
        else:
            operand, b_val, b_pos = f"{i - 1:03d}", prev, vpos[i - 1]
        v = (values[a] + b_val + i) % 10
        sep = "!" if kind == "milestone" else ":"  # a milestone line says so
        text = f"{i:03d}{sep}{a:03d}+{operand}={v}\n"
        vp = cur + len(text) - 2
        if noise is not None and noise[i] > 0:
            v = (v + int(noise[i])) % 10
            text = text[:-2] + f"{v}\n"
            noisy.append(vp)
        else:
            reads.append((vp, tuple(sorted({vpos[a], b_pos}))))
            rebuild.setdefault(vpos[a], []).append((b_pos, vp))  # value(a) = v - b - i (mod 10)
        vpos[i] = vp
        values.append(v)
        parts.append(text)
        cur += len(text)
    d = spec.answer_digits
    answer = "".join(str(x) for x in values[lines - d + 1:])
    reads.append((cur, (n_pos, n_pos + 1, n_pos + 2)))  # stopping ("A") needs the line count
    for k in range(d):
        reads.append((cur + 2 + k, (vpos[lines - d + 1 + k],)))
    cot = "".join(parts) + ANSWER_MARK + answer
    trace = Trace(prompt_len=base, length=base + len(cot) + 1, reads=tuple(reads),
                  rebuild=tuple((p, tuple(sets)) for p, sets in sorted(rebuild.items())))
    return MilestoneProblem(facts=tuple(facts), seed=int(seed), lines=int(lines), values=tuple(values),
                            question=question, cot=cot, answer=answer, trace=trace, noisy=tuple(noisy))


def milestone_dataset(n: int, seed: int = 0, spec: MilestoneSpec = MILESTONE_SPEC,
                      split: str = "heldout") -> list[MilestoneProblem]:
    """``n`` milestone-task problems, deterministic in ``seed``; held-out ones by default."""
    _check_count("n", n)
    if not isinstance(spec, MilestoneSpec):
        raise TypeError(f"spec must be a MilestoneSpec, got {type(spec).__name__}")
    facts, seeds, lines = sample(np.random.default_rng(seed), n, spec, split)
    return [_milestone_problem(f, s, k, spec) for f, s, k in zip(facts, seeds, lines)]


def make_milestone_problem(rng: np.random.Generator, spec: MilestoneSpec = MILESTONE_SPEC,
                           split: str = "any") -> MilestoneProblem:
    """One milestone-task problem drawn from ``rng`` (a ``numpy.random.Generator``)."""
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    return _milestone_problem(*(x[0] for x in sample(rng, 1, spec, split)), spec)


def encode_milestone_batch(rng: np.random.Generator, n: int, spec: MilestoneSpec = MILESTONE_SPEC,
                           split: str = "train", value_noise: float = 0.0):
    """A batch of whole milestone-task problems as token ids: ``(ids [n, spec.seq_len] int64, lengths [n],
    noisy [n, spec.seq_len] bool)``, ``<s>`` question chain ``</s>``, right padded with ``<pad>``; the first
    ``spec.prompt_tokens`` tokens are the question (the same layout as :func:`encode_batch`).

    ``value_noise`` (training only): each line but the last ``answer_digits`` has its value replaced,
    with this probability, by a different random digit; later lines read the value as written, and
    ``noisy`` marks the replaced value tokens (to leave out of the loss). A line's value then no longer
    follows from the two lines before it (v(i) = 2 v(i-1) - v(i-2) + 1 holds only without noise), so a
    model has to read the milestone it names."""
    if isinstance(value_noise, bool) or not isinstance(value_noise, (int, float)) or not 0 <= value_noise < 1:
        raise ValueError(f"value_noise={value_noise!r} must be a number in [0, 1)")
    facts, seeds, lines = sample(rng, n, spec, split)
    noise = None
    if value_noise > 0:
        shift = rng.integers(1, 10, size=(n, spec.max_lines + 1))  # added to the rule's value: another digit
        noise = np.where(rng.random(shift.shape) < value_noise, shift, 0)
        for j, k in enumerate(lines):
            noise[j, 0] = 0
            noise[j, k - spec.answer_digits + 1:] = 0  # the answer's lines stay exact
    return _encode_milestone(facts, seeds, lines, spec, noise)


def _encode_milestone(facts, seeds, lines, spec: MilestoneSpec, noise=None):
    ids = np.full((len(seeds), spec.seq_len), PAD, dtype=np.int64)
    lengths = np.zeros(len(seeds), dtype=np.int64)
    noisy = np.zeros((len(seeds), spec.seq_len), dtype=bool)
    for j, (f, s, k) in enumerate(zip(facts, seeds, lines)):
        p = _milestone_problem(f, s, k, spec, None if noise is None else noise[j])
        row = np.concatenate([encode_text(p.question + p.cot), [EOS]])
        ids[j, :len(row)] = row
        lengths[j] = len(row)
        noisy[j, list(p.noisy)] = True
    return ids, lengths, noisy
