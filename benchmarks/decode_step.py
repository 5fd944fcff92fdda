"""One attention layer, one decode token: the engine's whole step per policy vs SDPA baselines.

For each grid point (batch B, heads Hq/Hkv, head dim 128, context N, budget L) it times, by
CUDA-graph replay of the compiled step (median over chunks of replays, CUDA events):

    raas / h2o / streaming   full engine step over an L-slot compacted buffer (O(L) memory)
    quest                    full engine step over an N-token buffer attending to L tokens
    sdpa_dense_N             F.scaled_dot_product_attention over N cached tokens (today's dense decode)
    sdpa_L                   SDPA over a dense L-token buffer: the ideal for a compacted cache
    floor_L                  bytes of K and V in L slots / measured copy bandwidth

Every engine output is checked against a float64 reference over the resident tokens before it is
timed. Results: JSON and a markdown table under --out (default benchmarks/results/).

    python benchmarks/decode_step.py                 # full grid (GPU)
    python benchmarks/decode_step.py --quick         # two small points
    python benchmarks/decode_step.py --smoke         # tiny CPU run used by the tests (no timing claims)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch._dynamo
import torch.nn.functional as F

try:
    from tqdm import tqdm
except ImportError:  # pragma: no cover - tqdm is a dependency of raas_flex
    def tqdm(x, **_):
        return x

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from raas_flex import PagedKVCache, RaaSConfig  # noqa: E402

FULL_GRID = [
    # (B, Hq, Hkv)
    (1, 28, 4), (8, 28, 4), (32, 28, 4),
    (1, 32, 8), (8, 32, 8), (32, 32, 8),
]
CONTEXTS = [8192, 32768, 131072]
BUDGETS = [1024, 2048, 4096]


def copy_bandwidth(device) -> float:
    x = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    times = []
    for _ in range(10):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record(); y.copy_(x); e.record(); torch.cuda.synchronize()
        times.append(s.elapsed_time(e) * 1e-3)
    return 2 * x.numel() / statistics.median(times)


def graph_time_us(fn, chunks: int = 10, per_chunk: int = 20) -> float:
    """Median microseconds per call of fn replayed from a CUDA graph (fn may mutate state)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    for _ in range(5):
        g.replay()
    times = []
    for _ in range(chunks):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(per_chunk):
            g.replay()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / per_chunk)
    return statistics.median(times)


def reference(cache: PagedKVCache, q: torch.Tensor) -> torch.Tensor:
    """float64 attention of q over the slots the last step attended (cache.valid)."""
    G = cache.G
    valid = cache.valid.view(cache.B, cache.H, cache.S).repeat_interleave(G, 1)[:, :, None, :]
    k = cache.k.double().repeat_interleave(G, 1)
    v = cache.v.double().repeat_interleave(G, 1)
    return F.scaled_dot_product_attention(q.double(), k, v, attn_mask=valid, scale=cache.scale)


def make_cache(policy, B, Hq, Hkv, D, N, L, dtype, device, extra_steps):
    ps = 16
    cfg = RaaSConfig(budget=L, policy=policy, page_size=ps, pin_prompt=False,
                     max_length=(N + extra_steps) if policy in ("quest", "dense") else None)
    cache = PagedKVCache(cfg, batch_size=B, num_heads=Hq, num_kv_heads=Hkv, head_dim=D,
                         dtype=dtype, device=device, max_length=cfg.max_length)
    n0 = N if policy in ("quest", "dense") else L - ps  # bounded: full buffer, evicting every page
    k = torch.randn(B, Hkv, n0, D, dtype=dtype, device=device)
    v = torch.randn(B, Hkv, n0, D, dtype=dtype, device=device)
    cache.prefill(k, v)
    return cache


def run_point(B, Hq, Hkv, D, N, L, policies, dtype, device, timed, bw, max_bytes):
    row = dict(B=B, Hq=Hq, Hkv=Hkv, D=D, N=N, L=L)
    extra = 400
    q = torch.randn(B, Hq, 1, D, dtype=dtype, device=device)
    kn = torch.randn(B, Hkv, 1, D, dtype=dtype, device=device)
    vn = torch.randn(B, Hkv, 1, D, dtype=dtype, device=device)
    for policy in policies:
        kv_tokens = N + extra if policy in ("quest", "dense") else L
        if 2 * B * Hkv * kv_tokens * D * dtype.itemsize > max_bytes:
            row[policy] = None
            continue
        cache = make_cache(policy, B, Hq, Hkv, D, N, L, dtype, device, extra)
        step = cache.compiled_decode()
        # correctness of the compiled step against float64, on fresh inputs, over a few steps
        errs = []
        for _ in range(3):
            qq = torch.randn_like(q)
            out = step(qq, torch.randn_like(kn), torch.randn_like(vn))
            ref = reference(cache, qq)
            errs.append(((out.double() - ref).norm() / ref.norm()).item())
        row[f"{policy}_err"] = max(errs)
        if timed:
            row[policy] = graph_time_us(lambda: step(q, kn, vn))
        row[f"{policy}_kv_bytes"] = cache.kv_bytes
        cache.check()
        del cache, step
    if timed:
        if 2 * B * Hkv * N * D * dtype.itemsize <= max_bytes:
            k = torch.randn(B, Hkv, N, D, dtype=dtype, device=device)
            v = torch.randn_like(k)
            row["sdpa_dense_N"] = graph_time_us(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True))
            del k, v
        k = torch.randn(B, Hkv, L, D, dtype=dtype, device=device)
        v = torch.randn_like(k)
        row["sdpa_L"] = graph_time_us(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True))
        row["floor_L"] = 2 * B * Hkv * L * D * dtype.itemsize / bw * 1e6
    return row


def markdown(rows, policies) -> str:
    cols = ["B", "Hq/Hkv", "N", "L", "floor_L", "sdpa_L", *policies, "sdpa_dense_N", "raas/sdpa_L", "sdpa_N/raas"]
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    f = lambda x: "-" if x is None else (f"{x:.1f}" if isinstance(x, float) else str(x))
    for r in rows:
        raas = r.get("raas")
        vals = [r["B"], f"{r['Hq']}/{r['Hkv']}", r["N"], r["L"], r.get("floor_L"), r.get("sdpa_L"),
                *[r.get(p) for p in policies], r.get("sdpa_dense_N"),
                (raas / r["sdpa_L"]) if raas and r.get("sdpa_L") else None,
                (r["sdpa_dense_N"] / raas) if raas and r.get("sdpa_dense_N") else None]
        out.append("| " + " | ".join(f(v) for v in vals) + " |")
    return "\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="two small grid points")
    ap.add_argument("--smoke", action="store_true", help="tiny CPU-sized run, checks only (no timing)")
    ap.add_argument("--policies", default="raas,h2o,streaming,quest")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    ap.add_argument("--max-gb", type=float, default=30.0, help="skip points whose KV exceeds this")
    args = ap.parse_args(argv)
    policies = args.policies.split(",")
    torch.manual_seed(0)
    if args.smoke:
        device, dtype, timed = "cpu", torch.float32, False
        points = [(2, 6, 2, 16, 256, 64)]
    else:
        if not torch.cuda.is_available():
            ap.error("needs CUDA (use --smoke on CPU)")
        device, dtype, timed = "cuda", getattr(torch, args.dtype), True
        grid = [(1, 28, 4), (8, 32, 8)] if args.quick else FULL_GRID
        ctxs = [8192, 32768] if args.quick else CONTEXTS
        buds = [2048] if args.quick else BUDGETS
        points = [(B, Hq, Hkv, 128, N, L) for (B, Hq, Hkv) in grid for N in ctxs for L in buds]
    torch._dynamo.config.cache_size_limit = 4096
    if hasattr(torch._dynamo.config, "recompile_limit"):
        torch._dynamo.config.recompile_limit = 4096
    bw = copy_bandwidth(device) if timed else float("nan")
    meta = dict(
        command="python " + " ".join([os.path.relpath(__file__)] + (argv if argv is not None else sys.argv[1:])),
        torch=torch.__version__, device=torch.cuda.get_device_name() if timed else platform.processor() or "cpu",
        dtype=str(dtype), copy_bandwidth_TBps=bw / 1e12, time=time.strftime("%Y-%m-%d %H:%M:%S"),
    )
    rows = []
    for p in tqdm(points, desc="decode-step grid"):
        row = run_point(*p, policies, dtype, device, timed, bw, args.max_gb * 2**30)
        rows.append(row)
        tqdm.write(json.dumps({k: (round(v, 2) if isinstance(v, float) else v) for k, v in row.items()}))
        if timed:
            torch.cuda.empty_cache()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = "smoke" if args.smoke else ("quick" if args.quick else "full")
    (out / f"decode_step_{tag}.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    table = markdown(rows, policies)
    (out / f"decode_step_{tag}.md").write_text(
        f"Decode step, one layer, microseconds (CUDA-graph replay median). {meta}\n\n{table}\n")
    print(table)
    return rows


if __name__ == "__main__":
    main()
