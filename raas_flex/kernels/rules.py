"""The rules of a step, one @triton.jit implementation each, shared by every kernel: the append's
loads, slot choice and writes, Quest's page bound, the top-k refresh set, the validity row and the
flex block lists."""

from __future__ import annotations

import triton
import triton.language as tl

I64_MAX = tl.constexpr(9223372036854775807)
F32_MAX = tl.constexpr(3.4028234663852886e38)


@triton.jit
def load_q(q_ptr, sqb, sqh, sqd, b, h, dtype: tl.constexpr, G: tl.constexpr, BG: tl.constexpr, D: tl.constexpr):
    """The G query heads of KV head h of sequence b as [BG, D] in ``dtype`` (rows past G: 0)."""
    d = tl.arange(0, D)
    gg = tl.arange(0, BG)
    q = tl.load(q_ptr + b * sqb + (h * G + gg)[:, None] * sqh + d[None, :] * sqd, mask=(gg < G)[:, None], other=0.0)
    return q.to(dtype)


@triton.jit
def new_token(kn_ptr, vn_ptr, skb, skh, skd, svb, svh, svd, b, h, dtype: tl.constexpr, D: tl.constexpr):
    """The new key and value of row (b, h), in the cache dtype ``dtype``. Loaded in a call of their own,
    apart from :func:`append_inputs`: Inductor's analysis of what a user kernel writes counts a call's
    results as derived from every argument of the call, so a store addressed through the position would
    mark the step's inputs written (and the model's copy of the key into ``k_new`` would wait for the
    step in a launch of its own)."""
    d = tl.arange(0, D)
    kk = tl.load(kn_ptr + b * skb + h * skh + d * skd).to(dtype)
    vv = tl.load(vn_ptr + b * svb + h * svh + d * svd).to(dtype)
    return kk, vv


@triton.jit
def append_inputs(kmax_ptr, kmin_ptr, open_slot_ptr, length_ptr, step_ptr, evictions_ptr, b, row64, base,
                  D: tl.constexpr):
    """The append's loads that do not depend on the slot choice, for row ``row64`` of sequence b (the
    new token itself: :func:`new_token`): the new step, the token's position, the open slot, the
    eviction count and the open page's key bounds (fp32)."""
    d = tl.arange(0, D)
    step_new = tl.load(step_ptr) + 1
    pos = tl.load(length_ptr + b)
    open_old = tl.load(open_slot_ptr + row64)
    ev = tl.load(evictions_ptr + row64)
    optr = (base + open_old) * D + d
    old_max = tl.load(kmax_ptr + optr).to(tl.float32)
    old_min = tl.load(kmin_ptr + optr).to(tl.float32)
    return step_new, pos, open_old, ev, old_max, old_min


@triton.jit
def choose_slot(pid, p, in_row, need, open_old, pos, stamp_ptr, pinned_ptr, score_ptr, base,
                POLICY: tl.constexpr, SINK_PAGES: tl.constexpr, RECENT_PAGES: tl.constexpr, PS: tl.constexpr,
                BLOCK_P: tl.constexpr):
    """The token's page slot for a row of page ids ``pid`` (``need``: the token opens a page): the
    first free slot, else the evictable page with the smallest key (ties: the lower slot). POLICY 0
    raas: unpinned pages, key (stamp, page id); 1 streaming: unpinned pages past SINK_PAGES, key page
    id; 2 h2o: unpinned pages older than the RECENT_PAGES newest, key score; 3 dense: none (a full
    buffer overflows). Returns (slot, opened, write, has_free); ``write`` is False when no slot can be
    found (overflow)."""
    pinned = tl.load(pinned_ptr + base + p, mask=in_row, other=0).to(tl.int1)
    resident = (pid >= 0) & in_row
    free = (pid < 0) & in_row
    has_free = tl.max(free.to(tl.int32), 0) > 0
    first_free = tl.min(tl.where(free, p, BLOCK_P), 0)
    evictable = resident & (pinned == 0)
    if POLICY == 0:
        stamp = tl.load(stamp_ptr + base + p, mask=in_row, other=0)
        victim = tl.argmin(tl.where(evictable, stamp * 4294967296 + pid, I64_MAX), 0)
    elif POLICY == 1:
        evictable = evictable & (pid >= SINK_PAGES)
        victim = tl.argmin(tl.where(evictable, pid, I64_MAX), 0)
    elif POLICY == 3:
        evictable = evictable & (pid < 0)  # nothing
        victim = open_old
    else:  # (padding past P carries +inf, so a real slot wins a tie with it)
        evictable = evictable & (pid <= pos // PS - RECENT_PAGES)
        sc = tl.load(score_ptr + base + p, mask=in_row, other=0.0)
        victim = tl.argmin(tl.where(in_row, tl.where(evictable, sc, F32_MAX), float("inf")), 0)
    ok = has_free | (tl.max(evictable.to(tl.int32), 0) > 0)
    opened = need & ok
    write = (need == 0) | ok
    slot = tl.where(opened, tl.where(has_free, first_free, victim).to(tl.int64), open_old)
    return slot, opened, write, has_free


@triton.jit
def new_key_bounds(kk, old_max, old_min, opened, write, kmax_ptr, kmin_ptr):
    """The written page's key max/min after the token (a new page: the key itself), in the tables' dtype."""
    kf = kk.to(tl.float32)
    new_max = tl.where(opened, kf, tl.where(write, tl.maximum(old_max, kf), old_max))
    new_min = tl.where(opened, kf, tl.where(write, tl.minimum(old_min, kf), old_min))
    return new_max.to(kmax_ptr.dtype.element_ty), new_min.to(kmin_ptr.dtype.element_ty)


@triton.jit
def page_tokens(pid, pos, PS: tl.constexpr):
    """Written tokens of pages ``pid`` once the token at position ``pos`` is in (empty slots: 0)."""
    return tl.where(pid >= 0, tl.minimum(tl.maximum(pos + 1 - pid * PS, 0), PS), 0)


@triton.jit
def page_first(pid, pos, WINDOW: tl.constexpr, PS: tl.constexpr):
    """The first slot of pages ``pid`` inside a sliding window of WINDOW tokens that ends at the token at
    position ``pos`` (a query sees the WINDOW newest tokens, itself included). WINDOW > 0."""
    return tl.minimum(tl.maximum(pos + 1 - WINDOW - pid * PS, 0), PS)


@triton.jit
def page_entry(page_id_ptr, stamp_ptr, pinned_ptr, open_slot_ptr, row64, base, slot, new_id, step_new,
               opened, write, open_old):
    """The page-table entry of an opened page and the row's open slot."""
    tl.store(page_id_ptr + base + slot, new_id, mask=opened)
    tl.store(stamp_ptr + base + slot, step_new, mask=opened)
    tl.store(pinned_ptr + base + slot, 0, mask=opened)
    tl.store(open_slot_ptr + row64, tl.where(write, slot, open_old))


@triton.jit
def token_writes(k_ptr, v_ptr, score_ptr, row64, base, slot, off, kk, vv, opened, S: tl.constexpr, PS: tl.constexpr,
                 D: tl.constexpr):
    """The token's K and V at offset ``off`` of page slot ``slot`` (after an overflow it overwrites the
    open page's first slot, as in torch) and an opened page's score reset to 0."""
    d = tl.arange(0, D)
    t = slot * PS + off
    tl.store(k_ptr + (row64 * S + t) * D + d, kk)
    tl.store(v_ptr + (row64 * S + t) * D + d, vv)
    tl.store(score_ptr + base + slot, 0.0, mask=opened)


@triton.jit
def table_writes(kmax_ptr, kmin_ptr, evictions_ptr, overflow_ptr, row64, base, slot, new_max, new_min, ev, opened,
                 has_free, write, D: tl.constexpr):
    """The append's table writes that no attention reads: the overflow flag, the eviction count and the
    written page's key bounds."""
    d = tl.arange(0, D)
    tl.store(overflow_ptr, 1, mask=write == 0)
    tl.store(evictions_ptr + row64, ev + (opened & (has_free == 0)).to(tl.int64))
    tl.store(kmax_ptr + (base + slot) * D + d, new_max)
    tl.store(kmin_ptr + (base + slot) * D + d, new_min)


@triton.jit
def row_writes(kmax_ptr, kmin_ptr, evictions_ptr, overflow_ptr, valid_ptr, kv_num_ptr, kv_idx_ptr,
               full_num_ptr, full_idx_ptr, row64, base, p, in_row, slot, pos, pid_new, new_max, new_min,
               ev, opened, has_free, write, D: tl.constexpr, S: tl.constexpr, PS: tl.constexpr,
               BLOCK_PS: tl.constexpr, KB: tl.constexpr, NB: tl.constexpr, BLOCK_KB: tl.constexpr,
               BLOCK_NB: tl.constexpr, LISTS_IN_REGS: tl.constexpr, LEAN: tl.constexpr, WINDOW: tl.constexpr):
    """The append's writes that no attention reads: :func:`table_writes`, then the validity row and the
    block lists (:func:`write_valid_lists`), of the tokens in the layer's window (WINDOW > 0; 0: none)."""
    table_writes(kmax_ptr, kmin_ptr, evictions_ptr, overflow_ptr, row64, base, slot, new_max, new_min, ev, opened,
                 has_free, write, D)
    n_p = page_tokens(pid_new, pos, PS)
    f_p = page_first(pid_new, pos, WINDOW, PS) if WINDOW > 0 else n_p
    write_valid_lists(valid_ptr, kv_num_ptr, kv_idx_ptr, full_num_ptr, full_idx_ptr, row64, p, in_row, n_p, f_p,
                      S, PS, BLOCK_PS, KB, NB, BLOCK_KB, BLOCK_NB, LISTS_IN_REGS, slot, LEAN, WINDOW)


@triton.jit
def write_valid_lists(valid_ptr, kv_num_ptr, kv_idx_ptr, full_num_ptr, full_idx_ptr, row64, p, in_row, n_p, f_p,
                      S: tl.constexpr, PS: tl.constexpr, BLOCK_PS: tl.constexpr, KB: tl.constexpr, NB: tl.constexpr,
                      BLOCK_KB: tl.constexpr, BLOCK_NB: tl.constexpr, LISTS_IN_REGS: tl.constexpr, slot,
                      LEAN: tl.constexpr, WINDOW: tl.constexpr):
    """Row ``row64`` of the slot-validity mask (the first n_p[p] slots of page slot p are valid; with a
    window, WINDOW > 0, only those from slot f_p[p] on) and its exact flex block lists (layout of
    masks.block_lists: full blocks, partial blocks, listed first in order). LEAN (never with a window,
    which moves every step): only page slot ``slot`` of the row is stored (the row was right before
    the step), and where blocks are whole pages a block's count is the sum of its pages' n_p. Else the
    count is the overlap of blocks and pages (LISTS_IN_REGS) or read back from the stored row."""
    tl.static_assert(not (LEAN and WINDOW > 0), "lean row writes cannot follow a sliding window")
    tt = tl.arange(0, BLOCK_PS)
    if LEAN:
        n_slot = tl.sum(tl.where(p == slot, n_p, 0), 0)
        tl.store(valid_ptr + row64 * S + slot * PS + tt, tt < n_slot, mask=tt < PS)
    elif WINDOW > 0:
        tl.store(valid_ptr + row64 * S + p[:, None] * PS + tt[None, :],
                 (tt[None, :] >= f_p[:, None]) & (tt[None, :] < n_p[:, None]),
                 mask=in_row[:, None] & (tt[None, :] < PS))
    else:
        tl.store(valid_ptr + row64 * S + p[:, None] * PS + tt[None, :], tt[None, :] < n_p[:, None],
                 mask=in_row[:, None] & (tt[None, :] < PS))
    nb = tl.arange(0, BLOCK_NB)
    in_nb = nb < NB
    PPB: tl.constexpr = KB // PS if KB >= PS else 1
    BY_PAGE: tl.constexpr = LEAN and KB % PS == 0 and S % KB == 0 and n_p.shape[0] == BLOCK_NB * PPB
    if BY_PAGE:  # (pages past the row have n_p 0)
        cnt = tl.sum(tl.reshape(n_p.to(tl.int32), [BLOCK_NB, PPB]), 1)
    elif LISTS_IN_REGS:
        lo = tl.maximum(nb[:, None] * KB, p[None, :] * PS + (f_p[None, :] if WINDOW > 0 else 0))
        hi = tl.minimum(nb[:, None] * KB + KB, p[None, :] * PS + n_p[None, :])
        cnt = tl.sum(tl.maximum(hi - lo, 0).to(tl.int32), 1)
    else:
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
    tl.store(full_idx_ptr + row64 * NB + tl.where(full, c_full - 1, n_full + nb - c_full), nb, mask=in_nb)
    tl.store(kv_idx_ptr + row64 * NB + tl.where(part, c_part - 1, n_part + nb - c_part), nb, mask=in_nb)
    tl.store(full_num_ptr + row64, n_full)
    tl.store(kv_num_ptr + row64, n_part)


@triton.jit
def bound_pages(q_ptr, sqb, sqh, sqd, page_id_ptr, score_ptr, kmax_ptr, kmin_ptr, imp_ptr,
                pp, mp, slot, opened, new_id, new_max, new_min, b, h, base,
                G: tl.constexpr, D: tl.constexpr, BP: tl.constexpr, DOT: tl.constexpr, STORED: tl.constexpr,
                SCORE: tl.constexpr = True):
    """Quest's bound of the BP pages ``pp`` (``mp``: in the row) as they are after the append (slot
    ``slot`` with key bounds new_max / new_min, id new_id if ``opened``): sum_d max(q_d M_d, q_d m_d)
    = q+ . M + q- . m, max over the G query heads, -inf for empty slots. Stored to ``imp`` and (SCORE),
    -inf / nan as 0, to ``score``; returned. DOT: two matrix products (fp32 operands exact, no tf32); else
    element-wise with a reduction over D per query head. STORED: the program has stored the step's
    writes to the tables already (and passed a barrier), so they are read as they are: merging the new
    row from registers instead costs a layout change through shared memory (the append kernel's
    observe took 36 KB of it and was slower on the H200)."""
    d = tl.arange(0, D)
    off2 = (base + pp)[:, None] * D + d[None, :]
    if STORED:
        kmax = tl.load(kmax_ptr + off2, mask=mp[:, None], other=0.0, cache_modifier=".cg")
        kmin = tl.load(kmin_ptr + off2, mask=mp[:, None], other=0.0, cache_modifier=".cg")
        pid = tl.load(page_id_ptr + base + pp, mask=mp, other=-1, cache_modifier=".cg")
    else:
        is_slot = (pp == slot)[:, None]
        kmax = tl.where(is_slot, new_max[None, :], tl.load(kmax_ptr + off2, mask=mp[:, None], other=0.0))
        kmin = tl.where(is_slot, new_min[None, :], tl.load(kmin_ptr + off2, mask=mp[:, None], other=0.0))
        pid = tl.load(page_id_ptr + base + pp, mask=mp, other=-1)
        pid = tl.where(opened & (pp == slot), new_id, pid)
    if DOT:
        BG: tl.constexpr = 16 if G <= 16 else triton.next_power_of_2(G)
        gg = tl.arange(0, BG)
        qt = tl.load(q_ptr + b * sqb + (h * G + gg)[:, None] * sqh + d[None, :] * sqd,
                     mask=(gg < G)[:, None], other=0.0)
        if qt.dtype == kmax.dtype and kmax.dtype != tl.float32:
            s = tl.dot(tl.maximum(qt, 0.0).to(kmax.dtype), tl.trans(kmax))
            s += tl.dot(tl.minimum(qt, 0.0).to(kmax.dtype), tl.trans(kmin))
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
    imp = tl.where(pid >= 0, best, float("-inf"))
    tl.store(imp_ptr + base + pp, imp, mask=mp)
    if SCORE:
        sc = tl.where(imp != imp, 0.0, imp)
        sc = tl.where(sc == float("-inf"), 0.0, sc)
        tl.store(score_ptr + base + pp, tl.where(sc == float("inf"), F32_MAX, sc), mask=mp)
    return imp


@triton.jit
def bound_loop(q_ptr, sqb, sqh, sqd, page_id_ptr, score_ptr, kmax_ptr, kmin_ptr, imp_ptr,
               lo, hi, slot, opened, new_id, new_max, new_min, b, h, base,
               G: tl.constexpr, P: tl.constexpr, D: tl.constexpr, BP: tl.constexpr, BPC: tl.constexpr,
               DOT: tl.constexpr, STORED: tl.constexpr):
    """:func:`bound_pages` of the pages lo .. min(hi, P) - 1 (BP >= hi - lo), in unrolled chunks of BPC."""
    for c0 in tl.static_range(0, BP, BPC):
        pp = lo + c0 + tl.arange(0, BPC)
        bound_pages(q_ptr, sqb, sqh, sqd, page_id_ptr, score_ptr, kmax_ptr, kmin_ptr, imp_ptr,
                    pp, (pp < P) & (pp < hi), slot, opened, new_id, new_max, new_min, b, h, base, G, D, BPC, DOT,
                    STORED)


@triton.jit
def kth_largest(key, ok, k):
    """A threshold t for the k largest (1 <= k <= the count of ``ok``) of the int32 keys marked ``ok``,
    without a sort: a search over the bits of the keys' order-preserving unsigned image, most
    significant first, one count of the keys at or above each candidate. It stops as soon as exactly
    k keys are at or above t (then they are the k largest, and t may be below the k-th largest);
    otherwise, after all 32 bits, t is the k-th largest."""
    u = key.to(tl.uint32, bitcast=True) ^ 0x80000000
    t = tl.full([], 0, tl.uint32)
    bit = tl.full([], 31, tl.int32)
    done = tl.full([], 0, tl.int32)
    while (bit >= 0) & (done == 0):
        cand = t | (tl.full([], 1, tl.uint32) << bit.to(tl.uint32))
        c = tl.sum((ok & (u >= cand)).to(tl.int32), 0)
        t = tl.where(c >= k, cand, t)
        done = (c == k).to(tl.int32)
        bit -= 1
    return (t ^ 0x80000000).to(tl.int32, bitcast=True)


@triton.jit
def refresh_set(imp, pid, i, in_row, P: tl.constexpr, REFRESH: tl.constexpr, BLOCK_P: tl.constexpr,
                SEARCH: tl.constexpr = False):
    """The top REFRESH resident pages of a row (imp, pid: [BLOCK_P] over slots i) as a mask, in the
    torch code's stable descending order (equal importance: the lower slot first). The importance
    maps to an order-preserving int32 image (-0.0 as 0.0); one sort gives the REFRESH-th largest t
    (SEARCH, for long rows: :func:`kth_largest`, which may stop at a lower t with exactly REFRESH at
    or above it); pages above t are in, and of those equal to t the lowest slots fill what is left."""
    resident = (pid >= 0) & in_row
    if REFRESH >= P:
        refresh = resident
    else:
        bits = tl.where(imp == 0.0, 0.0, imp).to(tl.int32, bitcast=True)
        low = tl.where(in_row, tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF), -2147483647 - 1)
        if SEARCH:
            t = kth_largest(low, in_row, REFRESH)
        else:
            t = tl.sum(tl.where(i == REFRESH - 1, tl.sort(low, descending=True), 0), 0)
        above = in_row & (low > t)
        tie = in_row & (low == t)
        need = REFRESH - tl.sum(above.to(tl.int32), 0)
        refresh = resident & (above | (tie & (tl.cumsum(tie.to(tl.int32), 0) <= need)))
    return refresh


@triton.jit
def finish_step(ticket_ptr, length_ptr, step_ptr, step_new, lens, NPROG: tl.constexpr, B: tl.constexpr,
                BLOCK_B: tl.constexpr, LOAD_LENS: tl.constexpr = False):
    """The last of NPROG programs to get here (a ticket after a barrier; every program has read the
    lengths and the step by then) advances the lengths and the step and resets the ticket. ``lens``:
    the lengths [BLOCK_B] as the caller loaded them before its ticket (no program changes them before
    this one), so the last program's tail holds no trip to memory after the ticket. With LOAD_LENS
    they are loaded after the ticket instead (``lens`` unused): the step kernel, where lengths held
    through the row's combine cost registers (kernels.md, "Measured and not shipped")."""
    tl.debug_barrier()
    if tl.atomic_add(ticket_ptr, 1, sem="acq_rel") == NPROG - 1:
        bb = tl.arange(0, BLOCK_B)
        if LOAD_LENS:
            tl.store(length_ptr + bb, tl.load(length_ptr + bb, mask=bb < B, other=0, cache_modifier=".cg") + 1,
                     mask=bb < B)
        else:
            tl.store(length_ptr + bb, lens + 1, mask=bb < B)
        tl.store(step_ptr, step_new)
        tl.store(ticket_ptr, 0)
