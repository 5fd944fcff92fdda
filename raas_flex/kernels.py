"""Hand-fused Triton kernels for the GPU bookkeeping of a decode step.

The torch code in :mod:`raas_flex.engine` and :mod:`raas_flex.policies` is the reference: it runs
everywhere and Inductor turns it into about fourteen small kernels per step. On CUDA the same state
changes are done here, by one launch per step in :meth:`PagedKVCache.decode`:

    fused_append_observe   one program per (sequence, KV head) row: slot choice (first free page
                           slot, else the evictable page with the smallest key, ties to the lower
                           slot), token write, page-table entry of an opened page, key max/min row
                           update, open slot, eviction counter, overflow flag, the row of the
                           slot-validity mask that flex's mask_mod reads and exact flex block lists
                           (full blocks skip mask_mod in the flex kernel); then the RaaS observe of
                           the step's query for the row: Quest's page bound (max over the query heads
                           of the KV head, as two small matrix products), the score write, the
                           REFRESH-th largest bound by an in-register sort and the refresh of the top
                           ``refresh_pages`` resident pages (stable descending order, ties to the
                           lower slot). The last program to finish advances ``length`` and ``step``.
    flex_attention         (unchanged)

With ``attention="triton"`` (opt-in; see RaaSConfig) the attention leaves flex too:

    fused_step             the whole step, one launch: programs (row, split) each decide the append
                           from the pre-step state, attend over their slice of the row as it is after
                           the append and bound their share of its pages; each row's last program
                           combines the output and does the row's writes and the refresh
    fused_attend_observe   attention + observe after a separate append (the transformers path)

The observe reads only the query and the key bounds after the append, so running it before the
attention leaves the state of the torch order (append, attend, observe). Where the query is not known
at append time (transformers appends in ``Cache.update``), ``fused_append`` (the same kernel without
the observe) runs first and ``fused_observe`` (programs of OBSERVE_PAGES pages each, the last program
of a row ranks it) after the attention.

Tuning knobs are module attributes read when a kernel is launched or traced (BOUND_DOT, OBSERVE_DOT,
APPEND_OBSERVE_WARPS, APPEND_BOUND_ELEMS, OBSERVE_PAGES, LISTS_IN_REGS_MAX, ATTEND_*);
``benchmarks/kernel_variants.py`` times and checks every combination. Under torch.compile they are
read when Inductor lowers the op, which its compile caches skip: set them before the first compile
of a process, or turn the caches off (``torch.compiler.config.force_disable_caches``).

Both are registered with :func:`torch.library.triton_op`, with every buffer they write declared in
``mutates_args``, so they run eagerly, inside ``torch.compile(fullgraph=True)`` graphs (Inductor
calls the kernels directly and orders them by their mutations) and under CUDA graphs. They launch a
fixed grid, allocate nothing and never synchronise with the host.

Coverage: the append kernel serves the bounded policies that attend to every resident page
(raas, streaming, h2o); the observe (in the append kernel or on its own) serves raas with ``importance="bound"`` and
``refresh="topk"`` (the threshold rule needs ``importance="attention"``, i.e. a softmax over the
whole buffer, which stays in torch). :func:`unsupported_reason` says why a cache cannot use them.

Triton is optional: without it this module imports, :data:`HAS_TRITON` is False and every cache
uses the torch path. With ``TRITON_INTERPRET=1`` set before import, the kernels also run on CPU
tensors through Triton's interpreter (slow; for debugging and the CPU tests only).
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

try:  # Triton ships with CUDA builds of torch; CPU-only installs usually lack it
    import triton
    import triton.language as tl
    from torch.library import triton_op, wrap_triton

    HAS_TRITON = True
except ImportError:  # pragma: no cover - depends on the install
    HAS_TRITON = False

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

# policy codes of the append kernel (eviction key and evictable rule)
APPEND_POLICIES = {"raas": 0, "streaming": 1, "h2o": 2}
FUSED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def unsupported_reason(config, device: torch.device, dtype: torch.dtype) -> str | None:
    """Why a cache with this config, device and K/V dtype cannot use the fused kernels (None if it can)."""
    if not HAS_TRITON:
        return "triton is not installed"
    dev = torch.device(device)
    if dev.type != "cuda" and not (INTERPRET and dev.type == "cpu"):
        return f"device={dev.type!r} (the kernels need a CUDA device)"
    if config.policy not in APPEND_POLICIES:
        return f"policy={config.policy!r} (fused kernels serve: {', '.join(map(repr, APPEND_POLICIES))})"
    if dtype not in FUSED_DTYPES:
        allowed = ", ".join(str(t).removeprefix("torch.") for t in FUSED_DTYPES)
        return f"dtype={str(dtype).removeprefix('torch.')} (fused kernels serve: {allowed})"
    return None


def observe_fusable(config) -> bool:
    """True when the policy's observe step is the fused one (raas, bound importance, top-k refresh)."""
    return config.policy == "raas" and config.importance == "bound" and config.refresh == "topk"


# Tuning (module attributes, read when a kernel is launched or traced):
OBSERVE_PAGES = 16  # pages per program of the observe kernel (at least; more for small head_dim)
LISTS_IN_REGS_MAX = 8192  # append: block counts from registers up to this many (block, page) pairs
APPEND_BOUND_ELEMS = 8192  # append with observe: key-bound elements per chunk of the bound loop
APPEND_OBSERVE_WARPS = 4  # append with observe: warps per program
BOUND_DOT = True  # append with observe: page bounds as matrix products (False: element-wise)
OBSERVE_DOT = False  # the observe as its own kernel: the same choice (element-wise measured faster there)
# attention="triton" (fused_step, fused_attend_observe): slots per tile, programs per row (None: see
# split_for), tiles per program above which a row gets more programs, warps and pipeline stages per
# program (None: see attend_stages). The split was swept on a GPU (H200,
# results/h200/decode_step_triton_split_*), warps and stages at B=8 (decode_step_triton_knobs_h200)
# and the stages at B=32 (decode_step_triton_stages3*_h200, decode_step_triton_l1024_split_h200).
ATTEND_BLOCK_N = 64
ATTEND_SPLIT: int | None = None
ATTEND_TILES_PER_PROGRAM = 16
ATTEND_WARPS = 4
ATTEND_STAGES: int | None = None
ATTEND_BOUND_ELEMS = 2048  # key-bound elements per chunk of their bound loop (4096: +35 registers in fused_step on sm_90, no spill)
# their page bounds as matrix products (chunks of at least 16 pages; False: element-wise, a reduction
# over D per query head). On the H200 the products bought nothing in fused_step (12 points, one run:
# results/h200/decode_step_triton_dot_h200), hence off.
ATTEND_BOUND_DOT = False
# Diagnostic bits of fused_step, for timing what each part of the step costs; any bit set makes the
# step WRONG (state and output). 1: no page bounds; 2: no refresh (sort and stamps); 4: no row
# writes (page-table entry, key bounds, open slot, validity, block lists; by the last program, or
# with ATTEND_OBSERVER partly by the observer);
# 8: no combine (the output is stored as zeros); 16: the per-row and global tickets without their
# memory fences (relaxed atomics: nothing orders the programs' stores before the last program's
# loads); 32: no global ticket (the lengths and the step are not advanced). benchmarks/decode_step.py
# times them as tdiagN.
ATTEND_DIAG = 0
# the attention kernels: one extra program per row (dispatched first, or in fused_step last: see
# ATTEND_OBSERVER_LAST), the observer, computes every
# page bound of the row and the top-k set while the attention programs stream K/V; in fused_step it
# also makes the row writes the attention does not read, and the row's last program only combines
# and stores the page-table entry and the stamps of the set; in fused_attend_observe the observer
# stores the stamps itself (False: each attention program bounds its share of the pages, and the
# last program sorts the row and makes every row write). None (the default): in fused_step, on when
# the grid with the observers has at most ATTEND_OBSERVER_MAX_PROGRAMS_PER_SM programs per SM
# (rows x (split + 1) <= that x SMs; on CPU, always); in fused_attend_observe (untimed) off.
# The observer's bounds are tensor-core products (ATTEND_OBSERVER_BOUND_DOT): the whole row in one
# product up to ATTEND_OBSERVER_BOUND_ELEMS key-bound elements, else chunks of
# ATTEND_OBSERVER_CHUNK_ELEMS. H200, N=8192, the observer (these plans) against none, one run
# (results/h200/decode_step_triton_observer_dot_grid_h200), us, L=1024 / 2048 / 4096: B=8 28/4 (8
# programs per row) 13.2 / 16.5 / 36.1 vs 15.0 / 18.7 / 36.2; B=8 32/8 (4) 15.6 / 29.5 / 47.7 vs 17.3 /
# 32.3 / 53.6; B=32 28/4 (2, 2, 4) 29.1 / 47.2 / 106.6 vs 34.1 / 56.4 / 113.9; B=32 32/8 (1, 2, 4) 48.2 /
# 90.5 / 180.5 vs 50.7 / 82.8 / 169.4: the observer lost only where the grid had 768 and 1280
# programs (132 SMs); the rule's 5 per SM (660) keeps the other ten points on. With 256 pages,
# chunks of 16384 (128 pages) were slower than chunks of 8192 at B=8 (28/4 42.1 vs 36.1 us; 32/8
# 62.9 vs 47.7), faster at B=32 28/4 (103.1 vs 106.6). The element-wise observer (session 9, results/h200/decode_step_triton_observer*_h200) lost
# at 8 programs per row (25.3 vs 18.7 us at B=8 28/4, L=2048).
ATTEND_OBSERVER: bool | None = None
ATTEND_OBSERVER_MAX_PROGRAMS_PER_SM = 5
# fused_step with the observer and ATTEND_SPLIT None: at least this many attention programs per row
# (never more than the row's tiles). H200, B=32 32/8, L=1024 (256 rows of 16 tiles; split_for gives
# 1), the observer with 2 programs against 1, us, in three runs: 45.9 vs 48.1 (results/h200/decode_
# step_triton_l1024_split_h200), 46.7 vs 48.5 (decode_step_triton_l1024_b32_h200), 45.9 vs 48.2
# (decode_step_triton_prefetch_b32_l1024_h200). The row's observer and its one attention program
# had been the two long programs of the row.
ATTEND_OBSERVER_MIN_SPLIT = 2
ATTEND_OBSERVER_BOUND_DOT = True
ATTEND_OBSERVER_BOUND_ELEMS = 16384
ATTEND_OBSERVER_CHUNK_ELEMS = 8192
# fused_step: every program makes the append's page choice (free slot or oldest unpinned page: the
# pinned and stamp rows and an argmin) only when the token opens a page, one step in page_size
# (False: every step, branch-free). None (the default): together with the observer. Alone it bought
# nothing on the H200 (18.5 against 18.7 us at B=8 28/4) and cost 104.9 against 82.2 us at B=32 32/8
# (8-byte spill); with the observer it was faster at all four points of that run.
ATTEND_LAZY_SLOT: bool | None = None
# fused_step's bound loops (the observer's, and each attention program's share): 0, an unrolled loop
# whose chunks run one after the other (each chunk's loads wait for the previous chunk's stores);
# N >= 1, a loop Triton may software-pipeline over N stages (on sm_90 with triton 3.6, B=8 28/4 with
# the observer: 15 asynchronous copies instead of 6, 128 registers with an 8-byte spill instead of
# 168). The observer's loop looked latency-bound on the H200 (4096-element chunks: 22.7 us against
# 25.3 with 2048, B=8 28/4, L=2048). H200, L=2048, one run (results/h200/decode_step_triton_observer_
# loops_h200), element-wise observer at 2 / 3 stages against 0, us: B=8 28/4 26.3 / 25.1 vs 25.5, B=8 32/8
# 28.9 / 29.8 vs 29.0, B=32 28/4 48.6 / 48.5 vs 50.6; without the observer, 2 stages: 18.7 vs 18.6, 33.6
# vs 32.4, 54.5 vs 56.4. The observer's one matrix product beat all of them (16.2, 29.5, 47.2): 0 stays.
ATTEND_BOUND_STAGES = 0
# fused_step: at its start, before the append's decision (whose loads take two dependent trips to
# memory), each attention program asks the GPU to bring its first ATTEND_PREFETCH K/V tiles into
# L2 (sm_90's cp.async.bulk.prefetch.L2 in 4 KB pieces: no registers, no result; 0: none), and with
# ATTEND_OBSERVER_PREFETCH the observer asks for its row's key bounds. A hint only: the interpreter
# (CPU) skips it, and nothing computed changes. H200, N=8192, one run each, us
# (results/h200/decode_step_triton_prefetch_*_h200, decode_step_triton_defaults_s11_h200): the tile
# prefetch lost everywhere (B=8 28/4 L=2048, 1 / 2 / 4 tiles: 16.5 / 17.1 / 18.2 vs 16.2; B=32 28/4
# L=1024, 1 / 2: 28.2 / 29.2 vs 26.8; B=32 32/8 L=4096, 2: 170.4 vs 167.1); the observer's prefetch
# over the 12-point grid won at 5 points (B=8 28/4 L=4096 34.2 vs 35.8, B=32 28/4 L=1024 27.0 vs
# 28.1) and lost up to 1.6 us at 7: both stay off.
ATTEND_PREFETCH = 0
ATTEND_OBSERVER_PREFETCH = False
# fused_step's row writes (by the observer, its writer, or the row's last program): True stores only
# the page of the validity row that the step changes (the row is right before the step: every path
# that changes the page table writes it), and counts a flex block's valid slots as the sum of its
# pages' tokens where blocks are whole pages; False rewrites the whole validity row and counts
# with a [blocks x pages] overlap. The same results either way. None (the default): lean unless
# the observer makes the row writes itself (no writer), where lean cost 88.6 against 83.2 us at
# B=32 28/4 L=4096. H200, N=8192 (results/h200/decode_step_triton_lean_writer_h200,
# decode_step_triton_writer_grid_h200): without the observer, B=32 32/8 L=4096 155.5 against
# 170.0 us and L=2048 82.4 against 83.2 (the last program's tail makes the row writes); with the
# writer, B=8 28/4 12.4 / 16.2 / 30.1 against 12.7 / 16.2 / 30.3 at L=1024 / 2048 / 4096.
ATTEND_LEAN_ROW_WRITES: bool | None = None
# fused_step with the observer: True gives each row a second extra program, the writer, which makes
# the row writes the observer would make (validity row, block lists, key bounds, counters), so the
# observer only bounds and sorts (grid: rows x (split + 2)). None (the default): on when the row has
# at least ATTEND_ROW_WRITER_MIN_SPLIT attention programs, whose shares are then short next to the
# observer's serial bounds, sort and row writes. H200, N=8192, two runs (results/h200/decode_step_
# triton_lean_writer_h200, decode_step_triton_writer_grid_h200), writer against none, us: B=8 28/4
# (8 programs per row) 12.6 / 12.7 vs 13.0 / 13.0 at L=1024, 16.4 / 16.2 vs 16.6 / 16.5 at 2048,
# 30.1 / 30.3 vs 35.8 / 36.4 at 4096; with 4 programs per row, B=8 32/8 16.0 vs 15.6, 28.7 vs 28.8,
# 48.7 vs 48.0 and B=32 28/4 L=4096 82.3 / 82.0 vs 83.2 / 83.0; with 2, B=32 28/4 L=1024 28.6 / 29.1
# vs 27.3 / 27.7 and B=32 32/8 L=1024 54.0 vs 46.5. Without the observer it changes nothing.
ATTEND_ROW_WRITER: bool | None = None
ATTEND_ROW_WRITER_MIN_SPLIT = 8
# fused_step's row tail, attributed on the H200 (N=8192, results/h200/decode_step_triton_tail_h200):
# at B=8 28/4 L=2048 the combine costs 1.8 us, the tickets' fences 0.7 and the global ticket 0.4 of a
# 16.6 us step (B=8 32/8 L=1024: 0.8, 0.6, 0.6 of 15.9).
# ATTEND_COMBINE_ONLINE: the row's last program merges the SPLIT partial results part after part,
# each part's maximum and sum loaded beside its accumulator, with no reduction across threads
# (False: the maxima and sums of all parts first, then one [SPLIT, G] reduction per part). None (the
# default): on with the observer, from ATTEND_COMBINE_ONLINE_MIN_SPLIT programs per row. H200,
# N=8192, online against not, us (results/h200/decode_step_triton_tail_fix2_h200): B=8 28/4 (8
# programs per row) 11.8 / 15.5 vs 12.7 / 16.6 at L=1024 / 2048; B=8 32/8 (4) 15.2 / 29.0 vs 15.8 /
# 29.3; B=32 28/4 (2) 28.0 / 46.7 vs 28.1 / 44.3; the 12 points (decode_step_triton_defaults_s13_h200):
# 11.7 / 15.6 / 29.7 vs 12.6 / 16.3 / 30.1 (B=8 28/4), 15.1 / 28.7 / 47.6 vs 15.7 / 29.2 / 47.5 (B=8
# 32/8), B=32 28/4 L=4096 (4) 81.8 vs 82.2, and without the observer B=32 32/8 L=4096 (4) 185.1 vs
# 155.7: there the online build takes 213 registers instead of 128 (sm_90, triton 3.6), two programs
# per SM instead of four. (Loading every accumulator at once instead, as
# [SPLIT, G, D], was 4-5 us slower at B=8 28/4: decode_step_triton_tail_fix_h200; removed.)
# ATTEND_EARLY_TICKET: every program takes the global ticket right after reading the lengths and
# the step (which it reads only there), and the program that takes the last ticket advances them
# once its own decision is made, from values it loaded with them; otherwise (the default) the last
# program of each row takes the ticket at the end of the row's tail, and the last row's loads and
# advances them. H200, N=8192, early against not, us, two runs (results/h200/decode_step_triton_
# tail_fix_h200, _tail_fix2_h200, the old combine): B=8 28/4 L=2048 16.0 / 16.2 vs 16.4 / 16.6, but
# B=8 32/8 L=1024 15.4 / 16.4 vs 15.5 / 15.8 and B=32 28/4 L=2048 44.8 / 45.0 vs 44.0 / 44.3: off.
ATTEND_COMBINE_ONLINE: bool | None = None
ATTEND_COMBINE_ONLINE_MIN_SPLIT = 4
ATTEND_EARLY_TICKET = False
# fused_step: every program loads its row's queries at its start, beside the append's first loads,
# so that an attention program's K/V stream waits for one trip to memory instead of two (False: the
# attention programs load them after the append's decision, just before their tiles: compiled for
# sm_90 with triton 3.6, the query's layout change through shared memory then waits for that load
# before the first tile's asynchronous copies are issued). H200, N=8192, B=32 28/4 L=1024, first
# against after, one run (results/h200/decode_step_triton_b32_l1024_s14b_h200): 27.8 vs 28.2 us.
ATTEND_Q_FIRST = True
# fused_step with the observer: the observer (and writer) programs take the last grid indices of
# their row instead of the first, so the GPU dispatches every attention program before any observer
# (blocks are dispatched in order of their linear index, the row index varying fastest), and no SM
# gets a third attention program while others hold an observer. False: observers first, so they
# start at once. None (the default): last when the whole grid fits on the GPU at
# ATTEND_OBSERVER_LAST_MAX_PROGRAMS_PER_SM programs per SM (the builds of the 12 benchmark points
# fit 3 per SM on sm_90: 72704 B of shared memory at B=32 28/4, 168 registers at B=8), so the
# observers still start in the first wave; always on CPU. H200, N=8192, last against first, one run
# (results/h200/decode_step_triton_olast_grid_h200), us: one wave (320-384 programs): B=8 28/4
# 11.9 / 15.6 / 28.9 vs 11.4 / 15.5 / 29.8 at L=1024 / 2048 / 4096, B=8 32/8 14.1 / 26.6 / 46.7 vs
# 15.2 / 28.0 / 47.2, B=32 28/4 L=1024 26.2 vs 28.2 (and 26.4 vs 26.9 in decode_step_triton_b32_
# l1024_olast_h200), L=2048 42.8 vs 44.5; more than one wave: B=32 28/4 L=4096 (640 programs) 96.5
# vs 79.8, B=32 32/8 L=1024 (768) 46.0 vs 45.2.
ATTEND_OBSERVER_LAST: bool | None = None
ATTEND_OBSERVER_LAST_MAX_PROGRAMS_PER_SM = 3


def split_for(rows: int, tiles: int, sms: int | None = None, want: int | None = None) -> int:
    """Programs per (sequence, KV head) row of the attention kernels: a power of two, at most one per
    tile of ATTEND_BLOCK_N slots. ``want`` if given; else enough programs for about two per SM
    (``sms``) over all ``rows``, and at least enough that none runs more than ATTEND_TILES_PER_PROGRAM
    tiles. (On the H200 the second rule won at B=32, 32/8: at L=4096 one program per row took
    189.0 us, four 174.0, in one run; at L=2048 one took 95.3 us and two 85.1, in two runs on one
    machine: benchmarks/results/h200/decode_step_triton_split_*.)"""
    if want is None:
        if sms is None:
            raise ValueError("split_for needs sms (the device's SM count) or want")
        want = max(1, 2 * sms // rows, -(-tiles // ATTEND_TILES_PER_PROGRAM))
    split = 1
    while split * 2 <= min(want, tiles):
        split *= 2
    return split


if HAS_TRITON:
    # (module-level constants a jitted kernel reads must be tl.constexpr)
    _I64_MAX = tl.constexpr(9223372036854775807)
    _F32_MAX = tl.constexpr(3.4028234663852886e38)

    @triton.jit
    def _bound_chunk(q_ptr, sqb, sqh, sqd, page_id_ptr, score_ptr, kmax_ptr, kmin_ptr, imp_ptr,
                     b, h, base, c0, hi, G: tl.constexpr, P: tl.constexpr, D: tl.constexpr, BP: tl.constexpr,
                     DOT: tl.constexpr):
        """Quest's bound of the BP pages c0.. (those below ``hi``) of one row: sum_d max(q_d M_d, q_d m_d) = q+ . M + q- . m,
        max over the G query heads of the KV head, -inf for empty slots. Stored to the scratch row
        ``imp`` (the ranking reads the whole row back) and, -inf/nan as 0, to ``score``.

        DOT: the G x BP bounds as two matrix products (q+ and q- exact in the query dtype, products
        exact in fp32, fp32 accumulation; fp32 operands use exact fp32 arithmetic, not tf32).
        Otherwise an element-wise product and a reduction over D per query head."""
        d = tl.arange(0, D)
        pp = c0 + tl.arange(0, BP)
        m = (pp < P) & (pp < hi)
        off2 = (base + pp)[:, None] * D + d[None, :]
        kmax = tl.load(kmax_ptr + off2, mask=m[:, None], other=0.0, cache_modifier=".cg")
        kmin = tl.load(kmin_ptr + off2, mask=m[:, None], other=0.0, cache_modifier=".cg")
        pidc = tl.load(page_id_ptr + base + pp, mask=m, other=-1, cache_modifier=".cg")
        return _bound_store(q_ptr, sqb, sqh, sqd, score_ptr, imp_ptr, kmax, kmin, pidc, pp, m, b, h, base, G, D, BP,
                            DOT)

    @triton.jit
    def _bound_store(q_ptr, sqb, sqh, sqd, score_ptr, imp_ptr, kmax, kmin, pidc, pp, m, b, h, base,
                     G: tl.constexpr, D: tl.constexpr, BP: tl.constexpr, DOT: tl.constexpr):
        """The bounds of :func:`_bound_chunk` from given key bounds ``kmax``/``kmin`` [BP, D] and page
        ids ``pidc`` [BP] of the pages ``pp`` (``m``: in the row): stored to imp and score, returned."""
        d = tl.arange(0, D)
        if DOT:
            BG: tl.constexpr = 16 if G <= 16 else triton.next_power_of_2(G)
            gg = tl.arange(0, BG)
            qt = tl.load(q_ptr + b * sqb + (h * G + gg)[:, None] * sqh + d[None, :] * sqd,
                         mask=(gg < G)[:, None], other=0.0)
            if qt.dtype == kmax.dtype and kmax.dtype != tl.float32:
                qp = tl.maximum(qt, 0.0).to(kmax.dtype)
                qn = tl.minimum(qt, 0.0).to(kmax.dtype)
                s = tl.dot(qp, tl.trans(kmax)) + tl.dot(qn, tl.trans(kmin))
            else:
                qf = qt.to(tl.float32)
                s = tl.dot(tl.maximum(qf, 0.0), tl.trans(kmax.to(tl.float32)), input_precision="ieee")
                s += tl.dot(tl.minimum(qf, 0.0), tl.trans(kmin.to(tl.float32)), input_precision="ieee")
            best = tl.max(tl.where((gg < G)[:, None], s, float("-inf")), 0)
        else:
            kmax = kmax.to(tl.float32)
            kmin = kmin.to(tl.float32)
            best = tl.full([BP], float("-inf"), tl.float32)
            for g in tl.static_range(G):
                qv = tl.load(q_ptr + b * sqb + (h * G + g) * sqh + d * sqd).to(tl.float32)
                sg = tl.sum(tl.maximum(qv, 0.0)[None, :] * kmax + tl.minimum(qv, 0.0)[None, :] * kmin, 1)
                best = tl.maximum(best, sg)
        imp = tl.where(pidc >= 0, best, float("-inf"))
        tl.store(imp_ptr + base + pp, imp, mask=m)
        sc = tl.where(imp != imp, 0.0, imp)
        sc = tl.where(sc == float("-inf"), 0.0, sc)
        sc = tl.where(sc == float("inf"), _F32_MAX, sc)
        tl.store(score_ptr + base + pp, sc, mask=m)
        return imp

    @triton.jit
    def _bound_pages(q_ptr, sqb, sqh, sqd, page_id_ptr, score_ptr, kmax_ptr, kmin_ptr, imp_ptr,
                     pp, mp, slot, opened, new_id, new_max, new_min, b, h, base,
                     G: tl.constexpr, D: tl.constexpr, BP: tl.constexpr, DOT: tl.constexpr):
        """:func:`_bound_store` of the pages ``pp`` (``mp``: in the row) as they are after this step's
        append: page slot ``slot`` with key bounds new_max / new_min, and id new_id if ``opened``."""
        d = tl.arange(0, D)
        off2 = (base + pp)[:, None] * D + d[None, :]
        is_slot = (pp == slot)[:, None]
        kmx = tl.where(is_slot, new_max[None, :], tl.load(kmax_ptr + off2, mask=mp[:, None], other=0.0))
        kmn = tl.where(is_slot, new_min[None, :], tl.load(kmin_ptr + off2, mask=mp[:, None], other=0.0))
        pidp = tl.load(page_id_ptr + base + pp, mask=mp, other=-1)
        pidp = tl.where(opened & (pp == slot), new_id, pidp)
        return _bound_store(q_ptr, sqb, sqh, sqd, score_ptr, imp_ptr, kmx, kmn, pidp, pp, mp, b, h, base, G, D, BP,
                            DOT)

    @triton.jit
    def _bound_loop(q_ptr, sqb, sqh, sqd, page_id_ptr, score_ptr, kmax_ptr, kmin_ptr, imp_ptr,
                    lo, hi, slot, opened, new_id, new_max, new_min, b, h, base,
                    G: tl.constexpr, P: tl.constexpr, D: tl.constexpr, BP: tl.constexpr, BPC: tl.constexpr,
                    DOT: tl.constexpr, STAGES: tl.constexpr):
        """:func:`_bound_pages` of the pages lo .. min(hi, P) - 1, in chunks of BPC pages (BP >= hi - lo
        pages covered). STAGES 0: an unrolled loop (each chunk's loads wait for the stores of the chunk
        before: the compiler cannot tell the pointers apart); STAGES >= 1: a loop that Triton's
        pipeliner may software-pipeline over STAGES stages, issuing the key-bound loads of later chunks
        early (they never alias the imp and score rows the loop stores)."""
        if STAGES == 0:
            for c0 in tl.static_range(0, BP, BPC):
                pp = lo + c0 + tl.arange(0, BPC)
                _bound_pages(q_ptr, sqb, sqh, sqd, page_id_ptr, score_ptr, kmax_ptr, kmin_ptr, imp_ptr,
                             pp, (pp < P) & (pp < hi), slot, opened, new_id, new_max, new_min, b, h, base,
                             G, D, BPC, DOT)
        else:
            for c0 in tl.range(0, BP, BPC, num_stages=STAGES):
                pp = lo + c0 + tl.arange(0, BPC)
                _bound_pages(q_ptr, sqb, sqh, sqd, page_id_ptr, score_ptr, kmax_ptr, kmin_ptr, imp_ptr,
                             pp, (pp < P) & (pp < hi), slot, opened, new_id, new_max, new_min, b, h, base,
                             G, D, BPC, DOT)

    @triton.jit
    def _prefetch_l2(ptr, NBYTES: tl.constexpr):
        """Ask for NBYTES contiguous bytes from ``ptr`` (a 16-byte aligned scalar pointer) to be brought
        into L2, in whole chunks of 4 KB (NBYTES under 4 KB: one chunk of NBYTES), one chunk per thread
        of the first threads (sm_90's cp.async.bulk.prefetch.L2: no registers held, nothing returned
        or waited for). A remainder under 4 KB, and chunks past the program's thread count, are not
        asked for: a hint may cover less than NBYTES."""
        CH: tl.constexpr = 4096 if NBYTES >= 4096 else NBYTES
        N: tl.constexpr = NBYTES // CH
        tl.inline_asm_elementwise(
            """{
            .reg .pred p;
            .reg .u32 t;
            .reg .u64 a;
            mov.u32 t, %tid.x;
            setp.lt.u32 p, t, $3;
            mul.wide.u32 a, t, $2;
            add.u64 a, a, $1;
            @p cp.async.bulk.prefetch.L2.global [a], $2;
            mov.u32 $0, 0;
            }""",
            "=r,l,r,r", [ptr.to(tl.uint64, bitcast=True), tl.full([], CH, tl.int32), tl.full([], N, tl.int32)],
            dtype=tl.int32, is_pure=False, pack=1)

    @triton.jit
    def _last_of_row(count_ptr, row64, NPROG: tl.constexpr, RELAXED: tl.constexpr = False):
        """Whether this program is the last of the NPROG programs of its row to get here: a barrier
        over this program's stores, then a per-row ticket (acq_rel), which orders every other
        program's stores before this one's later reads. (The last program resets the count.)
        RELAXED (a diagnostic build's, see ATTEND_DIAG): the ticket without that ordering."""
        tl.debug_barrier()
        if NPROG == 1:
            last = True
        elif RELAXED:
            last = tl.atomic_add(count_ptr + row64, 1, sem="relaxed") == NPROG - 1
        else:
            last = tl.atomic_add(count_ptr + row64, 1, sem="acq_rel") == NPROG - 1
        return last

    @triton.jit
    def _refresh_set(imp, pid, i, in_row, P: tl.constexpr, REFRESH: tl.constexpr, BLOCK_P: tl.constexpr):
        """The top REFRESH resident pages of a row (imp, pid: [BLOCK_P] over slots i), as a mask. Order:
        larger importance first, equal importance to the lower slot (the stable descending rank of
        the torch code).

        The importance goes to an order-preserving int32 image (-0.0 folded into 0.0); one
        in-register sort of the images gives the REFRESH-th largest value t. Pages above t are in,
        and of the pages equal to t the lowest slots fill what is left (a prefix count). (A sort of
        int64 keys with the slot in the low bits, and a 32-step bitwise search for t, measured no
        faster and slower on an H200: results/h200/kernel_variants_h200.log.)"""
        resident = (pid >= 0) & in_row
        if REFRESH >= P:
            refresh = resident
        else:
            v = tl.where(imp == 0.0, 0.0, imp)
            bits = v.to(tl.int32, bitcast=True)
            ordered = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
            low = tl.where(in_row, ordered, -2147483647 - 1)
            srt = tl.sort(low, descending=True)
            t = tl.sum(tl.where(i == REFRESH - 1, srt, 0), 0)
            above = in_row & (low > t)
            tie = in_row & (low == t)
            need = REFRESH - tl.sum(above.to(tl.int32), 0)
            refresh = resident & (above | (tie & (tl.cumsum(tie.to(tl.int32), 0) <= need)))
        return refresh

    @triton.jit
    def _refresh_top(imp, pid, i, in_row, stamp_ptr, base, step_now,
                     P: tl.constexpr, REFRESH: tl.constexpr, BLOCK_P: tl.constexpr):
        """Stamp the pages of :func:`_refresh_set` with step_now."""
        refresh = _refresh_set(imp, pid, i, in_row, P, REFRESH, BLOCK_P)
        tl.store(stamp_ptr + base + i, tl.zeros([BLOCK_P], tl.int64) + step_now, mask=refresh)

    @triton.jit
    def _write_valid_lists(valid_ptr, kv_num_ptr, kv_idx_ptr, full_num_ptr, full_idx_ptr, row64, p, in_row, n_p,
                           S: tl.constexpr, PS: tl.constexpr, BLOCK_PS: tl.constexpr, KB: tl.constexpr,
                           NB: tl.constexpr, BLOCK_KB: tl.constexpr, BLOCK_NB: tl.constexpr,
                           LISTS_IN_REGS: tl.constexpr, slot=0, LEAN: tl.constexpr = False):
        """Row ``row64`` of the slot-validity mask (the first n_p[p] slots of page slot p are valid)
        and its exact flex block lists (see masks.block_lists).

        LEAN (fused_step's ATTEND_LEAN_ROW_WRITES): only page slot ``slot`` of the validity row is
        stored, the one page a step changes when the row was right before it; and when blocks are
        whole pages (KB a multiple of PS, S of KB), a block's valid slots are the sum of its pages'
        n_p (no [blocks x pages] overlap, no read-back)."""
        tt = tl.arange(0, BLOCK_PS)
        if LEAN:
            n_slot = tl.sum(tl.where(p == slot, n_p, 0), 0)
            tl.store(valid_ptr + row64 * S + slot * PS + tt, tt < n_slot, mask=tt < PS)
        else:
            vmask = in_row[:, None] & (tt[None, :] < PS)
            tl.store(valid_ptr + row64 * S + p[:, None] * PS + tt[None, :], tt[None, :] < n_p[:, None], mask=vmask)

        # exact block lists of the row for flex (same layout as masks.block_lists): blocks of KB
        # slots whose every slot is valid are "full" (the kernel skips mask_mod there), blocks with
        # some valid slots "partial"; listed blocks first, in order, then the others.
        nb = tl.arange(0, BLOCK_NB)
        in_nb = nb < NB
        PPB: tl.constexpr = KB // PS if KB >= PS else 1
        BY_PAGE: tl.constexpr = LEAN and KB % PS == 0 and S % KB == 0 and n_p.shape[0] == BLOCK_NB * PPB
        if BY_PAGE:  # pages past the row have n_p 0
            cnt = tl.sum(tl.reshape(n_p.to(tl.int32), [BLOCK_NB, PPB]), 1)
        elif LISTS_IN_REGS:  # valid slots per block = overlap of [nb*KB, +KB) with each [p*PS, +n_p)
            lo = tl.maximum(nb[:, None] * KB, p[None, :] * PS)
            hi = tl.minimum(nb[:, None] * KB + KB, p[None, :] * PS + n_p[None, :])
            cnt = tl.sum(tl.maximum(hi - lo, 0).to(tl.int32), 1)
        else:  # large rows: read the row of `valid` back
            tl.debug_barrier()  # the row stored above is complete
            jb = tl.arange(0, BLOCK_KB)
            vb = tl.load(valid_ptr + row64 * S + nb[:, None] * KB + jb[None, :],
                         mask=in_nb[:, None] & (jb[None, :] < KB), other=0, cache_modifier=".cg")
            cnt = tl.sum(vb.to(tl.int32), 1)
        full = (cnt == KB) & in_nb
        part = (cnt > 0) & (cnt < KB) & in_nb
        n_full = tl.sum(full.to(tl.int32), 0)
        n_part = tl.sum(part.to(tl.int32), 0)
        c_full = tl.cumsum(full.to(tl.int32), 0)
        c_part = tl.cumsum(part.to(tl.int32), 0)
        pos_full = tl.where(full, c_full - 1, n_full + nb - c_full)
        pos_part = tl.where(part, c_part - 1, n_part + nb - c_part)
        tl.store(full_idx_ptr + row64 * NB + pos_full, nb, mask=in_nb)
        tl.store(kv_idx_ptr + row64 * NB + pos_part, nb, mask=in_nb)
        tl.store(full_num_ptr + row64, n_full)
        tl.store(kv_num_ptr + row64, n_part)

    @triton.jit
    def _append_inputs(kn_ptr, vn_ptr, skb, skh, skd, svb, svh, svd, k_ptr, v_ptr, kmax_ptr, kmin_ptr,
                       open_slot_ptr, length_ptr, step_ptr, evictions_ptr, b, h, row64, base, D: tl.constexpr,
                       q_ptr=None, sqb=0, sqh=0, sqd=0, G: tl.constexpr = 1, BG: tl.constexpr = 16,
                       QLOAD: tl.constexpr = False):
        """The append's loads that do not depend on its slot choice, for row (b, h): the new step, the
        position of the token, the open page slot, the eviction counter (for the row's final writes),
        the new key and value (in the cache's dtype) and the open page's key bounds (fp32); with
        QLOAD also the row's queries (:func:`_load_q`, in the cache's dtype; else 0), issued before
        any of those loads is waited for."""
        d = tl.arange(0, D)
        step_new = tl.load(step_ptr) + 1
        pos = tl.load(length_ptr + b)  # tokens written before this one
        open_old = tl.load(open_slot_ptr + row64)
        ev = tl.load(evictions_ptr + row64)
        kk = tl.load(kn_ptr + b * skb + h * skh + d * skd).to(k_ptr.dtype.element_ty)
        vv = tl.load(vn_ptr + b * svb + h * svh + d * svd).to(v_ptr.dtype.element_ty)
        if QLOAD:
            q = _load_q(q_ptr, sqb, sqh, sqd, b, h, k_ptr.dtype.element_ty, G, BG, D)
        else:
            q = 0
        # key bounds of the open page: the row updated unless a page is opened (then overwritten)
        optr = (base + open_old) * D + d
        old_max = tl.load(kmax_ptr + optr).to(tl.float32)
        old_min = tl.load(kmin_ptr + optr).to(tl.float32)
        return step_new, pos, open_old, ev, kk, vv, old_max, old_min, q

    @triton.jit
    def _append_kernel(
        kn_ptr, vn_ptr, skb, skh, skd, svb, svh, svd,
        k_ptr, v_ptr, page_id_ptr, stamp_ptr, pinned_ptr, score_ptr, kmax_ptr, kmin_ptr,
        open_slot_ptr, length_ptr, step_ptr, evictions_ptr, overflow_ptr, valid_ptr, ticket_ptr,
        kv_num_ptr, kv_idx_ptr, full_num_ptr, full_idx_ptr,
        q_ptr, sqb, sqh, sqd, imp_ptr,
        B: tl.constexpr, H: tl.constexpr, P: tl.constexpr, D: tl.constexpr, PS: tl.constexpr,
        BLOCK_P: tl.constexpr, BLOCK_PS: tl.constexpr, BLOCK_B: tl.constexpr,
        POLICY: tl.constexpr, SINK_PAGES: tl.constexpr, RECENT_PAGES: tl.constexpr,
        KB: tl.constexpr, NB: tl.constexpr, BLOCK_KB: tl.constexpr, BLOCK_NB: tl.constexpr,
        LISTS_IN_REGS: tl.constexpr,
        OBSERVE: tl.constexpr, G: tl.constexpr, REFRESH: tl.constexpr, BPC: tl.constexpr,
        DOT: tl.constexpr,
    ):
        row = tl.program_id(0)
        b = row // H
        h = row % H
        S: tl.constexpr = P * PS
        row64 = row.to(tl.int64)
        base = row64 * P
        d = tl.arange(0, D)

        # every load that does not depend on the slot choice is issued up front
        bb = tl.arange(0, BLOCK_B)
        lens = tl.load(length_ptr + bb, mask=bb < B, other=0)  # (the last program writes lens + 1)
        step_new, pos, open_old, ev, kk, vv, old_max, old_min, _ = _append_inputs(
            kn_ptr, vn_ptr, skb, skh, skd, svb, svh, svd, k_ptr, v_ptr, kmax_ptr, kmin_ptr,
            open_slot_ptr, length_ptr, step_ptr, evictions_ptr, b, h, row64, base, D)
        p = tl.arange(0, BLOCK_P)
        in_row = p < P
        pid = tl.load(page_id_ptr + base + p, mask=in_row, other=-1)
        pinned = tl.load(pinned_ptr + base + p, mask=in_row, other=0).to(tl.int1)

        off = pos % PS
        need = off == 0  # the token opens a new page
        resident = (pid >= 0) & in_row
        free = (pid < 0) & in_row
        has_free = tl.max(free.to(tl.int32), 0) > 0
        first_free = tl.min(tl.where(free, p, BLOCK_P), 0)

        # evictable pages and their eviction key (smallest first; argmin breaks ties to the left,
        # padding past P carries the largest key so a real slot always wins a tie with it)
        evictable = resident & (pinned == 0)
        if POLICY == 0:  # raas: last use, then the older logical page
            stamp = tl.load(stamp_ptr + base + p, mask=in_row, other=0)
            key = stamp * 4294967296 + pid
            victim = tl.argmin(tl.where(evictable, key, _I64_MAX), 0)
        elif POLICY == 1:  # streaming: sink pages stay, oldest page first
            evictable = evictable & (pid >= SINK_PAGES)
            victim = tl.argmin(tl.where(evictable, pid, _I64_MAX), 0)
        else:  # h2o: the recent half is protected, smallest accumulated share first
            newest = pos // PS
            evictable = evictable & (pid <= newest - RECENT_PAGES)
            sc = tl.load(score_ptr + base + p, mask=in_row, other=0.0)
            masked = tl.where(evictable, sc, _F32_MAX)
            victim = tl.argmin(tl.where(in_row, masked, float("inf")), 0)
        can_evict = tl.max(evictable.to(tl.int32), 0) > 0
        ok = has_free | can_evict
        opened = need & ok
        write = (need == 0) | ok  # False only when no slot could be found (capacity exceeded)
        chosen = tl.where(has_free, first_free, victim).to(tl.int64)
        slot = tl.where(opened, chosen, open_old)

        tl.store(overflow_ptr, 1, mask=write == 0)
        evicted = opened & (has_free == 0)
        tl.store(evictions_ptr + row64, ev + evicted.to(tl.int64))

        # token write (after an overflow the token overwrites the open page's first slot, as in torch)
        t = slot * PS + off
        tl.store(k_ptr + (row64 * S + t) * D + d, kk)
        tl.store(v_ptr + (row64 * S + t) * D + d, vv)

        # page-table entry of an opened page
        new_id = pos // PS
        tl.store(page_id_ptr + base + slot, new_id, mask=opened)
        tl.store(stamp_ptr + base + slot, step_new, mask=opened)
        tl.store(pinned_ptr + base + slot, 0, mask=opened)
        tl.store(score_ptr + base + slot, 0.0, mask=opened)

        # key bounds of the written page (slot == open_old whenever no page is opened)
        kf = kk.to(tl.float32)
        new_max = tl.where(opened, kf, tl.where(write, tl.maximum(old_max, kf), old_max))
        new_min = tl.where(opened, kf, tl.where(write, tl.minimum(old_min, kf), old_min))
        bptr = (base + slot) * D + d
        tl.store(kmax_ptr + bptr, new_max.to(kmax_ptr.dtype.element_ty))
        tl.store(kmin_ptr + bptr, new_min.to(kmin_ptr.dtype.element_ty))
        tl.store(open_slot_ptr + row64, tl.where(write, slot, open_old))

        # validity of every slot of the row after the append (what flex's mask_mod reads): the
        # first n_p slots of page slot p, n_p = its written tokens
        pid_new = tl.where(opened & (p == slot), new_id, pid)
        n_p = tl.where(pid_new >= 0, tl.minimum(tl.maximum(pos + 1 - pid_new * PS, 0), PS), 0)
        _write_valid_lists(valid_ptr, kv_num_ptr, kv_idx_ptr, full_num_ptr, full_idx_ptr, row64, p, in_row, n_p,
                           S, PS, BLOCK_PS, KB, NB, BLOCK_KB, BLOCK_NB, LISTS_IN_REGS)

        if OBSERVE:  # RaaS observe of this step's query, for this row (see fused_append_observe)
            tl.debug_barrier()  # the key-bound row and page-table entry stored above are complete
            if BPC == BLOCK_P:  # the whole row in one chunk: its bounds stay in registers
                a = _bound_chunk(q_ptr, sqb, sqh, sqd, page_id_ptr, score_ptr, kmax_ptr, kmin_ptr, imp_ptr,
                                 b, h, base, 0, P, G, P, D, BPC, DOT)
            else:  # chunks through the scratch row
                for c0 in tl.static_range(0, BLOCK_P, BPC):
                    _bound_chunk(q_ptr, sqb, sqh, sqd, page_id_ptr, score_ptr, kmax_ptr, kmin_ptr, imp_ptr,
                                 b, h, base, c0, P, G, P, D, BPC, DOT)
                tl.debug_barrier()  # the row of bounds is complete
                a = tl.load(imp_ptr + base + p, mask=in_row, other=float("-inf"), cache_modifier=".cg")
            _refresh_top(a, pid_new, p, in_row, stamp_ptr, base, step_new, P, REFRESH, BLOCK_P)

        # The last program to finish advances the per-sequence lengths and the step counter: every
        # program has read them by now (the barrier orders this program's loads before its ticket).
        tl.debug_barrier()
        ticket = tl.atomic_add(ticket_ptr, 1, sem="acq_rel")
        if ticket == B * H - 1:
            tl.store(length_ptr + bb, lens + 1, mask=bb < B)
            tl.store(step_ptr, step_new)
            tl.store(ticket_ptr, 0)

    @triton.jit
    def _observe_kernel(
        q_ptr, sqb, sqh, sqd,
        page_id_ptr, stamp_ptr, score_ptr, kmax_ptr, kmin_ptr, step_ptr, imp_ptr, count_ptr,
        H: tl.constexpr, G: tl.constexpr, P: tl.constexpr, D: tl.constexpr, REFRESH: tl.constexpr,
        BLOCK_P: tl.constexpr, BP: tl.constexpr, NSPLIT: tl.constexpr, DOT: tl.constexpr,
    ):
        row = tl.program_id(0)
        chunk = tl.program_id(1)
        b = row // H
        h = row % H
        row64 = row.to(tl.int64)
        base = row64 * P
        _bound_chunk(q_ptr, sqb, sqh, sqd, page_id_ptr, score_ptr, kmax_ptr, kmin_ptr, imp_ptr,
                     b, h, base, chunk * BP, P, G, P, D, BP, DOT)

        # The program that finishes its row last ranks the row: its ticket (acq_rel, after a
        # barrier over this program's stores) orders every other program's scratch stores before
        # its reads, which bypass L1.
        last = _last_of_row(count_ptr, row64, NSPLIT)
        if last:
            i = tl.arange(0, BLOCK_P)
            in_row = i < P
            a = tl.load(imp_ptr + base + i, mask=in_row, other=float("-inf"), cache_modifier=".cg")
            pid = tl.load(page_id_ptr + base + i, mask=in_row, other=-1)
            _refresh_top(a, pid, i, in_row, stamp_ptr, base, tl.load(step_ptr), P, REFRESH, BLOCK_P)
            if NSPLIT > 1:
                tl.store(count_ptr + row64, 0)

    @triton.jit
    def _softmax_tile(q, kt, vt, ok, m_i, l_i, acc, scale_log2):
        """One KV tile of an online softmax: q [BG, D], kt/vt [BN, D], ok [BN] (attended slots);
        running max m_i and sum l_i [BG] (log2 domain), accumulator acc [BG, D] fp32. fp32 K/V use
        exact fp32 products (no tf32)."""
        if kt.dtype == tl.float32:
            sc = tl.dot(q, tl.trans(kt), input_precision="ieee")
        else:
            sc = tl.dot(q, tl.trans(kt))
        sc = tl.where(ok[None, :], sc * scale_log2, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(sc, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        pr = tl.exp2(sc - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(pr, 1)
        if vt.dtype == tl.float32:
            pv = tl.dot(pr, vt, input_precision="ieee")
        else:
            pv = tl.dot(pr.to(vt.dtype), vt)
        return m_new, l_i, acc * alpha[:, None] + pv

    @triton.jit
    def _combine_row(ml_ptr, acc_ptr, out_row_ptr, soh, sod, row64,
                     G: tl.constexpr, BG: tl.constexpr, D: tl.constexpr, SPLIT: tl.constexpr,
                     ONLINE: tl.constexpr = False):
        """Combine the SPLIT partial softmax results of one row (max and sum in ml, accumulators of the
        G heads in acc, BG rows per part) and store the G output heads at out_row_ptr (strides soh,
        sod); a row nothing attended gets zeros. Without ONLINE, the maxima and sums of all SPLIT
        parts are loaded at once, and the accumulator loop is unrolled, so the loads need not wait
        for one another. ONLINE: each part's maximum and sum are loaded beside its accumulator and
        merged into a running maximum, sum and output, part after part (see ATTEND_COMBINE_ONLINE)."""
        gg = tl.arange(0, BG)
        gm = gg < G
        d = tl.arange(0, D)
        if ONLINE:
            # part after part, as flash attention merges tiles: no reduction across threads (each
            # [SPLIT, BG] reduction of the other form is a trip through shared memory and a barrier)
            m = tl.full([BG], float("-inf"), tl.float32)
            tot = tl.zeros([BG], tl.float32)
            o = tl.zeros([BG, D], tl.float32)
            for i in tl.static_range(SPLIT):
                part = row64 * SPLIT + i
                m_i = tl.load(ml_ptr + part * 2 * BG + gg, mask=gm, other=float("-inf"), cache_modifier=".cg")
                l_i = tl.load(ml_ptr + (part * 2 + 1) * BG + gg, mask=gm, other=0.0, cache_modifier=".cg")
                a = tl.load(acc_ptr + (part * BG + gg)[:, None] * D + d[None, :], mask=gm[:, None], other=0.0,
                            cache_modifier=".cg")
                m_new = tl.maximum(m, m_i)
                safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                alpha = tl.exp2(m - safe)
                beta = tl.exp2(m_i - safe)
                o = o * alpha[:, None] + beta[:, None] * a
                tot = tot * alpha + beta * l_i
                m = m_new
        else:
            sp = tl.arange(0, SPLIT)
            mlo = ((row64 * SPLIT + sp) * 2)[:, None] * BG + gg[None, :]
            ms = tl.load(ml_ptr + mlo, mask=gm[None, :], other=float("-inf"), cache_modifier=".cg")
            ls = tl.load(ml_ptr + mlo + BG, mask=gm[None, :], other=0.0, cache_modifier=".cg")
            g_m = tl.max(ms, 0)
            g_safe = tl.where(g_m == float("-inf"), 0.0, g_m)
            w = tl.exp2(ms - g_safe[None, :])
            tot = tl.sum(w * ls, 0)
            o = tl.zeros([BG, D], tl.float32)
            for i in tl.static_range(SPLIT):
                wi = tl.sum(tl.where((sp == i)[:, None], w, 0.0), 0)
                a = tl.load(acc_ptr + ((row64 * SPLIT + i) * BG + gg)[:, None] * D + d[None, :], mask=gm[:, None],
                            other=0.0, cache_modifier=".cg")
                o += wi[:, None] * a
        o = tl.where(tot[:, None] > 0, o / tl.where(tot > 0, tot, 1.0)[:, None], 0.0)
        tl.store(out_row_ptr + gg[:, None] * soh + d[None, :] * sod, o.to(out_row_ptr.dtype.element_ty),
                 mask=gm[:, None])

    @triton.jit
    def _attend_tiles(q_ptr, sqb, sqh, sqd, k_ptr, v_ptr, valid_ptr, acc_ptr, ml_ptr, row64, b, h, split, scale_log2,
                      G: tl.constexpr, BG: tl.constexpr, D: tl.constexpr, S: tl.constexpr, BLOCK_N: tl.constexpr,
                      TILES: tl.constexpr, SPLIT: tl.constexpr):
        """Attention program ``split`` of a row of _attend_observe_kernel: its TILES tiles of the slots
        marked in ``valid``; the partial softmax result goes to ml / acc."""
        d = tl.arange(0, D)
        gg = tl.arange(0, BG)
        gm = gg < G
        q = tl.load(q_ptr + b * sqb + (h * G + gg)[:, None] * sqh + d[None, :] * sqd, mask=gm[:, None], other=0.0)
        q = q.to(k_ptr.dtype.element_ty)
        m_i = tl.full([BG], float("-inf"), tl.float32)
        l_i = tl.zeros([BG], tl.float32)
        acc = tl.zeros([BG, D], tl.float32)
        nn = tl.arange(0, BLOCK_N)
        for t in range(TILES):
            cols = (split * TILES + t) * BLOCK_N + nn
            inb = cols < S
            off = (row64 * S + cols)[:, None] * D + d[None, :]
            kt = tl.load(k_ptr + off, mask=inb[:, None], other=0.0)
            vt = tl.load(v_ptr + off, mask=inb[:, None], other=0.0)
            ok = tl.load(valid_ptr + row64 * S + cols, mask=inb, other=0) != 0
            m_i, l_i, acc = _softmax_tile(q, kt, vt, ok, m_i, l_i, acc, scale_log2)
        part = row64 * SPLIT + split
        tl.store(ml_ptr + (part * 2) * BG + gg, m_i)
        tl.store(ml_ptr + (part * 2 + 1) * BG + gg, l_i)
        tl.store(acc_ptr + (part * BG + gg)[:, None] * D + d[None, :], acc, mask=gm[:, None])

    @triton.jit
    def _attend_observe_kernel(
        q_ptr, sqb, sqh, sqd, k_ptr, v_ptr, valid_ptr,
        page_id_ptr, stamp_ptr, score_ptr, kmax_ptr, kmin_ptr, step_ptr, imp_ptr, count_ptr,
        acc_ptr, ml_ptr, out_ptr, sob, soh, sod, scale_log2,
        H: tl.constexpr, G: tl.constexpr, P: tl.constexpr, D: tl.constexpr, S: tl.constexpr,
        REFRESH: tl.constexpr, BLOCK_P: tl.constexpr, BG: tl.constexpr, BLOCK_N: tl.constexpr,
        TILES: tl.constexpr, SPLIT: tl.constexpr, PAGES: tl.constexpr, BP: tl.constexpr, BPC: tl.constexpr,
        DOT: tl.constexpr, OBSERVER: tl.constexpr,
    ):
        """Attention of the G query heads of one (sequence, KV head) row over the slots marked in
        ``valid`` (program (row, split) takes TILES tiles of BLOCK_N slots), and Quest's bounds of
        PAGES pages of the row; the program that finishes its row last combines the row's partial
        softmax results into the output and runs the top-k refresh (as in _observe_kernel).

        OBSERVER: program 0 of each row attends nothing and runs the row's whole observe (every
        bound, the top-k refresh: nothing in this kernel reads the stamps), programs 1..SPLIT
        attend, and the last program only combines."""
        row = tl.program_id(0)
        split = tl.program_id(1)
        b = row // H
        h = row % H
        # torch.compile passes a Python float argument as fp64: keep the softmax in fp32
        scale_log2 = tl.cast(scale_log2, tl.float32)
        row64 = row.to(tl.int64)
        base = row64 * P
        i = tl.arange(0, BLOCK_P)
        in_row = i < P
        if OBSERVER:
            if split == 0:  # the row's observer
                for c0 in tl.static_range(0, BP, BPC):
                    _bound_chunk(q_ptr, sqb, sqh, sqd, page_id_ptr, score_ptr, kmax_ptr, kmin_ptr, imp_ptr,
                                 b, h, base, c0, P, G, P, D, BPC, DOT)
                tl.debug_barrier()  # the row of bounds is complete
                a = tl.load(imp_ptr + base + i, mask=in_row, other=float("-inf"), cache_modifier=".cg")
                pid = tl.load(page_id_ptr + base + i, mask=in_row, other=-1)
                _refresh_top(a, pid, i, in_row, stamp_ptr, base, tl.load(step_ptr), P, REFRESH, BLOCK_P)
            else:
                _attend_tiles(q_ptr, sqb, sqh, sqd, k_ptr, v_ptr, valid_ptr, acc_ptr, ml_ptr, row64, b, h, split - 1,
                              scale_log2, G, BG, D, S, BLOCK_N, TILES, SPLIT)
        else:
            _attend_tiles(q_ptr, sqb, sqh, sqd, k_ptr, v_ptr, valid_ptr, acc_ptr, ml_ptr, row64, b, h, split,
                          scale_log2, G, BG, D, S, BLOCK_N, TILES, SPLIT)
            # this program's share of the observe: bounds of pages split*PAGES .. +PAGES (in chunks of
            # BPC pages; BP >= PAGES, the pages past the share masked)
            for c0 in tl.static_range(0, BP, BPC):
                _bound_chunk(q_ptr, sqb, sqh, sqd, page_id_ptr, score_ptr, kmax_ptr, kmin_ptr, imp_ptr,
                             b, h, base, split * PAGES + c0, split * PAGES + PAGES, G, P, D, BPC, DOT)

        NPROG: tl.constexpr = SPLIT + 1 if OBSERVER else SPLIT
        last = _last_of_row(count_ptr, row64, NPROG)
        if last:
            if not OBSERVER:
                a = tl.load(imp_ptr + base + i, mask=in_row, other=float("-inf"), cache_modifier=".cg")
                pid = tl.load(page_id_ptr + base + i, mask=in_row, other=-1)
            _combine_row(ml_ptr, acc_ptr, out_ptr + b * sob + h * G * soh, soh, sod, row64, G, BG, D, SPLIT)
            if not OBSERVER:
                _refresh_top(a, pid, i, in_row, stamp_ptr, base, tl.load(step_ptr), P, REFRESH, BLOCK_P)
            if NPROG > 1:
                tl.store(count_ptr + row64, 0)

    @triton.jit
    def _step_slot(pid, pinned_ptr, stamp_ptr, base, p, in_row, need, open_old, BLOCK_P: tl.constexpr):
        """The append's slot choice for a row whose page ids are ``pid`` [BLOCK_P] (``need``: the token
        opens a page): (slot, opened, write, has_free). A page opens in the first free slot, else in
        the slot of the unpinned page with the oldest stamp (ties: the lower page id); with neither
        the token is not written (overflow)."""
        pinned = tl.load(pinned_ptr + base + p, mask=in_row, other=0).to(tl.int1)
        stamp = tl.load(stamp_ptr + base + p, mask=in_row, other=0)
        resident = (pid >= 0) & in_row
        free = (pid < 0) & in_row
        has_free = tl.max(free.to(tl.int32), 0) > 0
        first_free = tl.min(tl.where(free, p, BLOCK_P), 0)
        evictable = resident & (pinned == 0)
        victim = tl.argmin(tl.where(evictable, stamp * 4294967296 + pid, _I64_MAX), 0)
        can_evict = tl.max(evictable.to(tl.int32), 0) > 0
        ok = has_free | can_evict
        opened = need & ok
        write = (need == 0) | ok
        slot = tl.where(opened, tl.where(has_free, first_free, victim).to(tl.int64), open_old)
        return slot, opened, write, has_free

    @triton.jit
    def _step_row_writes(kmax_ptr, kmin_ptr, evictions_ptr, overflow_ptr, valid_ptr, kv_num_ptr, kv_idx_ptr,
                         full_num_ptr, full_idx_ptr, row64, base, p, in_row, slot, pos, pid_new, new_max, new_min,
                         ev, opened, has_free, write, D: tl.constexpr, S: tl.constexpr, PS: tl.constexpr,
                         BLOCK_PS: tl.constexpr, KB: tl.constexpr, NB: tl.constexpr, BLOCK_KB: tl.constexpr,
                         BLOCK_NB: tl.constexpr, LISTS_IN_REGS: tl.constexpr, LEAN: tl.constexpr = False):
        """The append's writes of a row that the step's attention does not read: the overflow flag,
        the eviction counter, the written page's key bounds, the validity row (LEAN: its changed
        page) and the block lists."""
        d = tl.arange(0, D)
        tl.store(overflow_ptr, 1, mask=write == 0)
        tl.store(evictions_ptr + row64, ev + (opened & (has_free == 0)).to(tl.int64))
        tl.store(kmax_ptr + (base + slot) * D + d, new_max)
        tl.store(kmin_ptr + (base + slot) * D + d, new_min)
        n_p = tl.where(pid_new >= 0, tl.minimum(tl.maximum(pos + 1 - pid_new * PS, 0), PS), 0)
        _write_valid_lists(valid_ptr, kv_num_ptr, kv_idx_ptr, full_num_ptr, full_idx_ptr, row64, p, in_row,
                           n_p, S, PS, BLOCK_PS, KB, NB, BLOCK_KB, BLOCK_NB, LISTS_IN_REGS, slot, LEAN)

    @triton.jit
    def _load_q(q_ptr, sqb, sqh, sqd, b, h, dtype: tl.constexpr, G: tl.constexpr, BG: tl.constexpr, D: tl.constexpr):
        """The G query heads of KV head h of sequence b as [BG, D] in ``dtype`` (rows past G: 0)."""
        d = tl.arange(0, D)
        gg = tl.arange(0, BG)
        q = tl.load(q_ptr + b * sqb + (h * G + gg)[:, None] * sqh + d[None, :] * sqd, mask=(gg < G)[:, None],
                    other=0.0)
        return q.to(dtype)

    @triton.jit
    def _step_attend(q, k_ptr, v_ptr, page_id_ptr, acc_ptr, ml_ptr, row64, base, split,
                     kk, vv, pos, opened, slot, new_id, t, scale_log2,
                     G: tl.constexpr, BG: tl.constexpr, D: tl.constexpr, PS: tl.constexpr, S: tl.constexpr,
                     BLOCK_N: tl.constexpr, TILES: tl.constexpr, SPLIT: tl.constexpr):
        """The attention part of a raas step (see _step_kernel) for attention program ``split`` of
        its row, for the row's queries ``q`` [BG, D] (see _load_q): TILES tiles of the row as they
        will be after the append (the new token from registers, added by the program whose tiles
        hold slot t, which also writes it to the buffer); the partial softmax result goes to ml / acc."""
        d = tl.arange(0, D)
        gg = tl.arange(0, BG)
        gm = gg < G
        m_i = tl.full([BG], float("-inf"), tl.float32)
        l_i = tl.zeros([BG], tl.float32)
        acc = tl.zeros([BG, D], tl.float32)
        nn = tl.arange(0, BLOCK_N)
        for ti in range(TILES):
            cols = (split * TILES + ti) * BLOCK_N + nn
            inb = cols < S
            pc = cols // PS
            pidc = tl.load(page_id_ptr + base + pc, mask=inb, other=-1)
            pidc = tl.where(opened & (pc == slot), new_id, pidc)
            ncol = tl.where(pidc >= 0, tl.minimum(tl.maximum(pos + 1 - pidc * PS, 0), PS), 0)
            okc = inb & ((cols % PS) < ncol) & (cols != t)  # (slot t: the new token, added below)
            offs = (row64 * S + cols)[:, None] * D + d[None, :]
            kt = tl.load(k_ptr + offs, mask=inb[:, None], other=0.0)
            vt = tl.load(v_ptr + offs, mask=inb[:, None], other=0.0)
            m_i, l_i, acc = _softmax_tile(q, kt, vt, okc, m_i, l_i, acc, scale_log2)
        # the new token (slot t), from registers, in the program whose tiles hold slot t; that
        # program also writes it to the buffer (after an overflow the token overwrites the open
        # page's first slot, as in the append kernel). (Splicing it into the K/V tiles instead cost
        # about 90 registers per thread when compiled for sm_90.)
        own = (t // (TILES * BLOCK_N)) == split
        s_new = tl.sum(q.to(tl.float32) * kk.to(tl.float32)[None, :], 1) * scale_log2
        s_new = tl.where(own & gm, s_new, float("-inf"))
        m_new = tl.maximum(m_i, s_new)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p_new = tl.exp2(s_new - m_safe)
        l_i = l_i * alpha + p_new
        acc = acc * alpha[:, None] + p_new[:, None] * vv.to(tl.float32)[None, :]
        m_i = m_new
        part = row64 * SPLIT + split
        tl.store(ml_ptr + (part * 2) * BG + gg, m_i)
        tl.store(ml_ptr + (part * 2 + 1) * BG + gg, l_i)
        tl.store(acc_ptr + (part * BG + gg)[:, None] * D + d[None, :], acc, mask=gm[:, None])
        mine = (d * 0 + t // (TILES * BLOCK_N)) == split  # (a [D] mask: the interpreter wants no broadcast)
        tl.store(k_ptr + (row64 * S + t) * D + d, kk, mask=mine)
        tl.store(v_ptr + (row64 * S + t) * D + d, vv, mask=mine)


    @triton.jit
    def _step_kernel(
        q_ptr, sqb, sqh, sqd, kn_ptr, vn_ptr, skb, skh, skd, svb, svh, svd,
        k_ptr, v_ptr, page_id_ptr, stamp_ptr, pinned_ptr, score_ptr, kmax_ptr, kmin_ptr,
        open_slot_ptr, length_ptr, step_ptr, evictions_ptr, overflow_ptr, valid_ptr, ticket_ptr, count_ptr,
        kv_num_ptr, kv_idx_ptr, full_num_ptr, full_idx_ptr, imp_ptr,
        acc_ptr, ml_ptr, out_ptr, sob, soh, sod, scale_log2,
        B: tl.constexpr, H: tl.constexpr, G: tl.constexpr, P: tl.constexpr, D: tl.constexpr, PS: tl.constexpr,
        REFRESH: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_PS: tl.constexpr, BLOCK_B: tl.constexpr,
        BG: tl.constexpr, BLOCK_N: tl.constexpr, TILES: tl.constexpr, SPLIT: tl.constexpr, PAGES: tl.constexpr,
        BP: tl.constexpr, BPC: tl.constexpr, KB: tl.constexpr, NB: tl.constexpr, BLOCK_KB: tl.constexpr,
        BLOCK_NB: tl.constexpr, LISTS_IN_REGS: tl.constexpr, DOT: tl.constexpr, OBSERVER: tl.constexpr,
        LAZY: tl.constexpr, BSTAGES: tl.constexpr = 0, DIAG: tl.constexpr = 0, PREFETCH: tl.constexpr = 0,
        OPREFETCH: tl.constexpr = False, LEAN_WRITES: tl.constexpr = False, WRITER: tl.constexpr = False,
        ONLINE: tl.constexpr = False, EARLY: tl.constexpr = False, QFIRST: tl.constexpr = False,
        OLAST: tl.constexpr = False,
    ):
        """A whole raas decode step (append, attention, observe) for program (row, split).

        Every program of a row makes the append's decision itself, from the state before the step
        (slot, eviction, the written page's new key bounds), and attends over its TILES tiles of the
        row as they will be after the append (the new token from registers; the victim page's old
        tokens masked out). Its owner writes the new token to the buffer; each program computes
        Quest's bounds of PAGES pages. The program that finishes its row last (a per-row ticket,
        taken once every program of the row has read the old state) combines the output, writes
        the row's page-table entry, key bounds, open slot, counters, validity row and block lists,
        and refreshes the top REFRESH pages; the last row to finish advances lengths and step.

        OBSERVER: program 0 of each row (with OLAST, grid index SPLIT; the writer's index follows it)
        attends nothing; it computes all P bounds and the top-k set
        (stored to imp as 1/0) and makes the row writes the attention does not read (key bounds,
        counters, validity row, block lists), and programs 1..SPLIT attend. The last program then
        stores the page-table entry and the stamps of the set, so the bounds, the sort and most row
        writes leave the row's tail. The page table and stamps change only there, after every program
        of the row has read them for its decision.

        EARLY: every program takes the global ticket right after its loads of the lengths and the
        step, and the one that takes the last ticket advances them once its decision is made (see
        ATTEND_EARLY_TICKET); ONLINE: the combine's (see _combine_row)."""
        row = tl.program_id(0)
        split = tl.program_id(1)
        if OBSERVER and OLAST:  # grid index SPLIT is the observer (SPLIT + 1 the writer): dispatched last
            split = (split + 1 + WRITER) % (SPLIT + 1 + WRITER)
        b = row // H
        h = row % H
        # torch.compile passes a Python float argument as fp64: keep the softmax in fp32
        scale_log2 = tl.cast(scale_log2, tl.float32)
        S: tl.constexpr = P * PS
        row64 = row.to(tl.int64)
        base = row64 * P
        d = tl.arange(0, D)

        # -- L2 prefetch (a hint; see ATTEND_PREFETCH), issued before the decision's loads -------------
        if PREFETCH > 0:
            asplit = split - 1 - WRITER if OBSERVER else split
            if asplit >= 0:
                # the program's first min(PREFETCH, TILES) tiles (contiguous slots; none past the row)
                NPF: tl.constexpr = PREFETCH if PREFETCH < TILES else TILES
                SL: tl.constexpr = NPF * BLOCK_N if NPF * BLOCK_N < S else S
                ESZ: tl.constexpr = k_ptr.dtype.element_ty.primitive_bitwidth // 8
                first = tl.minimum(asplit * TILES * BLOCK_N, S - SL)
                _prefetch_l2(k_ptr + (row64 * S + first) * D, SL * D * ESZ)
                _prefetch_l2(v_ptr + (row64 * S + first) * D, SL * D * ESZ)
        if OPREFETCH and OBSERVER:
            if split == 0:
                BSZ: tl.constexpr = kmax_ptr.dtype.element_ty.primitive_bitwidth // 8
                _prefetch_l2(kmax_ptr + base * D, P * D * BSZ)
                _prefetch_l2(kmin_ptr + base * D, P * D * BSZ)

        # -- the append's decision (the same in every program of the row) -----------------------------
        # (with QFIRST, the queries' load is issued beside the decision's first loads: ATTEND_Q_FIRST;
        # ev is used by the row's last program; loaded here, off its tail)
        step_new, pos, open_old, ev, kk, vv, old_max, old_min, q_att = _append_inputs(
            kn_ptr, vn_ptr, skb, skh, skd, svb, svh, svd, k_ptr, v_ptr, kmax_ptr, kmin_ptr,
            open_slot_ptr, length_ptr, step_ptr, evictions_ptr, b, h, row64, base, D,
            q_ptr, sqb, sqh, sqd, G, BG, QFIRST)
        NPROG: tl.constexpr = SPLIT + 1 + WRITER if OBSERVER else SPLIT
        if EARLY and (DIAG & 32) == 0:
            # the global ticket, as soon as this program has read the lengths and the step (it reads
            # them nowhere else); every length is loaded here, for the program that takes the last
            # ticket. (That program advances them after the decision's loads, with predicated stores:
            # a branch on the ticket there, or any use of it at the program's end, cost sm_90 up to 238
            # registers instead of 128 at B=32 32/8 L=2048, triton 3.6.)
            bb = tl.arange(0, BLOCK_B)
            lens = tl.load(length_ptr + bb, mask=bb < B, other=0)
            tl.debug_barrier()
            if (DIAG & 16) == 0:
                ticket = tl.atomic_add(ticket_ptr, 1, sem="acq_rel")
            else:
                ticket = tl.atomic_add(ticket_ptr, 1, sem="relaxed")
        p = tl.arange(0, BLOCK_P)
        in_row = p < P
        pid = tl.load(page_id_ptr + base + p, mask=in_row, other=-1)
        off = pos % PS
        need = off == 0
        if LAZY:  # the page choice only when the token opens a page (one step in PS)
            if need:
                slot, opened, write, has_free = _step_slot(pid, pinned_ptr, stamp_ptr, base, p, in_row, need, open_old,
                                                           BLOCK_P)
            else:
                slot, opened, write, has_free = open_old, need, need == 0, need == 0
        else:
            slot, opened, write, has_free = _step_slot(pid, pinned_ptr, stamp_ptr, base, p, in_row, need, open_old,
                                                       BLOCK_P)
        new_id = pos // PS
        t = slot * PS + off
        kf = kk.to(tl.float32)
        new_max = tl.where(opened, kf, tl.where(write, tl.maximum(old_max, kf), old_max)).to(kmax_ptr.dtype.element_ty)
        new_min = tl.where(opened, kf, tl.where(write, tl.minimum(old_min, kf), old_min)).to(kmin_ptr.dtype.element_ty)

        # -- attention over this program's tiles, as after the append; Quest's bounds -----------------
        gg = tl.arange(0, BG)
        gm = gg < G
        pid_new = tl.where(opened & (p == slot), new_id, pid)
        if EARLY and (DIAG & 32) == 0:  # every program of the grid has read the lengths and the step
            final = (ticket + bb * 0) == B * H * NPROG - 1  # (as a vector: the interpreter's store masks)
            tl.store(length_ptr + bb, lens + 1, mask=(bb < B) & final)
            tl.store(step_ptr + bb * 0, step_new + bb * 0, mask=(bb == 0) & final)
            tl.store(ticket_ptr + bb * 0, bb * 0, mask=(bb == 0) & final)
        if OBSERVER:
            if split == 0:  # the row's observer: every page's bound and the top-k set (in imp, as 1/0)
                if (DIAG & 1) == 0:
                    _bound_loop(q_ptr, sqb, sqh, sqd, page_id_ptr, score_ptr, kmax_ptr, kmin_ptr, imp_ptr,
                                0, P, slot, opened, new_id, new_max, new_min, b, h, base, G, P, D, BP, BPC, DOT,
                                BSTAGES)
                if (DIAG & 2) == 0:
                    tl.debug_barrier()  # the row of bounds is complete
                    a = tl.load(imp_ptr + base + p, mask=in_row, other=float("-inf"), cache_modifier=".cg")
                    sel = _refresh_set(a, pid_new, p, in_row, P, REFRESH, BLOCK_P)
                    tl.debug_barrier()  # every thread has read the row before it is overwritten
                    tl.store(imp_ptr + base + p, sel.to(tl.float32), mask=in_row)
                if (DIAG & 4) == 0 and not WRITER:
                    # the row writes that no attention program reads (they read neither the key
                    # bounds, the counters nor the validity row and lists), off the row's tail
                    _step_row_writes(kmax_ptr, kmin_ptr, evictions_ptr, overflow_ptr, valid_ptr, kv_num_ptr,
                                     kv_idx_ptr, full_num_ptr, full_idx_ptr, row64, base, p, in_row, slot, pos,
                                     pid_new, new_max, new_min, ev, opened, has_free, write,
                                     D, S, PS, BLOCK_PS, KB, NB, BLOCK_KB, BLOCK_NB, LISTS_IN_REGS, LEAN_WRITES)
            elif WRITER and split == 1:  # the row's writer: those row writes, beside the observer
                if (DIAG & 4) == 0:
                    _step_row_writes(kmax_ptr, kmin_ptr, evictions_ptr, overflow_ptr, valid_ptr, kv_num_ptr,
                                     kv_idx_ptr, full_num_ptr, full_idx_ptr, row64, base, p, in_row, slot, pos,
                                     pid_new, new_max, new_min, ev, opened, has_free, write,
                                     D, S, PS, BLOCK_PS, KB, NB, BLOCK_KB, BLOCK_NB, LISTS_IN_REGS, LEAN_WRITES)
            else:
                if QFIRST:
                    q_use = q_att
                else:  # (a name of its own: q_att is 0 here, and this branch is not a constexpr one)
                    q_use = _load_q(q_ptr, sqb, sqh, sqd, b, h, k_ptr.dtype.element_ty, G, BG, D)
                _step_attend(q_use, k_ptr, v_ptr, page_id_ptr, acc_ptr, ml_ptr, row64, base,
                             split - 1 - WRITER, kk, vv, pos, opened, slot, new_id, t, scale_log2,
                             G, BG, D, PS, S, BLOCK_N, TILES, SPLIT)
        else:
            if not QFIRST:
                q_att = _load_q(q_ptr, sqb, sqh, sqd, b, h, k_ptr.dtype.element_ty, G, BG, D)
            _step_attend(q_att, k_ptr, v_ptr, page_id_ptr, acc_ptr, ml_ptr, row64, base,
                         split, kk, vv, pos, opened, slot, new_id, t, scale_log2,
                         G, BG, D, PS, S, BLOCK_N, TILES, SPLIT)
            # Quest's bound of this program's pages, as after the append (chunks of BPC pages)
            if (DIAG & 1) == 0:
                _bound_loop(q_ptr, sqb, sqh, sqd, page_id_ptr, score_ptr, kmax_ptr, kmin_ptr, imp_ptr,
                            split * PAGES, split * PAGES + PAGES, slot, opened, new_id, new_max, new_min, b, h, base,
                            G, P, D, BP, BPC, DOT, BSTAGES)

        # -- the last program of the row: output, the append's writes, the refresh ----------------------
        last = _last_of_row(count_ptr, row64, NPROG, (DIAG & 16) != 0)
        if last:
            # the row of bounds, or with OBSERVER its top-k set (every program's imp stores are
            # ordered before the ticket), loaded first so that its latency overlaps the combine's loads
            a = tl.load(imp_ptr + base + p, mask=in_row, other=float("-inf"), cache_modifier=".cg")
            if (DIAG & 8) == 0:
                _combine_row(ml_ptr, acc_ptr, out_ptr + b * sob + h * G * soh, soh, sod, row64, G, BG, D, SPLIT,
                             ONLINE)
            else:  # (the output's store without the combine: zeros)
                tl.store(out_ptr + b * sob + (h * G + gg)[:, None] * soh + d[None, :] * sod,
                         tl.zeros([BG, D], tl.float32).to(out_ptr.dtype.element_ty), mask=gm[:, None])

            if (DIAG & 4) == 0:
                if not OBSERVER:  # (with OBSERVER, the observer wrote these: see above)
                    _step_row_writes(kmax_ptr, kmin_ptr, evictions_ptr, overflow_ptr, valid_ptr, kv_num_ptr,
                                     kv_idx_ptr, full_num_ptr, full_idx_ptr, row64, base, p, in_row, slot, pos,
                                     pid_new, new_max, new_min, ev, opened, has_free, write,
                                     D, S, PS, BLOCK_PS, KB, NB, BLOCK_KB, BLOCK_NB, LISTS_IN_REGS, LEAN_WRITES)
                tl.store(page_id_ptr + base + slot, new_id, mask=opened)
                tl.store(stamp_ptr + base + slot, step_new, mask=opened)
                tl.store(pinned_ptr + base + slot, 0, mask=opened)
                tl.store(open_slot_ptr + row64, tl.where(write, slot, open_old))
            if (DIAG & 2) == 0:
                if OBSERVER:
                    tl.store(stamp_ptr + base + p, tl.zeros([BLOCK_P], tl.int64) + step_new, mask=in_row & (a != 0))
                else:
                    _refresh_top(a, pid_new, p, in_row, stamp_ptr, base, step_new, P, REFRESH, BLOCK_P)
            if NPROG > 1:
                tl.store(count_ptr + row64, 0)
            # the last row to finish advances the lengths and the step (every program has read them)
            if (DIAG & 32) == 0 and not EARLY:
                tl.debug_barrier()
                if (DIAG & 16) == 0:
                    done = tl.atomic_add(ticket_ptr, 1, sem="acq_rel")
                else:
                    done = tl.atomic_add(ticket_ptr, 1, sem="relaxed")
                if done == B * H - 1:
                    bb = tl.arange(0, BLOCK_B)
                    lens = tl.load(length_ptr + bb, mask=bb < B, other=0, cache_modifier=".cg")
                    tl.store(length_ptr + bb, lens + 1, mask=bb < B)
                    tl.store(step_ptr, step_new)
                    tl.store(ticket_ptr, 0)

    def _launch_append(k_new, v_new, k_cache, v_cache, page_id, stamp, pinned, score, kmax, kmin, open_slot,
                       length, step, evictions, overflow, valid, ticket, kv_num, kv_idx, full_num, full_idx,
                       policy, sink_pages, recent_pages, block, q=None, imp=None, refresh_pages=0):
        B, H, S, D = k_cache.shape
        P = page_id.shape[-1]
        ps = S // P
        nb = S // block
        observe = q is not None
        qq = q if observe else k_new  # (not read without OBSERVE)
        block_p = triton.next_power_of_2(P)
        wrap_triton(_append_kernel)[(B * H,)](
            k_new, v_new, k_new.stride(0), k_new.stride(1), k_new.stride(3),
            v_new.stride(0), v_new.stride(1), v_new.stride(3),
            k_cache, v_cache, page_id, stamp, pinned, score, kmax, kmin,
            open_slot, length, step, evictions, overflow, valid, ticket,
            kv_num, kv_idx, full_num, full_idx,
            qq, qq.stride(0), qq.stride(1), qq.stride(3), imp if observe else score,
            B=B, H=H, P=P, D=D, PS=ps,
            BLOCK_P=block_p, BLOCK_PS=triton.next_power_of_2(ps), BLOCK_B=triton.next_power_of_2(B),
            POLICY=policy, SINK_PAGES=sink_pages, RECENT_PAGES=recent_pages,
            KB=block, NB=nb, BLOCK_KB=triton.next_power_of_2(block), BLOCK_NB=triton.next_power_of_2(nb),
            LISTS_IN_REGS=triton.next_power_of_2(nb) * block_p <= LISTS_IN_REGS_MAX,
            OBSERVE=observe, G=(q.shape[1] // H) if observe else 1, REFRESH=refresh_pages,
            BPC=max(16, min(block_p, APPEND_BOUND_ELEMS // D)), DOT=BOUND_DOT,
            num_warps=APPEND_OBSERVE_WARPS if observe else 4,
        )

    @triton_op(
        "raas_flex::fused_append",
        mutates_args={"k_cache", "v_cache", "page_id", "stamp", "pinned", "score", "kmax", "kmin",
                      "open_slot", "length", "step", "evictions", "overflow", "valid", "ticket",
                      "kv_num", "kv_idx", "full_num", "full_idx"},
    )
    def fused_append(
        k_new: Tensor, v_new: Tensor,
        k_cache: Tensor, v_cache: Tensor, page_id: Tensor, stamp: Tensor, pinned: Tensor, score: Tensor,
        kmax: Tensor, kmin: Tensor, open_slot: Tensor, length: Tensor, step: Tensor, evictions: Tensor,
        overflow: Tensor, valid: Tensor, ticket: Tensor,
        kv_num: Tensor, kv_idx: Tensor, full_num: Tensor, full_idx: Tensor,
        policy: int, sink_pages: int, recent_pages: int, block: int,
    ) -> None:
        """Append one token per row (k_new, v_new: [B, Hkv, 1, D]); refresh ``valid`` and the exact
        flex block lists for KV blocks of ``block`` slots: kv_num/kv_idx (partial blocks) and
        full_num/full_idx (full blocks), laid out as masks.block_lists returns them. ``ticket`` is
        an int32 [1] counter that must be 0 at launch (the kernel leaves it 0)."""
        _launch_append(k_new, v_new, k_cache, v_cache, page_id, stamp, pinned, score, kmax, kmin, open_slot,
                       length, step, evictions, overflow, valid, ticket, kv_num, kv_idx, full_num, full_idx,
                       policy, sink_pages, recent_pages, block)

    @triton_op(
        "raas_flex::fused_append_observe",
        mutates_args={"k_cache", "v_cache", "page_id", "stamp", "pinned", "score", "kmax", "kmin",
                      "open_slot", "length", "step", "evictions", "overflow", "valid", "ticket",
                      "kv_num", "kv_idx", "full_num", "full_idx", "imp"},
    )
    def fused_append_observe(
        q: Tensor, k_new: Tensor, v_new: Tensor,
        k_cache: Tensor, v_cache: Tensor, page_id: Tensor, stamp: Tensor, pinned: Tensor, score: Tensor,
        kmax: Tensor, kmin: Tensor, open_slot: Tensor, length: Tensor, step: Tensor, evictions: Tensor,
        overflow: Tensor, valid: Tensor, ticket: Tensor,
        kv_num: Tensor, kv_idx: Tensor, full_num: Tensor, full_idx: Tensor, imp: Tensor,
        sink_pages: int, recent_pages: int, block: int, refresh_pages: int,
    ) -> None:
        """:func:`fused_append` (raas) and then, in the same program per row, the RaaS observe of
        q [B, Hq, 1, D] (Quest's bound over the row after the append, top ``refresh_pages``
        refreshed): the whole bookkeeping of a step in one launch. The observe needs nothing the
        attention computes, so doing it before the attention gives the state of the torch order
        (append, attend, observe). imp: fp32 [B, Hkv, P] scratch."""
        _launch_append(k_new, v_new, k_cache, v_cache, page_id, stamp, pinned, score, kmax, kmin, open_slot,
                       length, step, evictions, overflow, valid, ticket, kv_num, kv_idx, full_num, full_idx,
                       APPEND_POLICIES["raas"], sink_pages, recent_pages, block,
                       q=q, imp=imp, refresh_pages=refresh_pages)

    @triton_op("raas_flex::fused_observe", mutates_args={"stamp", "score", "imp", "count"})
    def fused_observe(
        q: Tensor, page_id: Tensor, stamp: Tensor, score: Tensor, kmax: Tensor, kmin: Tensor,
        step: Tensor, imp: Tensor, count: Tensor, refresh_pages: int,
    ) -> None:
        """RaaS observe with Quest's bound and top-k refresh for q [B, Hq, 1, D]; see module doc.

        imp: fp32 [B, Hkv, P] scratch. count: int32 [B * Hkv] per-row counters, 0 at launch (the
        kernel leaves them 0). Each row's pages are split over programs of OBSERVE_PAGES pages."""
        B, H, P, D = kmax.shape
        G = q.shape[1] // H
        block_p = triton.next_power_of_2(P)
        bp = max(16, min(block_p, max(OBSERVE_PAGES, 2048 // D)))  # (tl.dot needs >= 16)
        nsplit = -(-P // bp)
        wrap_triton(_observe_kernel)[(B * H, nsplit)](
            q, q.stride(0), q.stride(1), q.stride(3),
            page_id, stamp, score, kmax, kmin, step, imp, count,
            H=H, G=G, P=P, D=D, REFRESH=refresh_pages,
            BLOCK_P=block_p, BP=bp, NSPLIT=nsplit, DOT=OBSERVE_DOT,
            num_warps=4,
        )

    def _bound_plan(pages: int, D: int, observer: bool = False) -> tuple[int, int, bool]:
        """The bound loop of the attention kernels for ``pages`` pages per program: (BP, BPC, DOT), pages
        covered (a power of two >= pages), pages per chunk (a power of two) and whether the bounds are
        matrix products (then chunks of at least 16 pages, the pages past the program's share masked).
        An attention program's share: chunks of at most ATTEND_BOUND_ELEMS key-bound elements,
        ATTEND_BOUND_DOT. The observer's row (``observer``): one chunk when the row has at most
        ATTEND_OBSERVER_BOUND_ELEMS elements, else chunks of ATTEND_OBSERVER_CHUNK_ELEMS,
        ATTEND_OBSERVER_BOUND_DOT."""
        # (every knob checked, whichever plan is asked for)
        own_dot = _knob_bool("ATTEND_BOUND_DOT", ATTEND_BOUND_DOT)
        own = _knob_int("ATTEND_BOUND_ELEMS", ATTEND_BOUND_ELEMS, 1)
        obs_dot = _knob_bool("ATTEND_OBSERVER_BOUND_DOT", ATTEND_OBSERVER_BOUND_DOT)
        one = _knob_int("ATTEND_OBSERVER_BOUND_ELEMS", ATTEND_OBSERVER_BOUND_ELEMS, 1)
        chunk = _knob_int("ATTEND_OBSERVER_CHUNK_ELEMS", ATTEND_OBSERVER_CHUNK_ELEMS, 1)
        bp = triton.next_power_of_2(pages)
        if observer:
            dot, elems = obs_dot, (one if bp * D <= one else chunk)
        else:
            dot, elems = own_dot, own
        most = max(1, elems // D)
        bpc = min(bp, 1 << (most.bit_length() - 1))
        if dot:
            bp, bpc = max(bp, 16), max(bpc, 16)
        return bp, bpc, dot

    def _knob_bool(name: str, value) -> bool:
        """A True/False knob of this module, checked."""
        if value not in (True, False):
            raise ValueError(f"kernels.{name}={value!r} is not allowed; allowed: True or False")
        return bool(value)

    def _knob_int(name: str, value, least: int) -> int:
        """An int knob of this module (not a bool), at least ``least``, checked."""
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            raise ValueError(f"kernels.{name}={value!r} is not allowed; allowed: an int >= {least}")
        return value

    def observer_for(rows: int, split: int, sms: int | None, timed: bool = True) -> bool:
        """Whether the attention kernels run an observer program per row (ATTEND_OBSERVER, checked)
        for ``rows`` rows of ``split`` attention programs each on a device of ``sms`` SMs (None: CPU).
        None: on when rows * (split + 1) <= ATTEND_OBSERVER_MAX_PROGRAMS_PER_SM * sms (always on
        CPU). ``timed=False`` (the transformers path's fused_attend_observe, whose observer has not
        been timed on a GPU): no observer unless ATTEND_OBSERVER is True."""
        if ATTEND_OBSERVER is not None:
            return _knob_bool("ATTEND_OBSERVER", ATTEND_OBSERVER)
        if not timed:
            return False
        most = _knob_int("ATTEND_OBSERVER_MAX_PROGRAMS_PER_SM", ATTEND_OBSERVER_MAX_PROGRAMS_PER_SM, 0)
        return sms is None or rows * (split + 1) <= most * sms

    def _bound_stages() -> int:
        """ATTEND_BOUND_STAGES, checked (0: the unrolled bound loop)."""
        return _knob_int("ATTEND_BOUND_STAGES", ATTEND_BOUND_STAGES, 0)

    def _lazy_slot(observer: bool) -> bool:
        """ATTEND_LAZY_SLOT, checked; None follows the observer."""
        if ATTEND_LAZY_SLOT is None:
            return observer
        return _knob_bool("ATTEND_LAZY_SLOT", ATTEND_LAZY_SLOT)

    def device_sms(device: torch.device) -> int | None:
        """The SM count of a CUDA device; None elsewhere (the interpreter)."""
        if device.type == "cuda":
            return torch.cuda.get_device_properties(device).multi_processor_count
        return None

    def attend_stages(rows: int, G: int, step: bool = True) -> int:
        """Pipeline stages of the attention kernels' K/V tile loop: ATTEND_STAGES if set; else, in
        fused_step (``step``), 3 for rows of at least 7 query heads per KV head when there are at least
        128 rows, and 2 otherwise (fused_attend_observe: 2). H200, N=8192, 3 stages against 2 in
        one run each, us: B=32, 28/4 (128 rows of 7): L=1024 27.7 vs 29.2 (results/h200/decode_step_
        triton_l1024_split_h200), L=2048 45.4 vs 47.1, L=4096 81.6 vs 106.0 (decode_step_triton_
        stages3_h200; compiled for sm_90 with triton 3.6, 166 registers per thread against 185 at
        2 stages there, so three programs fit an SM instead of two). Slower or no faster elsewhere:
        B=8 28/4 (32 rows) 16.5 vs 16.3 at L=2048 and 42.0 vs 36.4 at 4096; B=8 32/8 16.0 vs 15.4
        at L=1024 and 48.7 vs 47.1 at 4096; B=32 32/8 (4 heads per row) 50.3 vs 48.1 at L=1024 and
        176.2 vs 166.8 at 4096 (decode_step_triton_stages3_3208_h200). A rule fitted to those 12
        points; other shapes get 2 unless they are as wide."""
        if ATTEND_STAGES is not None:
            return _knob_int("ATTEND_STAGES", ATTEND_STAGES, 1)
        return 3 if step and G >= 7 and rows >= 128 else 2

    def step_grid(rows: int, tiles: int, device: torch.device) -> tuple[int, bool]:
        """fused_step's programs per row and whether a row has an observer: :func:`attend_split`, then
        :func:`observer_for` on that split; with the observer and ATTEND_SPLIT None, at least
        ATTEND_OBSERVER_MIN_SPLIT attention programs per row (see :func:`split_for`)."""
        split = attend_split(rows, tiles, device)
        observer = observer_for(rows, split, device_sms(device))
        least = _knob_int("ATTEND_OBSERVER_MIN_SPLIT", ATTEND_OBSERVER_MIN_SPLIT, 1)
        if observer and ATTEND_SPLIT is None and split < least:
            split = split_for(rows, tiles, want=least)
        return split, observer

    def combine_online_for(split: int, observer: bool) -> bool:
        """Whether fused_step's combine merges rows of ``split`` parts online (ATTEND_COMBINE_ONLINE,
        checked; None: with the row's observer and from ATTEND_COMBINE_ONLINE_MIN_SPLIT parts)."""
        if ATTEND_COMBINE_ONLINE is None:
            least = _knob_int("ATTEND_COMBINE_ONLINE_MIN_SPLIT", ATTEND_COMBINE_ONLINE_MIN_SPLIT, 1)
            return observer and split >= least
        return _knob_bool("ATTEND_COMBINE_ONLINE", ATTEND_COMBINE_ONLINE)

    def observer_last_for(rows: int, nprog: int, observer: bool, sms: int | None) -> bool:
        """Whether fused_step's observers take the last grid indices of their rows of ``nprog``
        programs (ATTEND_OBSERVER_LAST, checked; None: with the observer, when rows * nprog is at most
        ATTEND_OBSERVER_LAST_MAX_PROGRAMS_PER_SM x ``sms``, the device's SMs; always on CPU)."""
        if ATTEND_OBSERVER_LAST is not None:
            return _knob_bool("ATTEND_OBSERVER_LAST", ATTEND_OBSERVER_LAST) and observer
        most = _knob_int("ATTEND_OBSERVER_LAST_MAX_PROGRAMS_PER_SM", ATTEND_OBSERVER_LAST_MAX_PROGRAMS_PER_SM, 0)
        return observer and (sms is None or rows * nprog <= most * sms)

    def row_writes_for(split: int, observer: bool) -> tuple[bool, bool]:
        """fused_step's row writes for rows of ``split`` attention programs (``observer``: with the
        row's observer): whether a writer program makes them (ATTEND_ROW_WRITER, checked; None: with
        the observer and at least ATTEND_ROW_WRITER_MIN_SPLIT programs), and whether they are lean
        (ATTEND_LEAN_ROW_WRITES, checked; None: unless the observer makes them itself)."""
        if ATTEND_ROW_WRITER is None:
            least = _knob_int("ATTEND_ROW_WRITER_MIN_SPLIT", ATTEND_ROW_WRITER_MIN_SPLIT, 1)
            writer = observer and split >= least
        else:
            writer = _knob_bool("ATTEND_ROW_WRITER", ATTEND_ROW_WRITER) and observer
        if ATTEND_LEAN_ROW_WRITES is None:
            lean = writer or not observer
        else:
            lean = _knob_bool("ATTEND_LEAN_ROW_WRITES", ATTEND_LEAN_ROW_WRITES)
        return writer, lean

    def attend_split(rows: int, tiles: int, device: torch.device) -> int:
        """Programs per row of the attention kernels: ATTEND_SPLIT if set, else :func:`split_for` with
        the device's SM count; 4 on CPU (the interpreter)."""
        if ATTEND_SPLIT is not None:
            return split_for(rows, tiles, want=ATTEND_SPLIT)
        sms = device_sms(device)
        if sms is not None:
            return split_for(rows, tiles, sms=sms)
        return split_for(rows, tiles, want=4)

    @triton_op("raas_flex::fused_attend_observe", mutates_args={"stamp", "score", "imp", "count"})
    def fused_attend_observe(
        q: Tensor, k_cache: Tensor, v_cache: Tensor, valid: Tensor, page_id: Tensor, stamp: Tensor, score: Tensor,
        kmax: Tensor, kmin: Tensor, step: Tensor, imp: Tensor, count: Tensor, scale: float, refresh_pages: int,
    ) -> Tensor:
        """Attention of q [B, Hq, 1, D] over the slots marked in ``valid`` [B * Hkv, S] of k_cache /
        v_cache [B, Hkv, S, D] (exact softmax, split over programs, combined by the last program of
        each row) together with the RaaS observe of q (Quest's bound, top ``refresh_pages`` refreshed),
        in one launch: the attention kernel of ``PagedKVCache.attention = "triton"``. Returns
        [B, Hq, 1, D] in q's dtype. imp: fp32 [B, Hkv, P] scratch; count: int32 [B * Hkv], 0 at launch
        (left 0)."""
        B, H, S, D = k_cache.shape
        P = page_id.shape[-1]
        G = q.shape[1] // H
        tiles = -(-S // ATTEND_BLOCK_N)
        split = attend_split(B * H, tiles, q.device)
        pages = -(-P // split)
        observer = observer_for(B * H, split, device_sms(q.device), timed=False)
        bp, bpc, dot = _bound_plan(P if observer else pages, D, observer)
        bg = max(16, triton.next_power_of_2(G))
        acc = torch.empty(B * H, split, bg, D, dtype=torch.float32, device=q.device)
        ml = torch.empty(B * H, split, 2, bg, dtype=torch.float32, device=q.device)
        out = torch.empty(B, H * G, 1, D, dtype=q.dtype, device=q.device)
        wrap_triton(_attend_observe_kernel)[(B * H, split + observer)](
            q, q.stride(0), q.stride(1), q.stride(3), k_cache, v_cache, valid,
            page_id, stamp, score, kmax, kmin, step, imp, count,
            acc, ml, out, out.stride(0), out.stride(1), out.stride(3), scale * 1.4426950408889634,
            H=H, G=G, P=P, D=D, S=S, REFRESH=refresh_pages, BLOCK_P=triton.next_power_of_2(P), BG=bg,
            BLOCK_N=ATTEND_BLOCK_N, TILES=-(-tiles // split), SPLIT=split, PAGES=pages,
            BP=bp, BPC=bpc, DOT=dot, OBSERVER=observer,
            num_warps=ATTEND_WARPS, num_stages=attend_stages(B * H, G, step=False),
        )
        return out

    @triton_op(
        "raas_flex::fused_step",
        mutates_args={"k_cache", "v_cache", "page_id", "stamp", "pinned", "score", "kmax", "kmin",
                      "open_slot", "length", "step", "evictions", "overflow", "valid", "ticket", "count",
                      "kv_num", "kv_idx", "full_num", "full_idx", "imp"},
    )
    def fused_step(
        q: Tensor, k_new: Tensor, v_new: Tensor,
        k_cache: Tensor, v_cache: Tensor, page_id: Tensor, stamp: Tensor, pinned: Tensor, score: Tensor,
        kmax: Tensor, kmin: Tensor, open_slot: Tensor, length: Tensor, step: Tensor, evictions: Tensor,
        overflow: Tensor, valid: Tensor, ticket: Tensor,
        kv_num: Tensor, kv_idx: Tensor, full_num: Tensor, full_idx: Tensor, imp: Tensor, count: Tensor,
        scale: float, refresh_pages: int, block: int,
    ) -> Tensor:
        """A whole raas decode step in one launch: :func:`fused_append_observe`'s state changes plus
        the attention of q [B, Hq, 1, D] over the row after the append (see _step_kernel). Returns
        [B, Hq, 1, D] in q's dtype. ``count`` and ``ticket``: zero at launch, left zero. (With
        ATTEND_DIAG set, parts of the step are skipped and the result is wrong: timing only.)"""
        if not isinstance(ATTEND_DIAG, int) or isinstance(ATTEND_DIAG, bool) or not 0 <= ATTEND_DIAG <= 63:
            raise ValueError(f"kernels.ATTEND_DIAG={ATTEND_DIAG!r} is not allowed; allowed: an int of bits 1, 2, 4, 8, 16, 32 "
                             "(0 to 63; 0, the default, runs the whole step)")
        B, H, S, D = k_cache.shape
        P = page_id.shape[-1]
        ps = S // P
        G = q.shape[1] // H
        nb = S // block
        block_p = triton.next_power_of_2(P)
        tiles = -(-S // ATTEND_BLOCK_N)
        split, observer = step_grid(B * H, tiles, q.device)
        pages = -(-P // split)
        bp, bpc, dot = _bound_plan(P if observer else pages, D, observer)
        # (checked everywhere; the interpreter has no PTX, and a prefetch changes nothing it computes)
        prefetch = _knob_int("ATTEND_PREFETCH", ATTEND_PREFETCH, 0)
        oprefetch = _knob_bool("ATTEND_OBSERVER_PREFETCH", ATTEND_OBSERVER_PREFETCH)
        if INTERPRET:
            prefetch, oprefetch = 0, False
        elif (prefetch or oprefetch) and q.device.type == "cuda":
            cap = torch.cuda.get_device_capability(q.device)
            if cap < (9, 0):
                raise ValueError(f"kernels.ATTEND_PREFETCH={prefetch!r} / ATTEND_OBSERVER_PREFETCH={oprefetch!r}: "
                                 f"the L2 prefetch needs sm_90 or newer (cp.async.bulk.prefetch), this GPU is "
                                 f"sm_{cap[0]}{cap[1]}; allowed there: 0 / False")
        bg = max(16, triton.next_power_of_2(G))
        acc = torch.empty(B * H, split, bg, D, dtype=torch.float32, device=q.device)
        ml = torch.empty(B * H, split, 2, bg, dtype=torch.float32, device=q.device)
        out = torch.empty(B, H * G, 1, D, dtype=q.dtype, device=q.device)
        writer, lean = row_writes_for(split, observer)
        wrap_triton(_step_kernel)[(B * H, split + observer + writer)](
            q, q.stride(0), q.stride(1), q.stride(3),
            k_new, v_new, k_new.stride(0), k_new.stride(1), k_new.stride(3),
            v_new.stride(0), v_new.stride(1), v_new.stride(3),
            k_cache, v_cache, page_id, stamp, pinned, score, kmax, kmin,
            open_slot, length, step, evictions, overflow, valid, ticket, count,
            kv_num, kv_idx, full_num, full_idx, imp,
            acc, ml, out, out.stride(0), out.stride(1), out.stride(3), scale * 1.4426950408889634,
            B=B, H=H, G=G, P=P, D=D, PS=ps, REFRESH=refresh_pages,
            BLOCK_P=block_p, BLOCK_PS=triton.next_power_of_2(ps), BLOCK_B=triton.next_power_of_2(B), BG=bg,
            BLOCK_N=ATTEND_BLOCK_N, TILES=-(-tiles // split), SPLIT=split, PAGES=pages,
            BP=bp, BPC=bpc,
            KB=block, NB=nb, BLOCK_KB=triton.next_power_of_2(block), BLOCK_NB=triton.next_power_of_2(nb),
            LISTS_IN_REGS=triton.next_power_of_2(nb) * block_p <= LISTS_IN_REGS_MAX, DOT=dot, OBSERVER=observer,
            LAZY=_lazy_slot(observer), BSTAGES=_bound_stages(), DIAG=ATTEND_DIAG,
            PREFETCH=prefetch, OPREFETCH=oprefetch,
            LEAN_WRITES=lean, WRITER=writer,
            ONLINE=combine_online_for(split, observer),
            EARLY=_knob_bool("ATTEND_EARLY_TICKET", ATTEND_EARLY_TICKET),
            QFIRST=_knob_bool("ATTEND_Q_FIRST", ATTEND_Q_FIRST),
            OLAST=observer_last_for(B * H, split + observer + writer, observer, device_sms(q.device)),
            num_warps=ATTEND_WARPS, num_stages=attend_stages(B * H, G),
        )
        return out
