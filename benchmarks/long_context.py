"""Long-context generation end to end: raas_flex vs transformers dense (static cache, compiled).

Real architecture shapes with random weights (no hub access needed), bf16, greedy, on one GPU:

    dense   transformers generate with cache_implementation="static" (sdpa, auto-compiled with
            CUDA graphs), chunked prefill of N - steps prompt tokens, then `steps` timed decode
            steps at context ~N. KV memory grows with N.
    raas    raas_flex.patch(model, budget=L) and the same generate call (the --raas-prompt prompt
            in --prefill-chunk pieces too; at large batches a smaller chunk keeps the prompt
            forward's activations small). A RaaS cache holds L
            tokens whatever the context, so its step cost does not depend on N once the buffer is
            full; the script decodes past the point where every step evicts and times those steps
            (with --raas-long, along a long decode, to show the time stays flat as N grows).
            --raas-batches adds batch sizes: integers, or "<k>x" = k times the largest dense batch
            whose KV fits at the largest dense context measured in this run (e.g. 8x).
    dense_flash / dense_flex (--order): two dense anchors nearer their floor than `dense`: the
            engine's own dense policy, and transformers' static cache with its flex_attention
            implementation (GQA without repeated K/V, blocks past the filled prefix skipped).
    quest   raas_flex.patch(model, budget=L, policy="quest", max_length=N + margin) with
            --quest-contexts: keeps every token (O(N) memory like dense) and attends to the top
            L/page_size pages each step. Same prompt (N - steps tokens), in pieces of
            --prefill-chunk tokens as for dense (generate's prefill_chunk_size), and the same
            timed steps at context ~N as dense.

Reports ms per decode step, tokens/s (batch / step time), peak GPU memory, KV bytes, compile
counts (warm-up and timed run), the largest batch whose KV fits in GPU memory, the wall time of
each measurement, and a ratio section (raas / quest against dense at each dense context, rows of
this run only).

Robustness (one long call on a GPU): with --deadline-s, each measurement is first estimated from
earlier ones (same kind, scaled by size; quest from dense at the nearest context) and skipped
(`skipped: "deadline"` row) if it cannot finish in time; the first measurement always runs. An
exception in one measurement (OOM or other) becomes an error row, and compile/CUDA-graph state
is reset (torch._dynamo.reset, cudagraph trees reset, gc, empty_cache) before the next one; the
same reset runs between any two measurements (each compiles its own graphs; CUDA-graph trees left
from one keep its caches alive). Rows go to long_context.partial.json as they come; the results
JSON and markdown are written at the end, also after an interrupt or SIGTERM.

    python benchmarks/long_context.py --arch llama-3.1-8b --batch 8 --contexts 32768 --budget 2048 \\
        --raas-batches 8x --quest-contexts 32768 --deadline-s 510
    python benchmarks/long_context.py --smoke     # tiny CPU run used by the tests (no timing claims)
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import shlex
import signal
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
from transformers import CompileConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import raas_flex  # noqa: E402
from raas_flex.config import make_config, parse_spec  # noqa: E402
from benchmarks.decode_step import copy_bandwidth, quest_read_bytes  # noqa: E402
from benchmarks.hf_generate import ARCHS, StepClock, build  # noqa: E402

try:
    from tqdm import tqdm
except ImportError:  # pragma: no cover
    class tqdm:  # minimal stand-in: no bar, rows still printed
        def __init__(self, *a, **k):
            pass

        def set_postfix_str(self, *a, **k):
            pass

        def update(self, *a, **k):
            pass

        def close(self):
            pass

        @staticmethod
        def write(s):
            print(s, flush=True)

# estimates of a measurement's duration are multiplied by this before comparing with the time left
DEADLINE_SAFETY = 1.25


def counters_now():
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"], counters["inductor"]["cudagraph_skips"]


def head_dim_of(cfg) -> int:
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def kv_bytes_dense(cfg, batch: int, tokens: int, itemsize: int = 2) -> int:
    return 2 * cfg.num_hidden_layers * batch * cfg.num_key_value_heads * tokens * head_dim_of(cfg) * itemsize


def largest_batch(bytes_per_seq: int, reserve: int, device) -> int | None:
    """Largest batch whose KV can actually be allocated next to the model and `reserve` bytes of
    working memory (activations, workspace): allocation-checked, not only computed. None on CPU
    (not measured)."""
    if device == "cpu":
        return None
    free, _ = torch.cuda.mem_get_info()
    b = max(int((free - reserve) // bytes_per_seq), 0)
    while b > 0:
        try:
            blob = torch.empty(b * bytes_per_seq + reserve, dtype=torch.uint8, device=device)
            del blob
            torch.cuda.empty_cache()
            return b
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
            b -= 1
    return 0


def generate_timed(model, ids, new, device, **kw):
    from transformers import LogitsProcessorList

    clock = StepClock()
    g0 = counters_now()
    if device != "cpu":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    out = model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                         logits_processor=LogitsProcessorList([clock]), **kw)
    if device != "cpu":
        torch.cuda.synchronize()
    t = time.perf_counter() - t
    g1 = counters_now()
    peak = torch.cuda.max_memory_allocated() if device != "cpu" else 0
    comp = dict(graphs_compiled=g1[0] - g0[0], cudagraph_skips=g1[1] - g0[1])
    return out, clock.deltas(), comp, peak, t


def warm_up(model, ids, new, device, **kw):
    """The untimed first generate (compile, CUDA-graph recording, allocator): seconds and graphs compiled."""
    g0 = counters_now()
    t = time.perf_counter()
    model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, **kw)
    if device != "cpu":
        torch.cuda.synchronize()
    return time.perf_counter() - t, counters_now()[0] - g0[0]


def lean_timed(model, ids, new, steps, device, repeats=3):
    """ms per decode step of raas_flex.greedy_decode (the lean loop) at a full buffer: the wall-time
    difference of decoding new + steps and new tokens (the prompt cancels), median of `repeats` pairs,
    after one untimed call of each length (compile, CUDA graphs); and the graphs compiled while timed."""
    run = lambda n: raas_flex.greedy_decode(model, ids, n, min_new_tokens=n)

    def wall(n):
        sync = torch.cuda.synchronize if device != "cpu" else (lambda: None)
        sync()
        t = time.perf_counter()
        run(n)
        sync()
        return time.perf_counter() - t

    run(new + steps)
    run(new)
    g0 = counters_now()[0]
    per = [(wall(new + steps) - wall(new)) / steps for _ in range(repeats)]
    return statistics.median(per) * 1e3, counters_now()[0] - g0


def median_ms(d: list[float]) -> float:
    return statistics.median(d) * 1e3 if d else float("nan")


def drop_static_cache(model) -> None:
    # generate may keep its static cache on the model for reuse: drop it before probing memory
    for attr in ("_cache", "_static_cache"):
        if hasattr(model, attr):
            setattr(model, attr, None)


def is_oom(e: BaseException) -> bool:
    if isinstance(e, torch.OutOfMemoryError):
        return True
    s = f"{type(e).__name__}: {e}".lower()
    return "out of memory" in s or "outofmemory" in s


def reset_state(model, device) -> None:
    """Forget compiled code and CUDA-graph trees and give memory back: after a failed measurement
    (an OOM during CUDA-graph recording leaves the tree inconsistent: the next compiled run then
    fails with an AssertionError in dealloc_current_path_weakrefs) and between measurement kinds."""
    drop_static_cache(model)
    for attr in ("_compiled_call", "_last_compile_config"):  # transformers' torch.compile wrapper of __call__
        model.__dict__.pop(attr, None)
    torch._dynamo.reset()
    try:
        from torch._inductor import cudagraph_trees

        cudagraph_trees.reset_cudagraph_trees()
    except Exception:  # pragma: no cover - nothing to reset
        pass
    gc.collect()
    if device != "cpu":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


# -- raas batch specs ----------------------------------------------------------------------------
def parse_raas_batches(spec: str) -> list[tuple[str, float]]:
    """'64,8x' -> [("abs", 64), ("mul", 8.0)]. Raises ValueError on anything else."""
    items = []
    for tok in (t.strip() for t in spec.split(",")):
        if not tok:
            continue
        try:
            if tok.lower().endswith("x"):
                k = float(tok[:-1])
                if not (k > 0 and math.isfinite(k)):
                    raise ValueError
                items.append(("mul", k))
            else:
                n = int(tok)
                if n < 1:
                    raise ValueError
                items.append(("abs", n))
        except ValueError:
            raise ValueError(f"--raas-batches item {tok!r}: use a positive integer batch or '<k>x' (k times the "
                             "largest dense batch whose KV fits at the largest dense context), e.g. 64,8x") from None
    return items


def spec_text(item: tuple[str, float]) -> str:
    kind, v = item
    return str(int(v)) if kind == "abs" else f"{v:g}x"


def resolve_batch(item: tuple[str, float], rows: list[dict]) -> tuple[int, dict | None]:
    """Batch size of a --raas-batches item and, for '<k>x', the dense row it was derived from.
    Raises LookupError when no dense row of this run has an allocation-checked largest batch."""
    kind, v = item
    if kind == "abs":
        return int(v), None
    dense = [r for r in rows if r.get("kind") in ("dense", "dense-alloc") and "N" in r]
    usable = [r for r in dense if isinstance(r.get("max_batch_kv_fits"), int) and r["max_batch_kv_fits"] >= 1]
    if not usable:
        why = "no dense row of this run has max_batch_kv_fits >= 1"
        if any(r.get("max_batch_kv_fits") is None and "ms_per_step" in r for r in dense):
            why += " (the allocation check needs CUDA; on CPU it is not measured)"
        raise LookupError(f"{spec_text(item)}: {why}")
    src = max(usable, key=lambda r: (r["N"], r.get("kind") == "dense"))
    fits = src["max_batch_kv_fits"]
    b = int(round(v * fits))
    derived = dict(spec=spec_text(item), multiplier=v, dense_mode=src["mode"], dense_N=src["N"],
                   dense_B=src.get("B"), dense_max_batch_kv_fits=fits,
                   largest_dense_context_of_run=max(r["N"] for r in dense) == src["N"])
    if b < 1:
        raise LookupError(f"{spec_text(item)} of the dense largest batch {fits} is {b}")
    return b, derived


# -- deadline -------------------------------------------------------------------------------------
def estimate_s(kind: str, size: float, done: list[dict], weights: int, kv_seq: int) -> tuple[float | None, str]:
    """Seconds a measurement is expected to take, from finished measurements of this run, and a note
    on where the estimate came from. dense/quest at context N: the nearest earlier one of the same
    kind (quest: else dense, same prompt and steps) with its warm-up + timed generate scaled by N;
    raas at batch b: the nearest earlier raas run with its timed generate scaled by the bytes a step
    reads (weights + KV) and the steps decoded. A kind with nothing comparable yet: None (no
    estimate, so it runs). A guess from another kind was tried and was wrong both ways on the H200
    (each kind compiles its own graphs, and a warm on-disk compile cache makes later ones faster):
    it skipped a 93 s raas run on a 237 s guess and a 100 s dense run on a 173 s one."""
    ok = [r for r in done if "wall_s" in r and "t_timed_s" in r]
    same = [r for r in ok if r["kind"] == kind]
    if not same and kind in ("quest", "dense_flash", "dense_flex"):
        same = [r for r in ok if r["kind"] == "dense"]
    if not same:
        return None, ("nothing measured yet" if not ok else f"no earlier {kind} measurement to scale from")
    if kind in ("dense", "quest", "dense_flash", "dense_flex"):
        ref = min(same, key=lambda r: abs(math.log(size / r["N"])))
        ratio = size / ref["N"]
        work = 2 * ref["t_timed_s"]  # warm-up and timed generate each prefill and decode
        src = f"{ref['kind']} N={ref['N']}"
    else:
        b, new = size
        ref = min(same, key=lambda r: abs(math.log(b / r["B"])))
        ratio = (weights + kv_seq * b) / (weights + kv_seq * ref["B"]) * new / ref["decoded"]
        work = ref["t_timed_s"]
        src = f"raas B={ref['B']}"
    return max(ref["wall_s"] + (ratio - 1) * work, 0.0), f"{src} ({ref['wall_s']:.0f} s) scaled x{ratio:.2f}"


def main(argv=None):
    t_start = time.perf_counter()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="llama-3.1-8b", choices=sorted(ARCHS))
    ap.add_argument("--layers", type=int, default=None, help="fewer layers than the real model")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--contexts", default="8192,32768", help="dense contexts N (comma separated)")
    ap.add_argument("--budget", type=int, default=2048)
    ap.add_argument("--raas-prompt", type=int, default=1024, help="prompt tokens for the raas runs (pinned)")
    ap.add_argument("--steps", type=int, default=64, help="timed decode steps per measurement")
    ap.add_argument("--raas-long", type=int, default=0, help="also decode raas up to this context, timing windows")
    ap.add_argument("--raas-batches", default="",
                    help="extra raas batch sizes: integers and/or '<k>x' = k times the largest dense batch whose KV "
                         "fits at the largest dense context of this run (e.g. 128 or 8x)")
    ap.add_argument("--raas-configs", default="raas",
                    help="semicolon-separated raas-style configurations by their user-facing options (rows for each, "
                         "and each one's tokens/s against the first at each batch), e.g. "
                         "'raas;raas:backend=flex;raas:importance=attention,refresh=threshold'")
    ap.add_argument("--lean", action="store_true",
                    help="also time each raas configuration at --batch under raas_flex.greedy_decode (the lean "
                         "decode loop, no generate): lean_ms_per_step in its row")
    ap.add_argument("--quest-contexts", default="", help="quest contexts N (comma separated; none by default)")
    ap.add_argument("--quest-budget", type=int, default=None, help="tokens quest attends to (default: --budget)")
    ap.add_argument("--quest-margin", type=int, default=64, help="quest max_length = N + this")
    ap.add_argument("--quest-configs", default="quest",
                    help="semicolon-separated quest configurations (a row for each at every --quest-contexts N), "
                         "e.g. 'quest;quest:page_size=32'")
    ap.add_argument("--dense-flash-configs", default="dense",
                    help="semicolon-separated configurations of the dense_flash rows (the engine's dense policy), "
                         "e.g. 'dense;dense:page_size=64'")
    ap.add_argument("--order", default="dense,raas,quest",
                    help="measurement kinds in the order they run; a kind left out is not run (e.g. 'quest'); "
                         "'dense_flash': the engine's own dense policy (every cached token, no repeated K/V) "
                         "at each dense context; 'dense_flex': transformers' "
                         "static cache with its flex_attention implementation (GQA without repeated K/V, blocks past "
                         "the filled prefix skipped): two dense anchors nearer their floor than 'dense'")
    ap.add_argument("--deadline-s", type=float, default=None,
                    help="skip (row with skipped='deadline') each measurement that is not expected to finish within "
                         "this many seconds of the script's start; the first measurement always runs")
    ap.add_argument("--skip-dense", action="store_true")
    ap.add_argument("--dense-reserve-gb", type=float, default=None,
                    help="with --skip-dense: still allocation-check the largest dense batch at each context, "
                         "reserving this much working memory (peak - weights - KV of an earlier dense run)")
    ap.add_argument("--prefill-chunk", type=int, default=4096,
                    help="prompt pieces of every row (generate's prefill_chunk_size; 0: one forward)")
    ap.add_argument("--compile-mode", default="reduce-overhead", choices=["reduce-overhead", "max-autotune"],
                    help="torch.compile mode of generate's decode forward (transformers.CompileConfig; both "
                         "replay CUDA graphs): 'max-autotune' lets Inductor time its own GEMM kernels against "
                         "cuBLAS for the decode's small-batch projections")
    ap.add_argument("--fuse-projections", action="store_true",
                    help="every row on the model with raas_flex.fuse_projections (q/k/v and gate/up as one "
                         "matrix product each)")
    ap.add_argument("--smoke", action="store_true", help="tiny CPU run (checks the script, no timing claims)")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = ap.parse_args(argv)
    try:
        raas_items = parse_raas_batches(args.raas_batches)
    except ValueError as e:
        ap.error(str(e))
    attentions = [a.strip() for a in args.raas_configs.split(";") if a.strip()]
    try:
        specs = {a: parse_spec(a) for a in attentions}
    except ValueError as e:
        ap.error(str(e))
    if not attentions or len(set(attentions)) != len(attentions) or any(not make_config(2048, n, **o).policy.bounded
                                                      for n, o in specs.values()):
        ap.error(f"--raas-configs {args.raas_configs!r}: bounded policies (raas, h2o, streaming), no repeats")
    order = [k.strip() for k in args.order.split(",") if k.strip()]
    if sorted(order) != sorted(set(order)) or not set(order) <= {"dense", "raas", "quest", "dense_flash", "dense_flex"}:
        ap.error(f"--order {args.order!r}: a permutation of some of dense,raas,quest,dense_flash,dense_flex")
    quest_contexts = [int(x) for x in args.quest_contexts.split(",") if x.strip()]

    def configs_of(option: str, policy: str) -> list[str]:
        """The ;-separated configurations of --<option>, each of ``policy``, no repeats (else exit 2)."""
        text = getattr(args, option.replace("-", "_"))
        out = [a.strip() for a in text.split(";") if a.strip()]
        try:
            names = {parse_spec(a)[0] for a in out}
        except ValueError as e:
            ap.error(str(e))
        if not out or len(set(out)) != len(out) or names != {policy}:
            ap.error(f"--{option} {text!r}: {policy} configurations, no repeats")
        return out

    quest_configs = configs_of("quest-configs", "quest")
    flash_configs = configs_of("dense-flash-configs", "dense")
    if args.smoke:
        device, dtype = "cpu", torch.float32
        args.layers, args.batch, args.budget, args.raas_prompt, args.steps = 2, 2, 64, 40, 4
        contexts, args.prefill_chunk = [96], 32
    else:
        if not torch.cuda.is_available():
            ap.error("needs CUDA (use --smoke on CPU)")
        device, dtype = "cuda", torch.bfloat16
        contexts = [int(x) for x in args.contexts.split(",") if x]
    torch._dynamo.config.cache_size_limit = 256
    model = build(args.arch, args.layers, device, dtype) if not args.smoke else _tiny(device)
    if args.fuse_projections:
        raas_flex.fuse_projections(model)
    model.generation_config.pad_token_id = 0
    model.generation_config.compile_config = CompileConfig(mode=args.compile_mode)
    cfg = model.config
    gen = torch.Generator(device).manual_seed(1)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    itemsize = torch.empty(0, dtype=dtype).element_size()
    rows: list[dict] = []
    B, L, P0 = args.batch, args.budget, args.raas_prompt
    Lq = args.quest_budget or L
    bandwidth = copy_bandwidth(device) if device != "cpu" else None  # bytes/s of a device-to-device copy

    def floor_ms(state_bytes: int) -> float | None:
        """The step's memory floor: (weight bytes + every byte the cache state holds) / copy bandwidth."""
        return (weights + state_bytes) / bandwidth * 1e3 if bandwidth else None

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    partial = out / "long_context.partial.json"

    def emit(r):
        rows.append(r)
        partial.write_text(json.dumps(rows, indent=1))  # survives a timeout
        tqdm.write(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()}))

    phase = {"name": "", "row": {}}  # the measurement under way, and the row it has filled so far

    # -- one measurement per kind -----------------------------------------------------------------
    def run_dense(N, impl="sdpa"):
        """transformers dense decode with a static cache, attention `impl` ("sdpa": the dense row;
        "flex_attention": the dense_flex row)."""
        ids = torch.randint(100, 1000, (B, N - args.steps), device=device, generator=gen)
        kw = dict(cache_implementation="static", prefill_chunk_size=args.prefill_chunk or None)
        model.set_attn_implementation(impl)
        try:
            phase["name"] = "warm-up"
            t_warm, g_warm = warm_up(model, ids, args.steps, device, **kw)
            phase["name"] = "timed"
            _, d, comp, peak, t_timed = generate_timed(model, ids, args.steps, device, **kw)
        finally:
            model.set_attn_implementation("sdpa")
        del ids
        ms = median_ms(d[len(d) // 4:])
        kvb = kv_bytes_dense(cfg, B, N, itemsize)
        # probe as a fresh process would see the GPU: without this run's static cache and CUDA-graph pools
        reset_state(model, device)
        phase["name"] = "largest-batch check"
        fits = largest_batch(kv_bytes_dense(cfg, 1, N, itemsize), max(peak - weights - kvb, 0), device)
        return dict(prompt=N - args.steps, steps=args.steps, prefill_chunk=args.prefill_chunk or None,
                    floor_ms=floor_ms(kvb), ms_per_step=ms, tokens_per_s=B / ms * 1e3, peak_gb=peak / 2**30, kv_gb=kvb / 2**30, **comp,
                    graphs_compiled_warmup=g_warm, max_batch_kv_fits=fits, t_warmup_s=t_warm, t_timed_s=t_timed)

    def run_quest(N, config="quest"):
        """A configuration that keeps every token (quest's; "dense": the dense_flash anchor) at context N."""
        ids = torch.randint(100, 1000, (B, N - args.steps), device=device, generator=gen)
        max_length = N + args.quest_margin
        kw = dict(prefill_chunk_size=args.prefill_chunk or None)
        policy, options = parse_spec(config)
        with raas_flex.patched(model, budget=Lq, policy=policy, max_length=max_length, **options):
            phase["name"] = "warm-up"
            t_warm, g_warm = warm_up(model, ids, args.steps, device, **kw)
            phase["name"] = "timed"
            _, d, comp, peak, t_timed = generate_timed(model, ids, args.steps, device, **kw)
            st = raas_flex.stats(model)
        del ids
        ms = median_ms(d[len(d) // 4:])
        lay = st["layers"][0]
        if policy == "quest":  # it reads every page's key bounds and the K/V of the tokens it attends
            reads = "weights + page bounds + attended K/V"
            read = cfg.num_hidden_layers * quest_read_bytes(
                B, cfg.num_key_value_heads, lay["slots"] // st["page_size"], Lq, head_dim_of(cfg), itemsize)
        else:  # dense reads its whole state
            reads, read = "weights + cache state", st["state_bytes"]
        return dict(prompt=N - args.steps, steps=args.steps, max_length=max_length, slots=lay["slots"],
                    tokens_kept=max(lay["tokens"]), attended_tokens=Lq if policy == "quest" else max(lay["tokens"]),
                    prefill_chunk=args.prefill_chunk or None, floor_ms=floor_ms(read),
                    floor_reads=reads,
                    ms_per_step=ms, tokens_per_s=B / ms * 1e3, peak_gb=peak / 2**30, kv_gb=st["kv_bytes"] / 2**30,
                    state_gb=st["state_bytes"] / 2**30, evictions=st["evictions"], **comp,
                    graphs_compiled_warmup=g_warm, t_warmup_s=t_warm, t_timed_s=t_timed)

    def raas_new(b):
        fill = L - P0 + 32  # decode until every step evicts (buffer full), then time `steps` steps
        return fill + args.steps if not (args.raas_long and b == B) else max(args.raas_long - P0, fill + args.steps)

    def run_raas(b, attention):
        """A raas-style row at batch b: generate's time per step at a full buffer, then (--lean) the lean
        loop's. The generate row is kept in phase["row"] before the lean loop starts, so that a timeout
        there still writes it (with lean_interrupted)."""
        ids = torch.randint(100, 1000, (b, P0), device=device, generator=gen)
        new = raas_new(b)
        kw = dict(prefill_chunk_size=args.prefill_chunk or None)
        name, options = parse_spec(attention)
        with raas_flex.patched(model, budget=L, policy=name, **options):
            phase["name"] = "warm-up"
            t_warm, g_warm = warm_up(model, ids, 48, device, **kw)  # compile + graphs
            phase["name"] = "timed"
            _, d, comp, peak, t_timed = generate_timed(model, ids, new, device, **kw)
            st = raas_flex.stats(model)
            # d[i] is the time of decode step i+1, at context P0 + i + 2
            full = [x for i, x in enumerate(d) if P0 + i + 2 > L + 16]
            ms = median_ms(full[-args.steps:])
            row = phase["row"]
            row.update(prompt=P0, prefill_chunk=args.prefill_chunk or None, decoded=new, ms_per_step=ms,
                       tokens_per_s=b / ms * 1e3, peak_gb=peak / 2**30, kv_gb=st["kv_bytes"] / 2**30,
                       state_gb=st["state_bytes"] / 2**30, evictions=st["evictions"],
                       floor_ms=floor_ms(st["state_bytes"]), **comp, graphs_compiled_warmup=g_warm,
                       t_warmup_s=t_warm, t_timed_s=t_timed)
            if row["floor_ms"]:
                row["over_floor"] = ms / row["floor_ms"]
            if args.lean and b == B:
                phase["name"] = "lean loop"
                lean_ms, lean_graphs = lean_timed(model, ids, new - args.steps, args.steps, device)
                row.update(lean_ms_per_step=lean_ms, lean_tokens_per_s=b / lean_ms * 1e3,
                           lean_graphs_compiled=lean_graphs)
                if row["floor_ms"]:
                    row["lean_over_floor"] = lean_ms / row["floor_ms"]
        del ids
        if args.raas_long and b == B:
            windows = {}
            for lo in sorted({L + 256, (P0 + new) // 2, P0 + new - 512}):
                w = [x for i, x in enumerate(d) if lo <= P0 + i + 2 < lo + 512]
                if w:
                    windows[f"ctx_{lo}-{lo + 512}"] = median_ms(w)
            row["ms_per_step_by_context"] = windows
        reset_state(model, device)  # probe without this run's CUDA-graph pools
        phase["name"] = "largest-batch check"
        row["max_batch_kv_fits"] = largest_batch(st["kv_bytes"] // b, max(peak - weights - st["kv_bytes"], 0), device)
        return row

    # -- the plan ---------------------------------------------------------------------------------
    plan: list[tuple[str, object]] = []
    for kind in order:
        if kind == "dense":
            if not args.skip_dense:
                plan += [("dense", N) for N in contexts]
            elif args.dense_reserve_gb is not None and device != "cpu":
                plan += [("dense-alloc", N) for N in contexts]
        elif kind == "raas":
            plan += [("raas", (att, item)) for att in attentions for item in [("abs", B)] + raas_items]
        elif kind == "dense_flash":
            plan += [(kind, (dc, N)) for dc in flash_configs for N in contexts]
        elif kind == "dense_flex":
            plan += [(kind, N) for N in contexts]
        else:
            plan += [("quest", (qc, N)) for qc in quest_configs for N in quest_contexts]
    raas_kv_seq = kv_bytes_dense(cfg, 1, L, itemsize)

    def elapsed():
        return time.perf_counter() - t_start

    interrupted = stop = None
    old_term = None

    def on_term(signum, frame):
        raise SystemExit(128 + signum)

    try:
        old_term = signal.signal(signal.SIGTERM, on_term)
    except ValueError:  # not the main thread
        old_term = None

    measured = 0
    bar = tqdm(total=len(plan), desc="measurements", file=sys.stderr)
    try:
        for kind, x in plan:
            what = f"{x[0]} {spec_text(x[1])}" if kind == "raas" else f"{x[0]} N={x[1]}" if kind in (
                "quest", "dense_flash") else x
            bar.set_postfix_str(f"{kind} {what}", refresh=True)
            if kind == "dense-alloc":
                per_seq = kv_bytes_dense(cfg, 1, x, itemsize)
                emit(dict(mode="dense static compiled (allocation check only)", kind="dense-alloc", B=0, N=x,
                          reserve_gb=args.dense_reserve_gb, kv_gb_per_seq=per_seq / 2**30,
                          max_batch_kv_fits=largest_batch(per_seq, int(args.dense_reserve_gb * 2**30), device)))
                bar.update()
                continue
            if kind == "dense":
                base, size, fn = dict(mode="dense static compiled", kind="dense", B=B, N=x), x, lambda: run_dense(x)
            elif kind == "quest":
                qc, x = x
                base = dict(mode=f"{qc} budget={Lq}", kind="quest", config=qc, B=B, N=x, budget=Lq)
                size, fn = x, (lambda x=x, qc=qc: run_quest(x, qc))
            elif kind == "dense_flash":
                dc, x = x
                base = dict(mode=f"dense_flash (raas_flex {dc})", kind="dense_flash", config=dc, B=B, N=x)
                size, fn = x, (lambda x=x, dc=dc: run_quest(x, dc))
            elif kind == "dense_flex":
                base = dict(mode="dense static compiled, flex_attention", kind="dense_flex", B=B, N=x)
                size, fn = x, (lambda x=x: run_dense(x, "flex_attention"))
            else:
                att, x = x
                base = dict(mode=f"{att} budget={L}", kind="raas", config=att, batch_spec=spec_text(x))
                try:
                    b, derived = resolve_batch(x, rows)
                except LookupError as e:
                    emit(dict(base, B=None, error=str(e), error_type="batch spec unresolved"))
                    bar.update()
                    continue
                base["B"] = b
                if derived is not None:
                    base["derived_from"] = derived
                size, fn = (b, raas_new(b)), (lambda b=b, att=att: run_raas(b, att))
            # deadline: can it finish?
            if args.deadline_s is not None and measured > 0:
                est, how = estimate_s(kind, size, rows, weights, raas_kv_seq)
                left = args.deadline_s - elapsed()
                need = None if est is None else est * DEADLINE_SAFETY
                if left <= 0 or (need is not None and need > left):
                    emit(dict(base, skipped="deadline", estimate_s=need, estimate_from=how, time_left_s=left,
                              deadline_s=args.deadline_s))
                    bar.update()
                    continue
            if measured > 0:
                try:
                    reset_state(model, device)  # each measurement compiles its own graphs: start from a clean slate
                except Exception as e:  # pragma: no cover - e.g. a sticky CUDA error; the measurement will say
                    tqdm.write(f"reset before {kind} failed: {type(e).__name__}: {e}")
            phase["name"], phase["row"] = "setup", {}
            t0 = time.perf_counter()
            failure = None
            try:
                row = dict(base, **fn())
            except Exception as e:  # recorded, not hidden; the run goes on
                oom = is_oom(e)
                failure = dict(base, error=("OOM: " if oom else "") + f"{type(e).__name__}: {str(e)[:300]}",
                               error_type=type(e).__name__, oom=oom, phase=phase["name"],
                               traceback=traceback.format_exc(limit=-4)[-1500:])
                del e
            measured += 1
            if failure is not None:
                try:
                    reset_state(model, device)
                    failure["state_reset"] = True
                except Exception as e:  # pragma: no cover - e.g. a sticky CUDA error
                    failure["state_reset"] = f"failed: {type(e).__name__}: {str(e)[:200]}"
                failure["wall_s"] = time.perf_counter() - t0
                emit(failure)
            else:
                row["wall_s"] = time.perf_counter() - t0
                emit(row)
            bar.update()
    except (KeyboardInterrupt, SystemExit) as e:
        interrupted, stop = f"{type(e).__name__}({getattr(e, 'code', '')}) during {phase['name'] or 'setup'}", e
        tqdm.write(f"interrupted: {interrupted}; writing the results so far")
        if phase["name"] == "lean loop":  # generate's time of this row was measured: keep it
            emit(dict(base, **phase["row"], lean_interrupted=True))
    finally:
        bar.close()
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)

        meta = dict(
            command=shlex.join(["python", os.path.relpath(__file__)] + list(argv if argv is not None else sys.argv[1:])),
            device=torch.cuda.get_device_name() if device != "cpu" else "cpu",
            gpu_memory_gb=torch.cuda.get_device_properties(0).total_memory / 2**30 if device != "cpu" else None,
            torch=torch.__version__, cuda=torch.version.cuda, transformers=__import__("transformers").__version__,
            python=sys.version.split()[0], arch=args.arch, layers=cfg.num_hidden_layers, weights_gb=weights / 2**30,
            copy_bandwidth_TBps=bandwidth / 1e12 if bandwidth else None, batch=B, budget=L, quest_budget=Lq, steps=args.steps, order=order, deadline_s=args.deadline_s,
            compile_mode=args.compile_mode, fuse_projections=args.fuse_projections, wall_s=elapsed(), interrupted=interrupted, time=time.strftime("%Y-%m-%d %H:%M:%S"))
        ratios = ratio_rows(rows)
        att_ratios = attention_ratios(rows)
        tag = "smoke" if args.smoke else f"{args.arch}_B{B}"
        (out / f"long_context_{tag}.json").write_text(
            json.dumps(dict(meta=meta, rows=rows, ratios=ratios, attention_ratios=att_ratios), indent=1))
        md = markdown(meta, rows, ratios, L, att_ratios)
        (out / f"long_context_{tag}.md").write_text(md)
        partial.unlink(missing_ok=True)
        print(md)
    if stop is not None:
        raise stop  # the results are written; still end the way the interrupt asked
    return rows


def ratio_rows(rows: list[dict]) -> list[dict]:
    """raas and quest rows against each measured dense context of this run: tokens/s ratio
    (other / dense) and KV ratio (dense / other)."""
    dense = [r for r in rows if r.get("kind") == "dense" and "tokens_per_s" in r]
    dense += [r for r in rows if r.get("kind") in ("dense_flash", "dense_flex") and "tokens_per_s" in r]
    others = [r for r in rows if r.get("kind") in ("raas", "quest") and "tokens_per_s" in r]
    out = []
    for d in dense:
        for o in others:
            if o["kind"] == "quest" and o["N"] != d["N"]:
                continue
            out.append(dict(dense_kind=d["kind"], dense_config=d.get("config"), dense_N=d["N"], dense_B=d["B"],
                            dense_tokens_per_s=d["tokens_per_s"],
                            dense_kv_gb=d["kv_gb"],
                            mode=o["mode"], B=o["B"], batch_spec=o.get("batch_spec"), tokens_per_s=o["tokens_per_s"],
                            kv_gb=o["kv_gb"], tokens_per_s_ratio=o["tokens_per_s"] / d["tokens_per_s"],
                            kv_ratio_dense_over=d["kv_gb"] / o["kv_gb"]))
    return out


def attention_ratios(rows: list[dict]) -> list[dict]:
    """raas-style rows at the same batch in this run: each configuration's tokens/s over the first one's."""
    done = [r for r in rows if r.get("kind") == "raas" and "tokens_per_s" in r]
    out = []
    for f in done:
        if f.get("config") != done[0].get("config"):
            continue
        for t in (r for r in done if r.get("config") != f.get("config") and r["B"] == f["B"]):
            out.append(dict(B=f["B"], base=f["config"], config=t["config"], base_ms_per_step=f["ms_per_step"],
                            ms_per_step=t["ms_per_step"], tokens_per_s_ratio=t["tokens_per_s"] / f["tokens_per_s"]))
    return out


def markdown(meta: dict, rows: list[dict], ratios: list[dict], L: int, att_ratios: list[dict] = ()) -> str:
    lines = ["| mode | B | context | ms/step | tokens/s | KV GB | peak GB | graphs compiled (timed run) | "
             "largest batch (KV fits) | wall s | note |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        b = r.get("B")
        b = "-" if b is None else b
        wall = f"{r['wall_s']:.0f}" if "wall_s" in r else ""
        note = ""
        if r.get("derived_from"):
            df = r["derived_from"]
            note = f"{df['spec']} of dense largest batch {df['dense_max_batch_kv_fits']} at N={df['dense_N']}"
        if r.get("kind") in ("quest", "raas") and "ms_per_step" in r:
            piece = r.get("prefill_chunk")
            note = (note + "; " if note else "") + (f"prompt in pieces of {piece}" if piece else "prompt in one forward")
        if r.get("floor_ms"):
            note = (note + "; " if note else "") + (f"floor {r['floor_ms']:.2f} ms ({r.get('floor_reads', 'weights + cache state')} / copy "
                                                   f"bandwidth): {r['ms_per_step'] / r['floor_ms']:.2f}x")
        if r.get("lean_ms_per_step"):
            over = f" = {r['lean_over_floor']:.2f}x floor" if r.get("lean_over_floor") else ""
            note = (note + "; " if note else "") + (f"lean loop (greedy_decode): {r['lean_ms_per_step']:.2f} ms/step, "
                                                   f"{r['lean_tokens_per_s']:.0f} tokens/s{over}, "
                                                   f"{r['lean_graphs_compiled']} graphs compiled while timed")
        if r.get("lean_interrupted"):
            note = (note + "; " if note else "") + "lean loop interrupted (generate's time kept)"
        if meta.get("device") != "cpu" and r.get("graphs_compiled_warmup") == 0:
            note = (note + "; " if note else "") + "no graph compiled in its warm-up (decode eager, or graphs reused)"
        if "skipped" in r:
            est = "?" if r.get("estimate_s") is None else f"{r['estimate_s']:.0f}"
            lines.append(f"| {r['mode']} | {b} | {r.get('N', '-')} | skipped: {r['skipped']} | | | | | | | "
                         f"needs ~{est} s ({r['estimate_from']}), {r['time_left_s']:.0f} s left; {note} |")
            continue
        if "error" in r:
            lines.append(f"| {r['mode']} | {b} | {r.get('N', '-')} | error | | | | | | {wall} | "
                         f"{r['phase'] + ': ' if r.get('phase') else ''}{r['error'][:160]}"
                         f"{'; state reset' if r.get('state_reset') is True else ''}"
                         f"{'; ' + note if note else ''} |")
            continue
        if "ms_per_step" not in r:
            lines.append(f"| {r['mode']} | - | {r['N']} | | | {r['kv_gb_per_seq']:.2f}/seq | | | "
                         f"{r['max_batch_kv_fits']} | | |")
            continue
        ctx = r.get("N", f"any >= {L} (flat)")
        fits = r.get("max_batch_kv_fits")
        lines.append(f"| {r['mode']} | {b} | {ctx} | {r['ms_per_step']:.2f} | {r['tokens_per_s']:.0f} | "
                     f"{r['kv_gb']:.2f} | {r['peak_gb']:.1f} | {r['graphs_compiled']} | {'-' if fits is None else fits} | "
                     f"{wall} | {note} |")
    lines += ["", "ratio (rows of this run only): tokens/s of the row / tokens/s of dense at that context, and "
              "KV of dense / KV of the row", "",
              "| dense (context) | dense B | dense tokens/s | vs | B | tokens/s | tokens/s ratio | dense KV GB | KV GB | "
              "KV ratio (dense / row) |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for q in ratios:
        kind = q.get("dense_kind", "dense") + (f" {q['dense_config']}" if q.get("dense_config") else "")
        lines.append(f"| {kind} ({q['dense_N']}) | {q['dense_B']} | {q['dense_tokens_per_s']:.0f} | {q['mode']} | {q['B']} | "
                     f"{q['tokens_per_s']:.0f} | {q['tokens_per_s_ratio']:.2f}x | {q['dense_kv_gb']:.2f} | "
                     f"{q['kv_gb']:.2f} | {q['kv_ratio_dense_over']:.1f}x |")
    if not ratios:
        lines.append("| (no dense row and raas/quest row both measured in this run) | | | | | | | | | |")
    if att_ratios:
        lines += ["", "raas configurations (rows of this run only): tokens/s against the first configuration", "",
                  "| B | first | ms/step | configuration | ms/step | tokens/s ratio |", "|---|---|---|---|---|---|"]
        lines += [f"| {q['B']} | {q['base']} | {q['base_ms_per_step']:.2f} | {q['config']} | {q['ms_per_step']:.2f} | "
                  f"{q['tokens_per_s_ratio']:.2f}x |" for q in att_ratios]
    head = ", ".join(f"{k}={meta[k]}" for k in ("device", "torch", "transformers", "arch", "layers", "compile_mode",
                                                 "fuse_projections") if k in meta)
    return (f"{head}\n\ncommand: `{meta['command']}`\n\nwall time: {meta['wall_s']:.0f} s"
            f"{' (interrupted: ' + meta['interrupted'] + ')' if meta.get('interrupted') else ''}\n\n"
            + "\n".join(lines) + "\n")


def _tiny(device):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=1024, max_position_embeddings=4096)
    return LlamaForCausalLM(cfg).to(device).eval()


if __name__ == "__main__":
    main()
