"""raas_flex.greedy_decode: the lean decode loop gives generate's greedy tokens (CPU eager, CPU compiled
with aot_eager, CUDA with generate's own compile), stops as generate stops, and rejects bad input.

Models are test_hf.py's tiny seeded transformers models (fp32, 2 layers)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import raas_flex
from hf_batches import HUB_KERNELS_EXTRA_GRAPHS, greedy, prompts, replays_without_compiling
from test_hf import make_model

pytestmark = pytest.mark.usefixtures("one_thread", "unpatch_everything")


@pytest.mark.parametrize("policy,options", [("raas", {}), ("raas", {"importance": "attention"}), ("quest", {}),
                                            ("h2o", {}), ("streaming", {})])
def test_greedy_decode_is_generate(policy, options):
    """Left-padded batch, a budget the chain overruns several times over (every policy evicts or, for
    quest, narrows): the same tokens as the patched generate."""
    model = make_model("llama", seed=51)
    raas_flex.patch(model, budget=24, page_size=8, policy=policy, **options)
    ids, mask = prompts([5, 11], seed=52)
    ref = greedy(model, ids, mask, 70)
    out = raas_flex.greedy_decode(model, ids, 70, attention_mask=mask)
    assert torch.equal(out, ref)
    if policy != "quest":
        assert raas_flex.stats(model)["evictions"] > 0


@settings(max_examples=8)
@given(row=st.integers(0, 1), step=st.integers(0, 69), min_new=st.integers(0, 40))
def test_greedy_decode_stops_as_generate(row, step, min_new):
    """The eos id is a token that the chain of `row` emits at `step`: rows that finish are padded, the
    output ends where the last row finished, and min_new_tokens holds eos back, as in generate."""
    model = make_model("qwen2", seed=53)
    raas_flex.patch(model, budget=24, page_size=8)
    ids, mask = prompts([6, 9], seed=54)
    plain = greedy(model, ids, mask, 70)
    eos = int(plain[row, ids.shape[1] + step])
    model.generation_config.eos_token_id = eos
    try:
        ref = greedy(model, ids, mask, 70, min_new_tokens=min_new)
        out = raas_flex.greedy_decode(model, ids, 70, attention_mask=mask, min_new_tokens=min_new)
    finally:
        model.generation_config.eos_token_id = None
    assert torch.equal(out, ref)
    assert out.shape[1] <= ids.shape[1] + 70


def test_greedy_decode_compiled_once():
    """The compiled path (generate's compiled call, forced on CPU through an aot_eager CompileConfig)
    gives the eager tokens and compiles nothing after a warm-up, also for a second prompt; without a
    compile_config it takes the model's generation config's, as generate does."""
    from transformers import CompileConfig

    model = make_model("llama", seed=55)
    raas_flex.patch(model, budget=24, page_size=8)
    ids, mask = prompts([5, 11], seed=56)
    ids2, mask2 = prompts([8, 3], seed=57)
    ref = raas_flex.greedy_decode(model, ids, 60, attention_mask=mask, compile=False)
    ref2 = raas_flex.greedy_decode(model, ids2, 10, attention_mask=mask2, compile=False)
    config = CompileConfig(backend="aot_eager", fullgraph=True, dynamic=False, mode=None)
    counters = torch._dynamo.utils.counters
    torch._dynamo.reset()
    counters.clear()
    try:
        for _ in range(2):  # see HUB_KERNELS_EXTRA_GRAPHS
            raas_flex.greedy_decode(model, ids, 3, attention_mask=mask, compile=True, compile_config=config)
        warm = counters["stats"]["unique_graphs"]
        with torch._dynamo.config.patch(error_on_recompile=True):
            out = raas_flex.greedy_decode(model, ids, 60, attention_mask=mask, compile=True, compile_config=config)
            out2 = raas_flex.greedy_decode(model, ids2, 10, attention_mask=mask2, compile=True, compile_config=config)
            model.generation_config.compile_config = config  # no compile_config: the model's, as generate
            out3 = raas_flex.greedy_decode(model, ids2, 10, attention_mask=mask2, compile=True)
        graphs = counters["stats"]["unique_graphs"]
        used = model._last_compile_config
    finally:
        torch._dynamo.reset()
        model.generation_config.compile_config = None
        for name in ("_compiled_call", "_last_compile_config"):
            model.__dict__.pop(name, None)
    assert 1 <= warm <= HUB_KERNELS_EXTRA_GRAPHS + 1 and graphs == warm
    assert torch.equal(out, ref) and torch.equal(out2, ref2) and torch.equal(out3, ref2)
    assert used is config


def test_greedy_decode_warns_about_processors_it_does_not_run():
    model = make_model("llama", seed=58)
    raas_flex.patch(model, budget=24, page_size=8)
    ids, mask = prompts([5], seed=59)
    model.generation_config.repetition_penalty = 1.1
    with pytest.warns(UserWarning, match=r"repetition_penalty=1.1"):
        raas_flex.greedy_decode(model, ids, 2, attention_mask=mask)


@pytest.mark.parametrize("kwargs,match", [
    (dict(max_new_tokens=0), "max_new_tokens must be an int >= 1, got 0"),
    (dict(max_new_tokens=2.0), "max_new_tokens must be an int >= 1, got 2.0"),
    (dict(min_new_tokens=-1), "min_new_tokens must be an int >= 0, got -1"),
    (dict(compile="yes"), "compile must be True, False or None"),
    (dict(eos_token_id=[]), r"eos_token_id must be a non-negative int, a non-empty list of them, or None, got \[\]"),
    (dict(pad_token_id=-3), "pad_token_id must be a non-negative int or None, got -3"),
    (dict(attention_mask=torch.ones(1, 2, dtype=torch.long)), r"attention_mask must be a tensor of input_ids' shape \(1, 5\)"),
    (dict(input_ids=torch.ones(5, dtype=torch.long)), r"input_ids must be a \[batch, prompt\] LongTensor"),
])
def test_greedy_decode_bad_input(kwargs, match):
    model = make_model("llama", seed=60)
    raas_flex.patch(model, budget=24, page_size=8)
    args = dict(input_ids=prompts([5], seed=61)[0], max_new_tokens=4) | kwargs
    with pytest.raises(ValueError, match=match):
        raas_flex.greedy_decode(model, **args)


def test_greedy_decode_needs_a_patched_model():
    model = make_model("llama", seed=62)
    with pytest.raises(ValueError, match="greedy_decode needs a model patched by raas_flex.patch"):
        raas_flex.greedy_decode(model, prompts([5])[0], 4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("policy", ["raas", "h2o", "streaming"])
def test_gpu_greedy_decode_is_compiled_generate(policy):
    """On CUDA both compile the decode forward with CUDA graphs (generate's compiled call): the same
    tokens as generate, and nothing compiles or skips CUDA graphs after the warm-up."""
    model = make_model("llama", seed=63).cuda()
    raas_flex.patch(model, budget=64, page_size=16, policy=policy)
    ids, mask = (t.cuda() for t in prompts([12, 7], seed=64))

    def warm_up():
        ref = greedy(model, ids, mask, 150)
        for _ in range(2):
            raas_flex.greedy_decode(model, ids, 4, attention_mask=mask)
        return ref

    ref, out = replays_without_compiling(model, warm_up,
                                         lambda: raas_flex.greedy_decode(model, ids, 150, attention_mask=mask))
    assert torch.equal(out, ref)
    assert raas_flex.stats(model)["evictions"] > 0
