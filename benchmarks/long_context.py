"""Long-context generation end to end: raas_flex vs transformers dense (static cache, compiled).

Real architecture shapes with random weights (no hub access needed), bf16, greedy, on one GPU:

    dense   transformers generate with cache_implementation="static" (sdpa, auto-compiled with
            CUDA graphs), chunked prefill of N - steps prompt tokens, then `steps` timed decode
            steps at context ~N. KV memory grows with N.
    raas    raas_flex.patch(model, budget=L) and the same generate call. A RaaS cache holds L
            tokens whatever the context, so its step cost does not depend on N once the buffer is
            full; the script decodes past the point where every step evicts and times those steps
            (with --raas-long, along a long decode, to show the time stays flat as N grows).

Reports ms per decode step, tokens/s (batch / step time), peak GPU memory, KV bytes, compile
counts after warm-up, and the largest batch whose KV fits in GPU memory at each context.

    python benchmarks/long_context.py --arch llama-3.1-8b --batch 8 --contexts 8192,32768 --budget 2048
    python benchmarks/long_context.py --smoke     # tiny CPU run used by the tests (no timing claims)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import raas_flex  # noqa: E402
from benchmarks.hf_generate import ARCHS, build  # noqa: E402

try:
    from tqdm import tqdm
except ImportError:  # pragma: no cover
    def tqdm(x, **_):
        return x


class StepTimes:
    """Logits processor recording a host timestamp per decode step (generate syncs each step
    anyway for its stopping criteria; the explicit synchronize only makes the stamp exact)."""

    def __init__(self, sync: bool):
        self.t: list[float] = []
        self.sync = sync

    def __call__(self, input_ids, scores):
        if self.sync:
            torch.cuda.synchronize()
        self.t.append(time.perf_counter())
        return scores

    def deltas(self) -> list[float]:
        return [b - a for a, b in zip(self.t, self.t[1:])]


def counters_now():
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"], counters["inductor"]["cudagraph_skips"]


def kv_bytes_dense(cfg, batch: int, tokens: int, itemsize: int = 2) -> int:
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return 2 * cfg.num_hidden_layers * batch * cfg.num_key_value_heads * tokens * hd * itemsize


def largest_batch(bytes_per_seq: int, reserve: int, device) -> int:
    """Largest batch whose KV can actually be allocated next to the model and `reserve` bytes of
    working memory (activations, workspace): allocation-checked, not only computed."""
    if device == "cpu":
        return -1
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

    clock = StepTimes(sync=device != "cpu")
    g0 = counters_now()
    if device != "cpu":
        torch.cuda.reset_peak_memory_stats()
    out = model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                         logits_processor=LogitsProcessorList([clock]), **kw)
    g1 = counters_now()
    peak = torch.cuda.max_memory_allocated() if device != "cpu" else 0
    return out, clock.deltas(), dict(graphs_compiled=g1[0] - g0[0], cudagraph_skips=g1[1] - g0[1]), peak


def median_ms(d: list[float]) -> float:
    return statistics.median(d) * 1e3 if d else float("nan")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="llama-3.1-8b", choices=sorted(ARCHS))
    ap.add_argument("--layers", type=int, default=None, help="fewer layers than the real model")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--contexts", default="8192,32768", help="dense contexts N (comma separated)")
    ap.add_argument("--budget", type=int, default=2048)
    ap.add_argument("--raas-prompt", type=int, default=1024, help="prompt tokens for the raas runs (pinned)")
    ap.add_argument("--steps", type=int, default=64, help="timed decode steps per measurement")
    ap.add_argument("--raas-long", type=int, default=0, help="also decode raas up to this context, timing windows")
    ap.add_argument("--raas-batches", default="", help="extra raas batch sizes to run (e.g. the 8x dense batch)")
    ap.add_argument("--skip-dense", action="store_true")
    ap.add_argument("--dense-reserve-gb", type=float, default=None,
                    help="with --skip-dense: still allocation-check the largest dense batch at each context, "
                         "reserving this much working memory (peak - weights - KV of an earlier dense run)")
    ap.add_argument("--prefill-chunk", type=int, default=4096)
    ap.add_argument("--smoke", action="store_true", help="tiny CPU run (checks the script, no timing claims)")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = ap.parse_args(argv)
    if args.smoke:
        device, dtype = "cpu", torch.float32
        args.layers, args.batch, args.budget, args.raas_prompt, args.steps = 2, 2, 64, 16, 4
        contexts, args.prefill_chunk = [96], 32
    else:
        if not torch.cuda.is_available():
            ap.error("needs CUDA (use --smoke on CPU)")
        device, dtype = "cuda", torch.bfloat16
        contexts = [int(x) for x in args.contexts.split(",") if x]
    torch._dynamo.config.cache_size_limit = 256
    model = build(args.arch, args.layers, device, dtype) if not args.smoke else _tiny(device)
    model.generation_config.pad_token_id = 0
    cfg = model.config
    gen = torch.Generator(device).manual_seed(1)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    rows = []

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    partial = out / "long_context.partial.json"

    def emit(r):
        rows.append(r)
        partial.write_text(json.dumps(rows, indent=1))  # survives a timeout
        tqdm.write(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()}))

    B = args.batch
    for N in ([] if args.skip_dense else tqdm(contexts, desc="dense contexts")):
        ids = torch.randint(100, 1000, (B, N - args.steps), device=device, generator=gen)
        kw = dict(cache_implementation="static", prefill_chunk_size=args.prefill_chunk)
        try:
            model.generate(ids, max_new_tokens=args.steps, min_new_tokens=args.steps, do_sample=False, **kw)
            _, d, comp, peak = generate_timed(model, ids, args.steps, device, **kw)
        except torch.OutOfMemoryError as e:
            emit(dict(mode="dense static compiled", B=B, N=N, error=f"OOM: {str(e)[:120]}"))
            torch.cuda.empty_cache()
            continue
        ms = median_ms(d[len(d) // 4:])
        kvb = kv_bytes_dense(cfg, B, N)
        # generate keeps its static cache on the model for reuse: drop it before probing memory
        for attr in ("_cache", "_static_cache"):
            if hasattr(model, attr):
                setattr(model, attr, None)
        if device != "cpu":
            import gc

            gc.collect()
            torch.cuda.empty_cache()
        per_seq = kv_bytes_dense(cfg, 1, N)
        emit(dict(mode="dense static compiled", B=B, N=N, ms_per_step=ms, tokens_per_s=B / ms * 1e3,
                  peak_gb=peak / 2**30, kv_gb=kvb / 2**30, **comp,
                  max_batch_kv_fits=largest_batch(per_seq, max(peak - weights - kvb, 0), device)))
        del ids
        if device != "cpu":
            torch.cuda.empty_cache()

    if args.skip_dense and args.dense_reserve_gb is not None and device != "cpu":
        for N in contexts:
            emit(dict(mode="dense static compiled (allocation check only)", B=0, N=N,
                      reserve_gb=args.dense_reserve_gb, kv_gb_per_seq=kv_bytes_dense(cfg, 1, N) / 2**30,
                      max_batch_kv_fits=largest_batch(kv_bytes_dense(cfg, 1, N), int(args.dense_reserve_gb * 2**30), device)))
    L, P0 = args.budget, args.raas_prompt
    raas_batches = [B] + [int(x) for x in args.raas_batches.split(",") if x]
    for b in tqdm(raas_batches, desc="raas batches"):
        ids = torch.randint(100, 1000, (b, P0), device=device, generator=gen)
        # decode until every step evicts (buffer full), then time `steps` steps
        fill = L - P0 + 32
        new = fill + args.steps if not (args.raas_long and b == B) else max(args.raas_long - P0, fill + args.steps)
        with raas_flex.patched(model, budget=L):
            try:
                model.generate(ids, max_new_tokens=48, min_new_tokens=48, do_sample=False)  # compile + graphs
                _, d, comp, peak = generate_timed(model, ids, new, device)
                st = raas_flex.stats(model)
            except torch.OutOfMemoryError as e:
                emit(dict(mode=f"raas budget={L}", B=b, error=f"OOM: {str(e)[:120]}"))
                torch.cuda.empty_cache()
                continue
        # d[i] is the time of decode step i+1, at context P0 + i + 2
        full = [x for i, x in enumerate(d) if P0 + i + 2 > L + 16]
        ms = median_ms(full[-args.steps:])
        row = dict(mode=f"raas budget={L}", B=b, prompt=P0, decoded=new, ms_per_step=ms, tokens_per_s=b / ms * 1e3,
                   peak_gb=peak / 2**30, kv_gb=st["kv_bytes"] / 2**30, evictions=st["evictions"], **comp)
        if args.raas_long and b == B:
            windows = {}
            for lo in sorted({L + 256, (P0 + new) // 2, P0 + new - 512}):
                w = [x for i, x in enumerate(d) if lo <= P0 + i + 2 < lo + 512]
                if w:
                    windows[f"ctx_{lo}-{lo + 512}"] = median_ms(w)
            row["ms_per_step_by_context"] = windows
        emit(row)
        if device != "cpu":
            row["max_batch_kv_fits"] = largest_batch(st["kv_bytes"] // b, max(peak - weights - st["kv_bytes"], 0), device)
        del ids

    meta = dict(command="python " + " ".join([os.path.relpath(__file__)] + (argv if argv is not None else sys.argv[1:])),
                device=torch.cuda.get_device_name() if device != "cpu" else "cpu", torch=torch.__version__,
                transformers=__import__("transformers").__version__, arch=args.arch,
                layers=cfg.num_hidden_layers, weights_gb=weights / 2**30, time=time.strftime("%Y-%m-%d %H:%M:%S"))
    partial.unlink()
    tag = "smoke" if args.smoke else f"{args.arch}_B{B}"
    (out / f"long_context_{tag}.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    lines = ["| mode | B | context | ms/step | tokens/s | KV GB | peak GB | graphs compiled (timed run) | largest batch (KV fits) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "ms_per_step" not in r and "error" not in r:
            lines.append(f"| {r['mode']} | - | {r['N']} | | | {r['kv_gb_per_seq']:.2f}/seq | | | {r['max_batch_kv_fits']} |")
            continue
        if "error" in r:
            lines.append(f"| {r['mode']} | {r['B']} | {r.get('N', '-')} | {r['error']} | | | | | |")
            continue
        ctx = r.get("N", f"any >= {L} (flat)")
        lines.append(f"| {r['mode']} | {r['B']} | {ctx} | {r['ms_per_step']:.2f} | {r['tokens_per_s']:.0f} | "
                     f"{r['kv_gb']:.2f} | {r['peak_gb']:.1f} | {r['graphs_compiled']} | {r.get('max_batch_kv_fits', '-')} |")
    (out / f"long_context_{tag}.md").write_text(f"{meta}\n\n" + "\n".join(lines) + "\n")
    print("\n".join(lines))
    return rows


def _tiny(device):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=1024, max_position_embeddings=4096)
    return LlamaForCausalLM(cfg).to(device).eval()


if __name__ == "__main__":
    main()
