"""Compile the Triton kernels of raas_flex for an NVIDIA GPU without one, and report their resources.

Every kernel is launched through its op (``kernels.fused_append_observe``, ``kernels.fused_step``,
``kernels.quest_step`` and ``kernels.paged_attend`` with a budget of 1/16 of the pages) on CPU
tensors of the requested shape, planned as on a GPU of ``--sms`` SMs (``kernels.step_plan``), with the launch intercepted: the
arguments and compile-time constants it would have used are compiled ahead of time for the chosen architecture (Triton's own ptxas), and
``cuobjdump`` reads registers, stack (register spills) and static shared memory per thread block;
the compiler's metadata gives the dynamic shared memory (where Triton keeps pipelined tiles).
It catches code that does not compile for the GPU, and shows register pressure and code size (SASS
instructions) before a GPU run, and which arguments torch.compile takes each kernel to write
(``writes``: Inductor's analysis of the kernel; the step's inputs must not be among them).
From registers and shared memory it also gives the occupancy on an sm_90 SM (H100, H200): how many
programs of the kernel one SM holds at once, and in how many waves the grid runs on ``--sms`` SMs.
It measures no speed.

    python benchmarks/kernel_resources.py --shapes 8/32/8 --budgets 2048 --sms 132
    python benchmarks/kernel_resources.py --shapes 8/28/4,32/32/8 --budgets 1024,2048 --observe 0,1,2 \
        --kernels _step_kernel --out resources.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from raas_flex import kernels  # noqa: E402
from raas_flex.masks import all_partial_lists  # noqa: E402
from raas_flex.policies import H2O, RaaS, Streaming  # noqa: E402


class SM90(NamedTuple):
    """What one sm_90 SM (H100, H200) shares among resident programs (CUDA occupancy rules)."""

    registers: int = 65536
    register_unit: int = 256  # registers are allocated per warp in units of this many
    warps: int = 64
    blocks: int = 32
    shared: int = 233472  # bytes of shared memory a kernel's blocks can use (228 KB)
    shared_reserved: int = 1024  # bytes the system keeps per block


def programs_per_sm(registers: int, warps: int, shared_bytes: int, sm: SM90 = SM90()) -> int:
    """Programs (thread blocks) of ``warps`` warps one SM holds at once, given each thread's
    registers and the block's shared memory (static + dynamic)."""
    per_warp = -(-registers * 32 // sm.register_unit) * sm.register_unit
    by_regs = (sm.registers // per_warp) // warps
    by_shared = sm.shared // (shared_bytes + sm.shared_reserved)
    return min(by_regs, by_shared, sm.warps // warps, sm.blocks)


class Capture:
    """Stands in for ``wrap_triton``: records each launch (the op being called, set in ``op``; kernel,
    grid, positional args, keywords)."""

    def __init__(self):
        self.launches = []
        self.op = None

    def __call__(self, fn):
        def at_grid(grid):
            def launch(*args, **kw):
                self.launches.append((self.op, fn, grid, args, kw))
            return launch

        class Launcher:
            def __getitem__(self, grid):
                return at_grid(grid)

        return Launcher()


def specialise(fn, args, kw, target):
    """Signature, compile-time constants, attributes and options of one launch, as Triton's JIT
    specialises them when the kernel is launched for ``target``: pointers and integers known to be
    multiples of 16 get that divisibility (the alignment that lets loads vectorise and pipeline),
    integers equal to 1 become constants. Python floats are then typed fp64, as torch.compile
    (Inductor) launches them (seen with torch 2.11 on the H200), so a kernel whose fp32 math would
    turn fp64 fails here as it would there."""
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, spec, options = binder(*args, **kw)
    options, signature, constexprs, attrs = fn._pack_args(backend, kw, bound, spec, options)
    values = dict(zip([p.name for p in fn.params], args))
    for name, v in values.items():
        if isinstance(v, float) and signature.get(name) != "constexpr":
            signature[name] = "fp64"
    return signature, constexprs, attrs, options


def compile_launch(fn, args, kw, arch: int):
    """Compile one captured launch for sm_<arch>; returns its resource usage."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", arch, 32)
    signature, constexprs, attrs, options = specialise(fn, args, kw, target)
    t0 = time.time()
    compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)
    seconds = time.time() - t0
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(compiled.asm["cubin"])
    try:
        dump = subprocess.run([str(tool), "--dump-resource-usage", f.name], capture_output=True, text=True,
                              check=True).stdout
        sass = subprocess.run([str(tool), "-sass", f.name], capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(f.name)
    m = re.search(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)", dump)
    if m is None:
        raise RuntimeError(f"cuobjdump printed no resource usage for {fn.fn.__name__}:\n{dump[-500:]}")
    reg, stack, shared, local = map(int, m.groups())
    code = re.findall(r"^\s+/\*[0-9a-f]{4,}\*/\s.*$", sass, re.M)  # the instruction lines
    # cuobjdump sees the static shared memory only; Triton's pipelined tiles live in the dynamic part
    ttgir = compiled.asm["ttgir"]
    return dict(kernel=fn.fn.__name__, registers=reg, stack_bytes=stack, shared_bytes=shared,
                dynamic_shared_bytes=int(compiled.metadata.shared), local_bytes=local,
                # loads the software pipeliner turned into asynchronous copies (cp.async)
                async_copies=ttgir.count("async_copy_global_to_local"),
                # code size: a stretch that a program runs once waits on instruction fetch
                sass_instructions=len(code),
                # equal hashes: the same machine code (two trees, or a change meant to compile to nothing)
                sass_sha1=hashlib.sha1("\n".join(code).encode()).hexdigest()[:16],
                warps=options.num_warps, stages=options.num_stages, compile_s=round(seconds, 1))


class _Target:
    """Stands in for Triton's active driver where there is no GPU: the analysis below asks it only for
    the target it compiles for."""

    def __init__(self, arch: int):
        self.arch = arch

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", self.arch, 32)


def inductor_writes(fn, args, kw, arch: int) -> list[str]:
    """The arguments torch.compile (Inductor) takes one launch to write: its analysis of the kernel's
    Triton IR, which counts a pointer as written when a store's address derives from it (through a
    call: from any argument of the call). An input found written is ordered as if the kernel changed
    it: the model's copy of the new key into the engine's ``k_new`` ran after the step, a launch of
    its own per layer and token, until the step kernel was no longer found to write its inputs
    (docs/performance.md, "What a fused layer launches")."""
    import triton
    from torch._higher_order_ops import triton_kernel_wrap as wrap

    names = [p.name for p in fn.params]
    given = {**dict(zip(names, args)), **kw}
    kwargs = {n: given[n] for n in names}  # (launch options such as num_warps left out)
    driver = triton.runtime.driver
    saved = driver._active  # (reset_active would make the default driver, which fails without a GPU)
    driver.set_active(_Target(arch))
    try:
        if hasattr(wrap, "identify_accessed_tensors"):  # torch 2.13
            return sorted(d.name for d in wrap.identify_accessed_tensors(fn, kwargs, {}).read_writes.writes)
        return sorted(wrap.identify_mutated_tensors(fn, kwargs, {}))  # older torch (2.11)
    finally:
        driver._active = saved


def launches(B, Hq, Hkv, D, L, ps, dtype, sms=132, observe=0):
    """Call every op once on CPU tensors (raas state of one layer) and capture the launches, with the
    plan a GPU of ``sms`` SMs would get (kernels.step_plan); fused_step with observe ``observe``
    (``Policy.step_observe``; 3 is h2o's, with its eviction rule; 4 streaming's, one sink page)."""
    P, S = L // ps, L
    block = min(128, S)
    G = Hq // Hkv
    t = lambda *shape, dt=dtype: torch.zeros(*shape, dtype=dt)
    q, kn, vn = t(B, Hq, 1, D), t(B, Hkv, 1, D), t(B, Hkv, 1, D)
    k, v = t(B, Hkv, S, D), t(B, Hkv, S, D)
    page_id = torch.full((B, Hkv, P), -1, dtype=torch.int64)
    stamp, pinned, score = t(B, Hkv, P, dt=torch.int64), t(B, Hkv, P, dt=torch.bool), t(B, Hkv, P, dt=torch.float32)
    kmax, kmin = t(B, Hkv, P, D), t(B, Hkv, P, D)
    open_slot, length, step = t(B, Hkv, dt=torch.int64), t(B, dt=torch.int64), t((), dt=torch.int64)
    evictions, overflow = t(B, Hkv, dt=torch.int64), t((), dt=torch.bool)
    valid = t(B * Hkv, S, dt=torch.bool)
    ticket, count = t(1, dt=torch.int32), t(B * Hkv, dt=torch.int32)
    imp = t(B, Hkv, P, dt=torch.float32)
    lists = all_partial_lists(B * Hkv, S, block, torch.device("cpu"))
    state = (k, v, page_id, stamp, pinned, score, kmax, kmin, open_slot, length, step, evictions, overflow, valid,
             ticket, *lists)
    refresh = max(1, P // 2)
    scale = D**-0.5
    from raas_flex.kernels import attention, bookkeeping

    capture = Capture()
    saved = bookkeeping.wrap_triton, attention.wrap_triton, kernels.device_sms
    bookkeeping.wrap_triton = attention.wrap_triton = capture
    kernels.device_sms = lambda device: sms
    try:
        capture.op = "fused_append_observe"
        kernels.fused_append_observe(q, kn, vn, *state, imp, 0, 0, block, refresh)
        capture.op = "fused_step"
        policy = {3: H2O, 4: Streaming}.get(observe, RaaS)  # whose eviction rule the step takes
        kernels.fused_step(q, kn, vn, *state, imp, count, scale, refresh, block, observe, policy.append_code,
                           H2O.recent_pages(P) if policy is H2O else 0, 1e-4, 1 if policy is Streaming else 0)
        capture.op = "quest_step"  # quest's append and bounds, then its pick over these P pages (a budget of P / 16)
        kernels.quest_step(q, kn, vn, *state, imp, max(1, P // 16))
        capture.op = "paged_attend"  # quest's attention over the picked pages' list
        kernels.paged_attend(q, k, v, page_id, length, t(B * Hkv, dt=torch.int32), t(B * Hkv, P, dt=torch.int32),
                             count, scale, max(1, P // 16))
    finally:
        bookkeeping.wrap_triton, attention.wrap_triton, kernels.device_sms = saved
    assert G * Hkv == Hq
    return capture.launches


def _ints(text: str, name: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        values = []
    if not values:
        raise SystemExit(f"{name}={text!r} is not allowed; allowed: a comma list of integers")
    return values


def _shapes(text: str) -> list[tuple[int, int, int]]:
    shapes = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        nums = part.split("/")
        if len(nums) != 3 or not all(n.isdigit() and int(n) > 0 for n in nums):
            raise SystemExit(f"--shapes: {part!r} is not allowed; allowed: B/Hq/Hkv with positive integers, "
                             "e.g. 8/32/8")
        shapes.append(tuple(map(int, nums)))
    if not shapes:
        raise SystemExit(f"--shapes={text!r} is not allowed; allowed: a comma list of B/Hq/Hkv")
    return shapes


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="8/32/8", help="comma list of B/Hq/Hkv")
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--budgets", default="2048", help="comma list of budgets L (slots)")
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--sms", type=int, default=132,
                    help="SM count of the GPU whose launch plan (kernels.step_plan) the launches follow (132: H200)")
    ap.add_argument("--observe", default="0",
                    help="comma list of fused_step's observe (Policy.step_observe): 0 bound top-k (raas default), "
                         "1 attention share top-k, 2 share threshold, 3 share accumulated (h2o), 4 none (streaming)")
    ap.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: H100/H200)")
    ap.add_argument("--kernels", default=None,
                    help="comma list of kernel names to compile (default: all: _append_kernel, _step_kernel, "
                         "_quest_kernel, _pick_kernel, _paged_kernel)")
    ap.add_argument("--out", default=None, help="write the table as JSON here")
    return ap


def main(argv=None):
    ap = parser()
    args = ap.parse_args(argv)
    if not kernels.HAS_TRITON:
        raise SystemExit("kernel_resources.py needs triton installed")
    shapes, budgets = _shapes(args.shapes), _ints(args.budgets, "--budgets")
    observes = _ints(args.observe, "--observe")
    bad = sorted(set(observes) - {0, 1, 2, 3, 4})
    if bad:
        raise SystemExit(f"--observe: {bad} not allowed; allowed: 0, 1, 2, 3, 4")
    dtype = getattr(torch, args.dtype)
    rows = []
    for (batch, hq, hkv) in shapes:
        for budget in budgets:
            for observe in observes:
                captured = launches(batch, hq, hkv, args.head_dim, budget, args.page_size, dtype, args.sms, observe)
                known = [fn.fn.__name__ for _, fn, *_ in captured]
                wanted = known if args.kernels is None else [k.strip() for k in args.kernels.split(",") if k.strip()]
                unknown = sorted(set(wanted) - set(known))
                if unknown:
                    ap.error(f"--kernels: unknown {', '.join(unknown)}; allowed: {', '.join(known)}")
                for op, fn, grid, a, kw in captured:
                    if fn.fn.__name__ not in wanted:
                        continue
                    r = dict(op=op, batch=batch, heads=f"{hq}/{hkv}", budget=budget, observe=observe,
                             **compile_launch(fn, a, kw, args.arch))
                    r["grid"] = list(grid)
                    r["writes"] = inductor_writes(fn, a, kw, args.arch)
                    programs = 1
                    for g in grid:
                        programs *= g
                    r["per_sm"] = programs_per_sm(r["registers"], r["warps"],
                                                  r["shared_bytes"] + r["dynamic_shared_bytes"])
                    r["waves"] = -(-programs // (r["per_sm"] * args.sms)) if r["per_sm"] else None
                    rows.append(r)
                    print(f"{batch}/{hq}/{hkv} L={budget} observe {observe}  {op:<20} {r['kernel']:<15} "
                          f"grid {str(tuple(grid)):<10} warps {r['warps']}  registers {r['registers']:>3}  "
                          f"stack {r['stack_bytes']:>4} B  shared {r['shared_bytes']:>5} B static, "
                          f"{r['dynamic_shared_bytes']:>6} B dynamic  async copies {r['async_copies']}  "
                          f"{r['sass_instructions']} SASS instructions ({r['sass_sha1']})  "
                          f"{r['per_sm']} per SM, {r['waves']} wave(s)  ({r['compile_s']} s)")
    if args.out:
        meta = dict(command="python benchmarks/kernel_resources.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                    arch=args.arch, sms=args.sms, torch=torch.__version__, triton=__import__("triton").__version__,
                    note="compiled on a CPU machine (no GPU): resources and occupancy only, no speed")
        Path(args.out).write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    return rows


if __name__ == "__main__":
    main()
