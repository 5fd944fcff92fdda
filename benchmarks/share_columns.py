"""Page shares from flex_attention itself: page-indicator columns appended to V, against the fused step.

softmax(q K^T) times a 0/1 slot-to-page matrix is each page's attention share, so a V buffer that
carries that matrix as extra columns, [V | onehot(slot // page_size)], makes flex_attention return
the output and the page shares of every query head in one pass. This script times that pass (the
shares only: the refresh that would follow is not included, so it is a lower bound for such a
path) beside the shipped one-kernel step of the share configurations, which computes the shares
in its own pass over K/V and also appends, evicts and refreshes. Per point (batch B, heads Hq/Hkv,
head dim 128, L slots in pages of 16), CUDA-graph replay medians in microseconds:

    sdpa_L            SDPA over a dense L-token buffer (the ideal for a compacted cache)
    flex_L            compiled flex_attention over the L slots, V alone (the engine's packed-GQA layout and
                      flex kernel options, ``engine.default_kernel_options``)
    flex_columns      the same with V' = [V | one-hot page columns] (head dim 128 + L/16), and the
                      shares summed over each KV head's query heads (the engine takes their max;
                      either is one small reduction after the pass)
    <config>          the engine's whole step (``PagedKVCache.compiled_decode()``), e.g.
                      ``raas:importance=attention``

flex_columns' output and shares are checked against float64 before timing; the configurations are
checked by ``decode_step.time_config`` (float64 output, graphs compiled after warm-up).

    python benchmarks/share_columns.py --shapes 8/28/4,8/32/8,32/28/4,32/32/8 --budgets 1024,2048,4096
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import flex_attention

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.decode_step import copy_bandwidth, graph_time_us, time_config, tqdm  # noqa: E402
from raas_flex.engine import default_kernel_options  # noqa: E402

PAGE = 16


def column_values(v: torch.Tensor, page: int) -> torch.Tensor:
    """[V | onehot(slot // page)]: v [BH, 1, S, D] -> [BH, 1, S, D + S // page]."""
    bh, _, s, _ = v.shape
    onehot = torch.eye(s // page, dtype=v.dtype, device=v.device).repeat_interleave(page, 0)
    return torch.cat([v, onehot.expand(bh, 1, s, s // page)], dim=-1)


def columns_step(q, k, vc, D: int, G: int, options=None):
    """Output [BH, 1, G, D] and page shares [BH, pages] (summed over the G query heads) in one flex pass."""
    out = flex_attention(q, k, vc, kernel_options=options)
    return out[..., :D], out[..., D:].float().sum(2).squeeze(1)


def reference(q, k, v, page: int):
    """float64 output and page shares of the packed layout (q [BH, 1, G, D], k/v [BH, 1, S, D])."""
    p = torch.softmax(q.double() @ k.double().transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
    shares = p.view(*p.shape[:-1], -1, page).sum(-1).sum(2).squeeze(1)
    return p @ v.double(), shares


def run_point(B, Hq, Hkv, L, configs, dtype, device, row):
    D, G = 128, Hq // Hkv
    q = torch.randn(B * Hkv, 1, G, D, dtype=dtype, device=device)
    k = torch.randn(B * Hkv, 1, L, D, dtype=dtype, device=device)
    v = torch.randn_like(k)
    vc = column_values(v, PAGE)
    opts = default_kernel_options(torch.device(device), dtype, 128)  # (the block of a raas buffer)
    row["flex_kernel_options"] = opts
    flex = torch.compile(lambda q, k, v: flex_attention(q, k, v, kernel_options=opts), fullgraph=True, dynamic=False)
    cols = torch.compile(lambda q, k, vc: columns_step(q, k, vc, D, G, opts), fullgraph=True, dynamic=False)
    row["flex_L"] = graph_time_us(lambda: flex(q, k, v))
    row["flex_columns_head_dim"] = vc.shape[-1]
    try:
        out, shares = cols(q, k, vc)
        ref_out, ref_shares = reference(q, k, v, PAGE)
        row["flex_columns_err"] = ((out.double() - ref_out).norm() / ref_out.norm()).item()
        row["flex_columns_share_err"] = ((shares.double() - ref_shares).abs().max() / ref_shares.abs().max()).item()
        row["flex_columns"] = graph_time_us(lambda: cols(q, k, vc))
    except Exception as e:  # flex may refuse the widened head dim with these options: a result too
        row["flex_columns_error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:300]}"
    qs = q.view(B, Hkv * G, 1, D)
    ks, vs = k.view(B, Hkv, L, D), v.view(B, Hkv, L, D)
    row["sdpa_L"] = graph_time_us(lambda: F.scaled_dot_product_attention(qs, ks, vs, enable_gqa=True))
    del q, k, v, vc
    torch._dynamo.reset()
    for spec in configs:
        time_config(spec, B, Hq, Hkv, D, 8 * L, L, dtype, device, True, row)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="8/28/4,8/32/8,32/28/4,32/32/8", help="B/Hq/Hkv list")
    ap.add_argument("--budgets", default="1024,2048,4096", help="budgets L (slots)")
    ap.add_argument("--configs", default="raas:importance=attention;raas:importance=attention,refresh=threshold",
                    help="semicolon-separated engine configurations timed beside the flex passes")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    ap.add_argument("--tag", default="share_columns")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        ap.error("needs CUDA")
    shapes = [tuple(int(x) for x in s.split("/")) for s in args.shapes.split(",") if s]
    if any(len(s) != 3 for s in shapes):
        ap.error(f"--shapes must be B/Hq/Hkv items, got {args.shapes!r}")
    budgets = [int(x) for x in args.budgets.split(",") if x]
    configs = [c for c in args.configs.split(";") if c]
    torch.manual_seed(0)
    torch._dynamo.config.cache_size_limit = 4096
    dtype, device = torch.bfloat16, "cuda"
    meta = dict(command="python " + " ".join([os.path.relpath(__file__)] + (argv if argv is not None else sys.argv[1:])),
                torch=torch.__version__, device=torch.cuda.get_device_name(), dtype=str(dtype),
                copy_bandwidth_TBps=copy_bandwidth(device) / 1e12, time=time.strftime("%Y-%m-%d %H:%M:%S"),
                configs=configs, page_size=PAGE)
    rows = []
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for B, Hq, Hkv in shapes:
        for L in tqdm(budgets, desc=f"B={B} {Hq}/{Hkv}"):
            row = dict(B=B, Hq=Hq, Hkv=Hkv, L=L)
            try:
                run_point(B, Hq, Hkv, L, configs, dtype, device, row)
            except Exception as e:  # a point that fails (e.g. flex refusing the head dim) is a result too
                row["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:300]}"
                torch._dynamo.reset()
            rows.append(row)
            tqdm.write(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}))
            torch.cuda.empty_cache()
    (out / f"{args.tag}.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    cols = ["sdpa_L", "flex_L", "flex_columns", *configs]
    lines = ["| B | Hq/Hkv | L | " + " | ".join(cols) + " | flex_columns / flex_L | " +
             " | ".join(f"{c} / flex_columns" for c in configs) + " |", "|" + "---|" * (4 + len(cols) + len(configs))]
    f = lambda x: "-" if x is None else f"{x:.1f}"
    for r in rows:
        ratio = lambda a, b: f"{r[a] / r[b]:.2f}" if r.get(a) and r.get(b) else "-"
        lines.append(f"| {r['B']} | {r['Hq']}/{r['Hkv']} | {r['L']} | " + " | ".join(f(r.get(c)) for c in cols) +
                     f" | {ratio('flex_columns', 'flex_L')} | " +
                     " | ".join(ratio(c, "flex_columns") for c in configs) + " |")
    table = "\n".join(lines)
    (out / f"{args.tag}.md").write_text(f"Page shares by V columns in flex vs the fused step (us). {meta}\n\n{table}\n")
    print(table)


if __name__ == "__main__":
    main()
