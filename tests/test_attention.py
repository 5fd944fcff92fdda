"""Decode attention output against a float64 dense reference over exactly the attended tokens.

The reference keeps its own float64 copy of every token written (as rounded to the cache dtype), so
the engine's K/V buffer contents, page table and validity mask are all under test, not assumed:
for raas/h2o/streaming/dense the attended tokens are the resident ones read off the page table;
for quest the selected pages are read off ``cache.valid`` and checked against Quest's rule
(whole pages, open page included, ``budget_pages`` of them, largest float64 bound). The reference
is SDPA in float64 with a boolean mask, GQA through repeat_interleave.

Compiled tests share one small shape (compiles cost ~15-25 s each on a 2-core CPU) through a
module-scoped fixture, run under ``error_on_recompile`` and check that buffers never move or grow.
The GPU section repeats the correctness tests on CUDA in bf16 and fp32, including CUDA-graph
capture (mode="reduce-overhead"); it is skipped without CUDA.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

from raas_flex import PagedKVCache, make_config

D = 16
TOL = {
    torch.float64: dict(atol=1e-10, rtol=1e-10),
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
}
# GPU flex in fp32 uses IEEE fp32 dots unless TF32 is enabled (it is off by default).
GPU_TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


class Seq:
    """Random prompt (left-padded) and decode tokens, with the float64 history the cache must hold."""

    def __init__(self, B, Hq, Hkv, lens, *, dtype=torch.float32, device="cpu", seed=0, head_dim=D):
        self.B, self.Hq, self.H, self.G, self.D = B, Hq, Hkv, Hq // Hkv, head_dim
        self.lens, self.dtype, self.device = list(lens), dtype, torch.device(device)
        self.gen = torch.Generator().manual_seed(seed)
        self.K = [[] for _ in range(B)]  # per row: list of [Hkv, D] float64 tensors, by position
        self.V = [[] for _ in range(B)]
        self.queries = [[] for _ in range(B)]  # decode queries [Hq, D] float64, with their position

    def _rand(self, *shape):
        return torch.randn(*shape, generator=self.gen)

    def _rounded(self, x):
        return x.to(self.dtype).double()

    def prompt(self):
        B, H, D = self.B, self.H, self.D
        n = max(self.lens) + 1
        k, v = self._rand(B, H, n, D), self._rand(B, H, n, D)
        mask = torch.zeros(B, n, dtype=torch.bool)
        for b, nb in enumerate(self.lens):
            mask[b, n - nb:] = True
            for col in range(n - nb, n):
                self.K[b].append(self._rounded(k[b, :, col]))
                self.V[b].append(self._rounded(v[b, :, col]))
        dev = dict(device=self.device, dtype=self.dtype)
        return k.to(**dev), v.to(**dev), mask.to(self.device)

    def next(self):
        """q [B, Hq, 1, D], k, v [B, Hkv, 1, D] on the device, recorded in the history."""
        q, k, v = self._rand(self.B, self.Hq, 1, self.D), self._rand(self.B, self.H, 1, self.D), self._rand(self.B, self.H, 1, self.D)
        for b in range(self.B):
            self.K[b].append(self._rounded(k[b, :, 0]))
            self.V[b].append(self._rounded(v[b, :, 0]))
            self.queries[b].append((len(self.K[b]) - 1, self._rounded(q[b, :, 0])))
        dev = dict(device=self.device, dtype=self.dtype)
        return q.to(**dev), k.to(**dev), v.to(**dev)

    def reference(self, q, attended, scale=None):
        """float64 [B, Hq, 1, D]: SDPA of q over the positions attended[b][h] of each row's history."""
        outs = []
        for b in range(self.B):
            T = len(self.K[b])
            K = torch.stack(self.K[b], 1)[None]  # [1, Hkv, T, D]
            V = torch.stack(self.V[b], 1)[None]
            m = torch.zeros(1, self.H, 1, T, dtype=torch.bool)
            for h in range(self.H):
                m[0, h, 0, attended[b][h]] = True
            K, V, m = (x.repeat_interleave(self.G, dim=1) for x in (K, V, m))
            qb = self._rounded(q[b:b + 1].cpu())
            outs.append(F.scaled_dot_product_attention(qb, K, V, attn_mask=m, scale=scale))
        return torch.cat(outs)

    def dense_causal(self, b, scale=None):
        """Plain causal attention of row b's decode queries over its whole sequence: [Hq, n, D]."""
        K = torch.stack(self.K[b], 1).repeat_interleave(self.G, 0)  # [Hq, T, D]
        V = torch.stack(self.V[b], 1).repeat_interleave(self.G, 0)
        pos = torch.tensor([p for p, _ in self.queries[b]])
        Q = torch.stack([x for _, x in self.queries[b]], 1)  # [Hq, n, D]
        causal = torch.arange(K.shape[1])[None, :] <= pos[:, None]  # [n, T]
        return F.scaled_dot_product_attention(Q, K, V, attn_mask=causal, scale=scale)


def attended_positions(cache: PagedKVCache, seq: Seq) -> list[list[list[int]]]:
    """Logical positions each (row, KV head) attends this step, read off the page table (all
    policies but quest) or off cache.valid after checking it against Quest's rule (quest)."""
    ps, P, policy = cache.ps, cache.P, cache.policy.name
    page_id = cache.page_id.cpu().tolist()
    length = cache.length.cpu().tolist()
    valid = cache.valid.cpu().view(cache.B, cache.H, P, ps).tolist()
    open_slot = cache.open_slot.cpu().tolist()
    out = []
    for b in range(cache.B):
        rows = []
        for h in range(cache.H):
            resident = [i for i in range(P) if page_id[b][h][i] >= 0]
            chosen = resident
            if policy == "quest":
                chosen = [i for i in resident if any(valid[b][h][i])]
                assert open_slot[b][h] in chosen, "quest must attend the open page"
                assert len(chosen) == min(len(resident), cache.config.budget_pages)
                # the chosen pages have the largest bound (float64, from the reference history)
                q = seq.queries[b][-1][1].view(cache.H, cache.G, -1)[h]

                def bound(i):
                    g = page_id[b][h][i]
                    keys = torch.stack([seq.K[b][t][h] for t in range(g * ps, min(g * ps + ps, length[b]))])
                    return torch.maximum(q * keys.amax(0), q * keys.amin(0)).sum(-1).max().item()

                others = [i for i in chosen if i != open_slot[b][h]]
                dropped = [i for i in resident if i not in chosen]
                if others and dropped:
                    assert min(map(bound, others)) >= max(map(bound, dropped)) - 1e-4
            pos = []
            for i in range(P):
                g = page_id[b][h][i]
                for j in range(ps):
                    ok = i in chosen and g * ps + j < length[b]
                    assert valid[b][h][i][j] == ok, (b, h, i, j)  # mask == page table (whole pages)
                    if ok:
                        pos.append(g * ps + j)
            rows.append(pos)
        out.append(rows)
    return out


def assert_step(cache, seq, q, out, tol):
    assert out.shape == q.shape and out.dtype == q.dtype
    expect = seq.reference(q, attended_positions(cache, seq), scale=cache.scale)
    torch.testing.assert_close(out.detach().cpu().double(), expect, **tol)


def make_cache(policy, *, budget, ps, B, Hq, Hkv, head_dim=D, dtype=torch.float32, device="cpu", **kw):
    cfg = make_config(budget, policy, page_size=ps, **kw)
    return PagedKVCache(cfg, batch_size=B, num_heads=Hq, num_kv_heads=Hkv, head_dim=head_dim, dtype=dtype, device=device)


# -- eager ---------------------------------------------------------------------------------------
EAGER_CASES = [
    # policy, (Hq, Hkv), page_size, budget, extra config, dtype
    ("raas", (6, 2), 4, 16, {}, torch.float32),  # G = 3
    ("raas", (7, 1), 2, 8, {"importance": "attention", "refresh": "threshold", "refresh_threshold": 0.05}, torch.float32),
    ("raas", (2, 2), 1, 6, {"refresh_ratio": 1.0}, torch.float64),  # G = 1
    ("quest", (6, 2), 4, 16, {"max_length": 64}, torch.float32),
    ("quest", (12, 2), 2, 8, {"max_length": 64}, torch.float32),  # G = 6
    ("h2o", (6, 1), 4, 16, {}, torch.float32),
    ("streaming", (4, 2), 2, 12, {"sink_tokens": 2}, torch.float32),
    ("dense", (3, 1), 4, 16, {"max_length": 64}, torch.bfloat16),
]


def _case_id(case):
    policy, (hq, hkv), ps, budget, kw, dtype = case
    return f"{policy}-G{hq // hkv}-ps{ps}-L{budget}-{str(dtype).removeprefix('torch.')}" + ("-threshold" if kw.get("refresh") else "")


@pytest.mark.parametrize("policy,heads,ps,budget,kw,dtype", EAGER_CASES, ids=map(_case_id, EAGER_CASES))
def test_eager_matches_float64_reference(policy, heads, ps, budget, kw, dtype):
    Hq, Hkv = heads
    lens = [3, min(budget - ps, 11)]  # B = 2, row 0 left-padded
    seq = Seq(2, Hq, Hkv, lens, dtype=dtype, seed=100 * len(policy) + 10 * Hq + ps)
    cache = make_cache(policy, budget=budget, ps=ps, B=2, Hq=Hq, Hkv=Hkv, dtype=dtype, **kw)
    cache.prefill(*seq.prompt())
    steps = min(40, 64 - max(lens) - 1)
    for _ in range(steps):
        q, k, v = seq.next()
        assert_step(cache, seq, q, cache.decode(q, k, v), TOL[dtype])
    cache.check()
    if cache.policy.bounded:
        assert cache.evictions.min().item() > 0, "the run must exercise eviction"
    if policy == "quest":
        resident = (cache.page_id >= 0).sum(-1)
        attended = cache.valid.view(2, Hkv, cache.P, ps).any(-1).sum(-1)
        assert (attended < resident).all(), "the run must exercise quest's narrowing"


@pytest.mark.parametrize("policy", ["raas", "quest", "h2o", "streaming", "dense"])
def test_budget_covering_sequence_is_dense_causal(policy):
    """With budget >= sequence length every policy is plain dense causal attention."""
    B, Hq, Hkv, ps = 2, 6, 2, 4
    seq = Seq(B, Hq, Hkv, [5, 12], seed=7)
    cache = make_cache(policy, budget=48, ps=ps, B=B, Hq=Hq, Hkv=Hkv, max_length=48)
    cache.prefill(*seq.prompt())
    outs = []
    for _ in range(36 - 12):
        q, k, v = seq.next()
        outs.append(cache.decode(q, k, v))
    assert cache.evictions.sum().item() == 0
    out = torch.cat(outs, 2).double()  # [B, Hq, n, D]
    for b in range(B):
        torch.testing.assert_close(out[b], seq.dense_causal(b, scale=cache.scale), **TOL[torch.float32])


# -- compiled (CPU) ------------------------------------------------------------------------------
COMPILED_SHAPE = dict(B=2, Hq=6, Hkv=2)  # G = 3: not a power of two
COMPILED_CONFIGS = {
    "raas": dict(budget=16, ps=4),  # 4 pages: evicts every 4 tokens once full
    "quest": dict(budget=16, ps=4, max_length=64),  # attends 4 of up to 16 pages
}


@pytest.fixture(scope="module")
def compiled_cache():
    """policy -> (cache, compiled step), compiled once per module for the shared shape."""
    made = {}

    def get(policy):
        if policy not in made:
            cache = make_cache(policy, **COMPILED_CONFIGS[policy], **COMPILED_SHAPE)
            made[policy] = (cache, cache.compiled_decode())
        return made[policy]

    return get


def warm_up(cache, fn, seq):
    """Prefill and one compiled step (compiles on first use; outside error_on_recompile)."""
    cache.prefill(*seq.prompt())
    q, k, v = seq.next()
    assert_step(cache, seq, q, fn(q, k, v), TOL[torch.float32])


@contextlib.contextmanager
def no_recompiles_and_static_memory(cache):
    ptrs = {name: t.data_ptr() for name, t in cache.named_buffers()}
    nbytes = (cache.state_bytes, cache.kv_bytes)
    graphs = counters["stats"]["unique_graphs"]
    with torch._dynamo.config.patch(error_on_recompile=True):
        yield
    assert counters["stats"]["unique_graphs"] == graphs, "the step compiled a new graph"
    assert {name: t.data_ptr() for name, t in cache.named_buffers()} == ptrs
    assert (cache.state_bytes, cache.kv_bytes) == nbytes


@pytest.mark.compiled
@pytest.mark.parametrize("policy", ["raas", "quest"])
def test_compiled_matches_reference_without_recompiles(compiled_cache, policy):
    cache, fn = compiled_cache(policy)
    seq = Seq(B=2, Hq=6, Hkv=2, lens=[5, 9], seed=11)
    warm_up(cache, fn, seq)
    inputs, outs, tables = [], [], []
    with no_recompiles_and_static_memory(cache):
        for _ in range(45):
            q, k, v = seq.next()
            out = fn(q, k, v)
            assert_step(cache, seq, q, out, TOL[torch.float32])
            inputs.append((q, k, v))
            outs.append(out)
            tables.append((cache.page_id.clone(), cache.stamp.clone(), cache.valid.clone()))
    cache.check()
    if policy == "raas":
        assert cache.evictions.min().item() >= 8, "the run must evict pages"
    else:
        attended = cache.valid.view(2, 2, cache.P, cache.ps).any(-1).sum(-1)
        assert (attended == 4).all() and ((cache.page_id >= 0).sum(-1) > 4).all()

    # the compiled step makes the same decisions as the eager one (checked against the
    # plain-Python model in test_policies.py)
    twin = make_cache(policy, **COMPILED_CONFIGS[policy], **COMPILED_SHAPE)
    seq2 = Seq(B=2, Hq=6, Hkv=2, lens=[5, 9], seed=11)
    twin.prefill(*seq2.prompt())
    twin.decode(*seq2.next())
    for (q, k, v), out, (pid, stamp, valid) in zip(inputs, outs, tables):
        torch.testing.assert_close(twin.decode(q, k, v), out, **TOL[torch.float32])
        assert torch.equal(twin.page_id, pid) and torch.equal(twin.stamp, stamp)
        assert torch.equal(twin.valid, valid)


@pytest.mark.compiled
def test_compiled_raas_long_run_no_recompiles(compiled_cache):
    """210 compiled steps (many page opens and evictions): no recompile, no new graph, no buffer
    reallocation, and the output still matches the float64 reference."""
    cache, fn = compiled_cache("raas")
    seq = Seq(B=2, Hq=6, Hkv=2, lens=[5, 9], seed=21)
    warm_up(cache, fn, seq)
    with no_recompiles_and_static_memory(cache):
        for i in range(210):
            q, k, v = seq.next()
            out = fn(q, k, v)
            if i % 15 == 0 or i == 209:
                assert_step(cache, seq, q, out, TOL[torch.float32])
    cache.check()
    assert cache.step.item() == 211 and cache.evictions.min().item() >= 40


@pytest.mark.compiled
@pytest.mark.parametrize("policy", ["raas", "quest"])
def test_compiled_budget_covering_sequence_is_dense_causal(compiled_cache, policy):
    cache, fn = compiled_cache(policy)
    seq = Seq(B=2, Hq=6, Hkv=2, lens=[2, 4], seed=12)
    warm_up(cache, fn, seq)
    outs = []
    with no_recompiles_and_static_memory(cache):
        for _ in range(16 - 4 - 1):  # row 1 ends with exactly budget = 16 tokens
            q, k, v = seq.next()
            outs.append(fn(q, k, v))
    assert cache.length.tolist() == [14, 16] and cache.evictions.sum().item() == 0
    out = torch.cat(outs, 2).double()
    for b in range(2):
        torch.testing.assert_close(out[b], seq.dense_causal(b, scale=cache.scale)[:, 1:], **TOL[torch.float32])


@pytest.mark.compiled
def test_compiled_flex_reads_quests_picked_page_lists():
    """Compiled flex (on CPU too) walks the block lists quest's step passes: its picked pages as
    partial blocks, in bound order. The output equals float64 attention over the attended slots, with
    no recompile; a list one page short changes it (so the kernel does read the lists)."""
    cache = make_cache("quest", budget=16, ps=4, max_length=64, B=2, Hq=6, Hkv=2, compile_flex=True)
    seq = Seq(B=2, Hq=6, Hkv=2, lens=[5, 9], seed=13)
    fn = cache.compiled_decode()
    warm_up(cache, fn, seq)
    with no_recompiles_and_static_memory(cache):
        for _ in range(30):
            q, k, v = seq.next()
            assert_step(cache, seq, q, fn(q, k, v), TOL[torch.float32])
    assert ((cache.page_id >= 0).sum(-1) > cache.budget_pages).all(), "quest must pick among more pages"
    q, _, _ = seq.next()
    kv_num, kv_idx = cache._narrow(q)
    full = cache.attend(q, (kv_num, kv_idx))
    assert not torch.allclose(cache.attend(q, (kv_num - 1, kv_idx)), full)


@pytest.mark.compiled
def test_compiled_flex_with_sinks_compiles_once(monkeypatch):
    """The flex path of a layer with sinks (the torch backend's attention on CUDA; here traced on CPU)
    takes the log-sum-exp through ``return_aux``: flex_attention's deprecated ``return_lse`` adds its
    warning to a global set while it is traced, so the next call fails that guard and compiles the step
    again. 30 compiled steps with evictions: no new graph, outputs equal the written-out CPU path's."""
    import torch.nn.attention.flex_attention as fa

    from raas_flex import AttentionSpec

    monkeypatch.setattr(fa, "_WARNINGS_SHOWN", set())  # as in a process where no flex warning was shown yet
    mk = lambda flex: PagedKVCache(make_config(24, "raas", page_size=4, compile_flex=flex), batch_size=2,  # noqa: E731
                                   num_heads=6, num_kv_heads=2, head_dim=D, spec=AttentionSpec(sinks=True))
    cache, twin = mk(True), mk(False)
    sinks = torch.randn(6, generator=torch.Generator().manual_seed(3))
    cache.set_sinks(sinks)
    twin.set_sinks(sinks)
    seq = Seq(B=2, Hq=6, Hkv=2, lens=[5, 9], seed=17)
    prompt = seq.prompt()
    cache.prefill(*prompt)
    twin.prefill(*prompt)
    fn = cache.compiled_decode(backend="eager")  # (Inductor's CPU flex has no log-sum-exp; the guard is dynamo's)
    q, k, v = seq.next()
    torch.testing.assert_close(fn(q, k, v), twin.decode(q, k, v), **TOL[torch.float32])
    with no_recompiles_and_static_memory(cache):
        for _ in range(30):
            q, k, v = seq.next()
            torch.testing.assert_close(fn(q, k, v), twin.decode(q, k, v), **TOL[torch.float32])
    assert cache.evictions.min().item() > 0 and torch.equal(cache.page_id, twin.page_id)


# -- GPU -----------------------------------------------------------------------------------------
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
GPU_DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")]
# Packed-GQA layout: G = 3 and G = 7 are not powers of two. page_size 16 keeps KV blocks >= 16.
GPU_HEADS = [pytest.param((6, 2), id="G3"), pytest.param((7, 1), id="G7")]
GPU_DEVICE = "cuda"  # a module constant so the GPU code path can be dry-run elsewhere
GPU_CONFIGS = {  # test name -> (policy, config)
    "raas": ("raas", dict(budget=64, ps=16, backend="flex")),  # bookkeeping kernel + flex_attention
    "raas-triton": ("raas", dict(budget=64, ps=16, backend="triton")),  # the whole step in one kernel
    # the same with the attention shares of the kernel's own pass
    "raas-threshold-triton": ("raas", dict(budget=64, ps=16, backend="triton", importance="attention",
                                           refresh="threshold", refresh_threshold=0.05)),
    "h2o-triton": ("h2o", dict(budget=64, ps=16, backend="triton")),
    "quest": ("quest", dict(budget=64, ps=16, max_length=256, backend="flex")),  # the picked pages through flex
    "quest-torch": ("quest", dict(budget=64, ps=16, max_length=256, backend="torch")),
}
GPU_POLICIES = list(GPU_CONFIGS)


def gpu_run(policy, heads, dtype, *, compile_mode, steps=60, lens=(20, 45), seed=3):
    torch._dynamo.reset()  # every GPU test compiles its own graphs from scratch
    Hq, Hkv = heads
    seq = Seq(2, Hq, Hkv, lens, dtype=dtype, device=GPU_DEVICE, seed=seed, head_dim=64)
    base, cfg = GPU_CONFIGS[policy]
    cache = make_cache(base, **cfg, B=2, Hq=Hq, Hkv=Hkv, head_dim=64, dtype=dtype, device=GPU_DEVICE)
    assert cache.backend == cfg.get("backend", "torch")
    cache.prefill(*seq.prompt())
    if compile_mode is None:
        fn = cache.decode
    else:
        fn = cache.compiled_decode() if compile_mode == "default" else cache.compiled_decode(mode=compile_mode)
    for _ in range(3):  # warm-up: compile, and record the CUDA graph under reduce-overhead
        q, k, v = seq.next()
        assert_step(cache, seq, q, fn(q, k, v).clone(), GPU_TOL[dtype])
    skips = counters["inductor"]["cudagraph_skips"]
    ctx = no_recompiles_and_static_memory(cache) if compile_mode else contextlib.nullcontext()
    with ctx:
        for _ in range(steps):
            q, k, v = seq.next()
            out = fn(q, k, v).clone()  # CUDA-graph outputs are overwritten by the next replay
            torch.cuda.synchronize()
            assert_step(cache, seq, q, out, GPU_TOL[dtype])
    assert counters["inductor"]["cudagraph_skips"] == skips, "the step was not CUDA-graphed"
    cache.check()
    if base == "raas":
        assert cache.evictions.min().item() > 0
    return cache


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("policy", GPU_POLICIES)
def test_gpu_eager_matches_float64_reference(policy, dtype):
    gpu_run(policy, (6, 2), dtype, compile_mode=None)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("heads", GPU_HEADS)
@pytest.mark.parametrize("policy", GPU_POLICIES)
def test_gpu_compiled_matches_float64_reference(policy, heads, dtype):
    gpu_run(policy, heads, dtype, compile_mode="default")


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("policy", GPU_POLICIES)
def test_gpu_cuda_graph_step(policy, dtype):
    """mode="reduce-overhead": 200 (raas) / 150 (quest, bounded by its max_length) replayed steps
    with page opens and evictions, no recompiles, buffers static, output equal to the float64
    reference at every step."""
    steps = 150 if policy == "quest" else 200
    cache = gpu_run(policy, (6, 2), dtype, compile_mode="reduce-overhead", steps=steps)
    assert cache.page_state().length.min().item() >= 20 + 3 + steps


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("policy", GPU_POLICIES)
def test_gpu_budget_covering_sequence_is_dense_causal(policy, dtype):
    torch._dynamo.reset()
    Hq, Hkv = 6, 2
    seq = Seq(2, Hq, Hkv, [10, 30], dtype=dtype, device=GPU_DEVICE, seed=5, head_dim=64)
    base, cfg = GPU_CONFIGS[policy]
    cfg = {**cfg, "max_length": 64}
    cache = make_cache(base, **cfg, B=2, Hq=Hq, Hkv=Hkv, head_dim=64, dtype=dtype, device=GPU_DEVICE)
    cache.prefill(*seq.prompt())
    fn = cache.compiled_decode()
    outs = [fn(*seq.next()).clone() for _ in range(64 - 30)]
    assert cache.evictions.sum().item() == 0
    out = torch.cat(outs, 2).double().cpu()
    for b in range(2):
        torch.testing.assert_close(out[b], seq.dense_causal(b, scale=cache.scale), **GPU_TOL[dtype])
