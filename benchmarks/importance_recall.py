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
Writes ``<out>/<name>.json`` and ``.md``.
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


def measure(model, problems, spec: tb.TaskSpec, page: int = 16, every: int = 1) -> dict:
    cfg = model.config
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    scale = d ** -0.5
    n_layers = cfg.num_hidden_layers
    hits = {est: np.zeros((n_layers, len(KS))) for est in ("attention", "bound")}
    share_sum = np.zeros(n_layers)
    reads = 0
    P = spec.prompt_tokens
    for prob in tqdm(problems, desc="problems", dynamic_ncols=True):
        ids = torch.from_numpy(tb.encode_text(prob.question + prob.cot))[None]
        qk = post_rope_qk(model, ids)
        for line in range(spec.lag + 1, prob.lines + 1, every):
            if spec.reads_table(line):
                continue
            # the query that predicts b sits on the "+" (column 5) of line `line`; b_{line} = v_{line-lag},
            # whose token is column 8 of line (line - lag)
            t = P + (line - 1) * tb.LINE_WIDTH + 5
            need = (P + (line - spec.lag - 1) * tb.LINE_WIDTH + 8) // page
            reads += 1
            for li, (q, k) in enumerate(qk):
                share, bound = page_scores(q, k, t, page, scale)
                h = int(share[:, need].argmax())
                share_sum[li] += float(share[h, need])
                for est, s in (("attention", share[h]), ("bound", bound[h])):
                    r = rank_of(s, need)
                    hits[est][li] += [r < kk for kk in KS]
    return {
        "reads": reads,
        "ks": list(KS),
        "layers": [
            {"layer": li, "mean_share_on_needed_page": share_sum[li] / max(reads, 1),
             **{f"{est}_top{kk}": hits[est][li, j] / max(reads, 1) for est in hits for j, kk in enumerate(KS)}}
            for li in range(n_layers)
        ],
    }


def to_markdown(res: dict, command: str) -> str:
    head = "| layer | share on needed page | " + " | ".join(
        f"{est} top-{k}" for est in ("attention", "bound") for k in res["ks"]) + " |"
    lines = [f"Command: `{command}`", "", f"{res['reads']} lagged reads (teacher forced).", "", head,
             "|" + "---|" * (2 + 2 * len(res["ks"]))]
    for row in res["layers"]:
        cells = [str(row["layer"]), f"{row['mean_share_on_needed_page']:.3f}"]
        cells += [f"{row[f'{est}_top{k}']:.3f}" for est in ("attention", "bound") for k in res["ks"]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="a testbed-trained Llama checkpoint (local path)")
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
    problems = tb.dataset(args.problems, seed=args.seed)
    res = measure(model, problems, tb.DEFAULT_SPEC, page=args.page_size, every=args.every)
    command = "python benchmarks/importance_recall.py " + " ".join(sys.argv[1:] if argv is None else argv)
    res.update(command=command, model=args.model, problems=args.problems, torch=torch.__version__)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(res, indent=1))
    md = to_markdown(res, command)
    (out / f"{args.name}.md").write_text(md)
    print(md)
    return res


if __name__ == "__main__":
    main()
