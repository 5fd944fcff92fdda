"""Does a testbed model still compute its chains when its cache holds exactly what an oracle policy keeps?

`python -m raas_flex.oracle` shows which retention policies keep every token a milestone chain
*names* (perfect importance, no model). This script asks the model: for each held-out problem it
replays the oracle's retention (`raas_flex.oracle.simulate(..., record=True)`) as an attention mask
(the query that produces token t sees only the pages resident at step t) and runs the model teacher
forced along the reference chain. A chain counts as solved when every chain token is the model's
argmax, which is what greedy decoding under that retention would write. If the model solves its
chains under the LRU oracle ((a): RaaS with perfect importance) but not under a real policy at the same
budget, the policy's importance estimate is what fails; if it fails under the oracle too, the model
reads tokens the chain does not name.

    PYTHONPATH=. python benchmarks/oracle_retention.py --model models/milestone --problems 50

Writes `<out>/<name>.json` and `.md` (share of chains solved, token and value accuracy).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from raas_flex import oracle
from raas_flex import testbed as tb

NEWLINE, EQUALS = tb.VOCAB.index("\n"), tb.VOCAB.index("=")


def retention_mask(res: oracle.SimResult, prompt_len: int, n: int, page_size: int, keep_chain_start: int = 0) -> torch.Tensor:
    """Bool ``[n, n]`` (True = attend) over the ``n`` input positions: causal; the query at position
    ``t - 1`` (it produces token ``t``) sees only the pages resident at step ``t``, and the first
    ``keep_chain_start`` pages after the prompt's (a probe, beyond the budget)."""
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    pages = -(-n // page_size)
    resident = torch.zeros(len(res.resident), pages, dtype=torch.bool)
    for i, ps in enumerate(res.resident):
        resident[i, [p for p in ps if p < pages]] = True
    first = -(-prompt_len // page_size)
    resident[:, first:first + keep_chain_start] = True
    key_page = torch.arange(n) // page_size
    rows = torch.arange(prompt_len - 1, n)
    causal[rows] &= resident[rows - (prompt_len - 1)][:, key_page]
    return causal


@torch.no_grad()
def score(model, ids: torch.Tensor, prompt_len: int, mask: torch.Tensor | None) -> dict:
    """Teacher-forced argmax agreement on the chain (tokens after the question, ``</s>`` included)."""
    x = ids[None, :-1]
    logits = model(input_ids=x, attention_mask=None if mask is None else mask[None, None]).logits[0]
    target = ids[1:]
    chain = torch.arange(len(target), device=target.device) >= prompt_len - 1
    ok = (logits.argmax(-1) == target) & chain
    nxt = torch.cat([target[1:], target[-1:]])
    value = chain & (nxt == NEWLINE) & (torch.roll(target, 1) == EQUALS)
    return {"tokens": int(chain.sum()), "ok": int(ok.sum()), "values": int(value.sum()),
            "values_ok": int((ok & value).sum()), "solved": bool(ok.sum() == chain.sum())}


def markdown(result: dict) -> str:
    budgets = result["budgets"]
    head = " | ".join(f"{f:g} ({b} tok)" for f, b in zip(result["fractions"], budgets))
    lines = [f"Model `{result['model']}`, {result['problems']} held-out milestone problems (seed {result['seed']}), "
             f"teacher forced, float32, {result['device']}. Share of chains solved (every chain token the argmax; "
             "value-token accuracy in parentheses). Dense: "
             f"{result['dense']['solved']:.3f} ({result['dense']['value_acc']:.4f})."
             + (f" Probe: the first {result['keep_chain_start']} chain pages kept beyond the budget."
                if result["keep_chain_start"] else ""), "",
             f"| retention (oracle, perfect importance) | {head} |", "|---|" + "---|" * len(budgets)]
    for policy, cells in result["rows"].items():
        text = " | ".join(f"{c['solved']:.3f} ({c['value_acc']:.4f})" for c in cells)
        lines.append(f"| {oracle.POLICY_LABELS[policy]} | {text} |")
    lines += ["", f"Command: `{result['command']}`"]
    return "\n".join(lines)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="a testbed checkpoint trained on the milestone task")
    ap.add_argument("--problems", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fractions", default="0.125,0.25,0.5", help="budgets as fractions of the mean chain")
    ap.add_argument("--policies", default=",".join(oracle.POLICIES), help=f"of {', '.join(oracle.POLICIES)}")
    ap.add_argument("--keep-chain-start", type=int, default=0,
                    help="probe: also keep the first K pages after the prompt's, beyond the budget (default 0)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--name", default="oracle_retention")
    args = ap.parse_args(argv)
    from transformers import AutoModelForCausalLM

    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    for p in policies:
        if p not in oracle.POLICIES:
            raise ValueError(f"--policies: {p!r} is not an oracle policy; allowed: {', '.join(oracle.POLICIES)}")
    try:
        fractions = [float(f) for f in args.fractions.split(",")]
    except ValueError:
        raise ValueError(f"--fractions must be numbers in (0, 1], got {args.fractions!r}") from None
    if args.keep_chain_start < 0:
        raise ValueError(f"--keep-chain-start must be >= 0, got {args.keep_chain_start}")
    if args.problems < 1:
        raise ValueError(f"--problems must be >= 1, got {args.problems}")
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).to(args.device).eval()
    model.set_attn_implementation("sdpa")
    problems = tb.milestone_dataset(args.problems, seed=args.seed)
    budgets = oracle.budgets_for([p.trace for p in problems], fractions)
    page_size = 16
    totals = {"dense": []} | {(p, b): [] for p in policies for b in budgets}
    for prob in tqdm(problems, desc="problems", unit="problem"):
        ids = torch.tensor(np.concatenate([tb.encode_text(prob.question + prob.cot), [tb.EOS]]), device=args.device)
        P = prob.trace.prompt_len
        totals["dense"].append(score(model, ids, P, None))
        for policy in policies:
            for b in budgets:
                res = oracle.simulate(prob.trace, b, policy, page_size, record=True)
                mask = retention_mask(res, P, len(ids) - 1, page_size, args.keep_chain_start).to(args.device)
                totals[(policy, b)].append(score(model, ids, P, mask))

    def summary(cells):
        return {"solved": sum(c["solved"] for c in cells) / len(cells),
                "token_acc": sum(c["ok"] for c in cells) / sum(c["tokens"] for c in cells),
                "value_acc": sum(c["values_ok"] for c in cells) / sum(c["values"] for c in cells)}

    result = {
        "command": "python " + " ".join([sys.argv[0] if argv is None else "benchmarks/oracle_retention.py",
                                         *(sys.argv[1:] if argv is None else argv)]),
        "model": args.model, "problems": len(problems), "seed": args.seed, "device": args.device,
        "fractions": fractions, "budgets": budgets, "page_size": page_size, "keep_chain_start": args.keep_chain_start,
        "reference_length": sum(p.trace.chain_tokens for p in problems) / len(problems),
        "torch": torch.__version__, "dense": summary(totals["dense"]),
        "rows": {p: [dict(budget=b, **summary(totals[(p, b)])) for b in budgets] for p in policies},
        "seconds": round(time.perf_counter() - t0, 1),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(result, indent=1))
    (out / f"{args.name}.md").write_text(markdown(result) + "\n")
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
