"""Attention tracing: per decode step, layer and KV head, the attention share of every logical page,
the pages resident in the cache and the policy's evictions; and the head classification of the paper
(milestone-like, streaming-like, phoenix-bearing maps).

    with raas_flex.tracing(model, layers=[0, 3], heads=None, max_steps=2048) as tr:
        model.generate(input_ids, max_new_tokens=2048)
    tr.save("trace.pt")                       # raas_flex.AttentionTrace.load("trace.pt")
    summary = raas_flex.classify_heads(tr)    # counts and fractions per label
    raas_flex.plots.waterfall(tr, layer=0, head=1, path="L0H1.png")

What one decode step records (one batch row, ``row``; logical page g = tokens g*page_size ..
g*page_size+page_size-1 of that row, prompt pages included, left padding excluded):

    share      fp32 [max_steps, layers, heads, members, max_pages]  softmax mass of the step's query on
               each logical page, over the slots the step attended (0 for pages not attended). The G
               query heads of a KV head are combined by ``group``: "mean" (the default: each step's
               shares sum to 1 over the attended pages), "max" (what ``importance="attention"`` uses),
               or "each" (members = G: one map per query head, like the paper's per-head maps).
    resident   bool [max_steps, layers, heads, max_pages]  page held in the cache after the step's append
    refreshed  bool [max_steps, layers, heads, max_pages]  page's timestamp equals the step after the
               policy's observe (RaaS: refreshed as important this step, or opened this step)
    length     int64 [max_steps]  tokens of the row after the step's append
    resident0  bool [layers, heads, max_pages]  pages resident after the prompt

Evictions are the pages resident after step t-1 (or the prompt) and not after step t
(:meth:`AttentionTrace.evictions`); every policy's evictions are final, so this is exact.

Cost. Off (the default, outside a :func:`tracing` block): nothing is added to the decode step; the
attention function tests one Python attribute (``runtime.tracer is not None``), which a compiled
decode forward guards on, so its graph has no extra op. On: every traced layer recomputes the
query's attention over its K buffer in fp32 (from the stored keys: in a bf16/fp16 cache the shares
match the kernel's to that precision) and copies the results to the host, one sync per layer and
step; ``generate`` runs eager (``disable_compile=True``; a compiled forward that reaches the hook
raises). Memory is allocated once, when the prompt has run, and never grows: ``nbytes`` = max_steps
x layers x heads x (4 x members + 2) x max_pages bytes; over ``max_bytes`` it raises before
allocating. Steps past ``max_steps`` and pages at or past ``max_pages`` are not recorded and set
``truncated`` (with the reason in ``truncation``) and warn once; nothing is dropped silently.

One :func:`tracing` block records one generation (a second prompt in the same block raises).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import warnings
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

__all__ = ["AttentionTrace", "MapClass", "LABELS", "GROUPS", "classify_heads", "classify_map", "summary_table",
           "tracing"]

GROUPS = ("mean", "max", "each")
LABELS = ("milestone-like", "streaming-like", "phoenix-bearing", "other")
_FORMAT = "raas_flex.trace/1"
_TENSORS = ("share", "resident", "refreshed", "length", "resident0")
_META = ("layers", "heads", "group", "row", "max_steps", "max_pages", "page_size", "policy", "budget",
         "num_kv_heads", "group_size", "prompt_tokens", "steps", "truncated", "truncation", "max_bytes")


def _check_pos_int(name: str, value, *, low: int = 1, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int{' or None' if allow_none else ''}, got {value!r} ({type(value).__name__})")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value!r}")


def _check_index_list(name: str, value, limit: int | None) -> tuple[int, ...] | None:
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise TypeError(f"{name} must be None (all), an int or a sequence of ints, got {value!r}")
    out = []
    for v in value:
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{name} must hold ints, got {v!r} ({type(v).__name__}) in {list(value)!r}")
        if v < 0 or (limit is not None and v >= limit):
            allowed = f"0..{limit - 1}" if limit is not None else ">= 0"
            raise ValueError(f"{name} holds {v}, out of range; allowed: {allowed}")
        out.append(v)
    if not out:
        raise ValueError(f"{name} is empty; pass None for all, or at least one index")
    if len(set(out)) != len(out):
        raise ValueError(f"{name} has duplicates: {list(value)!r}")
    return tuple(sorted(out))


class AttentionTrace:
    """Recorded attention shares, residency and evictions of one generation (see the module docstring).

    Args:
        layers: decoder layers to record (None: all).
        heads: KV heads to record (None: all).
        max_steps: decode steps recorded (later steps set ``truncated``).
        max_pages: logical pages recorded per map (pages >= max_pages set ``truncated``). None:
            enough for the prompt plus ``max_steps`` tokens (known once the prompt has run).
        group: how a KV head's query heads combine, one of ``GROUPS``.
        row: batch row recorded.
        max_bytes: refuse (ValueError, before allocating) a trace larger than this.

    Built by :func:`tracing`, or by :meth:`load`. After the generation, ``steps`` steps were recorded;
    the tensors hold ``max_steps`` rows (``trim()`` or ``save`` keep the first ``steps``).
    """

    def __init__(self, *, layers=None, heads=None, max_steps: int = 4096, max_pages: int | None = None,
                 group: str = "mean", row: int = 0, max_bytes: int = 2**30) -> None:
        _check_pos_int("max_steps", max_steps)
        _check_pos_int("max_pages", max_pages, allow_none=True)
        _check_pos_int("row", row, low=0)
        _check_pos_int("max_bytes", max_bytes)
        if group not in GROUPS:
            raise ValueError(f"group={group!r} is not supported; allowed: {', '.join(map(repr, GROUPS))}")
        self.layers = _check_index_list("layers", layers, None)
        self.heads = _check_index_list("heads", heads, None)
        self.max_steps, self.max_pages, self.group, self.row, self.max_bytes = max_steps, max_pages, group, row, max_bytes
        self._auto_pages = max_pages is None  # sized from the prompt (again for each piece of a prompt in pieces)
        self.page_size: int | None = None
        self.policy: str | None = None
        self.budget: int | None = None
        self.num_kv_heads: int | None = None
        self.group_size: int | None = None
        self.prompt_tokens: int | None = None
        self.steps = 0
        self.truncated = False
        self.truncation: list[str] = []
        self.share = self.resident = self.refreshed = self.length = self.resident0 = None
        self._prefilled: set[int] = set()
        self._recording = True

    # -- recording (called by raas_flex.hf) ------------------------------------------------------------
    def bind(self, num_layers: int) -> None:
        """Check ``layers`` against the model and resolve None (called by :func:`tracing`)."""
        if self.layers is None:
            self.layers = tuple(range(num_layers))
        else:
            _check_index_list("layers", list(self.layers), num_layers)
        self._layer_pos = {layer: i for i, layer in enumerate(self.layers)}

    @property
    def members(self) -> int:
        return (self.group_size or 1) if self.group == "each" else 1

    @property
    def nbytes(self) -> int:
        """Bytes of the recorded tensors (0 before the prompt has run)."""
        return sum(t.numel() * t.element_size() for t in self._tensors().values() if t is not None)

    def _tensors(self) -> dict:
        return {name: getattr(self, name) for name in _TENSORS}

    def _fail(self, exc, msg: str):
        raise exc(f"raas_flex.tracing: {msg}")

    def _truncate(self, reason: str) -> None:
        if reason not in self.truncation:
            if not self.truncation:
                warnings.warn(f"raas_flex.tracing: trace truncated ({reason}); see trace.truncation", stacklevel=3)
            self.truncation.append(reason)
        self.truncated = True

    def on_prefill(self, layer_idx: int, engine, extend: bool = False) -> None:
        """The prompt of ``layer_idx`` was stored in ``engine`` (``extend``: a further piece of it, before
        any decode step)."""
        if not self._recording:
            self._fail(RuntimeError, "this trace was loaded or its tracing block has ended; it records nothing")
        pos = self._layer_pos.get(layer_idx)
        if pos is None:
            return
        if layer_idx in self._prefilled and not extend:
            self._fail(RuntimeError, "a second prompt ran in one tracing block; a trace records one generation: "
                                     "use a new `with raas_flex.tracing(model) as tr:` block per generate call")
        if extend and self.steps:
            self._fail(RuntimeError, "a prompt piece came after decode steps were recorded")
        if self.share is None or (extend and int(engine.length[self.row]) != self.prompt_tokens):
            # (a longer prompt so far, seen first by one layer: size the maps again; nothing but
            # resident0 is recorded yet, and every layer records it again for this piece)
            self._allocate(engine)
        elif engine.H != self.num_kv_heads or engine.ps != self.page_size:
            self._fail(ValueError, f"layer {layer_idx} has {engine.H} KV heads / page_size {engine.ps}, other traced "
                                   f"layers {self.num_kv_heads} / {self.page_size}")
        self._prefilled.add(layer_idx)
        pid = engine.page_id[self.row, list(self.heads)].cpu()
        self.resident0[pos] = self._to_pages(pid, pid >= 0, 0)

    def _allocate(self, engine) -> None:
        if self.row >= engine.B:
            self._fail(ValueError, f"row={self.row} is out of range for a batch of {engine.B}; allowed: 0..{engine.B - 1}")
        if self.heads is None:
            self.heads = tuple(range(engine.H))
        else:
            _check_index_list("heads", list(self.heads), engine.H)
        self.page_size, self.num_kv_heads, self.group_size = engine.ps, engine.H, engine.G
        self.policy, self.budget = engine.policy.name, engine.config.budget
        self.prompt_tokens = int(engine.length[self.row])
        if self._auto_pages:
            self.max_pages = -(-(self.prompt_tokens + self.max_steps) // self.page_size)
        shape = (self.max_steps, len(self.layers), len(self.heads))
        need = math.prod(shape) * self.max_pages * (4 * self.members + 2) + 8 * self.max_steps
        if need > self.max_bytes:
            self._fail(ValueError, f"the trace needs {need} bytes (max_steps={self.max_steps} x {len(self.layers)} layers "
                                   f"x {len(self.heads)} heads x {self.max_pages} pages, group={self.group!r}) but "
                                   f"max_bytes={self.max_bytes}; trace fewer layers/heads/steps or raise max_bytes")
        self.share = torch.zeros(*shape, self.members, self.max_pages)
        self.resident = torch.zeros(*shape, self.max_pages, dtype=torch.bool)
        self.refreshed = torch.zeros(*shape, self.max_pages, dtype=torch.bool)
        self.length = torch.zeros(self.max_steps, dtype=torch.int64)
        self.resident0 = torch.zeros(len(self.layers), len(self.heads), self.max_pages, dtype=torch.bool)

    def _to_pages(self, pid: Tensor, flag: Tensor, fill) -> Tensor:
        """Scatter per-slot values [nH, (m,) P] to logical pages [nH, (m,) max_pages] where ``flag``."""
        keep = flag & (pid >= 0)
        if bool((keep & (pid >= self.max_pages)).any()):
            self._truncate(f"max_pages={self.max_pages}: a logical page >= max_pages was not recorded")
            keep = keep & (pid < self.max_pages)
        h, s = keep.nonzero(as_tuple=True)
        if isinstance(fill, Tensor):  # shares [nH, m, P]
            out = torch.zeros(pid.shape[0], fill.shape[1], self.max_pages)
            out[h, :, pid[h, s]] = fill[h, :, s]
        else:
            out = torch.zeros(pid.shape[0], self.max_pages, dtype=torch.bool)
            out[h, pid[h, s]] = True
        return out

    @torch.no_grad()
    def on_decode(self, layer_idx: int, engine, q: Tensor) -> None:
        """After ``engine``'s decode step for query ``q`` [B, Hq, 1, D] (append, select, attend, observe)."""
        if torch.compiler.is_compiling():
            self._fail(RuntimeError, "tracing runs eager (it copies to the host every step); a compiled decode "
                                     "forward reached it. Call generate without compile_config / disable_compile=False")
        if not self._recording:
            self._fail(RuntimeError, "this trace was loaded or its tracing block has ended; it records nothing")
        pos = self._layer_pos.get(layer_idx)
        if pos is None:
            return
        if layer_idx not in self._prefilled:
            self._fail(RuntimeError, f"layer {layer_idx} decoded without a prompt recorded in this tracing block "
                                     "(a cache filled before the block cannot be traced)")
        step = int(engine.step)
        if step > self.max_steps:
            self._truncate(f"max_steps={self.max_steps}: steps after {self.max_steps} were not recorded")
            return
        b, hs = self.row, list(self.heads)
        nh = len(hs)
        B, H, G, S, P, D = engine.B, engine.H, engine.G, engine.S, engine.P, engine.D
        qg = q[b, :, 0].reshape(H, G, D)[hs].float()  # [nH, G, D]
        k = engine.k[b, hs].float()  # [nH, S, D]
        valid = engine.valid.view(B, H, S)[b, hs]  # [nH, S]
        logits = (qg @ k.transpose(-1, -2)) * engine.scale
        logits = logits.masked_fill(~valid[:, None, :], float("-inf"))
        p = torch.softmax(logits, dim=-1).nan_to_num(0.0).view(nh, G, P, engine.ps).sum(-1)  # [nH, G, P]
        if self.group == "mean":
            p = p.mean(1, keepdim=True)
        elif self.group == "max":
            p = p.amax(1, keepdim=True)
        pid = engine.page_id[b, hs]
        fresh = engine.stamp[b, hs] == engine.step
        pid, p, fresh = pid.cpu(), p.cpu(), fresh.cpu()
        t = step - 1
        res = pid >= 0
        self.share[t, pos] = self._to_pages(pid, res, p)
        self.resident[t, pos] = self._to_pages(pid, res, 0)
        self.refreshed[t, pos] = self._to_pages(pid, res & fresh, 0)
        self.length[t] = engine.length[b]
        self.steps = max(self.steps, step)

    def finish(self) -> None:
        self._recording = False

    # -- reading ----------------------------------------------------------------------------------------
    def _pos(self, layer: int, head: int) -> tuple[int, int]:
        if self.share is None:
            raise ValueError("the trace is empty (no generation ran inside the tracing block)")
        if layer not in self.layers:
            raise ValueError(f"layer={layer!r} was not traced; allowed: {list(self.layers)}")
        if head not in self.heads:
            raise ValueError(f"head={head!r} was not traced; allowed: {list(self.heads)}")
        return self.layers.index(layer), self.heads.index(head)

    def map(self, layer: int, head: int, member: int = 0) -> Tensor:
        """Attention share [steps, max_pages] of one traced (layer, KV head[, query head of the group])."""
        li, hi = self._pos(layer, head)
        if isinstance(member, bool) or not isinstance(member, int) or not 0 <= member < self.members:
            raise ValueError(f"member={member!r} out of range; allowed: 0..{self.members - 1} (group={self.group!r})")
        return self.share[: self.steps, li, hi, member]

    def residency(self, layer: int, head: int) -> Tensor:
        """bool [steps + 1, max_pages]: row 0 after the prompt, row t after decode step t."""
        li, hi = self._pos(layer, head)
        return torch.cat([self.resident0[li, hi][None], self.resident[: self.steps, li, hi]])

    def evictions(self, layer: int, head: int) -> list[tuple[int, int]]:
        """(step, logical page) of every page the policy evicted during the recorded steps."""
        r = self.residency(layer, head)
        gone = r[:-1] & ~r[1:]
        return [(int(t) + 1, int(g)) for t, g in gone.nonzero().tolist()]

    @property
    def prompt_pages(self) -> int:
        return -(-self.prompt_tokens // self.page_size)

    def newest(self) -> Tensor:
        """int64 [steps]: the newest logical page (the one holding the row's last token) at each step."""
        return (self.length[: self.steps] - 1) // self.page_size

    def trim(self) -> "AttentionTrace":
        """Drop the rows past the recorded steps (in place; frees memory). Returns self."""
        if self.share is not None:
            n = self.steps
            self.share, self.resident, self.refreshed = self.share[:n].clone(), self.resident[:n].clone(), self.refreshed[:n].clone()
            self.length = self.length[:n].clone()
        return self

    # -- files ------------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        if self.share is None:
            raise ValueError("the trace is empty (no generation ran inside the tracing block)")
        n = self.steps
        d = {"format": _FORMAT}
        d.update({name: getattr(self, name) for name in _META})
        d["layers"], d["heads"], d["truncation"] = list(self.layers), list(self.heads), list(self.truncation)
        d.update(share=self.share[:n], resident=self.resident[:n], refreshed=self.refreshed[:n],
                 length=self.length[:n], resident0=self.resident0)
        return d

    def save(self, path) -> None:
        """Write the recorded steps with ``torch.save`` (plain tensors, ints and strings)."""
        torch.save(self.to_dict(), path)

    @classmethod
    def from_dict(cls, d: dict) -> "AttentionTrace":
        if not isinstance(d, dict) or d.get("format") != _FORMAT:
            raise ValueError(f"not a raas_flex trace (expected format {_FORMAT!r}, got {d.get('format') if isinstance(d, dict) else type(d).__name__!r})")
        tr = cls.__new__(cls)
        for name in _META:
            setattr(tr, name, d[name])
        tr.layers, tr.heads, tr.truncation = tuple(d["layers"]), tuple(d["heads"]), list(d["truncation"])
        for name in _TENSORS:
            setattr(tr, name, d[name])
        tr._prefilled, tr._recording, tr._layer_pos, tr._auto_pages = set(), False, {}, False
        return tr

    @classmethod
    def load(cls, path) -> "AttentionTrace":
        """Read a trace written by :meth:`save` (``weights_only=True``: no code runs)."""
        return cls.from_dict(torch.load(path, weights_only=True))

    def __repr__(self) -> str:
        return (f"AttentionTrace(layers={list(self.layers) if self.layers else self.layers}, heads={self.heads}, "
                f"group={self.group!r}, steps={self.steps}/{self.max_steps}, max_pages={self.max_pages}, "
                f"truncated={self.truncated})")


@contextlib.contextmanager
def tracing(model, *, layers=None, heads=None, max_steps: int = 4096, max_pages: int | None = None,
            group: str = "mean", row: int = 0, max_bytes: int = 2**30) -> Iterator[AttentionTrace]:
    """``with raas_flex.tracing(model, ...) as trace: model.generate(...)``: record one generation of a
    model patched by :func:`raas_flex.patch` (arguments: see :class:`AttentionTrace`). Inside the block
    ``generate`` runs eager (``disable_compile=True`` is passed for you; ``disable_compile=False``
    raises). On exit the hook is removed: decoding costs nothing extra again."""
    from .hf import _runtime_of

    runtime = _runtime_of(model)
    if runtime is None or not runtime.active:
        raise ValueError("raas_flex.tracing needs a model patched by raas_flex.patch(model, budget=...)")
    if runtime.tracer is not None:
        raise RuntimeError("raas_flex.tracing: this model is already being traced (blocks cannot nest)")
    trace = AttentionTrace(layers=layers, heads=heads, max_steps=max_steps, max_pages=max_pages, group=group,
                           row=row, max_bytes=max_bytes)
    trace.bind(runtime.num_layers)
    runtime.tracer = trace
    try:
        yield trace
    finally:
        runtime.tracer = None
        trace.finish()


# -- classification ----------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class MapClass:
    """Label of one attention map and the evidence for it."""

    label: str
    phoenix_pages: tuple[int, ...]
    milestone_pages: tuple[int, ...]
    streaming_fraction: float


def _check_num(name, value, low, high=None, *, integer=False):
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise TypeError(f"{name} must be {'an int' if integer else 'a number'}, got {value!r} ({type(value).__name__})")
    if not (value >= low and (high is None or value <= high)):
        raise ValueError(f"{name}={value!r} out of range; allowed: {low}..{'inf' if high is None else high}")


def _check_params(tau, sink_pages, window, gap_steps, fade_steps, streaming_mass, min_milestones) -> None:
    _check_num("tau", tau, 0.0, 1.0)
    if tau == 0:
        raise ValueError("tau=0 is out of range; allowed: 0 < tau <= 1")
    _check_num("sink_pages", sink_pages, 0, integer=True)
    _check_num("window", window, 1, integer=True)
    _check_num("gap_steps", gap_steps, 1, integer=True)
    _check_num("fade_steps", fade_steps, 1, integer=True)
    _check_num("streaming_mass", streaming_mass, 0.0, 1.0)
    _check_num("min_milestones", min_milestones, 1, integer=True)


def classify_map(share: Tensor, newest: Tensor, prompt_pages: int, *, tau: float = 0.05, sink_pages: int = 1,
                 window: int = 4, gap_steps: int = 64, fade_steps: int | None = None,
                 streaming_mass: float = 0.8, min_milestones: int = 1) -> MapClass:
    """Classify one attention map (rows = decode steps 1..T, columns = logical pages).

    share: [T, N] attention share of each logical page at each step. newest: int [T], the newest
    logical page at each step (non-decreasing). prompt_pages: pages 0..prompt_pages-1 are the prompt's
    (created at step 0); a later page j is created at the first step whose newest page is >= j.
    A page is *active* at step t when share[t, j] >= tau. Sink pages are j < sink_pages; the recent
    window at step t is the ``window`` newest pages (newest[t]-window < j <= newest[t]).
    Pages never created during the trace and sink pages get no page label.

    - phoenix page: between one *touch* of the page (its creation, or a step where it is active) and
      the next step where it is active, >= ``gap_steps`` steps pass. (Ignored for a long stretch,
      then needed again; a prompt page counts its creation, since the prompt pass read it.)
    - milestone page: a decoded page (created at step >= 1), not phoenix, that is active at some step
      when it is outside the recent window (newest[t] - j >= window: attended for its content, not its
      recency), and whose last active step is followed by >= ``fade_steps`` (default ``gap_steps``)
      recorded steps without activity (it faded and, within the trace, was not needed again).
    - streaming fraction: mean over steps (with any mass) of the share on sink + recent-window pages
      divided by the step's total share.

    Map label, first rule that holds: "phoenix-bearing" if any phoenix page; "milestone-like" if
    >= ``min_milestones`` milestone pages; "streaming-like" if streaming fraction >= ``streaming_mass``;
    else "other" (diffuse maps fitting no pattern).
    """
    fade_steps = gap_steps if fade_steps is None else fade_steps
    _check_params(tau, sink_pages, window, gap_steps, fade_steps, streaming_mass, min_milestones)
    if not isinstance(share, Tensor) or share.dim() != 2:
        raise ValueError(f"share must be a 2-D tensor [steps, pages], got {getattr(share, 'shape', type(share).__name__)}")
    T, N = share.shape
    newest = torch.as_tensor(newest, dtype=torch.int64)
    if newest.shape != (T,):
        raise ValueError(f"newest must have shape ({T},) (one entry per step of share), got {tuple(newest.shape)}")
    if T > 1 and bool((newest[1:] < newest[:-1]).any()):
        raise ValueError("newest must be non-decreasing (the newest logical page never goes back)")
    _check_num("prompt_pages", prompt_pages, 0, integer=True)
    share = share.float()
    steps = torch.arange(1, T + 1)
    active = share >= tau  # [T, N]
    phoenix, milestone = [], []
    for j in range(sink_pages, N):
        if j < prompt_pages:
            created = 0
        else:
            hit = (newest >= j).nonzero()
            if len(hit) == 0:
                continue
            created = int(hit[0]) + 1
        act = steps[active[:, j]].tolist()
        touches = [created] + act
        if any(b - a >= gap_steps for a, b in zip(touches, touches[1:])):
            phoenix.append(j)
            continue
        if created >= 1 and act:
            far = active[:, j] & (newest - j >= window)
            if bool(far.any()) and T - act[-1] >= fade_steps:
                milestone.append(j)
    total = share.sum(1)
    cols = torch.arange(N)[None, :]
    stream_cols = (cols < sink_pages) | ((cols > newest[:, None] - window) & (cols <= newest[:, None]))
    has = total > 0
    frac = float(((share * stream_cols).sum(1)[has] / total[has]).mean()) if bool(has.any()) else 0.0
    if phoenix:
        label = "phoenix-bearing"
    elif len(milestone) >= min_milestones:
        label = "milestone-like"
    elif frac >= streaming_mass:
        label = "streaming-like"
    else:
        label = "other"
    return MapClass(label, tuple(phoenix), tuple(milestone), frac)


def classify_heads(trace: AttentionTrace, *, tau: float = 0.05, sink_pages: int = 1, window: int = 4,
                   gap_steps: int | None = None, fade_steps: int | None = None, streaming_mass: float = 0.8,
                   min_milestones: int = 1) -> dict:
    """Classify every traced map (layer x KV head x group member) with :func:`classify_map`.

    ``gap_steps`` defaults to the trace's budget in tokens: under RaaS a page nobody uses survives at
    most about that many steps, so a longer gap is what eviction would lose. Classify a trace of the
    model's own attention (``policy="dense"``, or a budget holding the whole generation): under a
    sparse policy an evicted page has share 0 and can never show up as a phoenix.

    Returns ``{"maps", "counts": {label: n}, "fractions": {label: n / maps}, "params", "policy",
    "steps", "heads": [{"layer", "head", "member", "label", "phoenix_pages", "milestone_pages",
    "streaming_fraction"}]}`` with labels from ``LABELS``.
    """
    if not isinstance(trace, AttentionTrace):
        raise TypeError(f"trace must be an AttentionTrace, got {type(trace).__name__}")
    if trace.share is None or trace.steps == 0:
        raise ValueError("trace is empty (no decode step was recorded)")
    gap_steps = trace.budget if gap_steps is None else gap_steps
    params = dict(tau=tau, sink_pages=sink_pages, window=window, gap_steps=gap_steps,
                  fade_steps=gap_steps if fade_steps is None else fade_steps, streaming_mass=streaming_mass,
                  min_milestones=min_milestones)
    _check_params(**params)
    newest = trace.newest()
    rows = []
    for layer in trace.layers:
        for head in trace.heads:
            for member in range(trace.members):
                c = classify_map(trace.map(layer, head, member), newest, trace.prompt_pages, **params)
                rows.append({"layer": layer, "head": head, "member": member, "label": c.label,
                             "phoenix_pages": list(c.phoenix_pages), "milestone_pages": list(c.milestone_pages),
                             "streaming_fraction": round(c.streaming_fraction, 4)})
    counts = {label: sum(r["label"] == label for r in rows) for label in LABELS}
    return {"maps": len(rows), "counts": counts, "fractions": {k: v / len(rows) for k, v in counts.items()},
            "params": params, "policy": trace.policy, "group": trace.group, "steps": trace.steps, "heads": rows}


def summary_table(summary: dict) -> str:
    """The counts of :func:`classify_heads` as a text table, then one line per map."""
    lines = [f"{'label':<16} {'maps':>5} {'fraction':>9}"]
    for label in LABELS:
        lines.append(f"{label:<16} {summary['counts'][label]:>5} {summary['fractions'][label]:>9.1%}")
    lines.append(f"{'total':<16} {summary['maps']:>5}")
    lines.append("")
    lines.append(f"{'layer':>5} {'head':>4} {'member':>6}  {'label':<16} {'stream':>6}  phoenix / milestone pages")
    for r in summary["heads"]:
        lines.append(f"{r['layer']:>5} {r['head']:>4} {r['member']:>6}  {r['label']:<16} {r['streaming_fraction']:>6.2f}  "
                     f"{r['phoenix_pages']} / {r['milestone_pages']}")
    return "\n".join(lines)
