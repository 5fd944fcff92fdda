"""KV policies: which pages a step attends, evicts and refreshes.

A policy is a small frozen dataclass that owns its hyperparameters. The engine
(:class:`raas_flex.engine.PagedKVCache`) owns the buffers, the page table and the mechanics: a new
page goes to the lowest free page slot, else replaces the evictable page with the smallest
``eviction_key`` (ties toward the lower slot). A policy only says

- ``evictable(c)``: which resident, unpinned pages it allows to evict (bool [B, Hkv, P]);
- ``eviction_key(c)``: the order of eviction (smallest first), [B, Hkv, P];
- ``attended_pages(c, q)``: pages attended this step (None = every resident page), as page slots
  and how many of them count;
- ``observe(c, q, valid)``: state updates after attention (RaaS refreshes timestamps).

``c`` is the engine; policies read its public page table (``page_id``, ``stamp``, ``pinned``,
``score``, ``length``, ``step``, ``open_slot``, ``slot_index``, ``page_size``, ``budget_pages``)
and its importance functions (``page_bound``, ``page_share``). Every hook runs inside the compiled
decode step: fixed shapes, no host sync. The fused kernels (:mod:`raas_flex.kernels`) implement the
same rules for the policies that declare an ``append_code``.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import ClassVar

import torch
from torch import Tensor


def check_int(name: str, value, *, low: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    if low is not None and value < low:
        raise ValueError(f"{name} must be >= {low}, got {value!r}")


def check_choice(name: str, value, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not supported; allowed: {', '.join(map(repr, allowed))}")


def check_float(name: str, value, low: float, high: float, *, low_open: bool, high_open: bool) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {value!r} ({type(value).__name__})")
    inside = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not inside:  # (NaN is never inside)
        span = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise ValueError(f"{name}={value!r} must be in {span}")


@dataclass(frozen=True)
class Policy:
    """Base policy: nothing is evicted early, every resident page is attended, nothing observed."""

    name: ClassVar[str] = "base"
    bounded: ClassVar[bool] = True  # holds at most ``budget`` tokens (O(L) memory)
    narrows: ClassVar[bool] = False  # attended_pages() may pick a subset of the resident pages
    append_code: ClassVar[int | None] = None  # eviction rule of the fused append kernel, if it has one
    pin_prompt: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.pin_prompt, bool):
            raise TypeError(f"pin_prompt must be True or False, got {self.pin_prompt!r}")

    def validate(self, budget_pages: int, page_size: int) -> None:
        """Raise ValueError if the policy cannot run at this budget."""

    @property
    def fused_observe(self) -> bool:
        """True when the fused append kernel implements observe() (raas with the bound and top-k)."""
        return False

    @property
    def step_observe(self) -> int | None:
        """The observe of the one-kernel step (``kernels.fused_step``'s ``observe``) that implements
        observe(), None where it does not: 0 Quest's bound, top-k stamped (raas default); 1 attention
        share, top-k stamped; 2 attention share, shares above the threshold stamped; 3 attention share
        added to the score (h2o); 4 none (streaming, dense)."""
        return None

    def kernel_params(self, budget_pages: int, page_size: int) -> tuple[int, int, int, float]:
        """The fused kernels' parameters at this budget: (sink pages, protected recent pages, pages
        refreshed a step, refresh threshold); 0 where the policy has none."""
        get = lambda name, *args: getattr(self, name)(*args) if hasattr(self, name) else 0
        return (get("sink_pages", page_size), get("recent_pages", budget_pages), get("refresh_pages", budget_pages),
                float(getattr(self, "refresh_threshold", 0.0)))

    def evictable(self, c) -> Tensor:
        return torch.ones_like(c.pinned)

    def eviction_key(self, c) -> Tensor:
        return c.page_id

    def attended_pages(self, c, q: Tensor) -> tuple[Tensor, Tensor] | None:
        """(order int64 [B, Hkv, P], count int64 [B, Hkv]): the first ``budget_pages`` entries of ``order``
        are distinct page slots, of which the first ``count`` are attended this step; the rest pads it to
        P, the length of flex's block lists. None: every resident page. Only a policy that ``narrows``
        returns a choice."""
        return None

    def observe(self, c, q: Tensor, valid: Tensor) -> None:
        return None


@dataclass(frozen=True)
class RaaS(Policy):
    """RaaS (arXiv 2502.11147): evict the page used longest ago; a page is "used" at a step when it
    is among the top ``refresh_ratio`` of the budget's pages by importance ("topk"; at least one
    page), or when its attention share exceeds ``refresh_threshold`` ("threshold", needs
    importance="attention"). The default 0.125 was chosen on the milestone testbed (docs/testbed.md);
    the paper refreshes the top half (0.5).
    importance: "bound" is Quest's page bound sum_d max(q_d M_d, q_d m_d) over per-page key max M and
    min m; "attention" is the page's share of the current query's softmax mass. Under GQA each KV
    head takes the max over its query heads. Ties in age go to the older logical page."""

    name: ClassVar[str] = "raas"
    append_code: ClassVar[int | None] = 0
    importance: str = "bound"
    refresh: str = "topk"
    refresh_ratio: float = 0.125
    refresh_threshold: float = 1e-4
    pin_prompt: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("importance", self.importance, ("bound", "attention"))
        check_choice("refresh", self.refresh, ("topk", "threshold"))
        check_float("refresh_ratio", self.refresh_ratio, 0.0, 1.0, low_open=True, high_open=False)
        check_float("refresh_threshold", self.refresh_threshold, 0.0, 1.0, low_open=False, high_open=True)
        if self.refresh == "threshold" and self.importance != "attention":
            raise ValueError("refresh='threshold' compares attention shares with refresh_threshold and needs "
                             f"importance='attention', got importance={self.importance!r}")

    def refresh_pages(self, budget_pages: int) -> int:
        """How many pages a "topk" step refreshes: ``refresh_ratio`` of the budget's pages, rounded
        down, and at least one (a step always refreshes the page it found most important)."""
        return max(1, int(self.refresh_ratio * budget_pages))

    @property
    def fused_observe(self) -> bool:
        return self.importance == "bound" and self.refresh == "topk"

    @property
    def step_observe(self) -> int | None:
        return 0 if self.importance == "bound" else 1 if self.refresh == "topk" else 2

    def eviction_key(self, c) -> Tensor:
        return c.stamp * (1 << 32) + c.page_id  # stamp first, then the older logical page

    def observe(self, c, q: Tensor, valid: Tensor) -> None:
        imp = c.page_bound(q) if self.importance == "bound" else c.page_share(q, valid)
        resident = c.page_id >= 0
        if self.refresh == "threshold":
            refreshed = resident & (imp > self.refresh_threshold)
        else:
            # page bounds are -inf on empty slots already; shares are 0 there
            key = imp if self.importance == "bound" else torch.where(resident, imp, float("-inf"))
            refreshed = resident & (descending_rank(key) < self.refresh_pages(c.budget_pages))
        c.stamp.masked_fill_(refreshed, c.step)
        torch.nan_to_num(imp, neginf=0.0, out=c.score)


def descending_rank(key: Tensor) -> Tensor:
    """Rank of each entry along the last dim in a stable descending sort (0 = largest; ties keep
    index order), int64 [..., P]. Compiled: pairwise comparison, O(P^2) per row but one fused
    reduction with no sort (P is at most a few hundred pages). Eager: a stable sort and its inverse
    permutation (three ops instead of eight: an eager CPU step pays per op)."""
    p = key.shape[-1]
    idx = torch.arange(p, device=key.device)
    if not torch.compiler.is_compiling():
        order = torch.sort(key, dim=-1, descending=True, stable=True).indices
        return torch.empty_like(order).scatter_(-1, order, idx.expand_as(order))
    a, b = key[..., :, None], key[..., None, :]
    return ((b > a) | ((b == a) & (idx[None, :] < idx[:, None]))).sum(-1)


@dataclass(frozen=True)
class Streaming(Policy):
    """StreamingLLM: ``sink_tokens`` initial tokens (kept as whole pages) + the most recent pages."""

    name: ClassVar[str] = "streaming"
    append_code: ClassVar[int | None] = 1
    sink_tokens: int = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("sink_tokens", self.sink_tokens, low=0)

    def sink_pages(self, page_size: int) -> int:
        return -(-self.sink_tokens // page_size)

    def validate(self, budget_pages: int, page_size: int) -> None:
        if self.sink_pages(page_size) >= budget_pages:
            raise ValueError(f"sink_tokens={self.sink_tokens} takes {self.sink_pages(page_size)} pages of the budget's "
                             f"{budget_pages}; at least one page must remain for the recent window")

    def evictable(self, c) -> Tensor:
        return c.page_id >= self.sink_pages(c.page_size)

    @property
    def step_observe(self) -> int | None:
        return 4  # nothing to observe


@dataclass(frozen=True)
class H2O(Policy):
    """H2O at page granularity: the most recent half of the budget's pages is protected; among the
    rest the page with the least accumulated attention share is evicted, for good."""

    name: ClassVar[str] = "h2o"
    append_code: ClassVar[int | None] = 2

    @staticmethod
    def recent_pages(budget_pages: int) -> int:
        return budget_pages - budget_pages // 2

    def evictable(self, c) -> Tensor:
        newest = c.length // c.page_size  # logical page being opened when one is needed
        return c.page_id <= (newest[:, None, None] - self.recent_pages(c.budget_pages))

    @property
    def step_observe(self) -> int | None:
        return 3

    def eviction_key(self, c) -> Tensor:
        return c.score

    def observe(self, c, q: Tensor, valid: Tensor) -> None:
        c.score.add_(c.page_share(q, valid))


@dataclass(frozen=True)
class Quest(Policy):
    """Quest (arXiv 2406.10774): keep every page; attend to the ``budget_pages`` pages with the
    largest page bound, always including the open page."""

    name: ClassVar[str] = "quest"
    bounded: ClassVar[bool] = False
    narrows: ClassVar[bool] = True
    append_code: ClassVar[int | None] = 3  # dense's rule: nothing is evictable

    def evictable(self, c) -> Tensor:
        return torch.zeros_like(c.pinned)

    def attended_pages(self, c, q: Tensor) -> tuple[Tensor, Tensor] | None:
        """The ``budget_pages`` first page slots in Quest's order: the open page, then the resident pages
        by page bound, largest first (ties: the lower slot first); all of them while fewer are resident."""
        if c.budget_pages >= c.P:
            return None  # the budget covers the whole buffer
        resident = c.page_id >= 0
        bound = torch.where(c.slot_index == c.open_slot[..., None], float("inf"), c.page_bound(q))
        order = torch.argsort(torch.where(resident, bound, float("-inf")), dim=-1, descending=True, stable=True)
        count = resident.sum(-1).clamp(max=c.budget_pages)
        return order, count


@dataclass(frozen=True)
class Dense(Policy):
    """Full attention over every token; nothing is evicted (O(N) memory)."""

    name: ClassVar[str] = "dense"
    bounded: ClassVar[bool] = False
    append_code: ClassVar[int | None] = 3

    def evictable(self, c) -> Tensor:
        return torch.zeros_like(c.pinned)

    @property
    def step_observe(self) -> int | None:
        return 4  # nothing to observe


POLICY_CLASSES = {cls.name: cls for cls in (RaaS, Quest, H2O, Streaming, Dense)}


def policy_options(name: str) -> tuple[str, ...]:
    return tuple(f.name for f in fields(POLICY_CLASSES[name]))


def make_policy(policy: str | Policy = "raas", *, extra_allowed: tuple[str, ...] = (), **options) -> Policy:
    """A policy from its name and options: ``make_policy("raas", refresh_ratio=0.25)``."""
    if isinstance(policy, Policy):
        if options:
            raise TypeError(f"options {sorted(options)} given with a {type(policy).__name__} object: set them on it")
        return policy
    check_choice("policy", policy, tuple(POLICY_CLASSES))
    allowed = policy_options(policy)
    for key in options:
        if key not in allowed:
            others = sorted({o for n in POLICY_CLASSES for o in policy_options(n)} - set(allowed))
            hint = f" ({key!r} belongs to another policy)" if key in others else ""
            raise TypeError(f"policy={policy!r} got an unknown option {key!r}{hint}; allowed: "
                            f"{', '.join(allowed + tuple(extra_allowed))}")
    return POLICY_CLASSES[policy](**options)
