"""Teacher-forced fidelity: how far each policy's next-token distributions drift from dense's along
dense's own chains.

    python benchmarks/fidelity.py --accuracy benchmarks/results/accuracy_X.json --problems problems.jsonl \\
        --model path/or/file.gguf --policies "raas;h2o;streaming" --budgets 0.25

Reads the dense row of a ``benchmarks/accuracy.py`` run (its generated tokens per problem and
``reference_length``). Problems run in batches of like chain length; for each batch the unpatched
model's next-token distributions along the chains are computed once (one forward per problem: memory
stays at a batch's distributions), then every (policy, budget) feeds the prompts and dense's chains
token by token through the patched model (a ``RaaSCache`` stepped by hand, positions from the
left-padded prompt, as ``generate`` does) and compares each step's distribution with dense's on the
same prefix: top-1 agreement and mean KL(dense || policy) in nats, over every chain token of every
problem. Budgets as in accuracy.py (fractions of the mean dense chain or token counts). ``--limit N``
takes the first N problems of the run. Writes ``<out>/<name>.json`` after every batch of every
(policy, budget) (per-problem results; a row's ``done`` counts its problems), ``.md`` and ``.png``
(agreement and KL against the budget) at the end;
``--resume`` keeps the per-problem results of an earlier run with the same settings and runs only the
missing ones (long CPU runs span several calls).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import raas_flex  # noqa: E402
from benchmarks import accuracy  # noqa: E402
from raas_flex.config import parse_spec  # noqa: E402
from raas_flex.hf import generate_cache_key  # noqa: E402


@torch.no_grad()
def dense_logprobs(model, prompts: list[list[int]], chains: list[list[int]]) -> list[torch.Tensor]:
    """The unpatched model's log-probabilities of the token after every chain prefix: per problem
    fp16 ``[len(chain), vocab]`` (row t: the distribution that chain token t was drawn from)."""
    out = []
    for p, c in zip(prompts, chains):
        ids = torch.tensor([p + c[:-1]], device=model.device)
        logits = model(ids).logits[0, len(p) - 1:].float()
        out.append(F.log_softmax(logits, -1).half())
    return out


def batches_by_length(chains: list[list[int]], batch_size: int) -> list[list[int]]:
    """Problem indices sorted by chain length and cut into batches: chains of like length run together,
    so a batch's short chains do not wait on padding for its longest one."""
    order = sorted(range(len(chains)), key=lambda i: (len(chains[i]), i))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


@torch.no_grad()
def batch_fidelity(model, prompts, chains, rows: list[int], reference: list[torch.Tensor], policy: str, budget: int,
                   page_size: int, pad: int) -> list[dict]:
    """Per problem of ``rows``: top-1 agreement and mean KL(dense || policy) of ``policy`` at ``budget``
    along its chain, against ``reference`` (:func:`dense_logprobs` of the same rows)."""
    name, options = parse_spec(policy)
    with raas_flex.patched(model, budget, policy=name, page_size=page_size, **options):
        width = max(len(prompts[r]) for r in rows)
        steps = max(len(chains[r]) for r in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        chain = torch.full((len(rows), steps), pad, dtype=torch.long)
        for j, r in enumerate(rows):  # prompts left-padded, as generate gets them
            ids[j, width - len(prompts[r]):] = torch.tensor(prompts[r])
            mask[j, width - len(prompts[r]):] = 1
            chain[j, :len(chains[r])] = torch.tensor(chains[r])
        ids, mask, chain = ids.to(model.device), mask.to(model.device), chain.to(model.device)
        lengths = torch.tensor([len(chains[r]) for r in rows], device=model.device)
        agree = torch.zeros(len(rows), device=model.device)
        kl = torch.zeros(len(rows), dtype=torch.float64, device=model.device)
        cache = {generate_cache_key(model): raas_flex.RaaSCache(model, max_length=width + steps)}
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(ids, attention_mask=mask, position_ids=pos, **cache).logits[:, -1]
        pos = pos[:, -1:]
        for t in range(steps):
            lp = F.log_softmax(logits.float(), -1)
            ref = torch.stack([x[min(t, len(x) - 1)] for x in reference]).float()
            live = t < lengths
            agree += (lp.argmax(-1) == ref.argmax(-1)) & live
            kl += ((ref.exp() * (ref - lp)).sum(-1) * live).double()
            if t + 1 < steps:
                pos = pos + 1
                logits = model(input_ids=chain[:, t:t + 1], position_ids=pos, use_cache=True, **cache).logits[:, -1]
    n = lengths.double()
    return [{"index": r, "top1_agreement": float(a), "mean_kl": float(k), "tokens": int(m)}
            for r, a, k, m in zip(rows, (agree / n).tolist(), (kl / n).tolist(), lengths.tolist())]


def summarize(policy: str, budget: int, per_problem: dict[int, dict]) -> dict:
    """A (policy, budget) row from its per-problem results so far: token-weighted top-1 agreement and
    mean KL over every chain token of the problems done."""
    done = [per_problem[i] for i in sorted(per_problem)]
    tokens = sum(x["tokens"] for x in done)
    return {"policy": policy, "budget": budget, "done": len(done), "tokens": tokens,
            "top1_agreement": sum(x["top1_agreement"] * x["tokens"] for x in done) / tokens,
            "mean_kl": sum(x["mean_kl"] * x["tokens"] for x in done) / tokens, "problems": done}


RUN_KEYS = ("model", "accuracy_json", "problems", "reference_length", "dtype", "page_size")


def resumed_rows(path: Path, report: dict) -> dict:
    """``--resume``: the per-problem results (by problem index) of the rows without an error of an
    earlier run written to ``path``, by (policy, budget); {} when there is none. The earlier run must have the same settings (RUN_KEYS), else
    ValueError naming what differs."""
    if not path.exists():
        return {}
    prev = json.loads(path.read_text())
    changed = [k for k in RUN_KEYS if prev.get(k) != report[k]]
    if changed:
        raise ValueError(f"--resume: {path} is a run with other {', '.join(changed)}; use another --name or drop --resume")
    return {(r["policy"], r["budget"]): {x["index"]: x for x in r["problems"]}
            for r in prev.get("rows", []) if "error" not in r}


def markdown(report: dict) -> str:
    lines = [f"Teacher-forced along dense's chains: model `{report['model']}`, {report['problems']} problems, "
             f"{report['dtype']}, {report['device']}; mean dense chain {report['reference_length']:.0f} tokens.", "",
             "| policy | budget | budget / dense length | top-1 = dense | mean KL (nats) | problems | tokens |",
             "|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        frac = r["budget"] / report["reference_length"]
        if "error" in r:
            lines.append(f"| {r['policy']} | {r['budget']} | {frac:.3f} | error: {r['error'][:120]} |  |  |  |")
            continue
        lines.append(f"| {r['policy']} | {r['budget']} | {frac:.3f} | {r['top1_agreement']:.4f} | {r['mean_kl']:.4f} "
                     f"| {r['done']} | {r['tokens']} |")
    lines += ["", f"Command: `{report['command']}`"]
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    """Top-1 agreement and mean KL against the budget, one line per policy (rows without an error)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    rows = [r for r in report["rows"] if "error" not in r]
    for ax, key, label in ((axes[0], "top1_agreement", "next-token argmax = dense's"),
                           (axes[1], "mean_kl", "mean KL(dense || policy), nats/token")):
        for policy in dict.fromkeys(r["policy"] for r in rows):
            pts = sorted((r["budget"], r[key]) for r in rows if r["policy"] == policy)
            ax.plot([b for b, _ in pts], [v for _, v in pts], marker="o", label=policy)
        ax.set_xticks(sorted({r["budget"] for r in rows}))
        ax.set_xlabel("KV budget (tokens)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[1].set_yscale("log")
    axes[0].legend()
    fig.suptitle(f"{report['model']}: teacher-forced along dense's chains, {report['problems']} problems, "
                 f"{report['dtype']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--accuracy", required=True, help="an accuracy.py JSON with a dense row")
    ap.add_argument("--problems", required=True, help="the JSONL that accuracy.py ran (--problems)")
    ap.add_argument("--model", required=True, help="the model accuracy.py ran (path, hub id or .gguf file)")
    ap.add_argument("--policies", default="raas;h2o;streaming")
    ap.add_argument("--budgets", default="0.25")
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--dtype", default="float32", choices=tuple(accuracy.DTYPES))
    ap.add_argument("--device", default=None)
    ap.add_argument("--prompt-format", default="auto", choices=accuracy.PROMPT_FORMATS)
    ap.add_argument("--instruction", default=accuracy.DEFAULT_INSTRUCTION)
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--name", default="fidelity")
    ap.add_argument("--limit", type=int, default=None, help="the first N problems of the accuracy run")
    ap.add_argument("--resume", action="store_true",
                    help="keep the rows of an earlier run under the same --out/--name (same model, problems, dtype "
                         "and page size) and run only the missing (policy, budget) pairs")
    args = ap.parse_args(argv)
    for name in ("batch_size", "limit"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    policies = [p for p in accuracy.parse_policies(args.policies) if p != "dense"]
    budgets = accuracy.parse_budgets(args.budgets)
    acc = json.loads(Path(args.accuracy).read_text())
    dense = next((r for r in acc["rows"] if r["policy"] == "dense" and "results" in r), None)
    if dense is None or any("tokens" not in x for x in dense["results"]):
        raise ValueError(f"--accuracy {args.accuracy}: no dense row with generated tokens (run accuracy.py with dense)")
    results = dense["results"][: args.limit]
    problems = accuracy.load_problems(args.problems)[: len(results)]
    if len(problems) != len(results) or any(p["answer"] != x["gold"] for p, x in zip(problems, results)):
        raise ValueError(f"--problems {args.problems} are not the problems of --accuracy {args.accuracy}")
    tok, model = accuracy.load_model(args)
    prompts = accuracy.build_prompts(tok, problems, args.prompt_format, args.instruction)
    chains = [x["tokens"] for x in results]
    pad = tok.pad_token_id if tok.pad_token_id is not None else chains[0][-1]
    ref_len = acc["reference_length"]
    t0 = time.perf_counter()
    report = {
        "command": " ".join(["python", "benchmarks/fidelity.py"] + (sys.argv[1:] if argv is None else list(argv))),
        "model": acc["model"], "accuracy_json": args.accuracy, "problems": len(problems),
        "reference_length": ref_len, "dtype": args.dtype, "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "device": torch.cuda.get_device_name(model.device) if model.device.type == "cuda" else platform.processor() or "cpu",
        "page_size": args.page_size, "rows": [],
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    done = resumed_rows(out / f"{args.name}.json", report) if args.resume else {}
    longest = max(map(len, prompts))
    configs = [(p, accuracy.resolve_budget(b, ref_len, args.page_size, longest)) for p in policies for b in budgets]
    results = {key: dict(done.get(key, {})) for key in configs}  # (policy, budget) -> {problem: result}
    errors: dict = {}

    def write() -> None:
        report["rows"] = [{"policy": k[0], "budget": k[1], "error": errors[k]} if k in errors
                          else summarize(*k, results[k]) for k in configs if k in errors or results[k]]
        (out / f"{args.name}.json").write_text(json.dumps(report, indent=1))

    # batch by batch, every (policy, budget) on it: the batch's dense reference is computed once
    with tqdm(total=len(configs) * len(problems), unit="problem", desc="fidelity", dynamic_ncols=True,
              mininterval=2.0 if sys.stderr.isatty() else 30.0) as bar:
        for rows in batches_by_length(chains, args.batch_size):
            todo = [k for k in configs if k not in errors and any(r not in results[k] for r in rows)]
            bar.update(len(rows) * (len(configs) - len(todo)))
            if not todo:
                continue
            reference = dense_logprobs(model, [prompts[r] for r in rows], [chains[r] for r in rows])
            for policy, budget in todo:
                try:
                    for x in batch_fidelity(model, prompts, chains, rows, reference, policy, budget, args.page_size,
                                            pad):
                        results[policy, budget][x["index"]] = x
                except (ValueError, RuntimeError) as e:
                    errors[policy, budget] = f"{type(e).__name__}: {e}"[:500]
                    tqdm.write(f"{policy} budget {budget}: error: {errors[policy, budget]}")
                bar.update(len(rows))
                write()
    write()
    report["total_seconds"] = time.perf_counter() - t0
    (out / f"{args.name}.json").write_text(json.dumps(report, indent=1))
    (out / f"{args.name}.md").write_text(markdown(report))
    plot(report, out / f"{args.name}.png")
    print(markdown(report))
    return report


if __name__ == "__main__":
    main()
