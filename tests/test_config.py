"""Bad input fails loudly: every error is a ValueError/TypeError that names the parameter and the
offending value (checked with pytest.raises(match=...))."""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch

from raas_flex import (H2O, POLICIES, POLICY_CLASSES, Dense, PagedKVCache, Quest, RaaS, RaaSConfig, Streaming, engine,
                       kernels, make_config, make_policy)
from reference import RefCache

D = 16


def m(text: str) -> str:
    """match= pattern for a literal piece of the message."""
    return re.escape(text)


# -- RaaSConfig ----------------------------------------------------------------------------------
CONFIG_ERRORS = [
    # cache-wide settings: (kwargs, exception, text that must appear in the message); raised by
    # RaaSConfig itself and by make_config, which hands these options to it
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
    (dict(budget=32, dense_layers=-1), ValueError, "dense_layers must be >= 0, got -1"),
    (dict(budget=32, max_length=0), ValueError, "max_length must be >= 1, got 0"),
    (dict(budget=32, max_length=True), TypeError, "max_length must be an int, got True"),
    (dict(budget=32, block_size=0), ValueError, "block_size must be >= 1, got 0"),
    (dict(budget=32, policy="quest", block_size=32), ValueError,
     "policy='quest' lists the pages it picks as the flex kernel's KV blocks: block_size must be None or page_size=16, got 32"),
    (dict(budget=32, compile_flex="yes"), TypeError, "compile_flex must be True, False or None, got 'yes'"),
    (dict(budget=32, backend="sdpa"), ValueError, "backend='sdpa' is not supported; allowed: None, 'torch', 'flex', 'triton'"),
    (dict(budget=32, backend="Triton"), ValueError, "backend='Triton' is not supported"),
]


@pytest.mark.parametrize("kw,exc,text", CONFIG_ERRORS, ids=[t for _, _, t in CONFIG_ERRORS])
def test_config_rejects(kw, exc, text):
    with pytest.raises(exc, match=m(text)):
        RaaSConfig(**kw)
    with pytest.raises(exc, match=m(text)):
        make_config(**kw)


def test_policy_must_be_a_name_or_a_policy():
    with pytest.raises(ValueError, match=m("policy=None is not supported")):
        make_config(32, policy=None)
    with pytest.raises(TypeError, match=m("policy must be a policy name or a raas_flex Policy, got None")):
        RaaSConfig(budget=32, policy=None)
    with pytest.raises(TypeError, match=m("got {'policy': 'raas'}")):
        RaaSConfig(budget=32, policy={"policy": "raas"})


NAN, INF = float("nan"), float("inf")
POLICY_ERRORS = [
    # a policy's own options: (policy, options, exception, text). Raised when the policy object is
    # built (RaaS(...), make_policy) and through make_config (what raas_flex.patch uses), budget 32
    ("raas", dict(refresh="lru"), ValueError, "refresh='lru' is not supported"),
    ("raas", dict(importance="norm"), ValueError, "importance='norm' is not supported"),
    ("raas", dict(refresh_ratio=0.0), ValueError, "refresh_ratio=0.0 must be in (0, 1]"),
    ("raas", dict(refresh_ratio=-0.5), ValueError, "refresh_ratio=-0.5 must be in (0, 1]"),
    ("raas", dict(refresh_ratio=1.5), ValueError, "refresh_ratio=1.5 must be in (0, 1]"),
    ("raas", dict(refresh_ratio=NAN), ValueError, "refresh_ratio=nan"),
    ("raas", dict(refresh_ratio=INF), ValueError, "refresh_ratio=inf"),
    ("raas", dict(refresh_ratio="0.5"), TypeError, "refresh_ratio must be a float, got '0.5'"),
    ("raas", dict(refresh_ratio=True), TypeError, "refresh_ratio must be a float, got True"),
    ("raas", dict(refresh_threshold=1.0, refresh="threshold", importance="attention"), ValueError,
     "refresh_threshold=1.0 must be in [0, 1)"),
    ("raas", dict(refresh_threshold=-0.1), ValueError, "refresh_threshold=-0.1 must be in [0, 1)"),
    ("raas", dict(refresh_threshold=NAN), ValueError, "refresh_threshold=nan"),
    ("raas", dict(refresh_threshold="1e-4"), TypeError, "refresh_threshold must be a float, got '1e-4'"),
    ("raas", dict(refresh="threshold"), ValueError, "importance='bound'"),
    ("raas", dict(refresh="threshold", importance="bound"), ValueError, "refresh='threshold'"),
    ("raas", dict(pin_prompt="yes"), TypeError, "pin_prompt must be True or False, got 'yes'"),
    ("raas", dict(pin_prompt=1), TypeError, "pin_prompt must be True or False, got 1"),
    ("raas", dict(pin_prompt=None), TypeError, "pin_prompt must be True or False, got None"),
    ("h2o", dict(pin_prompt="yes"), TypeError, "pin_prompt must be True or False, got 'yes'"),
    ("streaming", dict(sink_tokens=-1), ValueError, "sink_tokens must be >= 0, got -1"),
    ("streaming", dict(sink_tokens=2.0), TypeError, "sink_tokens must be an int, got 2.0"),
    ("streaming", dict(sink_tokens=True), TypeError, "sink_tokens must be an int, got True"),
]


@pytest.mark.parametrize("policy,kw,exc,text", POLICY_ERRORS, ids=[t for *_, t in POLICY_ERRORS])
def test_policy_rejects(policy, kw, exc, text):
    with pytest.raises(exc, match=m(text)):
        POLICY_CLASSES[policy](**kw)
    with pytest.raises(exc, match=m(text)):
        make_policy(policy, **kw)
    with pytest.raises(exc, match=m(text)):
        make_config(32, policy, **kw)


BUDGET_ERRORS = [
    # options that are valid alone but not at this budget: checked when the configuration is built
    (Streaming(sink_tokens=17), dict(budget=32, page_size=16), "sink_tokens=17 takes 2 pages"),
    (Streaming(sink_tokens=16), dict(budget=16, page_size=8), "sink_tokens=16 takes 2 pages of the budget's 2"),
]


@pytest.mark.parametrize("policy,kw,text", BUDGET_ERRORS, ids=[t for *_, t in BUDGET_ERRORS])
def test_config_rejects_policy_at_budget(policy, kw, text):
    with pytest.raises(ValueError, match=m(text)):
        RaaSConfig(policy=policy, **kw)
    options = {f.name: getattr(policy, f.name) for f in dataclasses.fields(policy)}
    with pytest.raises(ValueError, match=m(text)):
        make_config(policy=policy.name, **kw, **options)


def test_unknown_names_list_the_allowed_ones():
    with pytest.raises(ValueError, match=m("allowed: " + ", ".join(map(repr, POLICIES)))):
        RaaSConfig(budget=32, policy="lru")
    with pytest.raises(ValueError, match=m("allowed: 'topk', 'threshold'")):
        RaaS(refresh="lru")
    with pytest.raises(ValueError, match=m("allowed: 'topk', 'threshold'")):
        make_config(32, refresh="lru")
    with pytest.raises(ValueError, match=m("allowed: 'bound', 'attention'")):
        RaaS(importance="norm")
    with pytest.raises(ValueError, match=m("allowed: 'bound', 'attention'")):
        make_config(32, importance="norm")


def test_unknown_options_are_type_errors_listing_the_allowed_ones():
    cache_wide = "page_size, dense_layers, max_length, block_size, backend, compile_flex"
    with pytest.raises(TypeError, match=m("policy='raas' got an unknown option 'refresh_rate'; allowed: pin_prompt, "
                                          "importance, refresh, refresh_ratio, refresh_threshold, " + cache_wide)):
        make_config(32, refresh_rate=0.5)
    # an option of another policy says so
    with pytest.raises(TypeError, match=m("policy='h2o' got an unknown option 'sink_tokens' ('sink_tokens' belongs "
                                          "to another policy); allowed: pin_prompt, " + cache_wide)):
        make_config(32, "h2o", sink_tokens=4)
    with pytest.raises(TypeError, match=m("policy='quest' got an unknown option 'refresh_ratio' ('refresh_ratio' belongs")):
        make_policy("quest", refresh_ratio=0.5)
    # the options of the old flat configuration that are gone
    for old in ("attention", "fused"):
        with pytest.raises(TypeError, match=m(f"got an unknown option {old!r}") + ".*" + m("backend")):
            make_config(32, **{old: True})
        with pytest.raises(TypeError, match=old):
            RaaSConfig(budget=32, **{old: True})
    # a policy object carries its options: giving them again is an error, not a silent override
    with pytest.raises(TypeError, match=m("options ['refresh_ratio'] are not cache-wide options and policy is "
                                          "already a RaaS object")):
        make_config(32, RaaS(), refresh_ratio=0.25)
    with pytest.raises(TypeError, match=m("options ['sink_tokens'] given with a Streaming object")):
        make_policy(Streaming(), sink_tokens=8)
    with pytest.raises(TypeError):
        RaaS(sink_tokens=4)


def test_make_config_splits_options_between_policy_and_cache():
    cfg = make_config(64, "raas", refresh_ratio=0.25, importance="attention", page_size=8, dense_layers=1,
                      backend="torch")
    assert cfg.policy == RaaS(refresh_ratio=0.25, importance="attention")
    assert (cfg.budget, cfg.page_size, cfg.dense_layers, cfg.backend) == (64, 8, 1, "torch")
    assert cfg == RaaSConfig(budget=64, policy=RaaS(refresh_ratio=0.25, importance="attention"), page_size=8,
                             dense_layers=1, backend="torch")
    assert make_config(64, "streaming", sink_tokens=20).policy == Streaming(sink_tokens=20)
    assert make_config(64, Quest(), max_length=100).policy == Quest()
    assert make_config(64).policy == RaaS() == RaaSConfig(budget=64).policy
    assert RaaSConfig(budget=64, policy="h2o").policy == H2O()
    # defaults the policies own
    assert RaaS().pin_prompt and not any(P().pin_prompt for P in (Quest, H2O, Streaming, Dense))
    assert (RaaS().importance, RaaS().refresh, RaaS().refresh_ratio, RaaS().refresh_threshold) == ("bound", "topk", 0.125, 1e-4)
    assert Streaming().sink_tokens == 4
    # what the configuration used to derive now comes from the policy
    assert [make_config(64, p, max_length=64).policy.bounded for p in POLICIES] == [True, False, True, True, False]
    assert [POLICY_CLASSES[p].narrows for p in POLICIES] == [False, True, False, False, False]
    cfg = make_config(128, "raas", refresh_ratio=0.25)  # 8 pages
    assert cfg.policy.refresh_pages(cfg.budget_pages) == 2
    # rounded down, and at least one page: 0.125 * 8 = 1, 0.125 * 15 = 1.875 -> 1, 0.4 * 2 = 0.8 -> 1, 0.5 * 15 -> 7
    assert [RaaS(refresh_ratio=r).refresh_pages(p) for r, p in ((0.125, 8), (0.125, 15), (0.4, 2), (0.5, 15))] == [1, 1, 1, 7]
    assert make_config(128, "streaming", sink_tokens=17).policy.sink_pages(16) == 2
    assert H2O.recent_pages(8) == 4 and H2O.recent_pages(5) == 3
    assert RaaS().fused_observe and not RaaS(importance="attention").fused_observe
    assert not RaaS(importance="attention", refresh="threshold").fused_observe
    assert not any(P().fused_observe for P in (Quest, H2O, Streaming, Dense))
    assert [RaaS().step_observe, RaaS(importance="attention").step_observe,
            RaaS(importance="attention", refresh="threshold").step_observe, H2O().step_observe,
            Streaming().step_observe, Dense().step_observe] == [0, 1, 2, 3, 4, 4]
    assert Quest().step_observe is None
    assert RaaS(refresh_ratio=0.25, refresh_threshold=0.5).kernel_params(8, 16) == (0, 0, 2, 0.5)
    assert H2O().kernel_params(5, 16) == (0, 3, 0, 0.0) and Streaming(sink_tokens=17).kernel_params(8, 16)[0] == 2
    assert [POLICY_CLASSES[p].append_code for p in POLICIES] == [0, 3, 2, 1, 3]  # quest: dense's rule


def test_policies_are_frozen_and_hashable():
    pol = RaaS()
    with pytest.raises(dataclasses.FrozenInstanceError):
        pol.refresh_ratio = 0.25
    assert hash(RaaS(refresh_ratio=0.25)) == hash(RaaS(refresh_ratio=0.25))
    assert RaaS(refresh_ratio=0.25) != RaaS()
    assert dataclasses.replace(pol, refresh_ratio=0.25).refresh_ratio == 0.25
    with pytest.raises(ValueError, match=m("refresh_ratio=2.0 must be in (0, 1]")):
        dataclasses.replace(pol, refresh_ratio=2.0)


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
    make_config(**kw)


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
    """A cache of the given options (pin_prompt=None: the policy's default)."""
    kw = {k: v for k, v in kw.items() if not (k == "pin_prompt" and v is None)}
    cfg = make_config(budget, policy, page_size=ps, **kw)
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
    # the parsed values go through the policy's own validation
    with pytest.raises(ValueError, match=m("refresh_ratio=2.0 must be in (0, 1]")):
        make_config(256, **parse_options(["refresh_ratio=2.0"]))
    cfg = make_config(256, **parse_options(["refresh=threshold", "importance=attention", "refresh_threshold=0.01",
                                            "page_size=8", "compile_flex=None"]))
    assert cfg.policy == RaaS(refresh="threshold", importance="attention", refresh_threshold=0.01)
    assert (cfg.page_size, cfg.compile_flex) == (8, None)


def test_parse_spec_names_the_policy_and_its_options():
    from raas_flex.config import parse_spec

    assert parse_spec("raas") == ("raas", {})
    assert parse_spec("raas:importance=attention,refresh=threshold") == (
        "raas", {"importance": "attention", "refresh": "threshold"})
    assert parse_spec("streaming:sink_tokens=16,page_size=8") == ("streaming", {"sink_tokens": 16, "page_size": 8})
    name, options = parse_spec("raas:refresh_ratio=0.25")
    assert make_config(64, name, **options).policy == RaaS(refresh_ratio=0.25)
    with pytest.raises(ValueError, match=m("policy 'lru' is not one of raas, quest, h2o, streaming, dense")):
        parse_spec("lru:refresh=topk")
    for bad in ("", None):
        with pytest.raises(ValueError, match="'POLICY' or 'POLICY:KEY=VALUE"):
            parse_spec(bad)
    with pytest.raises(ValueError, match="KEY=VALUE, got 'refresh'"):
        parse_spec("raas:refresh")


# -- backend ----------------------------------------------------------------------------------------
def _cache(config, **kw):
    return PagedKVCache(config, batch_size=1, num_heads=2, num_kv_heads=1, head_dim=16, **kw)


def test_backend_is_resolved_at_construction_and_read_only():
    c = _cache(RaaSConfig(budget=32, page_size=8))
    assert c.backend == "torch"  # None on a CPU cache: the torch code
    for policy in POLICIES:
        assert _cache(make_config(32, policy, page_size=8, backend="torch", max_length=64)).backend == "torch"
    with pytest.raises(AttributeError):
        c.backend = "triton"
    assert c.backend == "torch"
    for gone in ("fused", "attention", "observe_in_append", "static_lists", "kernel_options", "compile_flex"):
        assert not hasattr(c, gone), gone


@pytest.mark.skipif(kernels.interpreting(), reason="the interpreter makes CPU caches fusable")
@pytest.mark.parametrize("backend", ["flex", "triton"])
def test_fused_backend_is_refused_on_cpu(backend):
    """backend='flex'/'triton' on a CPU cache (no fused kernels there) fails loudly, naming why."""
    with pytest.raises(ValueError, match=m(f"backend={backend!r} is not supported for this cache: ")
                       + "(device='cpu'|triton)" + ".*" + m("use backend=None (the fastest supported) or backend='torch'")):
        _cache(RaaSConfig(budget=32, page_size=8, backend=backend))


BACKEND_ERRORS = [
    # (backend, policy, page_size, text): what a fused backend cannot serve, on a device where the kernels run
    ("triton", RaaS(importance="attention"), 12,
     "the one-kernel step sums attention shares over pages of 2^n tokens; got page_size=12"),
    ("triton", H2O(), 6, "the one-kernel step sums attention shares over pages of 2^n tokens; got page_size=6"),
]


@pytest.mark.parametrize("backend,policy,page_size,text", BACKEND_ERRORS,
                         ids=[f"{b}-{i}" for i, (b, *_) in enumerate(BACKEND_ERRORS)])
def test_fused_backend_is_refused_for_policies_it_does_not_serve(monkeypatch, backend, policy, page_size, text):
    """The policy checks of resolve_backend, on a device the kernels serve (simulated: the device/dtype
    check says yes), so that they run on CPU."""
    monkeypatch.setattr(kernels, "unsupported_reason", lambda *args, **kwargs: None)
    cfg = RaaSConfig(budget=36, page_size=page_size, policy=policy, backend=backend, max_length=72)
    with pytest.raises(ValueError, match=m(f"backend={backend!r} is not supported for this cache: ") + ".*" + m(text)):
        engine.resolve_backend(cfg, torch.device("cpu"), torch.float32)
    # what they serve is accepted; None picks the fastest checked one on CUDA, the torch code elsewhere
    for pol, best in ((RaaS(), "triton"), (RaaS(importance="attention"), "triton"),
                      (RaaS(importance="attention", refresh="threshold"), "triton"), (H2O(), "triton"),
                      (Streaming(), "triton"), (Quest(), "triton"), (Dense(), "triton")):
        cfg = RaaSConfig(budget=32, page_size=8, policy=pol, max_length=64)
        assert engine.resolve_backend(cfg, torch.device("cuda"), torch.float16) == best
        assert engine.resolve_backend(cfg, torch.device("cpu"), torch.float16) == "torch"
        assert engine.resolve_backend(cfg.replace(backend="torch"), torch.device("cuda"), torch.float16) == "torch"
    for pol in (RaaS(importance="attention"), RaaS(importance="attention", refresh="threshold"), H2O()):
        cfg = RaaSConfig(budget=32, page_size=8, policy=pol, max_length=64, backend="triton")
        assert engine.resolve_backend(cfg, torch.device("cuda"), torch.float16) == "triton"
    assert engine.resolve_backend(RaaSConfig(budget=32, backend="flex"), torch.device("cpu"), torch.float32) == "flex"
    # attention shares are summed per page of 2^n tokens: other page sizes take the flex path
    for pol in (RaaS(importance="attention"), H2O()):
        cfg = RaaSConfig(budget=48, page_size=12, policy=pol)
        assert engine.resolve_backend(cfg, torch.device("cuda"), torch.float16) == "flex"
        with pytest.raises(ValueError, match=m("over pages of 2^n tokens; got page_size=12")):
            engine.resolve_backend(cfg.replace(backend="triton"), torch.device("cuda"), torch.float16)
    assert engine.resolve_backend(RaaSConfig(budget=48, page_size=12), torch.device("cuda"), torch.float16) == "triton"
