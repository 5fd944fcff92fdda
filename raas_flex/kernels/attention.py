"""fused_step: a whole raas decode step (append, attention, observe) in one launch, laid out by
:func:`raas_flex.kernels.step_plan`."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op, wrap_triton

import raas_flex.kernels as _pkg

from . import BLOCK_N, WARPS, lists_in_regs, step_plan
from .bookkeeping import _STATE
from .rules import (append_inputs, bound_loop, choose_slot, finish_step, new_key_bounds, page_entry, page_tokens,
                    refresh_set, row_writes)


@triton.jit
def _last_of_row(count_ptr, row64, NPROG: tl.constexpr):
    """Whether this program is the last of its row's NPROG to get here: a barrier over its stores, then
    a per-row ticket (acq_rel: every other program's stores are seen by this one's later loads). The
    last program resets the count."""
    tl.debug_barrier()
    if NPROG == 1:
        last = True
    else:
        last = tl.atomic_add(count_ptr + row64, 1, sem="acq_rel") == NPROG - 1
    return last


@triton.jit
def _softmax_tile(q, kt, vt, ok, m_i, l_i, acc, scale_log2):
    """One KV tile of an online softmax (log2 domain): q [BG, D], kt/vt [BN, D], ok [BN] the attended
    slots; running max m_i, sum l_i [BG], accumulator acc [BG, D] fp32. fp32 K/V: exact products."""
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
def _combine_row(ml_ptr, acc_ptr, out_row_ptr, soh, sod, row64, G: tl.constexpr, BG: tl.constexpr,
                 D: tl.constexpr, SPLIT: tl.constexpr, ONLINE: tl.constexpr):
    """Combine a row's SPLIT partial softmax results (max and sum in ml, accumulators in acc) into its
    G output heads (zeros where nothing was attended). ONLINE: part after part, each part's max and
    sum loaded beside its accumulator; else all maxima and sums first, then one weighted sum."""
    gg = tl.arange(0, BG)
    gm = gg < G
    d = tl.arange(0, D)
    if ONLINE:
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
        w = tl.exp2(ms - tl.where(g_m == float("-inf"), 0.0, g_m)[None, :])
        tot = tl.sum(w * ls, 0)
        o = tl.zeros([BG, D], tl.float32)
        for i in tl.static_range(SPLIT):
            wi = tl.sum(tl.where((sp == i)[:, None], w, 0.0), 0)
            a = tl.load(acc_ptr + ((row64 * SPLIT + i) * BG + gg)[:, None] * D + d[None, :], mask=gm[:, None],
                        other=0.0, cache_modifier=".cg")
            o += wi[:, None] * a
    o = tl.where(tot[:, None] > 0, o / tl.where(tot > 0, tot, 1.0)[:, None], 0.0)
    tl.store(out_row_ptr + gg[:, None] * soh + d[None, :] * sod, o.to(out_row_ptr.dtype.element_ty), mask=gm[:, None])


@triton.jit
def _step_attend(q, k_ptr, v_ptr, page_id_ptr, acc_ptr, ml_ptr, row64, base, split, kk, vv, pos, opened, slot,
                 new_id, t, scale_log2, G: tl.constexpr, BG: tl.constexpr, D: tl.constexpr, PS: tl.constexpr,
                 S: tl.constexpr, BLOCK_N: tl.constexpr, TILES: tl.constexpr, SPLIT: tl.constexpr):
    """Attention program ``split`` of a row: its TILES tiles of the row as it is after the append (the
    victim page's old tokens masked out, the new token from registers, added and written to the buffer
    by the program whose tiles hold its slot ``t``); the partial result goes to ml / acc."""
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
        ncol = page_tokens(tl.where(opened & (pc == slot), new_id, pidc), pos, PS)
        okc = inb & ((cols % PS) < ncol) & (cols != t)
        offs = (row64 * S + cols)[:, None] * D + d[None, :]
        kt = tl.load(k_ptr + offs, mask=inb[:, None], other=0.0)
        vt = tl.load(v_ptr + offs, mask=inb[:, None], other=0.0)
        m_i, l_i, acc = _softmax_tile(q, kt, vt, okc, m_i, l_i, acc, scale_log2)
    own = (t // (TILES * BLOCK_N)) == split
    s_new = tl.sum(q.to(tl.float32) * kk.to(tl.float32)[None, :], 1) * scale_log2
    s_new = tl.where(own & gm, s_new, float("-inf"))
    m_new = tl.maximum(m_i, s_new)
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p_new = tl.exp2(s_new - m_safe)
    l_i = l_i * alpha + p_new
    acc = acc * alpha[:, None] + p_new[:, None] * vv.to(tl.float32)[None, :]
    part = row64 * SPLIT + split
    tl.store(ml_ptr + (part * 2) * BG + gg, m_new)
    tl.store(ml_ptr + (part * 2 + 1) * BG + gg, l_i)
    tl.store(acc_ptr + (part * BG + gg)[:, None] * D + d[None, :], acc, mask=gm[:, None])
    mine = (d * 0 + t // (TILES * BLOCK_N)) == split  # (a [D] mask: the interpreter wants no broadcast)
    tl.store(k_ptr + (row64 * S + t) * D + d, kk, mask=mine)
    tl.store(v_ptr + (row64 * S + t) * D + d, vv, mask=mine)


@triton.jit
def _step_kernel(
    q_ptr, sqb, sqh, sqd, kn_ptr, vn_ptr, skb, skh, skd, svb, svh, svd,
    k_ptr, v_ptr, page_id_ptr, stamp_ptr, pinned_ptr, score_ptr, kmax_ptr, kmin_ptr,
    open_slot_ptr, length_ptr, step_ptr, evictions_ptr, overflow_ptr, valid_ptr, ticket_ptr,
    kv_num_ptr, kv_idx_ptr, full_num_ptr, full_idx_ptr, imp_ptr, count_ptr,
    acc_ptr, ml_ptr, out_ptr, sob, soh, sod, scale_log2,
    B: tl.constexpr, H: tl.constexpr, G: tl.constexpr, P: tl.constexpr, D: tl.constexpr, PS: tl.constexpr,
    REFRESH: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_PS: tl.constexpr, BLOCK_B: tl.constexpr,
    BG: tl.constexpr, BLOCK_N: tl.constexpr, TILES: tl.constexpr, SPLIT: tl.constexpr, PAGES: tl.constexpr,
    BP: tl.constexpr, BPC: tl.constexpr, KB: tl.constexpr, NB: tl.constexpr, BLOCK_KB: tl.constexpr,
    BLOCK_NB: tl.constexpr, LISTS_IN_REGS: tl.constexpr, DOT: tl.constexpr, OBSERVER: tl.constexpr,
    LAZY: tl.constexpr, LEAN: tl.constexpr, WRITER: tl.constexpr, ONLINE: tl.constexpr, OLAST: tl.constexpr,
):
    """Program (row, split) of a raas step. Every program decides the append from the pre-step state.
    Without OBSERVER, program ``split`` attends its TILES tiles and bounds its PAGES pages; the row's
    last program (per-row ticket) combines the output, makes the row writes and the refresh. With
    OBSERVER, program 0 (OLAST: grid index SPLIT) bounds the whole row and stores the top-k set to imp
    as 1/0 and, without WRITER, makes the row writes the attention does not read; with WRITER program
    1 makes them; the others attend; the last program combines and writes the page-table entry and
    the stamps. The page table and stamps change only there, after every program has read them."""
    row = tl.program_id(0)
    split = tl.program_id(1)
    if OBSERVER and OLAST:  # the observer (and writer) take the row's last grid indices
        split = (split + 1 + WRITER) % (SPLIT + 1 + WRITER)
    b = row // H
    h = row % H
    scale_log2 = tl.cast(scale_log2, tl.float32)  # (torch.compile passes a Python float as fp64)
    S: tl.constexpr = P * PS
    row64 = row.to(tl.int64)
    base = row64 * P

    step_new, pos, open_old, ev, kk, vv, old_max, old_min, q = append_inputs(
        kn_ptr, vn_ptr, skb, skh, skd, svb, svh, svd, k_ptr, v_ptr, kmax_ptr, kmin_ptr,
        open_slot_ptr, length_ptr, step_ptr, evictions_ptr, b, h, row64, base, D, q_ptr, sqb, sqh, sqd, G, BG, True)
    NPROG: tl.constexpr = SPLIT + 1 + WRITER if OBSERVER else SPLIT
    p = tl.arange(0, BLOCK_P)
    in_row = p < P
    pid = tl.load(page_id_ptr + base + p, mask=in_row, other=-1)
    off = pos % PS
    need = off == 0
    if LAZY:  # the page choice only when the token opens a page
        if need:
            slot, opened, write, has_free = choose_slot(pid, p, in_row, need, open_old, pos, stamp_ptr, pinned_ptr,
                                                        score_ptr, base, 0, 0, 0, PS, BLOCK_P)
        else:
            slot, opened, write, has_free = open_old, need, need == 0, need == 0
    else:
        slot, opened, write, has_free = choose_slot(pid, p, in_row, need, open_old, pos, stamp_ptr, pinned_ptr,
                                                    score_ptr, base, 0, 0, 0, PS, BLOCK_P)
    new_id = pos // PS
    t = slot * PS + off
    new_max, new_min = new_key_bounds(kk, old_max, old_min, opened, write, kmax_ptr, kmin_ptr)
    pid_new = tl.where(opened & (p == slot), new_id, pid)

    if OBSERVER:
        if split == 0:  # the observer: every bound of the row, the top-k set (to imp as 1/0)
            bound_loop(q_ptr, sqb, sqh, sqd, page_id_ptr, score_ptr, kmax_ptr, kmin_ptr, imp_ptr, 0, P,
                       slot, opened, new_id, new_max, new_min, b, h, base, G, P, D, BP, BPC, DOT, False)
            tl.debug_barrier()  # the row of bounds is complete
            a = tl.load(imp_ptr + base + p, mask=in_row, other=float("-inf"), cache_modifier=".cg")
            sel = refresh_set(a, pid_new, p, in_row, P, REFRESH, BLOCK_P)
            tl.debug_barrier()  # every thread has read the row before it is overwritten
            tl.store(imp_ptr + base + p, sel.to(tl.float32), mask=in_row)
            if not WRITER:
                row_writes(kmax_ptr, kmin_ptr, evictions_ptr, overflow_ptr, valid_ptr, kv_num_ptr, kv_idx_ptr,
                           full_num_ptr, full_idx_ptr, row64, base, p, in_row, slot, pos, pid_new, new_max, new_min,
                           ev, opened, has_free, write, D, S, PS, BLOCK_PS, KB, NB, BLOCK_KB, BLOCK_NB,
                           LISTS_IN_REGS, LEAN)
        elif WRITER and split == 1:
            row_writes(kmax_ptr, kmin_ptr, evictions_ptr, overflow_ptr, valid_ptr, kv_num_ptr, kv_idx_ptr,
                       full_num_ptr, full_idx_ptr, row64, base, p, in_row, slot, pos, pid_new, new_max, new_min,
                       ev, opened, has_free, write, D, S, PS, BLOCK_PS, KB, NB, BLOCK_KB, BLOCK_NB,
                       LISTS_IN_REGS, LEAN)
        else:
            _step_attend(q, k_ptr, v_ptr, page_id_ptr, acc_ptr, ml_ptr, row64, base, split - 1 - WRITER, kk, vv,
                         pos, opened, slot, new_id, t, scale_log2, G, BG, D, PS, S, BLOCK_N, TILES, SPLIT)
    else:
        _step_attend(q, k_ptr, v_ptr, page_id_ptr, acc_ptr, ml_ptr, row64, base, split, kk, vv,
                     pos, opened, slot, new_id, t, scale_log2, G, BG, D, PS, S, BLOCK_N, TILES, SPLIT)
        bound_loop(q_ptr, sqb, sqh, sqd, page_id_ptr, score_ptr, kmax_ptr, kmin_ptr, imp_ptr,
                   split * PAGES, split * PAGES + PAGES, slot, opened, new_id, new_max, new_min, b, h, base,
                   G, P, D, BP, BPC, DOT, False)

    if _last_of_row(count_ptr, row64, NPROG):
        # the bounds, or the observer's top-k set, first: its latency overlaps the combine's loads
        a = tl.load(imp_ptr + base + p, mask=in_row, other=float("-inf"), cache_modifier=".cg")
        _combine_row(ml_ptr, acc_ptr, out_ptr + b * sob + h * G * soh, soh, sod, row64, G, BG, D, SPLIT, ONLINE)
        if not OBSERVER:
            row_writes(kmax_ptr, kmin_ptr, evictions_ptr, overflow_ptr, valid_ptr, kv_num_ptr, kv_idx_ptr,
                       full_num_ptr, full_idx_ptr, row64, base, p, in_row, slot, pos, pid_new, new_max, new_min,
                       ev, opened, has_free, write, D, S, PS, BLOCK_PS, KB, NB, BLOCK_KB, BLOCK_NB,
                       LISTS_IN_REGS, LEAN)
        page_entry(page_id_ptr, stamp_ptr, pinned_ptr, open_slot_ptr, row64, base, slot, new_id, step_new,
                   opened, write, open_old)
        if OBSERVER:
            sel = in_row & (a != 0)
        else:
            sel = refresh_set(a, pid_new, p, in_row, P, REFRESH, BLOCK_P)
        tl.store(stamp_ptr + base + p, tl.zeros([BLOCK_P], tl.int64) + step_new, mask=sel)
        if NPROG > 1:
            tl.store(count_ptr + row64, 0)
        finish_step(ticket_ptr, length_ptr, step_ptr, step_new, 0, B * H, B, BLOCK_B, True)


@triton_op("raas_flex::fused_step", mutates_args=_STATE | {"imp", "count"})
def fused_step(
    q: Tensor, k_new: Tensor, v_new: Tensor,
    k_cache: Tensor, v_cache: Tensor, page_id: Tensor, stamp: Tensor, pinned: Tensor, score: Tensor,
    kmax: Tensor, kmin: Tensor, open_slot: Tensor, length: Tensor, step: Tensor, evictions: Tensor,
    overflow: Tensor, valid: Tensor, ticket: Tensor, kv_num: Tensor, kv_idx: Tensor, full_num: Tensor,
    full_idx: Tensor, imp: Tensor, count: Tensor, scale: float, refresh_pages: int, block: int,
) -> Tensor:
    """A whole raas decode step in one launch: :func:`fused_append_observe`'s state changes and the
    attention of q [B, Hq, 1, D] over the row after the append; returns [B, Hq, 1, D] in q's dtype.
    ``count`` (int32 [B * Hkv]) and ``ticket`` (int32 [1]): 0 at launch, left 0."""
    B, H, S, D = k_cache.shape
    P = page_id.shape[-1]
    ps = S // P
    G = q.shape[1] // H
    nb = S // block
    plan = step_plan(B * H, S, P, G, D, _pkg.device_sms(q.device))
    bg = max(16, triton.next_power_of_2(G))
    acc = torch.empty(B * H, plan.split, bg, D, dtype=torch.float32, device=q.device)
    ml = torch.empty(B * H, plan.split, 2, bg, dtype=torch.float32, device=q.device)
    out = torch.empty(B, H * G, 1, D, dtype=q.dtype, device=q.device)
    wrap_triton(_step_kernel)[(B * H, plan.programs)](
        q, q.stride(0), q.stride(1), q.stride(3),
        k_new, v_new, k_new.stride(0), k_new.stride(1), k_new.stride(3),
        v_new.stride(0), v_new.stride(1), v_new.stride(3),
        k_cache, v_cache, page_id, stamp, pinned, score, kmax, kmin, open_slot, length, step, evictions, overflow,
        valid, ticket, kv_num, kv_idx, full_num, full_idx, imp, count,
        acc, ml, out, out.stride(0), out.stride(1), out.stride(3), scale * 1.4426950408889634,
        B=B, H=H, G=G, P=P, D=D, PS=ps, REFRESH=refresh_pages, BLOCK_P=triton.next_power_of_2(P),
        BLOCK_PS=triton.next_power_of_2(ps), BLOCK_B=triton.next_power_of_2(B), BG=bg, BLOCK_N=BLOCK_N,
        TILES=plan.tiles, SPLIT=plan.split, PAGES=plan.pages, BP=plan.bp, BPC=plan.bpc,
        KB=block, NB=nb, BLOCK_KB=triton.next_power_of_2(block), BLOCK_NB=triton.next_power_of_2(nb),
        LISTS_IN_REGS=lists_in_regs(nb, P), DOT=plan.dot, OBSERVER=plan.observer, LAZY=plan.lazy,
        LEAN=plan.lean, WRITER=plan.writer, ONLINE=plan.online, OLAST=plan.observers_last,
        num_warps=WARPS, num_stages=plan.stages,
    )
    return out
