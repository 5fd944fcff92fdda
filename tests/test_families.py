"""Every supported model family, as a tiny random model (fp32, 6 query / 2 KV heads: G = 3,
head_dim 32): the patched model against the unpatched one through ``generate``.

- budget holding the whole generation: greedy and seeded-sampling tokens equal, logits within 1e-3,
  whatever the family adds to attention (sliding windows, softcapping, sinks, scale overrides);
- small budget: pages are evicted, logits stay finite, the KV bytes do not grow with the length;
- a ragged left-padded batch equals its rows run alone;
- unsupported designs are refused with an error naming the model type.
"""

from __future__ import annotations

import textwrap
import warnings
from pathlib import Path

import pytest
import torch

import raas_flex
from raas_flex import kernels
from hf_batches import replays_without_compiling
from test_kernels import run_interpreted

FAMILIES = list(raas_flex.SUPPORTED_MODEL_TYPES)  # every supported type is tested here
# the families again with sliding windows where the plain config has none
SLIDING = {"qwen2": dict(use_sliding_window=True, max_window_layers=1),
           "qwen3": dict(use_sliding_window=True, max_window_layers=1),
           "phi3": dict(sliding_window=16)}
WINDOW = 16
INTERLEAVED = ("gemma2", "gemma3_text", "gpt_oss", "olmo3", "exaone4", "exaone_moe", "cohere2")


def tiny_model(family: str, seed: int = 0, **overrides):
    from transformers import AutoConfig, AutoModelForCausalLM

    kw = dict(hidden_size=96, intermediate_size=128, num_hidden_layers=3, num_attention_heads=6, num_key_value_heads=2,
              head_dim=32, vocab_size=128, max_position_embeddings=512, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    kw.update({"qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32),
               "qwen2_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                 shared_expert_intermediate_size=32),
               "gpt_oss": dict(num_local_experts=4, num_experts_per_tok=2),
               "minimax_m2": dict(num_local_experts=4, num_experts_per_tok=2),
               "glm4_moe": dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, n_shared_experts=1),
               "exaone_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, num_shared_experts=1),
               "hunyuan_v1_moe": dict(num_experts=4, moe_topk=2, moe_intermediate_size=32),
               "ernie4_5_moe": dict(moe_num_experts=4, moe_k=2, moe_intermediate_size=32, moe_num_shared_experts=1),
               "gemma2": dict(query_pre_attn_scalar=24), "gemma3_text": dict(query_pre_attn_scalar=24),
               "granite": dict(attention_multiplier=0.1)}.get(family, {}))
    if family in INTERLEAVED + ("mistral",):
        kw["sliding_window"] = WINDOW
    if family in INTERLEAVED:
        kw["layer_types"] = ["sliding_attention", "full_attention", "sliding_attention"]
    kw.update(overrides)
    if kw.get("use_sliding_window"):
        kw.setdefault("sliding_window", WINDOW)
        kw.setdefault("layer_types", ["sliding_attention", "full_attention", "sliding_attention"])
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForCausalLM.from_config(AutoConfig.for_model(family, **kw)).eval()


def prompts(lengths, seed):
    g = torch.Generator().manual_seed(seed)
    n = max(lengths)
    ids = torch.randint(5, 120, (len(lengths), n), generator=g)
    mask = torch.zeros(len(lengths), n, dtype=torch.long)
    for i, m in enumerate(lengths):
        mask[i, n - m:] = 1
    return ids * mask, mask


def generate(model, ids, mask, new, sample=False, **kw):
    if sample:
        torch.manual_seed(123)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=sample,
                              top_k=0 if sample else None, output_logits=True, return_dict_in_generate=True, **kw)


def compiled_generate(model, ids, mask, new):
    """``generate`` under its auto-compile on CUDA (CUDA graphs): a warm-up generation, then one of
    ``new`` tokens that must compile nothing more and skip no CUDA graph; returns the second."""
    return replays_without_compiling(model, lambda: generate(model, ids, mask, 4),
                                     lambda: generate(model, ids, mask, new))[1]


CASES = [(f, {}) for f in FAMILIES] + [(f, o) for f, o in SLIDING.items()]
IDS = [f for f in FAMILIES] + [f"{f}-sliding" for f in SLIDING]


@pytest.mark.parametrize("family,overrides", CASES, ids=IDS)
def test_budget_holding_everything_is_the_model(family, overrides, unpatch_everything):
    model = tiny_model(family, **overrides)
    ids, mask = prompts([12, 7], seed=1)
    new = 40  # past the window of the sliding layers: their ring evicts, exactly
    ref_greedy, ref_sample = generate(model, ids, mask, new), generate(model, ids, mask, new, sample=True)
    raas_flex.patch(model, budget=64, page_size=16)
    greedy, sample = generate(model, ids, mask, new), generate(model, ids, mask, new, sample=True)
    for out, ref in ((greedy, ref_greedy), (sample, ref_sample)):
        assert torch.equal(out.sequences, ref.sequences)
        torch.testing.assert_close(torch.stack(out.logits), torch.stack(ref.logits), rtol=0, atol=1e-3)
    st = raas_flex.stats(model)
    windowed = [layer for layer in st["layers"] if layer["policy"] == "streaming"]
    if family in INTERLEAVED + ("mistral",) or overrides:
        assert windowed and all(layer["evictions"] for layer in windowed)  # the rings evicted and stayed exact
    raas_flex.unpatch(model)  # the model is its unpatched self again
    assert torch.equal(generate(model, ids, mask, 8).sequences, ref_greedy.sequences[:, :ids.shape[1] + 8])


@pytest.mark.parametrize("family", FAMILIES)
def test_small_budget_evicts_and_stays_flat(family, unpatch_everything):
    model = tiny_model(family, seed=2)
    ids, mask = prompts([9, 14], seed=3)
    raas_flex.patch(model, budget=32, page_size=16)
    short = generate(model, ids, mask, 24)
    kv_short = raas_flex.stats(model)["kv_bytes"]
    long = generate(model, ids, mask, 80)
    st = raas_flex.stats(model)
    assert st["evictions"] > 0
    assert st["kv_bytes"] == kv_short  # O(budget), not O(length)
    assert all(torch.isfinite(x).all() for x in short.logits + long.logits)


@pytest.mark.parametrize("family", FAMILIES)
def test_ragged_batch_equals_rows_alone(family, unpatch_everything):
    model = tiny_model(family, seed=4)
    raas_flex.patch(model, budget=32, page_size=16)
    ids, mask = prompts([5, 13], seed=5)
    both = generate(model, ids, mask, 30)
    for row in range(2):
        n = int(mask[row].sum())
        alone = generate(model, ids[row:row + 1, -n:], mask[row:row + 1, -n:], 30)
        assert torch.equal(both.sequences[row, -30:], alone.sequences[0, -30:])
        torch.testing.assert_close(torch.stack(both.logits)[:, row], torch.stack(alone.logits)[:, 0], rtol=0,
                                   atol=1e-4)


@pytest.mark.parametrize("family", ["gemma2", "gpt_oss"])
def test_prompt_in_pieces_with_windows_is_the_prompt_in_one(family, unpatch_everything):
    """A prompt longer than the window, in pieces: the stored part is seen through the window too."""
    model = tiny_model(family, seed=6)
    ids, mask = prompts([45, 30], seed=7)
    ref = generate(model, ids, mask, 20)
    raas_flex.patch(model, budget=64, page_size=16)
    pieces = generate(model, ids, mask, 20, prefill_chunk_size=16)
    assert torch.equal(pieces.sequences, ref.sequences)
    torch.testing.assert_close(torch.stack(pieces.logits), torch.stack(ref.logits), rtol=0, atol=1e-3)


def test_unsupported_designs_name_the_model_type(unpatch_everything):
    from transformers import AutoConfig, AutoModelForCausalLM, T5Config, T5ForConditionalGeneration

    small = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=64)
    mla = AutoModelForCausalLM.from_config(AutoConfig.for_model(
        "deepseek_v3", **small, num_key_value_heads=4, intermediate_size=64, moe_intermediate_size=32,
        n_routed_experts=4, num_experts_per_tok=2, first_k_dense_replace=2, q_lora_rank=32, kv_lora_rank=16,
        qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, n_group=1, topk_group=1))
    with pytest.raises(ValueError, match=r"model_type='deepseek_v3' is not supported by raas_flex; supported: llama"):
        raas_flex.patch(mla, budget=32)
    t5 = T5ForConditionalGeneration(T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=2))
    with pytest.raises(ValueError, match="model_type='t5' is an encoder-decoder model"):
        raas_flex.patch(t5, budget=32)
    odd = tiny_model("llama")
    odd.config.layer_types = ["full_attention", "linear_attention", "full_attention"]
    with pytest.raises(ValueError, match=r"model_type='llama' has layers of type \['linear_attention'\]"):
        raas_flex.patch(odd, budget=32)


def test_fused_backends_refuse_windowed_layers_by_name(unpatch_everything):
    """An explicit fused backend is never swapped for another: a layer it cannot serve raises."""
    model = tiny_model("gpt_oss", seed=8)
    raas_flex.patch(model, budget=64, page_size=16, backend="flex")
    ids, mask = prompts([6], seed=9)
    with pytest.raises(ValueError, match=r"backend='flex' is not supported for this cache: a sliding window "
                                         r"\(AttentionSpec\(window=\d+.*\)\) is served by the one-kernel step"):
        generate(model, ids, mask, 4)


INTERPRETED_FAMILIES_SCRIPT = textwrap.dedent("""
    import sys, torch
    sys.path[:0] = [{tests!r}]
    import raas_flex, test_families as f
    for family, kw in (("gemma2", dict(attn_logit_softcapping=0.05)), ("gpt_oss", {{}})):
        model = f.tiny_model(family, **kw)  # (a softcap of 0.05 binds at these scores)
        ids, mask = f.prompts([12, 7], seed=1)
        ref = f.generate(model, ids, mask, 40)
        raas_flex.patch(model, budget=64, page_size=16, backend="triton")  # named: a layer it cannot serve raises
        out = f.generate(model, ids, mask, 40)
        assert torch.equal(out.sequences, ref.sequences), family
        torch.testing.assert_close(torch.stack(out.logits), torch.stack(ref.logits), rtol=0, atol=1e-3)
        layers = raas_flex.stats(model)["layers"]
        assert all(layer["backend"] == "triton" for layer in layers), family
        rings = [layer for layer in layers if layer["policy"] == "streaming"]
        assert rings and all(layer["evictions"] for layer in rings), family
        raas_flex.unpatch(model)
        print(family, "ok")
""")


@pytest.mark.skipif(not kernels.HAS_TRITON, reason="needs triton (the interpreter runs the kernels on CPU)")
def test_interpreted_one_kernel_step_with_windows_softcap_and_sinks_is_the_model():
    """On the one-kernel step (``backend="triton"``, run on CPU by Triton's interpreter), Gemma 2 (a softcap
    of 0.05, window layers) and gpt-oss (sinks, window layers) with a budget holding the whole generation give
    the unpatched model's greedy tokens and logits, their window layers' rings evicting as they go."""
    run_interpreted(INTERPRETED_FAMILIES_SCRIPT.format(tests=str(Path(__file__).resolve().parent)), "gpt_oss ok",
                    timeout=900)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt_oss", "glm4_moe", "cohere2"])
def test_gpu_compiled_generate_is_the_model(family, unpatch_everything):
    """On CUDA, generate compiles the patched decode forward with CUDA graphs (its auto-compile): the
    tokens and logits are the unpatched model's (fp32), and after a warm-up generation nothing compiles
    again (see tests/test_hf.py on the extra warm-up graph of transformers' hub kernels)."""
    model = tiny_model(family).cuda()
    ids, mask = prompts([12, 7], seed=1)
    ids, mask = ids.cuda(), mask.cuda()
    ref = generate(model, ids, mask, 40, disable_compile=True)
    raas_flex.patch(model, budget=64, page_size=16)
    out = compiled_generate(model, ids, mask, 40)
    assert torch.equal(out.sequences, ref.sequences)
    torch.testing.assert_close(torch.stack(out.logits), torch.stack(ref.logits), rtol=0, atol=1e-3)
