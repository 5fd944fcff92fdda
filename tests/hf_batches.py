"""Batches for the transformers-integration tests (test_hf.py, test_trace.py, ...): left-padded random
prompts over a 128-token vocabulary with pad id 0, greedy generation, and the no-recompile check of a
compiled decode."""

from __future__ import annotations

import torch

VOCAB, PAD = 128, 0
# transformers >= 5.25 wraps model forwards with the `kernels` package's context variable, which (kernels
# 0.19.1) leaves a global set after the first compiled call, so the second call of a compiled model forward
# compiles once more (the same constant as in test_hf.py). Tests that count the graphs of a compiled forward
# warm it up with two calls, allow this many extra graphs there, then require that nothing compiles again.
HUB_KERNELS_EXTRA_GRAPHS = 1


def prompts(lengths, seed: int = 1):
    """Left-padded batch of random prompts: (input_ids, attention_mask)."""
    g = torch.Generator().manual_seed(seed)
    n = max(lengths)
    ids = torch.full((len(lengths), n), PAD, dtype=torch.long)
    mask = torch.zeros(len(lengths), n, dtype=torch.long)
    for i, length in enumerate(lengths):
        ids[i, n - length:] = torch.randint(3, VOCAB, (length,), generator=g)
        mask[i, n - length:] = 1
    return ids, mask


def greedy(model, ids, mask, new: int, **kwargs):
    return model.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False, **kwargs)


def replays_without_compiling(model, warm_up, run):
    """``warm_up()`` from fresh compiles, then ``run()``, which must compile nothing more
    (``error_on_recompile``) and skip no CUDA graph; the model's compiled call is dropped after.
    Returns both results."""
    counters = torch._dynamo.utils.counters
    torch._dynamo.reset()
    try:
        first = warm_up()
        warm, skips = counters["stats"]["unique_graphs"], counters["inductor"]["cudagraph_skips"]
        with torch._dynamo.config.patch(error_on_recompile=True):
            out = run()
        assert counters["stats"]["unique_graphs"] == warm
        assert counters["inductor"]["cudagraph_skips"] == skips
    finally:
        torch._dynamo.reset()
        for name in ("_compiled_call", "_last_compile_config"):
            model.__dict__.pop(name, None)
    return first, out
