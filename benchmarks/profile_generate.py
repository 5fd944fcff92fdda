"""Where a patched ``model.generate`` decode step spends its GPU time, per configuration.

Builds a model of an --arch's shapes (random weights, --layers of them), patches it with each
configuration of --configs (named by user-facing options, as in decode_step.py), runs generate
once to compile and fill the cache, then profiles --steps decode steps of a second generate with
torch.profiler and prints the CUDA kernels by total time.

With --per-step, it instead separates one decode step's GPU time from its wall time: two generate
calls of S and S + --steps new tokens from the same prompt are timed (wall, no profiler) and
profiled (kernel time); the differences divided by --steps are the wall time and the GPU kernel
time of one decode step, the prompt's forward cancelling out. Wall minus kernel time is the host's
share (gaps between kernels and graph replays, generate's own loop); the kernels that differ are
printed per decode step, and grouped against their memory floors at the measured copy bandwidth:
the matrix products (cuBLAS and GEMM kernels) against the bytes of the weights they read (all but
an untied input embedding), the cache's own kernels (the engine's step, flex attention) against
every byte the cache state holds, and the rest (Inductor's pointwise and reduction kernels, the
eager kernels between graph replays).

With --host, it instead shows where that host share goes: a generate of --steps decode steps at a
full buffer under cProfile (Python functions by own time and by cumulative time; the time spent
blocked on the GPU shows as the synchronising call's own time).

    python benchmarks/profile_generate.py --arch llama-3.1-8b --layers 4 --configs "raas;raas:backend=flex"
    python benchmarks/profile_generate.py --arch llama-3.1-8b --layers 32 --configs raas --per-step --steps 64
    python benchmarks/profile_generate.py --arch llama-3.1-8b --layers 32 --configs raas --host --steps 64
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import raas_flex  # noqa: E402
from benchmarks.decode_step import copy_bandwidth  # noqa: E402
from benchmarks.hf_generate import ARCHS, build  # noqa: E402
from raas_flex.config import parse_spec  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="llama-3.1-8b", choices=sorted(ARCHS))
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--budget", type=int, default=2048)
    ap.add_argument("--prompt", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=20, help="decode steps profiled")
    ap.add_argument("--configs", default="raas;raas:backend=flex")
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--per-step", action="store_true", help="one decode step's wall vs GPU kernel time (see above)")
    ap.add_argument("--host", action="store_true", help="where generate's host time goes, under cProfile (see above)")
    ap.add_argument("--fuse-projections", action="store_true",
                    help="profile the model with raas_flex.fuse_projections (q/k/v and gate/up one product each)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        ap.error("needs CUDA")
    model = build(args.arch, args.layers, "cuda", torch.bfloat16)
    if args.fuse_projections:
        raas_flex.fuse_projections(model)
    print(f"projections: {'fused (raas_flex.fuse_projections)' if args.fuse_projections else 'as built (separate)'}")
    ids = torch.randint(100, 1000, (args.batch, args.prompt), device="cuda")
    fill = args.budget - args.prompt + 64  # past the budget: every new page evicts one
    for spec in [c for c in args.configs.split(";") if c]:
        name, options = parse_spec(spec)
        with raas_flex.patched(model, budget=args.budget, policy=name, **options):
            model.generate(ids, max_new_tokens=fill, min_new_tokens=fill, do_sample=False)  # compile, graphs
            torch.cuda.synchronize()
            if args.per_step:
                per_step(model, ids, fill, args.steps, spec, args)
                continue
            if args.host:
                host_profile(model, ids, fill, args.steps, spec, args)
                continue
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                model.generate(ids, max_new_tokens=args.steps, min_new_tokens=args.steps, do_sample=False)
                torch.cuda.synchronize()
        print(f"\n== {spec}: {args.arch} x {args.layers} layers, B={args.batch}, L={args.budget}, "
              f"{args.steps} decode steps + the prompt")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.top, max_name_column_width=70))


def kernel_times(model, ids, n):
    """Wall seconds of generate(n new tokens) without the profiler, and its CUDA kernels' total
    microseconds by name with it."""
    run = lambda: model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    run()
    torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        run()
        torch.cuda.synchronize()
    kernels = Counter()
    for e in prof.key_averages():
        kernels[e.key] += e.self_device_time_total
    return wall, kernels


def per_step(model, ids, fill, steps, spec, args):
    """One decode step's wall and GPU time, from the difference of two generate calls (each length
    run once untimed first, so that neither timing holds a warm-up)."""
    n = fill + steps
    model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
    w0, k0 = kernel_times(model, ids, fill)
    w1, k1 = kernel_times(model, ids, fill + steps)
    diff = {name: (k1[name] - k0[name]) / steps for name in set(k0) | set(k1)}
    wall_ms, gpu_ms = (w1 - w0) / steps * 1e3, sum(diff.values()) / 1e3
    print(f"\n== {spec}: {args.arch} x {args.layers} layers, B={args.batch}, L={args.budget}, decode steps "
          f"{fill}..{fill + steps}: wall {wall_ms:.2f} ms/step, GPU kernels {gpu_ms:.2f} ms/step, "
          f"host share {wall_ms - gpu_ms:.2f} ms ({(wall_ms - gpu_ms) / wall_ms:.0%})")
    for name, us in sorted(diff.items(), key=lambda kv: -kv[1])[: args.top]:
        print(f"  {us / 1e3:8.3f} ms/step  {name[:100]}")
    bandwidth = copy_bandwidth("cuda")
    table = None if tied(model) else model.get_input_embeddings().weight  # a step reads B of its rows
    weights = sum(p.numel() * p.element_size() for p in model.parameters() if p is not table)
    floors = {"matmuls": weights, "cache step": raas_flex.stats(model)["state_bytes"], "rest": 0}
    groups = Counter()
    for name, us in diff.items():
        groups[kernel_group(name)] += us / 1e3
    print(f"  by group, against (bytes / {bandwidth / 1e12:.2f} TB/s copy bandwidth):")
    for group, nbytes in floors.items():
        floor = nbytes / bandwidth * 1e3
        against = f"floor {floor:.3f} ms: {nbytes / 1e9:.2f} GB, {groups[group] / floor:.2f}x" if nbytes else "no floor"
        print(f"  {groups[group]:8.3f} ms/step  {group} ({against})")


def tied(model) -> bool:
    return model.get_output_embeddings().weight is model.get_input_embeddings().weight


def kernel_group(name: str) -> str:
    """A CUDA kernel's group in the per-step breakdown: 'matmuls' (cuBLAS's and Inductor's GEMM
    kernels, split-K reductions), 'cache step' (the engine's Triton kernels, flex attention) or 'rest'."""
    low = name.lower()
    if any(tag in low for tag in ("nvjet", "gemm", "cublas", "splitk", "cutlass", "triton_tem_fused_mm", "_mm_")):
        return "matmuls"
    if any(tag in low for tag in ("_step_kernel", "_append", "flex_attention", "flex_decoding", "triton_tem_fused_flex")):
        return "cache step"
    return "rest"


def host_profile(model, ids, fill, steps, spec, args):
    """cProfile of a generate whose last --steps decode steps run at a full buffer."""
    import cProfile
    import io
    import pstats

    n = fill + steps
    run = lambda: model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
    run()  # this length once untimed
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    run()
    torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    prof = cProfile.Profile()
    prof.enable()
    run()
    torch.cuda.synchronize()
    prof.disable()
    print(f"\n== {spec}: {args.arch} x {args.layers} layers, B={args.batch}, L={args.budget}, generate of {n} "
          f"new tokens: {wall * 1e3 / n:.2f} ms/token without the profiler")
    for key in ("tottime", "cumulative"):
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats(key).print_stats(args.top * 3)
        print(out.getvalue())


if __name__ == "__main__":
    main()
