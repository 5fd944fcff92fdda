"""paged_attend: a step's attention over a list of pages of an O(N) buffer (quest's chosen pages, or
every resident page for dense; backend="triton").

Quest keeps every page and attends to ``budget_pages`` of them, picked per step by the page bound.
The torch path writes a validity mask over all N slots each step, builds flex block lists from it and
lets flex_attention walk the chosen pages one page-sized tile at a time. Here the programs of a row
walk the listed pages' slots only: K/V tiles of BLOCK_N slots gathered from the page list, an online
softmax per program, the row's partial results combined by its last program (flash decoding over a
page table, as paged-attention engines do)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op, wrap_triton

import raas_flex.kernels as _pkg

from . import BLOCK_N, WARPS, split_for
from .attention import _combine_row, _last_of_row, _softmax_tile
from .rules import load_q


@triton.jit
def _paged_kernel(q_ptr, sqb, sqh, sqd, k_ptr, v_ptr, pages_ptr, page_id_ptr, length_ptr, count_ptr, acc_ptr, ml_ptr,
                  out_ptr, sob, soh, sod, scale_log2, H: tl.constexpr, G: tl.constexpr, BG: tl.constexpr,
                  D: tl.constexpr, PS: tl.constexpr, P: tl.constexpr, K: tl.constexpr, BLOCK_N: tl.constexpr,
                  TILES: tl.constexpr, SPLIT: tl.constexpr):
    """Program (row, split): the K * PS listed slots of the row (page ``pages[row, j]``, -1 for none;
    a slot counts when its page is resident and its token written), TILES tiles of BLOCK_N of them
    from tile ``split * TILES`` on; the row's last program combines the SPLIT parts into the output."""
    row = tl.program_id(0)
    split = tl.program_id(1)
    row64 = row.to(tl.int64)
    b = row64 // H
    h = row64 % H
    scale_log2 = tl.cast(scale_log2, tl.float32)  # (torch.compile passes a Python float as fp64)
    q = load_q(q_ptr, sqb, sqh, sqd, b, h, k_ptr.dtype.element_ty, G, BG, D)
    length = tl.load(length_ptr + b)
    d = tl.arange(0, D)
    gg = tl.arange(0, BG)
    m_i = tl.full([BG], float("-inf"), tl.float32)
    l_i = tl.zeros([BG], tl.float32)
    acc = tl.zeros([BG, D], tl.float32)
    nn = tl.arange(0, BLOCK_N)
    for ti in range(TILES):
        u = (split * TILES + ti) * BLOCK_N + nn  # listed slot: page j = u // PS, token u % PS of it
        listed = u < K * PS
        slot = tl.load(pages_ptr + row64 * K + u // PS, mask=listed, other=-1)
        pid = tl.load(page_id_ptr + row64 * P + slot, mask=slot >= 0, other=-1)
        ok = (pid >= 0) & (pid * PS + u % PS < length)
        cols = tl.where(ok, slot * PS + u % PS, 0)
        offs = (row64 * (P * PS) + cols)[:, None] * D + d[None, :]
        kt = tl.load(k_ptr + offs, mask=ok[:, None], other=0.0)
        vt = tl.load(v_ptr + offs, mask=ok[:, None], other=0.0)
        m_i, l_i, acc, _ = _softmax_tile(q, kt, vt, ok, m_i, l_i, acc, scale_log2)
    part = row64 * SPLIT + split
    tl.store(ml_ptr + (part * 2) * BG + gg, m_i)
    tl.store(ml_ptr + (part * 2 + 1) * BG + gg, l_i)
    tl.store(acc_ptr + (part * BG + gg)[:, None] * D + d[None, :], acc, mask=(gg < G)[:, None])
    if _last_of_row(count_ptr, row64, SPLIT):
        _combine_row(ml_ptr, acc_ptr, out_ptr + b * sob + h * G * soh, soh, sod, row64, G, BG, D, SPLIT, False)
        if SPLIT > 1:
            tl.store(count_ptr + row64, 0)


@triton_op("raas_flex::paged_attend", mutates_args={"count"})
def paged_attend(q: Tensor, k_cache: Tensor, v_cache: Tensor, pages: Tensor, page_id: Tensor, length: Tensor,
                 count: Tensor, scale: float) -> Tensor:
    """Softmax attention of q [B, Hq, 1, D] over the pages ``pages`` [B, Hkv, K] (page slots of the
    buffers k_cache / v_cache [B, Hkv, P * page_size, D]; -1: no page) of each row, counting a slot
    when its page is resident (``page_id`` >= 0) and its token is written (logical position <
    ``length`` [B]). Returns [B, Hq, 1, D] in q's dtype (zeros for a row with nothing to attend).
    ``count`` (int32 [B * Hkv]): 0 at launch, left 0."""
    B, H, S, D = k_cache.shape
    P = page_id.shape[-1]
    ps = S // P
    K = pages.shape[-1]
    G = q.shape[1] // H
    tiles = -(-K * ps // BLOCK_N)
    split = split_for(B * H, tiles, _pkg.device_sms(q.device))
    bg = max(16, triton.next_power_of_2(G))
    acc = torch.empty(B * H, split, bg, D, dtype=torch.float32, device=q.device)
    ml = torch.empty(B * H, split, 2, bg, dtype=torch.float32, device=q.device)
    out = torch.empty(B, H * G, 1, D, dtype=q.dtype, device=q.device)
    wrap_triton(_paged_kernel)[(B * H, split)](
        q, q.stride(0), q.stride(1), q.stride(3), k_cache, v_cache, pages, page_id, length, count, acc, ml,
        out, out.stride(0), out.stride(1), out.stride(3), scale * 1.4426950408889634,
        H=H, G=G, BG=bg, D=D, PS=ps, P=P, K=K, BLOCK_N=BLOCK_N, TILES=-(-tiles // split), SPLIT=split,
        num_warps=WARPS, num_stages=2,
    )
    return out
