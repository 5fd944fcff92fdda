"""Mask mods and block lists for decode attention over a compacted KV buffer.

Layout (works for any GQA group size G): the G query heads that share a KV head are packed into
the query-length dimension, so flex_attention sees

    q [B*Hkv, 1, G, D]    k, v [B*Hkv, 1, S, D]    block mask batch B*Hkv, heads 1

and the mask only depends on the folded batch index and the KV slot.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask


def generate_slot_validity_mask(valid: Tensor):
    """mask_mod that admits exactly the slots with ``valid[b, slot]`` (valid: bool [B*Hkv, S]).

    Eager flex_attention ignores block lists and relies on mask_mod alone, so this mask must be
    exact by itself; the block lists only let compiled kernels skip work.
    """

    def slot_validity(b, h, q_idx, kv_idx):
        return valid[b, kv_idx]

    slot_validity.__name__ = f"slot_validity_{valid.shape[0]}x{valid.shape[1]}"
    return slot_validity


def block_lists(valid: Tensor, block: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Partial and full KV block lists for a validity mask, with fixed shapes and no host sync.

    valid: bool [BH, S] with S % block == 0.
    Returns (kv_num_blocks [BH,1,1], kv_indices [BH,1,1,NB], full_kv_num_blocks, full_kv_indices),
    int32. A block is "full" when every slot in it is valid (the kernel skips mask_mod there) and
    "partial" when some but not all are; empty blocks are listed in neither.
    """
    bh, s = valid.shape
    nb = s // block
    v = valid.view(bh, nb, block)
    any_ = v.any(-1)
    full = v.all(-1)
    partial = any_ & ~full

    def compact(sel: Tensor) -> tuple[Tensor, Tensor]:
        num = sel.sum(-1, dtype=torch.int32).view(bh, 1, 1)
        # Stable argsort of ~sel puts the selected block ids first, in order; order is free for
        # the kernel, stability only keeps the lists deterministic.
        idx = torch.argsort((~sel).to(torch.int8), dim=-1, stable=True).to(torch.int32)
        return num, idx.view(bh, 1, 1, nb)

    kv_num, kv_idx = compact(partial)
    full_num, full_idx = compact(full)
    return kv_num, kv_idx, full_num, full_idx


@torch.library.custom_op("raas_flex::materialize", mutates_args=())
def materialize(x: Tensor) -> Tensor:
    """An opaque copy: Inductor must realize its output as a buffer with a fixed layout.

    When the whole model forward is one Inductor graph on GPU, the tensors a BlockMask is built
    from (slot validity, block lists) can otherwise stay fused pointwise expressions that the flex
    template cannot index ("convert FlexibleLayout to FixedLayout first").
    """
    return x.clone()


@materialize.register_fake
def _(x: Tensor) -> Tensor:
    return torch.empty_like(x)


def all_partial_lists(bh: int, s: int, block: int, device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Constant block lists that list every KV block as partial (mask_mod evaluated everywhere).

    For a compacted buffer that the policy attends whole (raas, h2o, streaming), nearly every block
    is full anyway: evaluating the one-byte-per-slot mask_mod in every block costs the kernel less
    than computing exact lists costs the step (a sort and two reductions per row).
    """
    nb = s // block
    num = torch.full((bh, 1, 1), nb, dtype=torch.int32, device=device)
    idx = torch.arange(nb, dtype=torch.int32, device=device).expand(bh, 1, 1, nb).contiguous()
    return num, idx, torch.zeros_like(num), idx.clone()


def build_block_mask(valid: Tensor, block: int, q_len: int, lists: tuple[Tensor, ...], *,
                     barrier: bool = False) -> BlockMask:
    """BlockMask over a compacted buffer for the packed-GQA decode layout (see module docstring).

    lists: (kv_num, kv_idx, full_num, full_idx) as :func:`block_lists` lays them out (the fused
    kernels write them; :func:`all_partial_lists` lists every block as partial), or (kv_num, kv_idx)
    alone: partial blocks only. Then flex's decode kernel splits the listed blocks, not the whole
    buffer, among its programs (a page-picking policy lists a few pages of a long buffer).
    mask_mod stays exact either way.
    barrier: pass the validity and block lists through :func:`materialize` first (used when they
    are computed by torch ops in a step that Inductor compiles for GPU inside a larger graph).
    """
    bh, s = valid.shape
    if barrier:
        valid = materialize(valid)
        lists = tuple(materialize(t) for t in lists)
    kv_num, kv_idx, full_num, full_idx = lists if len(lists) == 4 else (*lists, None, None)
    return BlockMask.from_kv_blocks(
        kv_num,
        kv_idx,
        full_num,
        full_idx,
        BLOCK_SIZE=(128, block),
        mask_mod=generate_slot_validity_mask(valid),
        seq_lengths=(q_len, s),
        compute_q_blocks=False,
    )
