"""Where does a compiled decode step spend its GPU time? Kernel table from torch.profiler.

    python benchmarks/profile_step.py --policy raas --batch 8 --heads 32/8 --budget 2048
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from raas_flex import PagedKVCache, RaaSConfig  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--policy", default="raas")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--heads", default="32/8")
    ap.add_argument("--budget", type=int, default=2048)
    ap.add_argument("--block-size", type=int, default=None)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rows", type=int, default=25)
    ap.add_argument("--exact-lists", action="store_true", help="compute exact block lists every step")
    ap.add_argument("--fused", choices=["auto", "on", "off"], default="auto",
                    help="bookkeeping by the fused Triton kernels (on), the torch code (off) or where supported (auto)")
    ap.add_argument("--split-kv", type=int, default=None, help="flex kernel option SPLIT_KV")
    ap.add_argument("--attention", choices=["flex", "triton"], default="flex",
                    help="RaaSConfig.attention: flex_attention, or the one-kernel raas step (triton)")
    ap.add_argument("--plain", action="store_true",
                    help="only run --steps steps after the warm-up, no torch.profiler or timing (for running "
                         "under Nsight Compute: ncu -k regex:_step_kernel ... python benchmarks/profile_step.py --plain)")
    ap.add_argument("--sdpa", action="store_true",
                    help="with --plain: then --steps calls of SDPA over a dense buffer of --budget tokens (the "
                         "decode-step benchmark's sdpa_L), for profiling side by side")
    args = ap.parse_args(argv)
    hq, hkv = map(int, args.heads.split("/"))
    B, D, L, dev, dt = args.batch, 128, args.budget, "cuda", torch.bfloat16
    fused = {"auto": None, "on": True, "off": False}[args.fused]
    cfg = RaaSConfig(budget=L, policy=args.policy, pin_prompt=False, block_size=args.block_size,
                     max_length=L * 2 if args.policy in ("quest", "dense") else None, fused=fused,
                     attention=args.attention)
    cache = PagedKVCache(cfg, batch_size=B, num_heads=hq, num_kv_heads=hkv, head_dim=D, dtype=dt, device=dev)
    n0 = L - 16 if cfg.bounded else L
    cache.prefill(torch.randn(B, hkv, n0, D, dtype=dt, device=dev), torch.randn(B, hkv, n0, D, dtype=dt, device=dev))
    if args.split_kv is not None:
        cache.kernel_options = {**(cache.kernel_options or {}), "SPLIT_KV": args.split_kv}
    if args.exact_lists:
        cache.static_lists = False
    step = cache.compiled_decode()
    q = torch.randn(B, hq, 1, D, dtype=dt, device=dev)
    k = torch.randn(B, hkv, 1, D, dtype=dt, device=dev)
    v = torch.randn(B, hkv, 1, D, dtype=dt, device=dev)
    for _ in range(5):
        step(q, k, v)
    torch.cuda.synchronize()
    if args.plain:  # (inside the NVTX range "prof": ncu --nvtx --nvtx-include "prof/" profiles only these)
        kd = torch.randn(B, hkv, L, D, dtype=dt, device=dev)
        vd = torch.randn(B, hkv, L, D, dtype=dt, device=dev)
        torch.cuda.synchronize()
        torch.cuda.nvtx.range_push("prof")
        for _ in range(args.steps):
            step(q, k, v)
        if args.sdpa:
            for _ in range(args.steps):
                torch.nn.functional.scaled_dot_product_attention(q, kd, vd, enable_gqa=True)
        torch.cuda.nvtx.range_pop()
        torch.cuda.synchronize()
        print(f"ran {args.steps} steps" + (" and SDPA calls" if args.sdpa else ""))
        return
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(args.steps):
            step(q, k, v)
        torch.cuda.synchronize()
    print(f"policy={args.policy} B={B} heads={hq}/{hkv} L={L} block={cache.block} fused={cache.fused}: "
          f"attention={args.attention} split_kv={args.split_kv}: per-step kernel times (us, {args.steps} steps)")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.rows, max_name_column_width=90))
    from decode_step import graph_time_us  # same folder

    print(f"whole step, CUDA-graph replay median: {graph_time_us(lambda: step(q, k, v)):.1f} us")


if __name__ == "__main__":
    main()
