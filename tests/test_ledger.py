"""The ledger task (raas_flex.ledger): a testbed whose milestones a recent window cannot rebuild.

- Acceptance (oracle with rebuilding, 1/4 of the mean chain): LRU with the prompt pinned loses no chain
  on 4 seeds x 200 held-out problems, nor when the ledgers' alignment moves (phase lengths 95..105, page
  sizes 8 and 32); recency (prompt pinned) loses in >= 80% of chains, StreamingLLM and H2O in >= 50%.
- The rebuild rule against brute force over the digits: no set of past reads determines a read's product
  unless one of them or a pair does (``minimal_sets``), hypothesis over multiplier lists.
- The generator against an independent reading of the text: every line re-evaluated, ledgers copied,
  the answer; the trace's reads and rebuild sets point at what the text says; sizes and the prompt share.
- The per-read rebuild sets in the simulator (``Trace.read_rebuild``), the batch encoder, bad input.
- ``examples/train_testbed.py --task ledger --smoke`` trains and evaluates; ``benchmarks/accuracy.py``'s
  ``diagnose_ledger`` names the first wrong line's kind.
"""

from __future__ import annotations

import re
from functools import lru_cache
from itertools import combinations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from raas_flex import ledger as lg
from raas_flex import oracle
from raas_flex import testbed as tb

SPEC = lg.LEDGER_SPEC
QUESTION = re.compile(r"((?:q\d:\d,){9}q\d:\d);000=(\d);000!((?:[a-j]\d){10});n=(\d{3})\n")
LINE = re.compile(r"(\d{3}):(\d{3})([a-j])\*(\d|q\d:\d)=(\d)\n|(\d{3})!((?:[a-j]\d){10})\n")


@lru_cache(maxsize=None)
def problems(n: int, seed: int, spec: lg.LedgerSpec = SPEC):
    return lg.ledger_dataset(n, seed=seed, spec=spec)


def quarter(traces, policies=oracle.POLICIES, page_size: int = 16) -> dict:
    table = oracle.oracle_table(traces, fractions=(0.25,), policies=policies, page_size=page_size, rebuild=True)
    return {k: v[0] for k, v in table["loss_share"].items()}


# -- acceptance -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_oracle_acceptance_with_rebuilding(seed):
    share = quarter([p.trace for p in problems(200, seed)])
    assert share["lru"] == 0.0, share
    assert share["recency"] >= 0.8, share
    assert share["streaming"] >= 0.5 and share["h2o"] >= 0.5, share


@pytest.mark.parametrize("shift,page_size", [(-5, 16), (-3, 16), (-1, 16), (2, 16), (4, 16), (5, 16),
                                             (0, 8), (0, 32), (-4, 8), (3, 32)])
def test_lru_holds_whatever_the_alignment(shift, page_size):
    spec = lg.LedgerSpec(phase_lines=lg.LEDGER_SPEC.phase_lines + shift, first_milestone=20 + shift)
    share = quarter([p.trace for p in problems(60, 7, spec)], ("lru", "recency"), page_size)
    assert share["lru"] == 0.0 and share["recency"] >= 0.5, (shift, page_size, share)


def test_oracle_cli_runs_the_ledger_task(capsys):
    table = oracle.main(["--task", "ledger", "--problems", "4", "--rebuild", "--fractions", "0.25"])
    assert "| policy |" in capsys.readouterr().out and table["rebuild"] and table["problems"] == 4


# -- the rebuild rule ---------------------------------------------------------------------------------------------
def brute_minimal(entry, needed, xs):
    """Every minimal subset (any size) of reads that determines the product a read with ``needed`` wants."""
    found = []
    for size in range(1, len(xs) + 1):
        for idx in combinations(range(len(xs)), size):
            agree = [d for d in range(10) if all(d * xs[j] % 10 == entry * xs[j] % 10 for j in idx)]
            if len({d * needed % 10 for d in agree}) == 1 and not any(set(f) <= set(idx) for f in found):
                found.append(idx)
    return found


def test_rule_on_every_multiplier_set():
    """All sets of distinct multipliers 1..9, every entry and needed multiplier: the set determines the
    product exactly when one or two of its members do; for sets of up to 3, ``minimal_sets`` lists exactly
    the minimal determining subsets found by brute force."""
    for entry in range(10):
        for needed in range(1, 10):
            pair = {(a, b): lg.determines(entry, needed, [a, b]) for a in range(1, 10) for b in range(1, 10)}
            for mask in range(1, 1 << 9):
                xs = [x for x in range(1, 10) if mask >> (x - 1) & 1]
                small = any(pair[a, b] for a in xs for b in xs)  # (a, a) is the single a
                assert lg.determines(entry, needed, xs) == small, (entry, needed, xs)
                if len(xs) <= 3:
                    assert sorted(lg.minimal_sets(entry, needed, xs)) == sorted(brute_minimal(entry, needed, xs))


@given(st.integers(0, 9), st.integers(1, 9), st.lists(st.integers(1, 9), max_size=7))
def test_minimal_sets_match_brute_force(entry, needed, xs):
    assert sorted(lg.minimal_sets(entry, needed, xs)) == sorted(brute_minimal(entry, needed, xs))
    assert all(len(s) <= 2 for s in brute_minimal(entry, needed, xs))


def test_partitions():
    for e in range(10):
        assert lg.determines(e, 7, [3]) and not lg.determines(e, 3, [2]) and lg.determines(e, 4, [6])
        assert lg.determines(e, 5, [5]) and not lg.determines(e, 2, [5]) and lg.determines(e, 3, [2, 5])
        assert lg.determines(e, 1, [1]) and not lg.determines(e, 3, [])
    with pytest.raises(ValueError, match="needed_x=10 must be a digit"):
        lg.determines(1, 10, [])


# -- the generator, read independently ------------------------------------------------------------------------------
def read_problem(prob: lg.LedgerProblem, spec: lg.LedgerSpec = SPEC):
    """Re-evaluates the text; returns {line: (kind, x position, value position, entry position, x)} and
    the positions of every ledger entry by (ledger label, key)."""
    q = QUESTION.fullmatch(prob.question)
    assert q, prob.question
    facts = [int(kv.split(":")[1]) for kv in q.group(1).split(",")]
    values, vpos = {0: int(q.group(2))}, {0: 1 + prob.question.index(";000=") + 5}
    start = 1 + prob.question.index(";000!") + 5
    ledgers = {0: {g[0]: (int(g[1]), start + 2 * k + 1) for k, g in enumerate(re.findall(r"[a-j]\d", q.group(3)))}}
    n = int(q.group(4))
    body, answer = prob.cot.rsplit("A:", 1)
    off, last_ledger, info, lines = 1 + len(prob.question), 0, {}, 0
    for mt in LINE.finditer(body):
        assert mt.start() + 1 + len(prob.question) == off
        lines += 1
        i = int(mt.group(1) or mt.group(6))
        assert i == lines
        if mt.group(6):  # a ledger: entry d copies the last value of a line ending in d
            assert (i - spec.first_milestone) % spec.phase_lines == 0 and i >= spec.first_milestone and i < n
            pairs = re.findall(r"[a-j]\d", mt.group(7))
            assert [p[0] for p in pairs] == list("abcdefghij")
            src = {j % 10: j for j in range(i - 10, i)}
            ledgers[i] = {p[0]: (int(p[1]), off + 4 + 2 * k + 1) for k, p in enumerate(pairs)}
            assert all(int(p[1]) == values[src[k]] for k, p in enumerate(pairs))
            last_ledger = i
        else:
            assert int(mt.group(2)) == last_ledger and mt.group(3) == "abcdefghij"[i % 10]
            prev = values[max(values)]
            operand = mt.group(4)
            phoenix = operand.startswith("q")
            milestone_label = i >= spec.first_milestone and (i - spec.first_milestone) % spec.phase_lines == 0
            assert phoenix == (i == n or (i % 10 == 5 and not milestone_label))
            if phoenix:
                assert operand == f"q{prev}:{facts[prev]}"
                x, x_pos = facts[prev], off + 12
            else:
                x, x_pos = int(operand), off + 9
                assert x == prev
            entry, e_pos = ledgers[last_ledger][mt.group(3)]
            v = int(mt.group(5))
            assert v == (entry * (x or 1) + i // 10) % 10
            vp = off + len(mt.group(0)) - 2
            values[i], vpos[i] = v, vp
            info[i] = (x_pos, vp, e_pos, x or 1, last_ledger, mt.group(3))
        off += len(mt.group(0))
    assert lines == n and body == "".join(m.group(0) for m in LINE.finditer(body))
    assert answer == "".join(str(values[j]) for j in sorted(values)[-SPEC.answer_digits:])
    return info, ledgers, vpos


def check_problem(prob: lg.LedgerProblem, spec: lg.LedgerSpec = SPEC) -> None:
    """The trace against the text: every read, every rebuild set (brute force for the per-read ones)."""
    text = "^" + prob.question + prob.cot
    info, ledgers, vpos = read_problem(prob, spec)
    reads = dict(prob.trace.reads)
    assert len(reads) == len(prob.trace.reads)
    n_reads = 1 + spec.answer_digits + 10 * (len(ledgers) - 1)
    readers: dict = {}
    step_sets = {(t, p): sets for t, p, sets in prob.trace.read_rebuild}
    for m, entries in ledgers.items():  # a ledger entry reads the value it copies
        for d, (_, pos) in enumerate(entries.values()):
            assert m == 0 or reads[pos] == (vpos[next(j for j in range(m - 10, m) if j % 10 == d)],)
    for i, (x_pos, vp, e_pos, x, m, key) in sorted(info.items()):
        prev = vpos[max(j for j in vpos if j < i)]
        if text[x_pos - 1] == ":":  # a phoenix line: the key digit copies the previous value, F the fact
            k = int(text[x_pos - 2])
            assert reads[x_pos - 2] == (prev,) and reads[x_pos] == (1 + prob.question.index(f"q{k}:") + 3,)
            n_reads += 3
        else:
            assert reads[x_pos] == (prev,)
            n_reads += 2
        assert reads[vp] == tuple(sorted((x_pos, e_pos)))  # the value reads the entry and the multiplier
        assert text[e_pos - 1] == key
        past = readers.setdefault((m, key), [])
        entry = int(text[e_pos])
        want = {tuple(sorted(q for j in idx for q in past[j][1:])) for idx in brute_minimal(entry, x, [r[0] for r in past])}
        assert set(step_sets.get((vp, e_pos), ())) == want
        past.append((x, x_pos, vp))
    a_pos = 1 + len(prob.question) + prob.cot.rindex("A:")
    n_pos = 1 + prob.question.index(";n=") + 3
    assert reads[a_pos] == (n_pos, n_pos + 1, n_pos + 2)  # stopping needs the line count
    last = sorted(j for j in vpos if j > 0)[-spec.answer_digits:]
    assert [reads[a_pos + 2 + k] for k in range(len(last))] == [(vpos[j],) for j in last]
    assert len(reads) == n_reads
    by_inputs = {(min(e, x), max(e, x)): (x, vp) for x, vp, e, *_ in info.values()}
    for pos, sets in prob.trace.rebuild:  # whole-token sets: copies of the token, or a line's inputs
        assert text[pos].isdigit()
        for group in sets:
            if len(group) == 1:
                assert text[group[0]] == text[pos]
            else:  # the entry and multiplier of the line whose value the ledger entry copies
                x_pos, vp = by_inputs[group]
                e_pos = group[0] if group[1] == x_pos else group[1]
                i = int(text[text.rindex("\n", 0, vp) + 1:][:3])
                assert text[vp] == text[pos] and int(text[vp]) == (int(text[e_pos]) * (int(text[x_pos]) or 1) + i // 10) % 10
                assert text[pos - 1] in "abcdefghij" and vp < pos
    for t, positions in prob.trace.reads:
        assert all(0 <= p < t for p in positions)


@pytest.mark.parametrize("seed", [0, 5])
def test_text_reads_and_rebuild_sets(seed):
    for prob in problems(12, seed):
        check_problem(prob)


@settings(max_examples=20, deadline=None)
@given(st.lists(st.integers(0, 9), min_size=10, max_size=10), st.integers(0, 9), st.integers(-5, 5),
       st.integers(-5, 5), st.integers(0, 60))
def test_trace_matches_text_for_any_problem(facts, seed, shift, first_shift, extra):
    spec = lg.LedgerSpec(phase_lines=lg.LEDGER_SPEC.phase_lines + shift, first_milestone=20 + first_shift)
    check_problem(lg._ledger_problem(facts, seed, spec.min_lines + extra, spec), spec)


def test_sizes_and_prompt_share():
    traces = [p.trace for p in problems(200, 0)]
    chains = [t.chain_tokens for t in traces]
    assert min(chains) >= 1500 and max(t.length for t in traces) <= SPEC.seq_len
    assert all(t.prompt_len == SPEC.prompt_tokens and t.prompt_len <= 0.1 * c for t, c in zip(traces, chains))
    assert lg.ledger_dataset(3, seed=4) == lg.ledger_dataset(3, seed=4)
    for p in problems(12, 0):
        assert p.trace.chain_tokens == len(p.cot) + 1 and SPEC.cot_tokens(p.lines) == len(p.cot)


# -- oracle with per-read rebuild sets ------------------------------------------------------------------------------
def test_read_rebuild_applies_to_its_step_only():
    """Streaming with pages of 2 keeps page 0 and the newest 3: position 3 (page 1) is gone by step 14; the
    read at step 15 has a resident set of its own, the one at step 14 none."""
    reads = ((14, (3,)), (15, (3,)))
    t = oracle.Trace(prompt_len=4, length=16, reads=reads, read_rebuild=((15, 3, ((13,),)),))
    res = oracle.simulate(t, 8, "streaming", page_size=2, rebuild=True)
    assert res.lost == [(14, 3)] and res.rebuilt == [(15, 3)]
    assert oracle.simulate(t, 8, "streaming", page_size=2).lost == [(14, 3), (15, 3)]
    with pytest.raises(ValueError, match="names position 40"):
        oracle.Trace(prompt_len=4, length=16, reads=reads, read_rebuild=((15, 3, ((40,),)),))


# -- encoder and bad input ------------------------------------------------------------------------------------------
def test_batch_encoder_and_noise():
    rng = np.random.default_rng(0)
    ids, lengths, noisy = lg.encode_ledger_batch(rng, 3, value_noise=0.3)
    assert ids.shape == (3, SPEC.seq_len) and noisy.any()
    tok = tb.build_tokenizer()
    for row, n in zip(ids, lengths):
        text = tok.decode(row[1:n - 1].tolist())
        assert QUESTION.match(text) and row[n - 1] == tb.EOS and (row[n:] == tb.PAD).all()
    clean, _, none = lg.encode_ledger_batch(np.random.default_rng(1), 2)
    assert not none.any()


def test_bad_input():
    with pytest.raises(ValueError, match="phase_lines=5 must be >= 11"):
        lg.LedgerSpec(phase_lines=5)
    with pytest.raises(ValueError, match="first_milestone=3 must be >= 11"):
        lg.LedgerSpec(first_milestone=3)
    with pytest.raises(ValueError, match="min_lines=10"):
        lg.LedgerSpec(min_lines=10)
    with pytest.raises(TypeError, match="phase_lines must be an int"):
        lg.LedgerSpec(phase_lines=60.0)
    with pytest.raises(ValueError, match="value_noise=1.5"):
        lg.encode_ledger_batch(np.random.default_rng(0), 1, value_noise=1.5)
    with pytest.raises(TypeError, match="spec must be a LedgerSpec"):
        lg.ledger_dataset(1, spec=tb.MILESTONE_SPEC)


def test_train_ledger_smoke(tmp_path):
    """``examples/train_testbed.py --task ledger``: a few steps of a tiny model on a small ledger spec, the
    teacher-forced evaluation (facts and values found in the ledger lines), the checkpoint."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "train_testbed.py"
    spec = importlib.util.spec_from_file_location("train_testbed_ledger", path)
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    log = train.main(["--smoke", "--task", "ledger", "--out", str(tmp_path), "--device", "cpu", "--gen-problems", "0",
                      "--value-noise", "0.3"])
    assert log["task"] == "ledger" and log["spec"]["first_milestone"] == 11 and log["steps"] == 3
    assert {"tf_fact_acc", "tf_value_acc"} <= set(log["final"]) and (tmp_path / "model.safetensors").exists()
    assert log["prompt_tokens"] == lg.LedgerSpec(**log["spec"]).prompt_tokens
    with pytest.raises(ValueError, match="--window"):
        train.main(["--smoke", "--task", "ledger", "--out", str(tmp_path), "--window", "20", "40"])


def _script(folder: str, name: str):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / folder / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"{name}_for_ledger", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_accuracy_diagnoses_the_first_wrong_ledger_line():
    accuracy = _script("benchmarks", "accuracy")
    cot = problems(12, 0)[0].cot
    lines = cot.split("\n")

    def broken(i, text):
        return "\n".join(lines[:i] + [text] + lines[i + 1:])

    def bump(text, k):
        return text[:k] + str((int(text[k]) + 1) % 10) + text[k + 1:]

    assert accuracy.diagnose_ledger(cot, cot) == "correct_chain"
    plain = next(i for i, s in enumerate(lines) if re.fullmatch(r"\d{3}:\d{3}[a-j]\*\d=\d", s))
    phoenix = next(i for i, s in enumerate(lines) if "*q" in s)
    led = next(i for i, s in enumerate(lines) if "!" in s)
    assert accuracy.diagnose_ledger(broken(plain, bump(lines[plain], len(lines[plain]) - 1)), cot) == "value"
    assert accuracy.diagnose_ledger(broken(plain, bump(lines[plain], 9)), cot) == "copy"
    assert accuracy.diagnose_ledger(broken(phoenix, bump(lines[phoenix], 10)), cot) == "copy"  # the fact key
    assert accuracy.diagnose_ledger(broken(phoenix, bump(lines[phoenix], 12)), cot) == "fact"
    assert accuracy.diagnose_ledger(broken(led, bump(lines[led], 5)), cot) == "ledger"
    assert accuracy.diagnose_ledger(broken(led, lines[led].replace("!", ":")), cot) == "format"
    assert accuracy.diagnose_ledger(broken(plain, lines[plain].replace("*", "+")), cot) == "format"
    assert accuracy.diagnose_ledger("\n".join(lines[:plain + 1]) + "\nA:123", cot) == "early_stop"
    assert accuracy.diagnose_ledger(cot.replace("A:", "999:000a*1=1\nA:"), cot) == "stop"
    assert set(accuracy.LEDGER_DIAGNOSES) >= {"correct_chain", "ledger", "value"}
