"""Bad input fails loudly: every error is a ValueError/TypeError that names the parameter and the
offending value (checked with pytest.raises(match=...))."""

from __future__ import annotations

import re

import pytest
import torch

from raas_flex import POLICIES, PagedKVCache, RaaSConfig, kernels
from reference import RefCache

D = 16


def m(text: str) -> str:
    """match= pattern for a literal piece of the message."""
    return re.escape(text)


# -- RaaSConfig ----------------------------------------------------------------------------------
CONFIG_ERRORS = [
    # (kwargs, exception, text that must appear in the message)
    (dict(budget=40, page_size=16), ValueError, "budget=40 must be a multiple of page_size=16"),
    (dict(budget=30, page_size=4), ValueError, "budget=30 must be a multiple of page_size=4"),
    (dict(budget=16, page_size=16), ValueError, "budget=16 must hold at least 2 pages of page_size=16"),
    (dict(budget=4, page_size=4), ValueError, "budget=4 must hold at least 2 pages"),
    (dict(budget=0), ValueError, "budget must be >= 1, got 0"),
    (dict(budget=-32), ValueError, "budget must be >= 1, got -32"),
    (dict(budget=64.0), TypeError, "budget must be an int, got 64.0"),
    (dict(budget=True), TypeError, "budget must be an int, got True"),
    (dict(budget="64"), TypeError, "budget must be an int, got '64'"),
    (dict(budget=32, page_size=0), ValueError, "page_size must be >= 1, got 0"),
    (dict(budget=32, page_size=4.0), TypeError, "page_size must be an int, got 4.0"),
    (dict(budget=32, policy="lru"), ValueError, "policy='lru' is not supported"),
    (dict(budget=32, policy="RaaS"), ValueError, "policy='RaaS' is not supported"),
    (dict(budget=32, policy=None), ValueError, "policy=None is not supported"),
    (dict(budget=32, refresh="lru"), ValueError, "refresh='lru' is not supported"),
    (dict(budget=32, importance="norm"), ValueError, "importance='norm' is not supported"),
    (dict(budget=32, refresh_ratio=0.0), ValueError, "refresh_ratio=0.0 must be in (0, 1]"),
    (dict(budget=32, refresh_ratio=-0.5), ValueError, "refresh_ratio=-0.5 must be in (0, 1]"),
    (dict(budget=32, refresh_ratio=1.5), ValueError, "refresh_ratio=1.5 must be in (0, 1]"),
    (dict(budget=32, refresh_ratio=float("nan")), ValueError, "refresh_ratio=nan"),
    (dict(budget=32, refresh_ratio=float("inf")), ValueError, "refresh_ratio=inf"),
    (dict(budget=32, refresh_ratio="0.5"), TypeError, "refresh_ratio must be a float, got '0.5'"),
    (dict(budget=32, refresh_ratio=True), TypeError, "refresh_ratio must be a float, got True"),
    # 2 pages in the budget: 0.4 * 2 = 0.8 pages -> refreshes nothing
    (dict(budget=32, page_size=16, refresh_ratio=0.4), ValueError, "refresh_ratio=0.4 refreshes no page"),
    (dict(budget=32, refresh_threshold=1.0, refresh="threshold", importance="attention"), ValueError, "refresh_threshold=1.0 must be in [0, 1)"),
    (dict(budget=32, refresh_threshold=-0.1), ValueError, "refresh_threshold=-0.1 must be in [0, 1)"),
    (dict(budget=32, refresh_threshold="1e-4"), TypeError, "refresh_threshold must be a float, got '1e-4'"),
    (dict(budget=32, refresh="threshold"), ValueError, "importance='bound'"),
    (dict(budget=32, refresh="threshold", importance="bound"), ValueError, "refresh='threshold'"),
    (dict(budget=32, pin_prompt="yes"), TypeError, "pin_prompt must be True, False or None, got 'yes'"),
    (dict(budget=32, pin_prompt=1), TypeError, "pin_prompt must be True, False or None, got 1"),
    (dict(budget=32, sink_tokens=-1), ValueError, "sink_tokens must be >= 0, got -1"),
    (dict(budget=32, sink_tokens=2.0), TypeError, "sink_tokens must be an int, got 2.0"),
    (dict(budget=32, page_size=16, policy="streaming", sink_tokens=17), ValueError, "sink_tokens=17 takes 2 pages"),
    (dict(budget=32, dense_layers=-1), ValueError, "dense_layers must be >= 0, got -1"),
    (dict(budget=32, max_length=0), ValueError, "max_length must be >= 1, got 0"),
    (dict(budget=32, max_length=True), TypeError, "max_length must be an int, got True"),
    (dict(budget=32, block_size=0), ValueError, "block_size must be >= 1, got 0"),
    (dict(budget=32, compile_flex="yes"), TypeError, "compile_flex must be True, False or None, got 'yes'"),
    (dict(budget=32, attention="sdpa"), ValueError, "attention='sdpa' is not supported; allowed: 'flex', 'triton'"),
    (dict(budget=32, attention="triton", policy="h2o"), ValueError, "got policy='h2o', importance='bound'"),
    (dict(budget=32, attention="triton", importance="attention"), ValueError, "needs policy='raas', importance='bound'"),
    (dict(budget=32, attention="triton", fused=False), ValueError, "attention='triton' needs the fused kernels; got fused=False"),
]


@pytest.mark.parametrize("kw,exc,text", CONFIG_ERRORS, ids=[t for _, _, t in CONFIG_ERRORS])
def test_config_rejects(kw, exc, text):
    with pytest.raises(exc, match=m(text)):
        RaaSConfig(**kw)


def test_unknown_names_list_the_allowed_ones():
    with pytest.raises(ValueError, match=m("allowed: " + ", ".join(map(repr, POLICIES)))):
        RaaSConfig(budget=32, policy="lru")
    with pytest.raises(ValueError, match=m("allowed: 'topk', 'threshold'")):
        RaaSConfig(budget=32, refresh="lru")
    with pytest.raises(ValueError, match=m("allowed: 'bound', 'attention'")):
        RaaSConfig(budget=32, importance="norm")


def test_budget_error_suggests_valid_budgets():
    with pytest.raises(ValueError, match=m("(e.g. 32 or 48)")):
        RaaSConfig(budget=40, page_size=16)


@pytest.mark.parametrize(
    "kw",
    [
        dict(budget=32, page_size=16),  # exactly 2 pages
        dict(budget=2, page_size=1),
        dict(budget=32, page_size=16, refresh_ratio=0.5),  # exactly 1 page refreshed
        dict(budget=32, refresh_ratio=1.0),
        dict(budget=32, refresh="threshold", importance="attention", refresh_threshold=0.0),
        dict(budget=32, page_size=16, policy="streaming", sink_tokens=16),  # 1 sink page + 1 window page
        dict(budget=32, policy="streaming", sink_tokens=0),
        dict(budget=32, policy="quest", max_length=1),
    ],
)
def test_config_accepts_boundaries(kw):
    RaaSConfig(**kw)


def test_config_is_frozen_and_replace_revalidates():
    cfg = RaaSConfig(budget=32)
    with pytest.raises(Exception):
        cfg.budget = 64
    assert cfg.replace(budget=64).budget == 64
    with pytest.raises(ValueError, match=m("budget=40 must be a multiple of page_size=16")):
        cfg.replace(budget=40)


@pytest.mark.parametrize("policy", ["quest", "dense"])
def test_unbounded_policy_needs_max_length(policy):
    cfg = RaaSConfig(budget=32, policy=policy)
    with pytest.raises(ValueError, match=m(f"policy={policy!r}") + ".*" + m("max_length=None")):
        PagedKVCache(cfg, batch_size=1, num_heads=1, num_kv_heads=1, head_dim=D)
    # given here or in the config, it sizes the buffer
    assert PagedKVCache(cfg, batch_size=1, num_heads=1, num_kv_heads=1, head_dim=D, max_length=100).S == 112
    assert PagedKVCache(cfg.replace(max_length=100), batch_size=1, num_heads=1, num_kv_heads=1, head_dim=D).S == 112


# -- PagedKVCache construction -------------------------------------------------------------------
CACHE_ERRORS = [
    (dict(batch_size=0), ValueError, "batch_size must be a positive int, got 0"),
    (dict(batch_size=2.0), ValueError, "batch_size must be a positive int, got 2.0"),
    (dict(batch_size=True), ValueError, "batch_size must be a positive int, got True"),
    (dict(num_heads=0), ValueError, "num_heads must be a positive int, got 0"),
    (dict(num_kv_heads=-1), ValueError, "num_kv_heads must be a positive int, got -1"),
    (dict(num_heads=6, num_kv_heads=4), ValueError, "num_heads=6 must be a multiple of num_kv_heads=4"),
    (dict(head_dim=24), ValueError, "head_dim=24 is not supported"),
    (dict(head_dim=512), ValueError, "head_dim=512 is not supported"),
    (dict(head_dim=16.0), TypeError, "head_dim must be an int, got 16.0"),
    (dict(head_dim=True), TypeError, "head_dim must be an int, got True"),
    (dict(dtype=torch.int32), ValueError, "dtype=torch.int32 is not supported"),
    (dict(dtype=torch.float8_e4m3fn), ValueError, "dtype=torch.float8_e4m3fn is not supported"),
    (dict(dtype=torch.complex64), ValueError, "dtype=torch.complex64 is not supported"),
    (dict(dtype="float32"), TypeError, "dtype must be a torch.dtype, got 'float32'"),
]


@pytest.mark.parametrize("kw,exc,text", CACHE_ERRORS, ids=[t for _, _, t in CACHE_ERRORS])
def test_cache_rejects(kw, exc, text):
    args = dict(batch_size=1, num_heads=4, num_kv_heads=2, head_dim=D) | kw
    with pytest.raises(exc, match=m(text)):
        PagedKVCache(RaaSConfig(budget=32), **args)


def test_cache_rejects_non_config():
    with pytest.raises(TypeError, match=m("config must be a RaaSConfig, got dict")):
        PagedKVCache(dict(budget=32), batch_size=1, num_heads=1, num_kv_heads=1, head_dim=D)


def test_supported_dtypes_and_head_dims_are_accepted():
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        assert PagedKVCache(RaaSConfig(budget=32), batch_size=1, num_heads=1, num_kv_heads=1, head_dim=D, dtype=dtype).k.dtype == dtype
    for d in (16, 32, 64, 128, 256):
        assert PagedKVCache(RaaSConfig(budget=32), batch_size=1, num_heads=1, num_kv_heads=1, head_dim=d).k.shape[-1] == d


def test_block_size_must_divide_buffer():
    with pytest.raises(ValueError, match=m("block_size=48 must divide the buffer length 64")):
        PagedKVCache(RaaSConfig(budget=64, block_size=48), batch_size=1, num_heads=1, num_kv_heads=1, head_dim=D)


def test_gpu_kernel_block_too_small_is_rejected_before_allocating():
    # The check runs before any CUDA allocation, so it is testable without a GPU.
    with pytest.raises(ValueError, match=m("buffer of 8 slots gives block_size=4")):
        PagedKVCache(RaaSConfig(budget=8, page_size=4, policy="quest", max_length=8), batch_size=1,
                     num_heads=1, num_kv_heads=1, head_dim=D, device="cuda")


# -- prefill -------------------------------------------------------------------------------------
def cache_for(policy="raas", budget=32, ps=8, B=2, Hkv=1, **kw):
    cfg = RaaSConfig(budget=budget, page_size=ps, policy=policy, **kw)
    return PagedKVCache(cfg, batch_size=B, num_heads=2 * Hkv, num_kv_heads=Hkv, head_dim=D)


def kv(B=2, H=1, n=5, d=D, **kw):
    return torch.randn(B, H, n, d, **kw), torch.randn(B, H, n, d, **kw)


@pytest.mark.parametrize("pin_prompt", [None, True, False])
@pytest.mark.parametrize("policy", ["raas", "h2o", "streaming"])
def test_prompt_too_long_for_budget(policy, pin_prompt):
    # budget 32 = 4 pages of 8: a prompt may take 3 (one page stays free for decoding)
    c = cache_for(policy, pin_prompt=pin_prompt)
    ref = RefCache(policy, budget=32, page_size=8, batch_size=2, num_kv_heads=1, pin_prompt=pin_prompt)
    c.prefill(*kv(n=24))  # 3 pages: fits
    ref.prefill([24, 24])
    assert c.page_id[0, 0].tolist() == ref.page_ids()[0][0] == [0, 1, 2, -1]
    assert c.pinned[0, 0].tolist() == [ref.pins] * 3 + [False]
    mask = torch.ones(2, 25, dtype=torch.bool)
    mask[1, :10] = False  # the longest row decides
    with pytest.raises(ValueError, match=m("prompt of 25 tokens needs 4 pages of page_size=8") + ".*" + m("budget=32") + ".*" + m("use at least 40")):
        c.prefill(*kv(n=25), mask)
    with pytest.raises(ValueError):
        ref.prefill([25, 15])
    # a failed prefill leaves the cache as it was
    assert c.page_id[0, 0].tolist() == [0, 1, 2, -1] and c.length.tolist() == [24, 24]


@pytest.mark.parametrize("policy", ["quest", "dense"])
def test_prompt_too_long_for_max_length(policy):
    c = cache_for(policy, max_length=40)  # 5 pages of 8, all usable by the prompt
    c.prefill(*kv(n=40))
    assert (c.page_id >= 0).all()
    with pytest.raises(ValueError, match=m("prompt of 41 tokens needs 6 pages of page_size=8") + ".*" + m("max_length")):
        c.prefill(*kv(n=41))


PREFILL_ERRORS = [
    # (k, v, mask) factories, exception, text
    (lambda: ([1.0], torch.randn(2, 1, 5, D), None), TypeError, "k must be a torch.Tensor, got list"),
    (lambda: (torch.randn(2, 1, 5, D), None, None), TypeError, "v must be a torch.Tensor, got NoneType"),
    (lambda: (torch.randn(2, 5, D), torch.randn(2, 5, D), None), ValueError, "k must have 4 dims, got shape (2, 5, 16)"),
    (lambda: (torch.randn(2, 1, 5, D), torch.randn(2, 1, 5), None), ValueError, "v must have 4 dims, got shape (2, 1, 5)"),
    (lambda: (*kv(B=3), None), ValueError, "prefill k/v shape (3, 1, 5, 16)/(3, 1, 5, 16) do not match the cache (batch_size=2"),
    (lambda: (*kv(H=2), None), ValueError, "num_kv_heads=1"),
    (lambda: (*kv(d=32), None), ValueError, "prefill k/v shape (2, 1, 5, 32)/(2, 1, 5, 32)"),
    (lambda: (torch.randn(2, 1, 5, D), torch.randn(2, 1, 6, D), None), ValueError, "prefill k/v shape (2, 1, 5, 16)/(2, 1, 6, 16)"),
    (lambda: (*kv(), torch.ones(2, 5)), ValueError, "mask must be bool [2, 5], got torch.float32 (2, 5)"),
    (lambda: (*kv(), torch.ones(2, 4, dtype=torch.bool)), ValueError, "mask must be bool [2, 5], got torch.bool (2, 4)"),
    (lambda: (*kv(device="meta"), None), ValueError, "prefill k/v on meta/meta, cache on cpu"),
    (lambda: (torch.randn(2, 1, 5, D), torch.randn(2, 1, 5, D, device="meta"), None), ValueError, "prefill k/v on cpu/meta, cache on cpu"),
    (lambda: (*kv(), torch.ones(2, 5, dtype=torch.bool, device="meta")), ValueError, "mask on meta, k on cpu"),
]


@pytest.mark.parametrize("make,exc,text", PREFILL_ERRORS, ids=[t for _, _, t in PREFILL_ERRORS])
def test_prefill_rejects(make, exc, text):
    c = cache_for()
    with pytest.raises(exc, match=m(text)):
        c.prefill(*make())


def test_parse_options_reads_literals_and_names_bad_items():
    from raas_flex.config import parse_options

    assert parse_options(["refresh=threshold", "refresh_threshold=0.01", "compile_flex=None", "block_size=64"]) == {
        "refresh": "threshold", "refresh_threshold": 0.01, "compile_flex": None, "block_size": 64}
    assert parse_options([]) == {}
    with pytest.raises(ValueError, match="KEY=VALUE, got 'refresh'"):
        parse_options(["refresh"])
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_options(["=3"])
    with pytest.raises(TypeError, match="KEY=VALUE"):
        parse_options([3])
    # the parsed values go through RaaSConfig's own validation
    with pytest.raises(ValueError, match="refresh_ratio"):
        RaaSConfig(budget=256, **parse_options(["refresh_ratio=2.0"]))


@pytest.mark.skipif(kernels.INTERPRET, reason="the interpreter makes CPU caches fusable")
def test_triton_attention_is_refused_where_the_fused_observe_cannot_run():
    """attention='triton' on a CPU cache (no fused kernels there) fails loudly, naming why; the
    attribute keeps its value; fused=False under attention='triton' is refused too."""
    mk = lambda **kw: PagedKVCache(RaaSConfig(budget=32, page_size=8, **kw), batch_size=1, num_heads=2,
                                   num_kv_heads=1, head_dim=16)
    with pytest.raises(ValueError, match=r"attention='triton' is not supported for this cache: (device='cpu'|triton)"):
        mk(attention="triton")
    c = mk()
    assert c.attention == "flex"
    with pytest.raises(ValueError, match="attention='triton' is not supported for this cache"):
        c.attention = "triton"
    with pytest.raises(ValueError, match="attention='fast' is not supported; allowed: 'flex', 'triton'"):
        c.attention = "fast"
    assert c.attention == "flex"
