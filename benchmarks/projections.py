"""The model's own matrix products at decode sizes, against the bytes of their weights.

A decode step of a patched model reads every weight once; at a small batch its matrix products are
the largest part of the step and of its floor (docs/performance.md, "Where the step goes"). This
times exactly those products for an --arch (random weights, every layer, bf16) at batches of
--batches tokens, one CUDA graph replaying all layers, in three forms:

    separate   the products as transformers runs them: q, k, v, o, gate, up, down (7 a layer)
    fused      q/k/v as one product and gate/up as one (4 a layer), the same bytes
    compiled   `fused` through torch.compile(mode="max-autotune-no-cudagraphs"), Inductor timing
               its Triton templates against cuBLAS (--autotune; slow to compile)

and reports each form's milliseconds for all layers, its floor (weight bytes / measured copy
bandwidth) and the ratio. Only the products: no norms, rotary, attention or activation.

    python benchmarks/projections.py --arch llama-3.1-8b --batches 1,8,32 --autotune
    python benchmarks/projections.py --smoke      # tiny CPU run used by the tests (no timing claims)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.decode_step import copy_bandwidth, graph_time_us  # noqa: E402
from benchmarks.hf_generate import ARCHS  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def layer_weights(hid: int, inter: int, heads: int, kv_heads: int, head_dim: int, device, dtype) -> dict:
    """One layer's projection weights, stored fused; the separate products read contiguous row
    blocks of them, which is the memory a model's separate Linear weights have."""
    q, kv = heads * head_dim, kv_heads * head_dim
    qkv = torch.randn(q + 2 * kv, hid, device=device, dtype=dtype)
    gate_up = torch.randn(2 * inter, hid, device=device, dtype=dtype)
    return dict(qkv=qkv, o=torch.randn(hid, q, device=device, dtype=dtype), gate_up=gate_up,
                down=torch.randn(hid, inter, device=device, dtype=dtype),
                parts=(qkv[:q], qkv[q:q + kv], qkv[q + kv:], gate_up[:inter], gate_up[inter:]))


def separate(x, a, m, layers):
    """Seven products a layer, as transformers runs them: q, k, v, o, gate, up, down. The outputs
    are returned so that a compiler cannot drop them."""
    out = []
    for w in layers:
        out += [F.linear(x, p) for p in w["parts"][:3]]
        out.append(F.linear(a, w["o"]))
        out += [F.linear(x, p) for p in w["parts"][3:]]
        out.append(F.linear(m, w["down"]))
    return out


def fused(x, a, m, layers):
    """Four products a layer: q/k/v in one, o, gate/up in one, down."""
    out = []
    for w in layers:
        out += [F.linear(x, w["qkv"]), F.linear(a, w["o"]), F.linear(x, w["gate_up"]), F.linear(m, w["down"])]
    return out


def time_ms(fn, device, reps: int) -> float:
    """Median milliseconds of one call: replayed from a CUDA graph on CUDA (decode_step's timer, one
    replay a sample), plain calls on CPU."""
    if device.type != "cuda":
        fn()
        times = []
        for _ in range(reps):
            t = time.perf_counter(); fn(); times.append((time.perf_counter() - t) * 1e3)
        return statistics.median(times)
    return graph_time_us(fn, chunks=reps, per_chunk=1) / 1e3


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="llama-3.1-8b", choices=sorted(ARCHS))
    ap.add_argument("--layers", type=int, default=None, help="fewer layers than the real model")
    ap.add_argument("--batches", default="1,8,32", help="tokens a step (comma separated)")
    ap.add_argument("--reps", type=int, default=30, help="timed replays per form and batch")
    ap.add_argument("--autotune", action="store_true", help="also time the fused products compiled with max-autotune")
    ap.add_argument("--smoke", action="store_true", help="tiny CPU run (no timing claims)")
    ap.add_argument("--tag", default=None)
    ap.add_argument("--out", default=str(RESULTS))
    return ap


def main(argv=None) -> dict:
    args = parser().parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]
    if any(b < 1 for b in batches):
        raise ValueError(f"--batches must be positive integers, got {args.batches!r}")
    if args.layers is not None and args.layers < 1:
        raise ValueError(f"--layers must be >= 1, got {args.layers}")
    if args.smoke:
        device, dtype, (hid, inter, n_layers, heads, kv_heads) = torch.device("cpu"), torch.float32, (64, 160, 2, 4, 2)
    else:
        if not torch.cuda.is_available():
            raise SystemExit("projections.py times CUDA graphs: run it on a GPU (or --smoke on CPU)")
        device, dtype = torch.device("cuda"), torch.bfloat16
        _, hid, inter, n_layers, heads, kv_heads, _ = ARCHS[args.arch]
    n_layers = args.layers or n_layers
    head_dim = hid // heads
    torch.manual_seed(0)
    layers = [layer_weights(hid, inter, heads, kv_heads, head_dim, device, dtype) for _ in range(n_layers)]
    weight_bytes = sum(w[k].numel() * w[k].element_size() for w in layers for k in ("qkv", "o", "gate_up", "down"))
    bandwidth = copy_bandwidth(device) if device.type == "cuda" else None
    floor_ms = weight_bytes / bandwidth * 1e3 if bandwidth else None
    forms = {"separate": separate, "fused": fused}
    if args.autotune:
        forms["compiled"] = torch.compile(fused, mode="max-autotune-no-cudagraphs", dynamic=False)
    rows = []
    for M in batches:
        x = torch.randn(M, hid, device=device, dtype=dtype)
        a = torch.randn(M, heads * head_dim, device=device, dtype=dtype)
        m = torch.randn(M, inter, device=device, dtype=dtype)
        for name, fn in forms.items():
            t0 = time.perf_counter()
            ms = time_ms(lambda: fn(x, a, m, layers), device, 2 if args.smoke else args.reps)
            rows.append(dict(batch=M, form=name, ms=ms, floor_ms=floor_ms,
                             over_floor=ms / floor_ms if floor_ms else None, wall_s=time.perf_counter() - t0))
            print(f"B={M} {name:>9}: {ms:.3f} ms" + (f" ({ms / floor_ms:.3f}x floor {floor_ms:.3f})" if floor_ms else ""),
                  flush=True)
    meta = dict(command="python benchmarks/projections.py " + " ".join(sys.argv[1:] if argv is None else argv),
                device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu", torch=torch.__version__,
                arch=args.arch, layers=n_layers, weight_gb=weight_bytes / 1e9,
                copy_bandwidth_TBps=bandwidth / 1e12 if bandwidth else None, smoke=args.smoke,
                time=time.strftime("%Y-%m-%d %H:%M:%S"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = "projections" + (f"_{args.tag}" if args.tag else "") + ("_smoke" if args.smoke else "")
    result = dict(meta=meta, rows=rows)
    (out / f"{name}.json").write_text(json.dumps(result, indent=1))
    lines = [f"# {name}", "", f"`{meta['command']}`: {meta['device']}, {meta['arch']}, {n_layers} layers, "
             f"{meta['weight_gb']:.2f} GB of projection weights", "",
             "| tokens | form | ms (all layers) | floor ms | over floor |", "|---|---|---|---|---|"]
    for r in rows:
        fl = f"{r['floor_ms']:.3f} | {r['over_floor']:.3f}x" if r["floor_ms"] else " | "
        lines.append(f"| {r['batch']} | {r['form']} | {r['ms']:.3f} | {fl} |")
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
    return result


if __name__ == "__main__":
    main()
