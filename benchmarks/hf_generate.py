"""End-to-end generate() on real architecture shapes with random weights (no hub access needed).

Compares, in one run on one GPU: transformers dense (sdpa, dynamic cache, eager), transformers
dense with a static cache (auto-compiled with CUDA graphs by generate), and raas_flex.patch with
each requested policy. Reports ms per decode step (median over the second half of the generation), peak GPU memory, the KV bytes the raas_flex cache allocated, and for a budget
that holds the whole sequence the share of greedy tokens identical to dense.

    python benchmarks/hf_generate.py --arch qwen2.5-1.5b --prompt 512 --new 512 --budget 256
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import raas_flex  # noqa: E402
from raas_flex.config import parse_spec  # noqa: E402

ARCHS = {
    # name: (family, hidden, intermediate, layers, heads, kv_heads, vocab)
    "qwen2.5-1.5b": ("qwen2", 1536, 8960, 28, 12, 2, 151936),
    "qwen2.5-7b": ("qwen2", 3584, 18944, 28, 28, 4, 152064),
    "llama-3.1-8b": ("llama", 4096, 14336, 32, 32, 8, 128256),
    # MoE of 32 experts, 4 a token; head_dim 64; layers alternate a window of 128 and full attention, every
    # layer with learned sinks
    "gpt-oss-20b": ("gpt_oss", 2880, 2880, 24, 64, 8, 201088),
    "qwen3-8b": ("qwen3", 4096, 12288, 36, 32, 8, 151936),
    # no GQA (32 KV heads); three of every four layers a window of 4096
    "olmo-3-7b": ("olmo3", 4096, 11008, 32, 32, 32, 100278),
}


def build(arch: str, layers: int | None, device, dtype):
    from transformers import (GptOssConfig, GptOssForCausalLM, LlamaConfig, LlamaForCausalLM, Olmo3Config,
                              Olmo3ForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM)

    fam, hid, inter, nl, nh, nkv, vocab = ARCHS[arch]
    kw = dict(hidden_size=hid, intermediate_size=inter, num_hidden_layers=layers or nl, num_attention_heads=nh,
              num_key_value_heads=nkv, vocab_size=vocab, max_position_embeddings=131072)
    if fam == "qwen2":
        cfg, cls = Qwen2Config(**kw, use_sliding_window=False), Qwen2ForCausalLM
    elif fam == "gpt_oss":
        cfg, cls = GptOssConfig(**kw, head_dim=64, num_local_experts=32, num_experts_per_tok=4, sliding_window=128,
                                layer_types=["sliding_attention" if i % 2 == 0 else "full_attention"
                                             for i in range(layers or nl)]), GptOssForCausalLM
    elif fam == "qwen3":
        cfg, cls = Qwen3Config(**kw, head_dim=128), Qwen3ForCausalLM
    elif fam == "olmo3":
        cfg, cls = Olmo3Config(**kw, sliding_window=4096,
                               layer_types=["full_attention" if i % 4 == 3 else "sliding_attention"
                                            for i in range(layers or nl)]), Olmo3ForCausalLM
    else:
        cfg, cls = LlamaConfig(**kw), LlamaForCausalLM
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in its dtype: gpt-oss-20b in fp32 would not fit one GPU
    try:
        with torch.device(device):
            model = cls(cfg).to(dtype).eval()
    finally:
        torch.set_default_dtype(default)
    return model


class StepClock:
    """Logits processor recording a host timestamp per decode step. generate waits for each step's
    end-of-sequence flag (for a RaaS cache on CUDA one step late), so the host runs at most a step
    ahead of the GPU and in steady state the stamps' spacing is the step time. No synchronize here:
    it would put back the per-token host sync that the deferred check removes."""

    def __init__(self):
        self.t: list[float] = []

    def __call__(self, input_ids, scores):
        self.t.append(time.perf_counter())
        return scores

    def deltas(self) -> list[float]:
        return [b - a for a, b in zip(self.t, self.t[1:])]


def measure(model, ids, new, **kw):
    """Median ms per decode step over the second half of a generation (after warm-up), the output,
    and peak GPU memory."""
    from transformers import LogitsProcessorList

    gen = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, **kw)
    from torch._dynamo.utils import counters

    model.generate(ids, **gen)  # warm-up: compile, CUDA graphs, allocator
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    graphs, skips = counters["stats"]["unique_graphs"], counters["inductor"]["cudagraph_skips"]
    clock = StepClock()
    out = model.generate(ids, logits_processor=LogitsProcessorList([clock]), **gen)
    d = sorted(b - a for a, b in zip(clock.t[len(clock.t) // 2:], clock.t[len(clock.t) // 2 + 1:]))
    extra = dict(graphs_compiled_after_warmup=counters["stats"]["unique_graphs"] - graphs,
                 cudagraph_skips_after_warmup=counters["inductor"]["cudagraph_skips"] - skips,
                 graphs_total=counters["stats"]["unique_graphs"])
    return out, d[len(d) // 2] * 1e3, torch.cuda.max_memory_allocated(), extra


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="qwen2.5-1.5b", choices=sorted(ARCHS))
    ap.add_argument("--layers", type=int, default=None, help="fewer layers than the real model (faster)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--new", type=int, default=512)
    ap.add_argument("--budget", type=int, default=256)
    ap.add_argument("--policies", default="raas",
                    help="semicolon-separated configurations, POLICY or POLICY:KEY=VALUE,... "
                         "(e.g. 'raas;raas:backend=torch')")
    ap.add_argument("--check-layers", type=int, default=None,
                    help="layers of the fp32 model that checks raas against dense (default: --layers; fewer "
                         "for a model whose fp32 copy does not fit, e.g. the whole gpt-oss-20b)")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = ap.parse_args(argv)
    if args.check_layers is not None and args.check_layers < 1:
        ap.error(f"--check-layers must be >= 1, got {args.check_layers}")
    if not torch.cuda.is_available():
        ap.error("needs CUDA")
    dev, dt = "cuda", torch.bfloat16
    model = build(args.arch, args.layers, dev, dt)
    model.generation_config.pad_token_id = 0
    ids = torch.randint(100, 1000, (args.batch, args.prompt), device=dev, generator=torch.Generator(dev).manual_seed(1))
    rows = []

    class Rows(list):  # print each result as soon as it exists (long runs)
        def append(self, r):
            print(json.dumps(r), flush=True)
            super().append(r)

    rows = Rows()

    dense_out, ms, peak, extra = measure(model, ids, args.new)
    rows.append(dict(mode="dense sdpa (dynamic cache, eager)", ms_per_step=ms, peak_gb=peak / 2**30, **extra))
    try:
        _, ms, peak, extra = measure(model, ids, args.new, cache_implementation="static")
        rows.append(dict(mode="dense sdpa (static cache, compiled)", ms_per_step=ms, peak_gb=peak / 2**30, **extra))
    except Exception as e:  # reported, not hidden
        rows.append(dict(mode="dense sdpa (static cache, compiled)", error=repr(e)[:300]))

    for policy in args.policies.split(";"):
        name, options = parse_spec(policy)
        with raas_flex.patched(model, budget=args.budget, policy=name, **options):
            out, ms, peak, extra = measure(model, ids, args.new)
            st = raas_flex.stats(model)
        rows.append(dict(mode=f"raas_flex {policy} budget={args.budget}", ms_per_step=ms, peak_gb=peak / 2**30,
                         kv_bytes=st["kv_bytes"], evictions=st["evictions"], **extra))
    # equivalence in fp32 (bf16 greedy decoding of a random model flips near-tied logits between
    # any two kernels): a budget holding the whole sequence gives dense attention
    if args.check_layers is None:
        model.float()
    else:  # a fresh model of fewer layers, so the fp32 copy fits
        del model
        torch.cuda.empty_cache()
        model = build(args.arch, args.check_layers, dev, torch.float32)
        model.generation_config.pad_token_id = 0
    n_eq = min(args.new, 128)
    full = -(-(args.prompt + n_eq + 16) // 16) * 16
    gen_kw = dict(max_new_tokens=n_eq, min_new_tokens=n_eq, do_sample=False)
    ref = model.generate(ids, **gen_kw)[:, args.prompt:]
    with raas_flex.patched(model, budget=full):
        gen = model.generate(ids, **gen_kw)[:, args.prompt:]
    first_diff = (gen != ref).float().argmax(-1).tolist() if (gen != ref).any() else [n_eq] * args.batch
    rows.append(dict(mode=f"fp32: raas budget={full} vs dense greedy tokens ({n_eq} new, "
                     f"{model.config.num_hidden_layers} layers)", identical_prefix=first_diff,
                     identical_share=(gen == ref).float().mean().item()))

    meta = dict(command="python " + " ".join([os.path.relpath(__file__)] + (argv if argv is not None else sys.argv[1:])),
                device=torch.cuda.get_device_name(), torch=torch.__version__,
                transformers=__import__("transformers").__version__, arch=args.arch,
                layers=args.layers or ARCHS[args.arch][3],
                batch=args.batch, prompt=args.prompt, new=args.new)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"hf_generate_{args.arch}.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))


if __name__ == "__main__":
    main()
