"""The milestone task (raas_flex.testbed) and the oracle retention analysis (raas_flex.oracle).

- Acceptance: on 40 held-out problems, at a budget of 1/4 of the mean chain, LRU pages with the prompt
  pinned (RaaS with perfect importance) lose no needed token, while recency with the prompt pinned,
  StreamingLLM and H2O with perfect importance each lose one in at least half of the chains.
- With rebuilding allowed (a token that resident tokens determine is not lost), recency loses
  nothing: the task's limit, kept measured; the rebuild sets are checked against the text.
- The generator, checked by an independent reading of the text (every line re-evaluated, the answer,
  the trace's reads point at the named values, milestone/filler/phoenix use), chain and prompt sizes,
  determinism, the tokenizer round trip, the batch encoder and the held-out split.
- The simulator on hand-made traces and on random ones (hypothesis): nothing is lost when the budget
  holds the whole sequence, recency keeps exactly its window, H2O never loses its protected pages, and
  LRU never loses a page fewer than (unpinned budget) other pages were touched since its last use;
  rebuilding changes no eviction and splits the losses exactly by its resident sets.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from raas_flex import oracle
from raas_flex import testbed as tb

SPEC = tb.MILESTONE_SPEC
QUESTION = re.compile(r"((?:q\d:\d,){9}q\d:\d);000=(\d);n=(\d{3})\n")
LINE = re.compile(r"(\d{3})([:!])(\d{3})\+(\d{3}|q\d:\d)=(\d)\n")


@lru_cache(maxsize=1)
def heldout40():
    return tb.milestone_dataset(40, seed=0)


@lru_cache(maxsize=1)
def tokenizer():
    return tb.build_tokenizer()


# -- acceptance -------------------------------------------------------------------------------------------------
def test_oracle_acceptance_at_a_quarter_of_the_chain():
    table = oracle.oracle_table([p.trace for p in heldout40()], fractions=(0.125, 0.25, 0.5))
    quarter = table["fractions"].index(0.25)
    share = {k: v[quarter] for k, v in table["loss_share"].items()}
    assert table["budgets"][quarter] % 16 == 0
    assert share["lru"] == 0.0, share
    for policy in ("recency", "streaming", "h2o"):
        assert share[policy] >= 0.5, (policy, share)
    md = oracle.markdown_table(table)
    assert md.count("\n| (") == 4 and "0.25 (" in md


def test_recency_loses_nothing_a_model_could_not_rebuild():
    """The task's limit, measured: every clean reader of a milestone reveals its value (v = m + b + i),
    so with rebuilding allowed recency (question pinned) loses nothing at any budget, while
    StreamingLLM still loses the question's facts (docs/testbed.md)."""
    traces = [p.trace for p in heldout40()]
    plain = oracle.oracle_table(traces, fractions=(0.125, 0.25, 0.5))
    table = oracle.oracle_table(traces, fractions=(0.125, 0.25, 0.5), rebuild=True)
    assert table["rebuild"] is True and "cannot rebuild" in oracle.markdown_table(table)
    assert min(plain["loss_share"]["recency"][:2]) == 1.0
    assert table["loss_share"]["recency"] == [0.0, 0.0, 0.0] and table["loss_share"]["lru"] == [0.0, 0.0, 0.0]
    assert min(table["loss_share"]["streaming"]) == 1.0


def test_rebuild_sets_determine_their_token():
    """Independent check of ``Trace.rebuild`` on the text: a fact's other sources are copies of it; a
    milestone value follows from each reader line's operand and value (m = v - b - i mod 10); every
    set is written before a step that reads the token could use it."""
    for prob in heldout40()[:8]:
        text = "^" + prob.question + prob.cot  # position k is text[k] ("^" stands for <s>)
        assert prob.trace.rebuild
        for pos, sets in prob.trace.rebuild:
            for group in sets:
                if len(group) == 1:
                    c = group[0]  # "qK:F" in a chain line, the question's "qK:F" at pos
                    assert text[c - 3:c + 1] == text[pos - 3:pos + 1] and text[c - 3] == "q" and c > pos
                else:
                    b, v = group
                    start = text.rindex("\n", 0, v) + 1
                    i = int(text[start:start + 3])
                    assert b < v and (int(text[pos]) + int(text[b]) + i) % 10 == int(text[v])
                    owner = text[pos - 4:pos - 1] if text[pos - 5] == ";" else text[text.rindex("\n", 0, pos) + 1:][:3]
                    assert text[start + 4:start + 7] == owner  # the reader names the milestone at pos


def test_oracle_cli_prints_the_table(capsys):
    table = oracle.main(["--problems", "4", "--seed", "1"])
    out = capsys.readouterr().out
    assert "| policy |" in out and table["problems"] == 4 and len(table["budgets"]) == 3
    with pytest.raises(ValueError, match="--fractions"):
        oracle.main(["--problems", "2", "--fractions", "a,0.5"])


# -- the generator ------------------------------------------------------------------------------------------------
def read_problem(question: str, cot: str, exact: bool = True):
    """Independent reading: returns (values by name, value positions by name, reads by line, lines).
    ``exact``: every line's value follows the rule (False: training noise may have replaced some)."""
    m = QUESTION.fullmatch(question)
    assert m, question
    values = {k: int(v) for k, v in (kv.split(":") for kv in m.group(1).split(","))}
    values["000"] = int(m.group(2))
    n = int(m.group(3))
    pos = {k: 1 + question.index(f"{k}{':' if k.startswith('q') else '='}") + len(k) + 1 for k in values}
    base = 1 + len(question)
    body, answer = cot.rsplit("A:", 1)
    lines = LINE.findall(body)
    assert "".join(f"{a}{sep}{b}+{c}={d}\n" for a, sep, b, c, d in lines) == body
    assert len(lines) == n
    off, operands, copies = base, [], []
    lines = [(label, a, b, v) for label, _, a, b, v in lines]
    for i, (label, a, b, v) in enumerate(lines, start=1):
        assert label == f"{i:03d}"
        marked = i % SPEC.phase_lines == 0 and not (i == n or i % SPEC.phoenix_every == SPEC.phoenix_every // 2)
        assert body.split("\n")[i - 1][3] == ("!" if marked else ":")  # milestone lines say so
        assert a == f"{SPEC.phase_lines * ((i - 1) // SPEC.phase_lines):03d}"  # the current milestone
        prev = values[f"{i - 1:03d}"]
        phoenix = i == n or i % SPEC.phoenix_every == SPEC.phoenix_every // 2
        if phoenix:  # names fact q<prev> and copies it: the value reads the copy, the copy reads the question
            key = f"q{prev}"
            assert b == f"{key}:{values[key]}"
            pos[f"{label}/{key}"] = off + len(f"{label}:{a}+{b}") - 1
            copies.append((pos[f"{label}/{key}"], pos[key]))
            b = f"{label}/{key}"
            values[b] = values[key]
        else:
            assert b == f"{i - 1:03d}"
        assert int(v) == (values[a] + values[b] + i) % 10 or not exact, (i, a, b, v)
        values[label] = int(v)
        pos[label] = off + len(lines[i - 1][0]) + 1 + len(f"{a}+{lines[i - 1][2]}=")
        operands.append((a, b))
        off += len(f"{label}:{a}+{lines[i - 1][2]}={v}\n")
    assert answer == "".join(str(values[f"{i:03d}"]) for i in range(n - SPEC.answer_digits + 1, n + 1))
    return values, pos, operands, n


def test_generator_chains_answers_and_reads():
    problems = heldout40()
    lengths = [len(tb.encode_text(p.cot, bos=False)) for p in problems]
    budget = oracle.budgets_for([p.trace for p in problems], (0.25,))[0]
    for p, cot_len in zip(problems, lengths):
        assert cot_len >= 1500 and SPEC.prompt_tokens <= 0.1 * cot_len
        assert p.trace.prompt_len == SPEC.prompt_tokens == len(tb.encode_text(p.question))
        assert p.trace.length == SPEC.prompt_tokens + cot_len + 1 == len(tb.encode_text(p.question + p.cot)) + 1
        assert tb.parse_answer(p.cot) == p.answer
        values, pos, operands, n = read_problem(p.question, p.cot)
        # the trace: each line's value step reads exactly the named operands' value tokens
        value_reads = {step: set(ps) for step, ps in p.trace.reads}
        for i, (a, b) in enumerate(operands, start=1):
            assert value_reads[pos[f"{i:03d}"]] == {pos[a], pos[b]}
            if "/" in b:  # the copy of a fact reads the question's fact
                assert value_reads[pos[b]] == {pos[b.split("/")[1]]}
        full = "\0" + p.question + p.cot  # position 0 is <s>
        for step, ps in p.trace.reads:
            assert all(full[q].isdigit() and full[q - 1] in "=:" or q >= 1 + p.question.index(";n=") for q in ps)
        # milestones: read by every line of their phase, over a span longer than the 1/4 budget, then never
        spans = []
        for m in range(SPEC.phase_lines, n, SPEC.phase_lines):
            readers = [i for i, (a, _) in enumerate(operands, start=1) if a == f"{m:03d}"]
            assert readers == list(range(m + 1, min(m + SPEC.phase_lines, n) + 1))
            spans.append(pos[f"{readers[-1]:03d}"] - pos[f"{m:03d}"])
        assert max(spans) > budget
        # filler: every other chain value is read once (the next line) and never again
        uses = {}
        for step, ps in p.trace.reads:
            for q in ps:
                uses.setdefault(q, set()).add(step)
        milestones = {pos[f"{m:03d}"] for m in range(SPEC.phase_lines, n, SPEC.phase_lines)}
        for i in range(1, n - SPEC.answer_digits + 1):
            q = pos[f"{i:03d}"]
            if q not in milestones:
                assert max(uses[q]) - q < 2 * 14, i  # used by the next line only
        # phoenix: some question fact is read again more than the 1/4 budget after it was written or last read
        fact_steps = sorted({(q, s) for s, ps in p.trace.reads for q in ps if q < p.trace.prompt_len}
                            | {(q, q) for s, ps in p.trace.reads for q in ps if q < p.trace.prompt_len})
        gaps = [s2 - s1 for (q1, s1), (q2, s2) in zip(fact_steps, fact_steps[1:]) if q1 == q2]
        assert gaps and max(gaps) > budget


def test_generator_is_deterministic_and_the_encoder_matches_the_text():
    a, b = tb.milestone_dataset(3, seed=7), tb.milestone_dataset(3, seed=7)
    assert [p.to_json() for p in a] == [p.to_json() for p in b] and a[0].trace == b[0].trace
    assert [p.cot for p in tb.milestone_dataset(3, seed=8)] != [p.cot for p in a]
    ids, lengths, noisy = tb.encode_milestone_batch(np.random.default_rng(0), 4)
    assert ids.shape == (4, SPEC.seq_len) and (lengths <= SPEC.seq_len).all()
    again, _, _ = tb.encode_milestone_batch(np.random.default_rng(0), 4)
    np.testing.assert_array_equal(ids, again)
    facts, seeds, lines = tb.sample(np.random.default_rng(0), 4, SPEC, "train")
    for j in range(4):
        p = tb._milestone_problem(facts[j], seeds[j], lines[j], SPEC)
        row = np.concatenate([tb.encode_text(p.question + p.cot), [tb.EOS]])
        assert lengths[j] == len(row) == p.trace.length
        np.testing.assert_array_equal(ids[j, :len(row)], row)
        assert (ids[j, len(row):] == tb.PAD).all()
    assert SPEC.seq_len == SPEC.prompt_tokens + SPEC.cot_tokens(SPEC.max_lines) + 1
    assert not noisy.any()


def test_value_noise_breaks_the_two_line_shortcut_and_marks_what_to_leave_out():
    """Training noise: about the requested share of line values is replaced by another digit, later lines
    read the written value (each line still follows the rule from what is written before it), the
    answer's lines stay exact, the noisy positions are marked, and v(i) = 2 v(i-1) - v(i-2) + 1 (which
    holds on every clean phase line) fails where noise sits."""
    rng = np.random.default_rng(5)
    ids, lengths, noisy = tb.encode_milestone_batch(rng, 40, SPEC, "train", value_noise=0.25)
    shortcut_ok = shortcut_n = replaced = lines_total = 0
    for j in range(40):
        text = "".join(tb.VOCAB[t] for t in ids[j, 1:lengths[j] - 1])
        question, _, cot = text.partition("\n")
        values, pos, operands, n = read_problem(question + "\n", cot, exact=False)
        chain_lines = cot.split("\n")[:-1]
        base = 1 + len(question) + 1
        start = base
        for i, line in enumerate(chain_lines, start=1):
            a, b = operands[i - 1]
            vp = start + len(line) - 1
            rule = (values[a] + values[b] + i) % 10
            v = values[f"{i:03d}"]
            assert noisy[j, vp] == (v != rule)
            if noisy[j, vp]:
                assert i <= n - SPEC.answer_digits
            replaced += v != rule
            lines_total += 1
            if i >= 3 and SPEC.line_kind(i, n) != "phoenix" and SPEC.line_kind(i - 1, n) != "phoenix" and \
                    SPEC.milestone_of(i) == SPEC.milestone_of(i - 1) and (i - 1) % SPEC.phase_lines:
                shortcut_n += 1
                shortcut_ok += v == (2 * values[f"{i - 1:03d}"] - values[f"{i - 2:03d}"] + 1) % 10
            start += len(line) + 1
        assert noisy[j].sum() == sum(1 for x in noisy[j] if x)
    assert 0.2 < replaced / lines_total < 0.3
    assert shortcut_ok / shortcut_n < 0.7  # without noise it is 1.0 (below)
    clean, clean_len, _ = tb.encode_milestone_batch(np.random.default_rng(5), 4, SPEC, "train")
    for j in range(4):
        text = "".join(tb.VOCAB[t] for t in clean[j, 1:clean_len[j] - 1])
        question, _, cot = text.partition("\n")
        values, _, _, n = read_problem(question + "\n", cot)
        for i in range(3, n + 1):
            if SPEC.line_kind(i, n) != "phoenix" and SPEC.line_kind(i - 1, n) != "phoenix" and \
                    SPEC.milestone_of(i) == SPEC.milestone_of(i - 1) and (i - 1) % SPEC.phase_lines:
                assert values[f"{i:03d}"] == (2 * values[f"{i - 1:03d}"] - values[f"{i - 2:03d}"] + 1) % 10
    with pytest.raises(ValueError, match="value_noise=1.0 must be a number in \\[0, 1\\)"):
        tb.encode_milestone_batch(rng, 2, SPEC, "train", value_noise=1.0)


@given(st.integers(0, 2**32 - 1))
def test_tokenizer_round_trip(seed):
    p = tb.make_milestone_problem(np.random.default_rng(seed))
    text = p.question + p.cot
    tok = tokenizer()
    ids = tok(text).input_ids
    assert ids == tb.encode_text(text).tolist() and tb.UNK not in ids
    assert tok.decode(ids, skip_special_tokens=True) == text


def test_heldout_split_is_disjoint_from_training():
    rng = np.random.default_rng(0)
    train = tb.sample(rng, 4000, SPEC, "train")
    held = tb.sample(rng, 300, SPEC, "heldout")
    key = lambda f, s: {tuple(x) + (int(y),) for x, y in zip(f, s)}  # noqa: E731
    assert not key(train[0], train[1]) & key(held[0], held[1])
    assert not tb.is_heldout(train[0], train[1], SPEC).any() and tb.is_heldout(held[0], held[1], SPEC).all()
    assert all(tb.is_heldout(np.array(p.facts), np.array(p.seed), SPEC) for p in heldout40())


def test_milestone_spec_rejects_bad_input():
    with pytest.raises(ValueError, match="phase_lines=1"):
        tb.MilestoneSpec(phase_lines=1)
    with pytest.raises(ValueError, match="min_lines=50"):
        tb.MilestoneSpec(min_lines=50)
    with pytest.raises(TypeError, match="phoenix_every"):
        tb.MilestoneSpec(phoenix_every=2.5)
    with pytest.raises(ValueError, match="split='test'"):
        tb.milestone_dataset(2, split="test")
    with pytest.raises(TypeError, match="spec must be a MilestoneSpec"):
        tb.milestone_dataset(2, spec=tb.DEFAULT_SPEC)
    with pytest.raises(TypeError, match="rng"):
        tb.make_milestone_problem(0)


# -- the simulator --------------------------------------------------------------------------------------------------
def hand_trace():
    # page_size 4, prompt = page 0 (positions 0..3), budget 3 pages. Position 5 (page 1) is read at
    # steps 10, 15 and 19; the prompt's position 1 at step 18.
    return oracle.Trace(prompt_len=4, length=21, reads=((10, (5,)), (15, (5,)), (18, (1,)), (19, (5,))))


def test_simulator_hand_made_trace():
    t = hand_trace()
    sim = {p: oracle.simulate(t, 12, p, page_size=4) for p in oracle.POLICIES}
    # LRU: page 1 was refreshed at step 10, so the new page at step 13 evicts page 2 (opened at 9), and the
    # one at step 17 evicts page 3 (13) rather than page 1 (15): nothing lost.
    assert sim["lru"].lost == [] and sim["lru"].evictions == 2
    # recency and streaming evict page 1 at step 13 (oldest after the pinned page 0)
    assert sim["recency"].lost == sim["streaming"].lost == [(15, 5), (19, 5)]
    # H2O (one protected page: the new one) evicts page 0 at step 13 (0 reads, the lowest) and loses it
    assert sim["h2o"].lost == [(18, 1)]


def test_simulator_rejects_bad_input():
    t = hand_trace()
    with pytest.raises(ValueError, match="policy='quest'"):
        oracle.simulate(t, 12, "quest", page_size=4)
    with pytest.raises(ValueError, match="budget=10 must be a multiple of page_size=4"):
        oracle.simulate(t, 10, "lru", page_size=4)
    with pytest.raises(ValueError, match="budget=4 holds 1 pages"):
        oracle.simulate(t, 4, "lru", page_size=4)
    with pytest.raises(TypeError, match="budget must be an int"):
        oracle.simulate(t, 12.0, "lru", page_size=4)
    with pytest.raises(TypeError, match="trace must be"):
        oracle.simulate([(5, (1,))], 12, "lru")
    with pytest.raises(ValueError, match="reads position 7"):
        oracle.Trace(prompt_len=4, length=10, reads=((6, (7,)),))
    with pytest.raises(ValueError, match="fractions"):
        oracle.budgets_for([t], (1.5,))
    with pytest.raises(ValueError, match="rebuild of position 5 names position 30"):
        oracle.Trace(prompt_len=4, length=21, reads=((10, (5,)),), rebuild=((5, ((30,),)),))
    with pytest.raises(TypeError, match="rebuild must be True or False"):
        oracle.simulate(t, 12, "lru", page_size=4, rebuild=1)


@st.composite
def traces(draw):
    ps = draw(st.sampled_from([2, 4]))
    prompt = draw(st.integers(1, 12))
    length = prompt + draw(st.integers(1, 90))
    steps = draw(st.lists(st.integers(prompt, length - 1), max_size=40, unique=True))
    reads = tuple((s, tuple(sorted(set(draw(st.lists(st.integers(0, s - 1), min_size=1, max_size=3))))))
                  for s in sorted(steps))
    extra = draw(st.integers(1, 8))
    read = sorted({q for _, qs in reads for q in qs})
    rebuilt = draw(st.lists(st.sampled_from(read), unique=True)) if read else []
    def groups(q):  # sources written after the token, as on the milestone task (so often still resident)
        group = st.lists(st.integers(q, length - 1), min_size=1, max_size=2).map(lambda g: tuple(sorted(set(g))))
        return st.lists(group, max_size=3)
    rebuild = tuple((q, tuple(draw(groups(q)))) for q in rebuilt)
    return oracle.Trace(prompt, length, reads, rebuild), ps, (-(-prompt // ps) + extra) * ps


@given(traces(), st.sampled_from(oracle.POLICIES))
def test_rebuilding_keeps_the_retention_and_splits_the_losses(case, policy):
    """``rebuild=True`` changes no eviction; a lost read is rebuilt exactly when one of its sets is
    written before the step and wholly resident at it."""
    t, ps, budget = case
    plain = oracle.simulate(t, budget, policy, page_size=ps, record=True)
    res = oracle.simulate(t, budget, policy, page_size=ps, record=True, rebuild=True)
    assert res.resident == plain.resident and res.evictions == plain.evictions
    assert sorted(res.lost + res.rebuilt) == sorted(plain.lost)
    sets_of = dict(t.rebuild)
    for s, q in plain.lost:
        live = set(res.resident[s - t.prompt_len])
        ok = any(max(g) < s and all(x // ps in live for x in g) for g in sets_of.get(q, ()))
        assert ((s, q) in res.rebuilt) == ok


@given(traces())
def test_nothing_is_lost_when_the_budget_holds_everything(case):
    t, ps, _ = case
    budget = max(-(-t.length // ps), -(-t.prompt_len // ps) + 1) * ps
    for policy in oracle.POLICIES:
        res = oracle.simulate(t, budget, policy, page_size=ps)
        assert res.lost == [] and res.evictions == 0


@given(traces())
def test_window_policies_keep_exactly_their_window(case):
    t, ps, budget = case
    cap, prompt_pages = budget // ps, -(-t.prompt_len // ps)
    for policy, pinned in (("recency", set(range(prompt_pages))), ("streaming", {0})):
        window = cap - len(pinned)
        expected = [(s, q) for s, qs in t.reads for q in qs
                    if q // ps not in pinned and (s - 1) // ps - q // ps >= window]
        assert oracle.simulate(t, budget, policy, page_size=ps).lost == expected


@given(traces(), st.sampled_from(oracle.POLICIES))
def test_recorded_residency_explains_every_loss(case, policy):
    """``record=True``: every step's resident pages fit the budget, hold the open page, never bring an
    evicted page back, and a read is lost exactly when its page is not resident at its step."""
    t, ps, budget = case
    res = oracle.simulate(t, budget, policy, page_size=ps, record=True)
    assert res.lost == oracle.simulate(t, budget, policy, page_size=ps).lost
    assert len(res.resident) == t.length - t.prompt_len
    gone = set()
    for step, pages in enumerate(res.resident, start=t.prompt_len):
        assert len(pages) <= budget // ps and (step - 1) // ps in pages and not gone & set(pages)
        if step > t.prompt_len:
            gone |= set(res.resident[step - t.prompt_len - 1]) - set(pages)
    lost = [(s, q) for s, qs in t.reads for q in qs if q // ps not in res.resident[s - t.prompt_len]]
    assert lost == res.lost


@given(traces())
def test_h2o_never_loses_its_protected_recent_pages(case):
    t, ps, budget = case
    protect = budget // ps // 2
    lost = oracle.simulate(t, budget, "h2o", page_size=ps).lost
    assert all((s - 1) // ps - q // ps >= protect for s, q in lost)


@given(traces())
def test_lru_keeps_a_page_until_enough_other_pages_are_used(case):
    """LRU's stack property: a page is not evicted while fewer than (budget pages - prompt pages) other
    unpinned pages were opened or read since its own last use; the prompt's pages are never lost."""
    t, ps, budget = case
    prompt_pages = -(-t.prompt_len // ps)
    unpinned = budget // ps - prompt_pages
    lost = oracle.simulate(t, budget, "lru", page_size=ps).lost
    assert all(q // ps >= prompt_pages for _, q in lost)
    touches = [((q * ps) + 1 if q * ps >= t.prompt_len else t.prompt_len, q)  # page q opens when its first token joins
               for q in range(prompt_pages, -(-t.length // ps))]
    touches += [(s, q // ps) for s, qs in t.reads for q in qs]
    touches.sort()
    first_loss = {}
    for s, q in lost:
        first_loss.setdefault(q // ps, (s, q))
    for s, qs in t.reads:
        for q in qs:
            page = q // ps
            if page < prompt_pages or (page in first_loss and first_loss[page][0] < s):
                continue
            last = max([x for x, p in touches if p == page and x < s], default=s)  # its last use before s
            others = {p for x, p in touches if last <= x <= s and p != page and p >= prompt_pages}
            if len(others) < unpinned:
                assert (s, q) not in lost, (s, q, last, others)


# -- training on the milestone task ----------------------------------------------------------------------------------
def _script(folder: str, name: str):
    """A script of the repository's ``folder`` (examples, benchmarks), imported as a module."""
    import importlib
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / folder))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.pop(0)


def _train_module():
    return _script("examples", "train_testbed")


def test_train_milestone_smoke_with_page_dropout(tmp_path, monkeypatch):
    train = _train_module()
    # called with arguments, the time budget counts from the call, not from the import (a suite that
    # imported the module 20 minutes ago still trains)
    monkeypatch.setattr(train, "T_START", train.time.perf_counter() - 3600)
    log = train.main(["--smoke", "--task", "milestone", "--out", str(tmp_path), "--device", "cpu",
                      "--gen-problems", "1", "--page-dropout", "0.25"])
    assert log["task"] == "milestone" and log["spec"]["phase_lines"] == 6 and log["steps"] == 3
    assert log["args"]["page_dropout"] == 0.25 and log["args"]["window"] is None
    assert all(np.isfinite(e["loss"]) for e in log["loss"]) and 0 <= log["final"]["gen_acc"] <= 1
    assert log["prompt_tokens"] == tb.MILESTONE_SPEC.prompt_tokens
    assert (tmp_path / "model.safetensors").exists()
    with pytest.raises(ValueError, match="--window"):
        train.main(["--smoke", "--task", "milestone", "--out", str(tmp_path), "--window", "20", "40"])
    with pytest.raises(ValueError, match="--page-dropout"):
        train.main(["--smoke", "--task", "milestone", "--out", str(tmp_path), "--page-dropout", "1.0"])


def test_train_milestone_smoke_with_value_noise_leaves_noisy_values_out_of_the_loss(tmp_path):
    import torch

    train = _train_module()
    log = train.main(["--smoke", "--task", "milestone", "--out", str(tmp_path), "--device", "cpu",
                      "--gen-problems", "0", "--value-noise", "0.3"])
    assert log["args"]["value_noise"] == 0.3 and log["steps"] == 3
    assert {"tf_fact_acc", "tf_value_acc"} <= set(log["final"])
    with pytest.raises(ValueError, match="--value-noise 0.2 is for --task milestone or ledger only"):
        train.main(["--smoke", "--out", str(tmp_path), "--value-noise", "0.2"])
    with pytest.raises(ValueError, match="--value-noise must be in"):
        train.main(["--smoke", "--task", "milestone", "--out", str(tmp_path), "--value-noise", "1.0"])

    # the loss: mean cross-entropy over the chain tokens that are not excluded, nothing else
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, len(tb.VOCAB), (2, 12), generator=g)
    ids[1, 10:] = tb.PAD
    logits = torch.randn(2, 11, len(tb.VOCAB), generator=g)
    model = lambda input_ids, attention_mask=None: type("O", (), {"logits": logits})()  # noqa: E731
    exclude = torch.zeros_like(ids, dtype=torch.bool)
    exclude[0, 6] = exclude[1, 8] = True
    got = train.loss_fn(model, ids, 3, exclude=exclude)
    keep = [(b, t) for b in range(2) for t in range(2, 11) if ids[b, t + 1] != tb.PAD and not exclude[b, t + 1]]
    want = torch.stack([torch.nn.functional.cross_entropy(logits[b, t], ids[b, t + 1]) for b, t in keep]).mean()
    assert torch.allclose(got, want)


@pytest.mark.parametrize("recent", [1, 3])
def test_page_dropout_mask_hides_whole_pages_from_queries_past_the_recent_ones(recent):
    import torch

    train = _train_module()
    assert train.page_dropout_mask(torch.Generator(), 2, 40, 0.0) is None
    mask = train.page_dropout_mask(torch.Generator().manual_seed(0), 8, 40, 0.5, page_size=4, recent_pages=recent)[:, 0]
    i, j = torch.meshgrid(torch.arange(40), torch.arange(40), indexing="ij")
    assert not mask[:, i < j].any()  # causal
    assert mask[:, (i >= j) & (i // 4 - j // 4 < recent)].all()  # its own page and the recent ones, always
    for b in range(8):
        for page in range(10):
            seen = mask[b, (page + recent) * 4:, page * 4:(page + 1) * 4]
            assert seen.all() or not seen.any()  # past the recent pages: kept or hidden for every later query
    assert 0 < mask[:, 39, :(10 - recent) * 4].float().mean() < 1
    with pytest.raises(ValueError, match="page dropout p=1.5"):
        train.page_dropout_mask(torch.Generator(), 2, 40, 1.5)
    pinned = train.page_dropout_mask(torch.Generator().manual_seed(0), 8, 40, 0.5, page_size=4, prompt_len=6)[:, 0]
    assert pinned[:, i >= j][:, (j < 8)[i >= j]].all() and not pinned[:, 39, 8:36].all()  # the prompt's 2 pages stay
    with pytest.raises(ValueError, match="recent_pages=0"):
        train.page_dropout_mask(torch.Generator(), 2, 40, 0.5, recent_pages=0)


def test_page_dropout_spread_draws_one_rate_per_sequence():
    import torch

    train = _train_module()
    n, length = 400, 4 * 200
    fixed = train.page_dropout_mask(torch.Generator().manual_seed(0), n, length, 0.9, page_size=4)[:, 0]
    spread = train.page_dropout_mask(torch.Generator().manual_seed(0), n, length, 0.9, page_size=4, spread=True)[:, 0]
    hidden_fixed = 1 - fixed[:, -1, :-4].float().mean(-1)  # share of pages the last query cannot see, per row
    hidden_spread = 1 - spread[:, -1, :-4].float().mean(-1)
    assert (hidden_fixed - 0.9).abs().max() < 0.12  # every row near the one rate
    assert hidden_spread.min() < 0.1 and hidden_spread.max() > 0.8  # rows from nearly dense to sparse
    assert abs(hidden_spread.mean().item() - 0.45) < 0.05  # rates uniform in [0, 0.9)
    with pytest.raises(ValueError, match="--dropout-spread"):
        train.parse_args(["--out", "x", "--task", "milestone", "--dropout-spread"])


def test_no_early_stop_trains_past_the_target(tmp_path, monkeypatch):
    train = _train_module()
    args = ["--smoke", "--task", "milestone", "--gen-problems", "0", "--target", "0.0", "--eval-every", "0"]
    stopped = train.main(args + ["--out", str(tmp_path / "a")])
    assert stopped["stop_reason"] == "target" and stopped["steps"] == 1
    full = train.main(args + ["--out", str(tmp_path / "b"), "--no-early-stop", "--steps", "3"])
    assert full["stop_reason"] == "steps" and full["steps"] == 3


def test_default_model_fits_25_mb():
    train = _train_module()
    model = train.build_model("llama", 4, 256, 8, 2, 32, 1024, max_positions=2 * tb.MILESTONE_SPEC.seq_len)
    assert model.config.model_type == "llama"
    assert sum(p.numel() * p.element_size() for p in model.parameters()) <= 25e6


# -- the model under an oracle's retention (benchmarks/oracle_retention.py) --------------------------------------------
def _oracle_retention_module():
    return _script("benchmarks", "oracle_retention")


@given(traces(), st.sampled_from(oracle.POLICIES))
def test_retention_mask_shows_each_query_exactly_its_steps_resident_pages(case, policy):
    orr = _oracle_retention_module()
    t, ps, budget = case
    res = oracle.simulate(t, budget, policy, page_size=ps, record=True)
    n = t.length - 1  # input positions: every token but the last
    mask = orr.retention_mask(res, t.prompt_len, n, ps)
    for q in range(n):
        seen = {k for k in range(n) if mask[q, k]}
        if q < t.prompt_len - 1:  # the prompt's own queries: plain causal
            assert seen == set(range(q + 1))
        else:  # the query producing token q + 1 sees the pages resident at step q + 1, causally
            pages = set(res.resident[q + 1 - t.prompt_len])
            assert seen == {k for k in range(q + 1) if k // ps in pages}
    first = -(-t.prompt_len // ps)  # the probe: the first 2 chain pages stay visible to every later query
    probe = orr.retention_mask(res, t.prompt_len, n, ps, keep_chain_start=2)
    assert (probe | ~mask).all() and all(probe[q, k] for q in range(n) for k in range(min(q + 1, (first + 2) * ps))
                                         if k >= first * ps)


def test_oracle_retention_runs_the_shipped_milestone_model(tmp_path):
    """The whole script on one problem: dense and the LRU oracle at 1/2 (rates, not a verdict)."""
    orr = _oracle_retention_module()
    model = Path(__file__).resolve().parents[1] / "models" / "milestone"
    result = orr.main(["--model", str(model), "--problems", "1", "--fractions", "0.5", "--policies", "lru",
                       "--out", str(tmp_path), "--name", "r"])
    assert result["dense"]["solved"] == 1.0  # the shipped model solves its held-out problem densely
    cell = result["rows"]["lru"][0]
    assert 0 <= cell["value_acc"] <= 1 and cell["budget"] == result["budgets"][0]
    assert json.loads((tmp_path / "r.json").read_text())["rows"]["lru"][0] == cell
    with pytest.raises(ValueError, match="'quest' is not an oracle policy"):
        orr.main(["--model", str(model), "--policies", "quest", "--out", str(tmp_path)])
