"""Generate with RaaS under a Hugging Face causal LM and report the KV memory it used.

    python examples/generate.py                        # embedded default: the ledger testbed model
    python examples/generate.py --model milestone      # the milestone (or the older lag: testbed) model
    python examples/generate.py --model tiny           # a tiny random Qwen2-shaped model (mechanics only)
    python examples/generate.py --model Qwen/Qwen3-0.6B --prompt "..." --budget 1024 --new 4096
    python examples/generate.py --budget 288 --option importance=attention \
        --option refresh=threshold --option refresh_threshold=0.01   # RaaS's threshold variant

The embedded default is models/ledger, a 3.8M-parameter Llama trained on raas_flex.ledger (chains of
~2,000 tokens that read each ledger for ~1,300 tokens after writing it; docs/testbed.md), the task on which
recency, H2O and StreamingLLM fail at a quarter of the chain. It solves a held-out problem densely,
then under the chosen policy and budget, and prints both answers against the reference and the KV
memory each used.
"""

from __future__ import annotations

import argparse
from pathlib import Path
import time
import warnings

import torch

import raas_flex
from raas_flex.config import parse_options


def tiny_default_model():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(
        vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=8, num_key_value_heads=2, head_dim=16, max_position_embeddings=8192,
        use_sliding_window=False, tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    return Qwen2ForCausalLM(cfg).eval(), None


MODELS = Path(__file__).resolve().parents[1] / "models"


def task_problem(task: str, seed: int):
    """One held-out problem of a testbed task and the tokens its longest chain can take."""
    from raas_flex import ledger, testbed

    make, spec = {"ledger": (ledger.ledger_dataset, ledger.LEDGER_SPEC),
                  "milestone": (testbed.milestone_dataset, testbed.MILESTONE_SPEC),
                  "testbed": (testbed.dataset, testbed.DEFAULT_SPEC)}[task]
    return make(1, seed=seed, spec=spec)[0], spec.cot_tokens(spec.max_lines) + 8


def run_testbed(args, device) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from raas_flex.testbed import parse_answer

    path = MODELS / args.model
    if not (path / "config.json").exists():
        raise SystemExit(f"the {args.model} model is missing at {path}; pass --model tiny or a hub id/path")
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device).eval()
    problem, new = task_problem(args.model, args.problem_seed)
    enc = tok(problem.question, return_tensors="pt").to(device)
    print(f"question ({enc.input_ids.shape[1]} tokens): {problem.question.strip()}")
    print(f"reference: {len(problem.cot)}-token chain, answer {problem.answer}")
    c = model.config
    per_token = 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * 4
    runs = [("dense", None)] if not args.no_dense else []
    runs.append((args.policy, args.budget))
    for name, budget in runs:
        t0 = time.perf_counter()
        if budget is None:
            out = model.generate(**enc, max_new_tokens=new, do_sample=False)
            kv = per_token * out.shape[1]
        else:
            with raas_flex.patched(model, budget=budget, policy=name, **args.options):
                out = model.generate(**enc, max_new_tokens=new, do_sample=False)
                kv = raas_flex.stats(model)["kv_bytes"]
        text = tok.decode(out[0, enc.input_ids.shape[1]:], skip_special_tokens=True)
        got = parse_answer(text)
        label = name if budget is None else f"{name} budget={budget}" + "".join(
            f" {k}={v}" for k, v in args.options.items())
        print(f"{label:>22}: answer {got} ({'correct' if got == problem.answer else 'WRONG'}), "
              f"{len(text)} tokens, {time.perf_counter() - t0:.1f} s, KV {kv / 2**20:.3f} MiB")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="ledger",
                    help="a testbed model: 'ledger' (default), 'milestone' or 'testbed' (models/<name>); 'tiny' "
                         "(random weights); or a hub id / local path")
    ap.add_argument("--problem-seed", type=int, default=7, help="testbed: which held-out problem")
    ap.add_argument("--no-dense", action="store_true", help="testbed: skip the dense reference run")
    ap.add_argument("--prompt", default="Solve step by step: what is 17 * 23 + 5?")
    ap.add_argument("--budget", type=int, default=None,
                    help="KV token slots per sequence and head (default: a quarter of a ledger or milestone chain, "
                         "496; half a lag-testbed chain, 576; 64 otherwise)")
    ap.add_argument("--policy", default="raas", choices=raas_flex.POLICIES)
    ap.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                    help="an option of the policy (e.g. refresh_ratio=0.25, sink_tokens=16) or of the cache "
                         "(e.g. page_size=16, backend=torch); repeatable. raas_flex.make_config says which "
                         "options a policy takes")
    ap.add_argument("--new", type=int, default=256, help="tokens to generate")
    args = ap.parse_args(argv)
    args.options = parse_options(args.option)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    # On CPU raas_flex runs flex_attention eagerly by design (compile_flex=None); torch warns about it.
    warnings.filterwarnings("ignore", "flex_attention called without torch.compile")
    if args.model in ("ledger", "milestone", "testbed"):
        args.budget = args.budget if args.budget is not None else 576 if args.model == "testbed" else 496
        return run_testbed(args, device)
    args.budget = 64 if args.budget is None else args.budget
    if args.model == "tiny":
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

    with raas_flex.patched(model, budget=args.budget, policy=args.policy, **args.options):
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
