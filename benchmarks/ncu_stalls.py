"""What a kernel's warps waited on: the warp-stall samples of an Nsight Compute source page (the
KERNEL_sass.csv.gz that benchmarks/ncu_kernel.sh writes), summed over its SASS lines, by reason.

    python benchmarks/ncu_stalls.py benchmarks/results/h100/ncu_pick_b8_32x8_l2048/_pick_kernel_sass.csv.gz

Reasons as Nsight Compute names them (e.g. ``no_inst``: the next instruction was not in the
instruction cache; ``wait``: a fixed-latency dependency; ``short_sb``: a shared-memory or special-
function result; ``barrier``: a block-wide barrier)."""

from __future__ import annotations

import argparse
import csv
import gzip
from collections import Counter


def stall_shares(path: str) -> tuple[int, int, int, Counter]:
    """(SASS lines, warp instructions executed, stall samples, samples by reason) of one source page."""
    with gzip.open(path, "rt") as f:
        rows = list(csv.reader(f))
    header = next(i for i, r in enumerate(rows) if r and r[0] == "Address")
    names = rows[header]
    col = {n: i for i, n in enumerate(names)}
    reasons = [n for n in names if n.startswith("stall_") and "Not Issued" not in n]
    if not reasons or "Warp Stall Sampling (All Samples)" not in col:
        raise ValueError(f"{path}: no warp-stall columns (profile with --section SourceCounters)")
    lines, executed, samples, by_reason = 0, 0, 0, Counter()
    for r in rows[header + 1:]:
        if len(r) < len(names):
            continue
        lines += 1
        executed += int(r[col["Instructions Executed"]] or 0)
        samples += int(r[col["Warp Stall Sampling (All Samples)"]] or 0)
        for n in reasons:
            by_reason[n.removeprefix("stall_")] += int(r[col[n]] or 0)
    return lines, executed, samples, by_reason


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("source_csv", help="KERNEL_sass.csv.gz from benchmarks/ncu_kernel.sh")
    ap.add_argument("--top", type=int, default=8)
    args = ap.parse_args(argv)
    lines, executed, samples, by_reason = stall_shares(args.source_csv)
    print(f"{args.source_csv}: {lines} SASS lines, {executed} warp instructions executed, {samples} stall samples")
    for reason, n in by_reason.most_common(args.top):
        print(f"  {reason:18s} {n:6d}  {100 * n / max(samples, 1):5.1f}%")


if __name__ == "__main__":
    main()
