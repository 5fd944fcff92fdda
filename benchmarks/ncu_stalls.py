"""What a kernel's warps waited on: the warp-stall samples of an Nsight Compute source page (the
KERNEL_sass.csv.gz that benchmarks/ncu_kernel.sh writes), summed over its SASS lines, by reason, and
the share of them in lines that run more than once per warp (loops).

    python benchmarks/ncu_stalls.py benchmarks/results/h100/ncu_pick_b8_32x8_l2048/_pick_kernel_sass.csv.gz

Reasons as Nsight Compute names them (e.g. ``no_inst``: the next instruction was not in the
instruction cache; ``wait``: a fixed-latency dependency; ``short_sb``: a shared-memory or special-
function result; ``barrier``: a block-wide barrier)."""

from __future__ import annotations

import argparse
import csv
import gzip
from collections import Counter


def _page(path: str) -> tuple[list[str], list[list[str]]]:
    """The column names and the SASS lines of one source page; ValueError without stall columns."""
    with gzip.open(path, "rt") as f:
        rows = list(csv.reader(f))
    header = next(i for i, r in enumerate(rows) if r and r[0] == "Address")
    names = rows[header]
    if "Warp Stall Sampling (All Samples)" not in names or not any(n.startswith("stall_") for n in names):
        raise ValueError(f"{path}: no warp-stall columns (profile with --section SourceCounters)")
    return names, [r for r in rows[header + 1:] if len(r) >= len(names)]


def stall_shares(path: str) -> tuple[int, int, int, Counter]:
    """(SASS lines, warp instructions executed, stall samples, samples by reason) of one source page."""
    names, lines = _page(path)
    col = {n: i for i, n in enumerate(names)}
    reasons = [n for n in names if n.startswith("stall_") and "Not Issued" not in n]
    executed, samples, by_reason = 0, 0, Counter()
    for r in lines:
        executed += int(r[col["Instructions Executed"]] or 0)
        samples += int(r[col["Warp Stall Sampling (All Samples)"]] or 0)
        for n in reasons:
            by_reason[n.removeprefix("stall_")] += int(r[col[n]] or 0)
    return len(lines), executed, samples, by_reason


def loop_shares(path: str) -> tuple[int, int, int, float]:
    """(warps, SASS lines run more than once per warp, their stall samples, the most runs per warp of
    a line) of one source page: where a kernel's loops are and what they cost. The warps are the
    first line's executions (a kernel's first instruction runs once in every warp)."""
    names, lines = _page(path)
    col = {n: i for i, n in enumerate(names)}
    runs = [int(r[col["Instructions Executed"]] or 0) for r in lines]
    warps = runs[0]
    looped = [i for i, n in enumerate(runs) if n > warps]
    samples = sum(int(lines[i][col["Warp Stall Sampling (All Samples)"]] or 0) for i in looped)
    return warps, len(looped), samples, max(runs) / max(warps, 1)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("source_csv", help="KERNEL_sass.csv.gz from benchmarks/ncu_kernel.sh")
    ap.add_argument("--top", type=int, default=8)
    args = ap.parse_args(argv)
    lines, executed, samples, by_reason = stall_shares(args.source_csv)
    print(f"{args.source_csv}: {lines} SASS lines, {executed} warp instructions executed, {samples} stall samples")
    for reason, n in by_reason.most_common(args.top):
        print(f"  {reason:18s} {n:6d}  {100 * n / max(samples, 1):5.1f}%")
    warps, looped, loop_samples, most = loop_shares(args.source_csv)
    print(f"{warps} warps; {looped} SASS lines run more than once per warp (loops) hold {loop_samples} samples "
          f"({100 * loop_samples / max(samples, 1):.1f}%); the most runs of a line per warp: {most:.1f}")


if __name__ == "__main__":
    main()
