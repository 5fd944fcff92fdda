"""One attention layer, one decode token: the engine's whole step per configuration vs SDPA baselines.

For each grid point (batch B, heads Hq/Hkv, head dim 128, context N, budget L) it times, by
CUDA-graph replay of ``PagedKVCache.compiled_decode()`` (the step ``model.generate`` runs per layer;
median over chunks of replays, CUDA events):

    <config>       the engine step of a configuration named by its user-facing options, e.g.
                   ``raas`` (the shipped default), ``raas:backend=flex``,
                   ``raas:importance=attention,refresh=threshold``, ``h2o``, ``streaming``, ``quest``,
                   ``dense``; bounded policies over an L-slot compacted buffer (O(L) memory), quest and
                   dense over N tokens (dense's ratio column is to sdpa_dense_N)
    sdpa_dense_N   F.scaled_dot_product_attention over N cached tokens (today's dense decode)
    sdpa_L         SDPA over a dense L-token buffer: the ideal for a compacted cache
    floor_L        bytes of K and V in L slots / measured copy bandwidth
    floor_quest    quest's floor: its page bounds over all N (key max and min per page) plus the K and V
                   of the L tokens it attends, / measured copy bandwidth

``--layer`` gives every cache the model's own attention semantics (``AttentionSpec``: a sliding
window, a logit softcap, learned sinks, as gpt-oss or Gemma 2 layers have them; sink logits drawn
from a normal), ``--head-dim`` the head size (default 128); SDPA rows stay plain attention.

Every engine output is checked against a float64 reference over the attended tokens (with the
layer's softcap and sinks) before it is timed, and the graphs compiled after warm-up are counted.
Results: JSON (keys: the configuration names beside ``sdpa_L``), a markdown table and a plot under
--out (default benchmarks/results/).

    python benchmarks/decode_step.py                 # full grid (GPU)
    python benchmarks/decode_step.py --quick         # two small points
    python benchmarks/decode_step.py --quick --cold-l2   # also each call after L2 is evicted (a second table;
                                                     # meta's l2_check: a quarter of L2 summed warm and cold)
    python benchmarks/decode_step.py --smoke         # tiny CPU run used by the tests (no timing claims)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch._dynamo
import torch._inductor.config
import torch.nn.functional as F

try:
    from tqdm import tqdm
except ImportError:  # pragma: no cover - tqdm is a dependency of raas_flex
    def tqdm(x, **_):
        return x

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from raas_flex import AttentionSpec, PagedKVCache  # noqa: E402
from raas_flex.config import make_config, parse_options, parse_spec  # noqa: E402

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


def graph_time_us(fn, chunks: int = 10, per_chunk: int = 20, evict: torch.Tensor | None = None) -> float:
    """Median microseconds per call of fn replayed from a CUDA graph (fn may mutate state).

    With ``evict`` (a buffer several times the L2 cache), every call follows a read of that buffer,
    so fn finds nothing of its own in L2, as each layer's step does inside a model's forward (the
    other layers' weights pass through L2 between two steps of one layer): the time is that of a
    graph of COLD_PAIRS (read, fn) pairs less that of a graph of the reads alone, each replayed
    COLD_REPLAYS times a chunk (``per_chunk`` is the warm replays'). fn then runs COLD_CALLS times (a
    cache that keeps every token needs that many free slots)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)

    def replay_us(body, calls: int, per_chunk: int) -> float:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(calls):
                body()
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
            times.append(a.elapsed_time(b) * 1e3 / (per_chunk * calls))
        return statistics.median(times)

    if evict is None:
        return replay_us(fn, 1, per_chunk)

    def read_then_fn():
        evict.sum()
        fn()

    return replay_us(read_then_fn, COLD_PAIRS, COLD_REPLAYS) - replay_us(evict.sum, COLD_PAIRS, COLD_REPLAYS)


COLD_PAIRS, COLD_REPLAYS = 8, 5  # graph_time_us(..., evict=...): (read, fn) pairs a graph, replays a chunk
COLD_CALLS = 3 + (5 + 10 * COLD_REPLAYS) * COLD_PAIRS  # its calls of fn: warm-up, then 5 + 10 chunks of replays


def l2_evict_buffer(device) -> torch.Tensor:
    """A buffer of four times the GPU's L2 cache, for ``graph_time_us(..., evict=...)``."""
    return torch.ones(torch.cuda.get_device_properties(device).L2_cache_size, dtype=torch.float32, device=device)


def reference(cache: PagedKVCache, q: torch.Tensor, rows: int = 2) -> torch.Tensor:
    """float64 attention of q over the slots the last step attended (cache.valid), with the layer's
    softcap and sinks, for the first ``rows`` sequences (a float64 copy of a whole 128k-token cache
    would not fit next to it)."""
    G, b, spec = cache.G, min(rows, cache.B), cache.spec
    valid = cache.valid.view(cache.B, cache.H, cache.S)[:b].repeat_interleave(G, 1)[:, :, None, :]
    k = cache.k[:b].double().repeat_interleave(G, 1)
    v = cache.v[:b].double().repeat_interleave(G, 1)
    if spec.plain:
        return F.scaled_dot_product_attention(q[:b].double(), k, v, attn_mask=valid, scale=cache.scale)
    logits = q[:b].double() @ k.transpose(-1, -2) * cache.scale  # [b, Hq, 1, S]
    if spec.softcap is not None:
        logits = torch.tanh(logits / spec.softcap) * spec.softcap
    logits = logits.masked_fill(~valid, float("-inf"))
    if spec.sinks:
        sink = cache.sink_logits.double().reshape(1, cache.Hq, 1, 1).expand(b, -1, -1, -1)
        return torch.softmax(torch.cat([logits, sink], -1), -1)[..., :-1] @ v
    return torch.softmax(logits, -1) @ v


def make_cache(spec, B, Hq, Hkv, D, N, L, dtype, device, extra_steps, layer=AttentionSpec()):
    """The engine of configuration ``spec`` (layer semantics ``layer``) with its buffer full: a bounded
    policy holds L - 16 tokens (nothing pinned, so every new page evicts one), quest and dense hold N."""
    name, options = parse_spec(spec)
    ps = 16
    cfg = make_config(L, name, **{"page_size": ps, "pin_prompt": False, **options})
    bounded = cfg.policy.bounded
    cache = PagedKVCache(cfg, batch_size=B, num_heads=Hq, num_kv_heads=Hkv, head_dim=D, dtype=dtype,
                         device=device, max_length=None if bounded else N + extra_steps, spec=layer)
    if layer.sinks:
        cache.set_sinks(torch.randn(Hq, device=device))
    n0 = L - ps if bounded else N
    cache.prefill(torch.randn(B, Hkv, n0, D, dtype=dtype, device=device),
                  torch.randn(B, Hkv, n0, D, dtype=dtype, device=device))
    return cache


def time_config(spec, B, Hq, Hkv, D, N, L, dtype, device, timed, row, extra=400, layer=AttentionSpec(), evict=None):
    q = torch.randn(B, Hq, 1, D, dtype=dtype, device=device)
    kn = torch.randn(B, Hkv, 1, D, dtype=dtype, device=device)
    vn = torch.randn(B, Hkv, 1, D, dtype=dtype, device=device)
    cache = make_cache(spec, B, Hq, Hkv, D, N, L, dtype, device, extra, layer)
    step = cache.compiled_decode()
    from torch._dynamo.utils import counters

    errs, graphs = [], None
    for i in range(3):  # the compiled step against float64, on fresh inputs, over a few steps
        qq = torch.randn_like(q)
        out = step(qq, torch.randn_like(kn), torch.randn_like(vn))
        if i == 0:  # warm-up done: from here on a new graph would be a recompile
            graphs = counters["stats"]["unique_graphs"]
        ref = reference(cache, qq)
        errs.append(((out[: ref.shape[0]].double() - ref).norm() / ref.norm()).item())
    row[f"{spec}_err"] = max(errs)
    row[f"{spec}_backend"] = cache.backend
    if timed:
        row[spec] = graph_time_us(lambda: step(q, kn, vn))
        if evict is not None:
            row[f"{spec}_cold"] = graph_time_us(lambda: step(q, kn, vn), evict=evict)
    row[f"{spec}_graphs_after_warmup"] = counters["stats"]["unique_graphs"] - graphs
    row[f"{spec}_kv_bytes"] = cache.kv_bytes
    cache.check()
    del step, cache
    torch._dynamo.reset()  # compiled code holds the cache's buffers; free them before the next point
    if device != "cpu":
        torch.cuda.empty_cache()


def run_point(B, Hq, Hkv, D, N, L, policies, dtype, device, timed, bw, max_bytes, cached,
              baseline_budgets=(), layer=AttentionSpec(), evict=None):
    """One grid point. The bounded policies (raas, h2o, streaming) hold L slots whatever N is, so
    their step is measured once per (B, heads, L) and reused across N (``cached``); quest and
    SDPA over N are measured at every N."""
    row = dict(B=B, Hq=Hq, Hkv=Hkv, D=D, N=N, L=L)
    extra = 400 if evict is None else 400 + COLD_CALLS  # free slots of quest and dense for the timed steps
    q = torch.randn(B, Hq, 1, D, dtype=dtype, device=device)
    for policy in policies:
        bounded = parse_spec(policy)[0] not in ("quest", "dense")
        if not policy.startswith("raas") and baseline_budgets and L not in baseline_budgets:
            row[policy] = None  # baselines only at the budgets asked for (keeps the full grid short)
            continue
        kv_tokens = L if bounded else N + extra
        if 2 * B * Hkv * kv_tokens * D * dtype.itemsize > max_bytes:
            row[policy] = None
            continue
        key = (policy, B, Hq, Hkv, L)
        if bounded and key in cached:
            row.update(cached[key])
            continue
        part = {}
        try:
            time_config(policy, B, Hq, Hkv, D, N, L, dtype, device, timed, part, extra, layer, evict)
        except Exception as e:  # a failing point is a result to report, not a reason to lose the grid
            if not timed:
                raise
            part[policy] = None
            part[f"{policy}_error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:300]}"
            tqdm.write(f"{policy} at B={B} {Hq}/{Hkv} N={N} L={L} failed: {part[f'{policy}_error']}")
            torch._dynamo.reset()
            torch.cuda.empty_cache()
        row.update(part)
        if bounded:
            cached[key] = part
    if timed:
        if 2 * B * Hkv * N * D * dtype.itemsize <= max_bytes:
            k = torch.randn(B, Hkv, N, D, dtype=dtype, device=device)
            v = torch.randn_like(k)
            sdpa = lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)  # noqa: E731
            row["sdpa_dense_N"] = graph_time_us(sdpa)
            if evict is not None:
                row["sdpa_dense_N_cold"] = graph_time_us(sdpa, evict=evict)
            row["floor_N"] = 2 * B * Hkv * N * D * dtype.itemsize / bw * 1e6
            if any(parse_spec(p)[0] == "quest" for p in policies):
                pages = -(-(N + extra) // 16)  # quest's buffer: N + extra slots in pages of 16
                row["floor_quest"] = quest_read_bytes(B, Hkv, pages, L, D, dtype.itemsize) / bw * 1e6
            del k, v
        key = ("sdpa_L", B, Hq, Hkv, L)
        if key not in cached:
            k = torch.randn(B, Hkv, L, D, dtype=dtype, device=device)
            v = torch.randn_like(k)
            sdpa = lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)  # noqa: E731
            cached[key] = dict(sdpa_L=graph_time_us(sdpa), floor_L=2 * B * Hkv * L * D * dtype.itemsize / bw * 1e6)
            if evict is not None:
                cached[key]["sdpa_L_cold"] = graph_time_us(sdpa, evict=evict)
        row.update(cached[key])
    return row


def with_times(rows, suffix: str) -> list[dict]:
    """The rows with the times of keys ending in ``suffix`` ("_cold": L2 evicted before each call) in
    place of the plain ones."""
    return [{**r, **{k[: -len(suffix)]: v for k, v in r.items() if suffix and k.endswith(suffix)}} for r in rows]


def markdown(rows, policies, suffix: str = "") -> str:
    """The grid as a table; ``suffix="_cold"``: the times taken with L2 evicted before each call."""
    rows = with_times(rows, suffix)
    cols = ["B", "Hq/Hkv", "N", "L", "floor_L", "sdpa_L", *policies, "sdpa_dense_N", "raas/sdpa_L", "sdpa_N/raas"]
    variants = [p for p in policies if p != "raas"]
    cols += [f"{p}/sdpa_L" for p in variants]
    quests = [p for p in policies if parse_spec(p)[0] == "quest"]
    denses = [p for p in policies if parse_spec(p)[0] == "dense"]
    if quests:
        cols += ["floor_quest", *[f"{p}/floor_quest" for p in quests]]
    cols += [f"{p}/sdpa_dense_N" for p in denses]
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    f = lambda x: "-" if x is None else (f"{x:.1f}" if isinstance(x, float) else str(x))
    for r in rows:
        raas = r.get("raas")
        vals = [r["B"], f"{r['Hq']}/{r['Hkv']}", r["N"], r["L"], r.get("floor_L"), r.get("sdpa_L"),
                *[r.get(p) for p in policies], r.get("sdpa_dense_N"),
                (raas / r["sdpa_L"]) if raas and r.get("sdpa_L") else None,
                (r["sdpa_dense_N"] / raas) if raas and r.get("sdpa_dense_N") else None]
        vals += [(r[p] / r["sdpa_L"]) if r.get(p) and r.get("sdpa_L") else None for p in variants]
        if quests:
            vals += [r.get("floor_quest"), *[(r[p] / r["floor_quest"]) if r.get(p) and r.get("floor_quest") else None
                                             for p in quests]]
        vals += [(r[p] / r["sdpa_dense_N"]) if r.get(p) and r.get("sdpa_dense_N") else None for p in denses]
        out.append("| " + " | ".join(f(v) for v in vals) + " |")
    return "\n".join(out)


def quest_read_bytes(B: int, Hkv: int, pages: int, L: int, D: int, itemsize: int) -> int:
    """Bytes one layer's quest step must read: the key max and min of every page (its bounds) and the
    K and V of the L tokens it attends."""
    return 2 * B * Hkv * (pages + L) * D * itemsize


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="two small grid points")
    ap.add_argument("--smoke", action="store_true", help="tiny CPU-sized run, checks only (no timing)")
    ap.add_argument("--configs", default="raas;h2o;streaming;quest",
                    help="semicolon-separated configurations by their user-facing options: POLICY or "
                         "POLICY:KEY=VALUE,..., e.g. 'raas;raas:backend=flex;raas:importance=attention,refresh=threshold;h2o'")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    ap.add_argument("--max-gb", type=float, default=30.0, help="skip points whose KV exceeds this")
    ap.add_argument("--baseline-budgets", default="2048",
                    help="budgets at which h2o/streaming/quest are measured (raas: every budget); 'all' for every one")
    ap.add_argument("--shapes", default=None, help="B/Hq/Hkv list, e.g. 8/32/8,32/28/4 (default: the full grid)")
    ap.add_argument("--contexts", default=None, help="contexts N, e.g. 8192,32768 (default: 8k, 32k, 128k)")
    ap.add_argument("--budgets", default=None, help="budgets L, e.g. 1024,2048 (default: 1k, 2k, 4k)")
    ap.add_argument("--tag", default=None, help="results file tag (default: full / quick / smoke)")
    ap.add_argument("--layer", default="", help="the layers' attention (AttentionSpec) as KEY=VALUE,..., e.g. "
                                                 "'window=128,sinks=True' (gpt-oss) or 'softcap=50.0' (default: plain)")
    ap.add_argument("--head-dim", type=int, default=128, help="head dimension of every grid point")
    ap.add_argument("--cold-l2", action="store_true",
                    help="also time every step with L2 evicted before each call (keys <name>_cold): a layer's "
                         "step inside a model's forward finds none of its KV in L2")
    ap.add_argument("--replot", metavar="JSON", help="redraw the table and plot from a results JSON and exit")
    return ap


def results_json(args: argparse.Namespace) -> Path:
    """The results JSON a run with these arguments writes (its table and plot beside it)."""
    tag = args.tag or ("smoke" if args.smoke else ("quick" if args.quick else "full"))
    return Path(args.out) / f"decode_step_{tag}.json"


def main(argv=None):
    ap = parser()
    args = ap.parse_args(argv)
    if args.replot:
        data = json.loads(Path(args.replot).read_text())
        pols = data["meta"].get("configs") or [p for p in ("raas", "h2o", "streaming", "quest")
                                                 if any(p in r for r in data["rows"])]  # (files from before configs)
        src = Path(args.replot)
        print(markdown(data["rows"], pols))
        print("wrote", plot(data["rows"], data["meta"], src.with_suffix(".png")))
        if data["meta"].get("cold_l2"):
            print(markdown(data["rows"], pols, "_cold"))
            print("wrote", plot(with_times(data["rows"], "_cold"), dict(data["meta"], l2="cold"),
                                src.with_name(src.stem + "_cold.png")))
        return data["rows"]
    baseline_budgets = () if args.baseline_budgets == "all" else tuple(int(x) for x in args.baseline_budgets.split(","))
    policies = [c for c in args.configs.split(";") if c]
    for spec in policies:
        parse_spec(spec)  # a bad name fails here, not after the first grid point
    layer = AttentionSpec(**parse_options([item for item in args.layer.split(",") if item]))
    torch.manual_seed(0)
    if args.smoke:
        if args.cold_l2:
            ap.error("--cold-l2 times on a GPU; --smoke does not time")
        device, dtype, timed = "cpu", torch.float32, False
        points = [(2, 6, 2, 16, 256, 64)]
        baseline_budgets = ()  # every policy at the smoke point
    else:
        if not torch.cuda.is_available():
            ap.error("needs CUDA (use --smoke on CPU)")
        device, dtype, timed = "cuda", getattr(torch, args.dtype), True
        ints = lambda text: [int(x) for x in text.split(",") if x]
        grid = [(1, 28, 4), (8, 32, 8)] if args.quick else FULL_GRID
        if args.shapes:
            grid = [tuple(int(x) for x in sh.split("/")) for sh in args.shapes.split(",")]
            if any(len(g) != 3 for g in grid):
                ap.error(f"--shapes must be B/Hq/Hkv items, got {args.shapes!r}")
        ctxs = ints(args.contexts) if args.contexts else ([8192, 32768] if args.quick else CONTEXTS)
        buds = ints(args.budgets) if args.budgets else ([2048] if args.quick else BUDGETS)
        points = [(B, Hq, Hkv, args.head_dim, N, L) for (B, Hq, Hkv) in grid for N in ctxs for L in buds]
    torch._dynamo.config.cache_size_limit = 4096
    if hasattr(torch._dynamo.config, "recompile_limit"):
        torch._dynamo.config.recompile_limit = 4096
    bw = copy_bandwidth(device) if timed else float("nan")
    evict = l2_evict_buffer(device) if timed and args.cold_l2 else None
    l2_check = None
    if evict is not None:  # that the read evicts: a buffer of a quarter of L2 summed warm (from L2) and cold
        small = evict[: evict.numel() // 16]
        l2_check = dict(mb=small.numel() * 4 / 1e6, warm_us=graph_time_us(small.sum),
                        cold_us=graph_time_us(small.sum, evict=evict))
    meta = dict(
        command="python " + " ".join([os.path.relpath(__file__)] + (argv if argv is not None else sys.argv[1:])),
        torch=torch.__version__, device=torch.cuda.get_device_name() if timed else platform.processor() or "cpu",
        dtype=str(dtype), copy_bandwidth_TBps=bw / 1e12, time=time.strftime("%Y-%m-%d %H:%M:%S"), configs=policies,
        layer=dataclasses.asdict(layer), cold_l2=evict is not None, l2_check=l2_check,
    )
    path = results_json(args)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial.json")
    rows, cached = [], {}
    for p in tqdm(points, desc="decode-step grid"):
        row = run_point(*p, policies, dtype, device, timed, bw, args.max_gb * 2**30, cached, baseline_budgets, layer,
                        evict)
        rows.append(row)
        tqdm.write(json.dumps({k: (round(v, 2) if isinstance(v, float) else v) for k, v in row.items()}))
        partial.write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))  # survives a crash or timeout
        if timed:
            torch.cuda.empty_cache()
    partial.unlink()
    path.write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    table = markdown(rows, policies)
    recompiles = sum(v for r in rows for k, v in r.items() if k.endswith("_graphs_after_warmup"))
    table += f"\n\nGraphs compiled after each step's warm-up (checks and timed replays, all points): {recompiles}"
    if evict is not None:
        table += "\n\nL2 evicted before each call (the step as a model's forward runs it):\n\n" + markdown(
            rows, policies, "_cold")
    path.with_suffix(".md").write_text(
        f"Decode step, one layer, microseconds (CUDA-graph replay median). {meta}\n\n{table}\n")
    print(table)
    if timed:
        try:
            print("wrote", plot(rows, meta, path.with_suffix(".png")))
            if evict is not None:
                print("wrote", plot(with_times(rows, "_cold"), dict(meta, l2="cold"),
                                    path.with_name(path.stem + "_cold.png")))
        except ImportError as e:  # the GPU image may lack matplotlib: say how to draw it later
            print(f"no plot ({e}); run: python benchmarks/decode_step.py --replot {path}")
    return rows


def plot(rows, meta, path: Path) -> Path:
    """Two panels: each bounded configuration's step over SDPA over L at every (B, heads, L), one
    bar per configuration; and the step against the context N (per batch/heads, L=2048 or the
    first budget; SDPA over the dense cache, raas, quest), or with a single N, quest against its
    floor."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(14, 5), gridspec_kw=dict(width_ratios=(1, 2)))
    shapes = sorted({(r["B"], r["Hq"], r["Hkv"]) for r in rows})
    budgets = sorted({r["L"] for r in rows})
    contexts = sorted({r["N"] for r in rows})
    configs = meta.get("configs") or [p for p in ("raas", "h2o", "streaming", "quest") if any(p in r for r in rows)]
    bounded = [c for c in configs if parse_spec(c)[0] not in ("quest", "dense")]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    L0 = 2048 if 2048 in budgets else budgets[0]
    if len(contexts) > 1:
        for i, (B, Hq, Hkv) in enumerate(shapes):
            rs = sorted((r for r in rows if (r["B"], r["Hq"], r["Hkv"], r["L"]) == (B, Hq, Hkv, L0)), key=lambda r: r["N"])
            c = colors[i % len(colors)]
            for key, style, label in (("sdpa_dense_N", "-o", "SDPA dense over N"), ("raas", "-s", f"raas L={L0}"),
                                      ("quest", ":^", f"quest L={L0}")):
                pts = [(r["N"], r[key]) for r in rs if r.get(key)]
                if pts:
                    a.plot(*zip(*pts), style, color=c, label=f"B={B} {Hq}/{Hkv}: {label}",
                           alpha=0.9 if key != "quest" else 0.6)
        a.set_xscale("log", base=2)
        a.set_yscale("log")
        a.set_xlabel("context N (tokens)")
        a.set_ylabel("one layer, one decode step (us)")
        a.set_title("decode step vs context")
        a.legend(fontsize=6, ncol=2)
    else:
        quest = [(f"B{r['B']} {r['Hq']}/{r['Hkv']} L{r['L'] // 1024}k", r["quest"] / r["floor_quest"])
                 for r in rows if r.get("quest") and r.get("floor_quest")]
        if quest:
            a.bar(range(len(quest)), [x for _, x in quest], color="tab:gray")
            a.set_xticks(range(len(quest)), [n for n, _ in quest], rotation=70, fontsize=7)
            a.set_yscale("log")
            a.set_ylabel("quest step / its floor (bounds over N + L tokens' K/V)")
        a.set_title(f"quest against its floor, N={contexts[0]}")
    labels = [(B, Hq, Hkv, L) for (B, Hq, Hkv) in shapes for L in budgets
              if any((r["B"], r["Hq"], r["Hkv"], r["L"]) == (B, Hq, Hkv, L) and r.get("sdpa_L") for r in rows)]
    width = 0.8 / max(len(bounded), 1)
    for j, cfg in enumerate(bounded):
        xs, ys = [], []
        for i, key in enumerate(labels):
            r = next((r for r in rows if (r["B"], r["Hq"], r["Hkv"], r["L"]) == key and r.get(cfg)), None)
            if r and r.get("sdpa_L"):
                xs.append(i + (j - (len(bounded) - 1) / 2) * width)
                ys.append(r[cfg] / r["sdpa_L"])
        b.bar(xs, ys, width, color=colors[j % len(colors)], label=cfg)
    b.axhline(1.3, color="k", ls="--", lw=1, label="target 1.3x")
    b.axhline(1.0, color="gray", lw=0.8)
    b.set_xticks(range(len(labels)), [f"B{B} {Hq}/{Hkv} L{L // 1024}k" for B, Hq, Hkv, L in labels],
                 rotation=70, fontsize=7)
    b.set_ylabel("engine step / SDPA over L slots")
    b.set_title("bounded configurations: distance to the compacted-cache ideal")
    b.legend(fontsize=7, ncol=2)
    l2 = ", L2 evicted before each call" if meta.get("l2") == "cold" else ""
    fig.suptitle(f"{meta.get('device', '')}, torch {meta.get('torch', '')}, {meta.get('dtype', '')}{l2}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


if __name__ == "__main__":
    main()
