"""raas_flex.patch / unpatch / patched / stats / RaaSCache on tiny random transformers models (CPU, fp32).

Every model here: hidden 64, 2 layers, 4 query heads / 2 KV heads, head_dim 16, vocab 128, seeded weights
(initializer_range 0.1 so that greedy logits are well separated), attn_implementation "sdpa" before
patching. The references are the same models unpatched. Eager flex_attention is slow on CPU (~5-10 ms
per call), so generations are kept short except where the test is about length, and torch runs on one
thread for this module (tiny ops; the CI machine has 2 contended cores).
"""

from __future__ import annotations

import inspect
import subprocess
import sys

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
    StoppingCriteria,
    StoppingCriteriaList,
    T5Config,
    T5ForConditionalGeneration,
)
from transformers.cache_utils import DynamicCache
from transformers.generation import utils as generation
from transformers.masking_utils import AttentionMaskInterface
from transformers.modeling_utils import AttentionInterface

import raas_flex
from raas_flex import hf, hf_cache
from hf_batches import PAD, VOCAB, greedy, prompts

POLICIES = ("raas", "quest", "h2o", "streaming", "dense")
COMMON = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, max_position_embeddings=1024, initializer_range=0.1,
    bos_token_id=None, eos_token_id=None, pad_token_id=PAD, tie_word_embeddings=False,
)
FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM, {}),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, {"use_sliding_window": False}),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, {"use_sliding_window": False}),
    "mistral": (MistralConfig, MistralForCausalLM, {"sliding_window": None}),
}
LAYERS, HKV, D = 2, 2, 16


pytestmark = pytest.mark.usefixtures("one_thread", "unpatch_everything")


def make_model(family: str = "llama", seed: int = 0, **overrides):
    cfg_cls, model_cls, extra = FAMILIES[family]
    cfg = cfg_cls(**{**COMMON, **extra, **overrides})
    torch.manual_seed(seed)
    model = model_cls(cfg).eval()
    model.set_attn_implementation("sdpa")
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = PAD
    return model


ORIGINAL_STOP_CHECK = generation.DeferredStopCheck


def registered() -> bool:
    name = hf.ATTN_IMPLEMENTATION
    return (name in AttentionInterface._global_mapping or name in AttentionMaskInterface._global_mapping
            or generation.DeferredStopCheck is not ORIGINAL_STOP_CHECK)


def assert_pristine(model, registry: bool = True) -> None:
    """Nothing of the patch is left on the model (and, with ``registry``, in transformers' registries)."""
    assert model.config._attn_implementation == "sdpa"
    assert "_raas_flex" not in model.__dict__
    for name in ("generate", "_prepare_cache_for_generation"):
        assert name not in model.__dict__
    for m in model.modules():
        assert "_raas_flex" not in m.__dict__
    assert not (registry and registered())


# -- equivalence with the unpatched model while the budget holds everything -----------------------------
@pytest.mark.parametrize("family", list(FAMILIES))
def test_budget_holding_everything_matches_unpatched_per_family(family):
    model = make_model(family)
    ids, mask = prompts([7, 12])
    ref = greedy(model, ids, mask, 12)
    raas_flex.patch(model, budget=32, page_size=8)
    assert model.config._attn_implementation == hf.ATTN_IMPLEMENTATION
    out = greedy(model, ids, mask, 12)
    assert torch.equal(out, ref)
    st = raas_flex.stats(model)
    assert st["policy"] == "raas" and st["budget"] == 32 and len(st["layers"]) == LAYERS
    for layer in st["layers"]:
        # the last generated token is never fed back: prompt + new - 1 tokens written, none evicted
        assert layer["tokens"] == [7 + 11, 12 + 11]
        assert layer["resident_tokens"] == [7 + 11, 12 + 11]
        assert layer["evictions"] == [0, 0]
        assert layer["kv_bytes"] == 2 * 2 * HKV * 32 * D * 4
        assert layer["backend"] == "torch"  # the decode path it took: on CPU, the torch reference
    assert st["kv_bytes"] == sum(layer["kv_bytes"] for layer in st["layers"])


@pytest.mark.parametrize("policy", POLICIES)
def test_budget_holding_everything_matches_unpatched_per_policy(policy):
    model = make_model("qwen2", seed=3)
    ids, mask = prompts([5, 13], seed=4)
    ref = greedy(model, ids, mask, 12)
    raas_flex.patch(model, budget=32, page_size=8, policy=policy)
    assert torch.equal(greedy(model, ids, mask, 12), ref)
    st = raas_flex.stats(model)
    assert {layer["policy"] for layer in st["layers"]} == {policy}
    assert st["evictions"] == 0


def test_sampled_decoding_matches_unpatched():
    model = make_model("llama", seed=5)
    ids, mask = prompts([9, 4], seed=6)
    kwargs = dict(attention_mask=mask, max_new_tokens=12, do_sample=True, top_k=0, temperature=1.0)
    torch.manual_seed(123)
    ref = model.generate(ids, **kwargs)
    raas_flex.patch(model, budget=32, page_size=8)
    torch.manual_seed(123)
    out = model.generate(ids, **kwargs)
    assert torch.equal(out, ref)
    assert not torch.equal(out, greedy(model, ids, mask, 12))  # sampling really happened


def test_eos_stopping_matches_unpatched():
    model = make_model("llama", seed=7)
    ids, mask = prompts([6, 10], seed=8)
    free = greedy(model, ids, mask, 16)[0, ids.shape[1]:].tolist()
    # an EOS that row 0 emits at step j >= 2 and never before
    j = next(j for j in range(2, len(free)) if free[j] not in free[:j])
    eos = free[j]
    ref = greedy(model, ids, mask, 16, eos_token_id=eos)
    raas_flex.patch(model, budget=32, page_size=8)
    out = greedy(model, ids, mask, 16, eos_token_id=eos)
    assert torch.equal(out, ref)
    row0 = out[0, ids.shape[1]:].tolist()
    assert row0[j] == eos and all(t == PAD for t in row0[j + 1:])


def test_dense_layers_use_the_dense_policy():
    model = make_model("mistral", seed=9)
    ids, mask = prompts([10], seed=10)
    ref = greedy(model, ids, mask, 8)
    raas_flex.patch(model, budget=64, page_size=8, dense_layers=1)
    assert torch.equal(greedy(model, ids, mask, 8), ref)

    raas_flex.patch(model, budget=24, page_size=8, dense_layers=1)
    greedy(model, ids, mask, 40)
    dense, sparse = raas_flex.stats(model)["layers"]
    assert dense["policy"] == "dense" and sparse["policy"] == "raas"
    assert dense["tokens"] == dense["resident_tokens"] == [10 + 39] and dense["evictions"] == [0]
    assert dense["slots"] >= 10 + 39
    assert sparse["slots"] == 24 and sparse["resident_tokens"][0] <= 24 and sparse["evictions"][0] > 0


# -- long generation at a small budget --------------------------------------------------------------------
class Probe(StoppingCriteria):
    """Records the cache's allocation after given numbers of generated tokens (never stops)."""

    def __init__(self, model, cache, prompt_len, at):
        self.model, self.cache, self.prompt_len, self.at = model, cache, prompt_len, set(at)
        self.records = {}

    def __call__(self, input_ids, scores, **kwargs):
        n = input_ids.shape[1] - self.prompt_len
        if n in self.at:
            engines = self.cache.engines()
            self.records[n] = dict(
                kv_bytes=raas_flex.stats(self.model)["kv_bytes"],
                ptrs=[(e.k.data_ptr(), e.v.data_ptr()) for e in engines],
                state_bytes=sum(e.state_bytes for e in engines),
            )
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


@pytest.mark.parametrize("family,page_size,lengths", [("llama", 8, [10, 23]), ("qwen3", 16, [9, 16])])
def test_generation_four_times_the_budget(family, page_size, lengths):
    budget = 32
    model = make_model(family, seed=11)
    raas_flex.patch(model, budget=budget, page_size=page_size)
    ids, mask = prompts(lengths, seed=12)
    cache = raas_flex.RaaSCache(model)
    probe = Probe(model, cache, ids.shape[1], at=(budget, 4 * budget))
    out = model.generate(
        ids, attention_mask=mask, max_new_tokens=4 * budget, do_sample=False, past_key_values=cache,
        stopping_criteria=StoppingCriteriaList([probe]),
    )
    assert out.shape[1] == ids.shape[1] + 4 * budget
    assert cache.get_seq_length() == out.shape[1] - 1  # logical (padded) length, what HF positions need

    one, four = probe.records[budget], probe.records[4 * budget]
    assert one == four  # no reallocation, same bytes, same buffers
    assert four["kv_bytes"] == LAYERS * 2 * len(lengths) * HKV * budget * D * 4

    st = raas_flex.stats(cache)
    for layer, engine in zip(st["layers"], cache.engines()):
        assert layer["tokens"] == [n + 4 * budget - 1 for n in lengths]
        assert all(r <= budget for r in layer["resident_tokens"])
        assert all(e > 0 for e in layer["evictions"])
        assert not layer["overflow"]
        ps = engine.page_state()
        for b, n in enumerate(lengths):
            prompt_pages = set(range(-(-n // page_size)))
            for h in range(HKV):
                ids_bh = ps.page_id[b, h].tolist()
                pinned = {ids_bh[s] for s in range(len(ids_bh)) if ps.pinned[b, h, s]}
                assert prompt_pages <= set(ids_bh), (b, h, ids_bh)  # every prompt page still resident
                assert pinned == prompt_pages  # exactly the prompt pages are pinned


# -- batches with left padding ------------------------------------------------------------------------------
@pytest.mark.parametrize("policy", POLICIES)
def test_left_padded_batch_matches_each_prompt_alone(policy):
    model = make_model("llama", seed=13)
    raas_flex.patch(model, budget=32, page_size=8, policy=policy)
    lengths = [6, 13, 21]
    ids, mask = prompts(lengths, seed=14)
    new = 20
    batch = greedy(model, ids, mask, new)[:, ids.shape[1]:]
    st = raas_flex.stats(model)
    if policy in ("raas", "h2o", "streaming"):
        assert st["layers"][0]["evictions"][2] > 0  # the longest row went past the budget
    for b, n in enumerate(lengths):
        alone = ids[b:b + 1, ids.shape[1] - n:]
        single = greedy(model, alone, torch.ones_like(alone), new)[:, n:]
        assert torch.equal(batch[b:b + 1], single), (policy, b)


# -- explicit caches, max_length ----------------------------------------------------------------------------
def test_explicit_cache_matches_default_and_is_returned():
    model = make_model("qwen3", seed=15)
    raas_flex.patch(model, budget=32, page_size=8)
    ids, mask = prompts([8, 3], seed=16)
    default = greedy(model, ids, mask, 10)
    cache = raas_flex.RaaSCache(model)
    res = model.generate(
        ids, attention_mask=mask, max_new_tokens=10, do_sample=False, past_key_values=cache, return_dict_in_generate=True
    )
    assert torch.equal(res.sequences, default)
    assert res.past_key_values is cache
    assert raas_flex.stats(model) == raas_flex.stats(cache)

    # a later generation with the same shapes reuses the engines: the old cache cannot continue
    greedy(model, ids, mask, 10)
    assert [id(e) for e in cache.engines()] == [id(layer.engine) for layer in hf._runtime_of(model).last_cache.layers]
    with pytest.raises(RuntimeError, match="taken over by a later generation"):
        model(res.sequences[:, -1:], past_key_values=cache)


def test_cache_options_override_the_patch():
    model = make_model("llama", seed=17)
    raas_flex.patch(model, budget=32, page_size=8)
    ids, mask = prompts([6], seed=18)
    cache = raas_flex.RaaSCache(model, budget=16, policy="streaming", sink_tokens=4)
    greedy(model, ids, mask, 24, past_key_values=cache)
    st = raas_flex.stats(cache)
    assert st["policy"] == "streaming" and st["budget"] == 16
    assert all(layer["slots"] == 16 and layer["evictions"][0] > 0 for layer in st["layers"])
    with pytest.raises(TypeError, match="unknown option 'bogus'"):
        raas_flex.RaaSCache(model, bogus=1)


@pytest.mark.parametrize("policy", ["quest", "dense"])
def test_max_length_for_policies_keeping_every_token(policy):
    model = make_model("llama", seed=19)
    ids, mask = prompts([12], seed=20)

    # generate sizes the buffer from its max length (prompt + max_new_tokens - 1 tokens to hold)
    raas_flex.patch(model, budget=16, page_size=8, policy=policy)
    greedy(model, ids, mask, 30)
    assert all(layer["slots"] == 48 for layer in raas_flex.stats(model)["layers"])  # ceil(41 / 8) pages

    # a fixed max_length that the generation would exceed is refused up front
    raas_flex.patch(model, budget=16, page_size=8, policy=policy, max_length=20)
    with pytest.raises(ValueError, match=r"up to 23 tokens .*max_length=20"):
        greedy(model, ids, mask, 12)
    raas_flex.patch(model, budget=16, page_size=8, policy=policy)
    with pytest.raises(ValueError, match=r"max_length=16"):
        greedy(model, ids, mask, 12, past_key_values=raas_flex.RaaSCache(model, max_length=16))

    # calling the model step by step: no max_length at all, then running past it
    with pytest.raises(ValueError, match=f"policy='{policy}'.*needs max_length"):
        model(ids, past_key_values=raas_flex.RaaSCache(model))
    cache = raas_flex.RaaSCache(model, max_length=16)
    logits = model(ids, past_key_values=cache).logits
    for _ in range(4):  # 12 prompt tokens + 4 = 16 fit
        logits = model(logits[:, -1:].argmax(-1), past_key_values=cache).logits
    with pytest.raises(ValueError, match="holds 16 tokens per sequence"):
        model(logits[:, -1:].argmax(-1), past_key_values=cache)


def test_prompt_longer_than_the_budget_is_a_clear_error():
    model = make_model("llama")
    raas_flex.patch(model, budget=16, page_size=8)
    ids, mask = prompts([12])
    with pytest.raises(ValueError, match=r"layer 0, policy='raas': prompt of 12 tokens .* use at least 24"):
        greedy(model, ids, mask, 4)


def test_beam_search_is_refused():
    model = make_model("llama")
    raas_flex.patch(model, budget=32, page_size=8)
    ids, mask = prompts([5])
    with pytest.raises(NotImplementedError, match="beam search"):
        model.generate(ids, attention_mask=mask, max_new_tokens=4, num_beams=2)


@pytest.mark.parametrize("policy", ["raas", "quest", "dense"])
@pytest.mark.parametrize("chunk", [3, 5, 11])
def test_chunked_prefill_matches_one_forward(policy, chunk):
    """generate's prefill_chunk_size hands the prompt over in pieces (12 padded tokens: pieces of 3, of
    5 with a last piece of 2, and of 11 with a last piece of 1); the generation equals the
    one-forward prompt's, on a left-padded batch whose shorter row is all padding in the first piece."""
    model = make_model("llama")
    raas_flex.patch(model, budget=32, page_size=4, policy=policy)
    ids, mask = prompts([12, 5], seed=21)
    whole = greedy(model, ids, mask, 6)
    pieces = greedy(model, ids, mask, 6, prefill_chunk_size=chunk)
    assert torch.equal(pieces, whole)


def test_chunked_prefill_keeps_a_last_piece_of_one_token_in_the_prompt():
    """Under generate a last prompt piece of one token (13 tokens in pieces of 12 + 1; the 13th opens a
    page) is stored as prompt, pinned, as one forward stores it; called by hand, a 1-token forward after
    the prompt is a decode step, whose page is not pinned."""
    model = make_model("llama")
    raas_flex.patch(model, budget=32, page_size=4)
    ids, mask = prompts([13, 7], seed=25)
    states = []
    for chunk in (None, 12):
        cache = raas_flex.RaaSCache(model)
        greedy(model, ids, mask, 1, past_key_values=cache, prefill_chunk_size=chunk)  # (prompt only: no decode step)
        eng = cache.layers[0].engine
        states.append({n: getattr(eng, n).clone() for n in ("pinned", "page_id", "length", "step", "k")})
    for name in states[0]:  # (k: a 1-token projection rounds apart from the same row of a longer one)
        assert torch.allclose(states[0][name].float(), states[1][name].float(), atol=1e-5, rtol=0), name
    assert int(states[1]["step"]) == 0 and bool(states[1]["pinned"][0, :, 3].all())  # the 13th token's page
    by_hand, _, _ = _prompt_state(model, ids, mask, [12, 13])
    assert not bool(by_hand["pinned"][0, :, 3].any())


def _prompt_state(model, ids, mask, cuts):
    """Engine state of layer 1 and the last position's logits after the prompt ran in pieces ending at ``cuts``."""
    cache = raas_flex.RaaSCache(model)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    start = 0
    with torch.no_grad():
        for end in cuts:
            out = model(input_ids=ids[:, start:end], attention_mask=mask[:, :end], position_ids=pos[:, start:end],
                        past_key_values=cache, use_cache=True)
            start = end
    eng = cache.layers[1].engine
    state = {n: getattr(eng, n).clone() for n in ("k", "v", "page_id", "pinned", "length", "kmax", "kmin", "open_slot")}
    return state, out.logits[:, -1], cache


def test_chunked_prefill_stores_the_same_prompt():
    """A prompt given in three pieces leaves the engine exactly as one forward does (compacted real
    tokens, page table, pinned prompt pages, key bounds), with the same last logits; the logical
    length counts every piece."""
    model = make_model("llama")
    raas_flex.patch(model, budget=48, page_size=4)
    ids, mask = prompts([14, 6], seed=22)
    one, logits_one, _ = _prompt_state(model, ids, mask, [14])
    three, logits_three, cache = _prompt_state(model, ids, mask, [4, 9, 14])
    for name in one:
        assert torch.allclose(one[name].float(), three[name].float(), atol=1e-5), name
    assert bool(three["pinned"][1, :, :2].all()) and not bool(three["pinned"][1, :, 2:].any())  # 6 tokens: 2 pages
    assert torch.allclose(logits_one, logits_three, atol=1e-4)
    assert cache.get_seq_length() == 14


@pytest.fixture(scope="module")
def prop_model():
    return make_model("llama", seed=24)  # (patched per example: the autouse fixture unpatches after each test)


@settings(max_examples=30)
@given(lengths=st.lists(st.integers(1, 18), min_size=1, max_size=3), cuts=st.sets(st.integers(1, 17), max_size=4))
def test_prompt_in_any_pieces_stores_what_one_forward_stores(prop_model, lengths, cuts):
    """Property: for any left-padded batch and any way of cutting its prompt into pieces of two or more
    tokens, the engine ends up exactly as after one forward, and the last logits agree."""
    n = max(lengths)
    ends = sorted(c for c in cuts if c < n) + [n]
    starts = [0] + ends[:-1]
    assume(all(e - s >= 2 for s, e in zip(starts, ends)))  # (a 1-token piece after the first runs as a decode step)
    ids, mask = prompts(lengths, seed=sum(lengths))
    with raas_flex.patched(prop_model, budget=96, page_size=4):
        one, logits_one, _ = _prompt_state(prop_model, ids, mask, [n])
        pieces, logits_pieces, cache = _prompt_state(prop_model, ids, mask, ends)
        length = cache.get_seq_length()
    for name in one:
        assert torch.allclose(one[name].float(), pieces[name].float(), atol=1e-5), name
    real = mask.bool()
    assert torch.allclose(logits_one[real[:, -1]], logits_pieces[real[:, -1]], atol=1e-4)
    assert length == n




def test_piece_mask_from_each_mask_form():
    """The piece's own key columns from a 4D bool or additive mask, a 2D padding mask (causal, real
    keys, every query keeping itself) or no mask (causal); another rank is refused."""
    causal = torch.ones(3, 3, dtype=torch.bool).tril()
    assert torch.equal(hf_cache._piece_mask(None, 2, 3, "cpu"), causal.expand(2, 1, 3, 3))
    four = torch.zeros(1, 1, 3, 5, dtype=torch.bool)
    four[..., 2:] = causal
    assert torch.equal(hf_cache._piece_mask(four, 1, 3, "cpu"), causal[None, None])
    additive = torch.where(four, 0.0, torch.finfo(torch.float32).min)
    assert torch.equal(hf_cache._piece_mask(additive, 1, 3, "cpu"), causal[None, None])
    two = torch.tensor([[1, 1, 0, 1, 1]])  # keys of the piece: 0 (pad), 1, 1
    expect = torch.tensor([[1, 0, 0], [0, 1, 0], [0, 1, 1]], dtype=torch.bool)
    assert torch.equal(hf_cache._piece_mask(two, 1, 3, "cpu"), expect[None, None])
    with pytest.raises(ValueError, match=r"unexpected attention mask of shape \(1, 3, 5\)"):
        hf_cache._piece_mask(torch.ones(1, 3, 5), 1, 3, "cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", ["flex", "triton"])
def test_gpu_auto_compiled_generate_with_prompt_in_pieces(backend):
    """On CUDA generate auto-compiles the decode forward (CUDA graphs) and would run prompt pieces through
    it too; with a RaaSCache the pieces run eagerly, the decode graph compiles once and is not compiled
    again, and the tokens equal those of the prompt in one forward."""
    model = make_model("llama").cuda()
    raas_flex.patch(model, budget=64, page_size=16, backend=backend)
    ids, mask = prompts([40, 23], seed=31)
    ids, mask = ids.cuda(), mask.cuda()
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    try:
        greedy(model, ids, mask, 2)  # see HUB_KERNELS_EXTRA_GRAPHS
        warm = counters["stats"]["unique_graphs"]
        with torch._dynamo.config.patch(error_on_recompile=True):
            whole = greedy(model, ids, mask, 40)
            pieces = greedy(model, ids, mask, 40, prefill_chunk_size=16)
        graphs = counters["stats"]["unique_graphs"]
    finally:
        torch._dynamo.reset()
        for name in ("_compiled_call", "_last_compile_config"):
            model.__dict__.pop(name, None)
    assert warm <= HUB_KERNELS_EXTRA_GRAPHS + 1 and graphs == warm
    assert torch.equal(pieces, whole)


def test_chunked_prefill_over_budget_names_the_pieces():
    """A prompt that outgrows the budget piece by piece is refused when the piece that overflows arrives,
    saying it came in pieces and how many tokens it holds so far."""
    model = make_model("llama")
    raas_flex.patch(model, budget=16, page_size=4)  # 4 pages, one kept free: 12 prompt tokens at most
    ids, mask = prompts([14], seed=23)
    with pytest.raises(ValueError, match=r"layer 0, policy='raas' \(prompt in pieces, 8 \+ 6 tokens so far\): "
                                         r"prompt of 14 tokens needs 4 pages"):
        greedy(model, ids, mask, 2, prefill_chunk_size=8)


# -- torch.compile of the decode forward ------------------------------------------------------------------------
# transformers >= 5.25 wraps model forwards with the `kernels` package's context variable, which (kernels
# 0.19.1) leaves a global set after the first compiled call, so the second call compiles once more. The
# tests below therefore compile during a short warm-up generation, allow that one extra graph there, and
# then require that nothing at all compiles again.
HUB_KERNELS_EXTRA_GRAPHS = 1
def _decode_by_hand(model, forward, ids, mask, steps, max_length):
    """Eager prompt through a new RaaSCache, then ``steps`` greedy decode steps through ``forward`` with the
    inputs generate gives a compiled forward (positions from the left-padded mask, no attention mask)."""
    cache = raas_flex.RaaSCache(model, max_length=max_length)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        out = model(ids, attention_mask=mask, position_ids=pos, past_key_values=cache)
        tok, pos = out.logits[:, -1:].argmax(-1), pos[:, -1:] + 1
        tokens, logits = [tok], []
        for _ in range(steps):
            out = forward(input_ids=tok, position_ids=pos, past_key_values=cache, use_cache=True)
            tok, pos = out.logits[:, -1:].argmax(-1), pos + 1
            tokens.append(tok)
            logits.append(out.logits[:, -1])
    return torch.cat(tokens, 1), torch.stack(logits, 1), cache


@pytest.mark.parametrize("family,policy", [("llama", "raas"), ("qwen3", "quest")])
def test_decode_forward_compiles_to_one_graph_without_recompiles(family, policy):
    """What generate's auto-compile on CUDA needs: the decode forward traces as one graph (fullgraph) and
    replays for every step without a recompile. aot_eager traces with dynamo/AOTAutograd but runs eagerly,
    so this runs on CPU (Inductor's CPU flex template cannot compile the step in one graph)."""
    from torch._dynamo.testing import CompileCounterWithBackend

    budget = 24
    model = make_model(family, seed=41)
    raas_flex.patch(model, budget=budget, page_size=8, policy=policy)
    ids, mask = prompts([5, 11], seed=42)
    steps = 3 * budget + 2
    max_length = ids.shape[1] + steps + 1
    assert raas_flex.RaaSCache(model).is_compileable and all(
        layer.is_compileable for layer in raas_flex.RaaSCache(model).layers
    )
    ref_tokens, ref_logits, _ = _decode_by_hand(model, model, ids, mask, steps, max_length)

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model.forward, backend=counter, fullgraph=True)
    try:
        _decode_by_hand(model, compiled, ids, mask, 2, max_length)  # see warm_up_hub_kernels
        warm = counter.frame_count
        with torch._dynamo.config.patch(error_on_recompile=True):
            tokens, logits, cache = _decode_by_hand(model, compiled, ids, mask, steps, max_length)
    finally:
        torch._dynamo.reset()
    assert warm <= HUB_KERNELS_EXTRA_GRAPHS + 1 and counter.frame_count == warm  # no graph after the first steps
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    assert cache.get_seq_length() == ids.shape[1] + steps  # derived from the engines after the loop
    st = raas_flex.stats(cache)
    assert not any(layer["overflow"] for layer in st["layers"])
    if policy == "raas":
        assert st["evictions"] > 0  # the steps went well past the budget


def test_generate_auto_compiles_the_decode_step():
    """generate's own auto-compile path (forced on CPU through compile_config) compiles the decode forward
    once, never recompiles (neither across steps nor for a later prompt of another length: the same engines
    serve it, nor for a prompt in pieces, which runs eagerly), and gives the eager tokens."""
    from transformers import CompileConfig

    model = make_model("llama", seed=43)
    raas_flex.patch(model, budget=24, page_size=8)
    ids, mask = prompts([5, 11], seed=44)
    ids2, mask2 = prompts([8, 3], seed=45)
    ref = greedy(model, ids, mask, 60, disable_compile=True)
    ref2 = greedy(model, ids2, mask2, 10, disable_compile=True)

    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    config = CompileConfig(backend="aot_eager", fullgraph=True, dynamic=False, mode=None)
    config._compile_all_devices = True
    try:
        greedy(model, ids, mask, 2, compile_config=config)  # see HUB_KERNELS_EXTRA_GRAPHS
        warm = counters["stats"]["unique_graphs"]
        with torch._dynamo.config.patch(error_on_recompile=True):
            out = greedy(model, ids, mask, 60, compile_config=config)
            st = raas_flex.stats(model)
            out2 = greedy(model, ids2, mask2, 10, compile_config=config)
            out3 = greedy(model, ids, mask, 60, compile_config=config, prefill_chunk_size=4)
        graphs = counters["stats"]["unique_graphs"]
    finally:
        torch._dynamo.reset()
        for name in ("_compiled_call", "_last_compile_config"):
            model.__dict__.pop(name, None)
    assert warm <= HUB_KERNELS_EXTRA_GRAPHS + 1 and graphs == warm  # the decode forward, compiled once
    assert torch.equal(out, ref) and torch.equal(out2, ref2) and torch.equal(out3, ref)
    assert st["layers"][0]["tokens"] == [5 + 59, 11 + 59]


# -- forwards without a RaaSCache -----------------------------------------------------------------------------
def test_forwards_without_raas_cache_run_plain_sdpa():
    model = make_model("qwen2", seed=21)
    ids, mask = prompts([4, 11], seed=22)
    ref_logits = model(ids, attention_mask=mask).logits
    ref_nocache = greedy(model, ids, mask, 6, use_cache=False)
    ref_dynamic = greedy(model, ids, mask, 6, cache_implementation="dynamic")
    raas_flex.patch(model, budget=32, page_size=8)
    assert torch.equal(model(ids, attention_mask=mask).logits, ref_logits)
    assert torch.equal(greedy(model, ids, mask, 6, use_cache=False), ref_nocache)
    assert torch.equal(greedy(model, ids, mask, 6, cache_implementation="dynamic"), ref_dynamic)
    with pytest.raises(ValueError, match="no RaaS generation has run"):
        raas_flex.stats(model)


# -- patch / unpatch lifecycle --------------------------------------------------------------------------------
def test_unpatch_restores_the_model_exactly():
    twin = make_model("llama", seed=23)  # never patched
    model = make_model("llama", seed=23)
    ids, mask = prompts([5, 9], seed=24)
    ref_logits = twin(ids, attention_mask=mask).logits
    ref = greedy(twin, ids, mask, 8)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    modules = [name for name, _ in model.named_modules()]

    raas_flex.patch(model, budget=24, page_size=8)
    assert registered()
    assert [name for name, _ in model.named_modules()] == modules  # the runtime is not a submodule
    greedy(model, ids, mask, 30)  # evicts: state that must not leak into the restored model
    assert raas_flex.unpatch(model) is model

    assert_pristine(model)
    assert torch.equal(model(ids, attention_mask=mask).logits, ref_logits)
    assert torch.equal(greedy(model, ids, mask, 8), ref)
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="not patched"):
        raas_flex.unpatch(model)
    with pytest.raises(ValueError, match="needs a model patched"):
        raas_flex.RaaSCache(model)


def test_cache_of_an_unpatched_model_refuses_to_run():
    model = make_model("llama")
    ids, mask = prompts([6])
    raas_flex.patch(model, budget=32, page_size=8)
    cache = raas_flex.RaaSCache(model)
    raas_flex.unpatch(model)
    with pytest.raises(RuntimeError, match="unpatched"):
        model(ids, attention_mask=mask, past_key_values=cache)


def test_patch_unpatch_cycles():
    model = make_model("qwen3", seed=25)
    ids, mask = prompts([6, 8], seed=26)
    ref = greedy(model, ids, mask, 16)
    first = None
    for _ in range(3):
        raas_flex.patch(model, budget=16, page_size=8)
        out = greedy(model, ids, mask, 16)
        first = out if first is None else first
        assert torch.equal(out, first)
        raas_flex.unpatch(model)
        assert_pristine(model)
        assert torch.equal(greedy(model, ids, mask, 16), ref)
    assert not torch.equal(first, ref)  # the budget of 16 really changed the decoding


def test_double_patch_reconfigures_in_place():
    model = make_model("llama", seed=27)
    ids, mask = prompts([7], seed=28)
    ref = greedy(model, ids, mask, 6)
    raas_flex.patch(model, budget=32, page_size=8)
    runtime = hf._runtime_of(model)
    wrappers = {name: model.__dict__[name] for name in ("generate", "_prepare_cache_for_generation")}
    greedy(model, ids, mask, 6)

    assert raas_flex.patch(model, budget=64, page_size=16, policy="streaming") is model
    assert hf._runtime_of(model) is runtime
    for name, fn in wrappers.items():  # not wrapped a second time
        assert model.__dict__[name] is fn
        assert fn.__wrapped__ is getattr(type(model), name)
    assert all(m.__dict__["_raas_flex"] is runtime for m in runtime.attn_modules)
    with pytest.raises(ValueError, match="no RaaS generation"):
        raas_flex.stats(model)  # the old configuration's state is dropped
    assert torch.equal(greedy(model, ids, mask, 6), ref)
    st = raas_flex.stats(model)
    assert st["policy"] == "streaming" and st["budget"] == 64 and st["page_size"] == 16

    raas_flex.unpatch(model)  # one unpatch undoes everything
    assert_pristine(model)
    assert torch.equal(greedy(model, ids, mask, 6), ref)


def test_context_manager():
    model = make_model("mistral", seed=29)
    ids, mask = prompts([6], seed=30)
    ref = greedy(model, ids, mask, 6)
    with raas_flex.patched(model, budget=32, page_size=8) as m:
        assert m is model
        assert torch.equal(greedy(model, ids, mask, 6), ref)
        assert raas_flex.stats(model)["budget"] == 32
        with raas_flex.patched(model, budget=64, page_size=8, policy="h2o"):
            greedy(model, ids, mask, 6)
            assert raas_flex.stats(model)["policy"] == "h2o"
        assert hf._runtime_of(model).config == raas_flex.RaaSConfig(budget=32, page_size=8)
    assert_pristine(model)
    assert torch.equal(greedy(model, ids, mask, 6), ref)

    with pytest.raises(KeyError):
        with raas_flex.patched(model, budget=32, page_size=8):
            raise KeyError("boom")
    assert_pristine(model)


def test_nothing_is_registered_at_import():
    code = (
        "from transformers.generation import utils\n"
        "stop_check = utils.DeferredStopCheck\n"
        "import raas_flex, raas_flex.hf\n"
        "from transformers.modeling_utils import AttentionInterface\n"
        "from transformers.masking_utils import AttentionMaskInterface\n"
        "assert 'raas_flex' not in AttentionInterface._global_mapping\n"
        "assert 'raas_flex' not in AttentionMaskInterface._global_mapping\n"
        "assert utils.DeferredStopCheck is stop_check\n"
        "print('ok')\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr


# -- generate's stopping check ------------------------------------------------------------------------------------
def test_stop_check_is_deferred_for_a_raas_cache_on_cuda_only():
    """While a model is patched, generate checks for the end one step late (no host sync per token) for a
    RaaSCache on CUDA that is not handed back; every other case keeps transformers' own decision."""
    model = make_model("llama")
    raas_flex.patch(model, budget=32, page_size=8)
    deferred = generation.DeferredStopCheck
    assert deferred is not ORIGINAL_STOP_CHECK and issubclass(deferred, ORIGINAL_STOP_CHECK)
    cuda, cpu, raas, dense = torch.device("cuda"), torch.device("cpu"), hf.RaaSCache(model), DynamicCache()
    assert deferred.is_supported(cuda, raas, cache_is_returned=False, is_assistant=False)
    assert not deferred.is_supported(cuda, raas, cache_is_returned=True, is_assistant=False)
    assert not deferred.is_supported(cuda, raas, cache_is_returned=False, is_assistant=True)
    for device, cache in ((cpu, raas), (cuda, dense), (torch.device("mps"), dense), (cuda, None)):
        for returned in (False, True):
            assert deferred.is_supported(device, cache, returned, False) == \
                ORIGINAL_STOP_CHECK.is_supported(device, cache, returned, False)
    raas_flex.unpatch(model)
    assert generation.DeferredStopCheck is ORIGINAL_STOP_CHECK


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_deferred_stop_check_keeps_the_tokens(monkeypatch):
    """On CUDA a patched generate stops one step late without changing a token: with end-of-sequence
    tokens that stop the batch early (the deferred check runs one extra step and drops it), and without
    (the length stops it), against the per-token check that return_dict_in_generate keeps."""
    model = make_model("llama", seed=3).cuda()
    raas_flex.patch(model, budget=64, page_size=16)
    ids, mask = prompts([30, 17], seed=32)
    ids, mask = ids.cuda(), mask.cuda()
    calls = []
    deferred = generation.DeferredStopCheck
    original_call = deferred.__call__
    monkeypatch.setattr(deferred, "__call__", lambda self, *a: calls.append(1) or original_call(self, *a))
    try:
        free = greedy(model, ids, mask, 40)
        assert len(calls) == 40
        eos = sorted({int(free[0, ids.shape[1] + 6]), int(free[1, ids.shape[1] + 9])})
        model.generation_config.eos_token_id = eos
        for new in (40, 12):
            calls.clear()
            fast = greedy(model, ids, mask, new)
            assert calls, "the deferred stop check did not run"
            calls.clear()
            slow = greedy(model, ids, mask, new, return_dict_in_generate=True).sequences
            assert not calls
            assert torch.equal(fast, slow)
        assert fast.shape[1] < ids.shape[1] + 12  # the end-of-sequence tokens stopped it early
    finally:
        torch._dynamo.reset()
        for name in ("_compiled_call", "_last_compile_config"):
            model.__dict__.pop(name, None)


# -- refused models and options ---------------------------------------------------------------------------------
def _gpt2():
    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=2, n_positions=64))


def _t5():
    cfg = T5Config(vocab_size=VOCAB, d_model=32, d_kv=16, d_ff=64, num_layers=1, num_heads=2)
    return T5ForConditionalGeneration(cfg)


def _deepseek_v3():  # multi-head latent attention
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    cfg = DeepseekV3Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=8,
        qk_nope_head_dim=8, v_head_dim=16, n_routed_experts=2, num_experts_per_tok=1, n_group=1, topk_group=1,
        first_k_dense_replace=1,
    )
    return DeepseekV3ForCausalLM(cfg)


SUPPORTED = r"supported: llama, qwen2, qwen3, mistral"


@pytest.mark.parametrize(
    "build,match",
    [
        (_gpt2, rf"model_type='gpt2' is not supported.*{SUPPORTED}"),
        (_t5, rf"model_type='t5' is an encoder-decoder model.*{SUPPORTED}"),
        (_deepseek_v3, rf"model_type='deepseek_v3' is not supported.*{SUPPORTED}"),
    ],
    ids=["gpt2", "t5", "deepseek_v3-mla"],  # (sliding-window models are supported: tests/test_families.py)
)
def test_unsupported_models_are_refused(build, match):
    model = build()
    impl = model.config._attn_implementation
    with pytest.raises(ValueError, match=match):
        raas_flex.patch(model, budget=32)
    assert model.config._attn_implementation == impl and "_raas_flex" not in model.__dict__
    assert not registered()


@pytest.mark.parametrize(
    "options,exc,match",
    [
        (dict(budget=30, page_size=16), ValueError, r"budget=30 must be a multiple of page_size=16"),
        (dict(budget=0), ValueError, r"budget must be >= 1"),
        (dict(budget=32.0), TypeError, r"budget must be an int"),
        (dict(budget=32, policy="lru"), ValueError, r"policy='lru' is not supported; allowed: 'raas', 'quest'"),
        (dict(budget=32, page_size="8"), TypeError, r"page_size must be an int"),
        (dict(budget=32, refresh_ratio=1.5), ValueError, r"refresh_ratio=1.5 must be in \(0, 1\]"),
        (dict(budget=32, importance="exact"), ValueError, r"importance='exact' is not supported; allowed"),
        (dict(budget=32, dense_layers=3), ValueError, r"dense_layers=3 exceeds the model's 2 layers"),
        (dict(budget=32, bogus=1), TypeError, r"unknown option 'bogus'; allowed: budget, policy, page_size"),
    ],
)
def test_bad_options_are_refused(options, exc, match):
    model = make_model("llama")
    before = registered()  # True when an earlier test's patched model was dropped without unpatch
    with pytest.raises(exc, match=match):
        raas_flex.patch(model, **options)
    assert_pristine(model, registry=False)
    assert registered() == before  # a refused patch registers nothing


def test_generate_sizes_a_user_cache_under_any_kwarg_name():
    """generate keeps the cache under 'cache' from transformers 5.24 on ('past_key_values' before):
    a RaaSCache the user passes must be the one generate sizes and decodes with, whatever the name."""
    model = make_model("llama", seed=1)
    raas_flex.patch(model, budget=16, page_size=8, policy="quest")
    ids, mask = prompts([10, 7], seed=2)
    cache = raas_flex.RaaSCache(model)
    sized = []
    orig = cache.prepare_generation
    cache.prepare_generation = lambda n: (sized.append(n), orig(n))[1]
    out = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, past_key_values=cache)
    assert sized == [ids.shape[1] + 10 - 1]
    assert cache.get_seq_length() == out.shape[1] - 1
    expected = "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"
    assert hf.generate_cache_key(model) == expected
