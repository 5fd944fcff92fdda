"""Generate with RaaS under a Hugging Face causal LM and report the KV memory it used.

    python examples/generate.py                        # embedded default: a tiny Qwen2-shaped model
    python examples/generate.py --model Qwen/Qwen3-0.6B --prompt "..." --budget 1024 --new 4096

The embedded default has random weights (no model hub is reachable where this project is tested),
so its tokens carry no meaning: it shows the mechanics (the same tokens as dense attention while the
budget holds everything, then a KV cache that stays at the budget however long the generation).
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch

import raas_flex


def tiny_default_model():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(
        vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=8, num_key_value_heads=2, head_dim=16, max_position_embeddings=8192,
        use_sliding_window=False, tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    return Qwen2ForCausalLM(cfg).eval(), None


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="hub id or local path (default: embedded tiny model)")
    ap.add_argument("--prompt", default="Solve step by step: what is 17 * 23 + 5?")
    ap.add_argument("--budget", type=int, default=64, help="KV token slots per sequence and head")
    ap.add_argument("--policy", default="raas", choices=raas_flex.POLICIES)
    ap.add_argument("--new", type=int, default=256, help="tokens to generate")
    args = ap.parse_args(argv)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    # On CPU raas_flex runs flex_attention eagerly by design (compile_flex=None); torch warns about it.
    warnings.filterwarnings("ignore", "flex_attention called without torch.compile")
    if args.model is None:
        model, tok = tiny_default_model()
        input_ids = torch.randint(0, model.config.vocab_size, (1, 24), generator=torch.Generator().manual_seed(1))
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(args.model)
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16 if device == "cuda" else torch.float32)
        input_ids = tok(args.prompt, return_tensors="pt").input_ids
    model.to(device)
    input_ids = input_ids.to(device)
    gen = dict(max_new_tokens=args.new, do_sample=False, min_new_tokens=args.new if tok is None else 0)

    with raas_flex.patched(model, budget=args.budget, policy=args.policy):
        t0 = time.perf_counter()
        out = model.generate(input_ids, **gen)
        dt = time.perf_counter() - t0
        st = raas_flex.stats(model)

    new = out[0, input_ids.shape[1]:]
    text = tok.decode(new, skip_special_tokens=True) if tok is not None else " ".join(map(str, new.tolist()))
    print(f"answer ({len(new)} tokens, {dt:.2f} s): {text}")
    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    total_tokens = input_ids.shape[1] + len(new)
    dense = 2 * c.num_hidden_layers * c.num_key_value_heads * head_dim * total_tokens * model.dtype.itemsize
    print(
        f"KV memory: {st['kv_bytes'] / 2**20:.3f} MiB allocated with policy={args.policy}, budget={args.budget} "
        f"over {c.num_hidden_layers} layers; a dense cache of {total_tokens} tokens takes {dense / 2**20:.3f} MiB"
    )

if __name__ == "__main__":
    main()
