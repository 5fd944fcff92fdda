"""Time the fused bookkeeping kernel's variants on their own (CUDA-graph replay), one shape at a time.

For each shape (B, Hq/Hkv, budget L; head_dim 128, bf16, buffer full so every page evicts) it times

    append            the append kernel alone (what policies without a fused observe run)
    append+observe    the append kernel with the RaaS observe inside (what engine.decode runs),
                      for every combination of the module knobs of raas_flex.kernels:
                      BOUND_DOT (page bounds as matrix products or element-wise),
                      APPEND_OBSERVE_WARPS, APPEND_BOUND_ELEMS
    observe (split)   the observe as its own kernel, per OBSERVE_DOT

(results/h200/kernel_variants_h200.log also has two ways of ranking that were removed after it:
a sort of int64 keys, no faster, and a bitwise search, slower.)

and checks each variant's state change against the torch bookkeeping code from the same state
(stamps that differ are counted; they may differ only at exact top-k ties of rounding).

    python benchmarks/kernel_variants.py --shapes 8/32/8/2048,8/28/4/2048
    TRITON_INTERPRET=1 python benchmarks/kernel_variants.py --smoke   # CPU check used by the tests
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from raas_flex import PagedKVCache, RaaSConfig, kernels  # noqa: E402
from benchmarks.decode_step import graph_time_us  # noqa: E402

STATE = ("k", "v", "page_id", "stamp", "pinned", "score", "kmax", "kmin", "open_slot", "length", "step",
         "evictions", "overflow")
KNOBS = ("BOUND_DOT", "OBSERVE_DOT", "APPEND_OBSERVE_WARPS", "APPEND_BOUND_ELEMS")


def pair(B, Hq, Hkv, L, dtype, device, D=128):
    cfg = RaaSConfig(budget=L, page_size=16, pin_prompt=False)
    mk = lambda fused: PagedKVCache(cfg.replace(fused=fused), batch_size=B, num_heads=Hq, num_kv_heads=Hkv,
                                    head_dim=D, dtype=dtype, device=device)
    ref, fus = mk(False), mk(True)
    k = torch.randn(B, Hkv, L - 16, D, dtype=dtype, device=device)
    v = torch.randn_like(k)
    ref.prefill(k, v)
    return ref, fus


def stamp_mismatch(ref, fus, q, k, v) -> int:
    for n in STATE:
        getattr(fus, n).copy_(getattr(ref, n))
    fus._fused_append(k, v, q)
    ref.append(k, v)
    ref.policy.observe(ref, q, ref.valid_slots(q))
    if ref.k.is_cuda:
        torch.cuda.synchronize()
    assert torch.equal(ref.page_id, fus.page_id) and torch.equal(ref.k, fus.k), "append state differs"
    return int((ref.stamp != fus.stamp).sum())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="8/32/8/2048,8/28/4/2048,32/32/8/4096", help="B/Hq/Hkv/L list")
    ap.add_argument("--warps", default="4,8")
    ap.add_argument("--elems", default="4096,16384", help="APPEND_BOUND_ELEMS values")
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny CPU run through Triton's interpreter (TRITON_INTERPRET=1): checks only, no timing")
    args = ap.parse_args(argv)
    if args.smoke:
        if not kernels.INTERPRET:
            ap.error("--smoke runs the kernels through Triton's interpreter: set TRITON_INTERPRET=1")
        dev, dt = "cpu", torch.float32
        args.shapes, args.warps, args.elems = "2/6/2/64", "4", "4096"
    elif not torch.cuda.is_available():
        ap.error("needs CUDA (or --smoke with TRITON_INTERPRET=1 on CPU)")
    else:
        dev, dt = "cuda", torch.bfloat16
    timed = not args.smoke
    saved = {n: getattr(kernels, n) for n in KNOBS}
    rows = []
    for spec in args.shapes.split(","):
        B, Hq, Hkv, L = (int(x) for x in spec.split("/"))
        torch.manual_seed(0)
        D = 16 if args.smoke else 128
        ref, fus = pair(B, Hq, Hkv, L, dt, dev, D)
        q = torch.randn(B, Hq, 1, D, dtype=dt, device=dev)
        kn = torch.randn(B, Hkv, 1, D, dtype=dt, device=dev)
        vn = torch.randn_like(kn)
        base = dict(B=B, Hq=Hq, Hkv=Hkv, L=L)
        time_us = graph_time_us if timed else (lambda fn: (fn(), float("nan"))[1])  # smoke: run once, no timing
        rows.append(dict(base, kernel="append", us=time_us(lambda: fus._fused_append(kn, vn))))
        combos = itertools.product([True, False], [int(x) for x in args.warps.split(",")],
                                   [int(x) for x in args.elems.split(",")])
        for dot, warps, elems in combos:
            kernels.BOUND_DOT = dot
            kernels.APPEND_OBSERVE_WARPS, kernels.APPEND_BOUND_ELEMS = warps, elems
            r = dict(base, kernel="append+observe", dot=dot, warps=warps, elems=elems)
            try:
                r["stamp_mismatch"] = stamp_mismatch(ref, fus, q, kn, vn)
                r["us"] = time_us(lambda: fus._fused_append(kn, vn, q))
            except Exception as e:  # a variant that does not compile is a result, not a crash
                if args.smoke:
                    raise
                r["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:200]}"
            rows.append(r)
            print(json.dumps(r), flush=True)
        for dot in (True, False):
            kernels.OBSERVE_DOT = dot
            r = dict(base, kernel="observe (split)", dot=dot)
            try:
                r["us"] = time_us(lambda: kernels.fused_observe(
                    q, fus.page_id, fus.stamp, fus.score, fus.kmax, fus.kmin, fus.step, fus._imp, fus._obs_count,
                    fus.config.refresh_pages))
            except Exception as e:
                if args.smoke:
                    raise
                r["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:200]}"
            rows.append(r)
        for n, val in saved.items():
            setattr(kernels, n, val)
        del ref, fus
        torch.cuda.empty_cache()
    device_name = torch.cuda.get_device_name() if timed else "cpu (Triton interpreter, no timing)"
    print(f"\n{device_name}, torch {torch.__version__}; microseconds, CUDA-graph replay median\n")
    print("| B | heads | L | kernel | dot | warps | elems | us | stamp mismatches |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        us = f"{r['us']:.1f}" if "us" in r else r.get("error", "")
        print(f"| {r['B']} | {r['Hq']}/{r['Hkv']} | {r['L']} | {r['kernel']} | {r.get('dot', '')} "
              f"| {r.get('warps', '')} | {r.get('elems', '')} | {us} | {r.get('stamp_mismatch', '')} |")
    if args.out:
        Path(args.out).write_text(json.dumps(dict(device=device_name, torch=torch.__version__,
                                                  rows=rows), indent=1))
    return rows


if __name__ == "__main__":
    main()
