"""Where does a compiled decode step spend its GPU time? Kernel table from torch.profiler.

    python benchmarks/profile_step.py --config raas --batch 8 --heads 32/8 --budget 2048
    python benchmarks/profile_step.py --config "raas:backend=flex" --plain --sdpa   # under Nsight Compute
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from raas_flex import PagedKVCache  # noqa: E402
from raas_flex.config import make_config, parse_spec  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="raas", help="a configuration by its user-facing options, as in decode_step.py")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--heads", default="32/8")
    ap.add_argument("--budget", type=int, default=2048)
    ap.add_argument("--context", type=int, default=None,
                    help="tokens held by an unbounded policy (quest, dense) before the profiled steps "
                         "(default: the budget)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rows", type=int, default=25)
    ap.add_argument("--plain", action="store_true",
                    help="only run --steps steps after the warm-up, no torch.profiler or timing (for running "
                         "under Nsight Compute: ncu -k regex:_step_kernel ... python benchmarks/profile_step.py --plain)")
    ap.add_argument("--sdpa", action="store_true",
                    help="with --plain: then --steps calls of SDPA over a dense buffer of --budget tokens (the "
                         "decode-step benchmark's sdpa_L), for profiling side by side")
    args = ap.parse_args(argv)
    hq, hkv = map(int, args.heads.split("/"))
    B, D, L, dev, dt = args.batch, 128, args.budget, "cuda", torch.bfloat16
    N = L if args.context is None else args.context
    if N < L:
        raise ValueError(f"--context={N} must be at least --budget={L}")
    name, options = parse_spec(args.config)
    cfg = make_config(L, name, **{"pin_prompt": False, **options})
    cache = PagedKVCache(cfg, batch_size=B, num_heads=hq, num_kv_heads=hkv, head_dim=D, dtype=dt, device=dev,
                         max_length=None if cfg.policy.bounded else N + 64)
    n0 = L - 16 if cfg.policy.bounded else N
    cache.prefill(torch.randn(B, hkv, n0, D, dtype=dt, device=dev), torch.randn(B, hkv, n0, D, dtype=dt, device=dev))
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
    print(f"{args.config} B={B} heads={hq}/{hkv} L={L} N={N} block={cache.block} backend={cache.backend}: "
          f"per-step kernel times (us, {args.steps} steps)")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.rows, max_name_column_width=90))
    from decode_step import graph_time_us  # same folder

    print(f"whole step, CUDA-graph replay median: {graph_time_us(lambda: step(q, k, v)):.1f} us")


if __name__ == "__main__":
    main()
