"""Plain-Python reference model of the paged KV cache and its policies (no torch, no engine code).

State per (row b, KV head h): a list of ``P`` page slots, each empty (None) or holding a
:class:`Page` (logical page id, stamp, pinned, score). The model follows RAAS_SPEC.md and the
semantics the engine documents:

- prefill: row b's n_b real tokens are logical tokens 0..n_b-1; logical page g sits in slot g,
  stamp 0, pinned = pins_prompt. The prompt must fit in P-1 pages (bounded policies: one page stays
  free for decoding) or P pages (quest, dense), else ValueError. step = 0.
- decode step: step += 1; the token's logical position is pos = length[b]. If pos % ps == 0 a new
  logical page pos // ps is opened in the lowest free slot, else in the slot of the evictable page
  with the smallest eviction key (ties toward the lower slot); evictable = resident, not pinned and
  allowed by the policy. The previously open (now full) page is evictable. A new page has stamp =
  step, pinned False, score 0. With no free and no evictable slot the token is dropped and the
  overflow flag set (as are the later tokens of that logical page, which has no slot).
  length += 1 always.
- attention runs over valid slots (resident page, logical position < length); quest narrows them to
  the ``budget_pages`` pages with the largest bound, the open page always included (ties toward the
  lower slot).
- observe: raas refreshes (stamp = step) the ``refresh_pages`` resident pages with the highest
  importance (ties toward the lower slot), or those with importance > threshold; its score is the
  last importance. h2o adds the attention share to each page's score (float32 arithmetic).

Importance values are inputs here (the tests inject or record them); this model does no attention
maths. Floats that the engine keeps in float32 are rounded with :func:`f32` so that comparisons are
exact.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field

POLICIES = ("raas", "quest", "h2o", "streaming", "dense")
BOUNDED = ("raas", "h2o", "streaming")
F32_MAX = 3.4028234663852886e38


def f32(x: float) -> float:
    """Round a Python float to the nearest float32 (what a float32 tensor would store)."""
    if math.isinf(x) or math.isnan(x):
        return x
    if abs(x) > F32_MAX:
        return math.copysign(math.inf, x)
    return struct.unpack("f", struct.pack("f", x))[0]


def nan_to_num(x: float) -> float:
    """torch.nan_to_num(x, neginf=0.0) for a float32 value."""
    if math.isnan(x) or x == -math.inf:
        return 0.0
    if x == math.inf:
        return F32_MAX
    return x


@dataclass
class Page:
    page: int  # logical page id
    stamp: int
    pinned: bool
    score: float = 0.0


@dataclass
class StepEvent:
    """What happened to one (row, KV head) in one decode step."""

    kind: str  # "opened", "write" or "dropped"
    slot: int | None = None  # page slot written to
    evicted: int | None = None  # logical page evicted to make room (kind == "opened")


@dataclass
class RefCache:
    policy: str
    budget: int
    page_size: int
    batch_size: int
    num_kv_heads: int
    max_length: int | None = None
    refresh: str = "topk"
    refresh_ratio: float = 0.125
    refresh_threshold: float = 1e-4
    pin_prompt: bool | None = None
    sink_tokens: int = 4
    # state (filled in __post_init__ / prefill)
    slots: list = field(default_factory=list)
    open_slot: list = field(default_factory=list)
    length: list = field(default_factory=list)
    step: int = 0
    overflow: bool = False
    evictions: list = field(default_factory=list)
    evicted: list = field(default_factory=list)  # [b][h] logical pages evicted, in order
    dropped: list = field(default_factory=list)  # [b][h] logical pages that found no slot

    def __post_init__(self) -> None:
        assert self.policy in POLICIES, self.policy
        ps = self.page_size
        self.budget_pages = self.budget // ps
        self.bounded = self.policy in BOUNDED
        if self.bounded:
            self.P = self.budget_pages
        else:
            self.P = max(-(-self.max_length // ps), self.budget_pages)
        self.S = self.P * ps
        self.pins = self.pin_prompt if self.pin_prompt is not None else self.policy == "raas"
        self.refresh_pages = max(1, int(self.refresh_ratio * self.budget_pages))
        self.sink_pages = -(-self.sink_tokens // ps)
        self.h2o_recent = self.budget_pages - self.budget_pages // 2
        self._clear()

    def _clear(self) -> None:
        B, H, P = self.batch_size, self.num_kv_heads, self.P
        self.slots = [[[None] * P for _ in range(H)] for _ in range(B)]
        self.open_slot = [[None] * H for _ in range(B)]
        self.length = [0] * B
        self.step = 0
        self.overflow = False
        self.evictions = [[0] * H for _ in range(B)]
        self.evicted = [[[] for _ in range(H)] for _ in range(B)]
        self.dropped = [[[] for _ in range(H)] for _ in range(B)]

    def rows(self):
        for b in range(self.batch_size):
            for h in range(self.num_kv_heads):
                yield b, h

    # -- prefill ------------------------------------------------------------------------------
    def prefill(self, lengths: list[int]) -> None:
        ps = self.page_size
        room = self.P - 1 if self.bounded else self.P
        need = max((-(-n // ps) for n in lengths), default=0)
        if need > room:
            raise ValueError(f"prompt needs {need} pages, room for {room}")
        self._clear()
        for b, n in enumerate(lengths):
            pages = -(-n // ps)
            self.length[b] = n
            for h in range(self.num_kv_heads):
                for g in range(pages):
                    self.slots[b][h][g] = Page(page=g, stamp=0, pinned=self.pins)
                self.open_slot[b][h] = pages - 1 if pages else None

    # -- eviction rules -----------------------------------------------------------------------
    def _evictable(self, page: Page, pos: int) -> bool:
        if page.pinned:
            return False
        if self.policy == "raas":
            return True
        if self.policy == "streaming":
            return page.page >= self.sink_pages
        if self.policy == "h2o":
            return page.page <= pos // self.page_size - self.h2o_recent
        return False  # quest, dense keep every page

    def _key(self, page: Page):
        if self.policy == "raas":
            return (page.stamp, page.page)
        if self.policy == "streaming":
            return page.page
        if self.policy == "h2o":
            return page.score
        raise AssertionError("quest/dense never evict")

    def victim(self, b: int, h: int, pos: int) -> int | None:
        """Slot of the page that opening a page at ``pos`` would evict (None if none may be)."""
        row = self.slots[b][h]
        cands = [i for i, p in enumerate(row) if p is not None and self._evictable(p, pos)]
        if not cands:
            return None
        return min(cands, key=lambda i: (self._key(row[i]), i))

    def slot_of(self, b: int, h: int, page: int) -> int | None:
        for i, p in enumerate(self.slots[b][h]):
            if p is not None and p.page == page:
                return i
        return None

    # -- decode step --------------------------------------------------------------------------
    def append(self) -> list[list[StepEvent]]:
        """First part of a step: write one token per row (opening/evicting pages)."""
        ps = self.page_size
        self.step += 1
        events = [[None] * self.num_kv_heads for _ in range(self.batch_size)]
        for b in range(self.batch_size):
            pos = self.length[b]
            g = pos // ps
            for h in range(self.num_kv_heads):
                row = self.slots[b][h]
                if pos % ps == 0:
                    free = [i for i, p in enumerate(row) if p is None]
                    evicted = None
                    if free:
                        slot = free[0]
                    else:
                        slot = self.victim(b, h, pos)
                        if slot is not None:
                            evicted = row[slot].page
                            self.evictions[b][h] += 1
                            self.evicted[b][h].append(evicted)
                    if slot is None:
                        self.overflow = True
                        self.dropped[b][h].append(g)
                        events[b][h] = StepEvent("dropped")
                    else:
                        row[slot] = Page(page=g, stamp=self.step, pinned=False, score=0.0)
                        self.open_slot[b][h] = slot
                        events[b][h] = StepEvent("opened", slot, evicted)
                else:
                    slot = self.slot_of(b, h, g)
                    if slot is None:  # the page found no slot when it was opened
                        self.overflow = True
                        events[b][h] = StepEvent("dropped")
                    else:
                        events[b][h] = StepEvent("write", slot)
            self.length[b] += 1
        return events

    def attended_slots(self, b: int, h: int, bound: list[float] | None = None) -> list[int]:
        """Page slots attended this step (sorted). quest needs the per-slot ``bound``."""
        row = self.slots[b][h]
        resident = [i for i, p in enumerate(row) if p is not None]
        if self.policy != "quest" or len(resident) <= self.budget_pages:
            return resident  # quest: the budget covers every resident page
        assert bound is not None, "quest needs the page bound"
        open_slot = self.open_slot[b][h]

        def key(i):
            v = math.inf if i == open_slot else bound[i]
            return (-v, i)

        return sorted(sorted(resident, key=key)[: self.budget_pages])

    def valid(self, bound=None) -> list[list[list[bool]]]:
        """[b][h][S] token slots attended this step. bound: [b][h][P] floats (quest only)."""
        ps = self.page_size
        out = []
        for b in range(self.batch_size):
            per_head = []
            for h in range(self.num_kv_heads):
                v = [False] * self.S
                for i in self.attended_slots(b, h, None if bound is None else bound[b][h]):
                    page = self.slots[b][h][i].page
                    for j in range(ps):
                        v[i * ps + j] = page * ps + j < self.length[b]
                per_head.append(v)
            out.append(per_head)
        return out

    def observe(self, importance=None) -> list[list[list[int]]]:
        """Second part of a step. importance: [b][h][P] floats (raas: the page importance; h2o:
        the attention share). Returns the slots refreshed per (b, h) (raas), else empty lists."""
        refreshed = [[[] for _ in range(self.num_kv_heads)] for _ in range(self.batch_size)]
        if self.policy == "raas":
            thr = f32(self.refresh_threshold)  # compared against a float32 tensor
            for b, h in self.rows():
                row, imp = self.slots[b][h], importance[b][h]
                resident = [i for i, p in enumerate(row) if p is not None]
                if self.refresh == "topk":
                    top = sorted(resident, key=lambda i: (-imp[i], i))[: self.refresh_pages]
                else:
                    top = [i for i in resident if imp[i] > thr]
                for i in top:
                    row[i].stamp = self.step
                for i in resident:
                    row[i].score = nan_to_num(imp[i])
                refreshed[b][h] = sorted(top)
        elif self.policy == "h2o":
            for b, h in self.rows():
                for i, p in enumerate(self.slots[b][h]):
                    if p is not None:
                        p.score = f32(p.score + importance[b][h][i])
        return refreshed

    # -- views --------------------------------------------------------------------------------
    def page_ids(self) -> list:
        return [[[-1 if p is None else p.page for p in self.slots[b][h]] for h in range(self.num_kv_heads)]
                for b in range(self.batch_size)]

    def resident_tokens(self, b: int, h: int) -> int:
        ps = self.page_size
        return sum(
            max(0, min(ps, self.length[b] - p.page * ps)) for p in self.slots[b][h] if p is not None
        )

    def fill(self, b: int) -> int:
        n = self.length[b]
        return 0 if n == 0 else n - (n - 1) // self.page_size * self.page_size

    def token_home(self, b: int, h: int, pos: int):
        """Where token ``pos`` lives: ("resident", buffer slot), ("evicted", page) or ("dropped", page)."""
        g = pos // self.page_size
        slot = self.slot_of(b, h, g)
        if slot is not None:
            return "resident", slot * self.page_size + pos % self.page_size
        if g in self.dropped[b][h]:
            return "dropped", g
        assert g in self.evicted[b][h], (b, h, pos)
        return "evicted", g
