"""KV policies on top of the paged engine: which pages are attended, evicted and refreshed.

The engine (engine.PagedKVCache) owns buffers, page tables, masks and the eviction mechanics: a new
page goes to the lowest free page slot, else replaces the evictable page with the smallest
``eviction_key`` (ties toward the lower slot). A policy only says

- ``evictable(c)``: which resident, unpinned pages it allows to evict (bool [B, Hkv, P]);
- ``eviction_key(c)``: the order of eviction (smallest first), [B, Hkv, P];
- ``attended_pages(c, q)``: pages attended this step (None = every resident page);
- ``observe(c, q, valid)``: state updates after attention (RaaS refreshes timestamps);
- ``pin_prefill(c)``: whether prompt pages are pinned.

Every hook runs inside the compiled decode step: fixed shapes, no host sync.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .config import RaaSConfig


class Policy:
    name = "base"
    narrows = False  # True when attended_pages() may select a subset of the resident pages

    def __init__(self, config: RaaSConfig) -> None:
        self.config = config

    def pin_prefill(self, c) -> bool:
        return self.config.pins_prompt

    def evictable(self, c) -> Tensor:
        return torch.ones_like(c.pinned)

    def eviction_key(self, c) -> Tensor:
        return c.page_id

    def attended_pages(self, c, q: Tensor) -> Tensor | None:
        return None

    def observe(self, c, q: Tensor, valid: Tensor) -> None:
        return None


class RaaS(Policy):
    """RaaS (arXiv 2502.11147): evict the page used longest ago; a page is "used" at a step when
    it is among the top ``refresh_ratio`` of the budget's pages by importance (or its attention
    share exceeds ``refresh_threshold``). Ties in age go to the older logical page."""

    name = "raas"

    def eviction_key(self, c) -> Tensor:
        # stamp is the primary key, the logical page id breaks ties (older page first)
        return c.stamp * (1 << 32) + c.page_id

    def observe(self, c, q: Tensor, valid: Tensor) -> None:
        cfg = self.config
        if cfg.importance == "bound":
            imp = c.page_bound(q)
        else:
            imp = c.page_share(q, valid.view(c.B, c.H, c.S))
        refresh_mask = refreshed_pages(imp, c.page_id >= 0, cfg)
        c.stamp.copy_(torch.where(refresh_mask, c.step, c.stamp))
        c.score.copy_(torch.nan_to_num(imp, neginf=0.0))


def refreshed_pages(importance: Tensor, resident: Tensor, cfg: RaaSConfig) -> Tensor:
    """bool [..., P]: pages refreshed by the configured rule.

    topk: the ``cfg.refresh_pages`` resident pages with the highest importance; ties go to the
    lower page slot (stable sort). threshold: resident pages whose importance > threshold.
    """
    if cfg.refresh == "threshold":
        return resident & (importance > cfg.refresh_threshold)
    key = torch.where(resident, importance, float("-inf"))
    return resident & (descending_rank(key) < cfg.refresh_pages)


def descending_rank(key: Tensor) -> Tensor:
    """Rank of each entry along the last dim in a stable descending sort (0 = largest; ties keep
    index order), as int64 [..., P].

    Computed by pairwise comparison, O(P^2) per row but one fused reduction kernel with no sort:
    P (pages in the buffer) is at most a few hundred, and on GPU this is several times cheaper
    than argsort + scatter.
    """
    p = key.shape[-1]
    idx = torch.arange(p, device=key.device)
    a = key[..., :, None]  # entry being ranked
    b = key[..., None, :]  # entries it is compared with
    before = (b > a) | ((b == a) & (idx[None, :] < idx[:, None]))
    return before.sum(-1)


class Streaming(Policy):
    """StreamingLLM: ``sink_tokens`` initial tokens (kept as whole pages) + the most recent pages."""

    name = "streaming"

    def evictable(self, c) -> Tensor:
        return c.page_id >= self.config.sink_pages

    def eviction_key(self, c) -> Tensor:
        return c.page_id  # oldest page first


class H2O(Policy):
    """H2O at page granularity: the most recent half of the budget's pages is protected; among the
    rest the page with the least accumulated attention share is evicted, for good."""

    name = "h2o"

    def evictable(self, c) -> Tensor:
        recent = self.config.recent_pages
        newest = c.length // c.ps  # logical page being opened when one is needed
        return c.page_id <= (newest[:, None, None] - recent)

    def eviction_key(self, c) -> Tensor:
        return c.score

    def observe(self, c, q: Tensor, valid: Tensor) -> None:
        c.score.add_(c.page_share(q, valid.view(c.B, c.H, c.S)))


class Quest(Policy):
    """Quest (arXiv 2406.10774): keep every page; attend to the ``budget_pages`` pages with the
    largest page bound, always including the open page."""

    name = "quest"
    narrows = True

    def evictable(self, c) -> Tensor:
        return torch.zeros_like(c.pinned)

    def attended_pages(self, c, q: Tensor) -> Tensor | None:
        if self.config.budget_pages >= c.P:
            return None  # the budget covers the whole buffer: attend to every resident page
        bound = c.page_bound(q)
        is_open = c._slot_ar == c.open_slot[..., None]
        bound = torch.where(is_open, float("inf"), bound)
        resident = c.page_id >= 0
        # argsort rather than descending_rank: this result feeds the mask_mod, and a sort is always
        # realized as its own buffer (the fully fused pairwise form tripped Inductor's flex lowering
        # on GPU for tiny page counts: "convert FlexibleLayout to FixedLayout first").
        key = torch.where(resident, bound, float("-inf"))
        order = torch.argsort(key, dim=-1, descending=True, stable=True)
        rank = torch.empty_like(order).scatter_(-1, order, c._slot_ar.expand_as(order))
        return resident & (rank < self.config.budget_pages)


class Dense(Policy):
    """Full attention over every token; nothing is evicted (O(N) memory)."""

    name = "dense"

    def evictable(self, c) -> Tensor:
        return torch.zeros_like(c.pinned)


POLICY_CLASSES = {cls.name: cls for cls in (RaaS, Quest, H2O, Streaming, Dense)}


def make_policy(config: RaaSConfig) -> Policy:
    return POLICY_CLASSES[config.policy](config)
