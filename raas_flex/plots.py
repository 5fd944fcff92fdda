"""Waterfall plots of an attention trace (matplotlib, PNG) and a command line to draw them from a file.

    raas_flex.plots.waterfall(trace, layer=0, head=1, path="L0H1.png")

    python -m raas_flex.plots --trace trace.pt --out figs --layers 0 3 --heads 0 [--member 0]
    python -m raas_flex.plots --oracle ledger --out figs   # a testbed chain's reads under the oracle policies

The CLI writes ``waterfall_L{layer}_H{head}[_M{member}].png`` for each chosen map and the head
classification (:func:`raas_flex.classify_heads`, default thresholds unless given) to
``summary.json``, and prints the table. matplotlib is imported only when a plot is drawn
(``pip install raas-flex[plot]``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from .trace import AttentionTrace, classify_heads, summary_table

__all__ = ["read_map", "waterfall", "main"]
NORMS = ("log", "power", "linear")


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only; never opens a window
        import matplotlib.pyplot as plt
    except ImportError as e:  # pragma: no cover - exercised only without matplotlib
        raise ImportError("raas_flex.plots needs matplotlib: pip install raas-flex[plot]") from e
    return plt


def waterfall(trace: AttentionTrace, layer: int, head: int, path, *, member: int = 0, norm: str = "log",
              vmin: float = 1e-3, gamma: float = 0.3, title: str | None = None, dpi: int = 120):
    """Draw one traced map as a heatmap and write it to ``path`` (PNG). Returns ``path``.

    x = logical page (prompt pages left of the dashed line), y = decode step (down), colour = the
    step's attention share on the page (white where the page held no attention: not yet written,
    evicted, or not attended). ``norm``: "log" (LogNorm from ``vmin`` to 1; shares below vmin are
    drawn at vmin), "power" (PowerNorm with ``gamma``) or "linear"; both non-linear ones keep faint
    pages visible. Red crosses: the policy evicted the page at that step; the grey band: steps where
    the page was evicted (no longer resident).
    """
    if not isinstance(trace, AttentionTrace):
        raise TypeError(f"trace must be an AttentionTrace, got {type(trace).__name__}")
    if norm not in NORMS:
        raise ValueError(f"norm={norm!r} is not supported; allowed: {', '.join(map(repr, NORMS))}")
    if not (isinstance(vmin, (int, float)) and 0 < vmin < 1):
        raise ValueError(f"vmin={vmin!r} out of range; allowed: 0 < vmin < 1")
    if not (isinstance(gamma, (int, float)) and gamma > 0):
        raise ValueError(f"gamma={gamma!r} out of range; allowed: gamma > 0")
    share = trace.map(layer, head, member)  # validates layer/head/member
    if trace.steps == 0:
        raise ValueError("trace holds no decode step")
    plt = _pyplot()
    from matplotlib import colors

    resid = trace.residency(layer, head)  # [steps + 1, pages]
    ever = resid.any(0) | (share > 0).any(0)
    n_pages = int(ever.nonzero().max()) + 1 if bool(ever.any()) else share.shape[1]
    data = share[:, :n_pages].numpy()
    T = data.shape[0]
    if norm == "log":
        nrm = colors.LogNorm(vmin=vmin, vmax=1.0, clip=True)
    elif norm == "power":
        nrm = colors.PowerNorm(gamma=gamma, vmin=0.0, vmax=1.0)
    else:
        nrm = colors.Normalize(vmin=0.0, vmax=1.0)
    import numpy as np

    masked = np.ma.masked_where(data <= 0, data)
    # transparent where no share: the grey band of evicted pages shows through
    cmap = plt.get_cmap("magma_r").with_extremes(bad=(0, 0, 0, 0))
    fig, ax = plt.subplots(figsize=(min(14, max(6.5, 3 + 0.12 * n_pages)), min(10, max(4.5, 2.5 + 0.02 * T))))
    extent = (-0.5, n_pages - 0.5, T + 0.5, 0.5)
    # pages no longer resident after having been resident: light grey underlay
    gone = (resid[1:, :n_pages] == 0) & torch.cummax(resid[:, :n_pages].int(), 0).values[1:].bool()
    if bool(gone.any()):
        ax.imshow(np.ma.masked_where(~gone.numpy(), np.ones(gone.shape)), cmap=colors.ListedColormap(["#d9d9d9"]),
                  aspect="auto", interpolation="nearest", extent=extent)
    im = ax.imshow(masked, cmap=cmap, norm=nrm, aspect="auto", interpolation="nearest", extent=extent)
    ev = trace.evictions(layer, head)
    if ev:
        steps, pages = zip(*[(t, g) for t, g in ev if g < n_pages])
        ax.scatter(pages, steps, marker="x", s=28, c="red", linewidths=1.2, label=f"evicted ({len(ev)})", zorder=3)
        ax.legend(loc="lower left", fontsize=8, framealpha=0.8)
    pp = trace.prompt_pages
    if 0 < pp < n_pages:
        ax.axvline(pp - 0.5, color="tab:blue", ls="--", lw=1)
    ax.set_xlabel(f"logical page ({trace.page_size} tokens each; prompt: pages 0..{pp - 1})")
    ax.set_ylabel("decode step")
    member_txt = f", query head {member} of the group" if trace.group == "each" else f", {trace.group} over the group"
    ax.set_title(title or f"layer {layer}, KV head {head}{member_txt}; policy={trace.policy}, budget={trace.budget}",
                 fontsize=9)
    fig.colorbar(im, ax=ax, label="attention share")
    fig.tight_layout()
    fig.savefig(path, dpi=dpi, format="png")
    plt.close(fig)
    return path


def read_map(trace, results, path, *, page_size: int = 16, title: str | None = None, dpi: int = 110):
    """The ground truth of a testbed chain under retention policies, one panel per
    :class:`raas_flex.oracle.SimResult` (from ``simulate(trace, ..., record=True)``), written to ``path``
    (PNG). Returns ``path``. x = logical page, y = decode step (down), as in :func:`waterfall`: grey
    where the page is resident, black dots where the step reads a token of the page (``trace.reads``),
    red crosses where that page had been evicted (a lost read)."""
    from .oracle import SimResult, Trace

    if not isinstance(trace, Trace):
        raise TypeError(f"trace must be a raas_flex.oracle.Trace, got {type(trace).__name__}")
    results = list(results)
    if not results or not all(isinstance(r, SimResult) for r in results):
        raise TypeError("results must be a non-empty list of raas_flex.oracle.SimResult")
    steps = trace.length - trace.prompt_len
    if any(len(r.resident) != steps for r in results):
        raise ValueError(f"every result needs its residency of all {steps} steps: simulate(..., record=True)")
    plt = _pyplot()
    from matplotlib import colors
    import numpy as np

    pages = -(-trace.length // page_size)
    fig, axes = plt.subplots(1, len(results), figsize=(3.2 * len(results) + 1, 7), sharey=True, squeeze=False)
    extent = (-0.5, pages - 0.5, trace.length - 0.5, trace.prompt_len - 0.5)
    reads = [(t, p // page_size) for t, positions in trace.reads for p in positions]
    for ax, res in zip(axes[0], results):
        held = np.zeros((steps, pages), dtype=bool)
        for i, live in enumerate(res.resident):
            held[i, list(live)] = True
        ax.imshow(np.ma.masked_where(~held, np.ones(held.shape)), cmap=colors.ListedColormap(["#cfcfcf"]),
                  aspect="auto", interpolation="nearest", extent=extent)
        t, g = zip(*reads) if reads else ((), ())
        ax.scatter(g, t, s=1, c="black", linewidths=0, label="read")
        if res.lost:
            lt, lp = zip(*[(t, p // page_size) for t, p in res.lost])
            ax.scatter(lp, lt, marker="x", s=14, c="red", linewidths=0.8, label=f"lost ({len(res.lost)})", zorder=3)
        ax.axvline(-(-trace.prompt_len // page_size) - 0.5, color="tab:blue", ls="--", lw=1)
        ax.set_title(f"{res.policy}, budget {res.budget}", fontsize=9)
        ax.set_xlabel(f"logical page ({page_size} tokens)")
        ax.legend(loc="lower left", fontsize=7, framealpha=0.8, markerscale=3)
    axes[0][0].set_ylabel("decode step (token position)")
    fig.suptitle(title or f"reads of one chain ({trace.length} tokens) and the pages each policy holds", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi, format="png")
    plt.close(fig)
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m raas_flex.plots", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--trace", help="file written by AttentionTrace.save")
    src.add_argument("--oracle", choices=("milestone", "ledger"),
                     help="instead: read_map_<task>.png, one held-out chain of the task (--seed) under every oracle "
                          "policy at --fraction of its length")
    ap.add_argument("--seed", type=int, default=0, help="--oracle: the held-out problem's seed")
    ap.add_argument("--fraction", type=float, default=0.25, help="--oracle: the budget as a share of the chain")
    ap.add_argument("--out", required=True, help="output folder (created)")
    ap.add_argument("--layers", type=int, nargs="+", default=None, help="layers to draw (default: all traced)")
    ap.add_argument("--heads", type=int, nargs="+", default=None, help="KV heads to draw (default: all traced)")
    ap.add_argument("--member", type=int, default=0, help="query head of the group (group='each' traces)")
    ap.add_argument("--norm", default="log", choices=NORMS)
    ap.add_argument("--tau", type=float, default=0.05, help="classification: activity threshold")
    ap.add_argument("--gap-steps", type=int, default=None, help="classification: phoenix gap (default: budget)")
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    if args.oracle is not None:
        from . import oracle
        from .ledger import ledger_dataset
        from .testbed import milestone_dataset

        if not 0 < args.fraction <= 1:
            raise ValueError(f"--fraction {args.fraction} is not allowed; allowed: 0 < fraction <= 1")
        chain = {"milestone": milestone_dataset, "ledger": ledger_dataset}[args.oracle](1, seed=args.seed)[0].trace
        budget = oracle.budgets_for([chain], (args.fraction,))[0]
        results = [oracle.simulate(chain, budget, policy, record=True) for policy in oracle.POLICIES]
        path = read_map(chain, results, os.path.join(args.out, f"read_map_{args.oracle}.png"))
        print(f"wrote {path}: reads lost per policy at budget {budget}: "
              + ", ".join(f"{r.policy} {len(r.lost)}" for r in results))
        return 0
    trace = AttentionTrace.load(args.trace)
    layers = args.layers if args.layers is not None else list(trace.layers)
    heads = args.heads if args.heads is not None else list(trace.heads)
    for layer in layers:
        for head in heads:
            suffix = f"_M{args.member}" if trace.group == "each" else ""
            path = os.path.join(args.out, f"waterfall_L{layer}_H{head}{suffix}.png")
            waterfall(trace, layer, head, path, member=args.member, norm=args.norm)
            print(f"wrote {path}")
    summary = classify_heads(trace, tau=args.tau, gap_steps=args.gap_steps)
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(summary_table(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
