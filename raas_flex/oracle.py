"""Oracle KV-retention analysis: which paged eviction policies keep every token a chain still needs.

A :class:`Trace` lists, for one sequence, the exact token positions each decode step reads (the
milestone task of :mod:`raas_flex.testbed` produces one per problem). :func:`simulate` replays the
decode under a token budget with pages of ``page_size`` tokens and reports the reads that hit an
evicted page. No model is involved: the importance every policy sees is the trace itself (perfect
importance), so a loss here is a loss for any model that computes the chain the way it is written.

Decoding model: the prompt (``trace.prompt_len`` tokens, ``<s>`` included) is prefilled; step ``t``
(``prompt_len <= t < trace.length``) produces token ``t``, after token ``t - 1`` joined the cache. A
token joining opens a new page when it is the first of its page; when the cache then already holds
``budget // page_size`` pages, one page is evicted first, for good. The open (newest) page is never
evicted. A read of a position whose page was evicted is a loss (the step reads nothing else there).
With ``rebuild=True`` such a read is *rebuilt* instead when one of the position sets that
``trace.rebuild`` (or ``trace.read_rebuild``, for that step's read) names for it is written and wholly resident: a model can recompute the token from
what stays (on the milestone task every clean reader of a milestone reveals its value, and every
copy of a question fact is the fact), so only a read that nothing resident determines is a loss.

Policies (``POLICIES``):

- ``lru``: RaaS with perfect importance. Every page has a timestamp: the step it was opened, refreshed
  at every step that reads any of its tokens. Evict the unpinned page with the oldest timestamp (ties:
  the lower page). The prompt's pages are pinned.
- ``recency``: evict the oldest unpinned page (a recent window plus the pinned prompt).
- ``streaming``: StreamingLLM, the page holding the 4 sink tokens (page 0) plus a recent window;
  nothing else pinned.
- ``h2o``: H2O with perfect importance: every page accumulates the number of reads of its tokens; the
  newest ``budget_pages // 2`` pages (the new one included) are protected, and among the rest the page
  with the fewest reads is evicted (ties: the lower page). Nothing is pinned.

    python -m raas_flex.oracle --problems 200 --seed 0 [--task ledger] [--rebuild]   # markdown table
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

from .ledger import ledger_dataset
from .testbed import Trace, milestone_dataset

__all__ = ["POLICIES", "SimResult", "Trace", "budgets_for", "markdown_table", "oracle_table", "simulate"]

POLICIES = ("lru", "recency", "streaming", "h2o")
POLICY_LABELS = {
    "lru": "(a) LRU pages, prompt pinned (RaaS, perfect importance)",
    "recency": "(b) recency, prompt pinned",
    "streaming": "(c) StreamingLLM: 4 sinks + recent",
    "h2o": "(d) H2O, perfect importance (accumulated reads + recent half)",
}
DEFAULT_FRACTIONS = (0.125, 0.25, 0.5)


@dataclass
class SimResult:
    """``lost``: the ``(step, position)`` reads that found their page evicted (with ``rebuild``, and no
    resident set that determines the token); ``rebuilt``: with ``simulate(..., rebuild=True)``, the
    evicted reads that such a set recovers; ``evictions``: pages evicted; ``resident``: with
    ``simulate(..., record=True)``, the pages in the cache when each step attends
    (``resident[t - trace.prompt_len]``, ascending page indices), else empty."""

    policy: str
    budget: int
    lost: list = field(default_factory=list)
    rebuilt: list = field(default_factory=list)
    evictions: int = 0
    resident: list = field(default_factory=list)

    @property
    def lossless(self) -> bool:
        return not self.lost


def _check_int(name: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")


def simulate(trace: Trace, budget: int, policy: str, page_size: int = 16, record: bool = False,
             rebuild: bool = False) -> SimResult:
    """Replay ``trace`` under ``policy`` with a KV budget of ``budget`` tokens (a multiple of ``page_size``).

    The budget must hold the prompt's pages plus one (every policy starts from the whole prompt).
    ``record``: also keep the resident pages of every step (``SimResult.resident``). ``rebuild``: an
    evicted read is recovered (``SimResult.rebuilt``, not a loss) when a set of ``trace.rebuild`` for
    it is written and wholly resident; the retention itself is unchanged (importance is the trace's reads).
    """
    for name, flag in (("record", record), ("rebuild", rebuild)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be True or False, got {flag!r}")
    if not isinstance(trace, Trace):
        raise TypeError(f"trace must be a raas_flex.oracle.Trace, got {type(trace).__name__}")
    if policy not in POLICIES:
        raise ValueError(f"policy={policy!r} is not supported; allowed: {', '.join(map(repr, POLICIES))}")
    _check_int("page_size", page_size, 1)
    _check_int("budget", budget, page_size)
    if budget % page_size:
        raise ValueError(f"budget={budget} must be a multiple of page_size={page_size}")
    cap = budget // page_size
    prompt_pages = -(-trace.prompt_len // page_size)
    if cap < prompt_pages + 1:
        raise ValueError(f"budget={budget} holds {cap} pages; the prompt takes {prompt_pages}: allowed budgets are "
                         f">= {(prompt_pages + 1) * page_size}")
    pinned = {"lru": set(range(prompt_pages)), "recency": set(range(prompt_pages)), "streaming": {0}, "h2o": set()}[policy]
    resident = list(range(prompt_pages))  # ascending page index
    stamp = dict.fromkeys(resident, trace.prompt_len)  # lru: last step that opened or read the page
    count = dict.fromkeys(resident, 0)  # h2o: reads so far
    reads = dict(trace.reads)
    sets_of = dict(trace.rebuild) if rebuild else {}
    step_sets = {(t, p): sets for t, p, sets in trace.read_rebuild} if rebuild else {}
    result = SimResult(policy=policy, budget=budget)
    protect = cap // 2
    for t in range(trace.prompt_len, trace.length):
        pos = t - 1
        if pos >= trace.prompt_len and pos % page_size == 0:  # token t - 1 opens a new page
            if len(resident) >= cap:
                if policy == "h2o":  # the new page and the newest protect - 1 resident pages are protected
                    cands = resident[: len(resident) - max(protect - 1, 0)]
                    victim = min(cands, key=lambda p: (count[p], p))
                elif policy == "lru":
                    victim = min((p for p in resident if p not in pinned), key=lambda p: (stamp[p], p))
                else:  # recency, streaming: the oldest unpinned page
                    victim = next(p for p in resident if p not in pinned)
                resident.remove(victim)
                result.evictions += 1
            page = pos // page_size
            resident.append(page)
            stamp[page], count[page] = t, 0
        live = set(resident)
        if record:
            result.resident.append(tuple(sorted(live)))
        for p in reads.get(t, ()):
            page = p // page_size
            if page in live:
                stamp[page] = t
                count[page] += 1
            elif any(max(group) < t and all(q // page_size in live for q in group)
                     for group in (*sets_of.get(p, ()), *step_sets.get((t, p), ()))):
                result.rebuilt.append((t, p))
            else:
                result.lost.append((t, p))
    return result


def budgets_for(traces, fractions=DEFAULT_FRACTIONS, page_size: int = 16) -> list[int]:
    """Token budgets at ``fractions`` of the mean chain (generated tokens), rounded to the nearest
    multiple of ``page_size`` (as ``benchmarks/accuracy.py`` resolves fractional budgets)."""
    traces = list(traces)
    if not traces:
        raise ValueError("traces must not be empty")
    mean = sum(t.chain_tokens for t in traces) / len(traces)
    out = []
    for f in fractions:
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 < f <= 1:
            raise ValueError(f"fractions must be numbers in (0, 1], got {f!r}")
        out.append(max(2 * page_size, int(round(f * mean / page_size)) * page_size))
    return out


def oracle_table(traces, fractions=DEFAULT_FRACTIONS, policies=POLICIES, page_size: int = 16,
                 rebuild: bool = False) -> dict:
    """Share of traces that lose a needed token, per policy and budget (``rebuild``: a token that a
    resident set of ``trace.rebuild`` determines is not lost, see :func:`simulate`).

    Returns ``{"budgets": [...], "fractions": [...], "mean_chain": float, "prompt_len": [min, max],
    "problems": n, "loss_share": {policy: [share per budget]}, "mean_lost_reads": {policy: [...]}}``.
    """
    traces = list(traces)
    budgets = budgets_for(traces, fractions, page_size)
    share, lost_reads = {}, {}
    for policy in policies:
        share[policy], lost_reads[policy] = [], []
        for b in budgets:
            res = [simulate(t, b, policy, page_size, rebuild=rebuild) for t in traces]
            share[policy].append(sum(not r.lossless for r in res) / len(res))
            lost_reads[policy].append(sum(len(r.lost) for r in res) / len(res))
    return {
        "budgets": budgets, "fractions": list(fractions), "problems": len(traces),
        "mean_chain": sum(t.chain_tokens for t in traces) / len(traces),
        "prompt_len": [min(t.prompt_len for t in traces), max(t.prompt_len for t in traces)],
        "loss_share": share, "mean_lost_reads": lost_reads, "page_size": page_size, "rebuild": rebuild,
    }


def markdown_table(table: dict) -> str:
    """The :func:`oracle_table` result as markdown: share of chains that lose a needed token (mean lost
    reads per chain in parentheses)."""
    head = " | ".join(f"{f:g} ({b} tok)" for f, b in zip(table["fractions"], table["budgets"]))
    lines = [
        f"{table['problems']} problems, mean chain {table['mean_chain']:.0f} tokens, prompt "
        f"{table['prompt_len'][0]} tokens, page size {table['page_size']}. Share of chains that lose a token they "
        "still need" + (" and cannot rebuild from resident tokens" if table.get("rebuild") else "")
        + " (mean lost reads per chain):",
        "",
        f"| policy | {head} |",
        "|---|" + "---|" * len(table["budgets"]),
    ]
    for policy, shares in table["loss_share"].items():
        cells = " | ".join(f"{s:.2f} ({n:.1f})" for s, n in zip(shares, table["mean_lost_reads"][policy]))
        lines.append(f"| {POLICY_LABELS.get(policy, policy)} | {cells} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="milestone", choices=("milestone", "ledger"), help="docs/testbed.md")
    ap.add_argument("--problems", type=int, default=200, help="held-out problems of the task")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fractions", default="0.125,0.25,0.5", help="budgets as fractions of the mean chain")
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--rebuild", action="store_true",
                    help="a read is not lost when resident tokens determine it (Trace.rebuild)")
    args = ap.parse_args(argv)
    fractions = []
    for part in args.fractions.split(","):
        try:
            fractions.append(float(part))
        except ValueError:
            raise ValueError(f"--fractions: {part!r} is not a number in (0, 1]") from None
    problems = {"milestone": milestone_dataset, "ledger": ledger_dataset}[args.task](args.problems, seed=args.seed)
    table = oracle_table([p.trace for p in problems], fractions, page_size=args.page_size, rebuild=args.rebuild)
    print(markdown_table(table))
    return table


if __name__ == "__main__":
    main()
