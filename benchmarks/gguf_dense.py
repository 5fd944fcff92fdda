"""Dense greedy generation of a fetched GGUF checkpoint on seeded word problems (no KV policy).

    python benchmarks/gguf_dense.py --model qwen2.5-coder-0.5b-instruct --n 3 --seed 0 --max-new-tokens 600

Fetches (or reuses) the checkpoint with fetch_gguf.py, builds chat prompts with word_problems.py and
prints, per problem: steps, gold answer, prompt and generated token counts, whether EOS came, the
extracted answer, correctness and time; ``--out`` writes the rows (and the generated texts) as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fetch_gguf as fg  # noqa: E402
import word_problems as wp  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--cache-dir", type=Path, default=fg.DEFAULT_CACHE)
    ap.add_argument("--n", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-new-tokens", type=int, default=600)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    res = fg.fetch(args.model, args.cache_dir, progress=False)
    t = time.perf_counter()
    model, tok = fg.load_gguf(res["gguf"])
    print(f"load {time.perf_counter() - t:.1f} s, {torch.get_num_threads()} threads", flush=True)
    rows = []
    for p in wp.dataset(args.n, seed=args.seed):
        ids = tok(wp.build_prompt(tok, p), add_special_tokens=False, return_tensors="pt")
        t = time.perf_counter()
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=args.max_new_tokens, do_sample=False)
        dt = time.perf_counter() - t
        gen = out[0, ids.input_ids.shape[1]:]
        text = tok.decode(gen, skip_special_tokens=True)
        row = {"seed": p.seed, "steps": p.n_steps, "gold": p.answer, "prompt_tokens": ids.input_ids.shape[1],
               "new_tokens": len(gen), "eos": bool((gen == tok.eos_token_id).any()),
               "pred": wp._accuracy().extract_answer(text), "correct": wp.is_correct(p, text),
               "seconds": round(dt, 1), "tok_per_s": round(len(gen) / dt, 2)}
        print(json.dumps(row), flush=True)
        rows.append(dict(row, question=p.question, output=text))
    print(f"accuracy {sum(r['correct'] for r in rows)}/{len(rows)}")
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
