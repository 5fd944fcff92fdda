"""The fused Triton bookkeeping kernels (raas_flex.kernels) against the torch code they replace.

Two caches with the same config, one with ``fused=False`` (the torch reference) and one with
``fused=True``, take the same prompt and the same decode inputs:

- "resync" runs copy the reference's state into the fused cache before every step, then compare the
  state after it: page ids, pinned flags, open slot, lengths, step, evictions, overflow, K/V buffers,
  key max/min and the validity mask must be identical; scores close (the page bound is an fp32
  reduction whose order differs between Inductor and the kernel); stamps identical except where two
  pages' bounds differ by rounding only at the top-k boundary (checked); outputs within bf16
  tolerance. Inputs are random normals.
- "exact" runs never resync and use small integer-valued inputs, so every bound is an exactly
  representable sum whatever the order: the whole trajectory (hundreds of steps, frequent exact
  ties in the bounds and eviction keys) must match bit for bit, scores included.

GPU tests run eagerly, compiled with fullgraph=True and with mode="reduce-overhead" (no CUDA-graph
skips), under ``error_on_recompile``. They need CUDA and are skipped without it. On CPU the switch's
validation is tested, and, when Triton is installed, a short run through Triton's interpreter (in a
subprocess, since TRITON_INTERPRET must be set before Triton loads); CI has no Triton and skips it.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch._dynamo.utils import counters

from raas_flex import PagedKVCache, RaaSConfig, kernels, masks

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
STATE = ("k", "v", "page_id", "stamp", "pinned", "score", "kmax", "kmin", "open_slot", "length", "step",
         "evictions", "overflow")
EXACT = ("page_id", "pinned", "open_slot", "length", "step", "evictions", "overflow", "k", "v", "kmax", "kmin",
         "valid")


def make_pair(policy, *, B, Hq, Hkv, D, budget, ps, dtype, device, **kw):
    cfg = RaaSConfig(budget=budget, page_size=ps, policy=policy, **kw)
    mk = lambda fused: PagedKVCache(cfg.replace(fused=fused), batch_size=B, num_heads=Hq, num_kv_heads=Hkv,
                                    head_dim=D, dtype=dtype, device=device)
    return mk(False), mk(True)


class Inputs:
    """Prompt and decode inputs on the device: normals, or integers in [-3, 3] (exact in bf16)."""

    def __init__(self, B, Hq, Hkv, D, *, dtype, device, integer, seed):
        self.B, self.Hq, self.H, self.D = B, Hq, Hkv, D
        self.dtype, self.device, self.integer = dtype, device, integer
        self.gen = torch.Generator().manual_seed(seed)

    def rand(self, *shape):
        if self.integer:
            x = torch.randint(-3, 4, shape, generator=self.gen).float()
        else:
            x = torch.randn(*shape, generator=self.gen)
        return x.to(self.device, self.dtype)

    def prompt(self, lens):
        n = max(max(lens), 1)
        mask = torch.arange(n)[None, :] >= (n - torch.tensor(lens))[:, None]  # left padding
        return self.rand(self.B, self.H, n, self.D), self.rand(self.B, self.H, n, self.D), mask.to(self.device)

    def step(self):
        return self.rand(self.B, self.Hq, 1, self.D), self.rand(self.B, self.H, 1, self.D), self.rand(self.B, self.H, 1, self.D)


def assert_same_step(ref, fus, out_ref, out_fus, *, exact: bool, tol) -> None:
    """The fused cache made the same state change as the reference (see module doc)."""
    for name in EXACT:
        a, b = getattr(ref, name), getattr(fus, name)
        assert torch.equal(a, b), f"{name} differs:\n{a}\n{b}"
    if exact:
        assert torch.equal(ref.score, fus.score), "score differs"
        assert torch.equal(ref.stamp, fus.stamp), f"stamp differs:\n{ref.stamp}\n{fus.stamp}"
    else:
        torch.testing.assert_close(fus.score, ref.score, rtol=1e-4, atol=1e-3)
        assert_stamps_near_tie(ref, fus)
    if fus.fused:  # exact block lists from the append kernel
        want = masks.block_lists(ref.valid, fus.block)
        got = (fus._fkv_num, fus._fkv_idx, fus._ffull_num, fus._ffull_idx)
        for name, a, b in zip(("kv_num", "kv_idx", "full_num", "full_idx"), want, got):
            assert torch.equal(a, b), f"block list {name} differs:\n{a}\n{b}"
    torch.testing.assert_close(out_fus, out_ref, **tol)


def assert_stamps_near_tie(ref, fus) -> None:
    """Stamps may differ only at pages whose importance equals, up to rounding, the k-th largest of
    their row (top-k rule) or the threshold (threshold rule): there the two fp32 computations can
    decide differently."""
    diff = ref.stamp != fus.stamp
    if not diff.any():
        return
    cfg = ref.config
    assert cfg.policy == "raas", f"stamps differ under {cfg.policy}"
    score, page_id = ref.score.cpu(), ref.page_id.cpu()
    if cfg.refresh == "threshold":
        for b, h, p in diff.nonzero().tolist():
            assert abs(score[b, h, p].item() - cfg.refresh_threshold) <= 1e-5, (b, h, p, score[b, h, p].item())
        return
    K = cfg.refresh_pages
    for b, h in {(b, h) for b, h, _ in diff.nonzero().tolist()}:
        res = page_id[b, h] >= 0
        s = score[b, h][res].sort(descending=True).values
        assert len(s) > K, "every resident page is refreshed: stamps cannot differ"
        kth, tol = s[K - 1].item(), 1e-4 * (s.abs().max().item() + 1)
        for p in diff[b, h].nonzero().flatten().tolist():
            assert abs(score[b, h, p].item() - kth) <= tol, (
                f"stamp of page slot {p} (row {b}, head {h}) differs and its bound {score[b, h, p].item()} "
                f"is not at the top-{K} boundary {kth}")


@contextlib.contextmanager
def no_recompiles(*caches):
    ptrs = [{n: t.data_ptr() for n, t in c.named_buffers()} for c in caches]
    graphs = counters["stats"]["unique_graphs"]
    with torch._dynamo.config.patch(error_on_recompile=True):
        yield
    assert counters["stats"]["unique_graphs"] == graphs, "a step compiled a new graph"
    assert [{n: t.data_ptr() for n, t in c.named_buffers()} for c in caches] == ptrs, "a buffer moved"


def twin_run(policy, *, B, Hq, Hkv, D, budget, ps, lens, steps, mode, integer, dtype=torch.bfloat16,
             device="cuda", seed=0, warm=3, lists_in_regs=True, observe_in_append=True, attention="flex",
             knobs=None, **kw):
    """Run the reference and fused caches side by side; ``integer`` = exact mode (no resync).
    ``lists_in_regs=False`` makes the append kernel count block occupancy by reading ``valid`` back
    (its path for large rows) instead of from registers. ``attention="triton"`` runs the fused cache's
    attention (and observe) in kernels.fused_step / fused_attend_observe; ``knobs`` sets kernels
    module attributes (tuning knobs) for the run. Knobs are read when Inductor lowers the step, so
    runs that set one compile with the compile caches off (a cached graph would carry other knobs)."""
    if knobs or not lists_in_regs:
        knobs = dict(knobs or {})
        if not lists_in_regs:
            knobs["LISTS_IN_REGS_MAX"] = 0  # (count block occupancy by reading `valid` back)
        saved = {name: getattr(kernels, name) for name in knobs}
        for name, value in knobs.items():
            setattr(kernels, name, value)
        try:
            with torch.compiler.config.patch(force_disable_caches=True):
                return twin_run(policy, B=B, Hq=Hq, Hkv=Hkv, D=D, budget=budget, ps=ps, lens=lens, steps=steps,
                                mode=mode, integer=integer, dtype=dtype, device=device, seed=seed, warm=warm,
                                observe_in_append=observe_in_append, attention=attention, **kw)
        finally:
            for name, value in saved.items():
                setattr(kernels, name, value)
    torch._dynamo.reset()
    ref, fus = make_pair(policy, B=B, Hq=Hq, Hkv=Hkv, D=D, budget=budget, ps=ps, dtype=dtype, device=device, **kw)
    assert fus.fused and not ref.fused
    fus.observe_in_append = observe_in_append
    fus.attention = attention
    assert fus.fused_observe == kernels.observe_fusable(ref.config)
    inp = Inputs(B, Hq, Hkv, D, dtype=dtype, device=device, integer=integer, seed=seed)
    prompt = inp.prompt(lens)
    ref.prefill(*prompt)
    fus.prefill(*prompt)
    if mode == "eager":
        fns = (ref.decode, fus.decode)
    else:
        kwargs = {} if mode == "default" else dict(mode=mode)
        fns = (ref.compiled_decode(**kwargs), fus.compiled_decode(**kwargs))
    graphed = mode == "reduce-overhead"
    tol = dict(atol=2e-2, rtol=2e-2) if dtype != torch.float32 else dict(atol=1e-4, rtol=1e-4)

    def one_step():
        if not integer:  # resync: both start the step from the reference's state
            for name in STATE:
                getattr(fus, name).copy_(getattr(ref, name))
        q, k, v = inp.step()
        outs = []
        for fn in fns:
            if graphed:
                torch.compiler.cudagraph_mark_step_begin()
            outs.append(fn(q, k, v).clone())  # CUDA-graph outputs are overwritten by the next replay
        if device != "cpu":
            torch.cuda.synchronize()
        assert_same_step(ref, fus, *outs, exact=integer, tol=tol)

    for _ in range(warm):  # compiles, records the CUDA graphs
        one_step()
    skips = counters["inductor"]["cudagraph_skips"]
    ctx = no_recompiles(ref, fus) if mode != "eager" else contextlib.nullcontext()
    with ctx:
        for _ in range(steps):
            one_step()
    assert counters["inductor"]["cudagraph_skips"] == skips, "the step was not CUDA-graphed"
    return ref, fus


# -- the switch (CPU; needs neither CUDA nor Triton) ------------------------------------------------
def _cpu_cache(**kw):
    return PagedKVCache(RaaSConfig(budget=32, page_size=8, **kw), batch_size=1, num_heads=2, num_kv_heads=1,
                        head_dim=16)


@pytest.mark.skipif(kernels.INTERPRET, reason="the interpreter makes CPU caches fusable")
def test_fused_switch_on_cpu():
    c = _cpu_cache()
    assert c.fused is False and c.fused_observe is False  # None: fused only where supported
    assert _cpu_cache(fused=False).fused is False
    with pytest.raises(ValueError, match=r"fused=True is not supported for this cache: (device='cpu'|triton)"):
        _cpu_cache(fused=True)
    with pytest.raises(ValueError, match="fused=True is not supported"):
        c.fused = True
    assert c.fused is False
    with pytest.raises(TypeError, match="fused must be True, False or None, got 'yes'"):
        c.fused = "yes"
    with pytest.raises(TypeError, match="fused must be True, False or None, got 1"):
        RaaSConfig(budget=32, fused=1)
    c.fused = None
    assert c.fused is False


def test_unsupported_reasons():
    cfg = RaaSConfig(budget=32, page_size=8)
    if not kernels.HAS_TRITON:
        assert kernels.unsupported_reason(cfg, torch.device("cuda"), torch.bfloat16) == "triton is not installed"
        return
    cuda = torch.device("cuda")
    assert kernels.unsupported_reason(cfg, cuda, torch.bfloat16) is None
    assert "policy='quest'" in kernels.unsupported_reason(cfg.replace(policy="quest", max_length=64), cuda, torch.bfloat16)
    assert "dtype=float64" in kernels.unsupported_reason(cfg, cuda, torch.float64)
    assert kernels.observe_fusable(cfg)
    assert not kernels.observe_fusable(cfg.replace(importance="attention", refresh="threshold"))
    assert not kernels.observe_fusable(cfg.replace(policy="h2o"))


INTERPRETER_SCRIPT = textwrap.dedent("""
    import sys, torch
    sys.path[:0] = [{tests!r}]
    import test_kernels as t
    cases = [
        ("raas", dict(B=2, Hq=6, Hkv=2, D=16, budget=32, ps=4, lens=[3, 26], integer=True,
                      block_size=8)),
        ("raas", dict(B=1, Hq=4, Hkv=2, D=16, budget=24, ps=8, lens=[10], integer=False, pin_prompt=False,
                      lists_in_regs=False)),
        ("raas", dict(B=2, Hq=6, Hkv=2, D=16, budget=32, ps=4, lens=[3, 26], integer=True,
                      block_size=8, observe_in_append=False)),
        ("raas", dict(B=1, Hq=3, Hkv=1, D=16, budget=64, ps=4, lens=[50], integer=True, refresh_ratio=0.25)),
        # the defaults (4 programs per row on CPU, 16 pages: the observer, its bounds as one matrix
        # product, and the lazy page choice), and 4 programs without them
        ("raas", dict(B=1, Hq=6, Hkv=2, D=16, budget=64, ps=4, lens=[58], integer=True, attention="triton",
                      knobs=dict(ATTEND_BLOCK_N=16), pin_prompt=False, steps=20)),
        ("raas", dict(B=1, Hq=6, Hkv=2, D=16, budget=64, ps=4, lens=[58], integer=True, attention="triton",
                      knobs=dict(ATTEND_BLOCK_N=16, ATTEND_OBSERVER=False), pin_prompt=False, steps=20)),
        ("raas", dict(B=1, Hq=7, Hkv=1, D=16, budget=40, ps=4, lens=[30], integer=False, attention="triton",
                      knobs=dict(ATTEND_BLOCK_N=16, ATTEND_BOUND_ELEMS=32, ATTEND_OBSERVER=False), pin_prompt=False,
                      steps=20)),
        ("raas", dict(B=1, Hq=4, Hkv=2, D=16, budget=32, ps=4, lens=[28], integer=True, attention="triton",
                      knobs=dict(ATTEND_BLOCK_N=16, ATTEND_BOUND_ELEMS=32, ATTEND_OBSERVER=False),
                      observe_in_append=False, steps=20)),
        # the bounds as matrix products (ATTEND_BOUND_DOT), in the step and in the transformers-path kernel
        ("raas", dict(B=1, Hq=6, Hkv=2, D=16, budget=64, ps=4, lens=[58], integer=True, attention="triton",
                      knobs=dict(ATTEND_BLOCK_N=16, ATTEND_BOUND_DOT=True, ATTEND_OBSERVER=False), pin_prompt=False,
                      steps=20)),
        ("raas", dict(B=1, Hq=4, Hkv=2, D=16, budget=32, ps=4, lens=[28], integer=True, attention="triton",
                      knobs=dict(ATTEND_BLOCK_N=16, ATTEND_BOUND_DOT=True, ATTEND_OBSERVER=False),
                      observe_in_append=False, steps=20)),
        # an observer program per row (ATTEND_OBSERVER): bounds as dots in one product and in chunks of
        # 16 pages (32 pages), and element-wise in one chunk and in several
        ("raas", dict(B=2, Hq=6, Hkv=2, D=16, budget=64, ps=4, lens=[20, 58], integer=True, attention="triton",
                      knobs=dict(ATTEND_BLOCK_N=16, ATTEND_OBSERVER=True), pin_prompt=False, steps=20)),
        ("raas", dict(B=1, Hq=6, Hkv=2, D=16, budget=128, ps=4, lens=[120], integer=True, attention="triton",
                      knobs=dict(ATTEND_BLOCK_N=16, ATTEND_OBSERVER=True, ATTEND_OBSERVER_BOUND_ELEMS=256,
                                 ATTEND_OBSERVER_CHUNK_ELEMS=256), pin_prompt=False, steps=20)),
        ("raas", dict(B=2, Hq=6, Hkv=2, D=16, budget=64, ps=4, lens=[20, 58], integer=True, attention="triton",
                      knobs=dict(ATTEND_BLOCK_N=16, ATTEND_OBSERVER=True, ATTEND_OBSERVER_BOUND_DOT=False),
                      pin_prompt=False, steps=20)),
        ("raas", dict(B=1, Hq=7, Hkv=1, D=16, budget=40, ps=4, lens=[30], integer=False, attention="triton",
                      knobs=dict(ATTEND_BLOCK_N=16, ATTEND_OBSERVER_BOUND_DOT=False, ATTEND_OBSERVER_BOUND_ELEMS=32,
                                 ATTEND_OBSERVER_CHUNK_ELEMS=32, ATTEND_OBSERVER=True), steps=20)),
        ("raas", dict(B=1, Hq=6, Hkv=2, D=16, budget=64, ps=4, lens=[58], integer=True, attention="triton",
                      knobs=dict(ATTEND_BLOCK_N=16, ATTEND_BOUND_DOT=True, ATTEND_OBSERVER=True, ATTEND_SPLIT=1),
                      pin_prompt=False, steps=20)),
        ("raas", dict(B=2, Hq=4, Hkv=2, D=16, budget=32, ps=4, lens=[28, 9], integer=True, attention="triton",
                      knobs=dict(ATTEND_BLOCK_N=16, ATTEND_OBSERVER_BOUND_DOT=False, ATTEND_OBSERVER_BOUND_ELEMS=32,
                                 ATTEND_OBSERVER_CHUNK_ELEMS=32, ATTEND_OBSERVER=True),
                      observe_in_append=False, steps=20)),
        # the page choice only when a page opens (ATTEND_LAZY_SLOT), alone and with the observer
        ("raas", dict(B=2, Hq=6, Hkv=2, D=16, budget=32, ps=4, lens=[27, 5], integer=True, attention="triton",
                      knobs=dict(ATTEND_BLOCK_N=16, ATTEND_LAZY_SLOT=True, ATTEND_OBSERVER=False), steps=24)),
        ("raas", dict(B=1, Hq=7, Hkv=1, D=16, budget=40, ps=4, lens=[30], integer=False, attention="triton",
                      knobs=dict(ATTEND_BLOCK_N=16, ATTEND_LAZY_SLOT=True, ATTEND_OBSERVER=True), pin_prompt=False,
                      steps=20)),
        # the bound loops software-pipelined (ATTEND_BOUND_STAGES): the observer's, and each program's
        # share over several chunks (2 programs per row)
        ("raas", dict(B=1, Hq=7, Hkv=1, D=16, budget=40, ps=4, lens=[30], integer=False, attention="triton",
                      knobs=dict(ATTEND_BLOCK_N=16, ATTEND_OBSERVER_BOUND_DOT=False, ATTEND_OBSERVER_BOUND_ELEMS=32,
                                 ATTEND_OBSERVER_CHUNK_ELEMS=32, ATTEND_OBSERVER=True, ATTEND_BOUND_STAGES=2),
                      steps=20)),
        ("raas", dict(B=2, Hq=6, Hkv=2, D=16, budget=64, ps=4, lens=[20, 58], integer=True, attention="triton",
                      knobs=dict(ATTEND_BLOCK_N=16, ATTEND_BOUND_ELEMS=32, ATTEND_OBSERVER=False, ATTEND_SPLIT=2,
                                 ATTEND_BOUND_STAGES=3), pin_prompt=False, steps=20)),
        # the lean row writes (ATTEND_LEAN_ROW_WRITES): the observer's (blocks of 2 pages), the last
        # program's, and blocks of 2 slots on pages of 8 with the occupancy read back
        ("raas", dict(B=2, Hq=6, Hkv=2, D=16, budget=64, ps=4, lens=[20, 58], integer=True, attention="triton",
                      block_size=8, knobs=dict(ATTEND_BLOCK_N=16, ATTEND_OBSERVER=True, ATTEND_LEAN_ROW_WRITES=True),
                      pin_prompt=False, steps=30)),
        ("raas", dict(B=1, Hq=7, Hkv=1, D=16, budget=40, ps=4, lens=[30], integer=False, attention="triton",
                      knobs=dict(ATTEND_BLOCK_N=16, ATTEND_OBSERVER=False, ATTEND_LEAN_ROW_WRITES=True), steps=20)),
        ("raas", dict(B=1, Hq=4, Hkv=2, D=16, budget=24, ps=8, lens=[10], integer=False, attention="triton",
                      pin_prompt=False, lists_in_regs=False,
                      knobs=dict(ATTEND_BLOCK_N=16, ATTEND_LEAN_ROW_WRITES=True), steps=20)),
        # a writer program per row beside the observer (ATTEND_ROW_WRITER), with full and lean row writes
        ("raas", dict(B=2, Hq=6, Hkv=2, D=16, budget=64, ps=4, lens=[20, 58], integer=True, attention="triton",
                      block_size=8, knobs=dict(ATTEND_BLOCK_N=16, ATTEND_OBSERVER=True, ATTEND_ROW_WRITER=True),
                      pin_prompt=False, steps=30)),
        ("raas", dict(B=1, Hq=7, Hkv=1, D=16, budget=40, ps=4, lens=[30], integer=False, attention="triton",
                      knobs=dict(ATTEND_BLOCK_N=16, ATTEND_OBSERVER=True, ATTEND_ROW_WRITER=True,
                                 ATTEND_LEAN_ROW_WRITES=True), steps=20)),
        # the combine part after part (ATTEND_COMBINE_ONLINE; G of 3, 7 and 1) and
        # the global ticket at each program's start (ATTEND_EARLY_TICKET), with and without the
        # observer and writer
        ("raas", dict(B=2, Hq=6, Hkv=2, D=16, budget=64, ps=4, lens=[20, 58], integer=True, attention="triton",
                      block_size=8, knobs=dict(ATTEND_BLOCK_N=16, ATTEND_SPLIT=4, ATTEND_COMBINE_ONLINE=True,
                                               ATTEND_EARLY_TICKET=True), pin_prompt=False, steps=30)),
        ("raas", dict(B=1, Hq=7, Hkv=1, D=16, budget=40, ps=4, lens=[30], integer=False, attention="triton",
                      knobs=dict(ATTEND_BLOCK_N=16, ATTEND_OBSERVER=False, ATTEND_COMBINE_ONLINE=True,
                                 ATTEND_EARLY_TICKET=True), steps=20)),
        ("raas", dict(B=3, Hq=2, Hkv=2, D=16, budget=40, ps=4, lens=[30, 3, 17], integer=True, attention="triton",
                      knobs=dict(ATTEND_BLOCK_N=16, ATTEND_OBSERVER=True, ATTEND_ROW_WRITER=True,
                                 ATTEND_COMBINE_ONLINE=True), steps=20)),
        ("raas", dict(B=3, Hq=2, Hkv=2, D=16, budget=40, ps=4, lens=[30, 3, 17], integer=True, attention="triton",
                      knobs=dict(ATTEND_BLOCK_N=16, ATTEND_OBSERVER=True, ATTEND_EARLY_TICKET=True), steps=20)),
        # the queries loaded after the append's decision, not beside its first loads (ATTEND_Q_FIRST)
        ("raas", dict(B=2, Hq=6, Hkv=2, D=16, budget=64, ps=4, lens=[20, 58], integer=True, attention="triton",
                      block_size=8, knobs=dict(ATTEND_BLOCK_N=16, ATTEND_OBSERVER=True, ATTEND_Q_FIRST=False),
                      pin_prompt=False, steps=20)),
        ("raas", dict(B=1, Hq=7, Hkv=1, D=16, budget=40, ps=4, lens=[30], integer=False, attention="triton",
                      knobs=dict(ATTEND_BLOCK_N=16, ATTEND_OBSERVER=False, ATTEND_Q_FIRST=False), steps=20)),
        # the observer and writer at the row's first grid indices (ATTEND_OBSERVER_LAST=False; on CPU the
        # rule puts them last)
        ("raas", dict(B=2, Hq=6, Hkv=2, D=16, budget=64, ps=4, lens=[20, 58], integer=True, attention="triton",
                      block_size=8, knobs=dict(ATTEND_BLOCK_N=16, ATTEND_OBSERVER=True, ATTEND_ROW_WRITER=True,
                                               ATTEND_OBSERVER_LAST=False), pin_prompt=False, steps=20)),
        # the writer and the lean writes as the rules pick them (8 programs per row, the knobs at None)
        ("raas", dict(B=1, Hq=4, Hkv=2, D=16, budget=128, ps=4, lens=[100], integer=True, attention="triton",
                      block_size=8, knobs=dict(ATTEND_BLOCK_N=16, ATTEND_SPLIT=8), pin_prompt=False, steps=20)),
        ("streaming", dict(B=2, Hq=2, Hkv=1, D=16, budget=16, ps=2, lens=[0, 9], integer=True, sink_tokens=3)),
        ("h2o", dict(B=1, Hq=2, Hkv=1, D=16, budget=16, ps=2, lens=[12], integer=True, pin_prompt=True)),
    ]
    for policy, kw in cases:
        steps = kw.pop("steps", 40)
        ref, fus = t.twin_run(policy, steps=steps, mode="eager", dtype=torch.float32, device="cpu", **kw)
        print(policy, "ok", ref.evictions.sum().item(), bool(ref.overflow))
""")


DIAG_SCRIPT = textwrap.dedent("""
    import sys, torch
    sys.path[:0] = [{tests!r}]
    import test_kernels as t
    from raas_flex import kernels
    # 8 pages of 4 slots, 25 tokens: the next token goes to the open page (no page opens, none evicted)
    for diag in (0, 1, 2, 4, 8, 16, 32):
        kernels.ATTEND_DIAG = diag
        ref, fus = t.make_pair("raas", B=1, Hq=4, Hkv=2, D=16, budget=32, ps=4, dtype=torch.float32,
                               device="cpu", pin_prompt=False)
        fus.attention = "triton"
        inp = t.Inputs(1, 4, 2, 16, dtype=torch.float32, device="cpu", integer=True, seed=0)
        prompt = inp.prompt([25])
        ref.prefill(*prompt)
        fus.prefill(*prompt)
        before = {{n: getattr(fus, n).clone() for n in ("score", "stamp", "valid")}}
        counters = {{n: getattr(fus, n).clone() for n in ("length", "step")}}
        q, k, v = inp.step()
        out_ref, out = ref.decode(q, k, v), fus.decode(q, k, v)
        moved = {{n: not torch.equal(getattr(ref, n), before[n]) for n in before}}
        assert all(moved.values()), moved  # (the whole step changes all three)
        same = {{n: torch.equal(getattr(fus, n), getattr(ref, n)) for n in before}}
        kept = {{n: torch.equal(getattr(fus, n), before[n]) for n in before}}
        if diag == 0:
            assert all(same.values()) and torch.allclose(out, out_ref), (same, out, out_ref)
        if diag == 1:
            assert kept["score"] and same["valid"], (kept, same)
        if diag == 2:
            assert kept["stamp"] and same["score"] and same["valid"], (kept, same)
        if diag == 4:
            assert kept["valid"] and same["score"] and same["stamp"], (kept, same)
        if diag == 8:
            assert bool((out == 0).all()) and same["stamp"] and same["valid"], out
        advanced = {{n: torch.equal(getattr(fus, n), getattr(ref, n)) for n in counters}}
        kept_counters = {{n: torch.equal(getattr(fus, n), counters[n]) for n in counters}}
        assert not any(torch.equal(getattr(ref, n), counters[n]) for n in counters)  # (the whole step advances both)
        if diag == 16:  # (the interpreter runs programs one after another: relaxed tickets change nothing)
            assert all(same.values()) and all(advanced.values()) and torch.allclose(out, out_ref), (same, advanced)
        if diag == 32:
            assert all(same.values()) and all(kept_counters.values()) and torch.allclose(out, out_ref), (same, kept_counters)
        elif diag in (0, 1, 2, 4, 8):
            assert all(advanced.values()), advanced
        print("diag", diag, "ok")
""")


@pytest.mark.skipif(not kernels.HAS_TRITON, reason="needs triton (the interpreter runs the kernels on CPU)")
def test_interpreter_diagnostic_bits_skip_their_part():
    """kernels.ATTEND_DIAG (for timing the parts of fused_step) skips what each bit says and nothing
    else, through Triton's CPU interpreter: 1 the bounds (score kept), 2 the refresh (stamps kept),
    4 the last program's row writes (validity kept), 8 the combine (zeros out), 16 the tickets'
    fences (nothing else changes), 32 the global ticket (lengths and step kept); 0 is the whole step."""
    tests = str(Path(__file__).resolve().parent)
    env = dict(os.environ, TRITON_INTERPRET="1")
    res = subprocess.run([sys.executable, "-c", DIAG_SCRIPT.format(tests=tests)], env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert [ln for ln in res.stdout.splitlines() if ln.endswith(" ok")] == [f"diag {d} ok" for d in (0, 1, 2, 4, 8, 16, 32)]


@pytest.mark.skipif(not kernels.HAS_TRITON, reason="needs triton (the kernels are defined with it)")
def test_observer_rule(monkeypatch):
    """By default (ATTEND_OBSERVER None) fused_step's rows get the observer when the grid with the
    observers, rows x (split + 1) programs, has at most ATTEND_OBSERVER_MAX_PROGRAMS_PER_SM per SM
    (always on CPU, no SM count), and the lazy page choice goes with it; explicit True / False win
    over the rule; fused_attend_observe (timed=False) gets none unless asked."""
    sms = 132  # (H200: the grid of results/h200/decode_step_triton_observer_dot_grid_h200)
    for rows, split, on in [(32, 8, True), (64, 4, True), (128, 2, True), (128, 4, True), (256, 1, True),
                            (256, 2, False), (256, 4, False)]:
        assert kernels.observer_for(rows, split, sms) is on
        assert kernels._lazy_slot(kernels.observer_for(rows, split, sms)) is on
    assert kernels.observer_for(10 ** 6, 16, None)  # (CPU)
    assert not kernels.observer_for(1, 1, sms, timed=False)
    monkeypatch.setattr(kernels, "ATTEND_OBSERVER_MAX_PROGRAMS_PER_SM", 6)
    assert kernels.observer_for(256, 2, sms) and not kernels.observer_for(256, 3, sms)
    monkeypatch.setattr(kernels, "ATTEND_OBSERVER_MAX_PROGRAMS_PER_SM", 0)
    assert not kernels.observer_for(1, 1, sms)
    monkeypatch.setattr(kernels, "ATTEND_OBSERVER", True)
    assert kernels.observer_for(10 ** 6, 16, sms) and kernels.observer_for(1, 1, sms, timed=False)
    monkeypatch.setattr(kernels, "ATTEND_OBSERVER", False)
    assert not kernels.observer_for(1, 1, sms) and not kernels.observer_for(1, 1, None)
    monkeypatch.setattr(kernels, "ATTEND_LAZY_SLOT", True)
    assert kernels._lazy_slot(False)
    monkeypatch.setattr(kernels, "ATTEND_LAZY_SLOT", False)
    assert not kernels._lazy_slot(True)


@pytest.mark.skipif(not kernels.HAS_TRITON, reason="needs triton (the attention kernels are defined with it)")
def test_step_grid_observer_min_split(monkeypatch):
    """fused_step's grid: with the observer, a row gets at least ATTEND_OBSERVER_MIN_SPLIT attention
    programs (B=32 32/8 at L=1024 on an H200: 2, not split_for's 1), never more than its tiles; an
    explicit ATTEND_SPLIT, or no observer, keeps the split as it is."""
    monkeypatch.setattr(kernels, "device_sms", lambda device: 132)
    dev = torch.device("cpu")
    assert kernels.split_for(256, 16, sms=132) == 1
    assert kernels.step_grid(256, 16, dev) == (2, True)  # 256 x 2 <= 660: the observer, then 2 programs
    assert kernels.step_grid(256, 1, dev) == (1, True)  # (one tile: one program)
    assert kernels.step_grid(256, 32, dev) == (2, False)  # 256 x 3 > 660: no observer, split_for's 2
    assert kernels.step_grid(32, 32, dev) == (8, True)
    monkeypatch.setattr(kernels, "ATTEND_OBSERVER_MIN_SPLIT", 4)
    assert kernels.step_grid(256, 16, dev) == (4, True)
    monkeypatch.setattr(kernels, "ATTEND_OBSERVER_MIN_SPLIT", 2)
    monkeypatch.setattr(kernels, "ATTEND_SPLIT", 1)
    assert kernels.step_grid(256, 16, dev) == (1, True)
    monkeypatch.setattr(kernels, "ATTEND_SPLIT", None)
    monkeypatch.setattr(kernels, "ATTEND_OBSERVER", False)
    assert kernels.step_grid(256, 16, dev) == (1, False)


@pytest.mark.skipif(not kernels.HAS_TRITON, reason="needs triton (the attention kernels are defined with it)")
def test_row_writes_rule(monkeypatch):
    """fused_step's row writes: a writer program beside the observer when a row has at least
    ATTEND_ROW_WRITER_MIN_SPLIT attention programs (B=8 28/4 on an H200: 8), never without the
    observer; lean writes unless the observer makes them itself; explicit knobs win and are checked."""
    assert kernels.row_writes_for(8, True) == (True, True)
    assert kernels.row_writes_for(16, True) == (True, True)
    assert kernels.row_writes_for(4, True) == (False, False)  # the observer writes, in full
    assert kernels.row_writes_for(8, False) == (False, True)  # the last program writes, lean
    assert kernels.row_writes_for(1, False) == (False, True)
    # (the interpreter case "as the rules pick them": 2 rows of 8 tiles, ATTEND_SPLIT=8, on CPU)
    monkeypatch.setattr(kernels, "ATTEND_SPLIT", 8)
    assert kernels.row_writes_for(*kernels.step_grid(2, 8, torch.device("cpu"))) == (True, True)
    monkeypatch.setattr(kernels, "ATTEND_SPLIT", None)
    monkeypatch.setattr(kernels, "ATTEND_ROW_WRITER_MIN_SPLIT", 4)
    assert kernels.row_writes_for(4, True) == (True, True)
    monkeypatch.setattr(kernels, "ATTEND_ROW_WRITER", False)
    assert kernels.row_writes_for(16, True) == (False, False)
    monkeypatch.setattr(kernels, "ATTEND_ROW_WRITER", True)
    assert kernels.row_writes_for(1, True) == (True, True)
    assert kernels.row_writes_for(8, False) == (False, True)
    monkeypatch.setattr(kernels, "ATTEND_LEAN_ROW_WRITES", False)
    assert kernels.row_writes_for(8, True) == (True, False)
    assert kernels.row_writes_for(8, False) == (False, False)
    monkeypatch.setattr(kernels, "ATTEND_LEAN_ROW_WRITES", True)
    assert kernels.row_writes_for(2, True) == (True, True)
    monkeypatch.setattr(kernels, "ATTEND_ROW_WRITER", None)
    monkeypatch.setattr(kernels, "ATTEND_ROW_WRITER_MIN_SPLIT", 0)
    with pytest.raises(ValueError, match=r"kernels.ATTEND_ROW_WRITER_MIN_SPLIT=0 is not allowed; allowed: an int >= 1"):
        kernels.row_writes_for(8, True)


@pytest.mark.skipif(not kernels.HAS_TRITON, reason="needs triton (the attention kernels are defined with it)")
def test_observer_last_rule(monkeypatch):
    """fused_step's observers take the rows' last grid indices when the whole grid fits at
    ATTEND_OBSERVER_LAST_MAX_PROGRAMS_PER_SM (3) programs per SM, as at the H200's one-wave points
    (132 SMs): B=8 28/4 (32 rows of 8 + observer + writer), B=8 32/8 (64 of 4 + 1) and B=32 28/4
    L<=2048 (128 of 2 + 1), not B=32 28/4 L=4096 (128 of 4 + 1) nor B=32 32/8 L=1024 (256 of 2 + 1);
    never without the observer; always on CPU; explicit knobs win and are checked."""
    assert kernels.observer_last_for(32, 10, True, 132)
    assert kernels.observer_last_for(64, 5, True, 132)
    assert kernels.observer_last_for(128, 3, True, 132)
    assert not kernels.observer_last_for(128, 5, True, 132)
    assert not kernels.observer_last_for(256, 3, True, 132)
    assert not kernels.observer_last_for(8, 2, False, 132)
    assert kernels.observer_last_for(4096, 9, True, None) and not kernels.observer_last_for(1, 4, False, None)
    monkeypatch.setattr(kernels, "ATTEND_OBSERVER_LAST_MAX_PROGRAMS_PER_SM", 5)
    assert kernels.observer_last_for(128, 5, True, 132)
    monkeypatch.setattr(kernels, "ATTEND_OBSERVER_LAST", False)
    assert not kernels.observer_last_for(32, 10, True, 132)
    monkeypatch.setattr(kernels, "ATTEND_OBSERVER_LAST", True)
    assert kernels.observer_last_for(256, 3, True, 132) and not kernels.observer_last_for(256, 2, False, 132)
    monkeypatch.setattr(kernels, "ATTEND_OBSERVER_LAST", None)
    monkeypatch.setattr(kernels, "ATTEND_OBSERVER_LAST_MAX_PROGRAMS_PER_SM", 2.5)
    with pytest.raises(ValueError, match=r"kernels.ATTEND_OBSERVER_LAST_MAX_PROGRAMS_PER_SM=2.5 is not allowed"):
        kernels.observer_last_for(32, 10, True, 132)


@pytest.mark.skipif(not kernels.HAS_TRITON, reason="needs triton (the attention kernels are defined with it)")
def test_combine_online_rule(monkeypatch):
    """fused_step merges a row's partial results online with the observer from
    ATTEND_COMBINE_ONLINE_MIN_SPLIT (4) programs per row (B=8 on the H200), not at 2 (B=32 28/4,
    where it lost) nor without the observer (B=32 32/8 L=4096: 213 registers); an explicit knob wins."""
    assert [kernels.combine_online_for(s, True) for s in (1, 2, 4, 8, 16)] == [False, False, True, True, True]
    assert not any(kernels.combine_online_for(s, False) for s in (1, 2, 4, 8, 16))
    monkeypatch.setattr(kernels, "ATTEND_COMBINE_ONLINE_MIN_SPLIT", 2)
    assert kernels.combine_online_for(2, True) and not kernels.combine_online_for(1, True)
    monkeypatch.setattr(kernels, "ATTEND_COMBINE_ONLINE", False)
    assert not kernels.combine_online_for(16, True)
    monkeypatch.setattr(kernels, "ATTEND_COMBINE_ONLINE", True)
    assert kernels.combine_online_for(1, True) and kernels.combine_online_for(4, False)


@pytest.mark.skipif(not kernels.HAS_TRITON, reason="needs triton (the attention kernels are defined with it)")
def test_attend_stages_rule(monkeypatch):
    """fused_step's K/V loop gets 3 pipeline stages for rows of >= 7 query heads when there are >= 128
    rows (B=32, 28/4 on the H200), else 2; fused_attend_observe 2; an explicit ATTEND_STAGES wins
    and is checked."""
    assert kernels.attend_stages(128, 7) == 3
    assert kernels.attend_stages(32, 7) == 2 and kernels.attend_stages(256, 4) == 2
    assert kernels.attend_stages(128, 7, step=False) == 2
    monkeypatch.setattr(kernels, "ATTEND_STAGES", 4)
    assert kernels.attend_stages(32, 4) == 4 and kernels.attend_stages(128, 7, step=False) == 4
    monkeypatch.setattr(kernels, "ATTEND_STAGES", 0)
    with pytest.raises(ValueError, match=r"kernels.ATTEND_STAGES=0 is not allowed; allowed: an int >= 1"):
        kernels.attend_stages(128, 7)


@pytest.mark.skipif(not kernels.HAS_TRITON, reason="needs triton (the attention kernels are defined with it)")
def test_observer_bound_plan():
    """The observer bounds its whole row as one matrix product up to ATTEND_OBSERVER_BOUND_ELEMS
    key-bound elements, else in chunks of ATTEND_OBSERVER_CHUNK_ELEMS; an attention program's share
    follows ATTEND_BOUND_ELEMS / ATTEND_BOUND_DOT."""
    assert kernels._bound_plan(128, 128, observer=True) == (128, 128, True)  # 16384 elements: one product
    assert kernels._bound_plan(256, 128, observer=True) == (256, 64, True)  # chunks of 8192
    assert kernels._bound_plan(4, 128, observer=True) == (16, 16, True)  # a product needs 16 pages
    assert kernels._bound_plan(16, 128) == (16, 16, False)
    assert kernels._bound_plan(64, 128) == (64, 16, False)


@pytest.mark.skipif(not kernels.HAS_TRITON, reason="needs triton (fused_step is defined with it)")
@pytest.mark.parametrize("knob, value", [("ATTEND_DIAG", 64), ("ATTEND_OBSERVER", 2), ("ATTEND_BOUND_DOT", "no"),
                                         ("ATTEND_LAZY_SLOT", 3), ("ATTEND_OBSERVER_MAX_PROGRAMS_PER_SM", -1),
                                         ("ATTEND_OBSERVER_MAX_PROGRAMS_PER_SM", 2.0),
                                         ("ATTEND_OBSERVER_BOUND_DOT", 2), ("ATTEND_OBSERVER_BOUND_ELEMS", 0),
                                         ("ATTEND_OBSERVER_CHUNK_ELEMS", True), ("ATTEND_BOUND_STAGES", -1),
                                         ("ATTEND_PREFETCH", -1), ("ATTEND_PREFETCH", 1.5),
                                         ("ATTEND_OBSERVER_PREFETCH", 2), ("ATTEND_OBSERVER_MIN_SPLIT", 0),
                                         ("ATTEND_LEAN_ROW_WRITES", "yes"), ("ATTEND_ROW_WRITER", 2),
                                         ("ATTEND_ROW_WRITER_MIN_SPLIT", 0), ("ATTEND_COMBINE_ONLINE", 2),
                                         ("ATTEND_EARLY_TICKET", "yes"), ("ATTEND_COMBINE_ONLINE_MIN_SPLIT", 0),
                                         ("ATTEND_Q_FIRST", None),
                                         ("ATTEND_OBSERVER_LAST", 2), ("ATTEND_OBSERVER_LAST_MAX_PROGRAMS_PER_SM", -1)])
def test_step_knobs_validated(monkeypatch, knob, value):
    """fused_step refuses, before any launch, an ATTEND_DIAG outside its six bits, an
    ATTEND_OBSERVER / ATTEND_BOUND_DOT / ATTEND_OBSERVER_BOUND_DOT / ATTEND_LAZY_SLOT /
    ATTEND_OBSERVER_PREFETCH / ATTEND_LEAN_ROW_WRITES / ATTEND_ROW_WRITER / ATTEND_COMBINE_ONLINE /
    ATTEND_EARLY_TICKET / ATTEND_Q_FIRST / ATTEND_OBSERVER_LAST other than True, False (or
    None where that is the default), an ATTEND_OBSERVER_MAX_PROGRAMS_PER_SM / ATTEND_BOUND_STAGES /
    ATTEND_PREFETCH that is not an int >= 0, and observer chunk sizes / ATTEND_OBSERVER_MIN_SPLIT /
    ATTEND_ROW_WRITER_MIN_SPLIT / ATTEND_COMBINE_ONLINE_MIN_SPLIT that are not ints >= 1, naming the
    knob and the value."""
    cache = _cpu_cache()
    monkeypatch.setattr(kernels, knob, value)
    q = torch.zeros(1, 2, 1, 16)
    with pytest.raises(ValueError, match=rf"kernels.{knob}={value!r} is not allowed"):
        kernels.fused_step(q, q[:, :1], q[:, :1], cache.k, cache.v, cache.page_id, cache.stamp, cache.pinned,
                           cache.score, cache.kmax, cache.kmin, cache.open_slot, cache.length, cache.step,
                           cache.evictions, cache.overflow, cache.valid, torch.zeros(1, dtype=torch.int32),
                           *(torch.zeros(1, dtype=torch.int32),) * 4, torch.zeros_like(cache.score),
                           torch.zeros(1, dtype=torch.int32), 0.25, 1, 8)


@pytest.mark.skipif(not kernels.HAS_TRITON, reason="needs triton (the attention kernels are defined with it)")
@pytest.mark.parametrize("value", [2, "yes", None])
def test_bound_dot_knob_validated(monkeypatch, value):
    """kernels.ATTEND_BOUND_DOT takes True or False (0/1); anything else is refused by name."""
    monkeypatch.setattr(kernels, "ATTEND_BOUND_DOT", value)
    with pytest.raises(ValueError, match=r"kernels.ATTEND_BOUND_DOT=.* is not allowed; allowed: True or False"):
        kernels._bound_plan(16, 128)
    monkeypatch.setattr(kernels, "ATTEND_BOUND_DOT", True)
    assert kernels._bound_plan(4, 128) == (16, 16, True)  # padded to the 16 pages a matrix product needs
    monkeypatch.setattr(kernels, "ATTEND_BOUND_DOT", False)
    assert kernels._bound_plan(4, 128) == (4, 4, False)
    assert kernels._bound_plan(64, 128) == (64, 16, False)  # chunks of ATTEND_BOUND_ELEMS key-bound elements


def test_attention_split_rule():
    """Programs per row of the attention kernels: about two per SM over all rows, at least one per
    ATTEND_TILES_PER_PROGRAM tiles, a power of two, never more than the tiles; an explicit wish is
    rounded down the same way; neither an SM count nor a wish is refused."""
    per = kernels.ATTEND_TILES_PER_PROGRAM
    sms = 132  # (H200)
    # B=8, Hkv=4 (32 rows), 2048 slots = 32 tiles: the SM rule (264 // 32 = 8)
    assert kernels.split_for(32, 32, sms=sms) == 8
    # B=32, Hkv=8 (256 rows): the SM rule says 1; the tile rule 1 / 2 / 4 at 16 / 32 / 64 tiles
    assert [kernels.split_for(256, t, sms=sms) for t in (per, 2 * per, 4 * per)] == [1, 2, 4]
    # rounding down to a power of two, and capped at one program per tile
    assert kernels.split_for(256, 3 * per, sms=sms) == 2
    assert kernels.split_for(4, 8, sms=sms) == 8
    assert kernels.split_for(4, 8, want=6) == 4 and kernels.split_for(4, 2, want=16) == 2
    with pytest.raises(ValueError, match="sms"):
        kernels.split_for(4, 8)


@pytest.mark.skipif(not kernels.HAS_TRITON, reason="needs triton (the interpreter runs the kernels on CPU)")
def test_interpreter_matches_torch_on_cpu():
    """The kernels' logic through Triton's CPU interpreter: raas (exact and resync; observe inside
    the append kernel and as its own kernel; attention="triton": the whole step in one kernel, split
    over 4 and 2 programs per row, and the append kernel followed by the attention + observe kernel;
    page bounds as matrix products or element-wise, by the attention programs or by an observer
    program per row; the observer's row writes in full or lean, or by a writer program, by knob and
    as the rules pick them; the combine merged online and the global ticket taken early; the queries loaded late; on CPU every observer case runs
    its observers last, by ATTEND_OBSERVER_LAST's rule, but one that runs them first),
    streaming, and h2o with pinned prompt pages (it overflows)."""
    tests = str(Path(__file__).resolve().parent)
    env = dict(os.environ, TRITON_INTERPRET="1")
    res = subprocess.run([sys.executable, "-c", INTERPRETER_SCRIPT.format(tests=tests)], env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    lines = [ln for ln in res.stdout.splitlines() if " ok " in ln]
    assert len(lines) == 35 and lines[-1].endswith("True"), res.stdout  # the h2o case overflowed


# -- GPU -------------------------------------------------------------------------------------------
# (id, policy, shape and budget, prompt lengths, extra config). Page counts 8, 33, 128 and 256; G of
# 1, 3, 4, 7; prompts near the budget (eviction starts within ~ps steps) mixed with short ones.
# raas cases run the observe inside the append kernel unless marked "split" (its own kernel) or
# "triton" (attention="triton": the whole step in kernels.fused_step; with "split", the append kernel and
# then kernels.fused_attend_observe, the transformers path).
GPU_CASES = [
    ("raas-P8-G3", "raas", dict(B=2, Hq=6, Hkv=2, D=64, budget=128, ps=16), [20, 100], {}),
    ("raas-P33-G7", "raas", dict(B=3, Hq=7, Hkv=1, D=128, budget=528, ps=16), [1, 300, 505], dict(pin_prompt=False)),
    ("raas-P128-G4", "raas", dict(B=8, Hq=32, Hkv=8, D=128, budget=2048, ps=16),
     [2020, 2030, 5, 1500, 2000, 2031, 700, 2025], dict(pin_prompt=False)),
    ("raas-P256-G7", "raas", dict(B=2, Hq=28, Hkv=4, D=128, budget=4096, ps=16), [4070, 3000], {}),
    ("raas-P128-G4-split", "raas", dict(B=8, Hq=32, Hkv=8, D=128, budget=2048, ps=16),
     [2020, 2030, 5, 1500, 2000, 2031, 700, 2025], dict(pin_prompt=False, observe_in_append=False)),
    ("raas-P256-G7-split", "raas", dict(B=2, Hq=28, Hkv=4, D=128, budget=4096, ps=16), [4070, 3000],
     dict(observe_in_append=False)),
    ("raas-P128-G4-triton", "raas", dict(B=8, Hq=32, Hkv=8, D=128, budget=2048, ps=16),
     [2020, 2030, 5, 1500, 2000, 2031, 700, 2025], dict(pin_prompt=False, attention="triton")),
    ("raas-P256-G7-triton", "raas", dict(B=2, Hq=28, Hkv=4, D=128, budget=4096, ps=16), [4070, 3000],
     dict(attention="triton")),
    ("raas-P33-G7-triton", "raas", dict(B=3, Hq=7, Hkv=1, D=128, budget=528, ps=16), [1, 300, 505],
     dict(pin_prompt=False, attention="triton")),
    ("raas-P128-G4-triton-observer", "raas", dict(B=8, Hq=32, Hkv=8, D=128, budget=2048, ps=16),
     [2020, 2030, 5, 1500, 2000, 2031, 700, 2025],
     dict(pin_prompt=False, attention="triton", knobs=dict(ATTEND_OBSERVER=True))),
    ("raas-P256-G7-triton-observer", "raas", dict(B=2, Hq=28, Hkv=4, D=128, budget=4096, ps=16), [4070, 3000],
     dict(attention="triton", knobs=dict(ATTEND_OBSERVER=True))),
    ("raas-P128-G4-triton-observer-lazy", "raas", dict(B=8, Hq=32, Hkv=8, D=128, budget=2048, ps=16),
     [2020, 2030, 5, 1500, 2000, 2031, 700, 2025],
     dict(pin_prompt=False, attention="triton", knobs=dict(ATTEND_OBSERVER=True, ATTEND_LAZY_SLOT=True))),
    ("raas-P128-G4-triton-no-observer", "raas", dict(B=8, Hq=32, Hkv=8, D=128, budget=2048, ps=16),
     [2020, 2030, 5, 1500, 2000, 2031, 700, 2025],
     dict(pin_prompt=False, attention="triton", knobs=dict(ATTEND_OBSERVER=False, ATTEND_LAZY_SLOT=False))),
    ("raas-P128-G4-triton-bound-stages", "raas", dict(B=8, Hq=32, Hkv=8, D=128, budget=2048, ps=16),
     [2020, 2030, 5, 1500, 2000, 2031, 700, 2025],
     dict(pin_prompt=False, attention="triton", knobs=dict(ATTEND_BOUND_STAGES=2))),
    # L2 prefetch at the step's start (a hint: the results must not change); P33 has fewer slots than
    # two tiles per program cover at its last program
    ("raas-P256-G7-triton-prefetch", "raas", dict(B=2, Hq=28, Hkv=4, D=128, budget=4096, ps=16), [4070, 3000],
     dict(attention="triton", knobs=dict(ATTEND_PREFETCH=2, ATTEND_OBSERVER_PREFETCH=True))),
    ("raas-P33-G7-triton-prefetch", "raas", dict(B=3, Hq=7, Hkv=1, D=128, budget=528, ps=16), [1, 300, 505],
     dict(pin_prompt=False, attention="triton", knobs=dict(ATTEND_PREFETCH=4, ATTEND_OBSERVER_PREFETCH=True))),
    ("raas-P256-G7-triton-lean", "raas", dict(B=2, Hq=28, Hkv=4, D=128, budget=4096, ps=16), [4070, 3000],
     dict(attention="triton", knobs=dict(ATTEND_LEAN_ROW_WRITES=True))),
    ("raas-P256-G7-triton-writer", "raas", dict(B=2, Hq=28, Hkv=4, D=128, budget=4096, ps=16), [4070, 3000],
     dict(attention="triton", knobs=dict(ATTEND_ROW_WRITER=True, ATTEND_LEAN_ROW_WRITES=True))),
    ("raas-P256-G7-triton-tail", "raas", dict(B=2, Hq=28, Hkv=4, D=128, budget=4096, ps=16), [4070, 3000],
     dict(attention="triton", knobs=dict(ATTEND_COMBINE_ONLINE=True, ATTEND_EARLY_TICKET=True))),
    ("raas-P64-G4-triton-tail", "raas", dict(B=8, Hq=32, Hkv=8, D=128, budget=1024, ps=16),
     [1000, 990, 5, 900, 1008, 1003, 700, 1001],
     dict(pin_prompt=False, attention="triton", knobs=dict(ATTEND_COMBINE_ONLINE=True, ATTEND_EARLY_TICKET=True))),
    # 160 rows of 8 tiles: split_for gives 1 program per row on 132 SMs, the observer is on, and
    # ATTEND_OBSERVER_MIN_SPLIT makes it 2
    ("raas-P32-G7-triton-rows160", "raas", dict(B=20, Hq=56, Hkv=8, D=128, budget=512, ps=16),
     [490 - 7 * i for i in range(20)], dict(pin_prompt=False, attention="triton")),
    ("raas-P128-G4-triton-split", "raas", dict(B=8, Hq=32, Hkv=8, D=128, budget=2048, ps=16),
     [2020, 2030, 5, 1500, 2000, 2031, 700, 2025], dict(pin_prompt=False, attention="triton", observe_in_append=False)),
    ("raas-P128-G4-triton-split-observer", "raas", dict(B=8, Hq=32, Hkv=8, D=128, budget=2048, ps=16),
     [2020, 2030, 5, 1500, 2000, 2031, 700, 2025],
     dict(pin_prompt=False, attention="triton", observe_in_append=False, knobs=dict(ATTEND_OBSERVER=True))),
    ("raas-P34-r0.1-ps8", "raas", dict(B=2, Hq=4, Hkv=4, D=128, budget=272, ps=8), [262, 100],
     dict(refresh_ratio=0.1, pin_prompt=False, lists_in_regs=False)),
    ("raas-attention-P8", "raas", dict(B=2, Hq=6, Hkv=2, D=64, budget=128, ps=16), [20, 110],
     dict(importance="attention", refresh="threshold", refresh_threshold=0.01, pin_prompt=False)),
    ("streaming-P16", "streaming", dict(B=2, Hq=6, Hkv=2, D=64, budget=128, ps=8), [40, 118], dict(sink_tokens=10)),
    ("h2o-P16", "h2o", dict(B=2, Hq=6, Hkv=2, D=64, budget=256, ps=16), [60, 238], {}),
]
MODES = ["eager", "default", "reduce-overhead"]


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", GPU_CASES, ids=[c[0] for c in GPU_CASES])
def test_gpu_fused_matches_torch_resync(case, mode):
    """Random bf16 inputs, state resynced every step: 70 steps, evictions in every case."""
    _, policy, shape, lens, kw = case
    ref, _ = twin_run(policy, **shape, lens=lens, steps=70, mode=mode, integer=False, **kw)
    assert ref.evictions.sum().item() > 0


# (h2o is left out: its scores are softmax shares computed by torch in both graphs, not exact sums)
EXACT_CASES = [c for c in GPU_CASES if c[0] in ("raas-P8-G3", "raas-P33-G7", "raas-P128-G4", "raas-P128-G4-split",
                                                 "raas-P128-G4-triton", "raas-P33-G7-triton",
                                                 "raas-P128-G4-triton-observer", "raas-P128-G4-triton-observer-lazy",
                                                 "raas-P128-G4-triton-no-observer",
                                                 "streaming-P16")]


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
@pytest.mark.parametrize("case", EXACT_CASES, ids=[c[0] for c in EXACT_CASES])
def test_gpu_fused_matches_torch_exact(case, mode):
    """Integer inputs, no resync: 300 steps bit-identical page tables and scores (exact ties)."""
    _, policy, shape, lens, kw = case
    ref, fus = twin_run(policy, **shape, lens=lens, steps=300, mode=mode, integer=True, **kw)
    assert ref.evictions.sum().item() > 0
    assert not bool(fus.overflow)


@pytest.mark.gpu
@requires_cuda
def test_gpu_fused_switch():
    cfg = RaaSConfig(budget=64, page_size=16)
    make = lambda c: PagedKVCache(c, batch_size=1, num_heads=2, num_kv_heads=1, head_dim=64, dtype=torch.bfloat16,
                                  device="cuda")
    assert make(cfg).fused and make(cfg).fused_observe
    assert make(cfg.replace(policy="h2o")).fused and not make(cfg.replace(policy="h2o")).fused_observe
    quest = cfg.replace(policy="quest", max_length=128, fused=None)
    assert not make(quest).fused
    with pytest.raises(ValueError, match="fused=True is not supported for this cache: policy='quest'"):
        make(quest.replace(fused=True))
    c = make(cfg)
    with pytest.raises(ValueError, match=r"k must be \[batch_size=1, num_kv_heads=1, 1, head_dim=64\]"):
        c.append(torch.zeros(1, 2, 1, 64, dtype=torch.bfloat16, device="cuda"),
                 torch.zeros(1, 2, 1, 64, dtype=torch.bfloat16, device="cuda"))


RANK_SCRIPT = textwrap.dedent("""
    import sys, torch, triton, triton.language as tl
    from hypothesis import given, settings, strategies as st
    from raas_flex.kernels import _refresh_top
    from raas_flex.policies import descending_rank

    @triton.jit
    def probe(imp_ptr, pid_ptr, stamp_ptr, P: tl.constexpr, REFRESH: tl.constexpr, BLOCK_P: tl.constexpr):
        i = tl.arange(0, BLOCK_P)
        in_row = i < P
        imp = tl.load(imp_ptr + i, mask=in_row, other=float("-inf"))
        pid = tl.load(pid_ptr + i, mask=in_row, other=-1)
        _refresh_top(imp, pid, i, in_row, stamp_ptr, 0, 7, P, REFRESH, BLOCK_P)

    # few distinct values, so ties (and -0.0 against 0.0) are frequent
    VALUES = st.sampled_from([0.0, -0.0, 1.0, -1.0, 2.5, -2.5, 1e-30, -1e-30, 3e38, -3e38])

    @settings(max_examples={examples}, deadline=None, derandomize=True)
    @given(st.data())
    def check(data):
        P = data.draw(st.integers(1, 40), label="P")
        vals = data.draw(st.lists(VALUES, min_size=P, max_size=P), label="importance")
        resident = data.draw(st.lists(st.booleans(), min_size=P, max_size=P), label="resident")
        refresh = data.draw(st.integers(1, P + 2), label="refresh_pages")
        res = torch.tensor(resident)
        imp = torch.where(res, torch.tensor(vals, dtype=torch.float32), float("-inf"))  # as the kernels store it
        pid = torch.where(res, torch.arange(P), -1)
        stamp = torch.zeros(P, dtype=torch.int64)
        probe[(1,)](imp, pid, stamp, P=P, REFRESH=refresh, BLOCK_P=triton.next_power_of_2(P))
        want = torch.where(res & (descending_rank(imp) < refresh), 7, 0)
        assert torch.equal(stamp, want), (imp.tolist(), resident, refresh, stamp.tolist(), want.tolist())

    check()
    print("rank ok")
""")


@pytest.mark.skipif(not kernels.HAS_TRITON, reason="needs triton (the interpreter runs the kernels on CPU)")
def test_interpreter_topk_refresh_matches_descending_rank():
    """Property: the kernels' top-k refresh stamps exactly the resident pages whose
    stable descending rank (torch reference) is below refresh_pages, on rows full of exact ties,
    +-0.0, huge magnitudes and empty slots."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    res = subprocess.run([sys.executable, "-c", RANK_SCRIPT.format(examples=300)], env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "rank ok" in res.stdout
