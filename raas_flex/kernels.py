"""Hand-fused Triton kernels for the GPU bookkeeping of a decode step.

The torch code in :mod:`raas_flex.engine` and :mod:`raas_flex.policies` is the reference: it runs
everywhere and Inductor turns it into about fourteen small kernels per step. On CUDA the same state
changes are done here by two kernels, so that a RaaS step is

    fused_append   one program per (sequence, KV head) row: slot choice (first free page slot, else
                   the evictable page with the smallest key, ties to the lower slot), token write,
                   page-table entry of an opened page, key max/min row update, open slot, eviction
                   counter, overflow flag, the row of the slot-validity mask that flex's mask_mod
                   reads and exact flex block lists (full blocks skip mask_mod in the flex kernel);
                   the last program to finish advances ``length`` and ``step``
    flex_attention (unchanged)
    fused_observe  programs of OBSERVE_PAGES pages each: Quest's page bound (max over the query
                   heads of a KV head) and the score write; the last program of each row ranks the
                   row (stable descending rank, ties to the lower slot) and refreshes the stamps of
                   the top ``refresh_pages`` resident pages

Both are registered with :func:`torch.library.triton_op`, with every buffer they write declared in
``mutates_args``, so they run eagerly, inside ``torch.compile(fullgraph=True)`` graphs (Inductor
calls the kernels directly and orders them by their mutations) and under CUDA graphs. They launch a
fixed grid, allocate nothing and never synchronise with the host.

Coverage: the append kernel serves the bounded policies that attend to every resident page
(raas, streaming, h2o); the observe kernel serves raas with ``importance="bound"`` and
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


if HAS_TRITON:
    # (module-level constants a jitted kernel reads must be tl.constexpr)
    _I64_MAX = tl.constexpr(9223372036854775807)
    _F32_MAX = tl.constexpr(3.4028234663852886e38)

    @triton.jit
    def _append_kernel(
        kn_ptr, vn_ptr, skb, skh, skd, svb, svh, svd,
        k_ptr, v_ptr, page_id_ptr, stamp_ptr, pinned_ptr, score_ptr, kmax_ptr, kmin_ptr,
        open_slot_ptr, length_ptr, step_ptr, evictions_ptr, overflow_ptr, valid_ptr, ticket_ptr,
        kv_num_ptr, kv_idx_ptr, full_num_ptr, full_idx_ptr,
        B: tl.constexpr, H: tl.constexpr, P: tl.constexpr, D: tl.constexpr, PS: tl.constexpr,
        BLOCK_P: tl.constexpr, BLOCK_PS: tl.constexpr, BLOCK_B: tl.constexpr,
        POLICY: tl.constexpr, SINK_PAGES: tl.constexpr, RECENT_PAGES: tl.constexpr,
        KB: tl.constexpr, NB: tl.constexpr, BLOCK_KB: tl.constexpr, BLOCK_NB: tl.constexpr,
        LISTS_IN_REGS: tl.constexpr,
    ):
        row = tl.program_id(0)
        b = row // H
        h = row % H
        S: tl.constexpr = P * PS
        row64 = row.to(tl.int64)
        base = row64 * P
        d = tl.arange(0, D)

        # every load that does not depend on the slot choice is issued up front
        step_new = tl.load(step_ptr) + 1
        bb = tl.arange(0, BLOCK_B)
        lens = tl.load(length_ptr + bb, mask=bb < B, other=0)  # (the last program writes lens + 1)
        pos = tl.load(length_ptr + b)  # tokens written before this one
        open_old = tl.load(open_slot_ptr + row64)
        kk = tl.load(kn_ptr + b * skb + h * skh + d * skd).to(k_ptr.dtype.element_ty)
        vv = tl.load(vn_ptr + b * svb + h * svh + d * svd).to(v_ptr.dtype.element_ty)
        # key bounds of the open page: the row updated unless a page is opened (then overwritten)
        optr = (base + open_old) * D + d
        old_max = tl.load(kmax_ptr + optr).to(tl.float32)
        old_min = tl.load(kmin_ptr + optr).to(tl.float32)
        ev = tl.load(evictions_ptr + row64)
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
        tt = tl.arange(0, BLOCK_PS)
        vmask = in_row[:, None] & (tt[None, :] < PS)
        tl.store(valid_ptr + row64 * S + p[:, None] * PS + tt[None, :], tt[None, :] < n_p[:, None], mask=vmask)

        # exact block lists of the row for flex (same layout as masks.block_lists): blocks of KB
        # slots whose every slot is valid are "full" (the kernel skips mask_mod there), blocks with
        # some valid slots "partial"; listed blocks first, in order, then the others.
        nb = tl.arange(0, BLOCK_NB)
        in_nb = nb < NB
        if LISTS_IN_REGS:  # valid slots per block = overlap of [nb*KB, +KB) with each [p*PS, +n_p)
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
        BLOCK_P: tl.constexpr, BP: tl.constexpr, BJ: tl.constexpr, NSPLIT: tl.constexpr,
    ):
        row = tl.program_id(0)
        chunk = tl.program_id(1)
        b = row // H
        h = row % H
        row64 = row.to(tl.int64)
        base = row64 * P
        d = tl.arange(0, D)

        # Quest's bound for this program's BP pages: sum_d max(q_d M_d, q_d m_d) = q+ . M + q- . m,
        # max over the G query heads of this KV head; -inf for empty slots. Written to the scratch
        # row `imp` (the rank reads the whole row back) and, with nan_to_num, to `score`.
        pp = chunk * BP + tl.arange(0, BP)
        m = pp < P
        off2 = (base + pp)[:, None] * D + d[None, :]
        kmax = tl.load(kmax_ptr + off2, mask=m[:, None], other=0.0).to(tl.float32)
        kmin = tl.load(kmin_ptr + off2, mask=m[:, None], other=0.0).to(tl.float32)
        pidc = tl.load(page_id_ptr + base + pp, mask=m, other=-1)
        best = tl.full([BP], float("-inf"), tl.float32)
        for g in tl.static_range(G):
            qv = tl.load(q_ptr + b * sqb + (h * G + g) * sqh + d * sqd).to(tl.float32)
            s = tl.sum(tl.maximum(qv, 0.0)[None, :] * kmax + tl.minimum(qv, 0.0)[None, :] * kmin, 1)
            best = tl.maximum(best, s)
        imp = tl.where(pidc >= 0, best, float("-inf"))
        tl.store(imp_ptr + base + pp, imp, mask=m)
        sc = tl.where(imp != imp, 0.0, imp)
        sc = tl.where(sc == float("-inf"), 0.0, sc)
        sc = tl.where(sc == float("inf"), _F32_MAX, sc)
        tl.store(score_ptr + base + pp, sc, mask=m)

        # The program that finishes its row last ranks the row: its ticket (acq_rel, after a
        # barrier over this program's stores) orders every other program's scratch stores before
        # its reads, which bypass L1.
        tl.debug_barrier()
        if NSPLIT == 1:
            last = True
        else:
            ticket = tl.atomic_add(count_ptr + row64, 1, sem="acq_rel")
            last = ticket == NSPLIT - 1
        if last:
            # stable descending rank: pages with a larger bound, or an equal one at a lower slot,
            # come first; the top REFRESH resident pages get the current step as their stamp
            i = tl.arange(0, BLOCK_P)
            in_row = i < P
            a = tl.load(imp_ptr + base + i, mask=in_row, other=float("-inf"), cache_modifier=".cg")
            rank = tl.zeros([BLOCK_P], tl.int32)
            for j0 in range(0, BLOCK_P, BJ):
                j = j0 + tl.arange(0, BJ)
                bj = tl.load(imp_ptr + base + j, mask=j < P, other=float("-inf"), cache_modifier=".cg")
                before = (bj[None, :] > a[:, None]) | ((bj[None, :] == a[:, None]) & (j[None, :] < i[:, None]))
                before = before & (j[None, :] < P)
                rank += tl.sum(before.to(tl.int32), 1)
            pid = tl.load(page_id_ptr + base + i, mask=in_row, other=-1)
            refresh = (pid >= 0) & (rank < REFRESH) & in_row
            step_now = tl.load(step_ptr)
            tl.store(stamp_ptr + base + i, tl.zeros([BLOCK_P], tl.int64) + step_now, mask=refresh)
            if NSPLIT > 1:
                tl.store(count_ptr + row64, 0)

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
        B, H, S, D = k_cache.shape
        P = page_id.shape[-1]
        ps = S // P
        nb = S // block
        wrap_triton(_append_kernel)[(B * H,)](
            k_new, v_new, k_new.stride(0), k_new.stride(1), k_new.stride(3),
            v_new.stride(0), v_new.stride(1), v_new.stride(3),
            k_cache, v_cache, page_id, stamp, pinned, score, kmax, kmin,
            open_slot, length, step, evictions, overflow, valid, ticket,
            kv_num, kv_idx, full_num, full_idx,
            B=B, H=H, P=P, D=D, PS=ps,
            BLOCK_P=triton.next_power_of_2(P), BLOCK_PS=triton.next_power_of_2(ps), BLOCK_B=triton.next_power_of_2(B),
            POLICY=policy, SINK_PAGES=sink_pages, RECENT_PAGES=recent_pages,
            KB=block, NB=nb, BLOCK_KB=triton.next_power_of_2(block), BLOCK_NB=triton.next_power_of_2(nb),
            LISTS_IN_REGS=triton.next_power_of_2(nb) * triton.next_power_of_2(P) <= LISTS_IN_REGS_MAX,
            num_warps=4,
        )

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
        bp = min(block_p, max(OBSERVE_PAGES, 2048 // D))
        nsplit = -(-P // bp)
        bj = min(block_p, max(1, 2048 // block_p))  # rank tile [BLOCK_P, BJ] of <= 2048 pairs
        wrap_triton(_observe_kernel)[(B * H, nsplit)](
            q, q.stride(0), q.stride(1), q.stride(3),
            page_id, stamp, score, kmax, kmin, step, imp, count,
            H=H, G=G, P=P, D=D, REFRESH=refresh_pages,
            BLOCK_P=block_p, BP=bp, BJ=bj, NSPLIT=nsplit,
            num_warps=4,
        )
