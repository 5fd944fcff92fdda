"""Trace a generation's attention and draw the paper's waterfall maps; classify the heads.

    python examples/trace_attention.py                          # embedded tiny model (random weights)
    python examples/trace_attention.py --model path/or/hub-id --prompt "..." --new 2048 --budget 1024 \
        --layers 0 13 27 --heads 0 --out figs
    python examples/trace_attention.py --model testbed-model --task testbed --new 1400 --budget 256
    python examples/trace_attention.py --model models/milestone --task milestone --new 2400 --budget 496
    python examples/trace_attention.py --model runs/ledger --task ledger --new 2400 --budget 512

Two traced generations of the same prompt:

1. ``policy="dense"`` (every token kept): the model's own attention. Its maps are classified
   (milestone-like / streaming-like / phoenix-bearing / other, see docs/tracing.md) over every layer
   and KV head: ``summary.json`` and a printed table; ``waterfall_dense_L{l}_H{h}.png`` for the
   chosen layers/heads; ``trace_dense.pt``.
2. ``--policy`` (raas by default) at ``--budget``: the same maps with the policy's evictions overlaid,
   ``waterfall_{policy}_L{l}_H{h}.png`` and ``trace_{policy}.pt`` (skipped when --policy dense).

The embedded default is examples/generate.py's tiny Qwen2-shaped model with random weights (no model
hub is reachable where this project is tested): its maps show the mechanics, not reasoning.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings

import torch

import raas_flex
from raas_flex import plots

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from generate import tiny_default_model  # noqa: E402  (the same embedded model as examples/generate.py)


class _Progress:
    """A stopping criterion that never stops: it only advances a tqdm bar, one tick per token."""

    def __init__(self, total: int, desc: str, enabled: bool) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, desc=desc, unit="tok", disable=not enabled)

    def __call__(self, input_ids, scores, **kwargs):
        self.bar.update(1)
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    def close(self) -> None:
        self.bar.close()


def load(args):
    """(model, tokenizer or None, input_ids [1, n])."""
    if args.model is None:
        model, tok = tiny_default_model()
        g = torch.Generator().manual_seed(args.seed)
        return model, None, torch.randint(0, model.config.vocab_size, (1, 24), generator=g)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.model)
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).eval()
    if args.task is not None:  # one held-out problem of a testbed task
        from raas_flex.ledger import ledger_dataset
        from raas_flex.testbed import dataset, milestone_dataset

        make = {"testbed": dataset, "milestone": milestone_dataset, "ledger": ledger_dataset}[args.task]
        prompt = make(1, seed=args.seed)[0].question
    elif args.prompt_file is not None:
        with open(args.prompt_file) as f:
            prompt = f.read()
    else:
        prompt = args.prompt
    return model, tok, tok(prompt, return_tensors="pt").input_ids


def run(model, tok, input_ids, args, policy: str):
    """One traced greedy generation under ``policy``: (trace, new token ids, stats)."""
    from transformers import StoppingCriteriaList

    progress = _Progress(args.new, f"{policy:>9}", not args.no_progress)
    gen = dict(max_new_tokens=args.new, do_sample=False, min_new_tokens=args.new if tok is None else 0,
               stopping_criteria=StoppingCriteriaList([progress]))
    if tok is not None and tok.pad_token_id is None:
        gen["pad_token_id"] = tok.eos_token_id
    try:
        with raas_flex.patched(model, budget=args.budget, policy=policy, page_size=args.page_size):
            with raas_flex.tracing(model, max_steps=args.new, group=args.group) as trace:
                out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), **gen)
            st = raas_flex.stats(model)
    finally:
        progress.close()
    return trace, out[0, input_ids.shape[1]:], st


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="hub id or local path (default: embedded tiny model)")
    ap.add_argument("--prompt", default="Solve step by step: what is 17 * 23 + 5?")
    ap.add_argument("--prompt-file", default=None, help="read the prompt from this file")
    ap.add_argument("--task", default=None, choices=["testbed", "milestone", "ledger"],
                    help="a held-out question of the lag task (testbed), the milestone task or the ledger task")
    ap.add_argument("--seed", type=int, default=1, help="prompt seed (tiny model, --task)")
    ap.add_argument("--budget", type=int, default=64, help="KV token slots per sequence and head")
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--policy", default="raas", choices=raas_flex.POLICIES, help="policy drawn with its evictions")
    ap.add_argument("--new", type=int, default=256, help="tokens to generate")
    ap.add_argument("--group", default="mean", choices=raas_flex.trace.GROUPS, help="GQA group reduction")
    ap.add_argument("--layers", type=int, nargs="+", default=[0], help="layers to draw")
    ap.add_argument("--heads", type=int, nargs="+", default=[0], help="KV heads to draw")
    ap.add_argument("--tau", type=float, default=0.05, help="classification: activity threshold")
    ap.add_argument("--gap-steps", type=int, default=None, help="classification: phoenix gap (default: --budget)")
    ap.add_argument("--out", default="trace_out", help="output folder")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)

    warnings.filterwarnings("ignore", "flex_attention called without torch.compile")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tok, input_ids = load(args)
    model.to(device)
    input_ids = input_ids.to(device)
    os.makedirs(args.out, exist_ok=True)
    members = range(model.config.num_attention_heads // model.config.num_key_value_heads) if args.group == "each" else [0]

    policies = ["dense"] + ([args.policy] if args.policy != "dense" else [])
    for policy in policies:
        trace, new, st = run(model, tok, input_ids, args, policy)
        trace.save(os.path.join(args.out, f"trace_{policy}.pt"))
        for layer in args.layers:
            for head in args.heads:
                for m in members:
                    suffix = f"_M{m}" if args.group == "each" else ""
                    path = os.path.join(args.out, f"waterfall_{policy}_L{layer}_H{head}{suffix}.png")
                    plots.waterfall(trace, layer, head, path, member=m)
                    print(f"wrote {path}")
        text = tok.decode(new, skip_special_tokens=True) if tok is not None else " ".join(map(str, new[:32].tolist())) + " ..."
        print(f"[{policy}] {len(new)} new tokens, {trace.steps} steps traced, pages evicted (summed over layers): "
              f"{st['evictions']}; output: {text[:300]!r}")
        if policy == "dense":
            summary = raas_flex.classify_heads(trace, tau=args.tau, gap_steps=args.gap_steps)
            summary["model"] = args.model or "embedded tiny model (random weights)"
            with open(os.path.join(args.out, "summary.json"), "w") as f:
                json.dump(summary, f, indent=1)
            print(raas_flex.summary_table(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
