"""Does the side-stream observe overlap the attention? Order of the ops in the compiled step's code,
and CUDA-graph times of the pieces alone and together (one layer, one process).

    python benchmarks/overlap_probe.py --batch 8 --heads 32/8 --budget 2048
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from raas_flex import PagedKVCache, RaaSConfig, kernels  # noqa: E402
from decode_step import graph_time_us  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--heads", default="32/8")
    ap.add_argument("--budget", type=int, default=2048)
    args = ap.parse_args(argv)
    hq, hkv = map(int, args.heads.split("/"))
    B, D, L, dt = args.batch, 128, args.budget, torch.bfloat16
    cache = PagedKVCache(RaaSConfig(budget=L, pin_prompt=False), batch_size=B, num_heads=hq, num_kv_heads=hkv,
                         head_dim=D, dtype=dt, device="cuda")
    cache.prefill(torch.randn(B, hkv, L - 16, D, dtype=dt, device="cuda"),
                  torch.randn(B, hkv, L - 16, D, dtype=dt, device="cuda"))
    cache.observe_stream = True
    q = torch.randn(B, hq, 1, D, dtype=dt, device="cuda")
    k = torch.randn(B, hkv, 1, D, dtype=dt, device="cuda")
    v = torch.randn(B, hkv, 1, D, dtype=dt, device="cuda")
    step = cache.compiled_decode()
    from torch._inductor.utils import run_and_get_code

    _, codes = run_and_get_code(step, q, k, v)
    code = "\n".join(codes)
    calls = [m.group(0) for m in re.finditer(r"(observe_fork|observe_join|fused_append\w*|_append_kernel|"
                                             r"triton_tem_\w+|triton_(poi|per|red)_\w+)\.run\(|"
                                             r"torch\.ops\.raas_flex\.\w+", code)]
    print("call order in the compiled step:", calls)
    for line in code.splitlines():
        if "raas_flex" in line or ".run(" in line:
            print("   ", line.strip()[:160])

    attend = torch.compile(cache.attend, fullgraph=True)
    obs = lambda: kernels.fused_observe(q, cache.page_id, cache.stamp, cache.score, cache.kmax, cache.kmin,
                                        cache.step, cache._imp, cache._obs_count, cache.config.refresh_pages)

    def fork_attend_join():
        kernels.observe_fork(q, cache.page_id, cache.stamp, cache.score, cache.kmax, cache.kmin, cache.step,
                             cache._imp, cache._obs_count, cache.config.refresh_pages)
        out = attend(q)
        kernels.observe_join(out, q, cache.stamp, cache.score, cache._imp, cache._obs_count)
        return out

    def serial():
        obs()
        return attend(q)

    for name, fn in [("attend alone", lambda: attend(q)), ("observe alone", obs), ("observe then attend", serial),
                     ("fork, attend, join (eager ops around compiled attend)", fork_attend_join),
                     ("compiled step (stream)", lambda: step(q, k, v))]:
        print(f"{name}: {graph_time_us(fn):.1f} us")


if __name__ == "__main__":
    main()
