"""One accuracy.py row against another run's on the same problems: how often their answers agree, how
often the outputs are identical, and where they first depart.

    python benchmarks/compare_runs.py benchmarks/results/accuracy_A.json benchmarks/results/accuracy_B.json \\
        [--policy dense] [--reference-policy dense] [--out compare.json]

Useful to see what a change that should not matter does to greedy chains (another dtype, batch size,
device or library version): dense in bfloat16 against dense in float32 is the noise floor that any
policy's agreement with dense is read against. Rows need their generated tokens, which accuracy.py
keeps in dense rows (both policies default to ``dense``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.accuracy import compare  # noqa: E402


def row_of(path: str, policy: str) -> tuple[dict, dict]:
    """(run, row) for ``policy`` in the accuracy.py JSON at ``path``, its results with tokens."""
    run = json.loads(Path(path).read_text())
    row = next((r for r in run["rows"] if r["policy"] == policy and "results" in r), None)
    if row is None:
        have = [r["policy"] for r in run["rows"]]
        raise ValueError(f"{path}: no row with policy {policy!r} and results (rows: {have})")
    if any("tokens" not in x for x in row["results"]):
        raise ValueError(f"{path}: row {policy!r} has no generated tokens (accuracy.py keeps them in dense rows)")
    return run, row


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", help="accuracy.py JSON whose row is compared")
    ap.add_argument("reference", help="accuracy.py JSON whose row is the reference")
    ap.add_argument("--policy", default="dense", help="the row of RUN")
    ap.add_argument("--reference-policy", default="dense", help="the row of REFERENCE")
    ap.add_argument("--out", default=None, help="also write the result as JSON here")
    args = ap.parse_args(argv)
    run, row = row_of(args.run, args.policy)
    ref_run, ref = row_of(args.reference, args.reference_policy)
    golds = [x["gold"] for x in row["results"]], [x["gold"] for x in ref["results"]]
    if golds[0] != golds[1]:
        raise ValueError(f"{args.run} and {args.reference} did not run the same problems (their gold answers differ)")
    c = compare(row["results"], ref["results"])
    result = {"command": " ".join(["python", "benchmarks/compare_runs.py"] + (sys.argv[1:] if argv is None else list(argv))),
              "run": {"path": args.run, "policy": args.policy, "dtype": run.get("dtype"), "accuracy": row["accuracy"]},
              "reference": {"path": args.reference, "policy": args.reference_policy, "dtype": ref_run.get("dtype"),
                            "accuracy": ref["accuracy"]},
              "problems": len(golds[0]), **c}
    departed = [f for f in c["first_departures"] if f is not None]
    print(f"{args.policy} ({result['run']['dtype']}, accuracy {row['accuracy']:.3f}) against {args.reference_policy} "
          f"({result['reference']['dtype']}, accuracy {ref['accuracy']:.3f}) on {len(golds[0])} problems: answers agree "
          f"{c['agreement']:.2f}, outputs identical {c['identical']:.2f}"
          + (f", first departure at token {c['mean_first_departure']:.0f} on average (median "
             f"{sorted(departed)[len(departed) // 2]})" if departed else ""))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
