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
subprocess, since TRITON_INTERPRET must be set before Triton loads); CI installs Triton for it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch._dynamo.utils import counters

from raas_flex import AttentionSpec, PagedKVCache, kernels, masks
from raas_flex.config import make_config

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
STATE = ("k", "v", "page_id", "stamp", "pinned", "score", "kmax", "kmin", "open_slot", "length", "step",
         "evictions", "overflow")
EXACT = ("page_id", "pinned", "open_slot", "length", "step", "evictions", "overflow", "k", "v", "kmax", "kmin",
         "valid")


def make_pair(policy, *, B, Hq, Hkv, D, budget, ps, dtype, device, backend="flex", max_length=None,
              spec=AttentionSpec(), **kw):
    """The torch reference and a cache of ``backend`` with the same configuration (``max_length``: for
    quest, which keeps every page) and layer ``spec`` (with sinks: the same logits, spread over
    [-1, 4], in both)."""
    cfg = make_config(budget, policy, page_size=ps, **kw)
    mk = lambda b: PagedKVCache(cfg.replace(backend=b), batch_size=B, num_heads=Hq, num_kv_heads=Hkv,
                                head_dim=D, dtype=dtype, device=device, max_length=max_length, spec=spec)
    pair = mk("torch"), mk(backend)
    if spec.sinks:
        for c in pair:
            c.set_sinks(torch.linspace(-1.0, 4.0, Hq, device=device))
    return pair


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
        """q, k, v of one token as a fused qkv projection hands them over (the value reaches the kernels as
        the model made it): views [B, heads, 1, D] of one [B, 1, Hq + 2 Hkv, D] tensor, batch stride
        (Hq + 2 Hkv) D."""
        qkv = self.rand(self.B, 1, self.Hq + 2 * self.H, self.D).transpose(1, 2)
        return qkv[:, : self.Hq], qkv[:, self.Hq : self.Hq + self.H], qkv[:, self.Hq + self.H :]


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
    if not fus.policy.narrows:  # exact block lists from the kernels (quest lists its picked pages each step)
        want = masks.block_lists(ref.valid, fus.block)
        got = (fus._kv_num, fus._kv_idx, fus._full_num, fus._full_idx)
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
    pol = ref.policy
    assert pol.name == "raas", f"stamps differ under {pol.name}"
    score, page_id = ref.score.cpu(), ref.page_id.cpu()
    if pol.refresh == "threshold":
        for b, h, p in diff.nonzero().tolist():
            assert abs(score[b, h, p].item() - pol.refresh_threshold) <= 1e-5, (b, h, p, score[b, h, p].item())
        return
    K = pol.refresh_pages(ref.budget_pages)
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
             device="cuda", seed=0, warm=3, backend="flex", sms=None, **kw):
    """Run the reference and fused caches side by side; ``integer`` = exact mode (no resync).
    ``backend="triton"`` runs the fused cache's whole step in kernels.fused_step; ``sms`` makes
    fused_step plan its launch as on a GPU of that many SMs (kernels.step_plan), so the interpreter
    runs the builds that a GPU's rules pick. A plan is fixed when Inductor lowers the step, so runs
    that set ``sms`` compile with the compile caches off."""
    if sms is not None:
        saved = kernels.device_sms
        kernels.device_sms = lambda device: sms
        try:
            with torch.compiler.config.patch(force_disable_caches=True):
                return twin_run(policy, B=B, Hq=Hq, Hkv=Hkv, D=D, budget=budget, ps=ps, lens=lens, steps=steps,
                                mode=mode, integer=integer, dtype=dtype, device=device, seed=seed, warm=warm,
                                backend=backend, **kw)
        finally:
            kernels.device_sms = saved
    torch._dynamo.reset()
    ref, fus = make_pair(policy, B=B, Hq=Hq, Hkv=Hkv, D=D, budget=budget, ps=ps, dtype=dtype, device=device,
                         backend=backend, **kw)
    assert (ref.backend, fus.backend) == ("torch", backend)
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


# -- backend choice (CPU; needs neither CUDA nor Triton) -------------------------------------------
@pytest.mark.skipif(kernels.interpreting(), reason="the interpreter makes CPU caches fusable")
def test_backends_on_cpu():
    """None picks torch off CUDA; a fused backend asked for by name is refused with the reason."""
    mk = lambda **kw: PagedKVCache(make_config(32, "raas", page_size=8, **kw), batch_size=1, num_heads=2,
                                   num_kv_heads=1, head_dim=16)
    assert mk().backend == "torch" and mk(backend="torch").backend == "torch"
    for backend in ("flex", "triton"):
        with pytest.raises(ValueError, match=rf"backend='{backend}' is not supported for this cache: "
                                             r"(device='cpu'|triton is not installed)"):
            mk(backend=backend)


def test_unsupported_reasons(monkeypatch):
    """What each backend serves: the device and dtype (kernels), then the policy (engine)."""
    from raas_flex.engine import backend_unsupported, resolve_backend

    cuda = torch.device("cuda")
    if not kernels.HAS_TRITON:
        assert kernels.unsupported_reason(cuda, torch.bfloat16) == "triton is not installed"
        return
    assert kernels.unsupported_reason(cuda, torch.bfloat16) is None
    assert "dtype=float64" in kernels.unsupported_reason(cuda, torch.float64)
    raas = make_config(32, "raas", page_size=8)
    assert backend_unsupported("triton", raas, cuda, torch.bfloat16) is None
    quest = make_config(32, "quest", page_size=8, max_length=64)
    assert backend_unsupported("flex", quest, cuda, torch.bfloat16) is None  # the picked pages through flex
    assert backend_unsupported("triton", quest, cuda, torch.bfloat16) is None  # through paged_attend
    assert resolve_backend(quest, cuda, torch.bfloat16) == "triton"
    dense = make_config(32, "dense", page_size=8, max_length=64)
    assert backend_unsupported("flex", dense, cuda, torch.bfloat16) is None
    assert resolve_backend(dense, cuda, torch.bfloat16) == "triton"  # any page size: no shares
    assert resolve_backend(make_config(36, "dense", page_size=12, max_length=64), cuda, torch.bfloat16) == "triton"
    assert resolve_backend(raas, cuda, torch.bfloat16) == "triton"
    threshold = make_config(32, "raas", page_size=8, importance="attention", refresh="threshold")
    assert backend_unsupported("flex", threshold, cuda, torch.bfloat16) is None  # the append fused, observe in torch
    assert backend_unsupported("triton", threshold, cuda, torch.bfloat16) is None  # shares from the attention pass
    assert backend_unsupported("triton", make_config(32, "h2o", page_size=8), cuda, torch.bfloat16) is None
    assert backend_unsupported("triton", make_config(32, "streaming", page_size=8), cuda, torch.bfloat16) is None
    assert backend_unsupported("triton", make_config(36, "streaming", page_size=12), cuda, torch.bfloat16) is None
    assert "page_size=12" in backend_unsupported("triton", make_config(48, "h2o", page_size=12), cuda, torch.bfloat16)
    # a layer with a sliding window: the one-kernel step of every policy but quest; a softcap or sinks:
    # every fused path
    others = (raas, threshold, dense, make_config(32, "h2o", page_size=8), make_config(32, "streaming", page_size=8))
    for spec in (AttentionSpec(window=128), AttentionSpec(window=128, softcap=30.0, sinks=True)):
        for cfg in others:
            assert backend_unsupported("triton", cfg, cuda, torch.bfloat16, spec) is None
            assert resolve_backend(cfg, cuda, torch.bfloat16, spec) == "triton"
            assert "served by the one-kernel step (backend='triton')" in backend_unsupported(
                "flex", cfg, cuda, torch.bfloat16, spec)
        assert "policy='quest'" in backend_unsupported("triton", quest, cuda, torch.bfloat16, spec)
        assert resolve_backend(quest, cuda, torch.bfloat16, spec) == "torch"
    for spec in (AttentionSpec(softcap=30.0), AttentionSpec(sinks=True)):
        for cfg in (*others, quest):
            for backend in ("flex", "triton"):
                assert backend_unsupported(backend, cfg, cuda, torch.bfloat16, spec) is None, (cfg, backend)
            assert resolve_backend(cfg, cuda, torch.bfloat16, spec) == "triton"
    # the kernels' tiles span the head dimension: a power of two (Phi-3-mini's 96 takes torch)
    for backend in ("flex", "triton"):
        assert backend_unsupported(backend, raas, cuda, torch.bfloat16, head_dim=128) is None
        assert "head_dim=96" in backend_unsupported(backend, raas, cuda, torch.bfloat16, head_dim=96)
    assert resolve_backend(raas, cuda, torch.bfloat16, head_dim=96) == "torch"


def run_interpreted(script: str, marker: str, timeout: int = 600) -> None:
    """Run a test script in a fresh Python with Triton's CPU interpreter on; it must exit 0 and
    print ``marker`` (its last line, once every check passed)."""
    res = subprocess.run([sys.executable, "-c", script], env=dict(os.environ, TRITON_INTERPRET="1"),
                         capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert marker in res.stdout


def run_interpreted_cases(template: str, parts: int = 2) -> list[str]:
    """Run a script of cases (``template`` formatted with tests, part and parts: case i runs in process
    i % parts, the CPU machine's two cores side by side) under Triton's interpreter; each process must
    exit 0. Returns the lines of the cases that passed (``"<i> ... ok ..."``) in the cases' order."""
    tests = str(Path(__file__).resolve().parent)
    env = dict(os.environ, TRITON_INTERPRET="1")
    procs = [subprocess.Popen([sys.executable, "-c", template.format(tests=tests, part=part, parts=parts)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for part in range(parts)]
    outs = [proc.communicate(timeout=900) for proc in procs]
    for proc, (out, err) in zip(procs, outs):
        assert proc.returncode == 0, out[-3000:] + err[-3000:]
    return sorted((ln for out, _ in outs for ln in out.splitlines() if " ok " in ln), key=lambda ln: int(ln.split()[0]))


INTERPRETER_SCRIPT = textwrap.dedent("""
    import sys, torch
    sys.path[:0] = [{tests!r}]
    import test_kernels as t
    from raas_flex import kernels
    # (policy, twin_run arguments, what fused_step's plan must be for the case: the builds it covers)
    cases = [
        # the flex path: fused_append_observe (raas), fused_append (streaming, h2o)
        ("raas", dict(B=2, Hq=6, Hkv=2, D=16, budget=32, ps=4, lens=[3, 26], integer=True, block_size=8), None),
        ("raas", dict(B=1, Hq=4, Hkv=2, D=16, budget=24, ps=8, lens=[10], integer=False, pin_prompt=False), None),
        ("raas", dict(B=1, Hq=3, Hkv=1, D=16, budget=64, ps=4, lens=[50], integer=True, refresh_ratio=0.25), None),
        # 256 pages, blocks of 8 slots: block occupancy read back, the observe's bounds in 2 chunks
        ("raas", dict(B=1, Hq=2, Hkv=1, D=64, budget=512, ps=2, lens=[500], integer=True, block_size=8,
                      pin_prompt=False, steps=12), None),
        # fused_step, the plans of the CPU (sms None) and of GPUs of a few SMs
        ("raas", dict(B=1, Hq=6, Hkv=2, D=16, budget=64, ps=4, lens=[58], integer=True, backend="triton",
                      pin_prompt=False, steps=20),
         dict(split=1, observer=True, writer=False, lean=False, lazy=True, dot=True, observers_last=True)),
        ("raas", dict(B=2, Hq=6, Hkv=2, D=16, budget=128, ps=4, lens=[20, 120], integer=True, backend="triton",
                      pin_prompt=False, steps=16),
         dict(split=2, observer=True, online=False, observers_last=True)),
        ("raas", dict(B=1, Hq=7, Hkv=1, D=16, budget=40, ps=4, lens=[30], integer=False, backend="triton",
                      steps=20), dict(split=1, observer=True)),
        ("raas", dict(B=1, Hq=6, Hkv=2, D=16, budget=256, ps=4, lens=[250], integer=True, backend="triton",
                      pin_prompt=False, block_size=8, steps=12),
         dict(split=4, observer=True, writer=False, online=True)),
        ("raas", dict(B=1, Hq=3, Hkv=1, D=16, budget=512, ps=4, lens=[505], integer=True, backend="triton",
                      pin_prompt=False, sms=4, steps=12),
         dict(split=8, observer=True, writer=True, lean=True, online=True, observers_last=True)),
        ("raas", dict(B=1, Hq=4, Hkv=2, D=16, budget=128, ps=4, lens=[100], integer=True, backend="triton",
                      pin_prompt=False, block_size=8, sms=1, steps=16),
         dict(split=2, observer=True, writer=False, lean=False, observers_last=False)),
        ("raas", dict(B=2, Hq=4, Hkv=2, D=16, budget=64, ps=8, lens=[55, 9], integer=True, backend="triton",
                      pin_prompt=False, block_size=2, sms=1, steps=20),
         dict(split=1, observer=False, lean=True, lazy=False, dot=False)),
        ("raas", dict(B=1, Hq=4, Hkv=2, D=64, budget=1152, ps=8, lens=[1140], integer=False, backend="triton",
                      pin_prompt=False, sms=1, steps=10),
         dict(split=2, observer=False, lean=True, bp=128, bpc=32)),
        # 256 pages of head_dim 128: the observer's bounds in chunks, the occupancy read back
        ("raas", dict(B=1, Hq=2, Hkv=1, D=128, budget=512, ps=2, lens=[500], integer=True, backend="triton",
                      pin_prompt=False, block_size=8, steps=10),
         dict(split=4, observer=True, writer=False, bp=256, bpc=64)),
        # fused_step with attention shares (raas importance="attention" top-k and threshold, h2o): random
        # inputs, resynced every step; pages of 1 to 128 slots (a page spanning two tiles), 1 to 8
        # attention programs, with and without the observer
        ("raas", dict(B=2, Hq=6, Hkv=2, D=16, budget=64, ps=4, lens=[20, 58], integer=False, backend="triton",
                      importance="attention", pin_prompt=False, steps=12),
         dict(split=1, observer=True, writer=False)),
        ("raas", dict(B=1, Hq=3, Hkv=1, D=16, budget=512, ps=4, lens=[505], integer=False, backend="triton",
                      importance="attention", refresh="threshold", refresh_threshold=0.004, sms=4, steps=12),
         dict(split=8, observer=True, writer=False, lean=False, online=True)),
        ("raas", dict(B=2, Hq=6, Hkv=2, D=16, budget=32, ps=2, lens=[3, 26], integer=False, backend="triton",
                      importance="attention", refresh="threshold", refresh_threshold=0.05, block_size=8, steps=16),
         dict(split=1, observer=True)),
        ("raas", dict(B=1, Hq=7, Hkv=1, D=16, budget=384, ps=128, lens=[250], integer=False, backend="triton",
                      importance="attention", refresh_ratio=0.34, pin_prompt=False, steps=12),
         dict(split=4, observer=True, online=True)),
        ("h2o", dict(B=2, Hq=4, Hkv=2, D=16, budget=64, ps=8, lens=[55, 9], integer=False, backend="triton",
                     block_size=2, sms=1, steps=16),
         dict(split=1, observer=False, lean=True, lazy=False)),
        ("h2o", dict(B=1, Hq=7, Hkv=1, D=64, budget=128, ps=1, lens=[100], integer=False, backend="triton",
                     steps=24),
         dict(split=2, observer=True, writer=False)),
        ("streaming", dict(B=2, Hq=2, Hkv=1, D=16, budget=16, ps=2, lens=[0, 9], integer=True, sink_tokens=3), None),
        # quest on the flex path (dense's append rule, its bounds and pick kernels); the second fills its
        # 64 slots and overflows
        ("quest", dict(B=2, Hq=4, Hkv=2, D=16, budget=16, ps=4, lens=[5, 30], integer=True, max_length=96), None),
        ("quest", dict(B=1, Hq=6, Hkv=2, D=16, budget=24, ps=8, lens=[40], integer=False, max_length=64), None),
        # quest on backend="triton" (the same kernels, then paged_attend over the picked pages): 1 and 4
        # attention programs a row (the online combine); the first fills its 64 slots and overflows
        ("quest", dict(B=2, Hq=6, Hkv=2, D=16, budget=24, ps=8, lens=[5, 40], integer=False, max_length=64,
                       backend="triton"), None),
        ("quest", dict(B=1, Hq=3, Hkv=1, D=16, budget=256, ps=4, lens=[300], integer=True, max_length=512,
                       backend="triton", steps=12), None),
        ("h2o", dict(B=1, Hq=2, Hkv=1, D=16, budget=16, ps=2, lens=[12], integer=True, pin_prompt=True), None),
        # fused_step for streaming (no observe): sink pages, a pinned prompt, pages of 3 slots (no
        # shares, so any page size), with and without the observer program
        ("streaming", dict(B=2, Hq=6, Hkv=2, D=16, budget=48, ps=3, lens=[5, 40], integer=True, backend="triton",
                           sink_tokens=7, steps=30), dict(split=1, observer=True, writer=False)),
        ("streaming", dict(B=2, Hq=4, Hkv=2, D=16, budget=64, ps=8, lens=[55, 9], integer=False, backend="triton",
                           pin_prompt=True, sink_tokens=0, block_size=2, sms=1, steps=20),
         dict(split=1, observer=False, lean=True, lazy=False)),
        # dense (nothing evictable) on the flex path and in fused_step, with and without the observer;
        # row 0 of the last case fills its 64 slots and overflows (both caches flag it)
        ("dense", dict(B=2, Hq=2, Hkv=1, D=16, budget=16, ps=2, lens=[0, 9], integer=True, max_length=48), None),
        ("dense", dict(B=2, Hq=6, Hkv=2, D=16, budget=15, ps=3, lens=[5, 40], integer=True, backend="triton",
                       max_length=96, steps=30), dict(split=2, observer=True, writer=False)),
        ("dense", dict(B=2, Hq=4, Hkv=2, D=16, budget=16, ps=8, lens=[50, 9], integer=False, backend="triton",
                       max_length=64, block_size=2, sms=1, steps=20),
         dict(split=1, observer=False, lean=True, lazy=False)),
    ]
    for i, (policy, kw, want) in enumerate(cases):
        if i % {parts} != {part}:  # (the test runs the cases in {parts} processes side by side)
            continue
        steps = kw.pop("steps", 40)
        ref, fus = t.twin_run(policy, steps=steps, mode="eager", dtype=torch.float32, device="cpu", **kw)
        if want is not None:
            plan = kernels.step_plan(fus.B * fus.H, fus.S, fus.P, fus.G, fus.D, kw.get("sms"),
                                     bounds=fus.policy.step_observe == 0)
            got = {{k: getattr(plan, k) for k in want}}
            assert got == want, (kw, plan)
        print(i, policy, "ok", ref.evictions.sum().item(), bool(ref.overflow))
""")


@given(rows=st.integers(1, 4096), slots=st.integers(1, 1 << 15), pages_per=st.sampled_from([1, 2, 4, 8, 16, 32]),
       G=st.integers(1, 16), D=st.sampled_from([16, 32, 64, 128, 256]), sms=st.none() | st.integers(1, 264),
       bounds=st.booleans())
def test_step_plan_follows_its_rules(rows, slots, pages_per, G, D, sms, bounds):
    """kernels.step_plan against the rules' definitions, for any shape: programs per row a power of
    two within the tiles (split_for: about 2 per SM, at least one per TILES_PER_PROGRAM tiles;
    CPU_SPLIT without SMs); the observer while rows x (split + 1) fits OBSERVER_MAX_PROGRAMS_PER_SM
    per SM (always on CPU), then at least OBSERVER_MIN_SPLIT programs; a writer from
    ROW_WRITER_MIN_SPLIT, lean writes unless the observer writes, the lazy choice and the bounds as
    products with the observer, the online combine from COMBINE_ONLINE_MIN_SPLIT, observers last while
    the grid fits OBSERVERS_LAST_MAX_PROGRAMS_PER_SM per SM, 3 stages for wide steps. With attention
    shares or no observe (no bounds to compute) the same, without a writer."""
    K = kernels
    pages = max(1, slots // pages_per)
    plan = K.step_plan(rows, slots, pages, G, D, sms, bounds=bounds)
    tiles = -(-slots // K.BLOCK_N)
    want = K.CPU_SPLIT if sms is None else max(1, 2 * sms // rows, -(-tiles // K.TILES_PER_PROGRAM))
    base = max(s for s in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512) if s <= min(want, tiles))
    assert K.split_for(rows, tiles, sms) == base
    assert plan.observer == (sms is None or rows * (base + 1) <= K.OBSERVER_MAX_PROGRAMS_PER_SM * sms)
    least = max(s for s in (1, 2, 4, 8) if s <= min(K.OBSERVER_MIN_SPLIT, tiles))
    assert plan.split == (max(base, least) if plan.observer else base)
    assert plan.split & (plan.split - 1) == 0 and 1 <= plan.split <= tiles
    assert plan.tiles * plan.split >= tiles > (plan.tiles - 1) * plan.split
    assert plan.writer == (plan.observer and plan.split >= K.ROW_WRITER_MIN_SPLIT and bounds)
    if bounds:  # no bounds change only the writer and what follows from the program count
        without = K.step_plan(rows, slots, pages, G, D, sms, bounds=False)
        assert dataclasses.replace(without, writer=plan.writer, lean=plan.lean,
                                   observers_last=plan.observers_last) == plan
    assert plan.lean == (plan.writer or not plan.observer)
    assert plan.lazy == plan.dot == plan.observer
    assert plan.online == (plan.observer and plan.split >= K.COMBINE_ONLINE_MIN_SPLIT)
    assert plan.programs == plan.split + plan.observer + plan.writer
    fits = sms is None or rows * plan.programs <= K.OBSERVERS_LAST_MAX_PROGRAMS_PER_SM * sms
    assert plan.observers_last == (plan.observer and fits)
    assert plan.stages == (3 if G >= 7 and rows >= 128 else 2)
    # the bound loop covers the pages it bounds, in whole chunks of at most its element budget
    covered = pages if plan.observer else plan.pages
    assert plan.pages * plan.split >= pages and plan.bp >= covered and plan.bp % plan.bpc == 0
    if plan.observer:
        elems = K.OBSERVER_BOUND_ELEMS if plan.bp * D <= K.OBSERVER_BOUND_ELEMS else K.OBSERVER_CHUNK_ELEMS
        assert plan.bpc >= 16 and (plan.bpc == 16 or plan.bpc * D <= elems)
        assert plan.bpc == plan.bp or plan.bpc * 2 * D > elems
    else:
        assert plan.bpc * D <= K.SHARE_BOUND_ELEMS or plan.bpc == 1
        assert plan.bpc == plan.bp or plan.bpc * 2 * D > K.SHARE_BOUND_ELEMS


def test_step_plan_at_the_h200_points():
    """The plans of the H200 benchmark points (132 SMs, N=8192 tokens per batch, 128-slot blocks):
    B=8 28/4 8 programs per row with observer and writer; B=8 32/8 4 with the observer; B=32 28/4
    L=1024 2 (observer, 3 stages); B=32 32/8 L=1024 the observer at 2 programs (split_for gives 1),
    L=2048 no observer; one SM: no observer for 2 rows of 4 tiles."""
    plan = lambda B, hq, hkv, L, sms=132: kernels.step_plan(B * hkv, L, L // 16, hq // hkv, 128, sms)
    p = plan(8, 28, 4, 1024)
    assert (p.split, p.observer, p.writer, p.lean, p.online, p.observers_last, p.programs) == (8, True, True, True,
                                                                                            True, True, 10)
    p = plan(8, 32, 8, 2048)
    assert (p.split, p.observer, p.writer, p.lean, p.online, p.observers_last) == (4, True, False, False, True, True)
    p = plan(32, 28, 4, 1024)
    assert (p.split, p.observer, p.stages, p.online, p.observers_last) == (2, True, 3, False, True)
    assert plan(32, 28, 4, 4096).observers_last is False  # 640 programs: more than 3 per SM
    assert kernels.split_for(256, 16, 132) == 1
    p = plan(32, 32, 8, 1024)
    assert (p.split, p.observer, p.observers_last) == (2, True, False)
    p = plan(32, 32, 8, 2048)
    assert (p.split, p.observer, p.lean, p.lazy, p.dot, p.programs) == (2, False, True, False, False, 2)
    assert (p.bp, p.bpc) == (64, 16)  # each program bounds 64 pages in chunks of 2048 elements
    assert not plan(2, 8, 2, 256, sms=1).observer
    assert plan(8, 32, 8, 8192).bpc == 64  # the observer's 512 pages in chunks of 8192 elements


@pytest.mark.parametrize("name, value, allowed", [("rows", 0, "an int >= 1"), ("slots", 2.0, "an int >= 1"),
                                                  ("G", True, "an int >= 1"), ("sms", 0, "None or an int >= 1")])
def test_step_plan_refuses_bad_input(name, value, allowed):
    args = dict(rows=4, slots=256, pages=16, G=4, D=128, sms=132) | {name: value}
    with pytest.raises(ValueError, match=rf"step_plan: {name}={value!r} is not allowed; allowed: {allowed}"):
        kernels.step_plan(**args)
    with pytest.raises(TypeError, match=r"step_plan: bounds must be True or False, got 1"):
        kernels.step_plan(4, 256, 16, 4, 128, 132, bounds=1)


@pytest.mark.skipif(not kernels.HAS_TRITON, reason="needs triton")
@pytest.mark.parametrize("observe, policy, page_size, text", [
    (5, 0, 4, "fused_step: observe=5 is not supported; allowed: 0, 1, 2, 3, 4"),
    (4, 0, 4, "fused_step: policy=0 with observe=4 is not supported"),
    (0, 1, 4, "fused_step: policy=1 with observe=0 is not supported; allowed: policy 0 (raas) with observe 0, 1 or 2, "
              "policy 2 (h2o) with observe 3, policy 1 (streaming) or 3 (dense) with observe 4"),
    (0, 3, 4, "fused_step: policy=3 with observe=0 is not supported"),
    (3, 0, 4, "fused_step: policy=0 with observe=3 is not supported; allowed: policy 0 (raas) with observe 0, 1"),
    (1, 2, 4, "fused_step: policy=2 with observe=1 is not supported"),
    (2, 0, 12, "fused_step: attention shares need a page size that is a power of two; got 12"),
])
def test_fused_step_refuses_what_it_does_not_serve(observe, policy, page_size, text):
    """fused_step names the argument it cannot serve before it launches anything (so on any device)."""
    c = PagedKVCache(make_config(4 * page_size, "raas", page_size=page_size, backend="torch"), batch_size=1,
                     num_heads=2, num_kv_heads=1, head_dim=16)
    z = lambda *shape: torch.zeros(*shape)
    state = (c.k, c.v, c.page_id, c.stamp, c.pinned, c.score, c.kmax, c.kmin, c.open_slot, c.length, c.step,
             c.evictions, c.overflow, c.valid, torch.zeros(1, dtype=torch.int32), *c._lists)
    with pytest.raises(ValueError, match=text.replace("(", r"\(").replace(")", r"\)")):
        kernels.fused_step(z(1, 2, 1, 16), z(1, 1, 1, 16), z(1, 1, 1, 16), *state, z(1, 1, c.P),
                           torch.zeros(1, dtype=torch.int32), c.scale, 1, c.block, observe, policy, 0, 0.1)


@pytest.mark.skipif(not kernels.HAS_TRITON, reason="needs triton")
@pytest.mark.parametrize("layer, text", [
    (dict(window=-1), "window must be an int >= 0 (0: none); got -1"),
    (dict(softcap=-2.0), "softcap must be >= 0 (0: none); got -2.0"),
    (dict(softcap=float("nan")), "softcap must be >= 0 (0: none); got nan"),
    (dict(sinks=torch.zeros(2)), "sinks must be fp32 [num_kv_heads=1, 2]; got torch.float32 (2,)"),
    (dict(sinks=torch.zeros(1, 2, dtype=torch.float64)), "sinks must be fp32 [num_kv_heads=1, 2]; got torch.float64"),
])
def test_kernels_refuse_bad_layer_arguments(layer, text):
    """fused_step and paged_attend name a bad window, softcap or sinks before they launch anything."""
    c = PagedKVCache(make_config(16, "raas", page_size=4, backend="torch"), batch_size=1, num_heads=2, num_kv_heads=1,
                     head_dim=16)
    z = lambda *shape: torch.zeros(*shape)
    i32 = lambda *shape: torch.zeros(*shape, dtype=torch.int32)
    state = (c.k, c.v, c.page_id, c.stamp, c.pinned, c.score, c.kmax, c.kmin, c.open_slot, c.length, c.step,
             c.evictions, c.overflow, c.valid, i32(1), *c._lists)
    match = text.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[").replace("]", r"\]")
    with pytest.raises(ValueError, match=match):
        kernels.fused_step(z(1, 2, 1, 16), z(1, 1, 1, 16), z(1, 1, 1, 16), *state, z(1, 1, c.P), i32(1), c.scale, 1,
                           c.block, 0, 0, 0, 0.1, 0, **layer)
    if "window" not in layer:
        with pytest.raises(ValueError, match=match):
            kernels.paged_attend(z(1, 2, 1, 16), c.k, c.v, c.page_id, c.length, i32(1), i32(1, c.P), i32(1), c.scale,
                                 1, **layer)


@pytest.mark.skipif(not kernels.HAS_TRITON, reason="needs triton (the interpreter runs the kernels on CPU)")
def test_interpreter_matches_torch_on_cpu():
    """The kernels' logic through Triton's CPU interpreter against the torch reference: the append
    kernel with the observe (raas, exact and resync; block occupancy from registers and read back;
    the observe's bounds in one chunk and in two), without it (streaming, and h2o with pinned prompt
    pages, which overflows), and fused_step under the plans of the CPU and of GPUs of 1 and 4 SMs,
    which cover the observer (first and last in the grid) with and without the writer, full and lean
    row writes, the lazy page choice, 1 to 8 attention programs, the combine in both forms and the
    bounds in one chunk and several, as products and element-wise; and fused_step with attention
    shares (raas top-k and threshold, h2o) for pages of 1 to 128 slots, resynced every step (page
    tables equal, scores within 1e-4 relative, stamps equal except at the top-k or threshold
    boundary: ``assert_stamps_near_tie``); dense (nothing evictable, a full buffer overflows) on
    both paths; and quest on both paths (same rule, pages picked each step; on triton, paged_attend
    with 1 and 4 programs a row)."""
    lines = [ln.split(None, 1)[1] for ln in run_interpreted_cases(INTERPRETER_SCRIPT)]  # without the index
    assert len(lines) == 30 and lines[-6].endswith("True"), lines  # the h2o case overflowed
    assert [ln.split()[-1] for ln in lines if ln.startswith("quest")] == ["False", "True", "True", "False"], lines
    assert lines[-1].endswith("True") and not lines[-2].endswith("True"), lines  # so did the last dense one


QUEST_STEP_SCRIPT = textwrap.dedent("""
    import sys, torch
    sys.path[:0] = [{tests!r}]
    import test_kernels as t
    from raas_flex import kernels
    # two quest caches on the fused path from one prompt: 128 pages of 4 slots, so the bounds take two
    # programs a row; steps that open a page and steps that do not
    caches = [t.make_pair("quest", B=2, Hq=4, Hkv=2, D=16, budget=16, ps=4, dtype=torch.float32, device="cpu",
                          max_length=512)[1] for _ in range(2)]
    inp = t.Inputs(2, 4, 2, 16, dtype=torch.float32, device="cpu", integer=False, seed=3)
    prompt = inp.prompt([5, 12])
    for c in caches:
        c.prefill(*prompt)
    fused, parts = caches
    assert fused.P == 128 and kernels.BOUND_PAGES < fused.P
    for i in range(6):
        q, k, v = inp.step()
        states = [(c.k, c.v, c.page_id, c.stamp, c.pinned, c.score, c.kmax, c.kmin, c.open_slot, c.length, c.step,
                   c.evictions, c.overflow, c.valid, c._ticket, *c._lists) for c in caches]
        got = kernels.quest_step(q, k, v, *states[0], fused._imp, fused.budget_pages)
        kernels.fused_append(k, v, *states[1], parts.policy.append_code, 0, 0, parts.block)
        bound = kernels.page_bounds(q, parts.kmax, parts.kmin, parts.page_id)
        want = kernels.pick_pages(bound, parts.page_id, parts.open_slot, parts.length, parts.valid,
                                  parts.budget_pages)
        for name in t.STATE + ("valid",):
            assert torch.equal(getattr(fused, name), getattr(parts, name)), (i, name)
        assert torch.equal(fused._imp, bound), i
        assert all(torch.equal(a, b) for a, b in zip(got, want)), (i, got, want)
    assert int(fused._ticket) == 0 and (fused.page_id >= 0).sum(-1).max() > fused.budget_pages
    print("quest step ok")
""")


@pytest.mark.skipif(not kernels.HAS_TRITON, reason="needs triton (the interpreter runs the kernels on CPU)")
def test_interpreter_quest_step_matches_its_parts():
    """quest_step (quest's append and page bounds in one launch of many programs a row, then the pick)
    makes, step after step, the same state change as the append kernel under dense's rule, the bounds
    kernel and the pick kernel one after another: tables, lengths, step and validity row equal, the
    bounds and the picked lists equal (the kernels apart are checked against the torch rules in the
    tests above and below)."""
    run_interpreted(QUEST_STEP_SCRIPT.format(tests=str(Path(__file__).resolve().parent)), "quest step ok")


LAYER_SPEC_SCRIPT = textwrap.dedent("""
    import sys, torch
    sys.path[:0] = [{tests!r}]
    import test_kernels as t
    from raas_flex import AttentionSpec
    W, C, S = AttentionSpec(window=21), AttentionSpec(softcap=5.0), AttentionSpec(sinks=True)
    ALL, CS = AttentionSpec(window=13, softcap=5.0, sinks=True), AttentionSpec(softcap=5.0, sinks=True)
    # (policy, twin_run arguments): fused_step with a sliding window, a softcap and sinks, apart and
    # together, under the plans of the CPU (the observer) and of a GPU of one SM (no observer: the row's
    # last program writes the whole validity row); integer inputs where the observe is exact. Then
    # softcap and sinks without a window on the flex path's kernels and on quest's (paged_attend)
    cases = [
        ("raas", dict(B=2, Hq=6, Hkv=2, D=16, budget=64, ps=4, lens=[20, 58], integer=True, spec=ALL)),
        ("raas", dict(B=2, Hq=4, Hkv=2, D=16, budget=64, ps=8, lens=[55, 9], integer=True, spec=W, block_size=2,
                      sms=1)),
        ("raas", dict(B=1, Hq=6, Hkv=2, D=16, budget=128, ps=4, lens=[100], integer=False, spec=ALL,
                      importance="attention", pin_prompt=False, sms=1)),
        ("raas", dict(B=2, Hq=6, Hkv=2, D=16, budget=64, ps=4, lens=[20, 58], integer=False, spec=C,
                      importance="attention", refresh="threshold", refresh_threshold=0.02)),
        ("h2o", dict(B=2, Hq=4, Hkv=2, D=16, budget=64, ps=8, lens=[55, 9], integer=False, spec=S, block_size=2,
                     sms=1)),
        # a sliding-window layer's ring (streaming, no sink tokens: window 13 in 5 pages of 4)
        ("streaming", dict(B=2, Hq=6, Hkv=2, D=16, budget=20, ps=4, lens=[3, 30], integer=True, spec=ALL,
                           sink_tokens=0)),
        ("raas", dict(B=2, Hq=6, Hkv=2, D=16, budget=64, ps=4, lens=[20, 58], integer=True, spec=CS, backend="flex")),
        ("h2o", dict(B=2, Hq=4, Hkv=2, D=16, budget=64, ps=8, lens=[55, 9], integer=False, spec=CS, backend="flex")),
        # one query head a KV head (OLMo-3-7B has no GQA) with a window, by bound and by share
        ("raas", dict(B=2, Hq=2, Hkv=2, D=16, budget=64, ps=4, lens=[20, 58], integer=True, spec=W)),
        ("raas", dict(B=1, Hq=2, Hkv=2, D=16, budget=64, ps=4, lens=[50], integer=False, spec=W,
                      importance="attention", pin_prompt=False)),
        ("quest", dict(B=2, Hq=6, Hkv=2, D=16, budget=24, ps=8, lens=[5, 40], integer=False, max_length=64, spec=CS)),
        ("quest", dict(B=1, Hq=3, Hkv=1, D=16, budget=256, ps=4, lens=[300], integer=True, max_length=512, spec=CS,
                       steps=12)),
    ]
    for i, (policy, kw) in enumerate(cases):
        if i % {parts} != {part}:
            continue
        kw.setdefault("backend", "triton")
        ref, fus = t.twin_run(policy, steps=kw.pop("steps", 30), mode="eager", dtype=torch.float32, device="cpu", **kw)
        print(i, policy, "ok", ref.evictions.sum().item(), bool(ref.overflow))
""")


@pytest.mark.skipif(not kernels.HAS_TRITON, reason="needs triton (the interpreter runs the kernels on CPU)")
def test_interpreter_layer_specs_match_torch_on_cpu():
    """fused_step for layers with a sliding window, a logit softcap and learned sinks (apart and
    together; raas by bound and by share, h2o, the streaming ring of a window layer), and the flex
    path's and quest's kernels with a softcap and sinks, against the torch reference through Triton's
    interpreter: the validity row and block lists of the tokens in the window, the page tables (exact
    on integer inputs), the shares of the capped softmax with the sinks in its denominator, and the
    output; also with one query head a KV head. Every bounded case evicts; the first quest case fills its
    buffer and overflows."""
    lines = run_interpreted_cases(LAYER_SPEC_SCRIPT)
    assert len(lines) == 12, lines
    assert all(int(ln.split()[-2]) > 0 for ln in lines[:10]), lines  # evictions
    assert [ln.split()[-1] for ln in lines[10:]] == ["True", "False"], lines  # quest overflows its 64 slots


# -- GPU -------------------------------------------------------------------------------------------
# (id, policy, shape and budget, prompt lengths, extra config). Page counts 8, 33, 128 and 256; G of
# 1, 3, 4, 7; prompts near the budget (eviction starts within ~ps steps) mixed with short ones.
# raas cases run fused_append_observe, "triton" ones (backend="triton") fused_step under the GPU's
# plan, or with ``sms`` the plan of a GPU of that many SMs.
B8 = dict(B=8, Hq=32, Hkv=8, D=128, budget=2048, ps=16)
B8_LENS = [2020, 2030, 5, 1500, 2000, 2031, 700, 2025]
GPU_CASES = [
    ("raas-P8-G3", "raas", dict(B=2, Hq=6, Hkv=2, D=64, budget=128, ps=16), [20, 100], {}),
    ("raas-P33-G7", "raas", dict(B=3, Hq=7, Hkv=1, D=128, budget=528, ps=16), [1, 300, 505], dict(pin_prompt=False)),
    ("raas-P128-G4", "raas", B8, B8_LENS, dict(pin_prompt=False)),
    ("raas-P256-G7", "raas", dict(B=2, Hq=28, Hkv=4, D=128, budget=4096, ps=16), [4070, 3000], {}),
    # 64 rows of 4 programs with the observer (132 SMs); on 16 SMs no observer (2 programs), on 50
    # the observer at the rows' first grid indices
    ("raas-P128-G4-triton", "raas", B8, B8_LENS, dict(pin_prompt=False, backend="triton")),
    ("raas-P128-G4-triton-no-observer", "raas", B8, B8_LENS, dict(pin_prompt=False, backend="triton", sms=16)),
    ("raas-P128-G4-triton-observers-first", "raas", B8, B8_LENS, dict(pin_prompt=False, backend="triton", sms=50)),
    # 8 rows of 32 programs: the observer, the writer, lean row writes, the observer's bounds in chunks
    ("raas-P256-G7-triton", "raas", dict(B=2, Hq=28, Hkv=4, D=128, budget=4096, ps=16), [4070, 3000],
     dict(backend="triton")),
    ("raas-P33-G7-triton", "raas", dict(B=3, Hq=7, Hkv=1, D=128, budget=528, ps=16), [1, 300, 505],
     dict(pin_prompt=False, backend="triton")),
    ("raas-P64-G4-triton", "raas", dict(B=8, Hq=32, Hkv=8, D=128, budget=1024, ps=16),
     [1000, 990, 5, 900, 1008, 1003, 700, 1001], dict(pin_prompt=False, backend="triton")),
    # 160 rows of 8 tiles: split_for gives 1 program per row on 132 SMs, the observer is on, and
    # OBSERVER_MIN_SPLIT makes it 2
    ("raas-P32-G7-triton-rows160", "raas", dict(B=20, Hq=56, Hkv=8, D=128, budget=512, ps=16),
     [490 - 7 * i for i in range(20)], dict(pin_prompt=False, backend="triton")),
    ("raas-P34-r0.1-ps8", "raas", dict(B=2, Hq=4, Hkv=4, D=128, budget=272, ps=8), [262, 100],
     dict(refresh_ratio=0.1, pin_prompt=False)),
    ("raas-attention-P8", "raas", dict(B=2, Hq=6, Hkv=2, D=64, budget=128, ps=16), [20, 110],
     dict(importance="attention", refresh="threshold", refresh_threshold=0.01, pin_prompt=False)),
    ("streaming-P16", "streaming", dict(B=2, Hq=6, Hkv=2, D=64, budget=128, ps=8), [40, 118], dict(sink_tokens=10)),
    ("h2o-P16", "h2o", dict(B=2, Hq=6, Hkv=2, D=64, budget=256, ps=16), [60, 238], {}),
    # fused_step with the attention shares of its own pass: raas top-k and threshold, h2o; with the
    # observer (132 SMs), without it (16 SMs), 32 programs per row with the online combine (P256)
    ("raas-attention-P128-G4-triton", "raas", B8, B8_LENS,
     dict(pin_prompt=False, backend="triton", importance="attention")),
    ("raas-attention-P128-G4-triton-no-observer", "raas", B8, B8_LENS,
     dict(pin_prompt=False, backend="triton", importance="attention", sms=16)),
    ("raas-attention-P256-G7-triton", "raas", dict(B=2, Hq=28, Hkv=4, D=128, budget=4096, ps=16), [4070, 3000],
     dict(backend="triton", importance="attention")),
    ("raas-threshold-P128-G4-triton", "raas", B8, B8_LENS,
     dict(pin_prompt=False, backend="triton", importance="attention", refresh="threshold", refresh_threshold=0.01)),
    ("raas-threshold-P8-triton", "raas", dict(B=2, Hq=6, Hkv=2, D=64, budget=128, ps=16), [20, 110],
     dict(importance="attention", refresh="threshold", refresh_threshold=0.01, pin_prompt=False, backend="triton")),
    ("h2o-P16-triton", "h2o", dict(B=2, Hq=6, Hkv=2, D=64, budget=256, ps=16), [60, 238], dict(backend="triton")),
    ("h2o-P128-G4-triton", "h2o", B8, B8_LENS, dict(backend="triton")),
    ("h2o-P128-G4-triton-no-observer", "h2o", B8, B8_LENS, dict(backend="triton", sms=16)),
    # fused_step without an observe (streaming): sink pages; with and without the observer program
    ("streaming-P16-triton", "streaming", dict(B=2, Hq=6, Hkv=2, D=64, budget=128, ps=8), [40, 118],
     dict(sink_tokens=10, backend="triton")),
    ("streaming-P128-G4-triton", "streaming", B8, B8_LENS, dict(backend="triton", pin_prompt=False)),
    ("streaming-P128-G4-triton-no-observer", "streaming", B8, B8_LENS, dict(backend="triton", sms=16)),
    # fused_step for layers with a sliding window, softcap or sinks: gpt-oss shapes (64/8 heads of 64, sinks;
    # its window layers as the patch builds them, a ring of 9 pages for a window of 128), Gemma 2's softcap
    # with a window, shares under a window, no observer
    ("raas-sinks-P128-G8-triton", "raas", dict(B=8, Hq=64, Hkv=8, D=64, budget=2048, ps=16), B8_LENS,
     dict(pin_prompt=False, backend="triton", spec=AttentionSpec(sinks=True))),
    ("streaming-ring-window128-sinks-triton", "streaming", dict(B=8, Hq=64, Hkv=8, D=64, budget=144, ps=16),
     B8_LENS, dict(sink_tokens=0, backend="triton", spec=AttentionSpec(window=128, sinks=True))),
    ("raas-window-softcap-P128-G4-triton", "raas", B8, B8_LENS,
     dict(backend="triton", spec=AttentionSpec(window=1500, softcap=2.0))),
    ("raas-attention-window-sinks-P128-G4-triton", "raas", B8, B8_LENS,
     dict(pin_prompt=False, backend="triton", importance="attention", spec=AttentionSpec(window=1000, sinks=True))),
    ("h2o-window-softcap-P128-G4-triton-no-observer", "h2o", B8, B8_LENS,
     dict(backend="triton", sms=16, spec=AttentionSpec(window=1200, softcap=2.0))),
    # one query head a KV head (OLMo-3-7B: 32/32 heads, windows on three layers of four), by bound and by share
    ("raas-window-P64-G1-triton", "raas", dict(B=4, Hq=32, Hkv=32, D=128, budget=1024, ps=16), [1000, 5, 1008, 600],
     dict(backend="triton", spec=AttentionSpec(window=512))),
    ("raas-attention-window-P64-G1-triton", "raas", dict(B=4, Hq=32, Hkv=32, D=128, budget=1024, ps=16),
     [1000, 5, 1008, 600], dict(pin_prompt=False, backend="triton", importance="attention",
                                 spec=AttentionSpec(window=512))),
    # the flex path with a softcap and sinks (flex's score_mod, the sinks through its log-sum-exp)
    ("raas-softcap-sinks-P128-G4-flex", "raas", B8, B8_LENS,
     dict(pin_prompt=False, spec=AttentionSpec(softcap=2.0, sinks=True))),
    ("raas-attention-softcap-sinks-P128-G4-flex", "raas", B8, B8_LENS,
     dict(pin_prompt=False, importance="attention", backend="flex", spec=AttentionSpec(softcap=2.0, sinks=True))),
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


# (h2o and raas importance="attention" are left out: their scores are softmax shares, not exact sums)
EXACT_CASES = [c for c in GPU_CASES if c[0] in ("raas-P8-G3", "raas-P33-G7", "raas-P128-G4", "raas-P128-G4-triton",
                                                 "raas-P33-G7-triton", "raas-P128-G4-triton-no-observer",
                                                 "raas-P128-G4-triton-observers-first", "streaming-P16",
                                                 "streaming-P16-triton", "streaming-P128-G4-triton",
                                                 "streaming-ring-window128-sinks-triton",
                                                 "raas-window-softcap-P128-G4-triton")]


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


# dense over an 8k buffer (512 pages: 8 rows of 16 programs on 132 SMs, no observer) and the flex path
DENSE_CASES = [
    ("dense-P512-G4-triton", dict(B=2, Hq=32, Hkv=8, D=128, budget=2048, ps=16), [8000, 3000],
     dict(backend="triton", max_length=8192)),
    ("dense-P512-G4-triton-sms16", dict(B=2, Hq=32, Hkv=8, D=128, budget=2048, ps=16), [8000, 3000],
     dict(backend="triton", max_length=8192, sms=16)),
    ("dense-P32-flex", dict(B=2, Hq=6, Hkv=2, D=64, budget=128, ps=8), [40, 118], dict(max_length=256)),
]


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", DENSE_CASES, ids=[c[0] for c in DENSE_CASES])
def test_gpu_dense_matches_torch(case, mode):
    """Dense on the fused paths: random bf16 inputs resynced every step (70 steps), then integer
    inputs without resync (bit-identical page tables); nothing evicted, nothing overflowed."""
    keeps_everything_like_torch("dense", case, mode)


def keeps_everything_like_torch(policy, case, mode):
    """twin_run of a policy that evicts nothing (dense, quest), random then integer inputs, and
    neither cache evicted or overflowed."""
    _, shape, lens, kw = case
    for integer in (False, True):
        ref, fus = twin_run(policy, **shape, lens=lens, steps=70, mode=mode, integer=integer, **kw)
        assert ref.evictions.sum().item() == 0 and fus.evictions.sum().item() == 0
        assert not bool(ref.overflow) and not bool(fus.overflow)


QUEST_CASES = [  # quest on triton (backend=None's: paged_attend over the picked pages), then on flex: 512 pages of
    # 16 slots, 128 attended; 16 of them, 4; all 16 (flex: the constant all-partial block lists, which the append
    # kernel leaves to quest)
    *((f"quest-P512-G4-{b}", dict(B=2, Hq=32, Hkv=8, D=128, budget=2048, ps=16), [8000, 3000],
       dict(max_length=8192, backend=b)) for b in ("triton", "flex")),
    *((f"quest-P16-G3-{b}", dict(B=2, Hq=6, Hkv=2, D=64, budget=64, ps=16), [40, 118], dict(max_length=256, backend=b))
      for b in ("triton", "flex")),
    *((f"quest-P16-all-{b}", dict(B=2, Hq=6, Hkv=2, D=64, budget=256, ps=16), [40, 118],
       dict(max_length=256, backend=b)) for b in ("triton", "flex")),
    # with a softcap and sinks (Gemma 2's and gpt-oss's full layers)
    *((f"quest-P512-G4-softcap-sinks-{b}", dict(B=2, Hq=32, Hkv=8, D=128, budget=2048, ps=16), [8000, 3000],
       dict(max_length=8192, backend=b, spec=AttentionSpec(softcap=2.0, sinks=True))) for b in ("triton", "flex")),
]


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", QUEST_CASES, ids=[c[0] for c in QUEST_CASES])
def test_gpu_quest_matches_torch(case, mode):
    """Quest with the fused append and its bounds and pick kernels, against the torch reference: random
    bf16 inputs resynced every step, then integer inputs without resync (bit-identical page tables
    and attended slots); nothing evicted, nothing overflowed."""
    keeps_everything_like_torch("quest", case, mode)


@pytest.mark.gpu
@requires_cuda
def test_gpu_backends():
    """On CUDA, backend=None picks the one-kernel step for raas (either importance), h2o, streaming
    and dense, and quest's kernels with paged_attend; the fused bookkeeping + flex when asked for."""
    make = lambda budget, policy, **kw: PagedKVCache(make_config(budget, policy, page_size=16, **kw), batch_size=1,
                                                     num_heads=2, num_kv_heads=1, head_dim=64, dtype=torch.bfloat16,
                                                     device="cuda")
    assert make(64, "raas").backend == "triton"
    assert make(64, "raas", importance="attention", refresh="threshold").backend == "triton"
    assert make(64, "raas", importance="attention").backend == "triton"
    assert make(64, "h2o").backend == "triton" and make(64, "streaming").backend == "triton"
    assert make(64, "streaming", backend="flex").backend == "flex"
    assert make(64, "h2o", backend="flex").backend == "flex"
    assert make(64, "raas", importance="attention", backend="flex").backend == "flex"
    assert make(64, "quest", max_length=128).backend == "triton"
    assert make(64, "quest", max_length=128, backend="flex").backend == "flex"
    assert make(64, "dense", max_length=128).backend == "triton"
    layer = lambda policy, spec, **kw: PagedKVCache(make_config(64, policy, page_size=16, **kw), batch_size=1,
                                                    num_heads=2, num_kv_heads=1, head_dim=64, dtype=torch.bfloat16,
                                                    device="cuda", spec=spec)
    windowed, capped = AttentionSpec(window=32, softcap=30.0, sinks=True), AttentionSpec(softcap=30.0, sinks=True)
    assert layer("raas", windowed).backend == "triton" and layer("streaming", windowed).backend == "triton"
    assert layer("quest", windowed, max_length=128).backend == "torch"
    assert layer("quest", capped, max_length=128).backend == "triton"
    c = make(64, "raas")
    z = lambda *shape: torch.zeros(*shape, dtype=torch.bfloat16, device="cuda")
    with pytest.raises(ValueError, match=r"k must be \[batch_size=1, num_kv_heads=1, 1, head_dim=64\]"):
        c.decode(z(1, 2, 1, 64), z(1, 2, 1, 64), z(1, 1, 1, 64))


SHARE_SCRIPT = textwrap.dedent("""
    import sys, torch
    from hypothesis import given, settings, strategies as st
    sys.path[:0] = [{tests!r}]
    import test_kernels as t
    from raas_flex import kernels, masks
    from raas_flex.kernels import attention
    from raas_flex.policies import descending_rank

    RTOL, ATOL = {rtol!r}, {atol!r}  # the shares' tolerance (argued in the test's docstring)

    @settings(max_examples={examples}, deadline=None, derandomize=True)
    @given(st.data())
    def check(data):
        kind = data.draw(st.sampled_from(["topk", "threshold", "h2o"]), label="observe")
        B, H, G = (data.draw(st.integers(1, n), label=name) for n, name in ((2, "B"), (2, "Hkv"), (5, "G")))
        ps = data.draw(st.sampled_from([1, 2, 4, 8, 16, 128]), label="page_size")
        pages = data.draw(st.integers(2, 3 if ps == 128 else 12), label="budget pages")
        full = (pages - 1) * ps  # the longest prompt (one page stays free)
        lens = data.draw(st.lists(st.integers(0, full) | st.just(full), min_size=B, max_size=B), label="prompt lengths")
        sms = data.draw(st.sampled_from([None, 1, 2, 4, 16]), label="sms")  # the launch plan of such a GPU
        seed = data.draw(st.integers(0, 2**16), label="seed")
        if kind == "h2o":
            policy, kw = "h2o", {{}}
        else:
            policy, kw = "raas", dict(importance="attention", pin_prompt=data.draw(st.booleans(), label="pin_prompt"))
            if kind == "threshold":
                thr = data.draw(st.sampled_from([0.0, 0.003, 0.02, 0.1, 0.4]), label="threshold")
                kw.update(refresh="threshold", refresh_threshold=thr)
            else:
                refresh = data.draw(st.integers(1, pages), label="refresh pages")
                kw.update(refresh_ratio=min(1.0, (refresh + 0.5) / pages))
        ref, fus = t.make_pair(policy, B=B, Hq=G * H, Hkv=H, D=16, budget=pages * ps, ps=ps, dtype=torch.float32,
                               device="cpu", backend="triton", **kw)
        inp = t.Inputs(B, G * H, H, 16, dtype=torch.float32, device="cpu", integer=False, seed=seed)
        ref.prefill(*inp.prompt(lens))
        before = data.draw(st.integers(0, 40), label="steps before")
        if data.draw(st.booleans(), label="sequence 0 opens a page"):  # (an eviction once the buffer is full)
            before += -(lens[0] + before) % ps
        for _ in range(before):
            ref.decode(*inp.step())
        # a random state: stamps (raas) or accumulated scores (h2o) drawn at random, so that any
        # unpinned (raas) or old enough (h2o) page can be the victim; then the fused cache takes it
        gen = torch.Generator().manual_seed(seed)
        resident = ref.page_id >= 0
        if kind == "h2o":
            ref.score.copy_(torch.where(resident, torch.rand(ref.score.shape, generator=gen) * 4, 0.0))
        else:
            old = torch.randint(0, int(ref.step) + 1, ref.stamp.shape, generator=gen)
            ref.stamp.copy_(torch.where(resident, old, ref.stamp))
        for name in t.STATE + ("valid",):
            getattr(fus, name).copy_(getattr(ref, name))
        before = {{name: getattr(ref, name).clone() for name in ("page_id", "stamp", "score")}}
        q, k, v = inp.step()
        q = q * data.draw(st.sampled_from([0.5, 1.0, 3.0]), label="query scale")  # flat to peaked softmax
        out_ref = ref.decode(q, k, v)
        # the shares' combine over the whole row in one chunk (the shipped size at these budgets), or
        # in chunks of 1 or 4 pages (its path for rows of more than 256 pages)
        chunk = data.draw(st.sampled_from([None, 16, 64]), label="share combine elements")
        saved = kernels.device_sms, attention.SHARE_COMBINE_ELEMS
        kernels.device_sms = lambda device: sms
        attention.SHARE_COMBINE_ELEMS = chunk or saved[1]
        try:
            out = fus.decode(q, k, v)
        finally:
            kernels.device_sms, attention.SHARE_COMBINE_ELEMS = saved
        # the append and the row writes: exactly the reference's
        for name in t.EXACT:
            assert torch.equal(getattr(ref, name), getattr(fus, name)), name
        want = masks.block_lists(ref.valid, fus.block)
        assert all(torch.equal(a, b) for a, b in zip(want, (fus._kv_num, fus._kv_idx, fus._full_num, fus._full_idx)))
        # the attention and the page shares in float64 over the slots the step attends
        bh, S, P = B * H, ref.S, ref.P
        logits = (q.double().view(bh, G, 16) @ ref.k.double().view(bh, S, 16).transpose(1, 2)) * ref.scale
        p64 = torch.softmax(logits.masked_fill(~ref.valid.view(bh, 1, S), float("-inf")), -1)
        out64 = (p64 @ ref.v.double().view(bh, S, 16)).view(B, G * H, 1, 16)
        torch.testing.assert_close(out.double(), out64, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out_ref.double(), out64, rtol=1e-5, atol=1e-5)
        share = p64.view(B, H, G, P, ps).sum(-1).amax(2)
        opened = ref.page_id != before["page_id"]
        step = int(ref.step)
        if kind == "h2o":  # the share added to the accumulated score; an opened page's from 0
            acc = torch.where(opened, 0.0, before["score"].double()) + share
            torch.testing.assert_close(fus.score.double(), acc, rtol=RTOL, atol=ATOL)
            torch.testing.assert_close(ref.score.double(), acc, rtol=RTOL, atol=ATOL)
            assert torch.equal(fus.stamp, ref.stamp)
            return
        for c in (fus, ref):
            torch.testing.assert_close(c.score.double(), share, rtol=RTOL, atol=ATOL)
        resident = ref.page_id >= 0
        if kind == "threshold":
            cut = torch.tensor(thr, dtype=torch.float32).double()  # (both compare in fp32)
            exact = resident & (share > cut)
        else:
            exact = resident & (descending_rank(torch.where(resident, share, float("-inf"))) < refresh)
            ranked = torch.where(resident, share, float("-inf")).sort(-1, descending=True).values
            cut = ranked[..., refresh - 1:refresh]  # the refresh-th largest share of each row
            cut = torch.where(resident.sum(-1, keepdim=True) > refresh, cut, -1.0)  # all refreshed: no boundary
        # a share within the tolerance of the boundary may fall on either side in fp32
        near = (share - cut).abs() <= RTOL * cut.abs() + ATOL
        for c in (fus, ref):
            got = c.stamp == step
            assert torch.equal(got | near, (exact | opened) | near), (kind, got, exact, share)
            assert torch.equal(torch.where(got, before["stamp"], c.stamp), before["stamp"])
        assert torch.equal(fus.stamp == ref.stamp, (fus.stamp == ref.stamp) | near) and torch.equal(
            torch.where(near, 0, fus.stamp), torch.where(near, 0, ref.stamp))

    def exact_ties():
        # q = 0: each of the 8 attended tokens (a power of two) gets probability exactly 1/8 in both
        # fp32 computations, so each of the 4 full pages' share is exactly 0.25: exact ties for the
        # top-k (the lower slots win) and a share exactly at the threshold (not above it: no stamp)
        for kind, kw in (("topk", dict(importance="attention", refresh_ratio=0.4)),
                         ("threshold", dict(importance="attention", refresh="threshold", refresh_threshold=0.25)),
                         ("h2o", {{}})):
            ref, fus = t.make_pair("h2o" if kind == "h2o" else "raas", B=1, Hq=2, Hkv=1, D=16, budget=10, ps=2,
                                   dtype=torch.float32, device="cpu", backend="triton", **kw)
            inp = t.Inputs(1, 2, 1, 16, dtype=torch.float32, device="cpu", integer=False, seed=1)
            prompt = inp.prompt([7])
            ref.prefill(*prompt)
            fus.prefill(*prompt)
            _, k, v = inp.step()
            q = torch.zeros(1, 2, 1, 16)
            ref.decode(q, k, v)
            fus.decode(q, k, v)
            share = [0.25, 0.25, 0.25, 0.25, 0.0]
            assert fus.score.flatten().tolist() == ref.score.flatten().tolist() == share, (kind, fus.score)
            stamps = {{"topk": [1, 1, 0, 0, 0], "threshold": [0] * 5, "h2o": [0] * 5}}[kind]
            assert fus.stamp.flatten().tolist() == ref.stamp.flatten().tolist() == stamps, (kind, fus.stamp)

    exact_ties()
    check()
    print("shares ok")
""")


@pytest.mark.skipif(not kernels.HAS_TRITON, reason="needs triton (the interpreter runs the kernels on CPU)")
def test_interpreter_shares_match_float64_on_random_states():
    """Property, one fused_step from a random state (prompt lengths, steps before, random stamps or
    h2o scores, query scale, page sizes 1 to 128, G 1 to 5, the launch plans of GPUs of 1 to 16 SMs
    and of the CPU) for raas importance="attention" (top-k, threshold) and h2o: the append and row
    writes exactly the torch reference's; the output within 1e-5 of float64 dense attention over the
    attended slots; the shares (scores) and stamps against float64 page shares. First, exact ties:
    a zero query makes every full page's share exactly 0.25 in both fp32 computations, so the top-k
    tie-break (lower slots first) and a share equal to the threshold (not stamped) are checked
    exactly.

    Tolerance of the shares: rtol 1e-4, atol 1e-6. Both fp32 computations (the reference's softmax
    then page sums, the kernel's per-tile sums rescaled at the combine) err from float64 through the
    logits, |error| <= D u sum_d |q_d k_d| scale (u = 2^-24; here at most about 2e-5 in the log
    domain, queries scaled up to 3x), which is a relative error of a probability of at most about
    4e-5, and through at most a page's 128 additions and the exp2, rescale and division (a few 1e-6
    relative); rtol 1e-4 covers both with margin, atol 1e-6 the underflow of tiny shares. Stamps:
    a page whose float64 share lies within that tolerance of the decision boundary (the threshold,
    or the row's refresh-th largest share) may be decided either way by fp32 rounding; everywhere
    else fused and reference stamps must both equal the float64 decision, and be equal."""
    script = SHARE_SCRIPT.format(tests=str(Path(__file__).resolve().parent), examples=100, rtol=1e-4, atol=1e-6)
    run_interpreted(script, "shares ok", timeout=900)


BOUNDS_SCRIPT = textwrap.dedent("""
    import torch
    from hypothesis import given, settings, strategies as st
    from raas_flex import kernels

    @settings(max_examples={examples}, deadline=None, derandomize=True)
    @given(st.data())
    def check(data):
        B, H = data.draw(st.integers(1, 2), label="B"), data.draw(st.integers(1, 3), label="Hkv")
        G, P = data.draw(st.integers(1, 8), label="G"), data.draw(st.integers(1, 70), label="P")
        D = data.draw(st.sampled_from([16, 32]), label="D")
        integer = data.draw(st.booleans(), label="integer")
        gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16), label="seed"))
        draw = lambda *shape: (torch.randint(-3, 4, shape, generator=gen).float() if integer
                               else torch.randn(*shape, generator=gen))
        q = draw(B, H * G + 2 * H, 1, D)[:, : H * G]  # a view with the batch stride of a fused projection
        a, b = draw(B, H, P, D), draw(B, H, P, D)
        kmax, kmin = torch.maximum(a, b), torch.minimum(a, b)
        page_id = torch.where(torch.rand(B, H, P, generator=gen) < 0.8, torch.arange(P), -1)
        got = kernels.page_bounds(q, kmax, kmin, page_id)
        qg = q.double().view(B, H, G, 1, D)
        want = (qg.clamp(min=0) * kmax.double()[:, :, None] + qg.clamp(max=0) * kmin.double()[:, :, None])
        want = torch.where(page_id >= 0, want.sum(-1).amax(2), float("-inf")).float()
        if integer:  # every product and sum exact in fp32
            assert torch.equal(got, want), (got, want)
        else:
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)

    check()
    print("bounds ok")
""")


@pytest.mark.skipif(not kernels.HAS_TRITON, reason="needs triton (the interpreter runs the kernels on CPU)")
def test_interpreter_page_bounds_match_float64():
    """Property: the bounds kernel (quest's page choice on the fused backends) gives Quest's bound of
    every page slot, max over each KV head's query heads, -inf for empty slots: bit for bit on
    integer inputs, within fp32 rounding on random ones, for any G (1 to 8), page count (not a power
    of two too) and a strided q. (The interpreter's bf16 products are wrong on CPU, so fp32 here; the
    GPU tests run quest in bf16.)"""
    run_interpreted(BOUNDS_SCRIPT.format(examples=60), "bounds ok")


PICK_SCRIPT = textwrap.dedent("""
    import types, torch
    from hypothesis import given, settings, strategies as st
    from raas_flex import kernels
    from raas_flex.policies import Quest

    # few distinct bounds, so ties are frequent; 1.0's float32 neighbour differs in the last bit
    VALUES = st.sampled_from([0.0, -0.0, 1.0, -1.0, 2.5, 1.0000001192092896, 3e38, -3e38])

    def run(B, H, P, ps, lengths, bound, page_id, budget):
        length = torch.tensor(lengths)
        open_slot = torch.where(page_id == ((length - 1) // ps)[:, None, None], torch.arange(P), 0).amax(-1)
        valid = torch.ones(B * H, P * ps, dtype=torch.bool)  # every slot must be written
        kv_num, kv_idx = kernels.pick_pages(bound, page_id, open_slot, length, valid, budget)
        cache = types.SimpleNamespace(budget_pages=budget, P=P, page_id=page_id, slot_index=torch.arange(P),
                                      open_slot=open_slot, page_bound=lambda q: bound)
        choice = Quest().attended_pages(cache, None)  # the torch rule
        if choice is None:
            picked = page_id >= 0
        else:
            order, count = choice
            picked = torch.zeros_like(page_id, dtype=torch.bool).scatter_(
                -1, order[..., :budget], torch.arange(P)[:budget] < count[..., None])
        logical = page_id[..., None] * ps + torch.arange(ps)
        want = (page_id >= 0)[..., None] & (logical < length[:, None, None, None]) & picked[..., None]
        assert torch.equal(valid.view(B, H, P, ps), want), (bound, page_id, budget)
        assert torch.equal(kv_num.view(B, H), picked.sum(-1).int())
        for r, (n, idx) in enumerate(zip(kv_num.view(-1).tolist(), kv_idx.view(B * H, P).tolist())):
            assert idx[:n] == picked.view(B * H, P)[r].nonzero().view(-1).tolist()  # the chosen, in slot order
            assert sorted(idx) == list(range(P))  # then every other slot once

    @settings(max_examples={examples}, deadline=None, derandomize=True)
    @given(st.data())
    def check(data):
        B, H = data.draw(st.integers(1, 2), label="B"), data.draw(st.integers(1, 2), label="Hkv")
        P, ps = data.draw(st.integers(1, 40), label="P"), data.draw(st.sampled_from([1, 2, 3, 4]), label="ps")
        lengths = data.draw(st.lists(st.integers(1, P * ps), min_size=B, max_size=B), label="lengths")
        page_id = torch.full((B, H, P), -1)
        for b, n in enumerate(lengths):  # every written page resident (quest keeps them), in any slots
            for h in range(H):
                slots = data.draw(st.permutations(range(P)), label="slots")[: -(-n // ps)]
                page_id[b, h, slots] = torch.arange(len(slots))
        vals = data.draw(st.lists(VALUES, min_size=B * H * P, max_size=B * H * P), label="bounds")
        bound = torch.where(page_id >= 0, torch.tensor(vals).view(B, H, P), float("-inf"))
        run(B, H, P, ps, lengths, bound, page_id, data.draw(st.integers(1, P + 2), label="budget_pages"))

    check()
    # a long row: 300 slots, 1,150 tokens of pages of 4, 64 chosen
    gen = torch.Generator().manual_seed(0)
    page_id = torch.where(torch.arange(300) < 288, torch.randperm(300, generator=gen), -1)[None, None]
    page_id = torch.where(page_id < 288, page_id, -1)
    run(1, 1, 300, 4, [1150], torch.where(page_id >= 0, torch.randn(1, 1, 300, generator=gen).round(decimals=1),
                                          float("-inf")), page_id, 64)
    print("pick ok")
""")


@pytest.mark.skipif(not kernels.HAS_TRITON, reason="needs triton (the interpreter runs the kernels on CPU)")
def test_interpreter_pick_pages_matches_quest_rule():
    """Property: the pick kernel (quest's page choice on the fused backends) chooses exactly the pages
    of the torch rule (``Quest.attended_pages``: the open page first, then by bound, ties to the lower
    slot, all while fewer are resident), writes the validity row of their written tokens (every other
    slot False) and lists the chosen slots first in slot order, then every other slot once; on rows
    full of ties, bounds one bit apart, budgets up to the whole row and beyond, and a row of 300 slots."""
    run_interpreted(PICK_SCRIPT.format(examples=60), "pick ok")


PAGED_SCRIPT = textwrap.dedent("""
    import torch
    from hypothesis import given, settings, strategies as st
    from raas_flex import kernels

    def run(B, H, G, D, P, ps, budget, lengths, slots, order, num, seed):
        \"\"\"slots(r): the row's page slots in the order of their pages; order(r): the list (a permutation of
        the slots); num(r, written): how many pages it chose (taken at random from the written ones).\"\"\"
        gen = torch.Generator().manual_seed(seed)
        length = torch.tensor(lengths)
        q = torch.randn(B, H * G + H, 1, D, generator=gen)[:, : H * G]  # a view with a fused projection's stride
        k, v = torch.randn(B, H, P * ps, D, generator=gen), torch.randn(B, H, P * ps, D, generator=gen)
        page_id = torch.full((B, H, P), -1)
        kv_idx = torch.zeros(B * H, P, dtype=torch.int32)
        kv_num = torch.zeros(B * H, dtype=torch.int32)
        for r in range(B * H):
            written = -(-lengths[r // H] // ps)
            where = slots(r)[:written]
            page_id.view(B * H, P)[r, where] = torch.arange(written)
            kv_idx[r] = torch.tensor(order(r), dtype=torch.int32)
            kv_num[r] = num(r, min(budget, written))
            pick = torch.randperm(written, generator=gen)[: kv_num[r]]
            kv_idx[r, : kv_num[r]] = torch.tensor(where, dtype=torch.int32)[pick]
        count = torch.zeros(B * H, dtype=torch.int32)
        got = kernels.paged_attend(q, k, v, page_id, length, kv_num.view(-1, 1, 1), kv_idx.view(-1, 1, 1, P), count,
                                   D ** -0.5, budget)
        assert count.eq(0).all()
        for r in range(B * H):
            b, h = divmod(r, H)
            chosen = kv_idx[r, : kv_num[r]].long()
            tok = (chosen[:, None] * ps + torch.arange(ps)).view(-1)  # slots of the chosen pages
            logical = (page_id[b, h, chosen][:, None] * ps + torch.arange(ps)).view(-1)
            tok = tok[logical < length[b]]  # their written tokens
            qd = q[b, h * G:(h + 1) * G, 0].double()
            if len(tok) == 0:
                want = torch.zeros(G, D, dtype=torch.float64)
            else:
                want = torch.softmax(qd @ k[b, h, tok].double().T * D ** -0.5, -1) @ v[b, h, tok].double()
            torch.testing.assert_close(got[b, h * G:(h + 1) * G, 0].double(), want, rtol=1e-4, atol=1e-5)

    @settings(max_examples={examples}, deadline=None, derandomize=True)
    @given(st.data())
    def check(data):
        B, H = data.draw(st.integers(1, 2), label="B"), data.draw(st.integers(1, 2), label="Hkv")
        G, D = data.draw(st.integers(1, 5), label="G"), data.draw(st.sampled_from([16, 32]), label="D")
        P, ps = data.draw(st.integers(1, 48), label="P"), data.draw(st.sampled_from([1, 3, 4, 8, 16]), label="ps")
        lengths = data.draw(st.lists(st.integers(0, P * ps), min_size=B, max_size=B), label="lengths")
        run(B, H, G, D, P, ps, data.draw(st.integers(1, P), label="budget_pages"), lengths,
            lambda r: data.draw(st.permutations(range(P)), label="slots"),
            lambda r: data.draw(st.permutations(range(P)), label="list"),
            lambda r, most: data.draw(st.integers(0, most), label="kv_num"), data.draw(st.integers(0, 2**16)))

    check()
    # every page chosen over 4 programs a row of 3 tiles each (the online combine), one row partly written
    gen = torch.Generator().manual_seed(1)
    perm = lambda r: torch.randperm(48, generator=gen).tolist()
    run(2, 2, 3, 16, 48, 16, 48, [768, 700], perm, perm, lambda r, most: most, 5)
    print("paged ok")
""")


@pytest.mark.skipif(not kernels.HAS_TRITON, reason="needs triton (the interpreter runs the kernels on CPU)")
def test_interpreter_paged_attend_matches_float64():
    """Property: paged_attend (quest's attention on backend="triton") equals float64 softmax attention
    over the written tokens of the pages its list names first (kv_num of them, in any order, nothing
    for kv_num 0: zeros), for page sizes 1 to 16 (not powers of two too), partly written pages and a
    strided q, then 48 pages of 16 over 4 programs a row of 3 tiles each (the online combine); the
    row tickets are left 0. It failed when every program started at the row's first tile, when the
    last tile of each program was skipped, and when unwritten slots were attended."""
    run_interpreted(PAGED_SCRIPT.format(examples=40), "paged ok")


RANK_SCRIPT = textwrap.dedent("""
    import sys, torch, triton, triton.language as tl
    from hypothesis import given, settings, strategies as st
    from raas_flex.kernels.rules import refresh_set
    from raas_flex.policies import descending_rank

    @triton.jit
    def probe(imp_ptr, pid_ptr, stamp_ptr, P: tl.constexpr, REFRESH: tl.constexpr, BLOCK_P: tl.constexpr,
              SEARCH: tl.constexpr):
        i = tl.arange(0, BLOCK_P)
        in_row = i < P
        imp = tl.load(imp_ptr + i, mask=in_row, other=float("-inf"))
        pid = tl.load(pid_ptr + i, mask=in_row, other=-1)
        sel = refresh_set(imp, pid, i, in_row, P, REFRESH, BLOCK_P, SEARCH)
        tl.store(stamp_ptr + i, tl.zeros([BLOCK_P], tl.int64) + 7, mask=sel)

    # few distinct values, so ties (and -0.0 against 0.0) are frequent; 1.0's float32 neighbours differ
    # from it in the last bits only, any float32 anywhere
    VALUES = st.one_of(st.sampled_from([0.0, -0.0, 1.0, -1.0, 2.5, -2.5, 1e-30, -1e-30, 3e38, -3e38,
                                        1.0000001192092896, 0.9999999403953552, -1.0000001192092896]),
                       st.floats(width=32, allow_nan=False, allow_infinity=False))

    def run(vals, resident, refresh):
        P = len(vals)
        res = torch.tensor(resident)
        imp = torch.where(res, torch.tensor(vals, dtype=torch.float32), float("-inf"))  # as the kernels store it
        pid = torch.where(res, torch.arange(P), -1)
        want = torch.where(res & (descending_rank(imp) < refresh), 7, 0)
        for search in (False, True):  # the k-th largest by a sort, and by the bitwise search
            stamp = torch.zeros(P, dtype=torch.int64)
            probe[(1,)](imp, pid, stamp, P=P, REFRESH=refresh, BLOCK_P=triton.next_power_of_2(P), SEARCH=search)
            assert torch.equal(stamp, want), (search, imp.tolist(), resident, refresh, stamp.tolist(), want.tolist())

    @settings(max_examples={examples}, deadline=None, derandomize=True)
    @given(st.data())
    def check(data):
        P = data.draw(st.integers(1, 40), label="P")
        vals = data.draw(st.lists(VALUES, min_size=P, max_size=P), label="importance")
        resident = data.draw(st.lists(st.booleans(), min_size=P, max_size=P), label="resident")
        run(vals, resident, data.draw(st.integers(1, P + 2), label="refresh_pages"))

    check()
    # neighbours that differ in the last bit only, the larger in the higher slot
    up = 1.0000001192092896
    run([1.0, up], [True, True], 1)
    run([-up, -1.0, 0.0, 1.0, up, 1.0], [True] * 6, 2)
    print("rank ok")
""")


@pytest.mark.skipif(not kernels.HAS_TRITON, reason="needs triton (the interpreter runs the kernels on CPU)")
def test_interpreter_topk_refresh_matches_descending_rank():
    """Property: the kernels' top-k refresh (its k-th largest by a sort and by the bitwise search)
    stamps exactly the resident pages whose stable descending rank (torch reference) is below
    refresh_pages, on rows full of exact ties, +-0.0, huge magnitudes, neighbours one bit apart, any
    float32 and empty slots."""
    run_interpreted(RANK_SCRIPT.format(examples=120), "rank ok")
