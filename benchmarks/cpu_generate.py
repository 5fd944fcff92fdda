"""CPU: a patched ``model.generate`` against the unpatched one, in one process.

Times the shipped testbed model (models/testbed) decoding ``--new`` tokens greedily after a held-out
question, or with ``--gguf`` a real checkpoint (fetch_gguf.py's names) after a word problem in its chat
template, dense and patched at ``--budget``, each ``generate`` call timed whole. Round 1 is each
configuration's first call (its warm-up inside: what a user waits for); ``--rounds`` repeats the pair,
alternating which goes first, because a small shared CPU's speed drifts by tens of percent between
seconds: the ratio reported is the median of the rounds' ratios, round 1's is shown beside it.
Writes JSON and markdown under --out.

    python benchmarks/cpu_generate.py                         # 600 new tokens, budget 256
    python benchmarks/cpu_generate.py --new 2400 --tag long   # a sequence past the model's training length
    python benchmarks/cpu_generate.py --gguf qwen2.5-coder-0.5b-instruct --new 1024 --rounds 3 --tag qwen2.5-coder-0.5b
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import raas_flex  # noqa: E402
from raas_flex.config import parse_spec  # noqa: E402

TESTBED = Path(__file__).resolve().parents[1] / "models" / "testbed"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--new", type=int, default=600, help="new tokens per generate call")
    ap.add_argument("--budget", type=int, default=256)
    ap.add_argument("--configs", default="raas", help="semicolon-separated configurations (decode_step.py's names)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--rounds", type=int, default=5, help="dense/patched pairs timed (round 1 = first calls)")
    ap.add_argument("--gguf", metavar="MODEL", default=None,
                    help="a real checkpoint by fetch_gguf.py's name (fetched and verified on first use), fp32")
    ap.add_argument("--tag", default="default")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = ap.parse_args(argv)
    if args.new < 1:
        ap.error(f"--new must be >= 1, got {args.new}")
    if args.rounds < 1:
        ap.error(f"--rounds must be >= 1, got {args.rounds}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from raas_flex.testbed import dataset

    if args.gguf is None:
        tok = AutoTokenizer.from_pretrained(TESTBED)
        model = AutoModelForCausalLM.from_pretrained(TESTBED, dtype=torch.float32).eval()
        enc = tok(dataset(1, seed=7)[0].question, return_tensors="pt")
    else:
        from benchmarks import fetch_gguf, word_problems

        model, tok = fetch_gguf.load_gguf(fetch_gguf.fetch(args.gguf)["gguf"], dtype=torch.float32)
        enc = tok(word_problems.build_prompt(tok, word_problems.make_problem(0)), return_tensors="pt")
        model.generation_config.pad_token_id = tok.eos_token_id
    gen = dict(max_new_tokens=args.new, min_new_tokens=args.new, do_sample=False)

    def timed() -> tuple[float, torch.Tensor]:
        t = time.perf_counter()
        with torch.no_grad():
            out = model.generate(**enc, **gen)
        return time.perf_counter() - t, out

    configs = [c for c in args.configs.split(";") if c]
    seconds = {c: [] for c in ["dense"] + configs}
    outputs, kv = {}, {}

    def run(config: str) -> None:
        if config == "dense":
            s, outputs[config] = timed()
        else:
            name, options = parse_spec(config)
            with raas_flex.patched(model, budget=args.budget, policy=name, **options):
                s, outputs[config] = timed()
                kv[config] = raas_flex.stats(model)["kv_bytes"]
        seconds[config].append(s)

    from tqdm import tqdm

    calls = [(r, c) for r in range(args.rounds) for c in (list(seconds) if r % 2 == 0 else list(reversed(seconds)))]
    for _, config in tqdm(calls, desc="generate calls"):
        run(config)
    dense_s = seconds["dense"]
    rows = [dict(config="dense (unpatched)", seconds=dense_s, first=dense_s[0], median=statistics.median(dense_s),
                 ratio=1.0, first_ratio=1.0)]
    for spec in configs:
        ratios = [a / b for a, b in zip(seconds[spec], dense_s)]
        rows.append(dict(config=f"{spec} budget={args.budget}", seconds=seconds[spec], first=seconds[spec][0],
                         median=statistics.median(seconds[spec]), ratios=ratios, ratio=statistics.median(ratios),
                         first_ratio=ratios[0], kv_bytes=kv[spec],
                         same_tokens_as_dense=bool(torch.equal(outputs[spec], outputs["dense"]))))
    meta = dict(command="python " + " ".join([os.path.relpath(__file__)] + (argv if argv is not None else sys.argv[1:])),
                model=args.gguf or "testbed", torch=torch.__version__, threads=torch.get_num_threads(),
                cpu=platform.processor() or platform.machine(),
                cores=os.cpu_count(), prompt_tokens=enc.input_ids.shape[1], new_tokens=args.new, rounds=args.rounds,
                time=time.strftime("%Y-%m-%d %H:%M:%S"))
    lines = [f"CPU generate, {args.rounds} rounds in one process (round 1 = first calls, warm-up included). {meta}", "",
             "| configuration | round 1 s | / dense, round 1 | median s | / dense, median of rounds |", "|---|---|---|---|---|"]
    lines += [f"| {r['config']} | {r['first']:.2f} | {r['first_ratio']:.2f}x | {r['median']:.2f} | {r['ratio']:.2f}x |"
              for r in rows]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"cpu_generate_{args.tag}.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    (out / f"cpu_generate_{args.tag}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return rows


if __name__ == "__main__":
    main()
