"""The append kernel: one program per (sequence, KV head) row appends the step's token, and with
OBSERVE runs the RaaS observe of the step's query for the row (the flex path's one launch a step).
The bounds kernel: Quest's page bound of every page slot; the pick kernel: quest's page choice from
them, with the validity row and block lists of the chosen pages. The quest kernel: quest's append
and its page bounds in one launch (many programs a row), before the pick."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op, wrap_triton

from ..policies import Quest, RaaS
from . import APPEND_BOUND_ELEMS, BOUND_PAGES, WARPS, lists_in_regs
from .rules import (append_inputs, bound_loop, bound_pages, choose_slot, finish_step, new_key_bounds, new_token,
                    page_entry, page_tokens, refresh_set, row_writes, table_writes, token_writes)


@triton.jit
def _append_kernel(
    kn_ptr, vn_ptr, skb, skh, skd, svb, svh, svd,
    k_ptr, v_ptr, page_id_ptr, stamp_ptr, pinned_ptr, score_ptr, kmax_ptr, kmin_ptr,
    open_slot_ptr, length_ptr, step_ptr, evictions_ptr, overflow_ptr, valid_ptr, ticket_ptr,
    kv_num_ptr, kv_idx_ptr, full_num_ptr, full_idx_ptr, q_ptr, sqb, sqh, sqd, imp_ptr,
    B: tl.constexpr, H: tl.constexpr, P: tl.constexpr, D: tl.constexpr, PS: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_PS: tl.constexpr, BLOCK_B: tl.constexpr,
    POLICY: tl.constexpr, SINK_PAGES: tl.constexpr, RECENT_PAGES: tl.constexpr,
    KB: tl.constexpr, NB: tl.constexpr, BLOCK_KB: tl.constexpr, BLOCK_NB: tl.constexpr, LISTS_IN_REGS: tl.constexpr,
    OBSERVE: tl.constexpr, G: tl.constexpr, REFRESH: tl.constexpr, BPC: tl.constexpr,
):
    row = tl.program_id(0)
    b = row // H
    h = row % H
    S: tl.constexpr = P * PS
    row64 = row.to(tl.int64)
    base = row64 * P
    bb = tl.arange(0, BLOCK_B)
    lens = tl.load(length_ptr + bb, mask=bb < B, other=0)  # up front (the last program writes lens + 1)
    step_new, pos, open_old, ev, old_max, old_min = append_inputs(
        kmax_ptr, kmin_ptr, open_slot_ptr, length_ptr, step_ptr, evictions_ptr, b, row64, base, D)
    kk, vv = new_token(kn_ptr, vn_ptr, skb, skh, skd, svb, svh, svd, b, h, k_ptr.dtype.element_ty, D)
    p = tl.arange(0, BLOCK_P)
    in_row = p < P
    pid = tl.load(page_id_ptr + base + p, mask=in_row, other=-1)
    off = pos % PS
    slot, opened, write, has_free = choose_slot(pid, p, in_row, off == 0, open_old, pos, stamp_ptr, pinned_ptr,
                                                score_ptr, base, POLICY, SINK_PAGES, RECENT_PAGES, PS, BLOCK_P)
    new_id = pos // PS
    new_max, new_min = new_key_bounds(kk, old_max, old_min, opened, write, kmax_ptr, kmin_ptr)
    pid_new = tl.where(opened & (p == slot), new_id, pid)
    token_writes(k_ptr, v_ptr, score_ptr, row64, base, slot, off, kk, vv, opened, S, PS, D)
    page_entry(page_id_ptr, stamp_ptr, pinned_ptr, open_slot_ptr, row64, base, slot, new_id, step_new,
               opened, write, open_old)
    row_writes(kmax_ptr, kmin_ptr, evictions_ptr, overflow_ptr, valid_ptr, kv_num_ptr, kv_idx_ptr, full_num_ptr,
               full_idx_ptr, row64, base, p, in_row, slot, pos, pid_new, new_max, new_min, ev, opened, has_free,
               write, D, S, PS, BLOCK_PS, KB, NB, BLOCK_KB, BLOCK_NB, LISTS_IN_REGS, False, 0)
    if OBSERVE:  # the RaaS observe of this step's query over the row after the append
        tl.debug_barrier()  # the page-table entry and key bounds stored above are complete
        if BPC == BLOCK_P:  # one chunk: the bounds stay in registers
            a = bound_pages(q_ptr, sqb, sqh, sqd, page_id_ptr, score_ptr, kmax_ptr, kmin_ptr, imp_ptr, p, in_row,
                            slot, opened, new_id, new_max, new_min, b, h, base, G, D, BPC, True, True)
        else:
            bound_loop(q_ptr, sqb, sqh, sqd, page_id_ptr, score_ptr, kmax_ptr, kmin_ptr, imp_ptr, 0, P,
                       slot, opened, new_id, new_max, new_min, b, h, base, G, P, D, BLOCK_P, BPC, True, True)
            tl.debug_barrier()  # the row of bounds is complete
            a = tl.load(imp_ptr + base + p, mask=in_row, other=float("-inf"), cache_modifier=".cg")
        refresh = refresh_set(a, pid_new, p, in_row, P, REFRESH, BLOCK_P)
        tl.store(stamp_ptr + base + p, tl.zeros([BLOCK_P], tl.int64) + step_new, mask=refresh)
    finish_step(ticket_ptr, length_ptr, step_ptr, step_new, lens, B * H, B, BLOCK_B)


def _launch_append(k_new, v_new, state, policy, sink_pages, recent_pages, block, q=None, imp=None, refresh_pages=0):
    k_cache, page_id = state[0], state[2]
    B, H, S, D = k_cache.shape
    P = page_id.shape[-1]
    ps = S // P
    nb = S // block
    observe = q is not None
    qq = q if observe else k_new  # (not read without OBSERVE)
    block_p = triton.next_power_of_2(P)
    wrap_triton(_append_kernel)[(B * H,)](
        k_new, v_new, k_new.stride(0), k_new.stride(1), k_new.stride(3),
        v_new.stride(0), v_new.stride(1), v_new.stride(3), *state,
        qq, qq.stride(0), qq.stride(1), qq.stride(3), imp if observe else state[5],
        B=B, H=H, P=P, D=D, PS=ps, BLOCK_P=block_p, BLOCK_PS=triton.next_power_of_2(ps),
        BLOCK_B=triton.next_power_of_2(B), POLICY=policy, SINK_PAGES=sink_pages, RECENT_PAGES=recent_pages,
        KB=block, NB=nb, BLOCK_KB=triton.next_power_of_2(block), BLOCK_NB=triton.next_power_of_2(nb),
        LISTS_IN_REGS=lists_in_regs(nb, P), OBSERVE=observe, G=(q.shape[1] // H) if observe else 1,
        REFRESH=refresh_pages, BPC=max(16, min(block_p, APPEND_BOUND_ELEMS // D)), num_warps=WARPS,
    )


_STATE = {"k_cache", "v_cache", "page_id", "stamp", "pinned", "score", "kmax", "kmin", "open_slot", "length", "step",
          "evictions", "overflow", "valid", "ticket", "kv_num", "kv_idx", "full_num", "full_idx"}


@triton_op("raas_flex::fused_append", mutates_args=_STATE)
def fused_append(
    k_new: Tensor, v_new: Tensor,
    k_cache: Tensor, v_cache: Tensor, page_id: Tensor, stamp: Tensor, pinned: Tensor, score: Tensor,
    kmax: Tensor, kmin: Tensor, open_slot: Tensor, length: Tensor, step: Tensor, evictions: Tensor,
    overflow: Tensor, valid: Tensor, ticket: Tensor, kv_num: Tensor, kv_idx: Tensor, full_num: Tensor,
    full_idx: Tensor, policy: int, sink_pages: int, recent_pages: int, block: int,
) -> None:
    """Append one token per row (k_new, v_new: [B, Hkv, 1, D]) under eviction rule ``policy``
    (``Policy.append_code``: raas 0, streaming 1, h2o 2, dense 3); refresh ``valid`` and the exact flex
    block lists for KV blocks of ``block`` slots (layout of masks.block_lists). ``ticket``: int32 [1],
    0 at launch (left 0)."""
    _launch_append(k_new, v_new, (k_cache, v_cache, page_id, stamp, pinned, score, kmax, kmin, open_slot, length,
                                  step, evictions, overflow, valid, ticket, kv_num, kv_idx, full_num, full_idx),
                   policy, sink_pages, recent_pages, block)


@triton_op("raas_flex::fused_append_observe", mutates_args=_STATE | {"imp"})
def fused_append_observe(
    q: Tensor, k_new: Tensor, v_new: Tensor,
    k_cache: Tensor, v_cache: Tensor, page_id: Tensor, stamp: Tensor, pinned: Tensor, score: Tensor,
    kmax: Tensor, kmin: Tensor, open_slot: Tensor, length: Tensor, step: Tensor, evictions: Tensor,
    overflow: Tensor, valid: Tensor, ticket: Tensor, kv_num: Tensor, kv_idx: Tensor, full_num: Tensor,
    full_idx: Tensor, imp: Tensor, sink_pages: int, recent_pages: int, block: int, refresh_pages: int,
) -> None:
    """:func:`fused_append` (raas), then in the same program the RaaS observe of q [B, Hq, 1, D]
    (Quest's bound over the row after the append, the top ``refresh_pages`` stamped). imp: fp32
    [B, Hkv, P] scratch."""
    _launch_append(k_new, v_new, (k_cache, v_cache, page_id, stamp, pinned, score, kmax, kmin, open_slot, length,
                                  step, evictions, overflow, valid, ticket, kv_num, kv_idx, full_num, full_idx),
                   RaaS.append_code, sink_pages, recent_pages, block, q=q, imp=imp,
                   refresh_pages=refresh_pages)



def _bound_chunk(P: int) -> int:
    """Pages per program of the bounds kernels: BOUND_PAGES, at least 16 (a matrix product needs 16)."""
    return max(16, min(triton.next_power_of_2(P), BOUND_PAGES))


@triton.jit
def _bounds_kernel(q_ptr, sqb, sqh, sqd, page_id_ptr, kmax_ptr, kmin_ptr, out_ptr,
                   H: tl.constexpr, G: tl.constexpr, P: tl.constexpr, D: tl.constexpr, BPC: tl.constexpr):
    """Program (row, chunk): :func:`bound_pages` of the row's BPC pages of the chunk, as stored."""
    row = tl.program_id(0)
    pp = tl.program_id(1) * BPC + tl.arange(0, BPC)
    none = tl.zeros([D], kmax_ptr.dtype.element_ty)  # (the step's new key bounds: read as stored instead)
    bound_pages(q_ptr, sqb, sqh, sqd, page_id_ptr, out_ptr, kmax_ptr, kmin_ptr, out_ptr, pp, pp < P, -1, False, 0,
                none, none, row // H, row % H, row.to(tl.int64) * P, G, D, BPC, True, True, False)


@triton_op("raas_flex::page_bounds", mutates_args=())
def page_bounds(q: Tensor, kmax: Tensor, kmin: Tensor, page_id: Tensor) -> Tensor:
    """Quest's bound of every page slot for q [B, Hq, 1, D] over the key bounds kmax / kmin [B, Hkv,
    P, D] as stored: fp32 [B, Hkv, P], -inf for empty slots (:meth:`PagedKVCache.page_bound`, by the
    rule of the append kernel's observe), BOUND_PAGES pages a program."""
    B, H, P, D = kmax.shape
    out = torch.empty(B, H, P, dtype=torch.float32, device=kmax.device)
    bpc = _bound_chunk(P)
    wrap_triton(_bounds_kernel)[(B * H, triton.cdiv(P, bpc))](
        q, q.stride(0), q.stride(1), q.stride(3), page_id, kmax, kmin, out,
        H=H, G=q.shape[1] // H, P=P, D=D, BPC=bpc, num_warps=WARPS,
    )
    return out


@triton.jit
def _quest_kernel(q_ptr, sqb, sqh, sqd, kn_ptr, vn_ptr, skb, skh, skd, svb, svh, svd,
                  k_ptr, v_ptr, page_id_ptr, stamp_ptr, pinned_ptr, score_ptr, kmax_ptr, kmin_ptr,
                  open_slot_ptr, length_ptr, step_ptr, evictions_ptr, overflow_ptr, bound_ptr,
                  H: tl.constexpr, G: tl.constexpr, P: tl.constexpr, D: tl.constexpr, PS: tl.constexpr,
                  BPC: tl.constexpr, BLOCK_P: tl.constexpr, POLICY: tl.constexpr):
    """Program (row, chunk): the row's append under eviction rule POLICY (quest's: dense's, nothing
    evictable), decided by every program of the row
    from the state before the step (the slot choice only when the token opens a page) and written by
    chunk 0 (the token, the page-table entry, the table writes; the lengths and the step are left to
    the pick), then Quest's bound of the chunk's BPC pages as they are after the append: the written
    page's key bounds and id come from registers, so it does not matter whether chunk 0's stores are
    seen yet."""
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    b = row // H
    h = row % H
    S: tl.constexpr = P * PS
    row64 = row.to(tl.int64)
    base = row64 * P
    step_new, pos, open_old, ev, old_max, old_min = append_inputs(
        kmax_ptr, kmin_ptr, open_slot_ptr, length_ptr, step_ptr, evictions_ptr, b, row64, base, D)
    kk, vv = new_token(kn_ptr, vn_ptr, skb, skh, skd, svb, svh, svd, b, h, k_ptr.dtype.element_ty, D)
    off = pos % PS
    need = off == 0
    if need:
        p = tl.arange(0, BLOCK_P)
        in_row = p < P
        pid = tl.load(page_id_ptr + base + p, mask=in_row, other=-1)
        slot, opened, write, has_free = choose_slot(pid, p, in_row, need, open_old, pos, stamp_ptr, pinned_ptr,
                                                    score_ptr, base, POLICY, 0, 0, PS, BLOCK_P)
    else:
        slot, opened, write, has_free = open_old, need, need == 0, need == 0
    new_id = pos // PS
    new_max, new_min = new_key_bounds(kk, old_max, old_min, opened, write, kmax_ptr, kmin_ptr)
    if chunk == 0:
        token_writes(k_ptr, v_ptr, score_ptr, row64, base, slot, off, kk, vv, opened, S, PS, D)
        page_entry(page_id_ptr, stamp_ptr, pinned_ptr, open_slot_ptr, row64, base, slot, new_id, step_new,
                   opened, write, open_old)
        table_writes(kmax_ptr, kmin_ptr, evictions_ptr, overflow_ptr, row64, base, slot, new_max, new_min, ev,
                     opened, has_free, write, D)
    pp = chunk * BPC + tl.arange(0, BPC)
    bound_pages(q_ptr, sqb, sqh, sqd, page_id_ptr, bound_ptr, kmax_ptr, kmin_ptr, bound_ptr, pp, pp < P, slot, opened,
                new_id, new_max, new_min, b, h, base, G, D, BPC, True, False, False)


@triton.jit
def _pick_kernel(bound_ptr, page_id_ptr, open_slot_ptr, length_ptr, valid_ptr, kv_num_ptr, kv_idx_ptr,
                 step_ptr, ticket_ptr, B: tl.constexpr, H: tl.constexpr, P: tl.constexpr, PS: tl.constexpr,
                 BUDGET: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_PS: tl.constexpr, BLOCK_B: tl.constexpr,
                 FINISH: tl.constexpr):
    """Program ``row``: the BUDGET resident pages of the row's largest bound, the open page first
    (:func:`refresh_set` by its search, ties to the lower slot), as the validity row (their written
    tokens) and block lists of one page a block: the chosen slots in slot order, then the others.
    FINISH (after the quest kernel): the lengths do not count the step's token yet, and the last
    program advances them and the step (:func:`finish_step`)."""
    row = tl.program_id(0)
    row64 = row.to(tl.int64)
    base = row64 * P
    p = tl.arange(0, BLOCK_P)
    in_row = p < P
    pid = tl.load(page_id_ptr + base + p, mask=in_row, other=-1)
    bound = tl.load(bound_ptr + base + p, mask=in_row, other=float("-inf"))
    pos = tl.load(length_ptr + row // H) - 1 + FINISH  # (up front: after the stores it would be a trip of its own)
    if FINISH:
        bb = tl.arange(0, BLOCK_B)
        lens = tl.load(length_ptr + bb, mask=bb < B, other=0)
        step_new = tl.load(step_ptr) + 1
    bound = tl.where(p == tl.load(open_slot_ptr + row64), float("inf"), bound)
    pick = refresh_set(bound, pid, p, in_row, P, BUDGET, BLOCK_P, True)
    count = tl.sum(pick.to(tl.int32), 0)
    c = tl.cumsum(pick.to(tl.int32), 0)
    tl.store(kv_idx_ptr + row64 * P + tl.where(pick, c - 1, count + p - c), p, mask=in_row)
    tl.store(kv_num_ptr + row64, count)
    n_p = tl.where(pick, page_tokens(pid, pos, PS), 0)
    tt = tl.arange(0, BLOCK_PS)
    tl.store(valid_ptr + (base + p[:, None]) * PS + tt[None, :], tt[None, :] < n_p[:, None],
             mask=in_row[:, None] & (tt[None, :] < PS))
    if FINISH:
        finish_step(ticket_ptr, length_ptr, step_ptr, step_new, lens, B * H, B, BLOCK_B)


@triton_op("raas_flex::pick_pages", mutates_args={"valid"})
def pick_pages(bound: Tensor, page_id: Tensor, open_slot: Tensor, length: Tensor, valid: Tensor,
               budget_pages: int) -> tuple[Tensor, Tensor]:
    """Quest's page choice (:meth:`Quest.attended_pages`' rule) from the bounds fp32 [B, Hkv, P] of
    :func:`page_bounds`: ``valid`` [B * Hkv, S] gets the written tokens of the chosen pages (after the
    append); returns flex block lists of one page a block, (kv_num [B * Hkv, 1, 1], kv_idx [B * Hkv, 1,
    1, P]), int32, every block partial."""
    return _launch_pick(bound, page_id, open_slot, length, valid, length, length, budget_pages, False)


def _launch_pick(bound, page_id, open_slot, length, valid, step, ticket, budget_pages, finish):
    B, H, P = page_id.shape
    ps = valid.shape[-1] // P
    kv_num = torch.empty(B * H, 1, 1, dtype=torch.int32, device=bound.device)
    kv_idx = torch.empty(B * H, 1, 1, P, dtype=torch.int32, device=bound.device)
    wrap_triton(_pick_kernel)[(B * H,)](
        bound, page_id, open_slot, length, valid, kv_num, kv_idx, step, ticket, B=B, H=H, P=P, PS=ps,
        BUDGET=budget_pages, BLOCK_P=triton.next_power_of_2(P), BLOCK_PS=triton.next_power_of_2(ps),
        BLOCK_B=triton.next_power_of_2(B), FINISH=finish, num_warps=WARPS,
    )
    return kv_num, kv_idx


@triton_op("raas_flex::quest_step", mutates_args=_STATE | {"imp"})
def quest_step(
    q: Tensor, k_new: Tensor, v_new: Tensor,
    k_cache: Tensor, v_cache: Tensor, page_id: Tensor, stamp: Tensor, pinned: Tensor, score: Tensor,
    kmax: Tensor, kmin: Tensor, open_slot: Tensor, length: Tensor, step: Tensor, evictions: Tensor,
    overflow: Tensor, valid: Tensor, ticket: Tensor, kv_num: Tensor, kv_idx: Tensor, full_num: Tensor,
    full_idx: Tensor, imp: Tensor, budget_pages: int,
) -> tuple[Tensor, Tensor]:
    """Quest's step before its attention, in two launches: the append of k_new, v_new [B, Hkv, 1, D]
    under dense's rule with Quest's bound of every page slot for q [B, Hq, 1, D] after it (to ``imp``,
    fp32 [B, Hkv, P], as :func:`page_bounds` gives them), BOUND_PAGES pages a program; then the page
    choice of :func:`pick_pages`, whose last program advances the lengths and the step. The state
    changes as :func:`fused_append` (``policy`` 3) would make them, except the flex block lists
    (kv_num .. full_idx, left as they are): ``valid`` gets the chosen pages' tokens. Returns the pick's
    lists. ``ticket``: int32 [1], 0 at launch (left 0)."""
    B, H, P, D = kmax.shape
    bpc = _bound_chunk(P)
    wrap_triton(_quest_kernel)[(B * H, triton.cdiv(P, bpc))](
        q, q.stride(0), q.stride(1), q.stride(3), k_new, v_new, k_new.stride(0), k_new.stride(1), k_new.stride(3),
        v_new.stride(0), v_new.stride(1), v_new.stride(3), k_cache, v_cache, page_id, stamp, pinned, score, kmax,
        kmin, open_slot, length, step, evictions, overflow, imp,
        H=H, G=q.shape[1] // H, P=P, D=D, PS=k_cache.shape[2] // P, BPC=bpc, BLOCK_P=triton.next_power_of_2(P),
        POLICY=Quest.append_code, num_warps=WARPS,
    )
    return _launch_pick(imp, page_id, open_slot, length, valid, step, ticket, budget_pages, True)
