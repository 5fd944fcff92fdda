"""fused_step: a whole raas, h2o or streaming decode step (append, attention, observe) in one launch, laid out
by :func:`raas_flex.kernels.step_plan`. Page importance from attention probabilities (raas
importance="attention", h2o) is summed per page by the attention programs in the same pass over K/V
that computes the output, and rescaled at the row's combine like the output accumulator.
paged_attend: the attention over the pages a policy picked (quest), read through its page list."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op, wrap_triton

import raas_flex.kernels as _pkg

from . import BLOCK_N, COMBINE_ONLINE_MIN_SPLIT, SHARE_COMBINE_ELEMS, WARPS, lists_in_regs, split_for, step_plan
from .bookkeeping import _STATE
from .rules import (append_inputs, bound_loop, choose_slot, finish_step, load_q, new_key_bounds, new_token,
                    page_entry, page_first, page_tokens, refresh_set, row_writes)

_LOG2E = 1.4426950408889634  # the kernels' softmax runs in base 2: scores times scale * log2(e)
LOG2E = tl.constexpr(_LOG2E)  # (the same, for the kernels)


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
def _softcap(s, CAP: tl.constexpr):
    """A layer's logit soft-capping, CAP * tanh(s / CAP), of finite scores s in the kernels' base-2 units
    (CAP: the layer's softcap times log2(e); 0: none, s returned as it is)."""
    if CAP > 0:
        s = CAP - 2.0 * CAP / (tl.exp2(s * (2.0 / CAP) * LOG2E) + 1.0)
    return s


@triton.jit
def _sink_logits(sink_ptr, h, G: tl.constexpr, BG: tl.constexpr, SINKS: tl.constexpr):
    """KV head h's query heads' sink logits [BG] in base 2 (-inf past G), from fp32 [Hkv, G]; without
    SINKS a placeholder that :func:`_combine_row` does not read."""
    gg = tl.arange(0, BG)
    if SINKS:
        return tl.load(sink_ptr + h * G + gg, mask=gg < G, other=float("-inf")) * LOG2E
    return tl.zeros([BG], tl.float32)


@triton.jit
def _softmax_tile(q, kt, vt, ok, m_i, l_i, acc, scale_log2, SOFTCAP: tl.constexpr):
    """One KV tile of an online softmax (log2 domain): q [BG, D], kt/vt [BN, D], ok [BN] the attended
    slots; running max m_i, sum l_i [BG], accumulator acc [BG, D] fp32; SOFTCAP: see :func:`_softcap`.
    fp32 K/V: exact products. Returns the new max, sum and accumulator, and the tile's probabilities
    [BG, BN] in units of exp2(score - new max)."""
    if kt.dtype == tl.float32:
        sc = tl.dot(q, tl.trans(kt), input_precision="ieee")
    else:
        sc = tl.dot(q, tl.trans(kt))
    sc = tl.where(ok[None, :], _softcap(sc * scale_log2, SOFTCAP), float("-inf"))
    m_new = tl.maximum(m_i, tl.max(sc, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    pr = tl.exp2(sc - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(pr, 1)
    if vt.dtype == tl.float32:
        pv = tl.dot(pr, vt, input_precision="ieee")
    else:
        pv = tl.dot(pr.to(vt.dtype), vt)
    return m_new, l_i, acc * alpha[:, None] + pv, pr


@triton.jit
def _store_part(ml_ptr, acc_ptr, part, m, l, acc, G: tl.constexpr, BG: tl.constexpr, D: tl.constexpr):
    """An attention program's partial result, part ``part`` (row * SPLIT + split): its max m and sum l
    [BG] to ml, the G heads' rows of its accumulator [BG, D] to acc (what _combine_row reads)."""
    gg = tl.arange(0, BG)
    tl.store(ml_ptr + (part * 2) * BG + gg, m)
    tl.store(ml_ptr + (part * 2 + 1) * BG + gg, l)
    tl.store(acc_ptr + (part * BG + gg)[:, None] * D + tl.arange(0, D)[None, :], acc, mask=(gg < G)[:, None])


@triton.jit
def _combine_row(ml_ptr, acc_ptr, out_row_ptr, soh, sod, row64, sink, G: tl.constexpr, BG: tl.constexpr,
                 D: tl.constexpr, SPLIT: tl.constexpr, ONLINE: tl.constexpr, SINKS: tl.constexpr):
    """Combine a row's SPLIT partial softmax results (max and sum in ml, accumulators in acc) into its
    G output heads (zeros where nothing was attended); returns the row's max and sum [BG]. ONLINE:
    part after part, each part's max and sum loaded beside its accumulator; else all maxima and sums
    first, then one weighted sum. SINKS: each head's sink logit ``sink`` [BG] (base 2; -inf past G)
    joins the max and the sum as a part of its own that adds no value."""
    gg = tl.arange(0, BG)
    gm = gg < G
    d = tl.arange(0, D)
    if ONLINE:
        if SINKS:
            m = sink
            tot = tl.where(sink > float("-inf"), 1.0, 0.0)
        else:
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
        m = tl.max(ms, 0)
        if SINKS:
            m = tl.maximum(m, sink)
        w = tl.exp2(ms - tl.where(m == float("-inf"), 0.0, m)[None, :])
        tot = tl.sum(w * ls, 0)
        if SINKS:
            tot += tl.exp2(sink - tl.where(m == float("-inf"), 0.0, m))
        o = tl.zeros([BG, D], tl.float32)
        for i in tl.static_range(SPLIT):
            wi = tl.sum(tl.where((sp == i)[:, None], w, 0.0), 0)
            a = tl.load(acc_ptr + ((row64 * SPLIT + i) * BG + gg)[:, None] * D + d[None, :], mask=gm[:, None],
                        other=0.0, cache_modifier=".cg")
            o += wi[:, None] * a
    o = tl.where(tot[:, None] > 0, o / tl.where(tot > 0, tot, 1.0)[:, None], 0.0)
    tl.store(out_row_ptr + gg[:, None] * soh + d[None, :] * sod, o.to(out_row_ptr.dtype.element_ty), mask=gm[:, None])
    return m, tot


@triton.jit
def _step_attend(q, k_ptr, v_ptr, page_id_ptr, acc_ptr, ml_ptr, psum_ptr, pm_ptr, row64, base, split, kk, vv, pos,
                 opened, slot, new_id, t, scale_log2, G: tl.constexpr, BG: tl.constexpr, D: tl.constexpr,
                 PS: tl.constexpr, S: tl.constexpr, BLOCK_N: tl.constexpr, TILES: tl.constexpr, SPLIT: tl.constexpr,
                 SHARES: tl.constexpr, UNIT: tl.constexpr, UT: tl.constexpr, TT: tl.constexpr, WINDOW: tl.constexpr,
                 SOFTCAP: tl.constexpr):
    """Attention program ``split`` of a row: its TILES tiles of the row as it is after the append (the
    victim page's old tokens masked out, the new token from registers, added and written to the buffer
    by the program whose tiles hold its slot ``t``), only tokens in the layer's window (WINDOW > 0),
    scores soft-capped (SOFTCAP, :func:`_softcap`); the partial result goes to ml / acc. SHARES: each
    tile's probability sums over units of UNIT slots (a page, or a tile's part of a page) go to psum
    [rows, BG, UT] in units of exp2(score - m_tile), the tile's running max m_tile to pm [rows, TT,
    BG]; the new token is left out of them (the combine adds it)."""
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
        if WINDOW > 0:  # (the page ids spelled out again: a shared local changed a plain layer's machine code)
            okc = okc & ((cols % PS) >= page_first(tl.where(opened & (pc == slot), new_id, pidc), pos, WINDOW, PS))
        offs = (row64 * S + cols)[:, None] * D + d[None, :]
        kt = tl.load(k_ptr + offs, mask=inb[:, None], other=0.0)
        vt = tl.load(v_ptr + offs, mask=inb[:, None], other=0.0)
        m_i, l_i, acc, pr = _softmax_tile(q, kt, vt, okc, m_i, l_i, acc, scale_log2, SOFTCAP)
        if SHARES:
            NPT: tl.constexpr = BLOCK_N // UNIT
            tile = split * TILES + ti
            uu = tile * NPT + tl.arange(0, NPT)
            tl.store(psum_ptr + (row64 * BG + gg[:, None]) * UT + uu[None, :],
                     tl.sum(tl.reshape(pr, [BG, NPT, UNIT]), 2), mask=gm[:, None])
            tl.store(pm_ptr + (row64 * TT + tile) * BG + gg, m_i)
    own = (t // (TILES * BLOCK_N)) == split
    s_new = _softcap(tl.sum(q.to(tl.float32) * kk.to(tl.float32)[None, :], 1) * scale_log2, SOFTCAP)
    s_new = tl.where(own & gm, s_new, float("-inf"))
    m_new = tl.maximum(m_i, s_new)
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p_new = tl.exp2(s_new - m_safe)
    l_i = l_i * alpha + p_new
    acc = acc * alpha[:, None] + p_new[:, None] * vv.to(tl.float32)[None, :]
    _store_part(ml_ptr, acc_ptr, row64 * SPLIT + split, m_new, l_i, acc, G, BG, D)
    mine = (d * 0 + t // (TILES * BLOCK_N)) == split  # (a [D] mask: the interpreter wants no broadcast)
    tl.store(k_ptr + (row64 * S + t) * D + d, kk, mask=mine)
    tl.store(v_ptr + (row64 * S + t) * D + d, vv, mask=mine)


@triton.jit
def _chunk_shares(psum_ptr, pm_ptr, row64, pp, in_p, m_safe, inv, p_new, slot, G: tl.constexpr, BG: tl.constexpr,
                  CP: tl.constexpr, NPT: tl.constexpr, UPP: tl.constexpr, UT: tl.constexpr, TT: tl.constexpr):
    """The attention share of the CP pages ``pp`` (``in_p``: in the row), max over the G query heads:
    each of a page's UPP units' partial sums rescaled from its tile's max to the row's (m_safe) and
    divided by the row's sum (inv = 1 / sum), exactly as the combine rescales the accumulators, plus
    the new token's probability p_new [BG] on its page ``slot``."""
    gg = tl.arange(0, BG)
    gm = gg < G
    uu = tl.reshape(pp[:, None] * UPP + tl.arange(0, UPP)[None, :], [CP * UPP])
    mask = gm[:, None] & tl.reshape(tl.broadcast_to(in_p[:, None], [CP, UPP]), [CP * UPP])[None, :]
    ps = tl.load(psum_ptr + (row64 * BG + gg[:, None]) * UT + uu[None, :], mask=mask, other=0.0, cache_modifier=".cg")
    mt = tl.load(pm_ptr + (row64 * TT + uu // NPT)[None, :] * BG + gg[:, None], mask=mask, other=float("-inf"),
                 cache_modifier=".cg")
    w = ps * tl.exp2(mt - m_safe[:, None])
    if UPP > 1:
        w = tl.sum(tl.reshape(w, [BG, CP, UPP]), 2)
    sh = w * inv[:, None] + tl.where((pp == slot)[None, :], p_new[:, None], 0.0)
    return tl.max(tl.where(gm[:, None], sh, float("-inf")), 0)


@triton.jit
def _share_observe(q, kk, psum_ptr, pm_ptr, page_id_ptr, stamp_ptr, score_ptr, imp_ptr, m, tot, row64, base, slot,
                   opened, new_id, step_new, threshold, scale_log2, P: tl.constexpr, G: tl.constexpr,
                   BG: tl.constexpr, BLOCK_P: tl.constexpr, CP: tl.constexpr, NPT: tl.constexpr, UPP: tl.constexpr,
                   UT: tl.constexpr, TT: tl.constexpr, OBSERVE: tl.constexpr, REFRESH: tl.constexpr,
                   SOFTCAP: tl.constexpr):
    """The observe of a row from its attention shares (the share of a page: the sum of its slots'
    softmax probabilities, max over the G query heads; :meth:`PagedKVCache.page_share`), given the
    row's combined max m and sum tot [BG]. OBSERVE 1 (raas, top-k): score = share, the REFRESH
    resident pages of largest share stamped (:func:`refresh_set`); 2 (raas, threshold): score =
    share, resident pages of share > threshold stamped; 3 (h2o): the share added to the score (an
    opened page's from 0). Pages are taken CP at a time; the top-k reads the row back from imp."""
    gg = tl.arange(0, BG)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    inv = tl.where(tot > 0, 1.0 / tl.where(tot > 0, tot, 1.0), 0.0)
    s_new = _softcap(tl.sum(q.to(tl.float32) * kk.to(tl.float32)[None, :], 1) * scale_log2, SOFTCAP)  # (as attended)
    p_new = tl.where(gg < G, tl.exp2(s_new - m_safe), 0.0) * inv
    for c0 in tl.static_range(0, BLOCK_P, CP):
        pp = c0 + tl.arange(0, CP)
        in_p = pp < P
        sh = _chunk_shares(psum_ptr, pm_ptr, row64, pp, in_p, m_safe, inv, p_new, slot, G, BG, CP, NPT, UPP, UT, TT)
        fresh = opened & (pp == slot)
        if OBSERVE == 3:
            old = tl.load(score_ptr + base + pp, mask=in_p, other=0.0)
            tl.store(score_ptr + base + pp, tl.where(fresh, 0.0, old) + sh, mask=in_p)
        else:
            resident = tl.where(fresh, new_id, tl.load(page_id_ptr + base + pp, mask=in_p, other=-1)) >= 0
            tl.store(score_ptr + base + pp, sh, mask=in_p)
            if OBSERVE == 2:
                tl.store(stamp_ptr + base + pp, tl.zeros([CP], tl.int64) + step_new,
                         mask=in_p & resident & (sh > threshold))
            else:
                tl.store(imp_ptr + base + pp, tl.where(resident, sh, float("-inf")), mask=in_p)
    if OBSERVE == 1:
        tl.debug_barrier()  # the row of shares is complete
        p = tl.arange(0, BLOCK_P)
        in_row = p < P
        a = tl.load(imp_ptr + base + p, mask=in_row, other=float("-inf"), cache_modifier=".cg")
        pid = tl.where(opened & (p == slot), new_id, tl.load(page_id_ptr + base + p, mask=in_row, other=-1))
        sel = refresh_set(a, pid, p, in_row, P, REFRESH, BLOCK_P)
        tl.store(stamp_ptr + base + p, tl.zeros([BLOCK_P], tl.int64) + step_new, mask=sel)


@triton.jit
def _step_kernel(
    q_ptr, sqb, sqh, sqd, kn_ptr, vn_ptr, skb, skh, skd, svb, svh, svd,
    k_ptr, v_ptr, page_id_ptr, stamp_ptr, pinned_ptr, score_ptr, kmax_ptr, kmin_ptr,
    open_slot_ptr, length_ptr, step_ptr, evictions_ptr, overflow_ptr, valid_ptr, ticket_ptr,
    kv_num_ptr, kv_idx_ptr, full_num_ptr, full_idx_ptr, imp_ptr, count_ptr,
    acc_ptr, ml_ptr, out_ptr, sob, soh, sod, scale_log2, psum_ptr, pm_ptr, threshold, sink_ptr,
    B: tl.constexpr, H: tl.constexpr, G: tl.constexpr, P: tl.constexpr, D: tl.constexpr, PS: tl.constexpr,
    POLICY: tl.constexpr, SINK_PAGES: tl.constexpr, RECENT_PAGES: tl.constexpr, OBSERVE: tl.constexpr,
    UNIT: tl.constexpr, UT: tl.constexpr,
    TT: tl.constexpr, CP: tl.constexpr, REFRESH: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_PS: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BG: tl.constexpr, BLOCK_N: tl.constexpr, TILES: tl.constexpr, SPLIT: tl.constexpr, PAGES: tl.constexpr,
    BP: tl.constexpr, BPC: tl.constexpr, KB: tl.constexpr, NB: tl.constexpr, BLOCK_KB: tl.constexpr,
    BLOCK_NB: tl.constexpr, LISTS_IN_REGS: tl.constexpr, DOT: tl.constexpr, OBSERVER: tl.constexpr,
    LAZY: tl.constexpr, LEAN: tl.constexpr, WRITER: tl.constexpr, ONLINE: tl.constexpr, OLAST: tl.constexpr,
    WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, SINKS: tl.constexpr,
):
    """Program (row, split) of a step under eviction rule POLICY (``Policy.append_code``: raas 0,
    streaming 1, h2o 2, dense 3) and observe OBSERVE (``Policy.step_observe``: 0 bound top-k, 1 share top-k, 2
    share threshold, 3 share added to the score, 4 none). Every program decides the append from the
    pre-step state. Without
    OBSERVER, program ``split`` attends its TILES tiles and (OBSERVE 0) bounds its PAGES pages; the
    row's last program (per-row ticket) combines the output, makes the row writes and the refresh.
    With OBSERVER, program 0 (OLAST: grid index SPLIT) makes the row writes the attention does not
    read unless WRITER (program 1) does, and with OBSERVE 0 first bounds the whole row and stores the
    top-k set to imp as 1/0; the others attend; the last program combines and writes the page-table
    entry, the stamps and (OBSERVE > 0) the shares' observe. The page table, stamps and scores change
    only there, after every program has read them."""
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

    step_new, pos, open_old, ev, old_max, old_min = append_inputs(
        kmax_ptr, kmin_ptr, open_slot_ptr, length_ptr, step_ptr, evictions_ptr, b, row64, base, D)
    kk, vv = new_token(kn_ptr, vn_ptr, skb, skh, skd, svb, svh, svd, b, h, k_ptr.dtype.element_ty, D)
    q = load_q(q_ptr, sqb, sqh, sqd, b, h, k_ptr.dtype.element_ty, G, BG, D)
    NPROG: tl.constexpr = SPLIT + 1 + WRITER if OBSERVER else SPLIT
    p = tl.arange(0, BLOCK_P)
    in_row = p < P
    pid = tl.load(page_id_ptr + base + p, mask=in_row, other=-1)
    off = pos % PS
    need = off == 0
    if LAZY:  # the page choice only when the token opens a page
        if need:
            slot, opened, write, has_free = choose_slot(pid, p, in_row, need, open_old, pos, stamp_ptr, pinned_ptr,
                                                        score_ptr, base, POLICY, SINK_PAGES, RECENT_PAGES, PS, BLOCK_P)
        else:
            slot, opened, write, has_free = open_old, need, need == 0, need == 0
    else:
        slot, opened, write, has_free = choose_slot(pid, p, in_row, need, open_old, pos, stamp_ptr, pinned_ptr,
                                                    score_ptr, base, POLICY, SINK_PAGES, RECENT_PAGES, PS, BLOCK_P)
    new_id = pos // PS
    t = slot * PS + off
    new_max, new_min = new_key_bounds(kk, old_max, old_min, opened, write, kmax_ptr, kmin_ptr)
    pid_new = tl.where(opened & (p == slot), new_id, pid)

    SHARES: tl.constexpr = (OBSERVE >= 1) & (OBSERVE <= 3)
    BOUNDS: tl.constexpr = OBSERVE == 0
    NPT: tl.constexpr = BLOCK_N // UNIT  # share units per tile
    UPP: tl.constexpr = PS // UNIT  # share units per page
    if OBSERVER:
        if split == 0:  # the observer: (bounds) every bound of the row, the top-k set (to imp as 1/0)
            if BOUNDS:
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
                           LISTS_IN_REGS, LEAN, WINDOW)
        elif WRITER and split == 1:
            row_writes(kmax_ptr, kmin_ptr, evictions_ptr, overflow_ptr, valid_ptr, kv_num_ptr, kv_idx_ptr,
                       full_num_ptr, full_idx_ptr, row64, base, p, in_row, slot, pos, pid_new, new_max, new_min,
                       ev, opened, has_free, write, D, S, PS, BLOCK_PS, KB, NB, BLOCK_KB, BLOCK_NB,
                       LISTS_IN_REGS, LEAN, WINDOW)
        else:
            _step_attend(q, k_ptr, v_ptr, page_id_ptr, acc_ptr, ml_ptr, psum_ptr, pm_ptr, row64, base,
                         split - 1 - WRITER, kk, vv, pos, opened, slot, new_id, t, scale_log2, G, BG, D, PS, S,
                         BLOCK_N, TILES, SPLIT, SHARES, UNIT, UT, TT, WINDOW, SOFTCAP)
    else:
        _step_attend(q, k_ptr, v_ptr, page_id_ptr, acc_ptr, ml_ptr, psum_ptr, pm_ptr, row64, base, split, kk, vv,
                     pos, opened, slot, new_id, t, scale_log2, G, BG, D, PS, S, BLOCK_N, TILES, SPLIT, SHARES, UNIT,
                     UT, TT, WINDOW, SOFTCAP)
        if BOUNDS:
            bound_loop(q_ptr, sqb, sqh, sqd, page_id_ptr, score_ptr, kmax_ptr, kmin_ptr, imp_ptr,
                       split * PAGES, split * PAGES + PAGES, slot, opened, new_id, new_max, new_min, b, h, base,
                       G, P, D, BP, BPC, DOT, False)

    if _last_of_row(count_ptr, row64, NPROG):
        if BOUNDS:  # the bounds, or the observer's top-k set, first: its latency overlaps the combine's loads
            a = tl.load(imp_ptr + base + p, mask=in_row, other=float("-inf"), cache_modifier=".cg")
        m, tot = _combine_row(ml_ptr, acc_ptr, out_ptr + b * sob + h * G * soh, soh, sod, row64,
                              _sink_logits(sink_ptr, h, G, BG, SINKS), G, BG, D, SPLIT, ONLINE, SINKS)
        if not OBSERVER:
            row_writes(kmax_ptr, kmin_ptr, evictions_ptr, overflow_ptr, valid_ptr, kv_num_ptr, kv_idx_ptr,
                       full_num_ptr, full_idx_ptr, row64, base, p, in_row, slot, pos, pid_new, new_max, new_min,
                       ev, opened, has_free, write, D, S, PS, BLOCK_PS, KB, NB, BLOCK_KB, BLOCK_NB,
                       LISTS_IN_REGS, LEAN, WINDOW)
        page_entry(page_id_ptr, stamp_ptr, pinned_ptr, open_slot_ptr, row64, base, slot, new_id, step_new,
                   opened, write, open_old)
        if SHARES:
            _share_observe(q, kk, psum_ptr, pm_ptr, page_id_ptr, stamp_ptr, score_ptr, imp_ptr, m, tot, row64, base,
                           slot, opened, new_id, step_new, tl.cast(threshold, tl.float32), scale_log2, P, G, BG,
                           BLOCK_P, CP, NPT, UPP, UT, TT, OBSERVE, REFRESH, SOFTCAP)
        elif BOUNDS:
            if OBSERVER:
                sel = in_row & (a != 0)
            else:
                sel = refresh_set(a, pid_new, p, in_row, P, REFRESH, BLOCK_P)
            tl.store(stamp_ptr + base + p, tl.zeros([BLOCK_P], tl.int64) + step_new, mask=sel)
        if NPROG > 1:
            tl.store(count_ptr + row64, 0)
        finish_step(ticket_ptr, length_ptr, step_ptr, step_new, 0, B * H, B, BLOCK_B, LOAD_LENS=True)


def _check_layer(H: int, G: int, window: int, softcap: float, sinks: Tensor | None) -> None:
    """The layer arguments of fused_step and paged_attend (ValueError naming the bad one)."""
    if not isinstance(window, int) or window < 0:
        raise ValueError(f"window must be an int >= 0 (0: none); got {window!r}")
    if not softcap >= 0:
        raise ValueError(f"softcap must be >= 0 (0: none); got {softcap!r}")
    if sinks is not None and (sinks.dtype != torch.float32 or tuple(sinks.shape) != (H, G)):
        raise ValueError(f"sinks must be fp32 [num_kv_heads={H}, {G}]; got {sinks.dtype} {tuple(sinks.shape)}")


@triton_op("raas_flex::fused_step", mutates_args=_STATE | {"imp", "count"})
def fused_step(
    q: Tensor, k_new: Tensor, v_new: Tensor,
    k_cache: Tensor, v_cache: Tensor, page_id: Tensor, stamp: Tensor, pinned: Tensor, score: Tensor,
    kmax: Tensor, kmin: Tensor, open_slot: Tensor, length: Tensor, step: Tensor, evictions: Tensor,
    overflow: Tensor, valid: Tensor, ticket: Tensor, kv_num: Tensor, kv_idx: Tensor, full_num: Tensor,
    full_idx: Tensor, imp: Tensor, count: Tensor, scale: float, refresh_pages: int, block: int,
    observe: int = 0, policy: int = 0, recent_pages: int = 0, threshold: float = 0.0, sink_pages: int = 0,
    window: int = 0, softcap: float = 0.0, sinks: Tensor | None = None,
) -> Tensor:
    """A whole decode step in one launch: :func:`fused_append`'s state changes under eviction rule
    ``policy`` (``Policy.append_code``: raas 0, streaming 1 with ``sink_pages``, h2o 2, dense 3), the attention of
    q [B, Hq, 1, D] over the row
    after the append, and the policy's observe ``observe`` (``Policy.step_observe``): 0 Quest's bound,
    the top ``refresh_pages`` stamped; 1 the attention share (of the same pass over K/V), top
    ``refresh_pages`` stamped; 2 the share, pages of share > ``threshold`` stamped; 3 the share added
    to the score (h2o, pages older than the ``recent_pages`` newest evictable); 4 none (streaming, dense).
    The layer's attention (``AttentionSpec``): ``window`` > 0 a sliding window of that many tokens (the
    validity row and lists hold the tokens in it), ``softcap`` > 0 its logit soft-capping, ``sinks``
    its sink logits (fp32 [Hkv, G]: they join each head's softmax denominator).
    Returns [B, Hq, 1, D]
    in q's dtype. ``count`` (int32 [B * Hkv]) and ``ticket`` (int32 [1]): 0 at launch, left 0.
    Shares need a page size that is a power of two."""
    B, H, S, D = k_cache.shape
    P = page_id.shape[-1]
    ps = S // P
    G = q.shape[1] // H
    nb = S // block
    if observe not in (0, 1, 2, 3, 4):
        raise ValueError(f"fused_step: observe={observe!r} is not supported; allowed: 0, 1, 2, 3, 4")
    if (policy, observe) not in ((0, 0), (0, 1), (0, 2), (2, 3), (1, 4), (3, 4)):
        raise ValueError(f"fused_step: policy={policy!r} with observe={observe!r} is not supported; allowed: "
                         "policy 0 (raas) with observe 0, 1 or 2, policy 2 (h2o) with observe 3, policy 1 "
                         "(streaming) or 3 (dense) with observe 4")
    _check_layer(H, G, window, softcap, sinks)
    shares = observe in (1, 2, 3)
    if shares and ps & (ps - 1):
        raise ValueError(f"fused_step: attention shares need a page size that is a power of two; got {ps}")
    plan = step_plan(B * H, S, P, G, D, _pkg.device_sms(q.device), bounds=observe == 0)
    bg = max(16, triton.next_power_of_2(G))
    acc = torch.empty(B * H, plan.split, bg, D, dtype=torch.float32, device=q.device)
    ml = torch.empty(B * H, plan.split, 2, bg, dtype=torch.float32, device=q.device)
    out = torch.empty(B, H * G, 1, D, dtype=q.dtype, device=q.device)
    # the attention shares' partial sums: units of min(page, tile) slots over the grid's tiles
    unit = min(ps, BLOCK_N) if shares else 1
    tt = plan.split * plan.tiles
    ut = tt * (BLOCK_N // unit) if shares else 1
    psum = torch.empty(B * H, bg, ut, dtype=torch.float32, device=q.device) if shares else ml
    pm = torch.empty(B * H, tt, bg, dtype=torch.float32, device=q.device) if shares else ml
    block_p = triton.next_power_of_2(P)
    upp = ps // unit
    cp = min(block_p, _pkg._pow2_floor(max(1, SHARE_COMBINE_ELEMS // (bg * upp))))
    wrap_triton(_step_kernel)[(B * H, plan.programs)](
        q, q.stride(0), q.stride(1), q.stride(3),
        k_new, v_new, k_new.stride(0), k_new.stride(1), k_new.stride(3),
        v_new.stride(0), v_new.stride(1), v_new.stride(3),
        k_cache, v_cache, page_id, stamp, pinned, score, kmax, kmin, open_slot, length, step, evictions, overflow,
        valid, ticket, kv_num, kv_idx, full_num, full_idx, imp, count,
        acc, ml, out, out.stride(0), out.stride(1), out.stride(3), scale * _LOG2E, psum, pm, threshold,
        ml if sinks is None else sinks,
        B=B, H=H, G=G, P=P, D=D, PS=ps, POLICY=policy, SINK_PAGES=sink_pages, RECENT_PAGES=recent_pages,
        OBSERVE=observe, UNIT=unit, UT=ut,
        TT=tt, CP=cp, REFRESH=refresh_pages, BLOCK_P=block_p,
        BLOCK_PS=triton.next_power_of_2(ps), BLOCK_B=triton.next_power_of_2(B), BG=bg, BLOCK_N=BLOCK_N,
        TILES=plan.tiles, SPLIT=plan.split, PAGES=plan.pages, BP=plan.bp, BPC=plan.bpc,
        KB=block, NB=nb, BLOCK_KB=triton.next_power_of_2(block), BLOCK_NB=triton.next_power_of_2(nb),
        LISTS_IN_REGS=lists_in_regs(nb, P), DOT=plan.dot, OBSERVER=plan.observer, LAZY=plan.lazy,
        LEAN=plan.lean and not window, WRITER=plan.writer, ONLINE=plan.online, OLAST=plan.observers_last,
        WINDOW=window, SOFTCAP=float(softcap) * _LOG2E, SINKS=sinks is not None, num_warps=WARPS,
        num_stages=plan.stages,
    )
    return out


@triton.jit
def _paged_kernel(q_ptr, sqb, sqh, sqd, k_ptr, v_ptr, page_id_ptr, length_ptr, kv_num_ptr, kv_idx_ptr, count_ptr,
                  acc_ptr, ml_ptr, out_ptr, sob, soh, sod, scale_log2, sink_ptr, H: tl.constexpr, G: tl.constexpr,
                  BG: tl.constexpr, P: tl.constexpr, D: tl.constexpr, PS: tl.constexpr, BLOCK_N: tl.constexpr,
                  TILES: tl.constexpr, SPLIT: tl.constexpr, ONLINE: tl.constexpr, SOFTCAP: tl.constexpr,
                  SINKS: tl.constexpr):
    """Program (row, split): the online softmax of the row's query heads over tiles split * TILES ..
    of the row's picked pages (the first kv_num slots of its list, each page's written tokens) laid
    end to end, BLOCK_N slots a tile, scores soft-capped (SOFTCAP); the row's last program combines
    the parts, with the heads' sink logits (SINKS)."""
    row = tl.program_id(0)
    split = tl.program_id(1)
    b = row // H
    h = row % H
    scale_log2 = tl.cast(scale_log2, tl.float32)
    S: tl.constexpr = P * PS
    row64 = row.to(tl.int64)
    base = row64 * P
    d = tl.arange(0, D)
    q = load_q(q_ptr, sqb, sqh, sqd, b, h, k_ptr.dtype.element_ty, G, BG, D)
    n = tl.load(kv_num_ptr + row64)
    pos = tl.load(length_ptr + b) - 1  # the newest token's position (the append is done)
    m_i = tl.full([BG], float("-inf"), tl.float32)
    l_i = tl.zeros([BG], tl.float32)
    acc = tl.zeros([BG, D], tl.float32)
    first = split * TILES
    last = tl.minimum(first + TILES, (n * PS + BLOCK_N - 1) // BLOCK_N)
    for ti in range(first, last):
        c = ti * BLOCK_N + tl.arange(0, BLOCK_N)  # slot of the picked pages laid end to end
        j = c // PS
        listed = j < n
        slot = tl.load(kv_idx_ptr + base + j, mask=listed, other=0)
        ok = listed & (c % PS < page_tokens(tl.load(page_id_ptr + base + slot, mask=listed, other=-1), pos, PS))
        offs = (row64 * S + slot * PS + c % PS)[:, None] * D + d[None, :]
        kt = tl.load(k_ptr + offs, mask=ok[:, None], other=0.0)
        vt = tl.load(v_ptr + offs, mask=ok[:, None], other=0.0)
        m_i, l_i, acc, _ = _softmax_tile(q, kt, vt, ok, m_i, l_i, acc, scale_log2, SOFTCAP)
    _store_part(ml_ptr, acc_ptr, row64 * SPLIT + split, m_i, l_i, acc, G, BG, D)
    if _last_of_row(count_ptr, row64, SPLIT):
        _combine_row(ml_ptr, acc_ptr, out_ptr + b * sob + h * G * soh, soh, sod, row64,
                     _sink_logits(sink_ptr, h, G, BG, SINKS), G, BG, D, SPLIT, ONLINE, SINKS)
        if SPLIT > 1:
            tl.store(count_ptr + row64, 0)


@triton_op("raas_flex::paged_attend", mutates_args={"count"})
def paged_attend(q: Tensor, k_cache: Tensor, v_cache: Tensor, page_id: Tensor, length: Tensor, kv_num: Tensor,
                 kv_idx: Tensor, count: Tensor, scale: float, budget_pages: int, softcap: float = 0.0,
                 sinks: Tensor | None = None) -> Tensor:
    """The attention of q [B, Hq, 1, D] over the pages :func:`pick_pages` chose (the first kv_num
    [B * Hkv] slots of each row's list kv_idx [B * Hkv, P], at most ``budget_pages``), each page's
    written tokens after the step's append (by ``length``), with the layer's ``softcap`` (> 0) and
    ``sinks`` (fp32 [Hkv, G]) as in :func:`fused_step`. Returns [B, Hq, 1, D] in q's dtype (zeros
    for a row with nothing picked and no sinks). ``count`` (int32 [B * Hkv]): 0 at launch, left 0."""
    B, H, S, D = k_cache.shape
    P = page_id.shape[-1]
    ps = S // P
    G = q.shape[1] // H
    _check_layer(H, G, 0, softcap, sinks)
    tiles = max(1, -(-min(budget_pages, P) * ps // BLOCK_N))
    split = split_for(B * H, tiles, _pkg.device_sms(q.device))
    bg = max(16, triton.next_power_of_2(G))
    acc = torch.empty(B * H, split, bg, D, dtype=torch.float32, device=q.device)
    ml = torch.empty(B * H, split, 2, bg, dtype=torch.float32, device=q.device)
    out = torch.empty(B, H * G, 1, D, dtype=q.dtype, device=q.device)
    wrap_triton(_paged_kernel)[(B * H, split)](
        q, q.stride(0), q.stride(1), q.stride(3), k_cache, v_cache, page_id, length, kv_num, kv_idx, count,
        acc, ml, out, out.stride(0), out.stride(1), out.stride(3), scale * _LOG2E, ml if sinks is None else sinks,
        H=H, G=G, BG=bg, P=P, D=D, PS=ps, BLOCK_N=BLOCK_N, TILES=-(-tiles // split), SPLIT=split,
        ONLINE=split >= COMBINE_ONLINE_MIN_SPLIT, SOFTCAP=float(softcap) * _LOG2E, SINKS=sinks is not None,
        num_warps=WARPS, num_stages=2,
    )
    return out
