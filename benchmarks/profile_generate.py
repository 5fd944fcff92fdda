"""Where a patched ``model.generate`` decode step spends its GPU time, per configuration.

Builds a model of an --arch's shapes (random weights, --layers of them), patches it with each
configuration of --configs (named by user-facing options, as in decode_step.py), runs generate
once to compile and fill the cache, then profiles --steps decode steps of a second generate with
torch.profiler and prints the CUDA kernels by total time.

    python benchmarks/profile_generate.py --arch llama-3.1-8b --layers 4 --configs "raas;raas:backend=flex"
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import raas_flex  # noqa: E402
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
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        ap.error("needs CUDA")
    model = build(args.arch, args.layers, "cuda", torch.bfloat16)
    ids = torch.randint(100, 1000, (args.batch, args.prompt), device="cuda")
    fill = args.budget - args.prompt + 64  # past the budget: every new page evicts one
    for spec in [c for c in args.configs.split(";") if c]:
        name, options = parse_spec(spec)
        with raas_flex.patched(model, budget=args.budget, policy=name, **options):
            model.generate(ids, max_new_tokens=fill, min_new_tokens=fill, do_sample=False)  # compile, graphs
            torch.cuda.synchronize()
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                model.generate(ids, max_new_tokens=args.steps, min_new_tokens=args.steps, do_sample=False)
                torch.cuda.synchronize()
        print(f"\n== {spec}: {args.arch} x {args.layers} layers, B={args.batch}, L={args.budget}, "
              f"{args.steps} decode steps + the prompt")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.top, max_name_column_width=70))


if __name__ == "__main__":
    main()
