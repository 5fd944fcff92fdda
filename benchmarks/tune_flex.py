"""Which flex decode kernel settings and block-list strategy suit a compacted KV buffer?

Times, by CUDA-graph replay in one run, the attention kernel alone over a full compacted buffer of
L slots (the open page partly written, so one block needs the mask) in the packed-GQA layout the
engine uses, against SDPA over the same L tokens:

    lists=exact     partial/full block lists computed outside the timed graph (kernel cost only)
    lists=in_graph  the lists computed inside the graph from the validity mask, as the engine did
    lists=static    every block listed as partial (constant lists): the kernel evaluates mask_mod
                    everywhere but nothing has to be computed per step

for kernel block sizes and flex decode kernel options (BLOCK_N, num_stages, num_warps, SPLIT_KV).

    python benchmarks/tune_flex.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, flex_attention

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.decode_step import copy_bandwidth, graph_time_us, tqdm  # noqa: E402
from raas_flex.masks import all_partial_lists, block_lists, generate_slot_validity_mask, materialize  # noqa: E402

POINTS = [(8, 32, 8, 2048), (32, 32, 8, 2048), (8, 28, 4, 2048), (1, 28, 4, 2048), (8, 32, 8, 4096)]
# (BLOCK_N, num_stages, num_warps); None = flex's default for the device
KERNELS = [None, (64, 3, 2), (64, 3, 4), (64, 2, 4), (128, 3, 4), (128, 2, 8), (32, 3, 2), (128, 1, 4)]


def make_lists(valid: torch.Tensor, block: int, how: str):
    if how == "static":
        return all_partial_lists(valid.shape[0], valid.shape[1], block, valid.device)
    return block_lists(valid, block)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    ap.add_argument("--quick", action="store_true", help="first point only, fewer kernels")
    args = ap.parse_args(argv)
    dev, dt, D = "cuda", torch.bfloat16, 128
    torch._dynamo.config.cache_size_limit = 4096
    if hasattr(torch._dynamo.config, "recompile_limit"):
        torch._dynamo.config.recompile_limit = 4096
    bw = copy_bandwidth(dev)
    rows = []
    points = POINTS[:1] if args.quick else POINTS
    kernels = KERNELS[:3] if args.quick else KERNELS
    jobs = []
    for i, (B, Hq, Hkv, L) in enumerate(points):
        wide = i < 2  # the full sweep on the two main shapes, a few configs elsewhere
        for kern in (kernels if wide else kernels[:2] + kernels[4:5]):
            for split in ((None, "x2") if wide else (None,)):
                jobs.append((B, Hq, Hkv, L, 128, "exact", kern, split))
        for kern in (kernels[:2] + kernels[4:6] if wide else kernels[:1]):
            jobs.append((B, Hq, Hkv, L, 256, "exact", kern, None))
        for lists in ("static", "in_graph"):
            for kern in (kernels[:1] + kernels[2:3] if wide else kernels[:1]):
                jobs.append((B, Hq, Hkv, L, 128, lists, kern, None))
    ref = {}
    for job in tqdm(jobs, desc="flex configs"):
        B, Hq, Hkv, L, block, lists, kern, split = job
        G, bh = Hq // Hkv, B * Hkv
        torch.manual_seed(0)
        q = torch.randn(bh, 1, G, D, dtype=dt, device=dev)
        k = torch.randn(bh, 1, L, D, dtype=dt, device=dev)
        v = torch.randn(bh, 1, L, D, dtype=dt, device=dev)
        valid = torch.ones(bh, L, dtype=torch.bool, device=dev)
        valid[:, L - 16 + 5:] = False  # open page holds 5 of 16 tokens
        opts = {}
        if kern is not None:
            opts.update(BLOCK_N=kern[0], num_stages=kern[1], num_warps=kern[2])
        if split == "x2":
            sms = torch.cuda.get_device_properties(dev).multi_processor_count
            opts["SPLIT_KV"] = max(sms // bh * 2, 1) * 2
        pre = make_lists(valid, block, "static" if lists == "static" else "exact")

        def fn(q, k, v, valid, *lst):
            if lists == "in_graph":
                val = materialize(valid)
                lst = tuple(materialize(t) for t in block_lists(val, block))
            bm = BlockMask.from_kv_blocks(*lst, BLOCK_SIZE=(128, block), mask_mod=generate_slot_validity_mask(valid),
                                          seq_lengths=(G, L), compute_q_blocks=False)
            return flex_attention(q, k, v, block_mask=bm, kernel_options=opts or None)

        step = torch.compile(fn, fullgraph=True, dynamic=False)
        row = dict(B=B, Hq=Hq, Hkv=Hkv, L=L, block=block, lists=lists, kernel=kern, split=opts.get("SPLIT_KV"))
        try:
            out = step(q, k, v, valid, *pre)
            refo = F.scaled_dot_product_attention(
                q.double(), k.double(), v.double(), attn_mask=valid[:, None, None, :])
            row["err"] = ((out.double() - refo).norm() / refo.norm()).item()
            row["us"] = graph_time_us(lambda: step(q, k, v, valid, *pre))
        except Exception as e:  # a config the kernel rejects is a result, not a crash of the sweep
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        key = (B, Hq, Hkv, L)
        if key not in ref:
            qs = q.view(B, Hkv * G, 1, D)
            ks, vs = k.view(B, Hkv, L, D), v.view(B, Hkv, L, D)
            ref[key] = dict(
                sdpa_L=graph_time_us(lambda: F.scaled_dot_product_attention(qs, ks, vs, enable_gqa=True)),
                floor_L=2 * B * Hkv * L * D * 2 / bw * 1e6)
        row.update(ref[key])
        rows.append(row)
        tqdm.write(json.dumps({a: (round(b, 2) if isinstance(b, float) else b) for a, b in row.items()}))
        torch._dynamo.reset()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = dict(command="python benchmarks/tune_flex.py" + (" --quick" if args.quick else ""),
                torch=torch.__version__, device=torch.cuda.get_device_name(), copy_bandwidth_TBps=bw / 1e12,
                time=time.strftime("%Y-%m-%d %H:%M:%S"))
    (out / "tune_flex.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    lines = ["| B | Hq/Hkv | L | block | lists | BLOCK_N,stages,warps | SPLIT_KV | flex us | sdpa_L us | floor us | flex/sdpa |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        us = r.get("us")
        lines.append(f"| {r['B']} | {r['Hq']}/{r['Hkv']} | {r['L']} | {r['block']} | {r['lists']} | "
                     f"{r['kernel'] or 'default'} | {r['split'] or 'default'} | "
                     f"{'%.1f' % us if us else r.get('error', '-')} | {r['sdpa_L']:.1f} | {r['floor_L']:.1f} | "
                     f"{'%.2f' % (us / r['sdpa_L']) if us else '-'} |")
    (out / "tune_flex.md").write_text(f"Flex decode kernel options, {meta}\n\n" + "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
