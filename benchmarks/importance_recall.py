"""How well does each page-importance estimate find the page a reasoning step actually reads?

    python benchmarks/importance_recall.py --model models/testbed --problems 16

On the testbed (raas_flex.testbed) the lagged read of line i (b = v_{i-lag}) needs the page that holds
v_{i-lag}, written ``10 * lag`` tokens earlier. For each such read this script runs the model teacher
forced over the reference chain, takes every layer's post-RoPE queries and keys, and ranks the pages
visible to the query that writes b by

- ``attention``: the page's exact share of the softmax mass (max over the KV head's query heads);
- ``bound``: Quest's page bound sum_d max(q_d M_d, q_d m_d) over the per-page key max M / min m
  (max over query heads), the estimate raas and quest use by default.

Per layer it reports, for the KV head that puts the most attention on the needed page, how often
that page is in each estimate's top k (k = 1, 4, 9, 18: 9 is what raas refreshes at a 288-token
budget, 18 is what quest attends), and the mean attention share on it. Float64, CPU is fine.

    python benchmarks/importance_recall.py --model models/milestone --task milestone --problems 4

On the milestone task the reads come from each problem's exact trace (``raas_flex.oracle.Trace``):
every read of a page older than the query's last four (the recent pages every policy keeps) is a
*fact* read (a question page: the phoenix copy) or a *milestone* read (a chain page). The same
ranking is reported per kind, at k = 1, 3, 15, 31: at a 496-token budget (31 pages, 1/4 of the
chain) raas refreshes 3 pages per step by default (``refresh_ratio=0.125``), 15 with the paper's 0.5,
and quest attends to 31. Writes ``<out>/<name>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from raas_flex import testbed as tb  # noqa: E402

KS = (1, 4, 9, 18)
MILESTONE_KS = (1, 3, 15, 31)
RECENT_PAGES = 4  # pages behind the query that every policy keeps: reads there say nothing


def post_rope_qk(model, ids: torch.Tensor):
    """Per layer (q [Hq, T, D], k [Hkv, T, D]) after RoPE, float64, for one sequence ``ids`` [1, T]."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    cfg = model.config
    hq, hkv = cfg.num_attention_heads, cfg.num_key_value_heads
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // hq
    got: dict[int, dict[str, torch.Tensor]] = {}
    hooks = []
    for i, layer in enumerate(model.model.layers):
        attn = layer.self_attn
        for name in ("q_proj", "k_proj"):
            hooks.append(getattr(attn, name).register_forward_hook(
                lambda mod, inp, out, i=i, name=name: got.setdefault(i, {}).__setitem__(name, out.detach())))
    try:
        with torch.no_grad():
            model(input_ids=ids)
            pos = torch.arange(ids.shape[1])[None]
            cos, sin = model.model.rotary_emb(got[0]["q_proj"], pos)
    finally:
        for h in hooks:
            h.remove()
    out = []
    for i in range(len(model.model.layers)):
        q = got[i]["q_proj"].view(1, -1, hq, d).transpose(1, 2)
        k = got[i]["k_proj"].view(1, -1, hkv, d).transpose(1, 2)
        if hasattr(model.model.layers[i].self_attn, "q_norm"):  # qwen3-style per-head norms
            q = model.model.layers[i].self_attn.q_norm(q)
            k = model.model.layers[i].self_attn.k_norm(k)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        out.append((q[0].double(), k[0].double()))
    return out


def page_scores(q: torch.Tensor, k: torch.Tensor, t: int, page: int, scale: float):
    """(share, bound) per page visible to query position t: float64 [Hkv, pages]."""
    hkv, _, d = k.shape
    g = q.shape[0] // hkv
    kv = k[:, : t + 1]  # [Hkv, t+1, D]
    qt = q[:, t].view(hkv, g, d)
    logits = torch.einsum("hgd,htd->hgt", qt, kv) * scale
    p = torch.softmax(logits, -1)
    n_pages = -(-(t + 1) // page)
    pad = n_pages * page - (t + 1)
    share = torch.nn.functional.pad(p, (0, pad)).view(hkv, g, n_pages, page).sum(-1).amax(1)
    kp = torch.nn.functional.pad(kv, (0, 0, 0, pad), value=float("nan")).view(hkv, n_pages, page, d)
    kmax = torch.where(kp.isnan(), -torch.inf, kp).amax(2)
    kmin = torch.where(kp.isnan(), torch.inf, kp).amin(2)
    qp, qn = qt.clamp(min=0), qt.clamp(max=0)
    bound = (torch.einsum("hgd,hpd->hgp", qp, kmax) + torch.einsum("hgd,hpd->hgp", qn, kmin)).amax(1)
    return share, bound


def rank_of(scores: torch.Tensor, index: int) -> int:
    """0-based descending rank of ``scores[index]`` (ties count against it)."""
    return int((scores > scores[index]).sum() + (scores[:index] == scores[index]).sum())


def lag_reads(prob, spec: tb.TaskSpec, page: int, every: int):
    """The lag task's far reads: the query that predicts b sits on the "+" (column 5) of line ``line``;
    b = v_{line-lag}, whose token is column 8 of line ``line - lag``. ``(query position, page, kind)``."""
    P = spec.prompt_tokens
    for line in range(spec.lag + 1, prob.lines + 1, every):
        if not spec.reads_table(line):
            yield (P + (line - 1) * tb.LINE_WIDTH + 5, (P + (line - spec.lag - 1) * tb.LINE_WIDTH + 8) // page, "lagged")


def trace_reads(prob, page: int, every: int):
    """A milestone problem's far reads from its trace: the query at ``step - 1`` produces token ``step``;
    a read page older than the query's last RECENT_PAGES is a "fact" (question) or "milestone" read."""
    for i, (step, positions) in enumerate(prob.trace.reads):
        if i % every:
            continue
        t = step - 1
        for need in sorted({p // page for p in positions}):
            if need <= t // page - RECENT_PAGES:
                yield t, need, "fact" if need * page < prob.trace.prompt_len else "milestone"


def measure(model, problems, reads, ks=KS, page: int = 16) -> dict:
    """Per kind of read and layer: how often the needed page is in each estimate's top k, for the KV
    head that puts the most attention on it, and that head's mean share on it. ``reads(prob)`` yields
    ``(query position, needed page, kind)``."""
    cfg = model.config
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    scale = d ** -0.5
    n_layers = cfg.num_hidden_layers
    kinds: dict[str, dict] = {}
    for prob in tqdm(problems, desc="problems", dynamic_ncols=True):
        text = prob.question + prob.cot
        qk = post_rope_qk(model, torch.from_numpy(tb.encode_text(text))[None])
        for t, need, kind in reads(prob):
            acc = kinds.setdefault(kind, {"reads": 0, "share": np.zeros(n_layers),
                                          **{est: np.zeros((n_layers, len(ks))) for est in ("attention", "bound")}})
            acc["reads"] += 1
            for li, (q, k) in enumerate(qk):
                share, bound = page_scores(q, k, t, page, scale)
                h = int(share[:, need].argmax())
                acc["share"][li] += float(share[h, need])
                for est, sc in (("attention", share[h]), ("bound", bound[h])):
                    r = rank_of(sc, need)
                    acc[est][li] += [r < kk for kk in ks]

    def rows(acc):
        n = max(acc["reads"], 1)
        return [{"layer": li, "mean_share_on_needed_page": acc["share"][li] / n,
                 **{f"{est}_top{kk}": acc[est][li, j] / n for est in ("attention", "bound") for j, kk in enumerate(ks)}}
                for li in range(n_layers)]

    return {"ks": list(ks), "reads": sum(a["reads"] for a in kinds.values()),
            "kinds": {kind: {"reads": acc["reads"], "layers": rows(acc)} for kind, acc in kinds.items()}}


def to_markdown(res: dict, command: str) -> str:
    head = "| layer | share on needed page | " + " | ".join(
        f"{est} top-{k}" for est in ("attention", "bound") for k in res["ks"]) + " |"
    lines = [f"Command: `{command}`", ""]
    for kind, part in res["kinds"].items():
        lines += [f"{part['reads']} {kind} reads (teacher forced).", "", head, "|" + "---|" * (2 + 2 * len(res["ks"]))]
        for row in part["layers"]:
            cells = [str(row["layer"]), f"{row['mean_share_on_needed_page']:.3f}"]
            cells += [f"{row[f'{est}_top{k}']:.3f}" for est in ("attention", "bound") for k in res["ks"]]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="a testbed-trained Llama checkpoint (local path)")
    ap.add_argument("--task", default="lag", choices=("lag", "milestone"), help="which testbed task (default lag)")
    ap.add_argument("--problems", type=int, default=16, help="held-out testbed problems")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--every", type=int, default=1, help="measure every n-th line (speed)")
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--name", default="importance_recall")
    args = ap.parse_args(argv)
    for name in ("problems", "every", "page_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    if model.config.model_type not in ("llama", "qwen2", "qwen3", "mistral"):
        raise ValueError(f"model_type={model.config.model_type!r} is not supported; allowed: llama, qwen2, qwen3, mistral")
    page = args.page_size
    if args.task == "lag":
        problems = tb.dataset(args.problems, seed=args.seed)
        res = measure(model, problems, lambda p: lag_reads(p, tb.DEFAULT_SPEC, page, args.every), KS, page)
    else:
        problems = tb.milestone_dataset(args.problems, seed=args.seed)
        res = measure(model, problems, lambda p: trace_reads(p, page, args.every), MILESTONE_KS, page)
    command = "python benchmarks/importance_recall.py " + " ".join(sys.argv[1:] if argv is None else argv)
    res.update(command=command, model=args.model, task=args.task, problems=args.problems, torch=torch.__version__)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(res, indent=1))
    md = to_markdown(res, command)
    (out / f"{args.name}.md").write_text(md)
    print(md)
    return res


if __name__ == "__main__":
    main()
