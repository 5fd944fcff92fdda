"""Every policy's page table, step by step, against the plain-Python model in reference.py.

The engine runs eagerly with its attention call stubbed out (attention maths is tested in
test_attention.py) and with the page importance INJECTED by replacing the cache's ``page_bound`` /
``page_share`` methods on the instance: random floats, many ties, constants, always the same slot,
older-first, newer-first, or the engine's own values recorded ("real"). The reference model gets
the same values, so it needs no attention maths, and every step is compared exactly: page ids per
slot, stamps, pinned flags, scores, open slot, lengths, evictions, overflow, validity mask, block
lists and the K/V buffer contents. Invariants are also checked directly against the engine's state
before the step (independently of the model).

Keys encode the token: k[..., 0] = logical position, k[..., 1] = row, k[..., 2] = KV head (the rest
is noise), v[..., 0] = -position, so a slot holding the wrong token shows up at once.
"""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import event, given, settings
from hypothesis import strategies as st

from raas_flex import PagedKVCache, RaaSConfig, make_config
from raas_flex import masks
from reference import RefCache, f32

D = 16
GROUPS = (1, 2, 3, 6, 7)
MODES = ("random", "ties", "constant", "same_slot", "old_first", "new_first", "real")
# pages of the budget per page size: keeps 3x budget <= ~150 decode steps
MAX_PAGES = {1: 12, 2: 10, 4: 8, 8: 5, 16: 3}


# -- scenario generation ------------------------------------------------------------------------
@st.composite
def scenarios(draw, policy: str) -> dict:
    ps = draw(st.sampled_from([1, 2, 4, 8, 16]))
    bp = draw(st.integers(2, MAX_PAGES[ps]))
    budget = bp * ps
    kw = dict(policy=policy, budget=budget, page_size=ps)
    kw["pin_prompt"] = draw(st.sampled_from([None, None, True, False]))
    importance = "bound"
    if policy == "raas":
        if draw(st.booleans()):
            r = draw(st.integers(1, bp))
            kw["refresh_ratio"] = min(1.0, (r + 0.5) / bp)  # int(ratio * bp) == r exactly
        else:
            kw["refresh"] = "threshold"
            importance = "attention"
            kw["refresh_threshold"] = draw(st.sampled_from([0.0, 0.25, 0.5, 0.9]))
        kw["importance"] = importance
    if policy == "streaming":
        kw["sink_tokens"] = draw(st.integers(0, (bp - 1) * ps))
    if policy in ("quest", "dense"):
        kw["max_length"] = draw(st.integers(1, 4 * budget))
    bounded = policy in ("raas", "h2o", "streaming")
    P = bp if bounded else max(-(-kw["max_length"] // ps), bp)
    room = (P - 1 if bounded else P) * ps
    B = draw(st.integers(1, 3))
    hkv = draw(st.integers(1, 2))
    G = draw(st.sampled_from(GROUPS))
    lengths = [draw(st.integers(0, room)) for _ in range(B)]
    return dict(
        config=kw,
        B=B,
        Hq=G * hkv,
        Hkv=hkv,
        lengths=lengths,
        pad=draw(st.integers(0, 3)),
        left_pad=draw(st.booleans()),
        steps=draw(st.integers(1, 3 * budget + ps)),
        mode=draw(st.sampled_from(MODES)),
        seed=draw(st.integers(0, 2**16)),
    )


def token_kv(b: int, h: int, pos: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    k = torch.randn(D, generator=gen)
    v = torch.randn(D, generator=gen)
    k[0], k[1], k[2] = pos, b, h
    v[0], v[1], v[2] = -pos, b, h
    return k, v


def make_prompt(sc, gen):
    """Prompt k/v [B, Hkv, n, D] with padding (left or scattered) and the float history."""
    B, H, lengths = sc["B"], sc["Hkv"], sc["lengths"]
    n = max(lengths) + sc["pad"]
    rnd = random.Random(sc["seed"])
    k = torch.full((B, H, n, D), -1000.0)  # padding: a value no real token has
    v = torch.full((B, H, n, D), -1000.0)
    mask = torch.zeros(B, n, dtype=torch.bool)
    hist = {}
    for b, nb in enumerate(lengths):
        cols = list(range(n - nb, n)) if sc["left_pad"] else sorted(rnd.sample(range(n), nb))
        for pos, col in enumerate(cols):
            mask[b, col] = True
            for h in range(H):
                hist[b, h, pos] = token_kv(b, h, pos, gen)
                k[b, h, col], v[b, h, col] = hist[b, h, pos]
    return k, v, mask, hist


class Injector:
    """Replaces page_bound / page_share on one cache instance and records what they returned."""

    def __init__(self, cache: PagedKVCache, mode: str, seed: int) -> None:
        self.c, self.mode = cache, mode
        self.gen = torch.Generator().manual_seed(seed)
        self.calls: dict[str, torch.Tensor] = {}
        self.fixed_slot = torch.randint(0, cache.P, (cache.B, cache.H, 1), generator=self.gen)
        self.orig_bound, self.orig_share = cache.page_bound, cache.page_share
        cache.page_bound = self.bound
        cache.page_share = self.share

    def values(self, share: bool) -> torch.Tensor:
        pid = self.c.page_id
        shape, m = pid.shape, self.mode
        if m == "random":
            x = torch.rand(shape, generator=self.gen)
        elif m == "ties":
            x = torch.randint(0, 2, shape, generator=self.gen).float()
        elif m == "constant":
            x = torch.full(shape, 0.5)
        elif m == "same_slot":
            x = (torch.arange(self.c.P) == self.fixed_slot).float()
        elif m == "old_first":  # reversed recency: older pages matter more
            x = 1.0 / (2.0 + pid.float())
        else:  # new_first
            x = (pid.float() + 1.0) / 64.0
        resident = pid >= 0
        return torch.where(resident, x, 0.0 if share else float("-inf")).float()

    def bound(self, q):
        out = self.orig_bound(q) if self.mode == "real" else self.values(share=False)
        self.calls["bound"] = out.clone()
        return out

    def share(self, q, valid):
        out = self.orig_share(q, valid) if self.mode == "real" else self.values(share=True)
        self.calls["share"] = out.clone()
        return out


def stub_attention(cache: PagedKVCache) -> None:
    """The policy tests do not need the attention output (eager flex costs ~30 ms a call here); the
    stub keeps the block lists the step passed (``cache.step_lists``)."""

    def attend(q, lists=None):
        cache.step_lists = lists
        return torch.zeros_like(q)

    cache.attend = attend


def config_of(kw: dict) -> RaaSConfig:
    """The engine's configuration for a scenario's options (pin_prompt=None: the policy's default)."""
    kw = {k: v for k, v in kw.items() if not (k == "pin_prompt" and v is None)}
    return make_config(**kw)


def build(sc):
    cfg = config_of(sc["config"])
    cache = PagedKVCache(cfg, batch_size=sc["B"], num_heads=sc["Hq"], num_kv_heads=sc["Hkv"], head_dim=D)
    c = sc["config"]
    ref = RefCache(
        c["policy"], budget=c["budget"], page_size=c["page_size"], batch_size=sc["B"], num_kv_heads=sc["Hkv"],
        max_length=c.get("max_length"), refresh=c.get("refresh", "topk"), refresh_ratio=c.get("refresh_ratio", 0.5),
        refresh_threshold=c.get("refresh_threshold", 1e-4), pin_prompt=c.get("pin_prompt"),
        sink_tokens=c.get("sink_tokens", 4),
    )
    return cfg, cache, ref


# -- checks -------------------------------------------------------------------------------------
def check_block_lists(valid: torch.Tensor, block: int) -> None:
    """masks.block_lists against a from-scratch computation on the validity mask."""
    bh, s = valid.shape
    nb = s // block
    kv_num, kv_idx, full_num, full_idx = masks.block_lists(valid, block)
    assert kv_num.shape == full_num.shape == (bh, 1, 1)
    assert kv_idx.shape == full_idx.shape == (bh, 1, 1, nb)
    assert {t.dtype for t in (kv_num, kv_idx, full_num, full_idx)} == {torch.int32}
    v = valid.tolist()
    kn, ki, fn, fi = kv_num.flatten().tolist(), kv_idx.view(bh, nb).tolist(), full_num.flatten().tolist(), full_idx.view(bh, nb).tolist()
    for r in range(bh):
        blocks = [v[r][i * block:(i + 1) * block] for i in range(nb)]
        full = [i for i, x in enumerate(blocks) if all(x)]
        partial = [i for i, x in enumerate(blocks) if any(x) and not all(x)]
        assert kn[r] == len(partial) and sorted(ki[r][: kn[r]]) == partial, (r, blocks)
        assert fn[r] == len(full) and sorted(fi[r][: fn[r]]) == full, (r, blocks)
        # no block listed twice, none listed as both, no empty block listed
        assert len(set(ki[r][: kn[r]]) | set(fi[r][: fn[r]])) == kn[r] + fn[r]


def check_picked_lists(valid: torch.Tensor, lists, page_size: int) -> None:
    """A page-picking step's partial-only lists name exactly the pages that hold a valid slot."""
    kv_num, kv_idx = lists
    bh, s = valid.shape
    assert kv_num.dtype == kv_idx.dtype == torch.int32 and kv_num.shape == (bh, 1, 1)
    pages = valid.view(bh, s // page_size, page_size).any(-1)
    for r in range(bh):
        listed = kv_idx.view(bh, -1)[r, : kv_num[r].item()].tolist()
        assert len(listed) == len(set(listed)) and set(listed) == set(pages[r].nonzero().flatten().tolist()), r
    check_block_mask(valid, page_size, 1, lists)


def check_block_mask(valid: torch.Tensor, block: int, G: int, lists=None) -> None:
    bm = masks.build_block_mask(valid, block, G, masks.block_lists(valid, block) if lists is None else lists)
    bh, s = valid.shape
    dense = bm.to_dense()  # [bh, 1, 1, nb]: block listed (partial or full)
    assert torch.equal(dense.view(bh, -1).bool(), valid.view(bh, s // block, block).any(-1))
    b = torch.arange(bh)[:, None]
    kv = torch.arange(s)[None, :]
    z = torch.zeros((), dtype=torch.long)
    assert torch.equal(bm.mask_mod(b, z, z, kv), valid)


class Run:
    """Drives one cache and its reference model step by step, checking everything."""

    def __init__(self, sc) -> None:
        self.sc = sc
        self.cfg, self.c, self.ref = build(sc)
        stub_attention(self.c)
        self.inj = Injector(self.c, sc["mode"], sc["seed"])
        self.gen = torch.Generator().manual_seed(sc["seed"] + 1)
        k, v, mask, self.hist = make_prompt(sc, self.gen)
        self.c.prefill(k, v, mask)
        self.ref.prefill(sc["lengths"])
        self.pinned0 = {(b, h, p.page) for b, h in self.ref.rows() for p in self.ref.slots[b][h] if p and p.pinned}
        self.ptrs = [t.data_ptr() for t in self.c.buffers()]
        self.kv_bytes, self.state_bytes = self.c.kv_bytes, self.c.state_bytes
        self.refreshes = 0
        self.check_state(valid=None)

    # one decode step on both
    def step(self) -> None:
        c, ref, B, H = self.c, self.ref, self.sc["B"], self.sc["Hkv"]
        pre = c.page_state()
        self.inj.calls.clear()
        q = torch.randn(B, self.sc["Hq"], 1, D, generator=self.gen)
        kk = torch.empty(B, H, 1, D)
        vv = torch.empty(B, H, 1, D)
        for b in range(B):
            pos = ref.length[b]
            for h in range(H):
                self.hist[b, h, pos] = token_kv(b, h, pos, self.gen)
                kk[b, h, 0], vv[b, h, 0] = self.hist[b, h, pos]
        out = c.decode(q, kk, vv)
        assert out.shape == q.shape

        pol = self.cfg.policy
        policy = pol.name
        events = ref.append()
        bound = None
        if policy == "quest":
            # the engine may skip the ranking when the budget covers the whole buffer
            needed = self.cfg.budget_pages < self.c.P
            assert "bound" in self.inj.calls or not needed, "quest must rank pages by page_bound"
            bound = self.inj.calls["bound"].tolist() if "bound" in self.inj.calls else None
        ref_valid = ref.valid(bound)
        imp = None
        if policy == "raas":
            key = "bound" if pol.importance == "bound" else "share"
            assert key in self.inj.calls, f"raas with importance={pol.importance} must call page_{key}"
            imp = self.inj.calls[key].tolist()
        elif policy == "h2o":
            assert "share" in self.inj.calls, "h2o must accumulate page_share every step"
            imp = self.inj.calls["share"].tolist()
        refreshed = ref.observe(imp)
        self.check_invariants(pre, events, refreshed, imp)
        self.check_state(ref_valid)

    def check_state(self, valid) -> None:
        c, ref, ps = self.c, self.ref, self.cfg.page_size
        st_ = c.page_state()
        B, H = self.sc["B"], self.sc["Hkv"]
        assert (c.P, c.S) == (ref.P, ref.S)
        pid = st_.page_id.tolist()
        assert pid == ref.page_ids(), f"step {ref.step}"
        stamp, pinned, score = st_.stamp.tolist(), st_.pinned.tolist(), st_.score.tolist()
        for b, h in ref.rows():
            for i, p in enumerate(ref.slots[b][h]):
                if p is None:
                    assert not pinned[b][h][i]
                    continue
                assert stamp[b][h][i] == p.stamp, (b, h, i, ref.step)
                assert pinned[b][h][i] == p.pinned, (b, h, i)
                if self.cfg.policy.name in ("raas", "h2o"):
                    assert score[b][h][i] == p.score, (b, h, i, ref.step)
                else:
                    assert score[b][h][i] == 0.0
            if ref.open_slot[b][h] is not None:
                assert st_.open_slot[b, h].item() == ref.open_slot[b][h]
            # each logical page at most once
            ids = [g for g in pid[b][h] if g >= 0]
            assert len(ids) == len(set(ids))
        assert st_.length.tolist() == ref.length
        assert st_.step.item() == ref.step
        assert st_.evictions.tolist() == ref.evictions
        assert bool(st_.overflow) == ref.overflow
        assert st_.fill.tolist() == [ref.fill(b) for b in range(B)]
        res = st_.resident_tokens.tolist()
        for b, h in ref.rows():
            assert res[b][h] == ref.resident_tokens(b, h)
            if ref.bounded:
                assert res[b][h] <= self.cfg.budget
        if self.cfg.policy.name in ("quest", "dense"):
            assert st_.evictions.sum().item() == 0

        # every written token: resident in exactly one slot holding its key, or its whole page gone
        kbuf, vbuf = c.k, c.v
        for b, h in ref.rows():
            resident_pages = set(ids_ for ids_ in pid[b][h] if ids_ >= 0)
            last_page = (ref.length[b] - 1) // ps if ref.length[b] else -1
            gone = set(ref.evicted[b][h]) | set(ref.dropped[b][h])
            assert resident_pages.isdisjoint(gone)
            assert resident_pages | gone == set(range(last_page + 1))
            if ref.overflow:
                continue  # after an overflow the buffer's content is documented as invalid
            for i, g in enumerate(pid[b][h]):
                if g < 0:
                    continue
                toks = [g * ps + j for j in range(ps) if g * ps + j < ref.length[b]]
                assert toks, "a resident page holds at least one token"
                ks = torch.stack([self.hist[b, h, t][0] for t in toks])
                vs = torch.stack([self.hist[b, h, t][1] for t in toks])
                assert torch.equal(kbuf[b, h, i * ps: i * ps + len(toks)], ks), (b, h, i, g)
                assert torch.equal(vbuf[b, h, i * ps: i * ps + len(toks)], vs), (b, h, i, g)
                assert torch.equal(c.kmax[b, h, i], ks.amax(0)), (b, h, i)
                assert torch.equal(c.kmin[b, h, i], ks.amin(0)), (b, h, i)

        if valid is not None:
            flat = [valid[b][h] for b in range(B) for h in range(H)]
            assert c.valid.tolist() == flat, f"validity mask differs at step {ref.step}"
            # validity agrees with the page table by construction of the model; blocks with it
            for block in {c.block, ps, c.S}:
                check_block_lists(c.valid, block)
            check_block_mask(c.valid, c.block, c.G)
            if c.policy.narrows and c.budget_pages < c.P:
                check_picked_lists(c.valid, c.step_lists, c.block)
            else:
                assert c.step_lists is None
        # memory never moves or grows
        assert [t.data_ptr() for t in c.buffers()] == self.ptrs
        assert (c.kv_bytes, c.state_bytes) == (self.kv_bytes, self.state_bytes)

    def check_invariants(self, pre, events, refreshed, imp) -> None:
        """Eviction/refresh rules checked against the engine's own state before the step."""
        c, ps, pol = self.c, self.cfg.page_size, self.cfg.policy
        policy = pol.name
        post = c.page_state()
        p_id, p_stamp, p_pin, p_score = pre.page_id.tolist(), pre.stamp.tolist(), pre.pinned.tolist(), pre.score.tolist()
        n_id, n_stamp = post.page_id.tolist(), post.stamp.tolist()
        step = post.step.item()
        for b, h in self.ref.rows():
            pos = pre.length[b].item()
            changed = [i for i in range(c.P) if p_id[b][h][i] != n_id[b][h][i]]
            assert len(changed) <= 1, "at most one page slot changes per step"
            assert (len(changed) == 1) == (events[b][h].kind == "opened")
            # pinned pages from the prompt never leave
            for i in range(c.P):
                if p_pin[b][h][i]:
                    assert n_id[b][h][i] == p_id[b][h][i] and post.pinned[b, h, i]
            for (bb, hh, g) in self.pinned0:
                if (bb, hh) == (b, h):
                    assert g in n_id[b][h], f"pinned page {g} evicted"
            # the open page (holding the newest token) is resident unless the token found no slot
            if events[b][h].kind != "dropped":
                assert pos // ps in n_id[b][h]
            if changed:
                i = changed[0]
                assert pos % ps == 0 and n_id[b][h][i] == pos // ps and n_stamp[b][h][i] == step
                old = p_id[b][h][i]
                if old >= 0:  # an eviction
                    assert not p_pin[b][h][i]
                    assert (old + 1) * ps <= pos, "only full pages are evicted"
                    assert -1 not in p_id[b][h], "evicted although a slot was free"
                    cand = [j for j in range(c.P) if p_id[b][h][j] >= 0 and not p_pin[b][h][j]]
                    if policy == "raas":  # oldest timestamp, ties to the older page
                        best = min(cand, key=lambda j: (p_stamp[b][h][j], p_id[b][h][j]))
                        assert i == best, (p_stamp[b][h], p_id[b][h])
                    elif policy == "streaming":
                        cand = [j for j in cand if p_id[b][h][j] >= pol.sink_pages(ps)]
                        assert i == min(cand, key=lambda j: p_id[b][h][j])
                    elif policy == "h2o":
                        limit = pos // ps - (self.cfg.budget_pages - self.cfg.budget_pages // 2)
                        assert pol.recent_pages(self.cfg.budget_pages) == self.cfg.budget_pages - self.cfg.budget_pages // 2
                        assert old <= limit, "h2o evicted a protected recent page"
                        cand = [j for j in cand if p_id[b][h][j] <= limit]
                        assert i == min(cand, key=lambda j: (p_score[b][h][j], j))
                    else:
                        raise AssertionError(f"{policy} must never evict")
                else:
                    assert i == p_id[b][h].index(-1), "a new page takes the lowest free slot"
            if policy == "raas":
                stamped = {i for i in range(c.P) if n_id[b][h][i] >= 0 and n_stamp[b][h][i] == step}
                new = {changed[0]} if changed else set()
                resident = [i for i in range(c.P) if n_id[b][h][i] >= 0]
                if pol.refresh == "topk":
                    top = set(sorted(resident, key=lambda i: (-imp[b][h][i], i))[: pol.refresh_pages(self.cfg.budget_pages)])
                else:
                    top = {i for i in resident if imp[b][h][i] > f32(pol.refresh_threshold)}
                assert set(refreshed[b][h]) == top
                assert stamped == top | new, (stamped, top, new)
                self.refreshes += len(top)


def run_scenario(sc) -> Run:
    run = Run(sc)
    for _ in range(sc["steps"]):
        run.step()
    # coverage of the generated runs (see pytest --hypothesis-show-statistics)
    event(f"importance={sc['mode']}")
    event(f"evicted={run.c.evictions.sum().item() > 0}")
    event(f"overflow={run.ref.overflow}")
    event(f"ps={run.cfg.page_size}")
    return run


# -- property tests -----------------------------------------------------------------------------
# example counts come from the hypothesis profile in conftest.py (default: 40)
@pytest.mark.parametrize("policy", ["raas", "quest", "h2o", "streaming", "dense"])
@given(data=st.data())
def test_policy_matches_reference(policy, data):
    sc = data.draw(scenarios(policy))
    run_scenario(sc)


@pytest.mark.parametrize("policy", ["raas", "h2o", "streaming"])
@settings(max_examples=max(10, settings.default.max_examples // 3))
@given(data=st.data())
def test_bounded_long_run_evicts(policy, data):
    """3x the budget with the policy's default pinning: every (row, head) must evict pages, never
    overflow, and (raas top-k) refresh pages."""
    sc = data.draw(scenarios(policy))
    sc["config"]["pin_prompt"] = None
    sc["steps"] = 3 * sc["config"]["budget"]
    run = run_scenario(sc)
    assert run.c.evictions.min().item() > 0
    assert not run.c.overflow
    if policy == "raas" and run.cfg.policy.refresh == "topk":
        assert run.refreshes >= sc["B"] * sc["Hkv"] * sc["steps"]  # >= 1 page per step


# -- hand-worked examples (they pin the reference model itself down) -----------------------------
def _hand_run(policy, steps, imp_of_page, **cfg_kw):
    """ps = 1, budget = 4, one prompt token; importance per logical page id."""
    cfg = make_config(4, policy, page_size=1, **cfg_kw)
    c = PagedKVCache(cfg, batch_size=1, num_heads=1, num_kv_heads=1, head_dim=D)
    stub_attention(c)

    def values(*_):
        x = torch.tensor([[[imp_of_page(g) for g in c.page_id[0, 0].tolist()]]], dtype=torch.float32)
        return torch.where(c.page_id >= 0, x, 0.0)

    c.page_bound = values
    c.page_share = values
    c.prefill(torch.zeros(1, 1, 1, D), torch.zeros(1, 1, 1, D))
    for _ in range(steps):
        c.decode(torch.ones(1, 1, 1, D), torch.zeros(1, 1, 1, D), torch.zeros(1, 1, 1, D))
    return c.page_state()


def test_hand_raas_keeps_milestone_page():
    # r = 1: page 1 is the most important page every step, so its stamp keeps moving and the
    # pages after it are evicted in FIFO order (see RAAS_SPEC "milestone tokens").
    st_ = _hand_run("raas", 6, lambda g: 1.0 if g == 1 else 0.0, refresh_ratio=0.25)
    assert st_.page_id[0, 0].tolist() == [0, 1, 6, 5]
    assert st_.stamp[0, 0].tolist() == [0, 6, 6, 5]
    assert st_.pinned[0, 0].tolist() == [True, False, False, False]
    assert st_.evictions.tolist() == [[3]]


def test_hand_raas_constant_importance_is_fifo_after_pinned():
    # ties go to the lower slot: the pinned prompt page takes the one refresh, page 1.. are FIFO
    st_ = _hand_run("raas", 6, lambda g: 0.5, refresh_ratio=0.25)
    assert st_.page_id[0, 0].tolist() == [0, 4, 5, 6]


def test_hand_streaming_and_h2o():
    st_ = _hand_run("streaming", 6, lambda g: 0.0, sink_tokens=1)
    assert st_.page_id[0, 0].tolist() == [0, 4, 5, 6]
    # h2o: 2 recent pages protected; page 1 is a heavy hitter, page 0 (prompt) is not
    st_ = _hand_run("h2o", 6, lambda g: 1.0 if g == 1 else 0.25)
    # step 4 (pos 4): evictable pages <= 2 -> scores p0 .75, p1 3, p2 .5 -> evict page 2
    # step 5 (pos 5): evictable <= 3 -> p0 1.0, p1 4, p3 .75 -> evict page 3
    # step 6 (pos 6): evictable <= 4 -> p0 1.25, p1 5, p4 .5 -> evict page 4
    assert st_.page_id[0, 0].tolist() == [0, 1, 6, 5]
    assert st_.evictions.tolist() == [[3]]


def test_hand_quest_attends_top_pages_and_open_page():
    cfg = RaaSConfig(budget=4, page_size=2, policy="quest", max_length=12)  # 2 pages attended of 6
    c = PagedKVCache(cfg, batch_size=1, num_heads=2, num_kv_heads=1, head_dim=D)
    stub_attention(c)
    c.page_bound = lambda q: torch.tensor([[[0.1, 0.9, 0.3, 0.8, -5.0, float("-inf")]]])
    k = torch.zeros(1, 1, 8, D)
    c.prefill(k, k)  # pages 0..3 resident, open page 3 full
    c.decode(torch.ones(1, 2, 1, D), torch.zeros(1, 1, 1, D), torch.zeros(1, 1, 1, D))
    # new page 4 opens in slot 4 (bound -5) and is attended anyway, with the best other page (1)
    assert c.page_id[0, 0].tolist() == [0, 1, 2, 3, 4, -1]
    assert c.valid[0].view(6, 2).tolist() == [[False] * 2, [True] * 2, [False] * 2, [False] * 2, [True, False], [False] * 2]


# -- importance functions of the engine (the injected tests bypass them) ------------------------
@pytest.mark.parametrize("G,hkv,ps", [(1, 1, 4), (3, 2, 2), (7, 1, 8), (6, 2, 1)])
def test_page_bound_and_share_match_float64(G, hkv, ps):
    torch.manual_seed(G * 10 + ps)
    B, bp = 2, 4
    cfg = RaaSConfig(budget=bp * ps, page_size=ps, policy="raas")
    c = PagedKVCache(cfg, batch_size=B, num_heads=G * hkv, num_kv_heads=hkv, head_dim=D)
    stub_attention(c)
    n = (bp - 1) * ps
    lens = [n, n - (ps // 2 + 1)]  # row 1 is left-padded
    hist = torch.randn(B, hkv, n + 2 * bp * ps + 1, D)
    kp = torch.zeros(B, hkv, n, D)
    mask = torch.zeros(B, n, dtype=torch.bool)
    for b, nb in enumerate(lens):
        kp[b, :, n - nb:] = hist[b, :, :nb]
        mask[b, n - nb:] = True
    c.prefill(kp, kp, mask)
    for _ in range(2 * bp * ps):
        pos = c.length.tolist()
        kk = torch.stack([hist[b, :, pos[b]] for b in range(B)])[:, :, None]
        q = torch.randn(B, G * hkv, 1, D)
        c.decode(q, kk, kk)
        bound = c.page_bound(q)
        share = c.page_share(q, c.valid.view(B, hkv, -1))
        qd = q.double().view(B, hkv, G, D)
        for b in range(B):
            for h in range(hkv):
                toks, slot_of = [], []
                for i, g in enumerate(c.page_id[b, h].tolist()):
                    if g < 0:
                        assert bound[b, h, i] == float("-inf") and share[b, h, i] == 0
                        continue
                    t = [g * ps + j for j in range(ps) if g * ps + j < pos[b] + 1]
                    keys = hist[b, h, t].double()
                    hi, lo = keys.amax(0), keys.amin(0)
                    expect = (torch.maximum(qd[b, h] * hi, qd[b, h] * lo)).sum(-1).max()
                    torch.testing.assert_close(bound[b, h, i].double(), expect, rtol=1e-5, atol=1e-5)
                    toks += t
                    slot_of += [i] * len(t)
                logits = qd[b, h] @ hist[b, h, toks].double().T * D**-0.5  # [G, T]
                p = logits.softmax(-1)
                expect = torch.zeros(G, c.P, dtype=torch.float64).index_add_(1, torch.tensor(slot_of), p).amax(0)
                torch.testing.assert_close(share[b, h].double(), expect, rtol=1e-5, atol=1e-6)


# -- memory class -------------------------------------------------------------------------------
@pytest.mark.parametrize("policy", ["raas", "quest", "h2o", "streaming", "dense"])
def test_memory_class(policy):
    budget, ps, B, Hkv = 32, 4, 2, 2

    def make(max_length):
        cfg = RaaSConfig(budget=budget, page_size=ps, policy=policy)
        return PagedKVCache(cfg, batch_size=B, num_heads=4, num_kv_heads=Hkv, head_dim=D, max_length=max_length)

    small, large = make(64), make(512)
    if policy in ("raas", "h2o", "streaming"):
        assert small.kv_bytes == large.kv_bytes == 2 * B * Hkv * budget * D * 4
        assert small.state_bytes == large.state_bytes
    else:
        assert small.kv_bytes == 2 * B * Hkv * 64 * D * 4
        assert large.kv_bytes == 2 * B * Hkv * 512 * D * 4
        assert large.state_bytes > small.state_bytes
        # never below the attention budget
        assert make(8).kv_bytes == 2 * B * Hkv * budget * D * 4
    # constant over a run that opens and evicts pages
    c = small
    stub_attention(c)
    c.prefill(torch.randn(B, Hkv, 5, D), torch.randn(B, Hkv, 5, D))
    before = (c.kv_bytes, c.state_bytes, [t.data_ptr() for t in c.buffers()])
    for _ in range(50):
        c.decode(torch.randn(B, 4, 1, D), torch.randn(B, Hkv, 1, D), torch.randn(B, Hkv, 1, D))
    assert (c.kv_bytes, c.state_bytes, [t.data_ptr() for t in c.buffers()]) == before
    c.check()  # no overflow within max_length
    if policy in ("raas", "h2o", "streaming"):
        assert c.page_state().resident_tokens.max().item() <= budget
        assert c.evictions.min().item() > 0
    else:
        assert c.page_state().resident_tokens.min().item() == 55


# -- overflow -----------------------------------------------------------------------------------
@pytest.mark.parametrize("policy,kw", [("dense", {"max_length": 8}), ("quest", {"max_length": 8}), ("h2o", {"pin_prompt": True})])
def test_overflow_is_flagged_and_page_table_kept(policy, kw):
    cfg = make_config(8, policy, page_size=2, **kw)
    c = PagedKVCache(cfg, batch_size=1, num_heads=1, num_kv_heads=1, head_dim=D)
    stub_attention(c)
    c.prefill(torch.randn(1, 1, 6, D), torch.randn(1, 1, 6, D))
    ref = RefCache(policy, budget=8, page_size=2, batch_size=1, num_kv_heads=1, **kw)
    ref.prefill([6])
    for i in range(6):
        c.decode(torch.randn(1, 1, 1, D), torch.randn(1, 1, 1, D), torch.randn(1, 1, 1, D))
        ref.append()
        ref.observe([[[0.0] * ref.P]] if policy == "h2o" else None)
        assert c.page_id.tolist() == [ref.page_ids()[0]]
        assert c.length.tolist() == ref.length
        assert bool(c.overflow) == ref.overflow
    assert ref.overflow
    with pytest.raises(RuntimeError, match=f"policy='{policy}'"):
        c.check()


_compiled_rank = None


@settings(max_examples=60)
@given(st.lists(st.lists(st.sampled_from([float("-inf"), -1.0, 0.0, 0.5, 2.0]), min_size=7, max_size=7),
                min_size=1, max_size=3))
def test_descending_rank_is_a_stable_descending_sort_eager_and_compiled(rows):
    """The top-k refresh's rank: 0 = largest, ties (repeated values, -inf for empty slots) in index
    order, against a plain Python sort; the compiled form (pairwise comparison) gives the same ranks."""
    global _compiled_rank
    from raas_flex.policies import descending_rank

    key = torch.tensor(rows)
    want = torch.zeros(key.shape, dtype=torch.int64)
    for r, row in enumerate(rows):
        for rank, i in enumerate(sorted(range(len(row)), key=lambda i: (-row[i], i))):
            want[r, i] = rank
    assert torch.equal(descending_rank(key), want)
    if _compiled_rank is None:
        _compiled_rank = torch.compile(descending_rank, fullgraph=True, dynamic=False)
    assert torch.equal(_compiled_rank(key), want)
